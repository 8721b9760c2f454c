"""cdpctl points JOURNAL: the flush points and bookmarks one can restore."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore.cli.output import Doc, Output, add_command, open_journal, text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_command(subparsers, "points", "list restore points",
                       "List flush points (crash-consistent) and bookmarks, oldest first.")


def line(p: Doc) -> str:
    if p["kind"] == "BOOKMARK":
        what = text(p["name"])
    else:  # a FLUSH of one file names it; a FLUSH of everything does not
        what = "all files" if p["name"] is None else f"file {text(p['name'])}"
    return f"{p['seq']:>8}  {p['time']}  {p['kind']:<8}  {what}"


def render(doc: Doc) -> Iterator[str]:
    for p in doc["points"]:
        yield line(p)


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out) as j:
        pts = [p.to_json() for p in j.points()]
    out.result({"points": pts, "count": len(pts)}, render)
    return 0

"""cdpctl points JOURNAL: the flush points and bookmarks one can restore."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore.capture import incomplete_ranges
from cdpcore.cli.output import Doc, Output, add_command, open_journal, text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_command(subparsers, "points", "list restore points",
                       "List flush points (crash-consistent) and bookmarks, oldest first. Points taken "
                       "before an online baseline finished are marked incomplete.")


def line(p: Doc) -> str:
    mark = "" if p.get("complete", True) else "  (incomplete: before the baseline finished)"
    if p["kind"] == "BOOKMARK":
        what = text(p["name"])
    else:  # a FLUSH of one file names it; a FLUSH of everything does not
        what = "all files" if p["name"] is None else f"file {text(p['name'])}"
    return f"{p['seq']:>8}  {p['time']}  {p['kind']:<8}  {what}{mark}"


def render(doc: Doc) -> Iterator[str]:
    if doc["complete_from"] is not None:
        yield f"restore is complete from seq {doc['complete_from']} (the first baseline finished there)"
    for p in doc["points"]:
        yield line(p)


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key) as j:
        gaps = incomplete_ranges(j)
        pts = [{**p.to_json(), "complete": not any(a <= p.seq < b for a, b in gaps)} for p in j.points()]
    complete_from = gaps[0][1] if gaps and gaps[0][0] == j.first_seq else None
    out.result({"points": pts, "count": len(pts), "complete_from": complete_from,
                "incomplete": [list(g) for g in gaps]}, render)
    return 0

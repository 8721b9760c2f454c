"""cdpctl restore JOURNAL DEST --at POINT: materialise the tree at a point."""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any

from cdpcore.cli.output import (
    Doc,
    Output,
    add_command,
    fields,
    open_journal,
    size,
    text,
)
from cdpcore.restore import restore


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "restore", "restore the tree as it was at a point",
                    "Write the protected tree as it was at POINT into DEST, which must be "
                    "absent or an empty directory.")
    p.add_argument("dest", metavar="DEST", help="where to write the tree")
    p.add_argument("--at", default="latest", metavar="POINT",
                   help="the point to restore (default: latest); see docs/cli.md")
    return p


def render(doc: Doc) -> Iterator[str]:
    yield f"restored {doc['journal']} at seq {doc['seq']} ({doc['time'] or 'no records'}) into {doc['dest']}"
    yield from ("  " + row for row in fields([
        ("files", doc["files"]),
        ("directories", doc["dirs"]),
        ("written", size(doc["bytes_written"])),
        ("records", f"{doc['records']} replayed"),
        ("dirty", len(doc["dirty"]) or "none"),
    ]))
    for d in doc["dirty"]:
        yield f"  dirty: {text(d)}"


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out) as j:
        result = restore(j, args.dest, at=args.at)
        doc = {"journal": j.path, "dest": os.path.abspath(args.dest), "at": args.at, **result.to_json()}
    if result.dirty:
        # Capture missed writes to these files: their restored content may be wrong.
        out.warn(f"{len(result.dirty)} file(s) were marked dirty; their restored content may be "
                 "incomplete (listed in the output)")
    out.result(doc, render)
    return 0

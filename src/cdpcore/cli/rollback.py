"""cdpctl rollback JOURNAL --to POINT: return the live root to a point, in place."""
from __future__ import annotations

import argparse
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
from cdpcore.rollback import rollback


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "rollback", "return the protected root to a point, in place",
                    "Rewrite the live protected root as it was at POINT, changing only what "
                    "changed after it; the rollback is journaled (bookmark rollback-to-SEQ), so "
                    "restoring a point before it undoes it. Refuses while a capture runs. Opens "
                    "the journal for writing.")
    p.add_argument("--to", required=True, metavar="POINT", help="the point to return to; see docs/cli.md")
    p.add_argument("--force", action="store_true",
                   help="roll back even though a capture holds the capture lock")
    return p


def render(doc: Doc) -> Iterator[str]:
    if not doc["seq"]:
        yield f"{doc['root']} already holds the tree of seq {doc['to_seq']}: nothing to roll back"
        return
    yield (f"rolled {doc['root']} back to seq {doc['to_seq']} (from seq {doc['from_seq']}); "
           f"journaled as seq {doc['seq']} ({doc['time']})")
    yield from ("  " + row for row in fields([
        ("written", size(doc["bytes_written"])),
        ("changed", len(doc["changed"])),
        ("created", len(doc["created"])),
        ("removed", len(doc["removed"])),
        ("renamed", len(doc["renamed"])),
        ("records", doc["records"]),
    ]))
    for old, new in doc["renamed"]:
        yield f"  renamed: {text(old)} -> {text(new)}"
    if doc["resumed"]:
        yield "  (completed an interrupted rollback)"


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, readonly=False) as j:
        result = rollback(j, args.to, force=args.force)
        doc = {"journal": j.path, "root": j.root, "to": args.to, **result.to_json()}
    out.result(doc, render)
    return 0

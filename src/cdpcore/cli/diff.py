"""cdpctl diff JOURNAL --from P1 --to P2: what changed between two points."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore.cli.output import Doc, Output, add_command, open_journal, text
from cdpcore.diff import diff


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "diff", "files and byte ranges changed between two points",
                    "List what changed in the protected tree from the state at P1 to the state "
                    "at P2: files changed (merged byte ranges, sizes before and after), "
                    "created, deleted and renamed.")
    p.add_argument("--from", dest="since", required=True, metavar="P1", help="the earlier point")
    p.add_argument("--to", dest="until", default="latest", metavar="P2",
                   help="the later point (default: latest)")
    return p


def _size(n: int | None) -> str:
    return "-" if n is None else str(n)


def render(doc: Doc) -> Iterator[str]:
    yield f"diff of {doc['journal']}: seq {doc['from_seq']} -> seq {doc['to_seq']}"
    for c in doc["changed"]:
        yield (f"M {text(c['path'])}  {c['size_before']} -> {c['size_after']} bytes, "
               f"{c['bytes']} bytes changed in {len(c['ranges'])} range(s)")
        for s, e in c["ranges"][:20]:
            yield f"    [{s}, {e})"
        if len(c["ranges"]) > 20:
            yield f"    ... {len(c['ranges']) - 20} more (--json lists them all)"
    for e in doc["created"]:
        yield f"A {text(e['path'])}  {e['type']} {_size(e['size'])}"
    for e in doc["deleted"]:
        yield f"D {text(e['path'])}  {e['type']} {_size(e['size'])}"
    for r in doc["renamed"]:
        yield f"R {text(r['from'])} -> {text(r['to'])}  {r['size']}"
    if not (doc["changed"] or doc["created"] or doc["deleted"] or doc["renamed"]):
        yield "no changes"


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key) as j:
        d = diff(j, args.since, args.until)
        doc = {"journal": j.path, "from": args.since, "to": args.until, **d.to_json()}
    out.result(doc, render)
    return 0

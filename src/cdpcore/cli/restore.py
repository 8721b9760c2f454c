"""cdpctl restore JOURNAL DEST --at POINT: materialise the tree at a point."""
from __future__ import annotations

import argparse
import os
import sys
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
    p.add_argument("--consistent", action="store_true",
                   help="restore the last FLUSH of all files at or before POINT instead")
    p.add_argument("--sync", action="store_true",
                   help="fsync every file and directory written before returning (before a "
                        "database is started on DEST)")
    return p


class ProgressBars:
    """tqdm bars on stderr, one per phase of a restore: records planned,
    then bytes copied. Only for a person at a terminal: never with --json
    and never when stdout or stderr is not a TTY (logs, pipes, cron)."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    @staticmethod
    def wanted(out: Output) -> bool:
        return not out.json_mode and sys.stderr.isatty() and sys.stdout.isatty()

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bars.get(phase)
        if bar is None:
            for other in self._bars.values():
                other.close()
            copy = phase == "copy"
            bar = self._bars[phase] = tqdm(
                total=total, desc="copying" if copy else "planning", unit="B" if copy else " rec",
                unit_scale=True, unit_divisor=1024 if copy else 1000, file=sys.stderr, leave=False,
                mininterval=0.2)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def render(doc: Doc) -> Iterator[str]:
    yield f"restored {doc['journal']} at seq {doc['seq']} ({doc['time'] or 'no records'}) into {doc['dest']}"
    yield from ("  " + row for row in fields([
        ("files", doc["files"]),
        ("directories", doc["dirs"]),
        ("written", size(doc["bytes_written"])),
        ("records", f"{doc['records']} planned"),
        ("dirty", len(doc["dirty"]) or "none"),
    ]))
    for d in doc["dirty"]:
        yield f"  dirty: {text(d)}"


def run(args: argparse.Namespace, out: Output) -> int:
    bars = ProgressBars() if ProgressBars.wanted(out) else None
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key) as j:
        try:
            result = restore(j, args.dest, at=args.at, consistent=args.consistent, progress=bars,
                             sync=args.sync)
        finally:
            if bars is not None:
                bars.close()
        doc = {"journal": j.path, "dest": os.path.abspath(args.dest), "at": args.at,
               "consistent": args.consistent, "synced": args.sync, **result.to_json()}
    if result.dirty:
        # Capture missed writes to these files: their restored content may be wrong.
        out.warn(f"{len(result.dirty)} file(s) were marked dirty; their restored content may be "
                 "incomplete (listed in the output)")
    out.result(doc, render)
    return 0

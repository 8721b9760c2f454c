"""cdpctl bookmark JOURNAL NAME: name the current point."""
from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from cdpcore.cli.output import Doc, Output, UsageError, add_command, open_journal, text
from cdpcore.journal import PointInfo
from cdpcore.point import datetime_to_us


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "bookmark", "name the current point",
                    "Append a BOOKMARK record named NAME and make it durable; restore it "
                    "later with --at bookmark:NAME. Opens the journal for writing.")
    p.add_argument("name", metavar="NAME", help="1-255 bytes of UTF-8, no NUL or newline")
    return p


def render(doc: Doc) -> list[str]:
    return [f"bookmark {text(doc['name'])} at seq {doc['seq']} ({doc['time']})"]


def run(args: argparse.Namespace, out: Output) -> int:
    # The time is taken here rather than left to the writer so that the
    # output can show it without reading the journal back.
    ts = datetime_to_us(datetime.now(UTC))
    with open_journal(args.journal, out, readonly=False) as j:
        try:
            seq = j.bookmark(args.name, ts=ts)
        except ValueError as e:  # an invalid name
            raise UsageError(str(e)) from None
        j.sync()
    out.result(PointInfo(seq, ts, "BOOKMARK", args.name).to_json(), render)
    return 0

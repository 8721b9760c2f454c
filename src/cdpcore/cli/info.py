"""cdpctl info JOURNAL: identity, extent and health of a journal."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore.cli.output import Doc, Output, add_command, fields, open_journal, size


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_command(subparsers, "info", "show what a journal holds",
                       "Show a journal's identity, extent and health (read-only).")


def render(doc: Doc) -> Iterator[str]:
    """Shared with `init`, which shows the journal it created the same way."""
    if doc["records"]:
        records = f"{doc['records']} (seq {doc['first_seq']}..{doc['last_seq']})"
    else:
        records = "0"
    yield from fields([
        ("journal", doc["path"]),
        ("uuid", doc["uuid"]),
        ("format", doc["format_version"]),
        ("root", doc["root"]),
        ("created", doc["created"]),
        ("segment size", size(doc["segment_size"])),
        ("segments", doc["segments"]),
        ("records", records),
        ("first record", doc["first_time"] or "-"),
        ("last record", doc["last_time"] or "-"),
        ("size", size(doc["bytes"])),
        ("synced seq", doc["synced_seq"] if doc["synced_seq"] is not None else "unknown"),
        ("damage", doc["damage"] or "none"),
        *(("recovery", note) for note in doc["recovery"]),
    ])


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key, report_recovery=False) as j:
        doc = j.info()
    if doc["damage"]:
        # info still succeeds: it is how one looks at a damaged journal.
        out.warn(f"the journal is damaged ({doc['damage']}); run 'cdpctl verify'")
    out.result(doc, render)
    return 0

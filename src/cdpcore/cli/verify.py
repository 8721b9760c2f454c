"""cdpctl verify JOURNAL: check every byte; exit 1 when damage is found."""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any

from cdpcore.cli.output import Doc, Output, add_command, open_journal, plural, size
from cdpcore.errors import CorruptJournal
from cdpcore.journal import Problem, VerifyReport

EXIT_DAMAGE = 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_command(subparsers, "verify", "check a journal for damage",
                       "Check the journal's metadata, every segment header and record, the "
                       "sequence chain and the index files (read-only). Exit 0 when it is "
                       "intact, 1 when damage is found.")


def render(doc: Doc) -> Iterator[str]:
    records = plural(doc["records"], "record")
    if doc["records"]:
        records += f" (seq {doc['first_seq']}..{doc['last_seq']})"
    yield f"{doc['path']}: checked {plural(doc['segments'], 'segment')}, {records}, {size(doc['bytes'])}"
    for p in doc["problems"]:
        yield str(Problem(**p))
    for note in doc["recovery"]:
        yield f"recovery: {note}"
    damage = sum(p["severity"] == "damage" for p in doc["problems"])
    yield "OK" if doc["ok"] else f"DAMAGED: {plural(damage, 'problem')} found"


def run(args: argparse.Namespace, out: Output) -> int:
    try:
        with open_journal(args.journal, out, report_recovery=False) as j:
            report, path, recovery = j.verify(), j.path, j.recovery
    except CorruptJournal as e:
        # Damage that stops even a read-only open is still a verify finding
        # (exit 1), not a failure to verify.
        report, path, recovery = VerifyReport(problems=[Problem("damage", str(e))]), os.path.abspath(args.journal), []
    doc = {"path": path, **report.to_json(), "recovery": recovery}
    out.result(doc, render)
    return 0 if report.ok else EXIT_DAMAGE

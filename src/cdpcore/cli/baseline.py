"""cdpctl baseline JOURNAL: take a fresh base copy of the root, online."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore.capture import baseline
from cdpcore.cli.output import Doc, Output, add_command, open_journal, plural, size


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_command(subparsers, "baseline", "take a fresh base copy of the protected root",
                       "Append a BASE record, copy the root into JOURNAL/base/NAME while captured "
                       "programs keep writing (their records after the BASE make the copy "
                       "complete), then bookmark 'baseline NAME complete': restore is complete "
                       "from that point. Opens the journal for writing.")


def render(doc: Doc) -> Iterator[str]:
    yield (f"baseline {doc['name']}: {plural(doc['files'], 'file')}, {size(doc['bytes'])}; BASE at seq "
           f"{doc['base_seq']}, restore is complete from seq {doc['complete_seq']}")


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, readonly=False) as j:
        doc = {"journal": j.path, **baseline(j).to_json()}
    out.result(doc, render)
    return 0

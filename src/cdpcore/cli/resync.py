"""cdpctl resync JOURNAL: journal what the live root holds that the journal
does not (files capture marked dirty, changes it could not see)."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore.capture import resync
from cdpcore.cli.output import Doc, Output, add_command, open_journal, text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_command(subparsers, "resync", "journal what capture missed",
                       "Restore the latest point into a scratch directory (in TMPDIR), "
                       "compare it with the live root, and journal every difference (content, "
                       "size, mode, names), then a FLUSH. Run it while nothing writes the root; "
                       "`cdpctl protect` runs it when its program exits. Opens the journal for "
                       "writing.")


def render(doc: Doc) -> Iterator[str]:
    if not doc["seq"]:
        yield f"{doc['root']}: the journal's latest point matches the live root; nothing to resync"
        return
    yield f"resynced {doc['root']}: journaled up to seq {doc['seq']}"
    for key in ("changed", "created", "removed"):
        for p in doc[key]:
            yield f"  {key}: {text(p)}"


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, readonly=False) as j:
        doc = {"journal": j.path, "root": j.root, **resync(j).to_json()}
    out.result(doc, render)
    return 0

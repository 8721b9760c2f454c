"""cdpctl checkpoint JOURNAL: bring the journal's restore checkpoints up to date."""
from __future__ import annotations

import argparse
from typing import Any

from cdpcore import checkpoint
from cdpcore.cli.output import Doc, Output, add_command, open_journal, plural, size


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "checkpoint", "save restore plans beside the journal (speeds up restore, rollback)",
                    "Remove unusable checkpoints and save the plan of the state at the end of "
                    "sealed segments: every one of the newest few, and further back one every "
                    "--spacing bytes of segments (default: 256 MiB or 8 times a checkpoint's size, "
                    "whichever is more). A restore or rollback then reads only the records after "
                    "the nearest checkpoint. Checkpoints are a cache: removing them loses nothing "
                    "but speed. Run it from cron, or let capture run it when it stops.")
    p.add_argument("--spacing", metavar="BYTES", type=_bytes,
                   help="bytes of segments between two older checkpoints (suffixes K, M, G; 0: one "
                        "at every sealed segment)")
    return p


def _bytes(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        n = int(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}")
    return n * units[unit]


def render(doc: Doc) -> list[str]:
    lines = [f"created {plural(len(doc['created']), 'checkpoint')}"
             + (f" (seq {', '.join(map(str, doc['created']))})" if doc["created"] else "")]
    for r in doc["removed"]:
        lines.append(f"removed the checkpoint at seq {r['seq']}: {r['reason']}")
    lines.append(f"{plural(len(doc['kept']), 'checkpoint')}, {size(doc['bytes'])}")
    return lines


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, readonly=False) as j:
        res = checkpoint.update(j, args.spacing)
    out.result(res.to_json(), render)
    return 0

"""cdpctl init JOURNAL --root DIR: create a journal."""
from __future__ import annotations

import argparse
import re
from typing import Any

from cdpcore import Journal
from cdpcore.cli import info
from cdpcore.cli.output import Output, UsageError, add_command
from cdpcore.format import DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"(\d+)\s*(?:([kmg])(?:ib)?)?", re.IGNORECASE)


def parse_size(s: str) -> int:
    """Bytes from '4096', '4K', '64M', '1G' (binary units; 'KiB' etc. too)."""
    m = _SIZE.fullmatch(s.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {s!r}: expected a number of bytes, optionally with K, M or G (KiB, MiB, GiB)")
    n = int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if n < MIN_SEGMENT_SIZE:
        raise argparse.ArgumentTypeError(f"segment size {s!r} is below the minimum of {MIN_SEGMENT_SIZE} bytes")
    return n


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "init", "create a journal",
                    "Create a journal protecting directory DIR. Unless --no-base, a non-empty "
                    "DIR is copied into the journal as its first base (DIR must not change meanwhile).")
    p.add_argument("--root", required=True, metavar="DIR", help="the protected directory")
    p.add_argument("--segment-size", type=parse_size, default=DEFAULT_SEGMENT_SIZE, metavar="SIZE",
                   help=f"segment file size: bytes or K/M/G (binary) (default {DEFAULT_SEGMENT_SIZE >> 20}M)")
    p.add_argument("--no-base", action="store_true", help="do not copy DIR as the first base")
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    try:
        j = Journal.create(args.journal, args.root, segment_size=args.segment_size,
                           base=not args.no_base)
    except ValueError as e:  # the journal inside the protected root, ...
        raise UsageError(str(e)) from None
    with j:
        doc = j.info()
    out.result(doc, lambda d: [f"created journal {d['path']}", *info.render(d)])
    return 0

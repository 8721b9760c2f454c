"""cdpctl log JOURNAL: the records, one a line, oldest first."""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from typing import Any

from cdpcore import Kind, Record
from cdpcore.cli.output import Doc, Output, add_command, count, mode, open_journal, text
from cdpcore.format import norm_path
from cdpcore.point import format_us

KIND_NAMES = ", ".join(k.name.lower() for k in Kind)
# What the `name` field means for the kinds that have one.
NAME_LABEL = {Kind.BOOKMARK: "name", Kind.BASE: "base", Kind.DIRTY: "reason"}


def parse_kinds(s: str) -> list[Kind]:
    """One kind or a comma-separated list, any case."""
    kinds = []
    for name in s.split(","):
        try:
            kinds.append(Kind[name.strip().upper()])
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown kind {name!r} (kinds: {KIND_NAMES})") from None
    return kinds


def parse_path(s: str) -> str:
    try:
        return norm_path(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "log", "list records",
                    "List records oldest first: those that take the tree from state --since "
                    "to state --until (seq in (since, until]).")
    p.add_argument("--since", metavar="POINT", help="start after this point (default: the beginning)")
    p.add_argument("--until", metavar="POINT", help="stop at this point, inclusive (default: the end)")
    p.add_argument("--path", type=parse_path, metavar="P",
                   help="only records about P or anything under it (relative to the root)")
    # One value per --kind (repeatable, or comma-separated): a variadic
    # option would swallow a JOURNAL written after it.
    p.add_argument("--kind", type=parse_kinds, action="extend", metavar="KIND",
                   help=f"only this kind; repeat or separate with commas (any case): {KIND_NAMES}")
    p.add_argument("--limit", type=count, metavar="N", help="at most N records")
    return p


def details(rec: Doc) -> Iterator[str]:
    """The kind-specific fields of a record's JSON form, as text."""
    if "offset" in rec:
        yield f"offset={rec['offset']}"
    if "length" in rec:
        yield f"length={rec['length']}"
    if "mode" in rec:
        yield f"mode={mode(rec['mode'])}"
    if "mtime_us" in rec:
        yield f"mtime={format_us(rec['mtime_us'])}"
    if "target" in rec:
        yield f"-> {text(rec['target'])}"
    if "name" in rec:
        yield f"{NAME_LABEL.get(Kind[rec['kind']], 'name')}={text(rec['name'])}"
    if "audit_entry" in rec:
        yield f"entry={rec['audit_entry']}  hash={rec['audit_hash'][:16]}..."


def line(rec: Doc) -> str:
    """seq, time, kind, path, details: shared with `show` and `points`."""
    if rec["path"] is None and rec["file_id"]:
        path = f"<file id {rec['file_id']}, unlinked>"
    else:
        path = text(rec["path"])
    return "  ".join([f"{rec['seq']:>8}", rec["time"], f"{rec['kind']:<8}", path, *details(rec)]).rstrip()


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key) as j:
        records: Iterator[Record] = j.records(since=args.since, until=args.until, path=args.path,
                                              kinds=args.kind)
        if args.limit is not None:
            records = itertools.islice(records, args.limit)
        out.stream("records", records, Record.to_json, lambda r: line(r.to_json()))
    return 0

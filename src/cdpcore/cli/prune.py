"""cdpctl prune JOURNAL --keep-all 24h ...: fold old records into kept points."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore.cli.output import (
    Doc,
    Output,
    UsageError,
    add_command,
    fields,
    open_journal,
    size,
)
from cdpcore.errors import PointError
from cdpcore.point import parse_point
from cdpcore.retention import Policy, prune, save_policy


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "prune", "fold records older than the keep-all window into kept points",
                    "Records older than --keep-all are folded into kept points: per hour, day and "
                    "month for as far back as --keep-hourly, --keep-daily and --keep-monthly say "
                    "(the last flush of all files in each, else the last record), every bookmark "
                    "(unless --drop-bookmarks) and the boundary itself; every other point before "
                    "the boundary goes and its space is reclaimed. A kept point restores exactly "
                    "what it restored before. Without --keep-all, the policy stored by "
                    "--save-policy is used. Durations: a number and s, m, h, d, w or y (365 days). "
                    "Opens the journal for writing.")
    p.add_argument("--keep-all", metavar="DURATION", help="keep every point this recent (e.g. 24h)")
    p.add_argument("--keep-hourly", metavar="DURATION", help="keep one point per hour this far back")
    p.add_argument("--keep-daily", metavar="DURATION", help="keep one point per day this far back")
    p.add_argument("--keep-monthly", metavar="DURATION", help="keep one point per month this far back")
    p.add_argument("--drop-bookmarks", action="store_true", help="let bookmarks before the boundary go too")
    p.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    p.add_argument("--save-policy", action="store_true", help="store this policy in journal.json")
    p.add_argument("--now", metavar="TIME",
                   help="count the windows back from TIME (a point time, or epoch seconds) instead of the clock")
    return p


def render(doc: Doc) -> Iterator[str]:
    yield doc["message"]
    if doc["boundary"] is None:
        return
    bases = []
    if doc["bases_written"] or doc["bases_removed"]:
        bases = [("bases", f"written {', '.join(doc['bases_written']) or '-'}; "
                           f"removed {', '.join(doc['bases_removed']) or '-'}")]
    yield from ("  " + row for row in fields([
        ("boundary", f"seq {doc['boundary']}"),
        ("kept points", ", ".join(map(str, doc["kept"]))),
        ("pruned points", doc["pruned_records"]),
        ("segments", f"{len(doc['segments_replaced'])} replaced by {len(doc['segments_written'])}"),
        *([] if doc["dry_run"] else [
            ("segment files", f"{size(doc['segment_bytes_before'])} -> {size(doc['segment_bytes_after'])}"),
            ("with bases", f"{size(doc['bytes_before'])} -> {size(doc['bytes_after'])} (allocated)"),
            *bases,
        ]),
    ]))


def _now(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text) * 10**6
    try:
        p = parse_point(text)
    except PointError as e:
        raise UsageError(f"--now: {e}") from None
    if p.kind != "time":
        raise UsageError(f"--now needs a time, got {text!r}")
    assert isinstance(p.value, int)
    return p.value


def run(args: argparse.Namespace, out: Output) -> int:
    now = _now(args.now)
    policy = None
    if args.keep_all is not None:
        try:
            policy = Policy.parse(args.keep_all, args.keep_hourly, args.keep_daily, args.keep_monthly,
                                  args.drop_bookmarks)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif any((args.keep_hourly, args.keep_daily, args.keep_monthly, args.save_policy)):
        raise UsageError("--keep-all is required with --keep-hourly/--keep-daily/--keep-monthly/--save-policy")
    with open_journal(args.journal, out, readonly=False) as j:
        if policy is None and j.meta.retention is None:
            raise UsageError("no --keep-all given and no policy stored in the journal (--save-policy)")
        if args.save_policy and not args.dry_run:
            assert policy is not None
            save_policy(j, policy)
        result = prune(j, policy, now=now, dry_run=args.dry_run)
        used = policy if policy is not None else Policy.from_json(j.meta.retention or {})
        doc = {"journal": j.path, "policy": used.to_json(), **result.to_json(),
               "reclaimed_segments": result.reclaimed_segments}
    out.result(doc, render)
    return 0

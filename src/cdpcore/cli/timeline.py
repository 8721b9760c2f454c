"""cdpctl timeline JOURNAL: activity per interval as a terminal chart (and a
PNG), intervals that look like ransomware, and the suggested restore point."""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any

from cdpcore.cli.output import Doc, Output, add_command, open_journal
from cdpcore.timeline import DefaultBucket, parse_bucket, plot, timeline

BAR_WIDTH = 40


def bucket_arg(s: str) -> str:
    try:
        parse_bucket(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "timeline", "activity per interval; flags ransomware-like intervals",
                    "Bytes written, records, files touched, renames and unlinks per interval, "
                    "as a chart; intervals where many old files got incompressible data are "
                    "flagged, and the last point before the first of them is suggested for a "
                    "restore.")
    p.add_argument("--bucket", type=bucket_arg, default=DefaultBucket, metavar="WIDTH",
                   help=f"interval width: 1s, 10s, 1m, 1h, 1d or any N of s/m/h/d "
                        f"(default {DefaultBucket})")
    p.add_argument("--since", metavar="POINT", help="start after this point")
    p.add_argument("--until", metavar="POINT", help="stop at this point, inclusive")
    p.add_argument("--png", metavar="FILE", help="also write a plot (needs cdpcore[plot])")
    return p


def short_size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def chart(doc: Doc) -> Iterator[str]:
    """One line per interval that has records: a bar for the bytes written
    ('!' when flagged), the figures, and the gaps between intervals."""
    buckets = doc["buckets"]
    yield (f"{doc['journal']}: {doc['records']} records (seq {doc['since_seq'] + 1}.."
           f"{doc['until_seq']}) in {len(buckets)} intervals of {doc['bucket']}")
    yield (f"{'interval (UTC)':<27}  {'bytes written':<{BAR_WIDTH}}  {'bytes':>10} {'records':>8} "
           f"{'files':>6} {'renames':>7} {'unlinks':>7}")
    top = max((b["bytes_written"] for b in buckets), default=0)
    prev = None
    for b in buckets:
        if prev is not None and b["start"] - prev > doc["bucket_us"]:
            gap = (b["start"] - prev) // doc["bucket_us"] - 1
            yield f"{'':<27}  ({gap} interval{'' if gap == 1 else 's'} without records)"
        n = round(BAR_WIDTH * b["bytes_written"] / top) if top else 0
        bar = ("!" if b["flagged"] else "#") * max(n, 1 if b["bytes_written"] else 0)
        line = (f"{b['time']:<27}  {bar:<{BAR_WIDTH}}  {short_size(b['bytes_written']):>10} "
                f"{b['records']:>8} {b['files']:>6} {b['renames']:>7} {b['unlinks']:>7}")
        if b["flagged"]:
            line += (f"  << RANSOMWARE? {b['incompressible_files']} files got incompressible "
                     f"data, {b['damaged_files']} old files damaged")
        yield line
        prev = b["start"]
    if "png" in doc:
        yield f"plot written to {doc['png']}"
    if not doc["flagged"]:
        yield "no interval looks like ransomware"
        return
    yield f"{len(doc['flagged'])} interval(s) look like ransomware; the first begins {doc['flagged'][0]}"
    s = doc["suggestion"]
    if s is None:
        yield "no restore point before it: the journal's first record is already in it"
        return
    what = "the last flush of all files" if s["kind"] == "FLUSH" else "the last record"
    yield f"suggested restore point: seq {s['seq']} ({s['time']}), {what} before it"
    yield f"  cdpctl restore {doc['journal']} DEST --at {s['point']}"


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key) as j:
        t = timeline(j, bucket=args.bucket, since=args.since, until=args.until)
    doc = t.to_json()
    if args.png:
        plot(t, args.png)
        doc["png"] = os.path.abspath(args.png)
    out.result(doc, chart)
    return 0

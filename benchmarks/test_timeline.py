"""Timeline of a 1-million-record journal, next to plain scans of it.

The journal (one 1 GiB file, 1,000,000 random 4 KiB text-like writes, about
4.2 GB of segments; CDP_BENCH_TL_RECORDS makes it smaller) is built once
per run through the Python API and deleted at the end. The summary test
times timeline() with 1-minute and 1-second buckets against
Journal.records() iteration and Journal.verify() over the same journal.
"""
from __future__ import annotations

import shutil

import _bench
import pytest
from _bench import TIMELINE_RECORDS

from cdpcore import timeline


@pytest.fixture(scope="module")
def write_journal():
    work = _bench.scratch("timeline")
    try:
        yield _bench.build_write_journal(work, TIMELINE_RECORDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("bucket", ["1m", "1s"])
def test_timeline(benchmark, write_journal, bucket):
    benchmark.group = f"timeline, {TIMELINE_RECORDS:,} writes"
    t = benchmark.pedantic(timeline, args=(write_journal["path"],), kwargs={"bucket": bucket},
                           rounds=2, warmup_rounds=1)
    assert sum(b.records for b in t.buckets) == write_journal["records"]
    assert t.flagged == []  # text-like writes to one file: nothing to flag


def test_timeline_summary(write_journal, record):
    b = dict(write_journal)
    record("timeline", {**b, **_bench.timeline_measure(b.pop("path"))})

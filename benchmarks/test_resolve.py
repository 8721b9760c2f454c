"""Target 3: resolve a timestamp in a journal of 10 million records in <= 1 ms.

The journal (FLUSH records with increasing timestamps, 48 bytes each, about
480 MB) is built once per run from C (benchmarks/c/fill_journal.c) in the
benchmark directory and deleted at the end; CDP_BENCH_RECORDS makes it
smaller. Each timed call resolves one random point.
"""
from __future__ import annotations

import random
import shutil

import _bench
import pytest
from _bench import RECORDS

from cdpcore import Journal


@pytest.fixture(scope="module")
def big_journal():
    work = _bench.scratch("resolve")
    try:
        yield _bench.build_big_journal(work, RECORDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_open_readonly(benchmark, big_journal):
    """Context: opening with the index files of the sealed segments present."""
    benchmark.group = f"resolve, {RECORDS:,} records"
    benchmark.pedantic(lambda: Journal.open(big_journal["path"], readonly=True).close(), rounds=5)


@pytest.mark.parametrize("kind", ["ts", "seq"])
def test_resolve(benchmark, big_journal, kind):
    benchmark.group = f"resolve, {RECORDS:,} records"
    rng = random.Random(7)
    lo, hi = big_journal["first_ts"], big_journal["last_ts"]
    if kind == "ts":
        points = iter([rng.randrange(lo, hi + 1) for _ in range(3000)])
    else:
        points = iter([f"seq:{rng.randrange(1, RECORDS + 1)}" for _ in range(3000)])
    with Journal.open(big_journal["path"], readonly=True) as j:
        benchmark.pedantic(j.resolve, setup=lambda: ((next(points),), {}), rounds=2000, warmup_rounds=10)
    data = benchmark.stats.stats.data
    benchmark.extra_info["p99 us"] = round(_bench.percentile(data, 99) * 1e6, 1)
    benchmark.extra_info["median us"] = round(_bench.median(data) * 1e6, 1)


def test_resolve_summary(big_journal, record):
    b = dict(big_journal)
    res = _bench.resolve_measure(b.pop("path"), b["first_ts"], b["last_ts"], RECORDS)
    record("resolve", {**b, **res})

"""Restore and rollback of a 1 GiB file with a million random 4 KiB writes.

The journal (_bench.build_write_journal, about 4.2 GB; CDP_BENCH_RESTORE_RECORDS
makes it smaller) is built once per run and deleted at the end. The
summary test runs restore next to `cp --sparse=never` (ABAB), restore time
against records, and rollback after 1 % changed next to a full restore;
its tables are in the JSON summary (docs/benchmarks.md section 6 has the
figures from `python benchmarks/run.py restore`).
"""
from __future__ import annotations

import shutil

import _bench
import _restore_bench
import pytest
from _restore_bench import RESTORE_RECORDS

from cdpcore import Journal


@pytest.fixture(scope="module")
def write_journal():
    work = _bench.scratch("restore")
    try:
        yield _bench.build_write_journal(work, RESTORE_RECORDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_restore_near_the_end(benchmark, write_journal, workdir):
    benchmark.group = f"restore, {RESTORE_RECORDS:,} writes"
    with Journal.open(write_journal["path"], readonly=True) as j:
        at = f"seq:{j.last_seq - 100}"
    dest = f"{workdir}/dest"
    benchmark.pedantic(_restore_bench.restore_once, args=(write_journal["path"], dest, at), rounds=3)


def test_restore_summary(write_journal, record):
    b = dict(write_journal)
    path = b.pop("path")
    res = _restore_bench.restore_measure(path, b["writes"])
    res["rollback"] = _restore_bench.rollback_measure(path)
    record("restore", {**b, **res})

"""Target 1: append throughput of the Python API next to os.write.

test_append_throughput times each case alone with pytest-benchmark (fresh
file or journal per round, set up outside the timing); the ratios come from
test_append_ratio_abab, which alternates baseline and candidate runs.
Target: a batch of 64 or 256 records >= 0.8 of os.write's MB/s.
"""
from __future__ import annotations

import os
import shutil

import _bench
import pytest
from _bench import MIB, ROUNDS

SIZES = [4096, 65536]
CASES = [("os.write", 0), ("append_write", 1), ("batch64", 64), ("batch256", 256)]


@pytest.mark.parametrize("per_batch", [c[1] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("size", SIZES, ids=["4KiB", "64KiB"])
def test_append_throughput(benchmark, workdir, size, per_batch):
    benchmark.group = f"append {size // 1024} KiB blocks, {MIB} MiB per round"
    block = os.urandom(size)
    count = (MIB << 20) // size
    state: dict = {}

    if per_batch == 0:
        path = os.path.join(workdir, "baseline.dat")

        def setup():
            state["fd"] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            return (), {}

        def run():
            fd, write = state["fd"], os.write
            for _ in range(count):
                write(fd, block)

        def teardown():
            os.close(state.pop("fd"))
            os.unlink(path)
    else:

        def setup():
            state["j"], state["path"] = _bench.new_journal(workdir)
            return (), {}

        def run():
            j = state["j"]
            if per_batch == 1:
                for i in range(count):
                    j.append_write("data.bin", i * size, block)
                return
            for start in range(0, count, per_batch):
                with j.batch() as b:
                    for i in range(start, min(count, start + per_batch)):
                        b.append_write("data.bin", i * size, block)

        def teardown():
            state.pop("j").close()
            shutil.rmtree(state.pop("path"))

    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["MB/s (median)"] = round((MIB << 20) / benchmark.stats.stats.median / _bench.MB)


@pytest.mark.parametrize("size", SIZES, ids=["4KiB", "64KiB"])
def test_append_ratio_abab(size, record):
    res = _bench.append_suite(rounds=ROUNDS, mib=max(MIB, 64), sizes=(size,), rotation_rounds=0)
    record("append", res)
    assert all(r["ratio"] > 0 for r in res["rows"])


def test_append_with_segment_rotation(record):
    """Context: default 64 MiB segments, sealed with fdatasync, vs os.write
    with an fdatasync every 64 MiB."""
    res = _bench.append_suite(rounds=0, mib=128, sizes=(), rotation_rounds=3)
    record("append", res)

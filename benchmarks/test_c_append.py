"""Target 2: the cost of one append from C, in ns, next to pwrite(2) of the
same bytes: benchmarks/c/bench_append.c, built into a temp dir with the
writer sources, run on journals created from Python."""
from __future__ import annotations

import _bench
from _bench import ROUNDS


def test_c_append_cost(record):
    res = _bench.c_suite(rounds=ROUNDS)
    record("c", res)
    assert {r["case"] for r in res["rows"]} >= {"flush1", "write4k", "batch64"}

"""pytest glue for the benchmarks: `python -m pytest benchmarks`.

benchmarks/ is outside the unit-test suite (pyproject's testpaths is tests/),
so these run only when named. The pytest-benchmark tests time each case on
its own; the *_abab tests run baseline and candidate interleaved and are the
source of the ratios, which the terminal summary prints and writes to
benchmarks/results/pytest-results.{md,json}. Nothing asserts on a time.

Knobs (environment): CDP_BENCH_DIR (where files go), CDP_BENCH_ROUNDS (ABAB
pairs, default 7), CDP_BENCH_MIB (MiB per append run, default 64),
CDP_BENCH_RECORDS (records in the resolve journal, default 10,000,000),
CDP_BENCH_TL_RECORDS (writes in the timeline journal, default 1,000,000).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench

_results: dict[str, Any] = {}


def _merge(key: str, value: dict[str, Any]) -> None:
    old = _results.get(key)
    if old is not None and "rows" in old and "rows" in value:
        old["rows"].extend(value["rows"])
    else:
        _results[key] = value


@pytest.fixture
def record():
    """record(suite, result): keep a suite's result for the summary table."""
    return _merge


@pytest.fixture
def workdir():
    d = _bench.scratch("pytest")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not _results:
        return
    res = {"machine": _bench.machine(), **_results}
    command = "python -m pytest " + " ".join(config.invocation_params.args)
    md = _bench.render_markdown(res, command)
    out = os.path.join(_bench.HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pytest-results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "pytest-results.json"), "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
        f.write("\n")
    terminalreporter.section("cdpcore: side-by-side results (ABAB medians)")
    terminalreporter.write_line(md)
    terminalreporter.write_line(f"(written to {os.path.relpath(out)}/pytest-results.md)")

"""Where a rollback's time goes, phase by phase (docs/benchmarks.md,
section 6): the restore suite's journal (1M random 4 KiB writes over
1 GiB, checkpoints), made live, then ROUNDS rollbacks of the last 1 %,
each followed by a roll forward (untimed, synced), with the functions
below wrapped to time them (wall clock, ms).

    python benchmarks/profile_rollback.py [--rounds 4]
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import _bench
from _restore_bench import make_checkpoints

from cdpcore import Journal, audit, journal, plan, restore

rb = importlib.import_module("cdpcore.rollback")
spent: dict[str, float] = {}


def wrap(owner: Any, name: str, label: str) -> None:
    fn: Callable[..., Any] | None = getattr(owner, name, None)
    if fn is None:
        return  # (an older build, run for comparison, lacks it)

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    for owner, name, label in ((rb, "build_rollback_plan", "plan"), (plan, "continue_plan", "plan: after the point"),
                               (plan, "gather_records", "plan: read records"),
                               (plan.Validator, "check_pieces_now", "plan: check records"),
                               (plan.Validator, "finish", "wait for checks"), (rb, "write_durable", "intent"),
                               (rb, "_apply", "put back"), (rb._Ops, "sync", "fsync root (on a thread)"),
                               (rb._Background, "result", "wait for threads (root fsync; journal sync)"),
                               (journal.Batch, "commit", "journal append"), (journal.Journal, "sync", "journal sync"),
                               (audit, "_enter", "audit")):
        wrap(owner, name, label)
    work = _bench.scratch("profile-rollback")
    try:
        built = _bench.build_write_journal(work, 1_000_000)
        make_checkpoints(built["path"])
        with Journal.open(built["path"]) as j:
            shutil.rmtree(j.root)
            restore(j, j.root)
            to = f"seq:{j.last_seq - int((1 << 30) * 0.01 / 4096 * 65 / 64)}"
        os.sync()
        for r in range(args.rounds):
            with Journal.open(built["path"]) as j:
                back = f"seq:{j.last_seq}"
                spent.clear()
                t0 = time.perf_counter()
                rb.rollback(j, to)
                total = time.perf_counter() - t0
                phases = dict(spent)
                rb.rollback(j, back)
            os.sync()
            print(f"round {r + 1}: {1000 * total:.0f} ms: "
                  + ", ".join(f"{k} {1000 * v:.0f}" for k, v in phases.items())
                  + f"; load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

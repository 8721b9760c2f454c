"""Side by side: the restore and rollback of two builds of cdpcore on the
same journal, interleaved (issue 3's targets, when a loaded machine makes
figures of separate runs incomparable).

    python benchmarks/compare_builds.py OLD_PYTHON NEW_PYTHON [--rounds 8]

OLD_PYTHON and NEW_PYTHON are the interpreters of two installs (say
/work/main/.venv/bin/python and .venv/bin/python). The journal is
restore suite's (1M random 4 KiB writes over 1 GiB, checkpoints), built
once by NEW_PYTHON's cdpcore in CDP_BENCH_DIR. Each round runs `cp
--sparse=never` of the restored file, then each build's restore near the
end, in a rotated order, each in a process of its own timed inside it
(from Journal.open to return, as the suite does); then each build's
rollback of the last 1 % (timed likewise) and its roll forward (untimed,
synced). Prints every round and the medians of per-round ratios. Nothing
is kept.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys

import _bench
from _restore_bench import cp_once, make_checkpoints

RESTORE = """
import sys, time, shutil
from cdpcore import Journal, restore
path, dest, at = sys.argv[1:4]
shutil.rmtree(dest, ignore_errors=True)
t0, c0 = time.perf_counter(), time.process_time()
with Journal.open(path, readonly=True) as j:
    restore(j, dest, at=at)
print(time.perf_counter() - t0, time.process_time() - c0)
shutil.rmtree(dest, ignore_errors=True)
"""

ROLLBACK = """
import sys, time, os
from cdpcore import Journal
from cdpcore.rollback import rollback
path, to = sys.argv[1:3]
with Journal.open(path) as j:
    back = f"seq:{j.last_seq}"
    t0, c0 = time.perf_counter(), time.process_time()
    rollback(j, to)
    t, c = time.perf_counter() - t0, time.process_time() - c0
    rollback(j, back)
os.sync()
print(t, c)
"""


def child(python: str, script: str, *args: str) -> tuple[float, float]:
    out = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--records", type=int, default=1_000_000)
    args = ap.parse_args()
    work = _bench.scratch("compare")
    try:
        built = _bench.build_write_journal(work, args.records, log=print)
        make_checkpoints(built["path"])
        path, dest = built["path"], os.path.join(work, "restored")
        from cdpcore import Journal, restore

        with Journal.open(path) as j:
            last = j.last_seq
            at, to = f"seq:{last - 100}", f"seq:{last - int((1 << 30) * 0.01 / 4096 * 65 / 64)}"
            restore(j, dest, at=at)
            src = os.path.join(work, "cp-source.bin")
            os.rename(os.path.join(dest, "his.db"), src)
            shutil.rmtree(dest)
            shutil.rmtree(j.root)
            restore(j, j.root)
        os.sync()
        sides = {"cp": lambda: (cp_once(src, os.path.join(work, "cp-dest.bin"))[0], 0.0),
                 "old": lambda: child(args.old, RESTORE, path, dest, at),
                 "new": lambda: child(args.new, RESTORE, path, dest, at)}
        r_old, r_new, b_old, b_new = [], [], [], []
        for r in range(args.rounds):
            order = ["cp", "old", "new"]
            order = order[r % 3:] + order[: r % 3]
            p = {s: sides[s]() for s in (order if r % 2 == 0 else order[::-1])}
            r_old.append(p["old"][0] / p["cp"][0])
            r_new.append(p["new"][0] / p["cp"][0])
            rb = {s: child(py, ROLLBACK, path, to) for s, py in
                  ((("old", args.old), ("new", args.new)) if r % 2 == 0 else (("new", args.new), ("old", args.old)))}
            b_old.append(rb["old"][0])
            b_new.append(rb["new"][0])
            print(f"round {r + 1}: cp {p['cp'][0]:.3f} s; restore old {p['old'][0]:.3f} s (CPU {p['old'][1]:.2f}, "
                  f"{r_old[-1]:.2f} x cp), new {p['new'][0]:.3f} s (CPU {p['new'][1]:.2f}, {r_new[-1]:.2f} x cp); "
                  f"rollback old {rb['old'][0]:.3f} s (CPU {rb['old'][1]:.3f}), new {rb['new'][0]:.3f} s "
                  f"(CPU {rb['new'][1]:.3f}); load {os.getloadavg()[0]:.2f}", flush=True)
        med = statistics.median
        print(f"restore / cp, median: old {med(r_old):.3f}, new {med(r_new):.3f}; rollback median: old "
              f"{med(b_old):.3f} s, new {med(b_new):.3f} s; load {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

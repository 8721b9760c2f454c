"""Side by side: one rollback per process of the same fixed journal, two
builds alternating (ABAB), the journal put back as built after each, so
that every rollback sees the same journal (compare_builds.py's rounds each
add a rollback and a roll forward to it, which grows the records after
the checkpoint round by round).

    python benchmarks/rollback_pairs.py OLD_PYTHON NEW_PYTHON [--pairs 12]

The journal is the restore suite's (1M random 4 KiB writes over 1 GiB,
checkpoints), built once by NEW_PYTHON's cdpcore in CDP_BENCH_DIR, its
root restored to the latest point and synced. Each run: Journal.open, then
the rollback of the last 1 % (2,662 writes) timed inside the process
(wall and CPU), then the roll forward (untimed) and os.sync(); then the
journal's files are put back (the segments and checkpoints added removed,
the last segment, head, journal.json and audit.log copied back; the root
already holds the latest state again). Prints every run, the medians and
the per-pair ratios NEW / OLD. Nothing is kept.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys

import _bench
from _restore_bench import Snapshot
from compare_builds import ROLLBACK

BUILD = """
import os, shutil, sys
sys.path.insert(0, sys.argv[2])
import _bench
from _restore_bench import make_checkpoints
from cdpcore import Journal, restore
built = _bench.build_write_journal(sys.argv[1], 1_000_000)
make_checkpoints(built["path"])
with Journal.open(built["path"]) as j:
    shutil.rmtree(j.root)
    restore(j, j.root)
    print(built["path"], j.last_seq - int((1 << 30) * 0.01 / 4096 * 65 / 64))
os.sync()
"""

# one rollback of the fixed journal, timed (wall, CPU): compare_builds' child


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--pairs", type=int, default=12)
    args = ap.parse_args()
    work = _bench.scratch("rollback-pairs")
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run([args.new, "-c", BUILD, work, here], capture_output=True, text=True, check=True)
        path, to = out.stdout.split()
        snap = Snapshot(path, os.path.join(work, "snapshot"))
        runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for i in range(args.pairs):
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                out = subprocess.run([getattr(args, name), "-c", ROLLBACK, path, f"seq:{to}"],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.stderr.write(out.stderr)
                    return 1
                snap.restore()
                wall, cpu = (float(x) for x in out.stdout.split())
                runs[name].append((wall, cpu))
                print(f"pair {i + 1} {name}: {1000 * wall:.0f} ms, CPU {1000 * cpu:.0f} ms; "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
        for name, rs in runs.items():
            walls = [w for w, _c in rs]
            print(f"{name}: median {1000 * statistics.median(walls):.1f} ms ({1000 * min(walls):.0f}-"
                  f"{1000 * max(walls):.0f}), CPU {1000 * statistics.median(c for _w, c in rs):.1f} ms")
        ratio = [n[0] / o[0] for o, n in zip(runs["old"], runs["new"])]
        print(f"new / old per pair: median {statistics.median(ratio):.3f} ({min(ratio):.2f}-{max(ratio):.2f}), "
              f"new lower in {sum(r < 1 for r in ratio)} of {len(ratio)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The journal side of the append benchmark alone, for a profiler.

    python benchmarks/profile_append.py BLOCK RECORDS_PER_BATCH [ROUNDS]

    perf record -o /tmp/perf.data python benchmarks/profile_append.py 65536 64
    perf report -i /tmp/perf.data --no-children --sort dso,symbol
    python -m cProfile -s tottime benchmarks/profile_append.py 4096 256

Each round appends 128 MiB of BLOCK-byte writes (RECORDS_PER_BATCH per
journal.batch(), 1 = journal.append_write per block) to a fresh journal, as
the benchmark does; prints MB/s per round.
"""
from __future__ import annotations

import os
import shutil
import sys

import _bench


def main() -> None:
    size, per_batch = int(sys.argv[1]), int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    block = os.urandom(size)
    count = (128 << 20) // size
    work = _bench.scratch("profile")
    try:
        for _ in range(rounds):
            wall, _cpu = _bench.journal_run(work, block, count, per_batch)
            print(f"{count * size / wall / _bench.MB:.0f} MB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

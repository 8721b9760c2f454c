"""Run the cdpcore benchmarks and write the side-by-side results.

    python benchmarks/run.py                  # everything (about a minute)
    python benchmarks/run.py append checksum  # some suites
    python benchmarks/run.py --quick          # fewer rounds, 1M-record journal

Suites: append (target 1), c (target 2), resolve (target 3), checksum
(target 4), restore (issue 3: restore vs cp, restore time against records;
not in the default set: it builds a 4 GB journal, a few minutes; run it
with --out benchmarks/results/restore), capture (issue 4: the LD_PRELOAD
capture against plain runs: random pwrite, pgbench; several minutes; run it
with --out benchmarks/results/capture), chunk (issue 5: FastCDC against
pyfastcdc; needs the `bench` extra; --out benchmarks/results/chunk), wan
(issue 5: replication over a real tbf-shaped 10 Mbit/s link between two
network namespaces, next to rsync -z and zstd -3; needs root; ~12 minutes;
--out benchmarks/results/wan; knobs in benchmarks/_wan_bench.py). Writes benchmarks/results/results.json
and results.md (or the
--out directory) and prints the Markdown. Files go to $CDP_BENCH_DIR, else
the system temp dir, and are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import _bench
import _capture_bench
import _chunk_bench
import _restore_bench
import _wan_bench

SUITES = ("append", "c", "resolve", "checksum", "restore", "capture", "chunk", "wan")
DEFAULT_SUITES = ("append", "c", "resolve", "checksum")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    ap.add_argument("--rounds", type=int, default=7, help="ABAB pairs per comparison (default 7)")
    ap.add_argument("--mib", type=int, default=128, help="MiB of payload per append run (default 128)")
    ap.add_argument("--records", type=int, default=10_000_000, help="records in the resolve journal")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 64 MiB, 1M records")
    ap.add_argument("--out", default=os.path.join(_bench.HERE, "results"), help="results directory")
    args = ap.parse_args(argv)
    suites = args.suites or list(DEFAULT_SUITES)
    bad = [s for s in suites if s not in SUITES]
    if bad:
        ap.error(f"unknown suite {', '.join(bad)}; choose from {', '.join(SUITES)}")
    if args.quick:
        args.rounds, args.mib, args.records = 3, 64, 1_000_000
    command = "python benchmarks/run.py" + ("" if argv is None and len(sys.argv) == 1
                                           else " " + shlex.join(sys.argv[1:] if argv is None else argv))

    def log(s: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)

    res: dict = {"machine": _bench.machine(), "command": command}
    t0 = time.perf_counter()
    if "append" in suites:
        res["append"] = _bench.append_suite(rounds=args.rounds, mib=args.mib, log=log)
    if "c" in suites:
        res["c"] = _bench.c_suite(rounds=args.rounds, log=log)
    if "resolve" in suites:
        res["resolve"] = _bench.resolve_suite(records=args.records, log=log)
    if "checksum" in suites:
        res["checksum"] = _bench.checksum_suite(rounds=args.rounds, log=log)
    if "restore" in suites:
        res["restore"] = _restore_bench.restore_suite(
            records=1_000_000 if not args.quick else 250_000, rounds=args.rounds, log=log)
    if "capture" in suites:
        res["capture"] = _capture_bench.capture_suite(rounds=max(1, min(args.rounds, 3)) if args.quick
                                                      else args.rounds, log=log)
    if "chunk" in suites:
        res["chunk"] = _chunk_bench.chunk_suite(rounds=args.rounds, mib=64 if args.quick else 256, log=log)
    if "wan" in suites:
        res["wan"] = _wan_bench.wan_suite(log=log, quick=args.quick)
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    md = _bench.render_markdown(res, command)
    if "restore" in res:
        png = _restore_bench.plot(res["restore"], os.path.join(args.out, "restore-vs-records.png"))
        md += "\n" + "\n".join(_restore_bench.render(res["restore"], png))
    if "capture" in res:
        md += "\n" + "\n".join(_capture_bench.render(res["capture"])) + "\n"
    if "chunk" in res:
        md += "\n" + "\n".join(_chunk_bench.render(res["chunk"]))
    if "wan" in res:
        md += "\n" + "\n".join(_wan_bench.render(res["wan"]))
    md += f"\nTotal run time: {res['elapsed_s']} s.\n"
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

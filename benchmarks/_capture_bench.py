"""The capture suite (benchmarks/run.py capture): what the LD_PRELOAD capture
costs unmodified programs, captured and uncaptured side by side in one run.

* bench_pwrite (benchmarks/c/bench_pwrite.c): 200,000 random 4 KiB pwrite
  calls on a 1 GiB file in page cache, without and with fdatasync every 64
  writes; the data file and the journal in the bench directory
  (CDP_BENCH_DIR). The same on tmpfs (/dev/shm: data and journal in memory)
  shows the CPU cost alone.
* PostgreSQL: `pgbench -i -s 10` time, then `pgbench -c 4 -j 4 -T S` TPS,
  on a fresh cluster, plain and under capture (CDP_BENCH_PGBENCH_SECONDS,
  default 30; skipped without PostgreSQL).

Rounds alternate plain and captured (ABAB, the order flipped every other
pair); each captured run writes a fresh journal. Nothing asserts on time.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _bench import HERE, REPO, median, scratch

import cdpcore
from cdpcore import Journal

sys.path.insert(0, os.path.join(REPO, "tests"))
import pg_util  # noqa: E402

WRITES = int(os.environ.get("CDP_BENCH_CAPTURE_WRITES", "200000"))
FILE_MIB = int(os.environ.get("CDP_BENCH_CAPTURE_MIB", "1024"))
PG_SECONDS = int(os.environ.get("CDP_BENCH_PGBENCH_SECONDS", "30"))
PG_SCALE = int(os.environ.get("CDP_BENCH_PGBENCH_SCALE", "10"))
TARGETS = {"pwrite": 1.15, "pwrite + fdatasync/64": 1.3, "pgbench tps": 0.9, "pgbench -i": 1.3}


def build(outdir: str) -> str:
    exe = os.path.join(outdir, "bench_pwrite")
    subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-o", exe, os.path.join(HERE, "c", "bench_pwrite.c")],
                   check=True, capture_output=True)
    return exe


def make_file(path: str, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def run_pwrite(exe: str, data: str, every: int, seed: int, journal: str | None) -> tuple[float, int]:
    argv = [exe, data, str(WRITES), str(every), str(seed)]
    if journal is None:
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    else:
        shutil.rmtree(journal, ignore_errors=True)
        Journal.create(journal, os.path.dirname(data), base=False, segment_size=1 << 30).close()
        p = cdpcore.protect(journal, argv, baseline=False, resync=False, stdout=subprocess.PIPE, text=True)
        out = p.process.communicate()[0]
        assert p.wait().returncode == 0
        shutil.rmtree(journal, ignore_errors=True)
    lines = out.split("\n")
    hwm = next((int(x.split()[1]) for x in lines if x.startswith("VmHWM:")), 0)
    return float(lines[0]), hwm


def pwrite_cases(rounds: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    places = [("bench dir", None), ("tmpfs", "/dev/shm")]
    for place, base in places:
        if base is not None and not os.access(base, os.W_OK):
            continue
        work = scratch("capture") if base is None else tempfile.mkdtemp(prefix="cdpbench-capture-", dir=base)
        try:
            exe = build(work)
            root = os.path.join(work, "root")
            os.makedirs(root)
            data = os.path.join(root, "data.bin")
            log(f"capture: writing the {FILE_MIB} MiB data file ({place})")
            make_file(data, FILE_MIB)
            journal = os.path.join(work, "journal")
            for name, every in (("pwrite", 0), ("pwrite + fdatasync/64", 64)):
                plain, capt, ratios, hwm_p, hwm_c = [], [], [], [], []
                for r in range(rounds):
                    order = (None, journal) if r % 2 == 0 else (journal, None)
                    got: dict[bool, tuple[float, int]] = {}
                    for j in order:
                        got[j is not None] = run_pwrite(exe, data, every, r, j)
                    plain.append(got[False][0])
                    capt.append(got[True][0])
                    hwm_p.append(got[False][1])
                    hwm_c.append(got[True][1])
                    ratios.append(got[True][0] / got[False][0])
                    log(f"capture: {name} ({place}) round {r + 1}: {got[False][0]:.3f} s plain, "
                        f"{got[True][0]:.3f} s captured")
                rows.append({"case": name, "place": place, "plain_s": median(plain), "captured_s": median(capt),
                             "ratio": median(ratios), "ratios": [round(x, 3) for x in ratios],
                             "target": TARGETS[name], "rss_plain_kib": max(hwm_p), "rss_captured_kib": max(hwm_c)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def pg_round(captured: bool, log: Callable[[str], None]) -> tuple[float, float]:
    base = tempfile.mkdtemp(prefix="cdpbench-pg-", dir=os.environ.get("CDP_BENCH_DIR") or None)
    os.chmod(base, 0o755)
    from pathlib import Path

    cl = pg_util.Cluster(Path(base))
    prot = None
    try:
        root = Path(base) / "root"
        root.mkdir()
        cl.give(root)
        cl.initdb()
        if captured:
            jpath = Path(base) / "journal"
            Journal.create(jpath, root, base=False).close()
            cl.give(jpath)
            prot = cdpcore.protect(jpath, cl.as_user(cl.server_argv()), baseline=False, resync=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cl.wait_ready(prot.process)
        else:
            cl.start_plain()
        t0 = time.perf_counter()
        cl.pgbench("-i", "-s", str(PG_SCALE), "-q")
        init_s = time.perf_counter() - t0
        tps = pg_util.tps(cl.pgbench("-c", "4", "-j", "4", "-T", str(PG_SECONDS)))
        log(f"capture: pgbench {'captured' if captured else 'plain'}: init {init_s:.1f} s, {tps:.0f} tps")
        return init_s, tps
    finally:
        cl.stop()
        if prot is not None:
            prot.wait()
        cl.close()
        shutil.rmtree(base, ignore_errors=True)


def pgbench_cases(rounds: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    reason = pg_util.missing_reason()
    if reason:
        log(f"capture: pgbench skipped: {reason}")
        return []
    init = {False: [], True: []}
    tps = {False: [], True: []}
    for r in range(rounds):
        for captured in ((False, True) if r % 2 == 0 else (True, False)):
            i, t = pg_round(captured, log)
            init[captured].append(i)
            tps[captured].append(t)
    return [
        {"case": "pgbench -i", "place": f"scale {PG_SCALE}", "plain_s": median(init[False]),
         "captured_s": median(init[True]), "ratio": median([c / p for c, p in zip(init[True], init[False])]),
         "target": TARGETS["pgbench -i"]},
        {"case": "pgbench tps", "place": f"scale {PG_SCALE}, 4 clients, {PG_SECONDS} s",
         "plain_tps": median(tps[False]), "captured_tps": median(tps[True]),
         "ratio": median([c / p for c, p in zip(tps[True], tps[False])]), "target": TARGETS["pgbench tps"],
         "higher_is_better": True},
    ]


def capture_suite(rounds: int = 3, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    rows = pwrite_cases(rounds, log)
    rows += pgbench_cases(int(os.environ.get("CDP_BENCH_PG_ROUNDS", "1")), log)
    return {"writes": WRITES, "file_mib": FILE_MIB, "rows": rows}


def render(res: dict[str, Any]) -> list[str]:
    out = ["## Capture overhead (LD_PRELOAD)", "",
           f"{res['writes']} random 4 KiB pwrite calls on a {res['file_mib']} MiB file; "
           "ratio = captured / plain (for TPS: captured / plain, higher is better).", "",
           "| case | where | plain | captured | ratio | target | peak RSS plain / captured |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "plain_tps" in r:
            plain, capt = f"{r['plain_tps']:.0f} tps", f"{r['captured_tps']:.0f} tps"
            ok = r["ratio"] >= r["target"]
            tgt = f">= {r['target']}"
        else:
            plain, capt = f"{r['plain_s']:.3f} s", f"{r['captured_s']:.3f} s"
            ok = r["ratio"] <= r["target"]
            tgt = f"<= {r['target']}"
        rss = f"{r['rss_plain_kib']} / {r['rss_captured_kib']} KiB" if "rss_plain_kib" in r else "-"
        out.append(f"| {r['case']} | {r['place']} | {plain} | {capt} | {r['ratio']:.2f}x | {tgt} "
                   f"{'PASS' if ok else 'FAIL'} | {rss} |")
    return out

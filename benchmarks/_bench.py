"""Measurement code shared by benchmarks/run.py and the pytest-benchmark files.

Every comparison runs its baseline and its candidate in the same process,
alternately (ABAB, with the order flipped every other pair), on fresh files
in the same directory, and reports the median over rounds of the per-round
ratio. The machines are shared: absolute times drift, ratios of neighbouring
runs hold. Each run is timed by wall clock (the figure reported) and by the
process's CPU time (user + system; a second opinion that other processes on
the machine cannot inflate).

Nothing here asserts on a time: targets are reported as PASS/FAIL.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "c"))

import build_c as cbuild

from cdpcore import Journal
from cdpcore._native import crc32c, crc32c_hw, lib

MB = 1_000_000
# knobs of the pytest runs (benchmarks/conftest.py documents them)
ROUNDS = int(os.environ.get("CDP_BENCH_ROUNDS", "7"))
MIB = int(os.environ.get("CDP_BENCH_MIB", "64"))
RECORDS = int(os.environ.get("CDP_BENCH_RECORDS", "10000000"))
BIG_SEGMENT = 1 << 30  # no rotation within one round of the append benchmark
APPEND_TARGET = 0.8  # batched API / os.write
RESOLVE_TARGET_US = 1000.0


# ---- environment ----------------------------------------------------------------


def bench_dir() -> str:
    """Where the benchmarks write: $CDP_BENCH_DIR, else the system temp dir."""
    return os.environ.get("CDP_BENCH_DIR") or tempfile.gettempdir()


def scratch(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"cdpbench-{prefix}-", dir=bench_dir())


def _fs_of(path: str) -> str:
    best, fs = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fs = mnt, f"{typ} on {dev} ({mnt})"
    except OSError:
        pass
    return fs


def machine() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = -1.0
    d = bench_dir()
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "crc32c_hw": crc32c_hw(),
        "bench_dir": d,
        "filesystem": _fs_of(os.path.realpath(d)),
        "git": commit,
        "load_at_start": round(load, 2),
    }


def disk_free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# ---- timing helpers -----------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


# ---- target 1: append throughput -----------------------------------------------------


def os_write_run(directory: str, block: bytes, count: int, sync_every: int = 0) -> tuple[float, float]:
    """os.write of block, count times, into a fresh file (the baseline).
    With sync_every, fdatasync after every sync_every bytes (the durability
    work the journal does when it seals a segment)."""
    path = os.path.join(directory, "baseline.dat")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    n = len(block)

    def run() -> None:
        write = os.write
        if sync_every:
            since = 0
            for _ in range(count):
                write(fd, block)
                since += n
                if since >= sync_every:
                    os.fdatasync(fd)
                    since = 0
        else:
            for _ in range(count):
                write(fd, block)

    try:
        return timed(run)
    finally:
        os.close(fd)
        os.unlink(path)


def new_journal(directory: str, segment_size: int = BIG_SEGMENT) -> tuple[Journal, str]:
    root = os.path.join(directory, "root")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(directory, "journal")
    return Journal.create(path, root=root, segment_size=segment_size), path


def journal_run(directory: str, block: bytes, count: int, per_batch: int,
                segment_size: int = BIG_SEGMENT) -> tuple[float, float]:
    """The same bytes through the Python API into a fresh journal: one
    append_write per block (per_batch == 1) or journal.batch() of per_batch."""
    j, path = new_journal(directory, segment_size)
    n = len(block)

    def single() -> None:
        append = j.append_write
        for i in range(count):
            append("data.bin", i * n, block)

    def batched() -> None:
        batch = j.batch
        for start in range(0, count, per_batch):
            with batch() as b:
                append = b.append_write
                for i in range(start, min(count, start + per_batch)):
                    append("data.bin", i * n, block)

    try:
        return timed(single if per_batch == 1 else batched)
    finally:
        j.close()
        shutil.rmtree(path)


APPEND_MODES = (("append_write per block", 1), ("batch of 64", 64), ("batch of 256", 256))


def append_suite(rounds: int = 7, mib: int = 128, sizes: tuple[int, ...] = (4096, 65536),
                 modes: tuple[tuple[str, int], ...] = APPEND_MODES, rotation_rounds: int = 3,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Target 1: MB/s of the Python API next to os.write of the same bytes.
    Each (block size, mode) gets `rounds` adjacent pairs of runs, order
    flipped every other pair; fresh file and journal per run."""
    work = scratch("append")
    total = mib << 20
    rows = []
    try:
        for size in sizes:
            block = os.urandom(size)
            count = total // size
            acc: dict[int, dict[str, list[float]]] = {
                k: {"os_wall": [], "j_wall": [], "os_cpu": [], "j_cpu": []} for _, k in modes}
            for r in range(rounds):
                for mi, (_, k) in enumerate(modes):
                    pair: dict[str, tuple[float, float]] = {}
                    order = ("os", "j") if (r + mi) % 2 == 0 else ("j", "os")
                    for side in order:
                        if side == "os":
                            pair["os"] = os_write_run(work, block, count)
                        else:
                            pair["j"] = journal_run(work, block, count, k)
                    a = acc[k]
                    a["os_wall"].append(pair["os"][0])
                    a["os_cpu"].append(pair["os"][1])
                    a["j_wall"].append(pair["j"][0])
                    a["j_cpu"].append(pair["j"][1])
                log(f"append {size} B: round {r + 1}/{rounds}")
            for name, k in modes:
                rows.append(_append_row(size, name, k, total, acc[k], k > 1))
        if rotation_rounds:
            rows.append(_rotation_row(work, total, rotation_rounds, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"mib_per_run": mib, "rounds": rounds, "segment_size": BIG_SEGMENT,
            "target": APPEND_TARGET, "rows": rows}


def _append_row(size: int, name: str, per_batch: int, total: int, a: dict[str, list[float]],
                has_target: bool, baseline: str = "os.write") -> dict[str, Any]:
    ratios = [o / j for o, j in zip(a["os_wall"], a["j_wall"])]
    cpu_ratios = [o / j for o, j in zip(a["os_cpu"], a["j_cpu"])]
    row = {
        "block": size, "mode": name, "records_per_batch": per_batch, "baseline": baseline,
        "os_mbps": total / median(a["os_wall"]) / MB,
        "journal_mbps": total / median(a["j_wall"]) / MB,
        "ratio": median(ratios), "ratios": [round(x, 3) for x in ratios],
        "cpu_ratio": median(cpu_ratios),
        "target": APPEND_TARGET if has_target else None,
    }
    row["pass"] = (row["ratio"] >= APPEND_TARGET) if has_target else None
    return row


def _rotation_row(work: str, total: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Context, not a target: batches of 256 x 4 KiB into a journal with the
    default 64 MiB segments, whose sealing fdatasyncs each full segment,
    next to os.write with an fdatasync every 64 MiB."""
    from cdpcore.format import DEFAULT_SEGMENT_SIZE

    size, k = 4096, 256
    block = os.urandom(size)
    count = total // size
    a: dict[str, list[float]] = {"os_wall": [], "j_wall": [], "os_cpu": [], "j_cpu": []}
    for r in range(rounds):
        for side in (("os", "j") if r % 2 == 0 else ("j", "os")):
            if side == "os":
                w, c = os_write_run(work, block, count, sync_every=DEFAULT_SEGMENT_SIZE)
                a["os_wall"].append(w)
                a["os_cpu"].append(c)
            else:
                w, c = journal_run(work, block, count, k, segment_size=DEFAULT_SEGMENT_SIZE)
                a["j_wall"].append(w)
                a["j_cpu"].append(c)
        log(f"append with segment rotation: round {r + 1}/{rounds}")
    row = _append_row(size, "batch of 256, 64 MiB segments (sealed with fdatasync)", k, total, a,
                      False, baseline="os.write + fdatasync per 64 MiB")
    row["context"] = True
    return row


# ---- target 2: one append from C ---------------------------------------------------------


def c_suite(rounds: int = 7, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Target 2: ns per cdp_append next to pwrite(2) of the same bytes, from
    benchmarks/c/bench_append.c built into a temp dir."""
    work = scratch("c")
    try:
        progs = cbuild.build(os.path.join(work, "bin"))
        journals = []
        for r in range(rounds):
            j, path = new_journal(os.path.join(work, f"r{r}"))
            j.close()
            journals.append(path)
        log("c: running bench_append")
        out = subprocess.run([progs["bench_append"], work, *journals], capture_output=True,
                             text=True, check=True).stdout
        raw = json.loads(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, c in raw["cases"].items():
        ratios = [j / b for j, b in zip(c["journal_ns"], c["pwrite_ns"])]
        rows.append({
            "case": name, "api": c["api"], "records_per_append": c["records_per_append"],
            "payload": c["payload"], "journal_ns": median(c["journal_ns"]),
            "pwrite_ns": median(c["pwrite_ns"]), "cost_ratio": median(ratios),
            "ratios": [round(x, 3) for x in ratios],
        })
    crc = {int(k): median(v) for k, v in raw["crc32c_gbs"].items()}
    return {"rounds": raw["rounds"], "crc32c_hw": raw["crc32c_hw"], "rows": rows,
            "crc32c_c_gbs": crc, "build": cbuild.describe("$TMP/bin")}


# ---- target 3: resolving a timestamp in 10 million records ----------------------------------


def build_big_journal(directory: str, records: int, log: Callable[[str], None] = lambda s: None
                      ) -> dict[str, Any]:
    """A journal of `records` FLUSH records (48 bytes each) with increasing
    timestamps, appended from C in batches of 4096; then opened writable once
    so the sealed segments get their index files. Returns timings and the
    ts range."""
    need = records * 48 * 2 + (256 << 20)
    free = disk_free(directory)
    if free < need:
        raise RuntimeError(f"{directory}: {free >> 20} MiB free, the {records}-record journal needs "
                           f"{need >> 20} MiB; set CDP_BENCH_DIR to a roomier filesystem")
    progs = cbuild.build(os.path.join(directory, "bin"))
    j, path = new_journal(directory, segment_size=64 << 20)
    j.close()
    first_ts = 1_700_000_000_000_000
    log(f"resolve: appending {records} records from C")
    t0 = time.perf_counter()
    out = subprocess.run([progs["fill_journal"], path, str(records), str(first_ts)],
                         capture_output=True, text=True, check=True).stdout
    fill = json.loads(out)
    fill["wall_s"] = time.perf_counter() - t0
    log("resolve: first writable open (writes the index files)")
    t0 = time.perf_counter()
    Journal.open(path).close()
    first_open = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(path, "segments", n))
               for n in os.listdir(os.path.join(path, "segments")))
    return {"path": path, "records": records, "first_ts": fill["first_ts"],
            "last_ts": fill["last_ts"], "fill_s": fill["seconds"], "first_open_s": first_open,
            "bytes": size, "segments": len([n for n in os.listdir(os.path.join(path, "segments"))
                                            if n.endswith(".seg")])}


def resolve_measure(path: str, first_ts: int, last_ts: int, records: int, samples: int = 2000,
                    opens: int = 5, seed: int = 1) -> dict[str, Any]:
    """Open (readonly, index files present) `opens` times; then time
    resolve(ts) for `samples` random timestamps and resolve("seq:N") for
    `samples` random N, one call at a time."""
    open_s = []
    for _ in range(opens):
        t0 = time.perf_counter()
        j = Journal.open(path, readonly=True)
        open_s.append(time.perf_counter() - t0)
        j.close()
    rng = random.Random(seed)
    ts_points = [rng.randrange(first_ts, last_ts + 1) for _ in range(samples)]
    seq_points = [f"seq:{rng.randrange(1, records + 1)}" for _ in range(samples)]
    with Journal.open(path, readonly=True) as j:
        # the BASE record is absent (empty root), so seq N carries the Nth timestamp
        for p in ts_points[:5] + [first_ts, last_ts]:
            seq = j.resolve(p)
            ts = next(j._iter_raw(seq, seq))[1]
            assert ts <= p, (p, seq, ts)
            if seq < records:
                assert next(j._iter_raw(seq + 1, seq + 1))[1] > p
        t_us = _time_calls(j.resolve, ts_points)
        s_us = _time_calls(j.resolve, seq_points)
    return {
        "samples": samples, "open_ms": [x * 1e3 for x in open_s], "open_ms_median": median(open_s) * 1e3,
        "ts_median_us": median(t_us), "ts_p99_us": percentile(t_us, 99), "ts_max_us": max(t_us),
        "seq_median_us": median(s_us), "seq_p99_us": percentile(s_us, 99), "seq_max_us": max(s_us),
        "target_us": RESOLVE_TARGET_US,
        "pass": percentile(t_us, 99) <= RESOLVE_TARGET_US,
    }


def _time_calls(fn: Callable[[Any], Any], args: list[Any]) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for a in args:
        t0 = clock()
        fn(a)
        out.append((clock() - t0) / 1000)
    return out


def resolve_suite(records: int = 10_000_000, samples: int = 2000,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    work = scratch("resolve")
    try:
        built = build_big_journal(work, records, log)
        log("resolve: timing")
        res = resolve_measure(built["path"], built["first_ts"], built["last_ts"], records, samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    built.pop("path")
    return {**built, **res}


# ---- timeline of a journal of random 4 KiB writes ------------------------------------------------

TIMELINE_RECORDS = int(os.environ.get("CDP_BENCH_TL_RECORDS", "1000000"))


def text_pages(n: int, size: int = 4096, seed: int = 3) -> list[bytes]:
    """n distinct text-like pages (zstd-1 gets them to about half): what a
    HIS database's pages look like to the timeline's entropy test."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rnd.randint(2, 10)))
             for _ in range(2000)]
    return [b" ".join(rnd.choice(words) for _ in range(size // 4))[:size] for _ in range(n)]


def build_write_journal(directory: str, records: int, file_size: int = 1 << 30, block: int = 4096,
                        span_us: int = 3_600_000_000, flush_every: int = 64,
                        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """A journal protecting one `file_size` file: `records` WRITE records of
    `block` text-like bytes at random block-aligned offsets, a FLUSH of all
    files every `flush_every` writes, timestamps spread evenly over span_us,
    appended in batches of 256 through the Python API (64 MiB segments)."""
    need = records * (block + 64) + (256 << 20)
    if disk_free(directory) < need:
        raise RuntimeError(f"{directory}: the {records}-record journal needs {need >> 20} MiB; "
                           "set CDP_BENCH_DIR to a roomier filesystem")
    j, path = new_journal(directory, segment_size=64 << 20)
    pages = text_pages(256, block)
    rnd = random.Random(5)
    slots = file_size // block
    first_ts = (time.time_ns() // 1000 // 60_000_000 + 1) * 60_000_000
    step = span_us / records
    t0 = time.perf_counter()
    try:
        for start in range(0, records, 256):
            with j.batch() as b:
                for i in range(start, min(records, start + 256)):
                    ts = first_ts + int(i * step)
                    b.append_write("his.db", rnd.randrange(slots) * block, pages[i & 255], ts=ts)
                    if i % flush_every == flush_every - 1:
                        b.append_flush(ts=ts)
            if start % 262144 == 0:
                log(f"journal of writes: {start}/{records} records")
        j.sync()
        last_seq = j.last_seq
    finally:
        j.close()
    Journal.open(path).close()  # the sealed segments' index files
    size = sum(os.path.getsize(os.path.join(path, "segments", n))
               for n in os.listdir(os.path.join(path, "segments")))
    return {"path": path, "records": last_seq, "writes": records, "bytes": size,
            "build_s": time.perf_counter() - t0, "first_ts": first_ts}


def timeline_measure(path: str, rounds: int = 3, log: Callable[[str], None] = lambda s: None
                     ) -> dict[str, Any]:
    """Seconds of timeline() (1m and 1s buckets) next to two plain passes
    over the same journal: Journal.records() (decode every record, the
    public read API) and Journal.verify() (the C scan of every byte). The
    candidates take turns, in a rotated order each round, after one
    untimed pass that puts the journal in the page cache."""
    from cdpcore.timeline import timeline

    def records() -> None:
        with Journal.open(path, readonly=True) as j:
            for _ in j.records():
                pass

    def verify() -> None:
        with Journal.open(path, readonly=True) as j:
            j.verify()

    cases: dict[str, Callable[[], Any]] = {
        "timeline, 1m buckets": lambda: timeline(path, bucket="1m"),
        "timeline, 1s buckets": lambda: timeline(path, bucket="1s"),
        "records() iteration": records,
        "verify()": verify,
    }
    verify()  # warm the page cache
    names = list(cases)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            w, c = timed(cases[n])
            wall[n].append(w)
            cpu[n].append(c)
        log(f"timeline: round {r + 1}/{rounds}")
    base = "records() iteration"
    rows = [{"what": n, "wall_s": median(wall[n]), "cpu_s": median(cpu[n]),
             "all_wall_s": [round(x, 2) for x in wall[n]],
             "ratio_to_records": median([a / b for a, b in zip(wall[n], wall[base])])}
            for n in names]
    t = timeline(path, bucket="1m")
    return {"rounds": rounds, "rows": rows, "buckets_1m": len(t.buckets),
            "sampled_writes": sum(b.sampled for b in t.buckets),
            "flagged": len(t.flagged)}


def timeline_suite(records: int = TIMELINE_RECORDS, rounds: int = 3,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    work = scratch("timeline")
    try:
        built = build_write_journal(work, records, log=log)
        res = timeline_measure(built["path"], rounds, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    built.pop("path")
    return {**built, **res}


# ---- target 4: checksum choice ------------------------------------------------------------------


def checksum_functions() -> dict[str, Callable[[bytes], Any]]:
    import xxhash

    return {
        "crc32c (cdpcore._native.crc32c)": crc32c,
        "crc32c (lib.cdp_crc32c, bare cffi call)": lambda b: lib.cdp_crc32c(0, b, len(b)),
        "xxh3_64 (xxhash.xxh3_64_intdigest)": xxhash.xxh3_64_intdigest,
        "crc32 (zlib.crc32)": zlib.crc32,
    }


def checksum_suite(rounds: int = 7, mib: int = 64, sizes: tuple[int, ...] = (4096, 65536),
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Target 4: GB/s of each checksum over one buffer of each size, called
    from Python; functions rotate order every round."""
    fns = checksum_functions()
    names = list(fns)
    rows = []
    for size in sizes:
        buf = os.urandom(size)
        reps = (mib << 20) // size
        gbs: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:

                def loop(f: Callable[[bytes], Any] = fns[n], b: bytes = buf, k: int = reps) -> None:
                    for _ in range(k):
                        f(b)

                w, _ = timed(loop)
                gbs[n].append(reps * size / w / 1e9)
        log(f"checksum {size} B done")
        for n in names:
            rows.append({"function": n, "block": size, "gbs": median(gbs[n]),
                         "per_call_ns": size / median(gbs[n]), "all_gbs": [round(x, 2) for x in gbs[n]]})
    return {"rounds": rounds, "mib_per_measurement": mib, "rows": rows}


# ---- reporting -------------------------------------------------------------------------------------


def _pf(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} B"


def render_markdown(res: dict[str, Any], command: str) -> str:
    m = res["machine"]
    out = ["# cdpcore benchmark results\n",
           f"- date: {m['date']}; git: {m['git']}",
           (f"- machine: {m['nproc']} CPUs, {m['cpu']}; Linux {m['kernel']}; Python {m['python']}; "
           f"CRC32C on SSE4.2: {'yes' if m['crc32c_hw'] else 'no'}"),
           f"- files in {m['bench_dir']}: {m['filesystem']}; load average at start {m['load_at_start']}",
           f"- command: `{command}`", ""]
    if "append" in res:
        a = res["append"]
        out += [f"## 1. Append throughput, Python API vs os.write (target: batched >= {a['target']})\n",
                (f"{a['mib_per_run']} MiB of payload per run, fresh file / journal per run "
                f"(segment size {a['segment_size'] >> 20} MiB: no rotation), {a['rounds']} ABAB "
                "pairs; ratio = median of per-pair (journal MB/s / baseline MB/s); "
                "MB = 10^6 bytes of payload.\n"),
                "| block | API | baseline | baseline MB/s | journal MB/s | ratio (wall) | ratio (CPU) | target |",
                "|---|---|---|---:|---:|---:|---:|---|"]
        for r in a["rows"]:
            tgt = f">= {r['target']} {_pf(r['pass'])}" if r["target"] else "context"
            out.append(f"| {_size(r['block'])} | {r['mode']} | {r['baseline']} | {r['os_mbps']:.0f} | "
                       f"{r['journal_mbps']:.0f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {tgt} |")
        out.append("")
    if "c" in res:
        c = res["c"]
        out += ["## 2. One append from C (benchmarks/c/bench_append.c)\n",
                (f"ns per record, median of {c['rounds']} rounds (journal and pwrite runs alternate); "
                "cost ratio = journal ns / pwrite ns of the same bytes.\n"),
                "| case | API | records per call | payload | journal ns/record | pwrite ns/record | cost ratio |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in c["rows"]:
            out.append(f"| {r['case']} | {r['api']} | {r['records_per_append']} | {_size(r['payload']) if r['payload'] else '0'} | "
                       f"{r['journal_ns']:.0f} | {r['pwrite_ns']:.0f} | {r['cost_ratio']:.2f} |")
        crc = ", ".join(f"{v:.1f} GB/s over {k} bytes" for k, v in sorted(c["crc32c_c_gbs"].items()))
        out += ["", f"cdp_crc32c alone, in C: {crc}.", ""]
    if "resolve" in res:
        r = res["resolve"]
        out += [f"## 3. Resolving a timestamp in {r['records']:,} records (target: <= {r['target_us']:.0f} us)\n",
                (f"Journal: {r['records']:,} FLUSH records, {r['bytes'] / MB:.0f} MB in {r['segments']} segments "
                f"of 64 MiB; built from C in {r['fill_s']:.1f} s; first writable open (writes the index "
                f"files) {r['first_open_s']:.2f} s. {r['samples']} random points, one call each.\n"),
                "| what | median | p99 | max | target |", "|---|---:|---:|---:|---|",
                (f"| resolve(ts) | {r['ts_median_us']:.0f} us | {r['ts_p99_us']:.0f} us | {r['ts_max_us']:.0f} us | "
                f"p99 <= {r['target_us']:.0f} us {_pf(r['pass'])} |"),
                f"| resolve(\"seq:N\") | {r['seq_median_us']:.0f} us | {r['seq_p99_us']:.0f} us | {r['seq_max_us']:.0f} us | |",
                (f"| Journal.open(readonly), index files present | {r['open_ms_median']:.1f} ms | | "
                f"{max(r['open_ms']):.1f} ms | context |"), ""]
    if "checksum" in res:
        k = res["checksum"]
        sizes = sorted({r["block"] for r in k["rows"]})
        out += ["## 4. Checksums, called from Python\n",
                (f"GB/s (and ns per call), median of {k['rounds']} rounds of {k['mib_per_measurement']} MiB "
                "each; the functions take turns. At 4 KiB the cost of the call from Python is "
                "most of what is measured; the C figure in section 2 is what the journal pays.\n"),
                "| function | " + " | ".join(_size(s) for s in sizes) + " |",
                "|---|" + "---:|" * len(sizes)]
        for n in dict.fromkeys(r["function"] for r in k["rows"]):
            cells = [next(f"{r['gbs']:.1f} ({r['per_call_ns']:,.0f} ns)" for r in k["rows"]
                          if r["function"] == n and r["block"] == s) for s in sizes]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    if "timeline" in res:
        t = res["timeline"]
        out += [f"## Timeline of a {t['records']:,}-record journal\n",
                (f"One 1 GiB file, {t['writes']:,} random 4 KiB text-like writes and a flush "
                f"every 64, over an hour ({t['bytes'] / MB:.0f} MB of segments, built in "
                f"{t['build_s']:.0f} s); {t['sampled_writes']:,} writes judged, "
                f"{t['buckets_1m']} one-minute intervals, {t['flagged']} flagged. "
                f"Median of {t['rounds']} rounds, page cache warm; ratio = per-round time / "
                "records() iteration.\n"),
                "| what | wall s | CPU s | ratio to records() |", "|---|---:|---:|---:|"]
        for r in t["rows"]:
            out.append(f"| {r['what']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                       f"{r['ratio_to_records']:.2f} |")
        out.append("")
    return "\n".join(out)

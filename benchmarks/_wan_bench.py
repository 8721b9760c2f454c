"""Replication over a real 10 Mbit/s link (issue 5, item 9), side by side
with the baselines in one run. Needs root (network namespaces).

The link: benchmarks/wan/netlink.py (two namespaces, a veth pair, tbf at
the rate on both ends). `cdpctl serve` runs in the DR namespace, `cdpctl
ship` in the sender's, over TLS (certificates from `cdpctl pki init`),
without --rate: the link shapes. The same link carries the baselines.

Scenarios (the workloads are benchmarks/workloads.py's programs, run
through its subcommands, so that the ship is measured between the initial
state and the change):

(a) his: a 16 MiB SQLite HIS database (workloads.py his-init) is the
    initial state, journaled as the journal's base and shipped once (the
    initial sync, reported apart); then 3,000 transactions (his-tx) under
    `cdpctl protect`, and the increment is shipped (measured). Baselines:
    `rsync -z` of the tree to a DR copy of the initial state (the delta
    algorithm works against it; once as negotiated (zstd), once with zlib
    for context), `zstd -3` of the net change (workloads.net_change: the
    differing 4 KiB blocks) and, for context, `zstd -3` of every write's
    bytes (what shipping each write naively compresses to).
(b) pacs: a root holding a README (the base, shipped once), then 1,500
    256x256 16-bit images (pacs-write), ~10 % of them byte copies of
    earlier ones, under protect; the increment is shipped. Baselines:
    `rsync -z`, `zstd -3` of the new files.
(c) lag: `cdpctl ship --follow` running while a steady writer under
    protect (workloads.py sustain) appends 500 KiB/s of 2x-compressible
    data for CDP_WAN_LAG_SECONDS (default 60) seconds; every 200 ms, the
    lag as `replication_status()` gives it (what `cdpctl status JOURNAL
    --json` prints, called in-process so that 5 interpreter starts a
    second do not load the 2-core machine) and as the replica's files
    give it (vault_lag: what the DR site holds at that moment): p50, p99,
    max; the sender's CPU.
(d) pg: PostgreSQL (the Debian packages' binaries, tests/pg_util.py) as
    the database workload: initdb and `pgbench -i -s 10` (uncaptured, the
    server stopped cleanly) are the initial state, journaled as the base
    and shipped once; then the server runs under protect (as the `postgres`
    user) for `pgbench -c 4 -j 4 -T 30` and a fast shutdown (its
    checkpoint writes the dirty pages), and the increment is shipped
    (measured). Baselines as for (a): `rsync -z` of the data directory to
    a DR copy of the initial state, `zstd -3` of the net change (the
    differing 4 KiB blocks of the data files and WAL segments), and the
    size of `zstd -3` of every write. Not run without PostgreSQL (a
    failure instead when CDP_REQUIRE_POSTGRES=1).

Measured for every transfer: wire bytes (the sender veth's tx_bytes over
the run), elapsed time, link use while the backlog existed
(netlink.utilisation: wire bytes / (rate x span from the first to the last
byte), counters sampled every 20 ms), sender CPU (user + system of the
ship process from wait4's rusage, as % of one core over its run). Nothing
asserts: each target gets a PASS/FAIL line.

Knobs: CDP_WAN_RATE (10mbit), CDP_WAN_SCENARIOS (his,pacs,lag,pg), CDP_WAN_SHIP_ARGS
(more `cdpctl ship` options, e.g. "--cpu-limit unlimited"),
CDP_WAN_LAG_SECONDS (60), CDP_WAN_LAG_RATE (512000 bytes/s), CDP_WAN_BASE
(1; 0: journals without a base, the initial state not shipped), and
workloads.py's CDP_WL_DB_MB (16), CDP_WL_TRANSACTIONS (3000),
CDP_WL_IMAGES (1500), CDP_WL_IMAGE_SIDE (256); for (d) CDP_WAN_PG_SCALE
(10), CDP_WAN_PG_SECONDS (30), CDP_WAN_PG_SHARED_BUFFERS (128MB).
`run.py wan --quick`: 1000 transactions, 500 images, 20 s of lag, 10 s
of pgbench.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _bench
from _bench import percentile

sys.path.append(os.path.join(_bench.HERE, "wan"))

import baselines
import netlink
import workloads

# tests/pg_util.py: the throwaway PostgreSQL cluster the capture tests and
# benchmarks share (binaries, the unprivileged user, start and stop).
# Appended, not prepended: tests/conftest.py must not shadow benchmarks'.
sys.path.append(os.path.join(_bench.REPO, "tests"))
import pg_util  # noqa: E402
from netlink import Link, Sampler, shaped_link, utilisation

from cdpcore import Journal
from cdpcore.format import Kind

WORKLOADS_PY = workloads.__file__
CDPCTL = os.path.join(os.path.dirname(sys.executable), "cdpctl")
SERVE_PORT = 7400

TARGET_LINK_USE = 0.90
TARGET_LAG_P99_S = 2.0
TARGET_CPU = 0.25
TARGET_LAG_RATE = 500 << 10


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v else default


Log = Callable[[str], None]


# ---- processes ---------------------------------------------------------------------


@dataclass
class ProcResult:
    """What a measured child did: exit code, wall time, CPU (its own and
    its reaped children's, from wait4), and its output (last lines)."""

    returncode: int
    elapsed_s: float
    cpu_s: float
    stdout: str
    stderr: str

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def tail(self) -> str:
        lines = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return lines[-1] if lines else f"exit {self.returncode}"


class CpuSampler:
    """The CPU (user + system, all threads) a process has used, read from
    /proc/PID/stat every 20 ms in a thread: the sender's CPU over the span
    the link was busy, without its start-up (imports, certificates: about a
    second of CPU here, most of a short transfer)."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                # utime and stime are fields 14 and 15 (1-based), after "pid (comm)"
                self.samples.append((time.monotonic(), (int(fields[11]) + int(fields[12])) / self.tick))
            except (OSError, IndexError, ValueError):
                return  # exited (or a zombie being reaped)
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def share(self, start: float | None, end: float | None, total: float) -> float | None:
        """CPU per wall second between two monotonic times; after the last
        sample, the process's final total (from wait4) counts."""
        if start is None or end is None or end <= start or not self.samples:
            return None

        def at(t: float) -> float:
            last = None
            for ts, c in self.samples:
                if ts > t:
                    break
                last = c
            if last is None:
                return self.samples[0][1]
            return total if t > self.samples[-1][0] else last

        return (at(end) - at(start)) / (end - start)


class Measured:
    """A child process whose rusage we keep: Popen for the start, os.wait4
    for the end (Popen.wait would reap it and lose the rusage). Output
    goes to files, so a chatty child never blocks on a full pipe."""

    def __init__(self, argv: Sequence[str], work: str, tag: str, env: dict[str, str] | None = None) -> None:
        self.out_path, self.err_path = os.path.join(work, f"{tag}.out"), os.path.join(work, f"{tag}.err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=env)
        self.result: ProcResult | None = None

    def alive(self) -> bool:
        if self.result is not None:
            return False
        pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return True
        self._finish(status, ru)
        return False

    def _finish(self, status: int, ru: Any) -> None:
        t1 = time.monotonic()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        with open(self.out_path, errors="replace") as f:
            out = f.read()[-20000:]
        with open(self.err_path, errors="replace") as f:
            err = f.read()[-20000:]
        self.result = ProcResult(self.proc.returncode, t1 - self.t0, ru.ru_utime + ru.ru_stime, out, err)

    def wait(self, timeout: float | None = None) -> ProcResult:
        if self.result is not None:
            return self.result
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self.alive():
                assert self.result is not None
                return self.result
            if deadline is not None and time.monotonic() > deadline:
                self.proc.kill()
                _pid, status, ru = os.wait4(self.proc.pid, 0)
                self._finish(status, ru)
                assert self.result is not None
                self.result.stderr += f"\n(killed after {timeout:.0f} s)"
                return self.result
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> ProcResult:
        if self.alive():
            self.proc.send_signal(sig)
        return self.wait(timeout)


def cdpctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([CDPCTL, *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise RuntimeError(f"cdpctl {' '.join(args[:2])}: exit {p.returncode}: {last[-1] if last else ''}")
    return p


def replication_available() -> str | None:
    """None if this checkout has `cdpctl ship`, `serve` and `pki`; else why not."""
    for cmd in ("ship", "serve", "pki"):
        p = subprocess.run([CDPCTL, cmd, "--help"], capture_output=True, text=True)
        if p.returncode != 0:
            return f"`cdpctl {cmd}` is not in this checkout"
    return None


# ---- the DR site -------------------------------------------------------------------


class DrSite:
    """`cdpctl serve` in the DR namespace, with TLS certificates for the
    sources: `ship(...)` runs a measured `cdpctl ship` from the sender's."""

    def __init__(self, link: Link, work: str, sources: Sequence[str]) -> None:
        self.link, self.work = link, work
        self.pki = os.path.join(work, "pki")
        self.vault = os.path.join(work, "vault")
        os.makedirs(self.vault)
        cdpctl("pki", "init", self.pki, *[x for s in sources for x in ("--source", s)], "--host", link.dr_ip)
        self.serve = Measured(link.argv("dr", [
            CDPCTL, "serve", "--vault", self.vault, "--listen", f"{link.dr_ip}:{SERVE_PORT}",
            "--cert", os.path.join(self.pki, "server.pem"), "--key", os.path.join(self.pki, "server.key"),
            "--ca", os.path.join(self.pki, "ca.pem")]), work, "serve")
        try:
            baselines.wait_listening(link, SERVE_PORT, self.serve.proc, "cdpctl serve")
        except BaseException:
            self.close()
            raise

    def ship_argv(self, source: str, journal: str, follow: bool = False) -> list[str]:
        argv = [CDPCTL, "ship", journal, "--to", f"{self.link.dr_ip}:{SERVE_PORT}",
                "--cert", os.path.join(self.pki, f"{source}.pem"), "--key", os.path.join(self.pki, f"{source}.key"),
                "--ca", os.path.join(self.pki, "ca.pem")]
        # CDP_WAN_SHIP_ARGS: more ship options, e.g. "--cpu-limit unlimited" to compare
        return argv + (["--follow"] if follow else []) + shlex.split(os.environ.get("CDP_WAN_SHIP_ARGS", ""))

    def ship(self, source: str, journal: str, tag: str, timeout: float = 1800) -> dict[str, Any]:
        """One catch-up ship, measured: wire bytes, time, link use, CPU."""
        with Sampler(self.link) as smp:
            m = Measured(self.link.argv("tx", self.ship_argv(source, journal)), self.work, tag)
            cpu = CpuSampler(m.proc.pid)
            r = m.wait(timeout)
            cpu.stop()
        if r.returncode != 0:
            raise RuntimeError(f"cdpctl ship ({tag}) exited with {r.returncode}: {r.tail()}")
        res = {"elapsed_s": r.elapsed_s, "cpu_s": r.cpu_s, "cpu_share": r.cpu_share,
               "log": (r.stderr + r.stdout)[-3000:],
               **utilisation(smp.samples, self.link.rate_bit)}
        res["backlog_cpu_share"] = cpu.share(res["backlog_start"], res["backlog_end"], r.cpu_s)
        res["replica_equal"] = replica_equal(journal, os.path.join(self.vault, source, "journal"))
        return res

    def close(self) -> ProcResult:
        return self.serve.stop(signal.SIGTERM, timeout=30)


def replica_equal(journal: str, replica: str) -> bool:
    """Every segment of the source byte-equal in the replica, and
    journal.json. The source's active segment may end in its preallocated
    zero tail (journal-format.md), which is not journal data and is not
    shipped: past the replica's end the source must hold only zeros."""
    seg = os.path.join(journal, "segments")
    try:
        names = sorted(n for n in os.listdir(seg) if n.endswith(".seg"))
        for n in names + ["../journal.json"]:
            with open(os.path.join(seg, n), "rb") as a, open(os.path.join(replica, "segments", n), "rb") as b:
                while True:
                    x, y = a.read(1 << 20), b.read(1 << 20)
                    if not x and not y:
                        break
                    if x == y:
                        continue
                    # past the replica's end: only the zero tail may follow
                    if not n.endswith(".seg") or len(y) >= len(x) or x[:len(y)] != y or \
                            x.count(0, len(y)) != len(x) - len(y):
                        return False
    except OSError:
        return False
    return True


# ---- changed data --------------------------------------------------------------------


def write_stream(journal: str, after_seq: int, out: str) -> int:
    """Every WRITE record's bytes after after_seq, in order, into out: what
    shipping each write without dedupe or a long window carries."""
    total = 0
    with Journal.open(journal, readonly=True) as j, open(out, "wb") as o:
        for r in j.records(since=f"seq:{after_seq}"):
            if r.kind == Kind.WRITE:
                o.write(r.data)
                total += len(r.data)
    return total


SEGMENT_HEADER = 64  # docs/journal-format.md
TS_AT = 16  # a record header's ts field: int64 LE microseconds


def vault_lag(journal: str, replica: str, now_us: int) -> tuple[float | None, int]:
    """(seconds, bytes) the DR site is behind, from the files themselves:
    the bytes of the source's segments the replica's do not hold yet, and
    the age of the oldest record among them (its header's ts, read at the
    replica's size in the source segment: the replica holds whole records
    only). Seconds is None when that record's header is not complete yet
    (an append in progress). No state file is involved, so this is the
    lag at the moment of the sample, not as of the sender's last report."""
    src_dir, rep_dir = os.path.join(journal, "segments"), os.path.join(replica, "segments")
    pending, oldest = 0, None
    for name in sorted(n for n in os.listdir(src_dir) if n.endswith(".seg")):
        size = os.stat(os.path.join(src_dir, name)).st_size
        try:
            have = os.stat(os.path.join(rep_dir, name)).st_size
        except FileNotFoundError:
            have = 0
        if size <= have:
            continue
        with open(os.path.join(src_dir, name), "rb") as f:
            f.seek(max(have, SEGMENT_HEADER))
            head = f.read(48)
        if head == bytes(len(head)):
            # the active segment's preallocated zero tail (journal-format.md,
            # "Preallocation"): no record there, nothing the DR site lacks
            continue
        pending += size - have
        if oldest is None:
            ts = head[TS_AT:TS_AT + 8]
            if len(head) < 48 or head[42:44] != b"CR":
                return None, pending  # an append in progress
            oldest = int.from_bytes(ts, "little", signed=True)
    if oldest is None:
        return 0.0, pending
    return max(0.0, (now_us - oldest) / 1e6), pending


def last_seq(journal: str) -> int:
    with Journal.open(journal, readonly=True) as j:
        return j.last_seq


def protect_argv(journal: str, argv: Sequence[str], baseline: bool = True) -> list[str]:
    return [CDPCTL, "protect", *(() if baseline else ("--no-baseline",)), journal, "--", *argv]


def protect(journal: str, argv: Sequence[str], baseline: bool = True) -> None:
    p = subprocess.run(protect_argv(journal, argv, baseline), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"cdpctl protect {' '.join(argv[-3:])}: exit {p.returncode}: {p.stderr.strip()[-300:]}")


# A scenario's captured change: run(root, journal, baseline) runs the
# workload with every write under root journaled (through `cdpctl protect`)
# and returns when protect has exited. Most workloads are one program
# (captured(...)); a database is a server that clients drive while it runs
# under protect, so it needs more than one argv.
Runner = Callable[[str, str, bool], None]


def captured(argv: Callable[[str], list[str]]) -> Runner:
    """The Runner of a workload that is one program: argv(root) under protect."""
    return lambda root, journal, baseline: protect(journal, argv(root), baseline)


# ---- scenarios (a) and (b) -----------------------------------------------------------


def _transfer_scenario(name: str, link: Link, dr: DrSite | None, work: str,
                       init: Callable[[str], list[str]], run: Runner,
                       log: Log, stream_row: bool = False, zlib_row: bool = False) -> dict[str, Any]:
    """init(root) (a program, not captured, or [] when init did the work
    itself) -> cdpctl init (the base) -> initial ship -> run (the change,
    under protect) -> measured: ship of the increment, rsync -z to a copy
    of the initial state, zstd -3 of the net change (workloads.net_change's
    differing 4 KiB blocks). stream_row: also zstd -3 of every write's
    bytes (size only); zlib_row: also rsync with zlib (link time)."""
    d = os.path.join(work, name)
    root, journal = os.path.join(d, "root"), os.path.join(d, "journal")
    before, dr_copy = os.path.join(d, "before"), os.path.join(d, "dr-copy")
    os.makedirs(root)
    argv = init(root)
    if argv:
        workloads._run(argv)
    # Without a base (CDP_WAN_BASE=0) the journal holds only the change: the
    # increment's records are the same, but nothing of the initial state is
    # in the vault to dedupe against (a workaround while shipping bases fails).
    with_base = os.environ.get("CDP_WAN_BASE", "1") != "0"
    cdpctl("init", journal, "--root", root, *(() if with_base else ("--no-base",)))
    shutil.copytree(root, before, symlinks=True)
    res: dict[str, Any] = {"initial_bytes": _tree_bytes(root), "with_base": with_base}
    if dr is not None:
        log(f"{name}: initial sync")
        res["initial_ship"] = dr.ship(name, journal, f"{name}-ship0")
    seq0 = last_seq(journal)
    log(f"{name}: workload under protect")
    t0 = time.monotonic()
    run(root, journal, with_base)
    res["workload_s"] = time.monotonic() - t0
    res["records"] = last_seq(journal) - seq0
    res["journal_bytes"] = _tree_bytes(os.path.join(journal, "segments"))
    res["after_bytes"] = _tree_bytes(root)
    if dr is not None:
        log(f"{name}: cdpctl ship of the change")
        res["ship"] = dr.ship(name, journal, f"{name}-ship1")
        log(f"{name}: ship {res['ship']['wire_bytes']:,} wire bytes in {res['ship']['elapsed_s']:.1f} s")
    res["zstd"] = changed_data(before, root, os.path.join(d, "changed"), journal if stream_row else None, seq0)
    log(f"{name}: zstd -3 of the changed data: {res['zstd']['bytes']:,} bytes")
    for key, choice in (("rsync", None), ("rsync_zlib", "zlib")):
        if key == "rsync_zlib" and not zlib_row:
            continue  # the zlib row is context, given for (a) only: it costs link time
        shutil.rmtree(dr_copy, ignore_errors=True)
        shutil.copytree(before, dr_copy, symlinks=True)  # the DR site's copy: the initial state
        log(f"{name}: rsync -z{'' if choice is None else ' --compress-choice=' + choice}")
        res[key] = baselines.rsync_push(link, root, dr_copy, compress_choice=choice)
        log(f"{name}: rsync {res[key]['wire_bytes']:,} wire bytes in {res[key]['elapsed_s']:.1f} s")
    res["zstd"]["over_link"] = baselines.zstd_over_link(link, res["zstd"]["file"])
    return res


def _tree_bytes(path: str) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _s, fs in os.walk(path) for f in fs)


def changed_data(before: str, after: str, out: str, journal: str | None, seq0: int) -> dict[str, Any]:
    """zstd -3 of the net change (the differing 4 KiB blocks of changed
    files, new files whole: workloads.Change.blocks); with journal, also
    zstd -3 of every WRITE's bytes after seq0 (the size only)."""
    os.makedirs(out)
    ch = workloads.net_change(Path(before), Path(after))
    blocks = os.path.join(out, "blocks")
    with open(blocks, "wb") as f:
        f.write(ch.blocks(Path(before), Path(after)))
    z = blocks + ".zst"
    res: dict[str, Any] = {
        "what": f"{len(ch.new_files):,} new and {len(ch.changed_files):,} changed files: their differing "
                f"4 KiB blocks", "raw": os.path.getsize(blocks), "bytes": baselines.zstd_size([blocks], 3, z),
        "file": z}
    os.unlink(blocks)
    if journal is not None:
        stream = os.path.join(out, "stream")
        res["stream_raw"] = write_stream(journal, seq0, stream)
        res["stream_bytes"] = baselines.zstd_size([stream], 3)
        os.unlink(stream)
    return res


def his_init(root: str) -> list[str]:
    mb = workloads._env_int("CDP_WL_DB_MB", 16)
    return [sys.executable, WORKLOADS_PY, "his-init", os.path.join(root, "his.db"), str(mb), str(workloads.SEED)]


def his_run(quick: bool) -> Runner:
    n = workloads._env_int("CDP_WL_TRANSACTIONS", 1000 if quick else 3000)
    return captured(lambda root: [sys.executable, WORKLOADS_PY, "his-tx", os.path.join(root, "his.db"), str(n),
                                  str(workloads.SEED)])


def pacs_init(root: str) -> list[str]:
    with open(os.path.join(root, "README"), "w") as f:  # as workloads.pacs_tree: one file in the base
        f.write("PACS archive\n")
    return []


def pacs_run(quick: bool) -> Runner:
    n = workloads._env_int("CDP_WL_IMAGES", 500 if quick else 1500)
    side = workloads._env_int("CDP_WL_IMAGE_SIDE", 256)
    return captured(lambda root: [sys.executable, WORKLOADS_PY, "pacs-write", root, str(n), str(side),
                                  str(workloads.SEED)])


# PostgreSQL's own default. tests/pg_util.py starts servers with 32MB (small
# test machines); with it, pgbench at scale 10 evicts each dirty page ~2.4
# times before the shutdown checkpoint, and the journal (every write) holds
# each of those versions while rsync and zstd see only the last.
DEFAULT_PG_SHARED_BUFFERS = "128MB"


def pg_knobs(quick: bool) -> tuple[int, int, str]:
    """(pgbench scale, seconds of the captured pgbench run, shared_buffers), checked."""
    scale = _env_int("CDP_WAN_PG_SCALE", 10)
    seconds = _env_int("CDP_WAN_PG_SECONDS", 10 if quick else 30)
    if scale < 1 or seconds < 1:
        raise ValueError(f"CDP_WAN_PG_SCALE and CDP_WAN_PG_SECONDS must be at least 1, got {scale} and {seconds}")
    buffers = os.environ.get("CDP_WAN_PG_SHARED_BUFFERS") or DEFAULT_PG_SHARED_BUFFERS
    if not re.fullmatch(r"[1-9][0-9]*(kB|MB|GB)", buffers):
        raise ValueError(f"CDP_WAN_PG_SHARED_BUFFERS: expected a size such as 128MB (kB, MB or GB), got {buffers!r}")
    return scale, seconds, buffers


class PgBench:
    """(d) PostgreSQL under pgbench. init: initdb of a throwaway cluster in
    ROOT/data, `pgbench -i -s SCALE`, a clean (fast) shutdown, uncaptured:
    ROOT is then a consistent data directory that `cdpctl init` takes as
    the base. run: the server under `cdpctl protect` (as the cluster's
    unprivileged user: PostgreSQL refuses root), `pgbench -c 4 -j 4 -T
    SECONDS` against it, a fast shutdown (it checkpoints, so the data files
    hold the change as well as the WAL), and protect exits.

    The capture library appends to the journal from the server's processes,
    so the journal and every directory down to ROOT must be the server
    user's to write or at least to cross (pg_util.Cluster.give)."""

    def __init__(self, work: str, quick: bool) -> None:
        self.work = work
        self.scale, self.seconds, self.shared_buffers = pg_knobs(quick)
        self.tps: float | None = None

    def _cluster(self, root: str) -> pg_util.Cluster:
        return pg_util.Cluster(Path(root), data=Path(root) / "data")

    def _server(self, cl: pg_util.Cluster) -> list[str]:
        # a later -c wins over pg_util's shared_buffers
        return cl.server_argv() + ["-c", f"shared_buffers={self.shared_buffers}"]

    def init(self, root: str) -> list[str]:
        # the server's user must cross every directory from the scratch
        # directory (mkdtemp: 0700) down to its data directory
        top, here = Path(self.work).resolve(), Path(root).resolve()
        if top != here and top not in here.parents:
            raise ValueError(f"pg: the root {root} is not under the scratch directory {self.work}")
        for d in (here, *here.parents):  # never above the scratch directory
            os.chmod(d, os.stat(d).st_mode | 0o011)
            if d == top:
                break
        cl = self._cluster(root)
        try:
            cl.give(Path(root))
            cl.initdb()
            cl.start_plain(self._server(cl))
            try:
                cl.pgbench("-i", "-s", str(self.scale), "-q")
            finally:
                cl.stop()
        finally:
            cl.close()
        return []  # done here: nothing more to run before the base

    def run(self, root: str, journal: str, baseline: bool) -> None:
        cl = self._cluster(root)
        cl.give(Path(journal))
        log_path = os.path.join(self.work, "pg-server.log")
        try:
            with open(log_path, "wb") as logf:
                prot = subprocess.Popen(protect_argv(journal, cl.as_user(self._server(cl)), baseline),
                                        stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
            try:
                cl.wait_ready(prot)
                self.tps = pg_util.tps(cl.pgbench("-c", "4", "-j", "4", "-T", str(self.seconds)))
            finally:
                cl.stop()  # -m fast: a shutdown checkpoint, then the postmaster exits, and so does protect
                try:
                    rc = prot.wait(timeout=300)
                except subprocess.TimeoutExpired:
                    prot.kill()
                    rc = prot.wait()
        finally:
            cl.close()
        if rc != 0:
            with open(log_path, errors="replace") as f:
                tail = f.read().strip().splitlines()
            raise RuntimeError(f"cdpctl protect (PostgreSQL) exited with {rc}: {tail[-1] if tail else ''}")


def pg_scenario(link: Link, dr: DrSite | None, work: str, quick: bool, log: Log) -> dict[str, Any]:
    """(d): PgBench as a transfer scenario; without PostgreSQL, the reason
    (a failure instead when CDP_REQUIRE_POSTGRES=1, as in CI)."""
    reason = pg_util.missing_reason()
    if reason:
        if os.environ.get(pg_util.REQUIRE_ENV) == "1":
            raise RuntimeError(f"{pg_util.REQUIRE_ENV}=1 but {reason}")
        log(f"pg: not run: {reason}")
        return {"skipped": reason}
    pg = PgBench(work, quick)
    log(f"pg: pgbench -i -s {pg.scale}, then -c 4 -j 4 -T {pg.seconds} under protect")
    res = _transfer_scenario("pg", link, dr, work, pg.init, pg.run, log, stream_row=True)
    res.update(scale=pg.scale, seconds=pg.seconds, shared_buffers=pg.shared_buffers, tps=pg.tps)
    return res


# ---- scenario (c): lag ----------------------------------------------------------------


def lag_scenario(link: Link, dr: DrSite, work: str, seconds: float, rate: int, log: Log) -> dict[str, Any]:
    from cdpcore.replication import replication_status

    d = os.path.join(work, "lag")
    root, journal = os.path.join(d, "root"), os.path.join(d, "journal")
    os.makedirs(root)
    cdpctl("init", journal, "--root", root, "--no-base")
    log(f"lag: ship --follow, then {seconds:.0f} s of {rate >> 10} KiB/s")
    with Sampler(link, period=0.1) as smp:
        ship = Measured(link.argv("tx", dr.ship_argv("lag", journal, follow=True)), work, "lag-ship")
        time.sleep(2)  # connected and caught up with the empty journal
        # an empty root needs no base: every file is created under capture
        writer = Measured([CDPCTL, "protect", "--no-baseline", journal, "--", sys.executable, WORKLOADS_PY,
                           "sustain", os.path.join(root, "stream.bin"), str(rate), str(seconds),
                           str(workloads.SEED)], work, "lag-writer")
        replica = os.path.join(dr.vault, "lag", "journal")
        samples: list[tuple[float, float | None, int | None]] = []
        truth: list[tuple[float | None, int]] = []
        t0 = time.monotonic()
        nxt = t0
        while writer.alive():
            try:
                st = replication_status(journal)
                samples.append((time.monotonic() - t0, st.get("lag_seconds"), st.get("lag_bytes")))
            except Exception as e:  # a status read racing a segment rotation: note it, keep sampling
                samples.append((time.monotonic() - t0, None, None))
                log(f"lag: status failed: {e}")
            try:
                truth.append(vault_lag(journal, replica, time.time_ns() // 1000))
            except OSError as e:
                truth.append((None, 0))
                log(f"lag: reading the replica failed: {e}")
            nxt += 0.2
            time.sleep(max(0.0, nxt - time.monotonic()))
        w = writer.wait()
        # drain: how long the sender takes to catch up once the writes stop
        drain_t0 = time.monotonic()
        drained = None
        while time.monotonic() - drain_t0 < 60:
            st = replication_status(journal)
            if st.get("lag_bytes") == 0:
                drained = time.monotonic() - drain_t0
                break
            time.sleep(0.2)
        s = ship.stop(signal.SIGINT)
    if w.returncode != 0:
        raise RuntimeError(f"the lag writer failed: {w.tail()}")
    lags = [x[1] for x in samples if x[1] is not None]
    real = [x[0] for x in truth if x[0] is not None]
    wire = utilisation(smp.samples, link.rate_bit)
    return {"seconds": seconds, "rate": rate, "samples": len(samples), "missing": len(samples) - len(lags),
            "lag_p50_s": percentile(lags, 50), "lag_p99_s": percentile(lags, 99),
            "lag_max_s": max(lags) if lags else float("nan"),
            "lag_bytes_max": max((x[2] for x in samples if x[2] is not None), default=None),
            "vault_lag_p50_s": percentile(real, 50), "vault_lag_p99_s": percentile(real, 99),
            "vault_lag_max_s": max(real) if real else float("nan"), "vault_missing": len(truth) - len(real),
            "vault_lag_bytes_max": max((x[1] for x in truth), default=0),
            "drain_s": drained, "ship_returncode": s.returncode, "ship_elapsed_s": s.elapsed_s,
            "cpu_s": s.cpu_s, "cpu_share": s.cpu_share, "written": _tree_bytes(root),
            "wire_bytes": wire["wire_bytes"],
            "series": [(round(t, 2), lag, None if v[0] is None else round(v[0], 3))
                       for (t, lag, _b), v in zip(samples, truth)],
            "replica_equal": replica_equal(journal, os.path.join(dr.vault, "lag", "journal"))}


# ---- the suite ---------------------------------------------------------------------------


SCENARIOS = ("his", "pacs", "lag", "pg")
DEFAULT_SCENARIOS = "his,pacs,lag,pg"


def chosen_scenarios() -> list[str]:
    """CDP_WAN_SCENARIOS, checked: a comma-separated subset of SCENARIOS."""
    chosen = [x.strip() for x in os.environ.get("CDP_WAN_SCENARIOS", DEFAULT_SCENARIOS).split(",") if x.strip()]
    bad = [x for x in chosen if x not in SCENARIOS]
    if bad or not chosen:
        raise ValueError(f"CDP_WAN_SCENARIOS: unknown scenario {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(SCENARIOS)}")
    return chosen


def wan_suite(log: Log = lambda s: None, quick: bool = False) -> dict[str, Any]:
    """The four scenarios on one link; quick: a third of the sizes."""
    rate = os.environ.get("CDP_WAN_RATE", "10mbit")
    chosen = chosen_scenarios()
    if "pg" in chosen:
        pg_knobs(quick)  # a bad knob fails before the link is up
    missing = replication_available()
    work = _bench.scratch("wan")
    # the knobs set for this run: run.py's command line does not show them
    knobs = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("CDP_WAN_", "CDP_WL_"))}
    res: dict[str, Any] = {"rate": rate, "load_at_start": os.getloadavg(), "replication": missing or "available",
                           "knobs": knobs, "scenarios": {}}
    try:
        with shaped_link(rate) as link:
            res["link"] = link.describe()
            res["qdiscs"] = link.qdiscs()
            log(f"link {link.name} up ({link.qdiscs().splitlines()[0]}); reference TCP copy of 4 MiB")
            res["reference"] = netlink.tcp_copy(link, nbytes=4 << 20)
            log(f"reference: {res['reference']['goodput_mbit']:.2f} Mbit/s goodput, "
                f"link use {res['reference']['link_use']:.1%}")
            dr = None if missing else DrSite(link, work, SCENARIOS)
            try:
                if "his" in chosen:
                    res["scenarios"]["his"] = _transfer_scenario(
                        "his", link, dr, work, his_init, his_run(quick), log, stream_row=True, zlib_row=True)
                if "pacs" in chosen:
                    res["scenarios"]["pacs"] = _transfer_scenario(
                        "pacs", link, dr, work, pacs_init, pacs_run(quick), log)
                if "pg" in chosen:
                    res["scenarios"]["pg"] = pg_scenario(link, dr, work, quick, log)
                if "lag" in chosen and dr is not None:
                    res["scenarios"]["lag"] = lag_scenario(
                        link, dr, work, _env_float("CDP_WAN_LAG_SECONDS", 20.0 if quick else 60.0),
                        _env_int("CDP_WAN_LAG_RATE", TARGET_LAG_RATE), log)
            finally:
                if dr is not None:
                    sv = dr.close()
                    res["serve"] = {"returncode": sv.returncode, "cpu_s": sv.cpu_s, "elapsed_s": sv.elapsed_s}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_at_end"] = os.getloadavg()
    return res


# ---- Markdown ------------------------------------------------------------------------------


def _pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**PASS**" if ok else "**FAIL**")


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def _row(name: str, r: dict[str, Any] | None, cpu: float | None = None) -> str:
    if r is None:
        return f"| {name} | - | - | - | - |"
    return (f"| {name} | {r['wire_bytes']:,} | {r['elapsed_s']:.1f} s | {r['link_use']:.1%} | "
            f"{'-' if cpu is None else f'{cpu:.1%}'} |")


def targets(sc: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, pass?, figure) lines of a transfer scenario."""
    ship = sc.get("ship")
    out: list[tuple[str, bool | None, str]] = []
    if ship is None:
        return [("cdpcore ship", None, "not measured: replication not in this checkout")]
    w = ship["wire_bytes"]
    out.append(("wire bytes <= rsync -z", w <= sc["rsync"]["wire_bytes"],
                f"{w:,} vs {sc['rsync']['wire_bytes']:,} ({w / sc['rsync']['wire_bytes']:.2f} x)"))
    zw = sc["zstd"]["over_link"]["wire_bytes"]
    out.append(("wire bytes <= zstd -3 of the changed data (its wire bytes through the link)", w <= zw,
                f"{w:,} vs {zw:,} ({w / zw:.2f} x; zstd output {sc['zstd']['bytes']:,} bytes)"))
    out.append((f"link use >= {TARGET_LINK_USE:.0%} while a backlog exists", ship["link_use"] >= TARGET_LINK_USE,
                f"{ship['link_use']:.1%} over {ship['backlog_s']:.1f} s"))
    bcpu = ship.get("backlog_cpu_share")
    if bcpu is not None:
        out.append((f"sender CPU <= {TARGET_CPU:.0%} of one core while the link is busy", bcpu <= TARGET_CPU,
                    f"{bcpu:.1%} over {ship['backlog_s']:.1f} s"))
    out.append((f"sender CPU <= {TARGET_CPU:.0%} of one core, the whole process (start-up included)",
                ship["cpu_share"] <= TARGET_CPU,
                f"{ship['cpu_share']:.1%} ({ship['cpu_s']:.2f} s CPU in {ship['elapsed_s']:.1f} s)"))
    out.append(("replica byte-equal to the source journal", ship["replica_equal"], ""))
    return out


def render(r: dict[str, Any]) -> list[str]:
    link = r.get("link", {})
    ref = r.get("reference", {})
    out = [f"## Replication over a real {r['rate']} link (issue 5)\n",
           f"Link: {link.get('name', '?')}, tbf {link.get('rate_bit', 0) / 1e6:g} Mbit/s, burst "
           f"{link.get('burst', 0):,} B, latency {link.get('latency_ms', '?')} ms, both directions. Reference "
           f"TCP copy of {ref.get('payload_bytes', 0) >> 20} MiB: goodput {ref.get('goodput_mbit', 0):.2f} Mbit/s, "
           f"link use {ref.get('link_use', 0):.1%}. Load average at start "
           f"{' '.join(f'{x:.2f}' for x in r['load_at_start'])}, at end "
           f"{' '.join(f'{x:.2f}' for x in r['load_at_end'])}.\n"]
    if r.get("knobs"):
        out.append("Knobs set: " + ", ".join(f"`{k}={v}`" for k, v in r["knobs"].items()) + ".\n")
    if r["replication"] != "available":
        out.append(f"cdpcore's own transfer not measured: {r['replication']}.\n")
    names = {"his": "(a) HIS-like SQLite", "pacs": "(b) PACS-like tree", "pg": "(d) PostgreSQL pgbench"}
    for key, title in names.items():
        sc = r["scenarios"].get(key)
        if sc is None:
            continue
        if "skipped" in sc:
            out += [f"### {title}\n", f"Not run: {sc['skipped']}.\n"]
            continue
        z = sc["zstd"]
        what = ""
        if key == "pg":
            tps = "?" if sc.get("tps") is None else f"{sc['tps']:,.0f}"
            what = (f"`pgbench -i -s {sc['scale']}` (the base), then `pgbench -c 4 -j 4 -T {sc['seconds']}` "
                    f"under protect, shared_buffers {sc['shared_buffers']}: {tps} tps, "
                    f"{sc['workload_s']:.1f} s with start and shutdown. ")
        out += [f"### {title}\n",
                what + f"Initial state {_mb(sc['initial_bytes'])}; the change: {sc['records']:,} journal records "
                f"({_mb(sc['journal_bytes'])} of segments in all), tree after {_mb(sc['after_bytes'])}. "
                f"Changed data for zstd: {z['what']} ({_mb(z['raw'])})."
                + ("" if sc.get("with_base", True) else " The journal had no base (CDP_WAN_BASE=0): the "
                   "vault held nothing of the initial state to dedupe against.") + "\n",
                "| transfer | wire bytes | time | link use | sender CPU |", "|---|---:|---:|---:|---:|"]
        if "initial_ship" in sc:
            out.append(_row("cdpcore initial sync (base, context)", sc["initial_ship"], sc["initial_ship"]["cpu_share"]))
        ship = sc.get("ship")
        out.append(_row("**cdpcore ship** (TLS, every write)", ship, ship["cpu_share"] if ship else None))
        rs = sc["rsync"]
        out.append(_row(f"rsync -z ({rs['rsync_stats'].get('compress', '?')}; --stats sent "
                        f"{rs['rsync_stats'].get('sent', 0):,})", rs))
        if "rsync_zlib" in sc:
            rz = sc["rsync_zlib"]
            out.append(_row(f"rsync -z --compress-choice=zlib (context; --stats sent "
                            f"{rz['rsync_stats'].get('sent', 0):,})", rz))
        out.append(_row(f"zstd -3 of the changed data ({z['bytes']:,} B), TCP copy", z["over_link"]))
        if "stream_bytes" in z:
            out.append(f"| zstd -3 of every write's bytes ({_mb(z['stream_raw'])} raw), size only | "
                       f"{z['stream_bytes']:,} | | | |")
        out += ["", "| target | result | figure |", "|---|---|---|"]
        out += [f"| {t} | {_pf(ok)} | {fig} |" for t, ok, fig in targets(sc)]
        out.append("")
    if "serve" in r:
        sv = r["serve"]
        out.append(f"`cdpctl serve` (the DR side, all scenarios): {sv['cpu_s']:.1f} s CPU over its "
                   f"{sv['elapsed_s']:.0f} s, exit {sv['returncode']}.\n")
    lag = r["scenarios"].get("lag")
    if lag:
        out += [f"### (c) Lag under a steady {lag['rate'] >> 10} KiB/s writer ({lag['seconds']:.0f} s)\n",
                f"{lag['samples']} samples of `replication_status()` every 200 ms ({lag['missing']} without a "
                f"figure); {_mb(lag['written'])} written, {lag['wire_bytes']:,} wire bytes; caught up "
                f"{_secs(lag['drain_s'])} after the writer stopped.\n",
                "| lag, measured from | p50 | p99 | max | max bytes behind |", "|---|---:|---:|---:|---:|",
                f"| `replication_status()` (the sender's state file, rewritten once a second) | "
                f"{lag['lag_p50_s']:.2f} s | {lag['lag_p99_s']:.2f} s | {lag['lag_max_s']:.2f} s | "
                f"{lag['lag_bytes_max'] or 0:,} |",
                f"| the replica's files (what the DR site holds at the sample) | {lag['vault_lag_p50_s']:.2f} s | "
                f"{lag['vault_lag_p99_s']:.2f} s | {lag['vault_lag_max_s']:.2f} s | {lag['vault_lag_bytes_max']:,} |",
                "", "| target | result | figure |", "|---|---|---|",
                f"| lag p99 <= {TARGET_LAG_P99_S:.0f} s (as `cdpctl status` reports it) | "
                f"{_pf(lag['lag_p99_s'] <= TARGET_LAG_P99_S)} | {lag['lag_p99_s']:.2f} s |",
                f"| lag p99 <= {TARGET_LAG_P99_S:.0f} s (at the DR site) | "
                f"{_pf(lag['vault_lag_p99_s'] <= TARGET_LAG_P99_S)} | {lag['vault_lag_p99_s']:.2f} s |",
                f"| sender CPU <= {TARGET_CPU:.0%} of one core | {_pf(lag['cpu_share'] <= TARGET_CPU)} | "
                f"{lag['cpu_share']:.1%} ({lag['cpu_s']:.1f} s CPU in {lag['ship_elapsed_s']:.1f} s) |",
                f"| replica byte-equal to the source journal | {_pf(lag['replica_equal'])} | |", ""]
    return out


def main() -> int:
    """python benchmarks/_wan_bench.py: the suite alone, JSON to stdout."""
    res = wan_suite(lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True))
    print("\n".join(render(res)), file=sys.stderr)
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

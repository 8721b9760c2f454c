"""Sender wire bytes and CPU per compression rung, the real sender over
loopback TLS, on the HIS-like workload (benchmarks.md §9, "What it took").

    python benchmarks/ship_rungs.py [--transactions 3000] [--rungs 1,2,3,4,5,auto] [--out DIR]

Set-up (untimed): a HIS-like SQLite database (workloads.py his-init), its
journal with a base (`cdpctl init`), an initial `cdpctl ship` to a vault
(`cdpctl serve` on 127.0.0.1), then N transactions under `cdpctl protect`.
Then, for each rung: the vault put back to its state after the initial
ship, `cdpctl serve`, and `cdpctl ship --json` of the increment with the
level pinned to that rung (a wrapper process pins AdaptiveLevel.choose;
nothing else differs) and `--cpu-limit unlimited`; `auto` is the
unpinned sender as an operator runs it over a 10 Mbit/s link: `--rate
10mbit`, the default `--cpu-limit` (25 %). Reported: the sender's wire
bytes (TLS included; TCP/IP not), its process CPU (start-up included) and
wall time. Ratios between rungs hold on a loaded machine; CPU seconds do
not, so compare them within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
import workloads  # noqa: E402

from cdpcore.codec import LADDER  # noqa: E402

# Runs `cdpctl ARGS` with AdaptiveLevel.choose pinned to LADDER[rung]; prints
# the process's CPU seconds (all threads, start-up included) on stderr.
_PINNED = """
import resource, sys
from cdpcore import codec
rung = int(sys.argv[1])
if rung >= 0:
    def choose(self):
        self.current = rung
        return codec.LADDER[rung]
    codec.AdaptiveLevel.choose = choose
from cdpcore.cli.main import main
rc = main(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"CPU {ru.ru_utime + ru.ru_stime:.3f}", file=sys.stderr)
sys.exit(rc)
"""


def _cdpctl(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "cdpcore.cli.main", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"cdpctl {args[0]}: exit {p.returncode}: {p.stderr.strip()[-300:]}")
    return p.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Site:
    """One scratch directory: pki, the HIS root and journal, the vault."""

    def __init__(self, work: str, transactions: int):
        self.work = work
        self.pki = os.path.join(work, "pki")
        self.root = os.path.join(work, "root")
        self.journal = os.path.join(work, "journal")
        self.vault = os.path.join(work, "vault")
        self.vault0 = os.path.join(work, "vault0")
        self.transactions = transactions

    def tls(self, who: str) -> list[str]:
        return ["--cert", os.path.join(self.pki, f"{who}.pem"), "--key", os.path.join(self.pki, f"{who}.key"),
                "--ca", os.path.join(self.pki, "ca.pem")]

    def serve(self) -> tuple[subprocess.Popen[bytes], int]:
        port = _free_port()
        p = subprocess.Popen([sys.executable, "-m", "cdpcore.cli.main", "serve", "--vault", self.vault,
                              "--listen", f"127.0.0.1:{port}", *self.tls("server")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return p, port
            except OSError:
                time.sleep(0.05)
        p.kill()
        raise RuntimeError("cdpctl serve did not start listening within 20 s")

    def ship(self, rung: int, extra: list[str]) -> dict[str, Any]:
        """One ship of the journal to a fresh copy of vault0; rung -1: not pinned."""
        shutil.rmtree(self.vault, ignore_errors=True)
        shutil.copytree(self.vault0, self.vault, symlinks=True)
        serve, port = self.serve()
        try:
            t0 = time.monotonic()
            p = subprocess.run([sys.executable, "-c", _PINNED, str(rung), "ship", self.journal,
                                "--to", f"127.0.0.1:{port}", *self.tls("his"), "--json", "--give-up", "30",
                                *extra], capture_output=True, text=True)
            wall = time.monotonic() - t0
        finally:
            serve.send_signal(signal.SIGINT)  # serve's clean stop
            serve.wait()
        if p.returncode != 0:
            raise RuntimeError(f"cdpctl ship: exit {p.returncode}: {p.stderr.strip()[-300:]}")
        out = json.loads(p.stdout)
        cpu = [float(x.split()[1]) for x in p.stderr.splitlines() if x.startswith("CPU ")]
        return {"wire_bytes": out["wire_bytes"], "raw_bytes": out["raw_bytes"], "state": out["state"],
                "cpu_s": cpu[-1] if cpu else None, "wall_s": wall}

    def set_up(self, log: Any) -> dict[str, Any]:
        os.makedirs(self.root)
        _cdpctl("pki", "init", self.pki, "--source", "his")
        db = os.path.join(self.root, "his.db")
        mb = workloads._env_int("CDP_WL_DB_MB", 16)
        log(f"his-init: {mb} MB database")
        workloads._run([sys.executable, workloads.__file__, "his-init", db, str(mb), str(workloads.SEED)])
        _cdpctl("init", self.journal, "--root", self.root)
        os.makedirs(self.vault)
        log("initial ship (the base)")
        serve, port = self.serve()
        try:
            p = subprocess.run([sys.executable, "-m", "cdpcore.cli.main", "ship", self.journal,
                                "--to", f"127.0.0.1:{port}", *self.tls("his"), "--json",
                                "--cpu-limit", "unlimited"], capture_output=True, text=True)
        finally:
            serve.send_signal(signal.SIGINT)  # serve's clean stop
            serve.wait()
        if p.returncode != 0:
            raise RuntimeError(f"initial ship: exit {p.returncode}: {p.stderr.strip()[-300:]}")
        shutil.copytree(self.vault, self.vault0, symlinks=True)
        log(f"{self.transactions} transactions under cdpctl protect")
        _cdpctl("protect", self.journal, "--", sys.executable, workloads.__file__, "his-tx", db,
                str(self.transactions), str(workloads.SEED))
        return {"journal_bytes": sum(f.stat().st_size for f in Path(self.journal, "segments").iterdir())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transactions", type=int, default=3000)
    ap.add_argument("--rungs", default="1,2,3,4,5,auto",
                    help="ladder indices (codec.LADDER: 0 lz4, 1 zstd-1, 2 zstd-3, ...) and/or auto")
    ap.add_argument("--out", help="directory for ship_rungs.json and ship_rungs.md")
    args = ap.parse_args(argv)
    rungs: list[int] = []
    for r in args.rungs.split(","):
        if r == "auto":
            rungs.append(-1)
        elif r.isdigit() and int(r) < len(LADDER):
            rungs.append(int(r))
        else:
            ap.error(f"--rungs: {r!r} is neither a ladder index below {len(LADDER)} nor auto")
    work = _bench.scratch("rungs")
    log = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        site = Site(work, args.transactions)
        res: dict[str, Any] = {"load_at_start": os.getloadavg(), **site.set_up(log), "rows": []}
        for r in rungs:
            extra = ["--cpu-limit", "unlimited"] if r >= 0 else ["--rate", "10mbit"]
            row = {"rung": "auto (10mbit, --cpu-limit 25)" if r < 0 else str(LADDER[r]), **site.ship(r, extra)}
            log(f"{row['rung']}: {row['wire_bytes']:,} wire bytes, {row['cpu_s']} CPU-s")
            res["rows"].append(row)
        res["load_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"HIS-like, {args.transactions} transactions, {res['journal_bytes'] / 1e6:.1f} MB of journal "
             f"(base included); load {res['load_at_start'][0]:.1f} -> {res['load_at_end'][0]:.1f}", "",
             "| rung | wire bytes | CPU s (process) | wall s |", "|---|---:|---:|---:|"]
    for row in res["rows"]:
        lines.append(f"| {row['rung']} | {row['wire_bytes']:,} | {row['cpu_s']:.2f} | {row['wall_s']:.1f} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        Path(args.out, "ship_rungs.json").write_text(json.dumps(res, indent=1))
        Path(args.out, "ship_rungs.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

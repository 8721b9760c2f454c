"""A throwaway PostgreSQL cluster for capture tests and benchmarks.

PostgreSQL refuses to run as root: as root, every server-side command runs
as an unprivileged user (CDP_PG_USER, else `postgres`, else `cdppg`) through
runuser, and the working directory is handed to that user. The server
listens only on a unix socket in its own directory."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REQUIRE_ENV = "CDP_REQUIRE_POSTGRES"
TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")


def bindir() -> Path | None:
    """The directory with initdb, pg_ctl and postgres, or None."""
    cands: list[str] = []
    cfg = shutil.which("pg_config")
    if cfg:
        r = subprocess.run([cfg, "--bindir"], capture_output=True, text=True)
        if r.returncode == 0:
            cands.append(r.stdout.strip())
    cands += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("initdb"):
        cands.append(os.path.dirname(os.path.realpath(shutil.which("initdb") or "")))
    for c in cands:
        if all(os.access(os.path.join(c, n), os.X_OK) for n in ("initdb", "pg_ctl", "postgres", "pgbench", "psql")):
            return Path(c)
    return None


def run_user() -> str | None:
    """The user the server runs as: None when we are not root (run as us)."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("CDP_PG_USER"), "postgres", "cdppg"):
        if name:
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
    return ""


def missing_reason() -> str | None:
    if bindir() is None:
        return "PostgreSQL binaries (initdb, pg_ctl, postgres, pgbench, psql) not found"
    if run_user() == "":
        return "running as root and no unprivileged user (postgres, cdppg or CDP_PG_USER) exists"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A cluster in `base`/root/data, sockets in `base`/sock."""

    def __init__(self, base: Path, data: Path | None = None):
        self.bin = bindir()
        assert self.bin is not None
        self.user = run_user()
        self.base = base
        self.data = data or base / "root" / "data"
        self.sock = Path(tempfile.mkdtemp(prefix="cdppg-"))
        self.port = free_port()
        self.give(self.sock)

    def give(self, path: Path) -> None:
        """Hand path (recursively) to the server's user."""
        if self.user:
            os.chmod(path, 0o755) if path.is_dir() else None
            subprocess.run(["chown", "-R", self.user, str(path)], check=True)

    def as_user(self, argv: Sequence[str]) -> list[str]:
        if not self.user:
            return list(argv)
        return ["runuser", "-u", self.user, "--", *argv]

    def cmd(self, name: str, *args: str) -> list[str]:
        assert self.bin is not None
        return self.as_user([str(self.bin / name), *args])

    def initdb(self) -> None:
        subprocess.run(self.cmd("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                "--no-sync", "-E", "UTF8"), check=True, capture_output=True)

    def server_argv(self) -> list[str]:
        assert self.bin is not None
        return [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.sock), "-p", str(self.port),
                "-c", "listen_addresses=", "-c", "shared_buffers=32MB", "-c", "max_wal_size=256MB"]

    def wait_ready(self, proc: subprocess.Popen[bytes] | None = None, limit: float = 120) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"postgres exited with {proc.returncode} before it was ready: {out[-1500:]}")
            r = subprocess.run(self.cmd("pg_isready", "-h", str(self.sock), "-p", str(self.port)),
                               capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("postgres did not become ready")

    def client(self, name: str, *args: str) -> list[str]:
        return self.cmd(name, "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", *args)

    def psql(self, sql: str) -> str:
        r = subprocess.run(self.client("psql", "-X", "-A", "-t", "-d", "postgres", "-c", sql),
                           capture_output=True, text=True, check=True)
        return r.stdout.strip()

    def pgbench(self, *args: str) -> str:
        r = subprocess.run(self.client("pgbench", *args, "postgres"), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench {' '.join(args)} failed: {r.stderr.strip()[-500:]}")
        return r.stdout + r.stderr

    def stop(self) -> None:
        subprocess.run(self.cmd("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"),
                       capture_output=True)

    def start_plain(self, argv: Sequence[str] | None = None) -> None:
        """Start the server (uncaptured) in the background via pg_ctl;
        argv: server_argv() with more settings (it must start the same way)."""
        log = self.sock / "log"
        opts = " ".join((list(argv) if argv is not None else self.server_argv())[3:])
        subprocess.run(self.cmd("pg_ctl", "-D", str(self.data), "-l", str(log), "-o", opts, "-w", "start"),
                       check=True, capture_output=True)

    def close(self) -> None:
        shutil.rmtree(self.sock, ignore_errors=True)


def tps(output: str) -> float:
    for line in output.splitlines():
        if line.startswith("tps =") or line.startswith("tps="):
            return float(line.split("=")[1].split()[0])
    raise RuntimeError(f"no tps in pgbench output: {output[-300:]}")


def cdpctl_argv() -> list[str]:
    return [sys.executable, "-m", "cdpcore.cli.main"]

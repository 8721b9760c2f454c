"""PostgreSQL under `cdpctl protect`: pgbench -i and a pgbench load; the
latest point restores byte for byte, random flush points start as a
database whose pgbench tables all answer. Skips without PostgreSQL unless
CDP_REQUIRE_POSTGRES=1 (CI), where it fails instead."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import cdpcore
from capture_util import assert_same_tree, restore_to
from cdpcore import Journal, Kind
from cdpcore.capture import COMPLETE_SUFFIX, incomplete_ranges
from conftest import scale
from pg_util import REQUIRE_ENV, TABLES, Cluster, missing_reason


def wait_baseline(jpath: Path, limit: float = 300) -> None:
    """Until the online baseline's copy is complete (its bookmark is in):
    only points after it are complete, and the test needs some. A fast
    capture can finish the whole load before a slow copy does."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with Journal.open(jpath, readonly=True) as j:
            if any((r.name or "").startswith("baseline ") and (r.name or "").endswith(COMPLETE_SUFFIX)
                   for r in j.records(kinds=(Kind.BOOKMARK,))):
                return
        time.sleep(0.2)
    raise AssertionError("the online baseline did not complete")


def need_postgres() -> None:
    reason = missing_reason()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)


@pytest.mark.slow
def test_postgres_pgbench_under_protect():
    need_postgres()
    # not tmp_path: the server's user must be able to reach every directory
    base = Path(tempfile.mkdtemp(prefix="cdptest-pg-"))
    os.chmod(base, 0o755)
    clusters: list[Cluster] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        root = base / "root"
        root.mkdir()
        cl = Cluster(base)
        clusters.append(cl)
        cl.give(root)
        cl.initdb()
        jpath = base / "journal"
        Journal.create(jpath, root, base=False).close()
        cl.give(jpath)
        # protect runs as us; the server as its own user (the journal is
        # handed to that user, since the capture library appends from it)
        prot = cdpcore.protect(jpath, cl.as_user(cl.server_argv()), resync=False,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        proc = prot.process
        cl.wait_ready(proc)
        cl.pgbench("-i", "-s", str(scale(1, 3)), "-q")
        wait_baseline(jpath)
        with Journal.open(jpath, readonly=True) as j:
            after_init = j.last_seq
        cl.pgbench("-c", "4", "-j", "2", "-t", str(scale(150, 1500)))
        cl.stop()
        out, _ = proc.communicate(timeout=300)
        res = prot.wait()
        proc = None
        text = out.decode(errors="replace")
        assert res.returncode == 0, text[-2000:]
        assert res.dirty == [], text[-2000:]
        assert "cdpcore capture" not in text, text[-2000:]

        # the latest point is the cluster byte for byte
        dest = base / "latest"
        restore_to(jpath, dest)
        assert_same_tree(root, dest)
        with Journal.open(jpath, readonly=True) as j:
            assert j.verify().ok
            gaps = incomplete_ranges(j)
            flushes = [p.seq for p in j.points() if p.kind == "FLUSH" and p.seq > after_init
                       and not any(a <= p.seq < b for a, b in gaps)]
        assert flushes
        # random flush points: postgres starts (crash recovery) and every table answers
        rnd = random.Random(3)
        for k, seq in enumerate(sorted(rnd.sample(flushes, min(scale(2, 5), len(flushes))))):
            copy = base / f"at{k}"
            restore_to(jpath, copy, at=f"seq:{seq}")
            pid = copy / "data" / "postmaster.pid"
            if pid.exists():
                pid.unlink()  # the copy of a running server: a stale lock file
            c2 = Cluster(base, data=copy / "data")
            clusters.append(c2)
            c2.give(copy)
            os.chmod(copy / "data", 0o700)
            c2.start_plain()
            try:
                for t in TABLES:
                    n = int(c2.psql(f"select count(*) from {t}"))
                    assert n >= 0
                assert int(c2.psql("select count(*) from pgbench_branches")) == scale(1, 3)
            finally:
                c2.stop()
    finally:
        if proc is not None:
            for c in clusters[:1]:
                c.stop()
            proc.kill()
            proc.wait()
        for c in clusters:
            c.close()
        shutil.rmtree(base, ignore_errors=True)

"""Capture of unmodified programs (LD_PRELOAD): real programs write under a
protected root; the latest point restores to the same tree byte for byte,
flush points restore to databases that pass their own checks."""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import cdpcore
from capture_util import assert_same_tree, cc, make_journal, restore_to, run
from cdpcore import Journal
from cdpcore.format import Kind
from cdpcore.cli.main import main as cdpctl
from conftest import scale

PY = sys.executable


@pytest.fixture
def jr(tmp_path: Path) -> tuple[Path, Path]:
    return make_journal(tmp_path)


def check_latest(jpath: Path, root: Path, tmp: Path, skip: frozenset[str] = frozenset()) -> None:
    dest = tmp / "restored"
    if dest.exists():
        shutil.rmtree(dest)
    restore_to(jpath, dest)
    assert_same_tree(root, dest, skip)
    with Journal.open(jpath, readonly=True) as j:
        assert j.verify().ok


def test_shell_redirections_and_namespace(jr, tmp_path):
    jpath, root = jr
    script = """
        echo x > f; echo y >> f; printf 'abc' > p
        mkdir -p d/e; mv f d/e/g; ln -s d/e/g s; ln p p.hard
        chmod 600 p; touch -d '2020-01-02 03:04:05' d/e/g
        echo gone > tmp; rm tmp; mkdir empty; rmdir empty
        truncate -s 10000 big; truncate -s 100 big
        cat p p p > three; cp three three.copy; mv three.copy d/
        """
    res = run(jpath, ["sh", "-c", script], cwd=root, resync=False)
    assert res.dirty == []
    check_latest(jpath, root, tmp_path)
    dest = tmp_path / "restored"
    assert (dest / "d/e/g").read_bytes() == b"x\ny\n"
    assert os.readlink(dest / "s") == "d/e/g"
    assert os.stat(dest / "d/e/g").st_mtime == os.stat(root / "d/e/g").st_mtime


def test_syscall_paths_c_program(jr, tmp_path):
    """Every interposed call family, from a C program: without resync, all
    files but the ones marked dirty (mmap, raw syscall) restore exactly."""
    jpath, root = jr
    prog = cc("capture_ops.c", tmp_path / "capture_ops")
    outside = tmp_path / "outside"
    outside.mkdir()
    res = run(jpath, [str(prog), str(outside)], cwd=root, resync=False)
    assert sorted(res.dirty) == ["mapped.bin: capture: raw system call",
                                 "mapped.bin: capture: writable shared mmap"]
    check_latest(jpath, root, tmp_path, skip=frozenset({"mapped.bin"}))
    # forked children and threads all went in; the exec'd shell too
    dest = tmp_path / "restored"
    assert len((dest / "forked.txt").read_text().splitlines()) == 150
    assert (dest / "exec.txt").read_text() == "from exec\n"
    assert (dest / "envless.txt").read_text() == "without env\n"
    assert (dest / "left_open.txt").read_text() == "flushed at exit only\n"
    assert (dest / "incoming").stat().st_size == 7777
    # resync repairs the dirty file
    r = cdpcore.resync(jpath)
    assert r.changed == ["mapped.bin"]
    check_latest(jpath, root, tmp_path)


def test_resync_finds_nothing_after_clean_capture(jr, tmp_path):
    jpath, root = jr
    run(jpath, ["sh", "-c", "echo a > a; mkdir b; echo c > b/c"], cwd=root, resync=False)
    assert cdpcore.resync(jpath).seq == 0
    # a change made without capture is found and journaled
    (root / "b" / "c").write_text("changed behind capture's back\n")
    (root / "new").write_bytes(b"n" * 3000000)
    os.unlink(root / "a")
    r = cdpcore.resync(jpath)
    assert r.changed == ["b/c"] and r.created == ["new"] and r.removed == ["a"]
    check_latest(jpath, root, tmp_path)


def test_resync_needs_no_scratch_space(jr, tmp_path, monkeypatch):
    """resync compares the root with the latest point's plan, in place: no
    restored copy (which would need as much free space as the root), so it
    works with no usable TMPDIR. A change inside a big file journals only
    the chunk that differs; a type change (file -> directory, -> symlink)
    and a mode change are found too."""
    jpath, root = jr
    script = "open('big', 'wb').write(bytes(range(256)) * 16384); open('t', 'w').write('x'); " \
             "open('m', 'w').write('m')"  # big: 4 MiB
    run(jpath, [PY, "-c", script], cwd=root, resync=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "no-such-dir"))
    with open(root / "big", "r+b") as f:
        f.seek(3 << 20)
        f.write(b"changed behind capture's back")
    os.unlink(root / "t")
    (root / "t").mkdir()
    os.chmod(root / "m", 0o600)
    with cdpcore.Journal.open(jpath) as j:
        before = j.last_seq
    r = cdpcore.resync(jpath)
    assert sorted(r.changed) == ["big", "m"] and r.created == ["t"], r
    with cdpcore.Journal.open(jpath) as j:
        writes = [rec for rec in j.records(since=f"seq:{before}") if rec.kind == cdpcore.Kind.WRITE]
    assert [(w.path, w.offset, len(w.data)) for w in writes] == [("big", 3 << 20, 1 << 20)]
    monkeypatch.delenv("TMPDIR")
    check_latest(jpath, root, tmp_path)


SQLITE_WORKLOAD = r"""
import random, sqlite3, sys
db, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sqlite3.connect(db)
c.execute(f"pragma journal_mode={mode}")
c.execute("create table if not exists patient(id integer primary key, name text, ward int, notes blob)")
c.execute("create index if not exists by_ward on patient(ward)")
rnd = random.Random(7)
for i in range(n):
    with c:
        for _ in range(5):
            c.execute("insert into patient(name, ward, notes) values (?, ?, ?)",
                      (f"p{i}", rnd.randrange(20), rnd.randbytes(rnd.randrange(10, 3000))))
        c.execute("update patient set ward = ? where id = ?", (rnd.randrange(20), rnd.randrange(1, 5 * i + 2)))
        if i % 7 == 0:
            c.execute("delete from patient where id = ?", (rnd.randrange(1, 5 * i + 2),))
c.close()
"""


def check_flush_points(jpath: Path, tmp_path: Path, dbname: str, count: int) -> None:
    with Journal.open(jpath, readonly=True) as j:
        flushes = [p.seq for p in j.points() if p.kind == "FLUSH"]
    assert flushes
    rnd = random.Random(11)
    for k, seq in enumerate(sorted(rnd.sample(flushes, min(count, len(flushes))))):
        dest = tmp_path / f"at{k}"
        restore_to(jpath, dest, at=f"seq:{seq}")
        if not (dest / dbname).exists():
            continue
        c = sqlite3.connect(dest / dbname)
        assert c.execute("pragma integrity_check").fetchone()[0] == "ok", f"seq {seq}"
        c.close()


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_python_sqlite(jr, tmp_path, mode):
    jpath, root = jr
    script = tmp_path / "work.py"
    script.write_text(SQLITE_WORKLOAD)
    n = scale(60, 400)
    res = run(jpath, [PY, str(script), "his.db", mode, str(n)], cwd=root)
    if mode == "wal":
        assert any("his.db-shm" in d for d in res.dirty)
    check_latest(jpath, root, tmp_path)
    check_flush_points(jpath, tmp_path, "his.db", scale(3, 10))


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 CLI is not installed")
@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite3_cli(jr, tmp_path, mode):
    jpath, root = jr
    sql = [f"pragma journal_mode={mode};", "create table t(a int, b text);"]
    for i in range(scale(40, 300)):
        sql.append(f"begin; insert into t values ({i}, hex(randomblob({i % 50 + 1}))); "
                   f"update t set b = 'u{i}' where a = {i // 2}; commit;")
    p = cdpcore.protect(jpath, ["sqlite3", "cli.db"], cwd=root, stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL)
    p.process.communicate("\n".join(sql).encode())
    assert p.wait().returncode == 0
    check_latest(jpath, root, tmp_path)
    check_flush_points(jpath, tmp_path, "cli.db", scale(3, 8))


def test_dd_direct_and_cp_sparse(tmp_path):
    # on the real disk: tmpfs may refuse O_DIRECT
    jpath, root = make_journal(tmp_path)
    src = tmp_path / "sparse.src"
    with open(src, "wb") as f:
        f.write(os.urandom(5000))
        f.seek(1 << 20)
        f.write(os.urandom(7000))
        f.truncate(3 << 20)
    script = f"""
        dd if=/dev/urandom of=direct.bin bs=4096 count=32 oflag=direct status=none
        dd if=/dev/urandom of=direct.bin bs=4096 count=4 seek=8 conv=notrunc oflag=direct status=none
        cp --sparse=always {src} sparse.copy
        cp --reflink=never {src} plain.copy
        """
    run(jpath, ["sh", "-c", script], cwd=root, resync=False)
    assert (root / "sparse.copy").read_bytes() == src.read_bytes()
    check_latest(jpath, root, tmp_path)


def test_tar_extract(jr, tmp_path):
    jpath, root = jr
    srcdir = tmp_path / "src"
    (srcdir / "a/b").mkdir(parents=True)
    for i in range(30):
        (srcdir / "a" / f"f{i}").write_bytes(os.urandom(i * 997))
    (srcdir / "a/b/deep").write_text("deep\n")
    os.symlink("../f1", srcdir / "a/b/link")
    os.chmod(srcdir / "a/f3", 0o600)
    archive = tmp_path / "x.tar"
    with tarfile.open(archive, "w") as t:
        t.add(srcdir / "a", arcname="a")
    run(jpath, ["tar", "-xf", str(archive)], cwd=root, resync=False)
    check_latest(jpath, root, tmp_path)


def test_threads_and_forks_python(jr, tmp_path):
    jpath, root = jr
    script = tmp_path / "w.py"
    script.write_text(r"""
import os, threading
fd = os.open("shared.bin", os.O_RDWR | os.O_CREAT, 0o644)
def w(k):
    for i in range(300):
        os.pwrite(fd, bytes([k]) * 3000, ((i * 7 + k * 13) % 50) * 1000)
ts = [threading.Thread(target=w, args=(k,)) for k in range(6)]
[t.start() for t in ts]; [t.join() for t in ts]
kids = []
for k in range(3):
    pid = os.fork()
    if pid == 0:
        f = os.open(f"child{k}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for i in range(100):
            os.write(f, b"%d %d\n" % (k, i))
            os.pwrite(fd, bytes([100 + k]) * 500, i * 300)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
""")
    run(jpath, [PY, str(script)], cwd=root, resync=False)
    check_latest(jpath, root, tmp_path)


def test_sigkill_never_breaks_the_journal(jr, tmp_path):
    """Kill a writer at random moments: verify passes, and every line whose
    fsync returned (the writer says so on stdout) is in the latest point."""
    jpath, root = jr
    script = tmp_path / "k.py"
    script.write_text(r"""
import os, sys
fd = os.open("log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
db = os.open("pages", os.O_RDWR | os.O_CREAT, 0o644)
i = 0
while True:
    os.write(fd, b"entry %08d\n" % i)
    os.pwrite(db, os.urandom(4096), (i % 97) * 4096)
    os.fsync(fd)
    sys.stdout.write(f"{i}\n"); sys.stdout.flush()
    i += 1
""")
    rnd = random.Random(5)
    for k in range(scale(3, 12)):
        p = cdpcore.protect(jpath, [PY, str(script)], cwd=root, stdout=subprocess.PIPE, resync=False)
        synced = -1
        target = rnd.randrange(5, 200)
        assert p.process.stdout is not None
        for line in p.process.stdout:
            synced = int(line)
            if synced >= target:
                break
        p.process.kill()
        p.process.stdout.close()
        p.wait()
        with Journal.open(jpath, readonly=True) as j:
            assert j.verify().ok
        dest = tmp_path / f"k{k}"
        restore_to(jpath, dest)
        lines = (dest / "log").read_text().splitlines()
        assert len(lines) >= synced + 1
        assert (dest / "log").read_bytes() == (root / "log").read_bytes()
        os.unlink(root / "log")


@pytest.mark.parametrize("stage", [16 << 20, 64 << 10, 0])
def test_journal_full_marks_dirty_and_resync_repairs(tmp_path, monkeypatch, stage):
    """The journal on a tiny file system: the program's writes all succeed,
    the files are marked dirty (once the journal has room again), a
    warning is printed, and resync makes the latest point right."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.decode().strip()}")
    try:
        root = tmp_path / "root"
        root.mkdir()
        jpath = mnt / "journal"
        Journal.create(jpath, root, base=False, segment_size=1 << 20).close()
        script = tmp_path / "fill.py"
        script.write_text(r"""
import os
fd = os.open("data", os.O_WRONLY | os.O_CREAT, 0o644)
for i in range(60):
    assert os.pwrite(fd, bytes([i % 251]) * 4096, i * 4096) == 4096
os.fsync(fd)
# make room in the journal's file system, then write more: capture resumes
os.unlink(os.environ["FILLER"])
for i in range(10):
    assert os.pwrite(fd, b"z" * 100, i * 10000) == 100
os.fsync(fd)
""")
        monkeypatch.setenv("CDPCORE_STAGE_SIZE", str(stage))
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (300 << 10))
        p = cdpcore.protect(jpath, [PY, str(script)], cwd=root, resync=False, baseline=False,
                            stderr=subprocess.PIPE, env={**os.environ, "FILLER": str(filler)})
        _, err = p.process.communicate()
        res = p.wait()
        assert res.returncode == 0
        assert b"journal append failed" in err
        if stage != 16 << 20:
            # records that found no room were lost: the file is marked dirty
            # (a big stage holds them all until the journal has room again)
            assert any(d.startswith("data: capture: journal append failed") for d in res.dirty)
        with Journal.open(jpath, readonly=True) as j:
            assert j.verify().ok
        cdpcore.resync(jpath)
        check_latest(jpath, root, tmp_path)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_online_baseline_while_writing(tmp_path):
    """A root with data and no base: protect takes the baseline while the
    program rewrites existing files; the latest point is complete and
    `points` says from where."""
    jpath, root = make_journal(tmp_path)
    for i in range(20):
        (root / f"old{i}").write_bytes(os.urandom(200000))
    script = tmp_path / "b.py"
    script.write_text(r"""
import os
for r in range(40):
    for i in range(20):
        fd = os.open(f"old{i}", os.O_RDWR)
        os.pwrite(fd, os.urandom(5000), (r * 4999) % 190000)
        os.close(fd)
os.rename("old3", "renamed3")
os.unlink("old4")
# names moving while the copy runs (the copy's blind spot)
os.makedirs("dir_a/inner")
with open("dir_a/inner/x", "wb") as f:
    f.write(os.urandom(70000))
for r in range(200):
    os.rename("old5", "old5.moved")
    os.rename("old5.moved", "old5")
    os.rename("dir_a", "dir_b")
    os.rename("dir_b", "dir_a")
""")
    res = run(jpath, [PY, str(script)], cwd=root, resync=False)
    assert res.baseline is not None and res.baseline.complete_seq > res.baseline.base_seq
    check_latest(jpath, root, tmp_path)
    with Journal.open(jpath, readonly=True) as j:
        ranges = cdpcore.capture.incomplete_ranges(j)
    assert ranges and ranges[0][1] == res.baseline.complete_seq
    # cdpctl baseline takes a fresh one; the latest point still restores right
    assert cdpctl(["baseline", str(jpath)]) == 0
    check_latest(jpath, root, tmp_path)


def test_journaled_file_object(jr, tmp_path):
    jpath, root = jr
    with cdpcore.open(jpath, root / "vendor.bin", "w+b") as f:
        f.write(b"hello world")
        f.seek(6)
        f.write(b"WORLD")
        f.truncate(8)
        f.fsync()
    with cdpcore.open(jpath, "notes.txt", "a") as t:
        t.write("first line\n")
        t.write("second line\n")
    check_latest(jpath, root, tmp_path)
    with pytest.raises(ValueError):
        cdpcore.open(jpath, tmp_path / "outside.txt", "wb")


def test_cli_protect_exit_codes_and_static_warning(jr, tmp_path, capsys, monkeypatch):
    jpath, root = jr
    assert cdpctl(["protect", str(jpath), "--", "sh", "-c", f"cd {root}; echo hi > hi; exit 7"]) == 7
    assert (root / "hi").read_text() == "hi\n"
    assert cdpctl(["protect", str(jpath)]) == 2
    assert "needs a program" in capsys.readouterr().err
    # the options where the usage puts them, between JOURNAL and "--" (until
    # session 7 argparse handed them to the program: "--no-resync: program
    # not found", exit 14)
    assert cdpctl(["protect", str(jpath), "--no-resync", "--json", "--", "sh", "-c", f"echo x > {root}/x"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["argv"][0] == "sh" and doc["resync"] is None
    assert cdpctl(["protect", str(jpath), "--", "/no/such/program"]) == 14
    assert cdpctl(["protect", str(tmp_path / "nope"), "--", "true"]) == 3
    static = tmp_path / "static"
    src = tmp_path / "static.c"
    src.write_text('#include <stdio.h>\nint main(void){FILE*f=fopen("s.txt","w");fputs("s",f);fclose(f);return 0;}\n')
    if subprocess.run(["gcc", "-static", "-o", str(static), str(src)], capture_output=True).returncode:
        pytest.skip("no static libc to build a static binary")
    capsys.readouterr()
    monkeypatch.chdir(root)
    assert cdpctl(["protect", str(jpath), "--", str(static)]) == 0
    err = capsys.readouterr().err
    assert "statically linked" in err
    # resync at exit journaled what the static binary wrote
    check_latest(jpath, root, tmp_path)


def test_cli_resync_and_points(jr, tmp_path, capsys):
    jpath, root = jr
    assert cdpctl(["protect", str(jpath), "--", "sh", "-c", f"cd {root}; echo a > a"]) == 0
    (root / "a").write_text("edited\n")
    capsys.readouterr()
    assert cdpctl(["resync", str(jpath)]) == 0
    assert "changed: a" in capsys.readouterr().out
    assert cdpctl(["resync", str(jpath)]) == 0
    assert "nothing to resync" in capsys.readouterr().out
    assert cdpctl(["points", str(jpath)]) == 0
    out = capsys.readouterr().out
    assert "complete" in out


def test_capture_lock_blocks_rollback(jr, tmp_path):
    jpath, root = jr
    p = cdpcore.protect(jpath, ["sh", "-c", "echo a > a; sleep 0.5"], cwd=root)
    try:
        with pytest.raises(cdpcore.CaptureRunning):
            cdpcore.rollback(jpath, to="seq:1")
    finally:
        p.wait()


def test_uncaptured_when_env_missing(tmp_path):
    """The library loaded without the journal variables is inert."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDPCORE_")}
    env["LD_PRELOAD"] = cdpcore.capture.library_path()
    r = subprocess.run(["sh", "-c", "echo ok > f; cat f"], cwd=tmp_path, env=env, capture_output=True)
    assert r.stdout == b"ok\n" and r.stderr == b""


def test_staged_writes_keep_order_with_direct_appends(jr, tmp_path, monkeypatch):
    """A write the program made (staged, not yet drained) gets a smaller seq
    than a bookmark appended after it returned; a write made after the
    bookmark, a larger one (the order contract across the stage)."""
    jpath, root = jr
    monkeypatch.setenv("CDPCORE_DRAIN_INTERVAL", "3600")  # only the bookmark drains
    script = tmp_path / "o.py"
    script.write_text(r"""
import os, sys
fd = os.open("f", os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"warmup", 0)           # binds the file: later writes take the staged path
os.pwrite(fd, b"A" * 4096, 4096)
print("a", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"B" * 4096, 8192)
""")
    p = cdpcore.protect(jpath, [PY, str(script)], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        baseline=False, resync=False)
    assert p.process.stdout is not None and p.process.stdin is not None
    assert p.process.stdout.readline() == b"a\n"
    with Journal.open(jpath, readonly=True) as j:
        staged_only = not any(r.data[:1] == b"A" for r in j.records(kinds=(cdpcore.Kind.WRITE,)))
    with Journal.open(jpath) as j:
        mark = j.bookmark("between")
    p.process.stdin.write(b"go\n")
    p.process.stdin.close()
    assert p.wait().returncode == 0
    with Journal.open(jpath, readonly=True) as j:
        writes = {bytes(r.data[:1]): r.seq for r in j.records(kinds=(cdpcore.Kind.WRITE,))}
    assert writes[b"A"] < mark < writes[b"B"]
    assert staged_only  # A was still in the stage when the bookmark came


def test_barriers_from_threads_and_forked_children(jr, tmp_path):
    """fsync/fdatasync/sync_file_range run the journal's sync on a syncer
    thread in parallel with the program's flush. A child forked while the
    parent's syncer exists must start its own (threads do not survive fork),
    concurrent barriers of many threads must each wait for a sync that
    covers them, and every barrier must leave one FLUSH record. After each
    barrier returns, the head says the journal is durable at least up to the
    records appended before the call."""
    jpath, root = jr
    script = tmp_path / "b.py"
    script.write_text(r"""
import os, sys, threading
from cdpcore.format import parse_head
HEAD = sys.argv[1]
def head():
    # the writers update the head in place: a read that races one may not
    # parse (its checksum); read again
    while True:
        with open(HEAD, "rb") as f:
            h = parse_head(f.read(4096))
        if h is not None:
            return h
def barrier_loop(tag, n, how):
    fd = os.open(f"f-{tag}", os.O_RDWR | os.O_CREAT, 0o644)
    for i in range(n):
        os.pwrite(fd, b"%s %d\n" % (tag.encode(), i) * 50, i * 1000)
        before = head().next_seq - 1
        if how == 0:
            os.fsync(fd)
        elif how == 1:
            os.fdatasync(fd)
        else:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER
            assert libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), 7) == 0
        if head().synced_seq < before:
            print("NOT DURABLE", tag, i, before, head().synced_seq, flush=True)
            os._exit(3)
    os.close(fd)
barrier_loop("p", 5, 0)   # the parent's syncer thread now exists
kids = []
for k in range(3):
    pid = os.fork()
    if pid == 0:
        ts = [threading.Thread(target=barrier_loop, args=(f"c{k}t{t}", 20, t % 3)) for t in range(3)]
        [t.start() for t in ts]; [t.join() for t in ts]
        if k == 0:  # a grandchild forked from a child whose syncer runs
            g = os.fork()
            if g == 0:
                barrier_loop("g", 10, 1)
                os._exit(0)
            os._exit(os.waitpid(g, 0)[1] >> 8)
        os._exit(0)
    kids.append(pid)
barrier_loop("p2", 10, 1)
codes = [os.waitpid(pid, 0)[1] >> 8 for pid in kids]
sys.exit(max(codes))
""")
    p = cdpcore.protect(jpath, [PY, str(script), str(jpath / "head")], cwd=root, resync=False,
                        stdout=subprocess.PIPE)
    out, _ = p.process.communicate(timeout=120)
    assert p.wait().returncode == 0, out
    check_latest(jpath, root, tmp_path)
    with Journal.open(jpath, readonly=True) as j:
        flushes = sum(1 for r in j.records() if r.kind == Kind.FLUSH)
    assert flushes == 5 + 3 * 3 * 20 + 10 + 10

"""cdpctl restore through the real entry point: --consistent, the progress
bar (only on a terminal), --json holding only JSON."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
from pathlib import Path

from test_cli import MODULE, assert_error, cli

from cdpcore import Journal


def _journal(tmp: Path) -> tuple[Path, int]:
    root = tmp / "root"
    root.mkdir()
    with Journal.create(tmp / "j", root) as j:
        j.append_write("db", 0, b"one")
        flush = j.append_flush()
        j.append_write("db", 0, b"two")
        j.append_flush("db")  # one file's flush: not a point of the tree
        j.sync()
    return tmp / "j", flush


def test_consistent_json(tmp_path: Path) -> None:
    jpath, flush = _journal(tmp_path)
    r = cli("restore", jpath, tmp_path / "c", "--consistent", "--json")
    assert r.code == 0 and r.err == ""  # no progress output when not on a terminal
    assert r.doc["seq"] == flush and r.doc["consistent"] is True
    assert (tmp_path / "c" / "db").read_bytes() == b"one"
    r = cli("restore", jpath, tmp_path / "l")
    assert r.code == 0 and r.err == "" and "planned" in r.out
    assert (tmp_path / "l" / "db").read_bytes() == b"two"


def test_consistent_without_a_global_flush(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with Journal.create(tmp_path / "j", root) as j:
        j.append_write("db", 0, b"x")
        j.append_flush("db")
    assert_error(("restore", tmp_path / "j", tmp_path / "d", "--consistent"), 6, "PointError",
                 "no consistent point")
    assert not (tmp_path / "d").exists()


def terminal() -> tuple[int, int]:
    """A pseudo-terminal 80 columns wide (tqdm draws nothing on one that
    reports no width)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    return leader, follower


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    jpath, _ = _journal(tmp_path)
    leader, follower = terminal()
    p = subprocess.Popen([*MODULE, "restore", str(jpath), str(tmp_path / "t")], stdin=subprocess.DEVNULL,
                         stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert p.wait(timeout=30) == 0
    assert b"planning" in seen or b"copying" in seen, seen  # tqdm drew on the terminal
    assert b"restored" in seen


def test_json_with_a_terminal_has_no_bar(tmp_path: Path) -> None:
    """--json: stdout carries only the document even on a terminal, and no
    bar is drawn on stderr."""
    jpath, _ = _journal(tmp_path)
    leader, follower = terminal()
    p = subprocess.run([*MODULE, "restore", str(jpath), str(tmp_path / "t"), "--json"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower, timeout=60)
    os.close(follower)
    os.set_blocking(leader, False)
    try:
        err = os.read(leader, 65536)
    except (BlockingIOError, OSError):
        err = b""
    os.close(leader)
    assert p.returncode == 0 and json.loads(p.stdout)["files"] == 1
    assert err == b"", err


def _tree_journal(tmp: Path) -> Path:
    root = tmp / "root"
    root.mkdir()
    with Journal.create(tmp / "j", root) as j:
        j.append_write("db", 0, b"one")
        j.append_mkdir("sub")
        j.append_write("sub/wal", 0, b"w" * 5000)
        j.append_symlink("db", "sub/link")
        j.sync()
    return tmp / "j"


def test_sync_fsyncs_every_file_and_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """restore(sync=True) (`--sync`): every file and directory it wrote,
    and DEST's entry in its parent, are fsynced before it returns; a failed
    fsync fails the restore and leaves DEST empty, like any failed restore."""
    import stat

    from cdpcore import restore

    jpath = _tree_journal(tmp_path)
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}") + ("/" if stat.S_ISDIR(st.st_mode) else ""))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    dest = tmp_path / "out" / "d"
    restore(jpath, dest, sync=True)
    assert set(synced) >= {f"{dest}/db", f"{dest}/sub/wal", f"{dest}/", f"{dest}/sub/", f"{tmp_path}/out/"}
    assert not any(p.endswith("/link") for p in synced)  # a symlink is its directory's entry
    synced.clear()
    restore(jpath, tmp_path / "plain")
    # without sync, nothing of DEST is fsynced (a scratch restore pays nothing;
    # the audit log beside the journal syncs its own entry either way)
    assert not [p for p in synced if p.startswith(str(tmp_path / "plain"))]

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    bad = tmp_path / "bad"
    bad.mkdir()
    try:
        restore(jpath, bad, sync=True)
    except OSError as e:
        assert e.errno == 5
    else:
        raise AssertionError("a failed fsync must fail the restore")
    assert os.listdir(bad) == []


def test_sync_flag(tmp_path: Path) -> None:
    jpath = _tree_journal(tmp_path)
    r = cli("restore", jpath, tmp_path / "s", "--sync", "--json")
    assert r.code == 0 and r.doc["synced"] is True, r.err
    assert (tmp_path / "s" / "sub" / "wal").read_bytes() == b"w" * 5000
    r = cli("restore", jpath, tmp_path / "n", "--json")
    assert r.code == 0 and r.doc["synced"] is False

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

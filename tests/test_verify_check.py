"""cdpctl verify --at POINT --check CMD: a real SQLite database journaled
through the API, checked with PRAGMA integrity_check at a good point and at
a point where the journal holds a corrupted page."""
from __future__ import annotations

import os
import shlex
import sqlite3
import sys
from pathlib import Path

import pytest
from test_cli import assert_error, cli

from cdpcore import Journal, audit

PAGE = 4096
# The check an operator would write, run by the same interpreter as the tests.
INTEGRITY = (f"{shlex.quote(sys.executable)} -c 'import sqlite3, sys; "
             "r = sqlite3.connect(sys.argv[1]).execute(\"PRAGMA integrity_check\").fetchall(); "
             "print(r); sys.exit(0 if r == [(\"ok\",)] else 1)' {dir}/his.db")


def count_rows(n: int) -> str:
    return (f"{shlex.quote(sys.executable)} -c 'import sqlite3, sys; "
            "c = sqlite3.connect(sys.argv[1]).execute(\"SELECT count(*) FROM visits\").fetchone()[0]; "
            f"print(c); sys.exit(c != {n})' {{dir}}/his.db")


def journal_file(j: Journal, db: Path) -> int:
    """Journal every page of the database file, then a flush of all files:
    the state the capture would have seen at the application's fsync."""
    data = db.read_bytes()
    with j.batch() as b:
        for off in range(0, len(data), PAGE):
            b.append_write("his.db", off, data[off : off + PAGE])
        b.append_flush()
    return b.last_seq


@pytest.fixture(scope="module")
def his(tmp_path_factory: pytest.TempPathFactory) -> dict:
    top = tmp_path_factory.mktemp("his")
    live = top / "live"
    live.mkdir()
    db = live / "his.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA page_size = {PAGE}")
    con.execute("CREATE TABLE visits (id INTEGER PRIMARY KEY, patient TEXT, ward TEXT, note TEXT)")
    con.execute("CREATE INDEX by_patient ON visits (patient)")
    points = {}
    root = top / "root"
    root.mkdir()
    jpath = top / "journal"
    with Journal.create(jpath, root) as j:
        j.append_create("his.db", mode=0o600)
        rows = 0
        for step in range(3):
            con.executemany("INSERT INTO visits (patient, ward, note) VALUES (?, ?, ?)",
                            [(f"P{step}-{i:05d}", f"ward {i % 9}", "stable " * (i % 20))
                             for i in range(400)])
            con.commit()
            rows += 400
            points[rows] = journal_file(j, db)
        # a damaged page: the table's root b-tree page overwritten with garbage
        con.close()
        j.append_write("his.db", PAGE, bytes([0xA5]) * PAGE)
        points["corrupt"] = j.append_flush()
        assert db.stat().st_size > 4 * PAGE
    return {"path": jpath, "points": points, "top": top}


def test_good_point_passes(his: dict, tmp_path: Path) -> None:
    at = f"seq:{his['points'][800]}"
    r = cli("verify", his["path"], "--at", at, "--check", INTEGRITY, "--scratch", tmp_path, "--json")
    assert r.code == 0, r
    doc = r.doc
    assert doc["passed"] and doc["exit_code"] == 0 and not doc["timed_out"]
    assert doc["seq"] == his["points"][800] and "[('ok',)]" in doc["output_tail"]
    assert os.listdir(tmp_path) == []  # the scratch directory is gone
    # the restored database is the one of that point, not just a valid one
    r = cli("verify", his["path"], "--at", at, "--check", count_rows(800))
    assert r.code == 0 and "PASS: the command exited 0" in r.out
    assert cli("verify", his["path"], "--at", at, "--check", count_rows(1200)).code == 11


def test_corrupted_page_fails(his: dict, tmp_path: Path) -> None:
    at = f"seq:{his['points']['corrupt']}"
    r = cli("verify", his["path"], "--at", at, "--check", INTEGRITY, "--scratch", tmp_path, "--json")
    assert r.code == 11, r
    doc = r.doc
    assert not doc["passed"] and doc["exit_code"] == 1
    assert doc["output_tail"].endswith("database disk image is malformed")
    assert os.listdir(tmp_path) == []
    human = cli("verify", his["path"], "--at", at, "--check", INTEGRITY)
    assert human.code == 11 and human.err == ""
    assert human.out.splitlines()[-2] == "FAIL: " + human.out.splitlines()[-2][len("FAIL: "):]
    assert human.out.splitlines()[-2].startswith("FAIL: the command exited 1 after")
    # the point before the damage still passes: the journal itself is fine
    assert cli("verify", his["path"], "--at", f"seq:{his['points'][1200]}",
               "--check", INTEGRITY).code == 0


def test_checks_are_audited(his: dict) -> None:
    before = len(list(audit.AuditLog(his["path"]).entries()))
    cli("verify", his["path"], "--at", f"seq:{his['points'][400]}", "--check", INTEGRITY)
    cli("verify", his["path"], "--at", f"seq:{his['points']['corrupt']}", "--check", INTEGRITY)
    cli("verify", his["path"], "--at", "seq:999999", "--check", INTEGRITY)
    new = list(audit.AuditLog(his["path"]).entries())[before:]
    assert [(e.action, e.ok) for e in new] == [("restore-check", True), ("restore-check", False),
                                               ("restore-check", False)]
    assert new[0].arguments["command"] == INTEGRITY
    assert new[0].result["passed"] and new[1].result["exit_code"] == 1
    assert "PointError" in new[2].result["error"]
    doc = cli("audit", his["path"], "--verify", "--json").doc
    assert doc["ok"] and doc["anchored_through"] == before + 3


def test_timeout_kills_the_command(his: dict, tmp_path: Path) -> None:
    r = cli("verify", his["path"], "--check", "echo started; sleep 30", "--timeout", "0.5",
            "--scratch", tmp_path, "--json")
    assert r.code == 11 and r.doc["timed_out"] and r.doc["seconds"] < 10
    assert r.doc["output_tail"] == "started"
    assert os.listdir(tmp_path) == []


def test_dir_is_quoted_and_is_the_working_directory(his: dict, tmp_path: Path) -> None:
    scratch = tmp_path / "with space; and $dollar"
    scratch.mkdir()
    r = cli("verify", his["path"], "--check", 'test -f {dir}/his.db && test "$PWD" = {dir}',
            "--scratch", scratch)
    assert r.code == 0, r
    assert os.listdir(scratch) == []


def test_long_output_keeps_the_tail(his: dict) -> None:
    r = cli("verify", his["path"], "--check", "seq 1 5000; exit 3", "--json")
    assert r.code == 11 and r.doc["exit_code"] == 3
    assert r.doc["output_truncated"] and r.doc["output_tail"].splitlines()[-1] == "5000"
    assert len(r.doc["output_tail"].splitlines()) == 20


def test_usage_errors(his: dict) -> None:
    assert_error(("verify", his["path"], "--at", "latest"), 2, "UsageError", "--check")
    assert_error(("verify", his["path"], "--check", " "), 2, "UsageError", "--check")
    assert_error(("verify", his["path"], "--check", "true", "--timeout", "0"), 2, "UsageError")
    assert_error(("verify", his["path"], "--at", "bookmark:nope", "--check", "true"), 6,
                 "PointError")

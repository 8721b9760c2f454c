"""cdpctl, run as an operator runs it: a subprocess of the real entry point.

Journals are built with the Python API (faster than through the CLI), and
every --json result is checked against what the API itself says. Whatever
happens, stderr must never hold a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cdpcore import Journal, Kind, restore
from cdpcore.format import REC_HDR, SEG_HDR, align8, segment_name
from cdpcore.point import format_us

MODULE = [sys.executable, "-m", "cdpcore.cli.main"]
ENV = {k: v for k, v in os.environ.items() if k != "CDPCTL_DEBUG"}
SEG_SIZE = 4096  # small segments: the journal below spans several


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def doc(self) -> Any:
        return json.loads(self.out)  # the whole of stdout must be one document


def start(*args: Any, cmd: list[str] = MODULE) -> subprocess.Popen[str]:
    return subprocess.Popen([*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def finish(p: subprocess.Popen[str]) -> Run:
    out, err = p.communicate(timeout=60)
    assert "Traceback" not in err, err
    return Run(p.returncode, out, err)


def cli(*args: Any, cmd: list[str] = MODULE) -> Run:
    return finish(start(*args, cmd=cmd))


def assert_error(args: tuple[Any, ...], code: int, type_name: str, *words: str) -> None:
    """The error contract, in both modes: the exit code, one line on stderr
    and nothing on stdout; with --json, the error document on stdout."""
    if args and args[0] in ("restore", "rollback"):
        # two restores into one destination would race each other, and two
        # rollbacks of one journal for its capture lock (the loser reports
        # a running capture, exit 13)
        r = finish(start(*args))
        j = finish(start(*args, "--json"))
    else:
        # both at once: interpreter start-up is most of a run's time
        human, as_json = start(*args), start(*args, "--json")
        r, j = finish(human), finish(as_json)
    assert r.code == code, r
    assert r.out == ""
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdpctl: error: "), r.err
    for w in words:
        assert w in lines[0]
    assert j.code == code, j
    err = j.doc["error"]
    assert err["type"] == type_name and err["exit_code"] == code
    assert err["message"] == lines[0][len("cdpctl: error: "):]


# ---- journals ------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A journal of a few segments: a base, writes, flushes, a bookmark
    between two versions of docs/notes.txt, a rename. Read-only tests share
    it; tests that change a journal work on a copy (the `journal` fixture)."""
    top = tmp_path_factory.mktemp("built")
    root = top / "root"
    root.mkdir()
    (root / "a.txt").write_text("hello\n")
    path = top / "journal"
    with Journal.create(path, root, segment_size=SEG_SIZE) as j:
        j.append_mkdir("docs")
        j.append_create("docs/notes.txt")
        j.append_write("docs/notes.txt", 0, b"v1")
        j.append_flush()
        for i in range(60):
            j.append_write("data/db.bin", i * 100, bytes([i]) * 100)
            if i % 20 == 19:
                j.append_flush("data/db.bin")
        j.bookmark("before-upgrade")
        j.append_write("docs/notes.txt", 0, b"v2")
        j.append_write("docs/big.bin", 0, bytes(range(256)) * 2)
        j.append_rename("a.txt", "b.txt")
        j.append_flush()
        j.sync()
        assert j.info()["segments"] >= 3
    return path


@pytest.fixture()
def journal(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "journal"
    shutil.copytree(built, copy)
    return copy


def api(path: Path) -> Journal:
    return Journal.open(path, readonly=True)


def tree(top: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(top)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(top.rglob("*"))}


def record_offset(path: Path, seg_no: int, index: int) -> int:
    """Offset of the index-th record of a segment."""
    data = (path / "segments" / segment_name(seg_no)).read_bytes()
    off = SEG_HDR.size
    for _ in range(index):
        off += align8(REC_HDR.size + struct.unpack_from("<I", data, off + 4)[0])
    return off


# ---- happy paths, checked against the API ------------------------------------------


def test_init(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("x")
    r = cli("init", tmp_path / "j", "--root", root, "--segment-size", "64K", "--json")
    assert r.code == 0, r.err
    with api(tmp_path / "j") as j:
        assert r.doc == j.info()
    assert r.doc["segment_size"] == 64 * 1024 and r.doc["records"] == 1  # the base
    r = cli("init", tmp_path / "j2", "--root", root, "--no-base")
    assert r.code == 0 and r.out.startswith(f"created journal {tmp_path / 'j2'}\n")
    with api(tmp_path / "j2") as j:
        assert j.info()["records"] == 0 and j.info()["segment_size"] == 64 << 20


def test_info(built: Path) -> None:
    r = cli("info", built, "--json")
    assert r.code == 0 and r.err == ""
    with api(built) as j:
        assert r.doc == j.info()
    human = cli("info", built)
    assert human.code == 0
    assert f"records       {r.doc['records']} (seq 1..{r.doc['last_seq']})" in human.out
    assert "damage        none" in human.out


def test_json_before_the_command(built: Path) -> None:
    r = cli("--json", "points", built)
    assert r.code == 0 and "points" in r.doc


def test_log(built: Path) -> None:
    r = cli("log", built, "--json")
    assert r.code == 0, r.err
    with api(built) as j:
        expect = [rec.to_json() for rec in j.records()]
    assert r.doc == {"records": expect, "count": len(expect)}
    human = cli("log", built).out.splitlines()
    assert len(human) == len(expect)
    assert human[0].split()[:3] == ["1", expect[0]["time"], "BASE"]
    rename = next(line for line in human if " RENAME " in line)
    assert rename.endswith("a.txt  -> b.txt")


def test_log_filters(built: Path) -> None:
    with api(built) as j:
        flush = [p for p in j.points() if p.kind == "FLUSH"][1]
        want = [r.seq for r in j.records(since=f"seq:{flush.seq}", until="bookmark:before-upgrade",
                                         kinds=(Kind.WRITE, Kind.FLUSH, Kind.BOOKMARK))]
        by_time = [r.seq for r in j.records(since=format_us(flush.ts), until=str(flush.ts + 1000))]
        docs = [r.seq for r in j.records(path="docs")]
    r = cli("log", built, "--since", f"seq:{flush.seq}", "--until", "bookmark:before-upgrade",
            "--kind", "Write", "--kind", "FLUSH,bookmark", "--json")
    assert [x["seq"] for x in r.doc["records"]] == want
    r = cli("log", built, "--since", format_us(flush.ts), "--until", flush.ts + 1000, "--json")
    assert [x["seq"] for x in r.doc["records"]] == by_time
    r = cli("log", built, "--path", "docs", "--limit", 3, "--json")
    assert [x["seq"] for x in r.doc["records"]] == docs[:3] and r.doc["count"] == 3


def test_show(built: Path) -> None:
    with api(built) as j:
        v1 = next(r for r in j.records(kinds=[Kind.WRITE]) if r.data == b"v1")
        big = next(r for r in j.records(path="docs/big.bin", kinds=[Kind.WRITE]))
    r = cli("show", built, v1.seq, "--data", "--json")
    assert r.code == 0
    assert r.doc == {**v1.to_json(), "offset": 0, "flags": 0, "payload_length": 2,
                     "data_hex": b"v1".hex(), "data_truncated": False}
    human = cli("show", built, v1.seq, "--data").out
    assert "path     docs/notes.txt" in human and "76 31" in human and "|v1|" in human
    r = cli("show", built, big.seq, "--data", "--json")
    assert r.doc["data_truncated"] and bytes.fromhex(r.doc["data_hex"]) == big.data[:256]
    r = cli("show", built, big.seq, "--full", "--json")
    assert not r.doc["data_truncated"] and bytes.fromhex(r.doc["data_hex"]) == big.data
    assert "256 more bytes" in cli("show", built, big.seq, "--data").out


def test_verify_ok(built: Path) -> None:
    r = cli("verify", built, "--json")
    assert r.code == 0
    with api(built) as j:
        assert r.doc == {"path": str(built), **j.verify().to_json(), "recovery": []}
    assert cli("verify", built).out.splitlines()[-1] == "OK"


def test_points(built: Path) -> None:
    r = cli("points", built, "--json")
    with api(built) as j:
        expect = [{**p.to_json(), "complete": True} for p in j.points()]
    assert r.code == 0 and r.doc == {"points": expect, "count": len(expect), "complete_from": None,
                                     "incomplete": []}
    human = cli("points", built).out
    assert "BOOKMARK  before-upgrade" in human and "FLUSH     file data/db.bin" in human


def test_bookmark(journal: Path) -> None:
    r = cli("bookmark", journal, "after upgrade", "--json")
    assert r.code == 0, r.err
    with api(journal) as j:
        mark = j.bookmarks()[-1]
        assert j.last_seq == mark.seq
    assert r.doc == mark.to_json() and mark.name == "after upgrade"
    human = cli("bookmark", journal, "again")
    assert human.code == 0 and human.out.startswith(f'bookmark again at seq {mark.seq + 1} (')


def test_restore(built: Path, tmp_path: Path) -> None:
    r = cli("restore", built, tmp_path / "old", "--at", "bookmark:before-upgrade", "--json")
    assert r.code == 0, r.err
    expect = restore(built, tmp_path / "api-old", at="bookmark:before-upgrade")
    assert r.doc == {"journal": str(built), "dest": str(tmp_path / "old"),
                     "at": "bookmark:before-upgrade", "consistent": False, "synced": False,
                     **expect.to_json()}
    assert tree(tmp_path / "old") == tree(tmp_path / "api-old")
    assert (tmp_path / "old/docs/notes.txt").read_bytes() == b"v1"
    assert (tmp_path / "old/a.txt").exists()
    r = cli("restore", built, tmp_path / "new")  # --at latest
    assert r.code == 0 and r.out.startswith(f"restored {built} at seq ")
    assert (tmp_path / "new/docs/notes.txt").read_bytes() == b"v2"
    assert (tmp_path / "new/b.txt").read_text() == "hello\n"


def test_installed_script(built: Path) -> None:
    # The console script pip generates, next to this interpreter (a venv
    # need not be on PATH) or else on PATH.
    script = shutil.which("cdpctl", path=os.path.dirname(sys.executable)) or shutil.which("cdpctl")
    assert script, "cdpctl is not installed: pip install -e ."
    r = cli("info", built, "--json", cmd=[script])
    assert r.code == 0 and r.doc["path"] == str(built)
    assert_missing = cli("info", built.parent / "absent", cmd=[script])
    assert assert_missing.code == 3 and assert_missing.err.startswith("cdpctl: error: ")


# ---- usage errors ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    (),                                    # no command
    ("log",),                              # no journal
    ("restore", "J"),                      # no destination
    ("frobnicate", "J"),                   # unknown command
    ("info", "J", "--bogus"),              # unknown option
    ("log", "J", "--kind", "write,bogus"),  # unknown kind
    ("log", "J", "--limit", "-1"),
    ("log", "J", "--path", "/etc"),         # not relative to the root
    ("show", "J", "abc"),                  # SEQ not a number
    ("init", "J", "--root", "R", "--segment-size", "12X"),
    ("init", "J", "--root", "R", "--segment-size", "1K"),  # below the minimum
    ("init", "J"),                         # no --root
], ids=lambda a: " ".join(a) or "none")
def test_usage_errors(args: tuple[str, ...]) -> None:
    assert_error(args, 2, "UsageError")


def test_usage_error_names_the_culprit() -> None:
    r = cli("log", "J", "--kind", "bogus")
    assert "unknown kind 'bogus'" in r.err and "write, truncate, flush" in r.err
    assert "12X" in cli("init", "J", "--root", "R", "--segment-size", "12X").err


@pytest.mark.parametrize("size,expect", [("4096", 4096), ("4k", 4096), ("64M", 64 << 20),
                                         ("1GiB", 1 << 30), ("8 KiB", 8192)])
def test_segment_size_suffixes(size: str, expect: int) -> None:
    from cdpcore.cli.init import parse_size

    assert parse_size(size) == expect


def test_rejected_arguments_of_the_core(journal: Path, tmp_path: Path) -> None:
    # arguments only the core can judge: still usage errors, not crashes
    assert_error(("bookmark", journal, "two\nlines"), 2, "UsageError", "invalid bookmark name")
    (tmp_path / "root").mkdir()
    assert_error(("init", tmp_path / "root/j", "--root", tmp_path / "root"), 2, "UsageError",
                 "must not lie inside")


@pytest.mark.parametrize("args", [
    ("log", "{J}", "--since", "yesterday"),
    ("log", "{J}", "--until", "bookmark:nope"),
    ("restore", "{J}", "{T}/dest", "--at", "bookmark:nope"),
    ("restore", "{J}", "{T}/dest", "--at", "1970-01-01T00:00:00Z"),  # before the first record
    ("show", "{J}", "99999"),
])
def test_bad_points(built: Path, tmp_path: Path, args: tuple[str, ...]) -> None:
    assert_error(tuple(a.format(J=built, T=tmp_path) for a in args), 6, "PointError")


# ---- journals that are missing, foreign or damaged -----------------------------------------


# read-only commands share one way of opening; verify and bookmark have their own
@pytest.mark.parametrize("command", [("log",), ("verify",), ("bookmark", "{J}", "x"),
                                     ("restore", "{J}", "{T}/dest")])
def test_missing_journal(tmp_path: Path, command: tuple[str, ...]) -> None:
    missing = tmp_path / "absent"
    args = [a.format(J=missing, T=tmp_path) for a in command]
    if len(args) == 1:
        args.append(str(missing))
    assert_error(tuple(args), 3, "JournalNotFound", str(missing))


def test_not_a_journal(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("hello")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/x").write_text("x")
    assert_error(("info", tmp_path / "file"), 4, "NotAJournal", "not a directory")
    assert_error(("log", tmp_path / "dir"), 4, "NotAJournal", "no journal.json")
    assert_error(("verify", tmp_path / "dir"), 4, "NotAJournal")


def test_newer_version(journal: Path) -> None:
    meta = journal / "journal.json"
    body = json.loads(meta.read_text())
    body["version"] = 99
    meta.write_text(json.dumps(body))
    assert_error(("info", journal), 4, "UnsupportedVersion", "version 99")
    assert_error(("verify", journal), 4, "UnsupportedVersion")


@pytest.mark.parametrize("keep_index", [True, False], ids=["index", "no-index"])
def test_damage_in_a_middle_segment(journal: Path, tmp_path: Path, keep_index: bool) -> None:
    seg = journal / "segments" / segment_name(2)
    off = record_offset(journal, 2, 3)
    data = bytearray(seg.read_bytes())
    data[off] ^= 0xFF  # the record's checksum
    seg.write_bytes(bytes(data))
    if not keep_index:  # then opening finds the damage, not the first read
        (journal / "segments" / "0000000000000002.idx").unlink()
    where = f"segment 0000000000000002 offset {off}"

    # log shows what precedes the damage, then fails: never a silent end
    r = cli("log", journal)
    assert r.code == 5 and r.err == f"cdpctl: error: {where}: checksum mismatch\n"
    assert r.out.count("\n") > 10
    j = cli("log", journal, "--json")
    assert j.code == 5
    assert j.doc["error"] == {"type": "CorruptJournal", "message": f"{where}: checksum mismatch",
                              "exit_code": 5, "segment": 2, "offset": off}
    assert j.doc["count"] == len(j.doc["records"]) > 10

    r = cli("verify", journal)
    assert r.code == 1 and f"damage: {where}: checksum mismatch" in r.out
    v = cli("verify", journal, "--json")
    assert v.code == 1 and not v.doc["ok"]
    assert [(p["segment"], p["offset"]) for p in v.doc["problems"]] == [(2, off)]
    assert v.doc["last_seq"] == v.doc["records"]  # the valid records before the damage

    # the latest state lies beyond the damage: restoring it must fail...
    assert_error(("restore", journal, tmp_path / "latest"), 5, "CorruptJournal", where)
    assert_error(("points", journal), 5, "CorruptJournal", where)
    # ...while a point before it restores
    r = cli("restore", journal, tmp_path / "early", "--at", "seq:10")
    assert r.code == 0, r.err


def test_zeroed_segment_header(journal: Path) -> None:
    seg = journal / "segments" / segment_name(2)
    data = bytearray(seg.read_bytes())
    data[:SEG_HDR.size] = bytes(SEG_HDR.size)
    seg.write_bytes(bytes(data))
    # the journal is damaged, not "not a journal"
    assert_error(("info", journal), 5, "CorruptJournal", "segment 0000000000000002")
    r = cli("verify", journal, "--json")
    assert r.code == 1 and "not a journal segment" in r.doc["problems"][0]["message"]


def test_torn_tail(journal: Path) -> None:
    with api(journal) as j:
        last = j.info()["segments"]
    with open(journal / "segments" / segment_name(last), "ab") as f:
        f.write(b"half a record")
    r = cli("verify", journal)
    assert r.code == 0 and "torn tail" in r.out and "recovery: torn tail" in r.out
    v = cli("verify", journal, "--json")
    assert v.doc["ok"] and len(v.doc["recovery"]) == 1
    r = cli("log", journal, "--limit", "1", "--json")
    assert r.code == 0 and r.err.startswith("cdpctl: warning: torn tail")
    assert r.doc["count"] == 1


# ---- restore and init refusals, system errors -------------------------------------------------


def test_restore_into_non_empty(built: Path, tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest/keep").write_text("precious")
    assert_error(("restore", built, tmp_path / "dest"), 7, "RestoreError", "not empty")
    assert (tmp_path / "dest/keep").read_text() == "precious"


def test_init_over_existing(built: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in built.iterdir())
    assert_error(("init", built, "--root", tmp_path), 8, "JournalExists", str(built))
    assert sorted(p.name for p in built.iterdir()) == before


def test_os_error(built: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    dest = tmp_path / "file" / "dest"
    assert_error(("restore", built, dest), 10, "NotADirectoryError", "Not a directory", str(dest))
    r = cli("restore", built, dest, "--json")
    assert r.doc["error"]["errno"] == 20 and r.doc["error"]["path"] == str(dest)


# ---- the top-level handler, in process ------------------------------------------------------------


def test_internal_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                        built: Path) -> None:
    from cdpcore.cli import info, main

    def boom(*_: Any) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(info, "run", boom)
    monkeypatch.delenv("CDPCTL_DEBUG", raising=False)
    assert main.main(["info", str(built)]) == 1
    cap = capsys.readouterr()
    assert cap.err == "cdpctl: error: internal error: RuntimeError: boom\n" and cap.out == ""
    assert main.main(["info", str(built), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "InternalError"
    monkeypatch.setenv("CDPCTL_DEBUG", "1")
    assert main.main(["info", str(built)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_interrupt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                   built: Path) -> None:
    from cdpcore.cli import log, main

    def interrupted(*_: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(log, "run", interrupted)
    assert main.main(["log", str(built), "--json"]) == 130
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "Interrupted"

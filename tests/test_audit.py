"""Audit trail: every way of tampering with the log that the design says is
detected is detected, through `cdpctl audit --verify` as an operator runs it,
and what is documented as not detectable is pinned too."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
from pathlib import Path

import pytest
from test_cli import assert_error, cli

from cdpcore import Journal, Kind, audit

N_PROCS, PER_PROC = 4, 15


def build(jpath: Path, root: Path) -> Path:
    """A journal with 5 audit entries: 2 bookmarks (API), 1 anchored restore,
    1 bookmark in a batch, 1 anchored failed restore."""
    with Journal.create(jpath, root) as j:
        j.append_write("a.txt", 0, b"one")
        j.bookmark("first")
        j.bookmark("second")
        audit.append(j, "restore", {"at": "bookmark:first", "dest": "/srv/x"}, {"seq": 2})
        with j.batch() as b:
            b.append_write("a.txt", 0, b"two")
            b.bookmark("in-batch")
        e = audit.append(jpath, "restore", {"at": "seq:99"}, {"error": "no such seq"}, ok=False)
        assert e.anchor_seq is not None and e.anchor_error is None
    return jpath


@pytest.fixture
def jp(journal_dirs) -> Path:
    jpath, root = journal_dirs
    return build(jpath, root)


def lines(jp: Path) -> list[str]:
    return (jp / "audit.log").read_text().splitlines(keepends=True)


def put(jp: Path, ls: list[str]) -> None:
    (jp / "audit.log").write_text("".join(ls))


def rehash(ls: list[str], start: int, uuid: bytes) -> list[str]:
    """What an attacker with a text editor and sha256 can do: recompute the
    chain from line `start` (0-based) on, so the log alone checks out."""
    out = ls[:start]
    prev = json.loads(out[-1])["hash"] if out else audit.genesis(uuid)
    for i, raw in enumerate(ls[start:], start):
        doc = json.loads(raw)
        doc.pop("hash")
        doc["n"], doc["prev"] = i + 1, prev
        prev = audit.entry_hash(prev, doc)
        out.append(audit.canonical({**doc, "hash": prev}).decode() + "\n")
    return out


def verify(jp: Path) -> dict:
    r = cli("audit", jp, "--verify", "--json")
    doc = r.doc
    assert r.code == (0 if doc["ok"] else 1), r
    return doc


def test_entries_say_who_what_when(jp: Path) -> None:
    entries = list(audit.AuditLog(jp).entries())
    assert [e.n for e in entries] == [1, 2, 3, 4, 5]
    assert [e.action for e in entries] == ["bookmark", "bookmark", "restore", "bookmark", "restore"]
    assert [e.arguments.get("name") for e in entries] == ["first", "second", None, "in-batch", None]
    assert entries[4].ok is False and entries[4].result == {"error": "no such seq"}
    with Journal.open(jp, readonly=True) as j:
        marks = {b.name: b.seq for b in j.bookmarks()}
        anchors = [(r.audit_entry, r.audit_hash) for r in j.records(kinds=[Kind.AUDIT])]
    assert entries[0].result == {"seq": marks["first"]}
    assert entries[3].result["batch"][0] <= marks["in-batch"] <= entries[3].result["batch"][1]
    assert anchors == [(3, entries[2].hash), (5, entries[4].hash)]
    e = entries[0]
    assert (e.uid, e.pid, e.host) == (os.getuid(), os.getpid(), socket.gethostname())
    assert e.user and e.argv and entries[1].ts >= e.ts
    # the CLI lists the same entries
    r = cli("audit", jp, "--json")
    assert r.code == 0 and [d["hash"] for d in r.doc["entries"]] == [x.hash for x in entries]
    assert r.doc["count"] == 5
    human = cli("audit", jp)
    assert human.code == 0 and len(human.out.splitlines()) == 5 and "FAILED" in human.out


def test_log_shows_anchors(jp: Path) -> None:
    entries = list(audit.AuditLog(jp).entries())
    r = cli("log", jp, "--kind", "audit", "--json")
    assert r.code == 0
    assert [(d["kind"], d["audit_entry"], d["audit_hash"]) for d in r.doc["records"]] == [
        ("AUDIT", 3, entries[2].hash), ("AUDIT", 5, entries[4].hash)]
    human = cli("log", jp, "--kind", "AUDIT").out.splitlines()
    assert len(human) == 2 and human[0].split()[2:] == ["AUDIT", "-", "entry=3",
                                                        f"hash={entries[2].hash[:16]}..."]


def test_intact_log_verifies(jp: Path) -> None:
    doc = verify(jp)
    assert doc["ok"] and doc["entries"] == 5 and doc["anchors"] == 2 and doc["anchored_through"] == 5
    assert doc["problems"] == []
    human = cli("audit", jp, "--verify")
    assert human.code == 0 and human.out.splitlines()[-1] == "OK"


def test_cli_bookmark_is_audited(jp: Path) -> None:
    r = cli("bookmark", jp, "from the cli", "--json")
    assert r.code == 0
    last = list(audit.AuditLog(jp).entries())[-1]
    assert (last.n, last.action, last.arguments, last.result) == (
        6, "bookmark", {"name": "from the cli"}, {"seq": r.doc["seq"]})
    assert "bookmark" in last.argv and "from the cli" in last.argv
    doc = verify(jp)  # intact, but the new entry is not anchored yet
    assert doc["ok"] and doc["anchored_through"] == 5
    assert [p["severity"] for p in doc["problems"]] == ["warning"]
    a = cli("audit", jp, "--anchor", "--json")
    assert a.code == 0 and a.doc["entry"] == 6
    assert verify(jp)["problems"] == []


def tamper_edit(ls, uuid):
    ls[1] = ls[1].replace('"second"', '"SECOND"')
    return ls, 2


def tamper_delete(ls, uuid):
    del ls[1]
    return ls, 3


def tamper_insert(ls, uuid):
    ls.insert(2, ls[1])
    return ls, 2


def tamper_reorder(ls, uuid):
    ls[1], ls[2] = ls[2], ls[1]
    return ls, 3


def tamper_cut_anchored_tail(ls, uuid):
    return ls[:3], 5  # entries 4 and 5 gone; the journal anchors entry 5


def tamper_rewrite_chain(ls, uuid):
    ls[2] = ls[2].replace("/srv/x", "/srv/innocent")
    return rehash(ls, 2, uuid), 3  # chain recomputed: only the anchor of 3 catches it


def tamper_delete_and_rechain(ls, uuid):
    del ls[2]
    return rehash(ls, 2, uuid), 3  # entry 3 is now the old 4: its anchor disagrees


def tamper_foreign_log(ls, uuid):
    return rehash(ls, 0, bytes(16)), 1  # a chain built for another journal


def tamper_same_content_other_bytes(ls, uuid):
    doc = json.loads(ls[1])
    ls[1] = json.dumps(doc, indent=1).replace("\n", "") + "\n"  # spaces: equal as JSON
    assert json.loads(ls[1]) == doc
    return ls, 2


def tamper_garbage_line(ls, uuid):
    ls[3] = "this is not json\n"
    return ls, None


@pytest.mark.parametrize("tamper", [tamper_edit, tamper_delete, tamper_insert, tamper_reorder,
                                    tamper_cut_anchored_tail, tamper_rewrite_chain,
                                    tamper_delete_and_rechain, tamper_foreign_log,
                                    tamper_same_content_other_bytes, tamper_garbage_line])
def test_tampering_is_detected(jp: Path, tamper) -> None:
    with Journal.open(jp, readonly=True) as j:
        uuid = j.meta.uuid
    ls, first_entry = tamper(lines(jp), uuid)
    put(jp, ls)
    doc = verify(jp)
    assert not doc["ok"]
    first = doc["first_broken"]
    assert first["severity"] == "broken"
    if first_entry is None:
        assert first["line"] == 4
    else:
        assert first["entry"] == first_entry, doc
    human = cli("audit", jp, "--verify")
    assert human.code == 1 and human.out.splitlines()[-1].startswith("BROKEN")


def test_unanchored_tail_cut_is_not_detected(jp: Path) -> None:
    """Documented limit: entries after the newest anchor can be cut without
    a trace of breakage; verify warns that they are unanchored."""
    with Journal.open(jp) as j:
        j.bookmark("late")
    put(jp, lines(jp)[:5])
    doc = verify(jp)
    assert doc["ok"] and doc["entries"] == 5


def test_deleting_the_whole_anchored_log_is_detected(jp: Path) -> None:
    (jp / "audit.log").unlink()
    doc = verify(jp)
    assert not doc["ok"] and "deleted" in doc["first_broken"]["message"]


def test_torn_last_line_is_cut_by_the_next_append(jp: Path) -> None:
    with open(jp / "audit.log", "a") as f:
        f.write('{"action":"rest')
    doc = verify(jp)
    assert doc["ok"] and any("incomplete" in p["message"] for p in doc["problems"])
    e = audit.append(jp, "restore", {}, {})
    assert e.n == 6 and "torn" in e.extra["note"]
    doc = verify(jp)
    assert doc["ok"] and doc["problems"] == [] and doc["entries"] == 6


def test_damaged_end_is_kept_as_evidence(jp: Path) -> None:
    """Bytes after the last newline that are not a torn entry (here: the
    final newline edited away) are not cut by the next append."""
    data = (jp / "audit.log").read_bytes()
    (jp / "audit.log").write_bytes(data[:-1] + b"X")
    assert verify(jp)["first_broken"]["line"] == 5
    e = audit.append(jp, "restore", {}, {})
    assert e.n == 6 and "kept" in e.extra["note"]
    assert (jp / "audit.log").read_bytes().startswith(data[:-1] + b"X\n")
    doc = verify(jp)
    assert not doc["ok"] and doc["first_broken"]["line"] == 5


def _append_many(jpath: str, k: int) -> None:
    for i in range(PER_PROC):
        audit.append(jpath, "check", {"proc": k, "i": i}, {}, anchor=i % 5 == 0)


def test_concurrent_appends_from_processes(jp: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(jp), k)) for k in range(N_PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = list(audit.AuditLog(jp).entries())
    assert [e.n for e in entries] == list(range(1, 6 + N_PROCS * PER_PROC))
    seen = {(e.arguments["proc"], e.arguments["i"]) for e in entries[5:]}
    assert len(seen) == N_PROCS * PER_PROC
    doc = verify(jp)
    assert doc["ok"] and doc["anchors"] == 2 + N_PROCS * 3


def test_errors(jp: Path, tmp_path: Path) -> None:
    assert_error(("audit", tmp_path / "nope"), 3, "JournalNotFound")
    assert_error(("audit", jp, "--verify", "--anchor"), 2, "UsageError", "not allowed")
    shutil.copy(jp / "journal.json", tmp_path / "journal.json")
    assert_error(("audit", tmp_path / "journal.json", "--verify"), 4, "NotAJournal")


def test_restore_and_rollback_are_audited(jp: Path, tmp_path: Path) -> None:
    """Who restored or rolled back what, including attempts that failed."""
    from cdpcore import restore, rollback

    before = len(list(audit.AuditLog(jp).entries()))
    with Journal.open(jp) as j:
        root = Path(j.root)
        (root / "live.txt").write_bytes(b"v1")
        j.append_write("live.txt", 0, b"v1")
        point = j.append_flush()
        (root / "live.txt").write_bytes(b"v2")
        j.append_write("live.txt", 0, b"v2")
    restore(jp, tmp_path / "r", at=f"seq:{point}")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_bytes(b"")
    with pytest.raises(Exception):
        restore(jp, tmp_path / "busy")
    rollback(jp, to=f"seq:{point}")
    assert (root / "live.txt").read_bytes() == b"v1"
    entries = list(audit.AuditLog(jp).entries())[before:]
    got = [(e.action, e.ok) for e in entries if e.action in ("restore", "rollback")]
    assert got == [("restore", True), ("restore", False), ("rollback", True)]
    restored, failed, rolled = [e for e in entries if e.action in ("restore", "rollback")]
    assert restored.arguments["at"] == f"seq:{point}" and restored.result["seq"] == point
    assert "not empty" in failed.result["error"]
    with Journal.open(jp, readonly=True) as j:  # the rollback's entry is anchored
        anchors = [r.offset for r in j.records(kinds=[Kind.AUDIT])]
    assert rolled.n in anchors
    assert verify(jp)["ok"]

"""rollback(): the live root returns to a point; the rollback is journaled.

Random journals (test_restore_basic's operations plus large writes and
truncates) are made live by restoring their latest state into the
protected root; then the root is rolled back to a random point and must
equal a restore of that point, the journal's latest state must equal the
rolled-back root, and the point just before the rollback's records must
still restore the tree as it was before. Crash tests kill a rollback after
each of its operations and check that running it again completes it.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest
from conftest import scratch
from hypothesis import example, given, note
from hypothesis import strategies as st
from test_restore_basic import Runner, Tree
from test_restore_plan import big_op, tree_of

from cdpcore import Journal, Kind, restore
from cdpcore.errors import CaptureRunning, RestoreError
from cdpcore.rollback import CAPTURE_LOCK, INTENT, KILL_ENV, rollback


def make_live(j: Journal) -> None:
    """Make the protected root hold the journal's latest state."""
    root = Path(j.root)
    shutil.rmtree(root)
    restore(j, root)


def random_journal(tmp: Path, rnd: random.Random, n_ops: int) -> Journal:
    root = tmp / "root"
    root.mkdir()
    j = Journal.create(tmp / "j", root, segment_size=65536)
    run = Runner(j, Tree(), time.time_ns() // 1000 + 10**12)
    for _ in range(n_ops):
        run.op(rnd) if rnd.random() < 0.6 else big_op(run, rnd)
    return j


def check_rolled_back(j: Journal, tmp: Path, to_seq: int, from_seq: int, t0: int, tag: str) -> None:
    root = Path(j.root)
    restore(j, tmp / f"want-{tag}", at=f"seq:{to_seq}")
    assert tree_of(root, t0) == tree_of(tmp / f"want-{tag}", t0), "root is not the point's tree"
    restore(j, tmp / f"latest-{tag}")
    assert tree_of(tmp / f"latest-{tag}", t0) == tree_of(root, t0), "journal's latest != root"
    restore(j, tmp / f"before-{tag}", at=f"seq:{from_seq}")  # rolling forward undoes the rollback
    restore(j, tmp / f"before-ref-{tag}", at=f"seq:{from_seq}", method="replay")
    assert tree_of(tmp / f"before-{tag}", t0) == tree_of(tmp / f"before-ref-{tag}", t0)


@given(seed=st.integers(0, 2**32), n_ops=st.integers(1, 40))
def test_rollback_matches_restore(seed: int, n_ops: int) -> None:
    rnd = random.Random(seed)
    with scratch() as d:
        tmp = Path(d)
        t0 = time.time_ns() // 1000
        with random_journal(tmp, rnd, n_ops) as j:
            make_live(j)
            from_seq = j.last_seq
            to_seq = rnd.randint(max(j.first_seq - 1, 0), from_seq)
            note(f"rollback from {from_seq} to {to_seq}")
            res = rollback(j, f"seq:{to_seq}")
            if res.seq:
                assert j.record(res.seq).name == f"rollback-to-{to_seq}"
            else:  # the point's tree is the latest one (or seq was the latest):
                # nothing but the audit anchor of the rollback is appended
                assert {r.kind for r in j.records(since=f"seq:{from_seq}")} <= {Kind.AUDIT}
            check_rolled_back(j, tmp, to_seq, from_seq, t0, "a")
            assert not (Path(j.root) / ".cdpcore-rollback").exists()
            assert not (Path(j.path) / INTENT).exists()


def test_only_changed_bytes_are_rewritten(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_write("db", 0, bytes(range(256)) * 4096)  # 1 MiB
        point = j.append_flush()
        j.append_write("db", 8192, b"x" * 5000)  # the damage
        j.append_write("db", 600_000, b"y" * 10)
        j.append_truncate("db", 2 << 20)
        j.append_create("new")
        j.append_rename("db", "renamed")
        make_live(j)
        res = rollback(j, f"seq:{point}")
        assert res.bytes_written == 5000 + 10
        assert res.renamed == [("renamed", "db")] and res.removed == ["new"]
        assert (root / "db").read_bytes() == bytes(range(256)) * 4096


def test_refuses_while_capture_holds_the_lock(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_write("f", 0, b"old")
        j.append_write("f", 0, b"new")
        make_live(j)
        fd = os.open(jpath / CAPTURE_LOCK, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a running capture holds
        try:
            with pytest.raises(CaptureRunning):
                rollback(j, "seq:2")
            assert (root / "f").read_bytes() == b"new"
            rollback(j, "seq:2", force=True)
            assert (root / "f").read_bytes() == b"old"
        finally:
            os.close(fd)


CRASH_SCRIPT = """
import sys
from cdpcore.rollback import rollback
rollback(sys.argv[1], sys.argv[2])
"""


def test_killed_at_every_step_then_rerun(fast_tmp: Path) -> None:
    rnd = random.Random(7)
    base = fast_tmp / "base"
    base.mkdir()
    with random_journal(base, rnd, 16) as j:
        make_live(j)
        from_seq = j.last_seq
    to = f"seq:{from_seq // 2}"
    steps = 0
    for n, work, jp in _killed_at_each_step(fast_tmp, base, to, 200):
        with Journal.open(jp) as j:
            check_rolled_back(j, work, j.resolve(to), from_seq, 0, f"k{n}")
            assert not (jp / INTENT).exists()
            # all or nothing: the records of one run only (a killed run's,
            # written while it rewrote the root, were never published)
            stamps = {r.ts for r in j.records(since=f"seq:{from_seq + 1}") if r.kind not in (Kind.AUDIT, Kind.FILEMAP)}
            assert len(stamps) == 1, (n, stamps)
        steps = n
    assert steps > 5  # the rollback had that many steps, each one killed once


def _killed_at_each_step(fast_tmp: Path, base: Path, to: str, most: int) -> Iterator[tuple[int, Path, Path]]:
    """For n = 1, 2, ... (below most): a copy of base (its journal `j` and
    root), a rollback to `to` SIGKILLed at its n-th step (KILL_ENV), then
    rerun unkilled, which must succeed; yields (n, the copy, its journal)
    for the caller's checks and removes the copy after. Ends at the first
    n the rollback completes without being killed."""
    env = {**os.environ}
    for n in range(1, most):
        work = fast_tmp / f"n{n}"
        shutil.copytree(base, work, symlinks=True)
        jp = work / "j"
        _retarget(jp, work / "root")  # the copy's journal still names the original root
        env[KILL_ENV] = str(n)
        p = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(jp), to], env=env,
                           capture_output=True, text=True, check=False)
        if p.returncode == 0:
            shutil.rmtree(work)
            return
        assert p.returncode == -9, p.stderr
        env.pop(KILL_ENV)
        done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(jp), to], env=env,
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        yield n, work, jp
        shutil.rmtree(work)


def _retarget(jpath: Path, root: Path) -> None:
    """Point a copied journal at its copied root (journal.json, checksummed)."""
    from cdpcore.format import parse_meta
    from cdpcore.journal import write_durable

    meta_path = jpath / "journal.json"
    meta = dataclasses.replace(parse_meta(meta_path.read_bytes(), str(meta_path)), root=str(root))
    write_durable(str(meta_path), meta.to_json().encode())


def test_an_interrupted_rollback_blocks_another_point(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        for i in range(4):
            j.append_write("f", 0, bytes([i]) * 10)
        make_live(j)
        (jpath / INTENT).write_text('{"to": 2, "from": 5}')
        with pytest.raises(RestoreError, match="seq:2"):
            rollback(j, "seq:3")
        rollback(j, "seq:2")
        assert (root / "f").read_bytes() == bytes([0]) * 10  # seq 2: the first write


def test_cli(tmp_path: Path) -> None:
    from test_cli import assert_error, cli

    root = tmp_path / "root"
    root.mkdir()
    with Journal.create(tmp_path / "j", root) as j:
        j.append_write("db", 0, b"good")
        good = j.append_flush()
        j.append_write("db", 0, b"BAD!")
        j.append_create("ransom.txt")
        make_live(j)
    r = cli("rollback", tmp_path / "j", "--to", f"seq:{good}", "--json")
    assert r.code == 0, r.err
    doc = r.doc  # stdout is only the document
    assert doc["to_seq"] == good and doc["removed"] == ["ransom.txt"] and doc["changed"] == ["db"]
    assert (root / "db").read_bytes() == b"good" and not (root / "ransom.txt").exists()
    r = cli("rollback", tmp_path / "j", "--to", f"seq:{good}", "--json")  # again: no bytes change
    assert r.code == 0 and r.doc["bytes_written"] == 0 and r.doc["changed"] == r.doc["removed"] == []
    fd = os.open(tmp_path / "j" / CAPTURE_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        assert_error(("rollback", tmp_path / "j", "--to", "seq:1"), 13, "CaptureRunning", "capture")
    finally:
        os.close(fd)
    assert_error(("rollback", tmp_path / "j"), 2, "UsageError")  # no --to
    assert_error(("rollback", tmp_path / "j", "--to", "bookmark:nope"), 6, "PointError")
    # a killed rollback's intent: no capture may start on the half-rolled-back
    # root (its writes would go on top of bytes the journal does not say),
    # until the rollback is run again
    last = Journal.open(tmp_path / "j", readonly=True)
    before = last.last_seq
    last.close()
    (tmp_path / "j" / INTENT).write_text(f'{{"to": {good}, "from": {before}}}')
    r = cli("protect", tmp_path / "j", "--", "touch", root / "new")
    assert r.code == 7 and r.out == "" and r.err.count("\n") == 1, r
    assert r.err.startswith("cdpctl: error: an interrupted rollback") and f"seq:{good}" in r.err
    r = cli("protect", tmp_path / "j", "--json", "--", "touch", root / "new")
    assert r.code == 7 and r.doc["error"]["type"] == "RestoreError", r
    assert not (root / "new").exists()
    assert cli("rollback", tmp_path / "j", "--to", f"seq:{good}").code == 0
    assert not (tmp_path / "j" / INTENT).exists()
    r = cli("protect", tmp_path / "j", "--no-baseline", "--", "touch", root / "new")
    assert r.code == 0, r.err
    assert (root / "new").exists()


def test_names_removed_with_a_directory_are_bound_afresh(journal_dirs: tuple[Path, Path]) -> None:
    """Found by the stateful test: a rollback removed d (and d/c in it) with
    one RMDIR; a later write to d/c through the same Journal must bind d/c
    to a new file, not go on writing to the removed one (whose name is
    gone), or the journal and the root disagree and the next rollback
    leaves d/c behind. The same for a name that a symlink or a hard link
    replaced."""
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        (root / "b").write_bytes(b"b")
        j.append_write("b", 0, b"b")
        point = j.last_seq
        (root / "d").mkdir()
        j.append_mkdir("d")
        (root / "d" / "c").write_bytes(b"1")
        j.append_write("d/c", 0, b"1")
        rollback(j, f"seq:{point}")  # removes d/c and d
        (root / "d").mkdir()
        j.append_mkdir("d")
        (root / "d" / "c").write_bytes(b"2")
        j.append_write("d/c", 0, b"2")
        (root / "b").unlink()
        (root / "b").symlink_to("d/c")
        j.append_unlink("b")
        j.append_symlink("d/c", "b")
        restore(j, jpath.parent / "latest")
        assert (jpath.parent / "latest" / "d" / "c").read_bytes() == b"2"
        assert os.readlink(jpath.parent / "latest" / "b") == "d/c"
        assert [r.path for r in j.records(kinds=[Kind.WRITE])][-1] == "d/c"
        rollback(j, f"seq:{point}")
        assert sorted(p.name for p in root.iterdir()) == ["b"] and (root / "b").read_bytes() == b"b"


@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5000), st.integers(0, 3000),
                               st.booleans()), max_size=60))
def test_touched_ranges_in_c_match_the_python_merge(rows: list[tuple[int, int, int, bool]]) -> None:
    """cdp_touched_ranges (the rollback's "where can the root differ") is
    the plain merge of every row's range per key: writes [a, a + n), empty
    ones included (they still mark the file as touched), truncates [a, inf)."""
    from cdpcore.plan import HOLE, _Rows, _touched, merge_ranges

    r = _Rows(len(rows) + 1)
    want: dict[int, list[tuple[int, int]]] = {}
    for k, a, n, cut in rows:
        b = HOLE if cut else a + n
        r.add(k, a, b, HOLE if cut else 0, 0, 0, 0, 0)
        want.setdefault(k, []).append((a, b))
    try:
        got = {k: s.pairs() for k, s in _touched(r).items()}
        assert got == {k: merge_ranges(v) for k, v in sorted(want.items())}
    finally:
        r.close()


@given(cuts=st.lists(st.integers(0, 5000), max_size=40, unique=True), size=st.integers(0, 5200))
def test_spans_clip_matches_the_list_model(cuts: list[int], size: int) -> None:
    """Spans.clip (a rollback's ranges of a file cut shorter since) keeps
    what lies below size, as the list of pairs it replaced did; slices and
    lengths agree with the pairs."""
    from cdpcore.plan import Spans

    edges = sorted(cuts)
    ranges = list(zip(edges[0::2], edges[1::2]))
    spans = Spans.of(ranges)
    assert spans.clip(size).pairs() == [(a, min(b, size)) for a, b in ranges if a < size]
    assert list(spans.lengths()) == [b - a for a, b in ranges]
    assert spans[1:3].pairs() == ranges[1:3] and len(spans) == len(ranges)
    assert bool(spans.clip(size)) == any(a < size for a, _b in ranges)


@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1500), st.integers(0, 30)), max_size=60),
       windows=st.dictionaries(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 20), st.integers(1, 20)),
                                                          max_size=60)),
       modes=st.lists(st.integers(0, 2), min_size=4, max_size=4), in_order=st.booleans())
@example(rows=[(0, 0, 1), (0, 152, 1)], windows={0: [(5, 5)] * 20}, modes=[2, 0, 0, 0], in_order=True)  # a jump
@example(rows=[(0, 5, 3), (0, 9, 2)], windows={0: [(0, 5), (4, 2)]}, modes=[2, 0, 0, 0], in_order=True)  # touching
def test_compact_rows_matches_a_model(rows: list[tuple[int, int, int]], windows: dict[int, list[tuple[int, int]]],
                                      modes: list[int], in_order: bool) -> None:
    """cdp_compact_rows (which rows of a rollback's plan can matter): a row
    is kept when its key's mode is 1 (the whole file), or 2 and the row is
    non-empty and meets one of the key's windows (sorted, disjoint); kept
    rows keep their order and every column; rows in order and in none
    (both walk the windows from a hint, then search)."""
    from array import array

    from cdpcore._native import ffi
    from cdpcore.plan import _compact

    if in_order:
        rows = sorted(rows)
    n_keys = 4
    w: dict[int, list[tuple[int, int]]] = {}
    for k, gaps in windows.items():  # sorted, disjoint windows from gaps and lengths
        at, out = 0, []
        for gap, n in gaps:
            out.append((at + gap, at + gap + n))
            at += gap + n
        w[k] = out
    w_lo, w_hi, w_start, w_end = array("Q", bytes(8 * n_keys)), array("Q", bytes(8 * n_keys)), array("Q"), array("Q")
    for k in range(n_keys):
        w_lo[k] = len(w_start)
        for a, b in w.get(k, []):
            w_start.append(a)
            w_end.append(b)
        w_hi[k] = len(w_start)
    cols = [array("Q", [r[0] for r in rows]), array("Q", [r[1] for r in rows]),
            array("Q", [r[1] + r[2] for r in rows]), array("Q", range(len(rows)))]
    mode = bytearray(modes)
    u64 = "uint64_t[]"
    windows_c = (mode, n_keys, ffi.from_buffer(u64, w_lo), ffi.from_buffer(u64, w_hi),
                 ffi.from_buffer(u64, w_start or array("Q", [0])), ffi.from_buffer(u64, w_end or array("Q", [0])))

    def meets(k: int, a: int, b: int) -> bool:
        return a < b and any(x < b and a < y for x, y in w.get(k, []))

    keep = [i for i, (k, a, n) in enumerate(rows) if modes[k] == 1 or (modes[k] == 2 and meets(k, a, a + n))]
    m = _compact([ffi.from_buffer(u64, c or array("Q", [0])) for c in cols], len(rows), windows_c)
    assert m == len(keep)
    assert list(cols[3][:m]) == keep
    assert [(cols[0][i], cols[1][i], cols[2][i]) for i in range(m)] == [(rows[i][0], rows[i][1], sum(rows[i][1:]))
                                                                         for i in keep]
    if in_order:
        # rows as a checkpoint's pieces are (sorted by key and start, each
        # key's disjoint): cdp_compact_sorted keeps the same, by search
        from cdpcore.plan import _compact_sorted

        pieces, ends = [], {}
        for k, a, n in rows:
            a = max(a, ends.get(k, 0))
            pieces.append((k, a, n))
            ends[k] = a + n
        cols = [array("Q", [r[0] for r in pieces]), array("Q", [r[1] for r in pieces]),
                array("Q", [r[1] + r[2] for r in pieces]), array("Q", range(len(pieces)))]
        keep = [i for i, (k, a, n) in enumerate(pieces) if modes[k] == 1 or (modes[k] == 2 and meets(k, a, a + n))]
        m = _compact_sorted([ffi.from_buffer(u64, c or array("Q", [0])) for c in cols], len(pieces), windows_c)
        assert list(cols[3][:m]) == keep
        assert [tuple(c[i] for c in cols[:3]) for i in range(m)] == [(pieces[i][0], pieces[i][1], sum(pieces[i][1:]))
                                                                    for i in keep]


def test_put_back_writes_only_the_ranges_that_differ(tmp_path: Path) -> None:
    """Plan.put_back (C: read back, compare, write) against what the file
    holds: equal ranges are not written, differing and short ones are, a
    hole reads as zeros, and a write that fails raises the OS error."""
    from array import array

    from cdpcore.plan import Inode, Plan, Sources, Spans, Tree

    src_path = tmp_path / "src.seg"
    src_path.write_bytes(bytes(range(256)) * 64)  # 16 KiB of source
    sources = Sources(populate=False)
    f = sources.add(str(src_path))
    # the file at the point: [0, 4096) from src 100, a hole [4096, 8192), [8192, 12000) from src 5000
    plan = Plan(1, None, Tree(), sources)
    plan.pieces = (array("Q", [1, 1]), array("Q", [0, 8192]), array("Q", [4096, 3808]),
                   array("Q", [f, f]), array("Q", [100, 5000]), array("Q", [0, 0]))
    ino = Inode(1)
    point = bytearray(12000)
    point[0:4096] = src_path.read_bytes()[100:4196]
    point[8192:12000] = src_path.read_bytes()[5000:8808]
    live = tmp_path / "live"
    now = bytearray(point)
    now[10:20] = b"x" * 10  # differs in range 0
    now[5000:5001] = b"y"  # differs in the hole (range 1)
    live.write_bytes(bytes(now[:11000]))  # range 3 is short: the file lost its end
    ranges = [(0, 100), (4096, 8192), (8192, 9000), (10000, 12000)]
    fd = os.open(live, os.O_RDWR)
    try:
        recs, n, differs = plan.put_back(ino, fd, Spans.of(ranges))
        assert list(differs) == [1, 1, 0, 1]
        # the records say exactly what was written: the differing ranges
        assert _records_cover(recs, n) == _runs(point, [r for r, d in zip(ranges, differs) if d])
        recs, n, every = plan.put_back(ino, fd, Spans.of(ranges), every=True)
        assert list(every) == [0, 0, 0, 0]
        assert _records_cover(recs, n) == _runs(point, ranges)
    finally:
        os.close(fd)
    assert live.read_bytes() == bytes(point)
    fd = os.open(live, os.O_RDONLY)
    try:
        assert list(plan.put_back(ino, fd, Spans.of(ranges))[2]) == [0, 0, 0, 0]  # nothing to write: no error
        with open(live, "r+b") as w:
            w.seek(1)
            w.write(b"z")
        with pytest.raises(OSError, match="putting back"):
            plan.put_back(ino, fd, Spans.of(ranges))
    finally:
        os.close(fd)
        sources.close()


def _runs(data: bytes | bytearray, ranges: list[tuple[int, int]]) -> dict[int, bytes]:
    """{start: bytes} of data over the non-empty ranges, adjoining ones
    joined (an empty range gets no record)."""
    out: dict[int, bytes] = {}
    start = end = -1
    for a, b in ranges:
        if a == b:
            continue
        if a == end:
            out[start] += bytes(data[a:b])
        else:
            start = a
            out[a] = bytes(data[a:b])
        end = b
    return out


def _records_cover(recs: Any, n: int) -> dict[int, bytes]:
    """The WRITE records of Plan.put_back as {start: bytes} of runs of
    adjoining records (checked: WRITE kind, in offset order, no overlap)."""
    from cdpcore._native import ffi

    out: dict[int, bytes] = {}
    start = end = -1
    for i in range(n):
        r = recs[i]
        assert r.kind == Kind.WRITE and r.offset >= end and 0 < r.len
        data = bytes(ffi.buffer(r.payload, r.len))
        if r.offset == end:
            out[start] += data
        else:
            start = r.offset
            out[start] = data
        end = r.offset + r.len
    return out


@st.composite
def _put_back_case(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]], list[int], bool]:
    """Pieces (start, len, source, src) sorted and disjoint, with holes
    between them (some longer than the 64 KiB a hole record holds); ranges
    sorted and disjoint, some touching; the live file (a mutation of the
    point's bytes, maybe short); `every`."""
    pieces: list[tuple[int, int, int, int]] = []
    at = 0
    for _ in range(draw(st.integers(0, 6))):
        at += draw(st.sampled_from([0, 0, 1, 100, 70_000]))
        n = draw(st.integers(1, 5000))
        pieces.append((at, n, draw(st.integers(0, 1)), draw(st.integers(0, 20_000 - n))))
        at += n
    size = at + draw(st.sampled_from([0, 10, 70_000]))
    ranges: list[tuple[int, int]] = []
    at = 0
    for _ in range(draw(st.integers(0, 8))):
        a = at + draw(st.sampled_from([0, 1, 50, 3000]))
        b = a + draw(st.integers(0, 80_000))
        if b > size:
            break
        ranges.append((a, b))
        at = b
    flips = draw(st.lists(st.integers(0, max(size - 1, 0)), max_size=5)) if size else []
    return pieces, ranges, flips, draw(st.booleans())


@given(case=_put_back_case(), short=st.integers(0, 3), kick=st.sampled_from([0, 1, 4096, 1 << 16]))
def test_put_back_matches_a_model(tmp_path_factory: pytest.TempPathFactory,
                                  case: tuple[list[tuple[int, int, int, int]], list[tuple[int, int]], list[int], bool],
                                  short: int, kick: int) -> None:
    """cdp_put_back against a Python model: the file ends up with the
    point's bytes in every range and unchanged elsewhere; a range is
    written (flagged) exactly when its bytes differ or the file is short
    there; the records cover, in order, exactly the ranges written (every
    range with every=True) with the point's bytes, none over the largest
    payload, hole records at most 64 KiB. Starting the writeback (kick)
    changes none of that."""
    from array import array

    from cdpcore._native import ffi
    from cdpcore.format import MAX_PAYLOAD
    from cdpcore.plan import Inode, Plan, Sources, Spans, Tree

    pieces, ranges, flips, every = case
    tmp = tmp_path_factory.mktemp("pb")
    srcs = [bytes(random.Random(i).randbytes(20_000)) for i in range(2)]
    sources = Sources(populate=False)
    idx = []
    for i, data in enumerate(srcs):
        (tmp / f"{i}.seg").write_bytes(data)
        idx.append(sources.add(str(tmp / f"{i}.seg")))
    size = max([b for _a, b in ranges] + [p[0] + p[1] for p in pieces] + [0])
    point = bytearray(size)
    for a, n, f, src in pieces:
        point[a : a + n] = srcs[f][src : src + n]
    live = bytearray(point)
    for x in flips:
        if x < size:
            live[x] ^= 0x5A
    live = live[: max(0, size - short * 1000)]
    (tmp / "live").write_bytes(bytes(live))
    plan = Plan(1, None, Tree(), sources)
    cols = list(zip(*[(1, a, n, idx[f], src, 0) for a, n, f, src in pieces])) or [(), (), (), (), (), ()]
    plan.pieces = tuple(array("Q", c) for c in cols)
    fd = os.open(tmp / "live", os.O_RDWR)
    try:
        recs, n, differs = plan.put_back(Inode(1), fd, Spans.of(ranges), every=every, kick=kick)
        written = [bytes(live[a:b]) != bytes(point[a:b]) for a, b in ranges]
        assert list(differs) == [int(w) for w in written]
        assert _records_cover(recs, n) == _runs(point, [r for r, w in zip(ranges, written) if w or every])
        for i in range(n):
            assert recs[i].len <= MAX_PAYLOAD and recs[i].file_id == 0 and recs[i].ts == 0
            if bytes(ffi.buffer(recs[i].payload, recs[i].len)) == bytes(recs[i].len) and recs[i].len > 65536:
                # zeros longer than a hole record: must come from a source
                assert any(a <= recs[i].offset < a + m for a, m, _f, _s in pieces)
    finally:
        os.close(fd)
        sources.close()
    expect = bytearray(live)
    for a, b in ranges:
        if a < b and len(expect) < b:
            expect.extend(bytes(b - len(expect)))
        expect[a:b] = point[a:b]
    assert (tmp / "live").read_bytes() == bytes(expect)


def test_killed_between_ranges_of_one_file_then_rerun(fast_tmp: Path) -> None:
    """A file with several ranges to put back, killed after each write: a
    rerun finds the ranges the killed run wrote already equal to the point,
    and must still journal them (the journal's latest state has the
    damaged bytes there, and nothing else says they changed), or the
    journal and the root diverge silently."""
    base = fast_tmp / "base"
    base.mkdir()
    root = base / "root"
    root.mkdir()
    with Journal.create(base / "j", root) as j:
        j.append_write("db", 0, b"a" * 40_000)
        to = j.append_flush()
        for off in (0, 10_000, 20_000, 30_000):
            j.append_write("db", off, b"X" * 1000)  # four separate ranges of damage
        make_live(j)
        from_seq = j.last_seq
    killed = 0
    for n, work, jp in _killed_at_each_step(fast_tmp, base, f"seq:{to}", 40):
        killed += 1
        with Journal.open(jp) as j:
            check_rolled_back(j, work, to, from_seq, 0, f"k{n}")
    assert killed >= 4  # at least one kill after each of the four writes


def test_the_roots_fsync_thread_hands_its_error_to_the_caller(tmp_path: Path) -> None:
    """The root's fsync runs on a thread while the journal's records are
    collected (rollback._Background); the rollback must not journal
    anything if that fsync failed: result() raises the thread's error on
    the caller's thread, and returns only once the work is done."""
    from cdpcore.rollback import _Background

    def fsync_of_a_closed_descriptor() -> None:
        fd = os.open(tmp_path, os.O_RDONLY)
        os.close(fd)
        os.fsync(fd)  # EBADF: a real failing fsync

    with pytest.raises(OSError) as err:
        _Background(fsync_of_a_closed_descriptor).result()
    assert err.value.errno == errno.EBADF
    done: list[int] = []
    bg = _Background(lambda: done.append(1))
    bg.result()
    assert done == [1]


def test_put_back_starts_the_roots_writeback(journal_dirs: tuple[Path, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollback asks put back to start the root's writeback as it writes
    (kick > 0: the disk works while the rest is put back; without it the
    fsync after did all 10 MB alone, 35-60 ms of waiting), and the bytes
    are still right."""
    from cdpcore.plan import Plan
    from cdpcore.rollback import PUT_BACK_KICK

    kicks: list[int] = []
    real = Plan.put_back

    def spy(self: Plan, *a: Any, **k: Any) -> Any:
        kicks.append(k.get("kick", 0))
        return real(self, *a, **k)

    monkeypatch.setattr(Plan, "put_back", spy)
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_write("db", 0, bytes(range(256)) * 4096)
        point = j.append_flush()
        for i in range(40):
            j.append_write("db", i * 20_000, b"z" * 4096)
        make_live(j)
        rollback(j, f"seq:{point}")
    assert kicks and all(k == PUT_BACK_KICK > 0 for k in kicks)
    assert (root / "db").read_bytes() == bytes(range(256)) * 4096


@given(n_recs=st.integers(1, 12), big=st.booleans(), kick=st.sampled_from([0, 1, 4096, 1 << 16]))
def test_journal_writeback_kick_changes_no_record(tmp_path_factory: pytest.TempPathFactory, n_recs: int,
                                                  big: bool, kick: int) -> None:
    """Batch.commit(writeback=...) (cdp_writer_set_writeback: the rollback's
    append starts its own writeback as it goes) appends exactly what a
    commit without it appends, across segment rotations too, and leaves
    the writer's setting off afterwards."""
    from cdpcore.plan import build_plan

    tmp = tmp_path_factory.mktemp("kick")
    rnd = random.Random(n_recs)
    writes = [(rnd.randrange(0, 1 << 16), rnd.randbytes(rnd.choice([100, 4096, 20_000 if big else 512])))
              for _ in range(n_recs * 20)]
    got = []
    for name, wb in (("plain", 0), ("kicked", kick)):
        (tmp / name / "root").mkdir(parents=True)
        with Journal.create(tmp / name / "j", tmp / name / "root", segment_size=1 << 16) as j:
            b = j.batch()
            for off, data in writes:
                b.append_write("f", off, data)
            b.commit(by_pointer=True, writeback=wb)
            j.append_write("f", 0, b"after")  # a later append with the setting back at 0
            j.sync()
            recs = [(r.seq, r.kind, r.offset, bytes(r.data)) for r in j.records()]
            with build_plan(j, j.last_seq) as p:
                ino = p.tree.nodes["f"]
                content = p.read(ino, 0, p.size_of(ino))  # type: ignore[arg-type]
        got.append((recs, content))
    assert got[0] == got[1]


def _segment_of(records: list[tuple[int, bytes]]) -> tuple[bytes, list[int]]:
    """Bytes laid out as a segment's records (48-byte header with the
    payload length at offset 4, payload, zeros to 8 bytes), after a
    64-byte header; the payload offset of each."""
    out = bytearray(64)
    at = []
    for tag, payload in records:
        hdr = bytearray(48)
        hdr[4:8] = len(payload).to_bytes(4, "little")
        hdr[8] = tag
        at.append(len(out) + 48)
        out += hdr + payload + bytes(-len(payload) % 8)
    return bytes(out), at


@given(data=st.data(), sizes=st.lists(st.lists(st.integers(0, 9000), min_size=1, max_size=6), min_size=1, max_size=3),
       cap_short=st.booleans())
def test_read_records_matches_a_model(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
                                      sizes: list[list[int]], cap_short: bool) -> None:
    """cdp_read_records (a rollback reads the records it puts back into one
    buffer) against a model: each piece of a segment points into the
    buffer at its record's bytes, header and padded payload, equal to the
    segment's, at the same place in the record; pieces of other sources
    are left alone; a buffer too small is CDP_ENOMEM, a piece past its
    record's payload or a record cut by the file's end CDP_EINVAL."""
    from array import array

    from cdpcore._native import ffi, lib

    tmp = tmp_path_factory.mktemp("rr")
    files, starts = [], []
    for f, lens in enumerate(sizes):
        blob, at = _segment_of([(f * 16 + i, random.Random(f * 100 + i).randbytes(n)) for i, n in enumerate(lens)])
        (tmp / f"{f}.seg").write_bytes(blob)
        files.append(blob)
        starts.append(at)
    base = len(files)  # one more source, not a segment: no descriptor
    pieces = []
    for _ in range(data.draw(st.integers(1, 10))):
        f = data.draw(st.integers(0, base))
        if f == base:
            pieces.append((f, data.draw(st.integers(0, 1000)), data.draw(st.integers(1, 100)), 0))
            continue
        r = data.draw(st.integers(0, len(starts[f]) - 1))
        plen = sizes[f][r]
        a = data.draw(st.integers(0, plen))
        n = data.draw(st.integers(0, plen - a))
        pieces.append((f, starts[f][r] + a, n, starts[f][r]))
    fds = array("i", [os.open(tmp / f"{f}.seg", os.O_RDONLY) for f in range(base)] + [-1])
    file, src, length, rec = (array("Q", c) for c in zip(*pieces))
    need = sum(48 + ((sizes[f][starts[f].index(rc)] + 7) & ~7) for f, _s, _n, rc in pieces if f < base)
    cap = max(need // 2, 1) if cap_short else need
    buf = bytearray(cap)
    outs = [array("Q", bytes(8 * len(pieces))) for _ in range(3)]
    used, bad = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    u64 = "uint64_t[]"
    try:
        st_ = lib.cdp_read_records(ffi.from_buffer("int[]", fds), len(fds), len(pieces), ffi.from_buffer(u64, file),
                                   ffi.from_buffer(u64, src), ffi.from_buffer(u64, length), ffi.from_buffer(u64, rec),
                                   ffi.from_buffer(buf), cap, 99, *(ffi.from_buffer(u64, o) for o in outs), used, bad)
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    if cap_short and need > cap and st_ == lib.CDP_ENOMEM:
        return  # (a short buffer may still suffice: a record shared by adjacent pieces is read once)
    assert st_ == lib.CDP_OK
    o_file, o_src, o_rec = outs
    assert used[0] <= cap and used[0] % 8 == 0
    for i, (f, s, n, rc) in enumerate(pieces):
        if f == base:
            assert (o_file[i], o_src[i], o_rec[i]) == (f, s, rc)
            continue
        plen = sizes[f][starts[f].index(rc)]
        size = 48 + ((plen + 7) & ~7)
        assert o_file[i] == 99 and o_src[i] - o_rec[i] == s - rc and o_rec[i] % 8 == 0
        assert buf[o_rec[i] - 48 : o_rec[i] - 48 + size] == files[f][rc - 48 : rc - 48 + size]
        assert o_rec[i] - 48 + size <= used[0]


def test_read_records_refuses_damage(tmp_path: Path) -> None:
    """A piece past its record's payload, or a record the file's end cuts,
    is damage (CDP_EINVAL naming the piece), never bytes read past it."""
    from array import array

    from cdpcore._native import ffi, lib

    blob, at = _segment_of([(1, b"a" * 100), (2, b"b" * 5000)])
    cases = [((at[0] + 50, 60, at[0]), blob), ((at[1], 10, at[1]), blob[:-100])]
    for (s, n, rc), content in cases:
        (tmp_path / "0.seg").write_bytes(content)
        fd = os.open(tmp_path / "0.seg", os.O_RDONLY)
        outs = [array("Q", [0]) for _ in range(3)]
        used, bad = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        buf = bytearray(1 << 16)
        u64 = "uint64_t[]"
        try:
            st_ = lib.cdp_read_records(ffi.from_buffer("int[]", array("i", [fd])), 1, 1,
                                       ffi.from_buffer(u64, array("Q", [0])), ffi.from_buffer(u64, array("Q", [s])),
                                       ffi.from_buffer(u64, array("Q", [n])), ffi.from_buffer(u64, array("Q", [rc])),
                                       ffi.from_buffer(buf), len(buf), 1, *(ffi.from_buffer(u64, o) for o in outs),
                                       used, bad)
        finally:
            os.close(fd)
        assert st_ == lib.CDP_EINVAL and bad[0] == 0


def test_damage_after_the_point_is_named_where_it_lies(journal_dirs: tuple[Path, Path]) -> None:
    """The records after a rollback's point are checked on the validator's
    thread through a mapping that starts at the page of the first of them
    (not at the segment's start): damage there stops the rollback before
    the root is touched, named by its offset in the segment."""
    from cdpcore.format import REC_HDR

    jpath, root = journal_dirs
    with Journal.create(jpath, root, segment_size=1 << 16) as j:
        for i in range(8):
            j.append_write("db", i * 3000, bytes([65 + i]) * 3000)  # 24 KB into the segment: pos > a page
        point = j.append_flush()
        for i in range(30):  # into a second segment: the first is sealed (open scans only the last)
            j.append_write("db", (i % 8) * 3000, bytes([97 + i]) * 3000)
        j.sync()
        make_live(j)
    seg = min((jpath / "segments").glob("*.seg"))
    raw = bytearray(seg.read_bytes())
    off, victim = 64, None
    while off + 48 <= len(raw):
        _crc, n, seq, *_rest = REC_HDR.unpack_from(raw, off)
        if seq == point + 3:
            victim = off
            break
        off += (48 + n + 7) & ~7
    assert victim is not None and victim > 8192
    raw[victim + 48 + 5] ^= 0xFF
    seg.write_bytes(bytes(raw))
    _damage_stops_rollback(jpath, root, point, seg, victim)


def _damage_stops_rollback(jpath: Path, root: Path, point: int, seg: Path, off: int) -> None:
    """The rollback to point stops on the damaged record at off in seg,
    named by its segment and offset, before the root (file db) is touched."""
    from cdpcore.errors import CorruptJournal

    before = (root / "db").read_bytes()
    with Journal.open(jpath) as j:
        with pytest.raises(CorruptJournal) as err:
            rollback(j, f"seq:{point}")
    assert (err.value.segment, err.value.offset) == (int(seg.stem, 16), off)
    assert (root / "db").read_bytes() == before and not (jpath / INTENT).exists()


@pytest.mark.parametrize("damage,limit", [(False, None), (True, None), (False, 1), (True, 1)])
def test_records_gathered_in_parts(journal_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                   damage: bool, limit: int | None) -> None:
    """plan.gather_records reads the records a rollback puts back in parts,
    each on a thread into a buffer of its own: the rollback puts back the
    point's bytes from every part, and damage to a record that a later part
    reads stops it before the root is touched, named by its segment and
    offset (not by its place in that part's buffer). Past GATHER_MAX
    (limit 1), the records are read through the segments' mappings
    instead, with the same result."""
    from cdpcore import plan
    from cdpcore.format import REC_HDR

    monkeypatch.setattr(plan, "GATHER_SPLIT", 1)  # parts even for a few pieces
    monkeypatch.setattr(plan, "GATHER_PARTS", 3)
    if limit is not None:
        monkeypatch.setattr(plan, "GATHER_MAX", limit)
    gathered: list[object] = []
    gather = plan.gather_records
    monkeypatch.setattr(plan, "gather_records", lambda p: gathered.append(gather(p)) or gathered[-1])
    jpath, root = journal_dirs
    rnd = random.Random(7)
    with Journal.create(jpath, root, segment_size=1 << 15) as j:
        for i in reversed(range(40)):  # the point's pages, over several segments (the last first)
            j.append_write("db", i * 1000, bytes([i]) * 1000)
        point = j.append_flush()
        for i in rnd.sample(range(39), 24) + [39]:  # the damage to undo
            j.append_write("db", i * 1000 + 10, rnd.randbytes(500))
        j.sync()
        make_live(j)
    want = b"".join(bytes([i]) * 1000 for i in range(40))
    if not damage:
        with Journal.open(jpath) as j:
            res = rollback(j, f"seq:{point}")
        assert (root / "db").read_bytes() == want and res.bytes_written == 25 * 500
        assert (gathered[0] is None) == (limit is not None)  # read into buffers, or mapped
        return
    # damage the record of page 39: the last piece, read by the last part,
    # in the first segment (a sealed one: opening the journal scans the last)
    segs = sorted((jpath / "segments").glob("*.seg"))
    victim = None
    for seg in segs:
        raw = bytearray(seg.read_bytes())
        off = 64
        while off + 48 <= len(raw):
            _crc, n, seq, *_rest = REC_HDR.unpack_from(raw, off)
            if n == 1000 and raw[off + 48 : off + 48 + n] == bytes([39]) * 1000:
                victim = (seg, off)
            off += (48 + n + 7) & ~7
    assert victim is not None and victim[0] == segs[0]
    seg, off = victim
    raw = bytearray(seg.read_bytes())
    raw[off + 48 + 20] ^= 0xFF
    seg.write_bytes(bytes(raw))
    _damage_stops_rollback(jpath, root, point, seg, off)

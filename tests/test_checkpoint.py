"""Checkpoints (checkpoint.py): a plan saved at the end of a sealed segment,
that restore and rollback start from instead of the journal's first record.

A checkpoint is only an optimisation, so every test here compares against
what the journal says without one: the reference replay, a restore with
checkpoints turned off, or the model. Damage to a checkpoint must never
change a result (it is ignored, reported by verify and replaced), and
damage to the records a checkpoint's pieces name must fail the restore.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest
from conftest import scratch
from hypothesis import given, note
from hypothesis import strategies as st
from test_cli import assert_error, cli
from test_restore_basic import Runner, Tree, make_root
from test_restore_plan import big_op, same_restore, tree_of

from cdpcore import CorruptJournal, Journal, Kind, checkpoint, restore
from cdpcore.format import REC_HDR
from cdpcore.plan import build_plan
from cdpcore.rollback import rollback


@given(seed=st.integers(0, 2**32), n_ops=st.integers(1, 60), with_base=st.booleans(),
       seg_size=st.sampled_from([4096, 16384]), spacing=st.sampled_from([0, 8192, 1 << 30]))
def test_plans_from_checkpoints_match_replay(seed: int, n_ops: int, with_base: bool, seg_size: int,
                                             spacing: int) -> None:
    """Random journals (overlapping writes, holes, truncates, renames, hard
    links, bases in the middle), checkpoints at every or some sealed
    segments, restored at random points: equal to the replay, which never
    looks at a checkpoint."""
    rnd = random.Random(seed)
    with scratch() as d:
        tmp = Path(d)
        root = tmp / "root"
        root.mkdir()
        tree = make_root(root) if with_base else Tree()
        with Journal.create(tmp / "j", root, segment_size=seg_size) as j:
            run = Runner(j, tree, time.time_ns() // 1000 + 10**12)
            for i in range(n_ops):
                run.op(rnd) if rnd.random() < 0.6 else big_op(run, rnd)
                if i == n_ops // 3:
                    checkpoint.update(j, spacing)  # some checkpoints, then more records and a base
                if with_base and i == n_ops // 2 and rnd.random() < 0.3:
                    restore(j, tmp / "mid", at="latest")
                    shutil.rmtree(root)
                    shutil.copytree(tmp / "mid", root, symlinks=True)
                    j.take_base()
            made = checkpoint.update(j, spacing)
            note(f"{j.last_seq} records, checkpoints at {made.kept}")
            picks = [s for s, _, _ in rnd.sample(run.points, min(3, len(run.points)))] if run.points else []
            for k, seq in enumerate(picks + made.kept[-2:] + [j.last_seq]):
                same_restore(j, tmp, f"seq:{seq}", f"s{k}")


def build(jpath: Path, root: Path, n: int = 200, seg: int = 1 << 15) -> Journal:
    """A database-like file rewritten in place, across many small segments."""
    j = Journal.create(jpath, root, segment_size=seg)
    rnd = random.Random(7)
    for i in range(n):
        j.append_write("db", rnd.randrange(64) * 512, rnd.randbytes(512))
        if i % 10 == 9:
            j.append_flush()
    j.append_write("log", 0, b"tail")
    j.sync()
    return j


def restored(j: Journal, dest: Path, at: str = "latest") -> dict[str, bytes]:
    restore(j, dest, at=at)
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def test_restore_and_rollback_use_them(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    with build(jpath, root) as j:
        want = {at: restored(j, jpath.parent / f"before-{i}", at) for i, at in
                enumerate(["latest", "seq:150", "seq:30"])}
        res = checkpoint.update(j, spacing=0)
        assert res.created and res.created == res.kept
        assert all(s == i.last_seq for s, i in zip(res.kept, j._segs[:-1], strict=False))
        # a plan from a checkpoint reads only the records after it
        ck = checkpoint.best(j, j.last_seq)
        assert ck is not None and ck.seq == res.kept[-1]
        for i, at in enumerate(want):
            assert restored(j, jpath.parent / f"after-{i}", at) == want[at]
        # live root = latest; roll back and forward from checkpoints
        shutil.rmtree(root)
        restore(j, root)
        last = j.last_seq
        rollback(j, "seq:150")
        assert {p.name: p.read_bytes() for p in root.iterdir()} == want["seq:150"]
        rollback(j, f"seq:{last}")
        assert {p.name: p.read_bytes() for p in root.iterdir()} == want["latest"]


def test_damaged_checkpoint_is_ignored_reported_and_replaced(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    with build(jpath, root) as j:
        want = restored(j, jpath.parent / "want")
        made = checkpoint.update(j, spacing=0).kept
        path = jpath / checkpoint.DIR / checkpoint.name_of(made[-1])
        good = path.read_bytes()
        rnd = random.Random(3)
        for off in sorted(rnd.sample(range(len(good)), 40)) + [0, 59, 63, 64, len(good) - 1]:
            bad = bytearray(good)
            bad[off] ^= 0x10
            path.write_bytes(bytes(bad))
            with pytest.raises(checkpoint.Invalid):
                checkpoint.load(j, made[-1])
            assert restored(j, jpath.parent / f"r{off}") == want, off
        path.write_bytes(good[: len(good) // 2])  # cut short
        assert restored(j, jpath.parent / "short") == want
        report = j.verify()
        assert report.ok  # a cache: a warning, not damage
        assert any("checkpoint at seq" in p.message for p in report.problems)
        res = checkpoint.update(j, spacing=0)
        assert made[-1] in res.created and [s for s, _ in res.removed] == [made[-1]]
        checkpoint.load(j, made[-1])
        # another journal's checkpoint under the right name is refused
        other_root = jpath.parent / "other-root"
        other_root.mkdir()
        with build(jpath.parent / "other", other_root) as o:
            checkpoint.update(o, spacing=0)
            shutil.copy(jpath.parent / "other" / checkpoint.DIR / checkpoint.name_of(made[-1]), path)
        with pytest.raises(checkpoint.Invalid, match="another journal"):
            checkpoint.load(j, made[-1])
        assert restored(j, jpath.parent / "foreign") == want


def test_damage_under_a_checkpoint(journal_dirs: tuple[Path, Path]) -> None:
    """A record before the checkpoint whose bytes the restore copies is
    checked (and damage fails the restore, DEST left empty); one whose
    bytes were all overwritten since is not read at all (verify finds it)."""
    jpath, root = journal_dirs
    with Journal.create(jpath, root, segment_size=1 << 14) as j:
        j.append_write("kept", 0, b"k" * 3000)  # seq 1: still visible at the end
        j.append_write("gone", 0, b"g" * 3000)  # seq 2: overwritten by seq 3
        j.append_write("gone", 0, b"G" * 3000)
        for i in range(30):
            j.append_write("other", 0, bytes([i]) * 3000)
        j.sync()
        assert checkpoint.update(j, spacing=0).kept
    seg = sorted((jpath / "segments").glob("*.seg"))[0]
    raw = bytearray(seg.read_bytes())
    writes, off = [], 64
    while len(writes) < 2:  # the first two WRITEs (FILEMAPs bind the names before them)
        n, kind = REC_HDR.unpack_from(raw, off)[1], REC_HDR.unpack_from(raw, off)[6]
        if kind == Kind.WRITE:
            writes.append(off)
        off += (48 + n + 7) & ~7
    first, second = writes
    raw[second + 48 + 5] ^= 0xFF  # the first write of "gone": no longer part of any file
    seg.write_bytes(bytes(raw))
    with Journal.open(jpath, readonly=True) as j:
        got = restored(j, jpath.parent / "ok")
        assert got["gone"] == b"G" * 3000 and got["kept"] == b"k" * 3000
        assert not j.verify().ok
    raw[first + 48 + 5] ^= 0xFF  # the write of "kept": copied by the restore
    seg.write_bytes(bytes(raw))
    dest = jpath.parent / "bad"
    dest.mkdir()
    with Journal.open(jpath, readonly=True) as j:
        with pytest.raises(CorruptJournal, match="damaged"):
            restore(j, dest)
    assert os.listdir(dest) == []


def test_checkpoints_are_thinned_as_the_journal_grows(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    with build(jpath, root, n=400, seg=1 << 13) as j:
        first = checkpoint.update(j, spacing=1 << 16)
        sealed = [i.last_seq for i in j._segs[:-1] if i.count]
        assert set(sealed[-checkpoint.DENSE:]) <= set(first.kept)
        assert len(first.kept) < len(sealed)  # older ones thinned to the spacing
        for i in range(200):
            j.append_write("db", (i % 64) * 512, bytes(512))
        j.sync()
        second = checkpoint.update(j, spacing=1 << 16)
        sealed = [i.last_seq for i in j._segs[:-1] if i.count]
        assert set(sealed[-checkpoint.DENSE:]) <= set(second.kept)
        assert any(r == "thinned" for _, r in second.removed)
        with build_plan(j, j.last_seq) as a, build_plan(j, j.last_seq, use_checkpoints=False) as b:
            assert a.sizes.tolist()[: len(b.sizes)] == b.sizes.tolist()
            assert all(a.read(n, 0, 40000) == b.read(n, 0, 40000)
                       for n in a.tree.nodes.values() if hasattr(n, "key"))


def test_checkpoint_cli(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    build(jpath, root).close()
    r = cli("checkpoint", jpath, "--spacing", "0", "--json")
    assert r.code == 0, r.err
    doc = r.doc
    assert doc["created"] and doc["kept"] == doc["created"] and doc["bytes"] > 0
    r = cli("checkpoint", jpath)
    assert r.code == 0 and "created 0 checkpoints" in r.out
    assert_error(("checkpoint", jpath, "--spacing", "lots"), 2, "UsageError", "byte count")
    assert_error(("checkpoint", jpath.parent / "nope"), 3, "JournalNotFound", "no such journal")
    t0 = time.time_ns() // 1000
    r = cli("restore", jpath, jpath.parent / "r", "--json")
    assert r.code == 0, r.err
    with Journal.open(jpath, readonly=True) as j:
        restore(j, jpath.parent / "ref", method="replay")
    assert tree_of(jpath.parent / "r", t0) == tree_of(jpath.parent / "ref", t0)


def test_prune_discards_checkpoints(fast_tmp: Path) -> None:
    """A checkpoint inside pruned history would be continued over the
    compacted records that replaced the ones after it: prune removes them
    all (in the step that swaps segments), and every kept point restores as
    before; new checkpoints after the prune start from the compacted
    segments."""
    from test_prune import NOW, POLICY, build, state

    from cdpcore.retention import prune

    root = fast_tmp / "root"
    root.mkdir()
    with build(fast_tmp / "j", root) as j:
        checkpoint.update(j, spacing=0)
        assert checkpoint.seqs(j)
        dry = prune(j, POLICY, now=NOW, dry_run=True)
        before = {k: state(j, f"seq:{k}", fast_tmp / f"a{k}") for k in dry.kept[-3:]}
        latest = state(j, "latest", fast_tmp / "latest-a")
        prune(j, POLICY, now=NOW)
        assert checkpoint.seqs(j) == []
        made = checkpoint.update(j, spacing=0)
        assert made.kept
        for k, want in before.items():
            assert state(j, f"seq:{k}", fast_tmp / f"b{k}") == want
        assert state(j, "latest", fast_tmp / "latest-b") == latest
        assert j.verify().ok


def test_prefetched_sources_are_the_files_and_errors_surface_at_use(tmp_path: Path) -> None:
    """Sources.prefetch maps on a thread while a restore lays out its plan
    from a checkpoint: what view() then returns must be each file's bytes
    (not another index's mapping), a source that could not be mapped must
    fail where it is used, with the OS's error, and close() must not race
    the thread."""
    from cdpcore.plan import Sources

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.seg"
        p.write_bytes(bytes([i]) * (4096 * (i + 1)))
        paths.append(str(p))
    src = Sources()
    idx = [src.add(p) for p in paths]
    gone = src.add(str(tmp_path / "missing.seg"))
    src.prefetch([*idx[1:], gone])
    late = src.add(str(tmp_path / "0.seg"))  # added while the thread runs: already known
    assert late == idx[0]
    for i in idx:
        assert bytes(src.view(i)) == bytes([i]) * (4096 * (i + 1))
    with pytest.raises(FileNotFoundError):
        src.view(gone)
    src.close()
    again = Sources()
    for p in paths:
        again.add(p)
    again.prefetch(range(len(paths)))
    again.close()  # with the thread perhaps still mapping: it is joined, its maps closed
    assert again._fetched == {} and again._prefetch is None


def test_rollback_refuses_to_put_back_damaged_bytes(journal_dirs: tuple[Path, Path]) -> None:
    """A rollback checks the records whose bytes it puts back (those before
    the checkpoint too, on the calling thread): damage there fails it
    before the root is touched, with nothing journaled and no intent left."""
    jpath, root = journal_dirs
    with Journal.create(jpath, root, segment_size=1 << 14) as j:
        j.append_write("db", 0, b"A" * 3000)  # what the rollback must put back
        for i in range(30):
            j.append_write("other", 0, bytes([i]) * 3000)  # seals segments
        j.sync()
        assert checkpoint.update(j, spacing=0).kept
        point = j.last_seq
        j.append_write("db", 0, b"B" * 3000)  # the damage to undo
        j.sync()
        shutil.rmtree(root)
        restore(j, root)
        last = j.last_seq
    seg = min((jpath / "segments").glob("*.seg"))
    raw = bytearray(seg.read_bytes())
    off = 64
    while REC_HDR.unpack_from(raw, off)[6] != Kind.WRITE:  # the FILEMAP that binds "db" comes first
        off += (48 + REC_HDR.unpack_from(raw, off)[1] + 7) & ~7
    raw[off + 48 + 7] ^= 0xFF
    seg.write_bytes(bytes(raw))
    with Journal.open(jpath) as j:
        with pytest.raises(CorruptJournal, match="damaged") as err:
            rollback(j, f"seq:{point}")
        # named where it lies in the journal, not in the buffer the
        # rollback read the records into (plan.gather_records)
        assert (err.value.segment, err.value.offset) == (int(seg.stem, 16), off)
        assert j.last_seq == last + 1  # only the audit log's anchor of the failure
    assert (root / "db").read_bytes() == b"B" * 3000
    assert not (jpath / "rollback.json").exists()

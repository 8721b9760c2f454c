"""The planned restore (each byte written once) against the reference replay.

Both methods restore the same random journals at the same random points and
must produce the same trees, byte for byte, with the same hard-link groups,
modes and mtimes. The journals mix the namespace operations of
test_restore_basic's model with large, overlapping, unaligned writes and
truncates that grow files past holes, so that the extent layout in C
(native/extent.c) is exercised where it can go wrong.
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
from test_restore_basic import Runner, Tree, make_root, read_tree

from cdpcore import CorruptJournal, Journal, PointError, restore
from cdpcore.format import REC_HDR


def big_op(run: Runner, rnd: random.Random) -> None:
    """Writes and truncates that overlap at odd offsets, leave holes, and
    cross 64 KiB boundaries, on a few files (alongside the model)."""
    t = run.t
    files = sorted(t.files)
    if not files or rnd.random() < 0.2:
        return
    p = rnd.choice(files)
    ino = t.files[p]
    ts = run.tick(rnd)
    if rnd.random() < 0.75:
        off = rnd.choice([0, 1, 4095, 4096, 65535, 200_000, 1 << 20]) + rnd.randrange(0, 9000)
        data = random.Random(ts ^ off).randbytes(rnd.choice([1, 4096, 10_000, 70_000]))
        run.j.append_write(p, off, data, ts=ts)
        if len(ino.data) < off:
            ino.data.extend(bytes(off - len(ino.data)))
        ino.data[off : off + len(data)] = data
    else:
        n = rnd.choice([0, 1, 5000, 300_000, 2 << 20])
        run.j.append_truncate(p, n, ts=ts)
        del ino.data[n:]
        ino.data.extend(bytes(n - len(ino.data)))
    ino.mtime = ts
    run.points.append((run.j.last_seq, ts, t.snapshot()))


def tree_of(dest: Path, since_us: int) -> dict[str, tuple]:
    """read_tree, without the mtimes the journal never set (directories it
    did not stamp, files bound by FILEMAP and never written: they get the
    time the restore made them, which differs between any two restores).
    The journals' clocks run far from now, so a journaled mtime is never
    in [since_us, now]. (File systems stamp with a coarse clock that may lag
    the precise one by a tick: hence the slack.)"""
    now = time.time_ns() // 1000
    since_us -= 50_000
    tree = read_tree(dest)
    # a hard-link group is named by its smallest name, not by the one that
    # os.walk met first (directory order differs between two trees)
    smallest: dict[str, str] = {}
    for p, v in tree.items():
        if v[0] == "f":
            smallest[v[4]] = min(smallest.get(v[4], p), p)
    out = {}
    for p, v in tree.items():
        at = {"d": 2, "f": 3}.get(v[0])
        if at is not None and since_us <= v[at] <= now:
            v = v[:at] + (None,) + v[at + 1:]
        if v[0] == "f":
            v = v[:4] + (smallest[v[4]],)
        out[p] = v
    return out


def same_restore(j: Journal, tmp: Path, at: object, tag: str) -> None:
    try:
        want_seq = j.resolve(at)
    except PointError:
        for method in ("plan", "replay"):  # a time before the first record
            with pytest.raises(PointError):
                restore(j, tmp / f"{method}-{tag}", at=at, method=method)  # type: ignore[arg-type]
        return
    t0 = time.time_ns() // 1000
    fast = restore(j, tmp / f"plan-{tag}", at=at)
    ref = restore(j, tmp / f"replay-{tag}", at=at, method="replay")
    assert fast.seq == want_seq
    assert tree_of(tmp / f"plan-{tag}", t0) == tree_of(tmp / f"replay-{tag}", t0)
    for name in ("seq", "ts", "files", "dirs", "records", "dirty"):
        assert getattr(fast, name) == getattr(ref, name), name


@given(seed=st.integers(0, 2**32), n_ops=st.integers(1, 60), with_base=st.booleans(),
       seg_size=st.sampled_from([4096, 65536, 1 << 20]))
def test_plan_matches_replay(seed: int, n_ops: int, with_base: bool, seg_size: int) -> None:
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
                if with_base and i == n_ops // 2 and rnd.random() < 0.3:
                    # a second base in the middle replaces everything before it
                    restore(j, tmp / "mid", at="latest")
                    shutil.rmtree(root)
                    shutil.copytree(tmp / "mid", root, symlinks=True)
                    j.take_base()
            note(f"{j.last_seq} records")
            picks = [s for s, _, _ in rnd.sample(run.points, min(3, len(run.points)))] if run.points else []
            for k, seq in enumerate(picks + [j.last_seq]):
                same_restore(j, tmp, f"seq:{seq}", f"s{k}")
            if run.points:
                _s, ts, _ = rnd.choice(run.points)
                same_restore(j, tmp, ts + rnd.choice([-1, 0, 1]), "t")


def test_holes_stay_sparse(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_write("sparse", 64 << 20, b"end")  # 64 MiB hole, then 3 bytes
        j.append_write("grown", 0, b"x" * 8192)
        j.append_truncate("grown", 100)
        j.append_truncate("grown", 32 << 20)  # cut, then grown: a hole, not old bytes
        restore(j, jpath.parent / "r")
    r = jpath.parent / "r"
    for name, size in (("sparse", (64 << 20) + 3), ("grown", 32 << 20)):
        st_ = os.stat(r / name)
        assert st_.st_size == size
        assert st_.st_blocks * 512 <= 64 * 1024, f"{name} is not sparse"
    with open(r / "grown", "rb") as f:
        assert f.read(100) == b"x" * 100 and f.read(8192) == bytes(8192)


def test_consistent_picks_the_last_global_flush(journal_dirs: tuple[Path, Path]) -> None:
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_write("db", 0, b"one")
        with pytest.raises(PointError, match="no consistent point"):
            restore(j, jpath.parent / "none", at="latest", consistent=True)
        assert not (jpath.parent / "none").exists()
        flush = j.append_flush()
        j.append_write("db", 0, b"two")
        j.append_flush("db")  # a flush of one file is not a point of the tree
        j.append_write("db", 0, b"six")
        res = restore(j, jpath.parent / "c", at="latest", consistent=True)
        assert res.seq == flush and (jpath.parent / "c" / "db").read_bytes() == b"one"
        # at or before: a global flush that is the point itself counts
        assert restore(j, jpath.parent / "c2", at=f"seq:{flush}", consistent=True).seq == flush


def test_damaged_payload_fails_and_leaves_dest_empty(journal_dirs: tuple[Path, Path]) -> None:
    """The checksums are checked beside the copy (plan.Validator): damage in
    a payload that the result would not even contain still fails the
    restore, and DEST is left as it was found."""
    jpath, root = journal_dirs
    with Journal.create(jpath, root, segment_size=1 << 16) as j:
        for i in range(40):
            j.append_write("f", 0, bytes([i]) * 4000)
        last = j.last_seq
        j.sync()
    seg = sorted((jpath / "segments").glob("*.seg"))[0]
    raw = bytearray(seg.read_bytes())
    off = 64
    size = REC_HDR.unpack_from(raw, off)[1]
    off += (48 + size + 7) & ~7  # the second record: a WRITE later overwritten
    raw[off + 48 + 10] ^= 0xFF
    seg.write_bytes(bytes(raw))
    dest = jpath.parent / "dest"
    dest.mkdir()
    with Journal.open(jpath, readonly=True) as j:
        with pytest.raises(CorruptJournal, match="checksum"):
            restore(j, dest, at=f"seq:{last}")
    assert os.listdir(dest) == []


@pytest.mark.parametrize("scale", [1, 10])
def test_cover_merges_long_sorted_runs_as_a_sort_would(scale: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """cdp_cover merges long runs of rows already in (key, start) order (a
    checkpoint's pieces, thousands of them) with the other rows instead of
    sorting them all again. Whatever the mix (overlaps, equal starts in
    and across runs, empty rows, truncates, two runs), the pieces must be
    those of laying the rows over each other in row order: checked byte by
    byte against painting them. (The journals of the other tests are too
    small to have such runs.) At scale 10 (70,000 rows) cdp_cover's scratch
    memory is large enough to be mapped with huge pages rather than
    malloc'd, and the rows' and pieces' columns are asked for huge pages
    too (the threshold lowered: the real one is 262,144 rows)."""
    from cdpcore import plan as plan_mod
    from cdpcore.plan import HOLE, Plan, Sources, Tree, _cover, _Rows

    if scale > 1:
        monkeypatch.setattr(plan_mod, "HUGE_ROWS", 1)
    rnd = random.Random(11 * scale)
    rows: list[tuple[int, int, int, int, int]] = []

    def sorted_run(keys: tuple[int, ...], count: int) -> None:
        for k in keys:
            pos = 0
            for _ in range(count):
                n = rnd.randrange(0, 40)  # some empty
                rows.append((k, pos, pos + n, 0, rnd.randrange(1 << 20)))
                pos += rnd.randrange(0, 40)  # overlapping, sometimes the same start

    sorted_run((1, 2), 2500 * scale)
    for _ in range(700 * scale):
        k, a = rnd.choice((1, 2, 3)), rnd.randrange(0, 60_000 * scale)
        if rnd.random() < 0.08:
            rows.append((k, a, HOLE, HOLE, 0))  # a truncate
        else:
            rows.append((k, a, a + rnd.randrange(0, 3000), 1, rnd.randrange(1 << 20)))
    sorted_run((3,), 4500 * scale)
    writes = [i for i, r in enumerate(rows) if r[3] != HOLE]  # (a truncate's end + 7 is no offset)
    rows += [(rows[i][0], rows[i][1], rows[i][2] + 7, 1, 5) for i in rnd.sample(writes, 50 * scale)]

    # the reference: paint each key's bytes in row order; a cell is file << 32 | source offset
    cells: dict[int, list[int | None]] = {}
    sizes: dict[int, int] = {}
    for k, a, b, f, src in rows:
        c = cells.setdefault(k, [])
        if f == HOLE:
            del c[a:]
            sizes[k] = a
            continue
        if b > len(c):
            c.extend([None] * (b - len(c)))
        c[a:b] = range((f << 32) | src, ((f << 32) | src) + b - a)
        sizes[k] = max(sizes.get(k, 0), b)
    want = {(k, x): v for k, c in cells.items() for x, v in enumerate(c[: sizes[k]]) if v is not None}

    r = _Rows(len(rows))
    for i, (k, a, b, f, src) in enumerate(rows):
        r.add(k, a, b, f, src, i + 1, i + 1, 0)
    plan = Plan(len(rows), None, Tree(), Sources())
    plan.tree.next_key = 3
    try:
        _cover(plan, r)
    finally:
        r.close()
    got = {}
    for k, a, n, f, src, _rec in zip(*plan.pieces, strict=True):
        for x in range(n):
            got[(k, a + x)] = (f << 32) | (src + x)
    assert got == want
    assert [plan.sizes[k] for k in (1, 2, 3)] == [sizes[k] for k in (1, 2, 3)]


def _present(addr: int, pages: range) -> list[bool]:
    """Whether each page of this process at addr + i pages has a page table
    entry (bit 63 of /proc/self/pagemap)."""
    import mmap

    out = []
    with open("/proc/self/pagemap", "rb") as f:
        for i in pages:
            f.seek((addr // mmap.PAGESIZE + i) * 8)
            out.append(bool(int.from_bytes(f.read(8), "little") >> 63))
    return out


def test_populate_read_fills_page_tables_and_reports_bad_ranges(tmp_path: Path) -> None:
    """cdp_populate_read (a restore's mapping thread): the pages of the
    range are mapped when it returns (the kernel may map neighbours too:
    fault-around, and the whole of a large page-cache folio, up to 2 MiB,
    which it did on CI's clean run), an unaligned start is rounded down,
    pages more than 2 MiB from it are not touched; length 0 does nothing
    (even at NULL); a range that is not mapped is CDP_EIO with errno
    ENOMEM; and plan._populate, which treats it as advice, never raises."""
    import errno
    import mmap

    from cdpcore._native import ffi, lib
    from cdpcore.plan import _populate

    page = mmap.PAGESIZE
    path = tmp_path / "seg"
    n = 2048  # 8 MiB: pages 3 MiB from the range are in other folios
    path.write_bytes(os.urandom(n * page))
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    buf = ffi.from_buffer(m)
    addr = int(ffi.cast("uintptr_t", buf))
    try:
        assert not any(_present(addr, range(n)))
        # from the middle of page 1027 into page 1029
        assert lib.cdp_populate_read(buf + 1027 * page + 100, 2 * page) == lib.CDP_OK
        assert all(_present(addr, range(1027, 1030)))
        assert not any(_present(addr, range(0, 256))) and not any(_present(addr, range(1800, n)))
        assert lib.cdp_populate_read(buf + 10 * page, 0) == lib.CDP_OK
        assert lib.cdp_populate_read(ffi.NULL, 0) == lib.CDP_OK
        assert not any(_present(addr, range(0, 256)))
    finally:
        ffi.release(buf)
    # a range where nothing is mapped any more
    gone = mmap.mmap(-1, 4 * page)
    gone_buf = ffi.from_buffer(gone)
    gone_addr = int(ffi.cast("uintptr_t", gone_buf))
    ffi.release(gone_buf)
    gone.close()
    assert lib.cdp_populate_read(ffi.cast("uint8_t *", gone_addr), 4 * page) == lib.CDP_EIO
    assert ffi.errno == errno.ENOMEM
    _populate(m)
    assert all(_present(addr, range(n)))
    assert bytes(m) == path.read_bytes()
    m.close()

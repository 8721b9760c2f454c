"""Integrity: damage anywhere in a journal is detected, reported with where it
is, and never returned as data; a torn tail is cut on the next writable open.

The fixture journal is small (three segments, a handful of records, index
files for the sealed segments) so that every byte of every file can be
damaged in turn.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
from conftest import THOROUGH, scale, scratch

from cdpcore import (
    CdpError,
    CorruptJournal,
    Journal,
    JournalNotFound,
    Kind,
    NotAJournal,
    UnsupportedVersion,
)
from cdpcore._native import crc32c
from cdpcore.format import HEAD, REC_HDR, SEG_HDR, encode_record

T0 = 1_700_000_000_000_000
SEG = 4096


def build(path: Path, synced: bool = True) -> None:
    root = path.parent / (path.name + "-root")
    root.mkdir()
    with Journal.create(path, root, segment_size=SEG) as j:
        t = T0
        for i in range(6):  # segment 1: small records of every shape
            j.append_write("f", i * 10, bytes([i]) * (i * 3), ts=t + i)
        j.append_create("d/g", ts=t + 10)
        j.bookmark("before", ts=t + 11)
        j.append_write("d/g", 0, b"G" * 3900, ts=t + 12)  # rotates: segment 2
        with j.batch() as b:
            b.append_rename("d/g", "d/h", ts=t + 13)
            b.append_flush(ts=t + 14)
            b.append_setattr("d/h", mode=0o600, mtime_us=t, ts=t + 9)  # ts steps back
        j.append_write("f", 0, b"z" * 3000, ts=t + 20)  # rotates: segment 3
        j.append_truncate("f", 7, ts=t + 21)
        j.append_write("f", 3, b"tail", ts=t + 22)
        j.append_dirty("f", 0, 0, "mmap", ts=t + 23)
        j.append_write("e", 1, b"", ts=t + 24)
        if synced:
            j.sync()
    with Journal.open(path):  # writes the index files of the sealed segments
        pass
    shutil.rmtree(root)


def segs(path: Path) -> list[Path]:
    return sorted((path / "segments").glob("*.seg"))


def rec_tuples(j: Journal):
    """(seq, ts, kind, file_id, offset, data, flags) of every record read
    before reading stops; with the error that stopped it (or None)."""
    got = []
    try:
        for r in j.records():
            got.append((r.seq, r.ts, int(r.kind), r.file_id, r.offset, r.data, r.flags))
    except (CorruptJournal, NotAJournal) as e:
        return got, e
    return got, None


@pytest.fixture(scope="module")
def pristine():
    with scratch() as tmp:
        path = Path(tmp, "j")
        build(path)
        assert len(segs(path)) == 3
        assert len(list((path / "segments").glob("*.idx"))) == 2
        with Journal.open(path, readonly=True) as j:
            orig, err = rec_tuples(j)
            assert err is None and j.verify().ok
        files = sorted(p for p in path.rglob("*") if p.is_file())
        yield path, orig, files


def check_damaged(path: Path, orig, what: str) -> None:
    """The contract for one damaged journal: detected, and never altered data."""
    try:
        j = Journal.open(path, readonly=True)
    except CdpError:
        return  # refused with a clear error: fine
    with j:
        rep = j.verify()
        assert not rep.ok, f"{what}: verify() did not notice"
        got, _err = rec_tuples(j)
        assert got == orig[: len(got)], f"{what}: records differ from the originals"


def positions(size: int, name: str) -> range | list[int]:
    if THOROUGH or size <= 1024:
        return range(size)
    # fast profile: the first 128 bytes (headers, the head's live part) and
    # every fourth byte after; thorough covers every byte
    return sorted(set(range(min(size, 128))) | set(range(0, size, 4)))


def test_every_byte_flipped(pristine):
    path, orig, files = pristine
    rnd = random.Random(1)
    n = 0
    for f in files:
        data = f.read_bytes()
        rel = f.relative_to(path)
        with open(f, "r+b") as fh:
            for pos in positions(len(data), f.name):
                flips = [0xFF]
                if pos % 5 == 0 or THOROUGH:
                    flips.append(1 << rnd.randrange(8))
                for x in flips:
                    fh.seek(pos)
                    fh.write(bytes([data[pos] ^ x]))
                    fh.flush()
                    try:
                        check_damaged(path, orig, f"{rel} byte {pos} ^ {x:#x}")
                    finally:
                        fh.seek(pos)
                        fh.write(data[pos : pos + 1])
                        fh.flush()
                    n += 1
    assert n > scale(4000, 20000)


@pytest.fixture(scope="module")
def pristine_pruned():
    """A journal of four segments whose first three a prune replaced by
    COMPACTED segments (seq gaps, KEPT flags, net WRITEs)."""
    from cdpcore.retention import Policy, prune

    hour = 3600 * 10**6
    with scratch() as tmp:
        path = Path(tmp, "j")
        root = Path(tmp, "root")
        root.mkdir()
        with Journal.create(path, root, segment_size=SEG) as j:
            for i in range(12):
                t = T0 + i * hour
                j.append_write("db", i % 3 * 512, bytes([i]) * 600, ts=t + 1)
                j.append_write("db", i % 3 * 512 + 50, bytes([i + 50]) * 600, ts=t + 2)
                if i == 5:
                    j.append_rename("db", "db2", ts=t + 3)
                    j.append_link("db2", "db", ts=t + 4)
                j.append_flush(ts=t + 5)
            j.append_write("db", 0, b"live", ts=T0 + 13 * hour)
            res = prune(j, Policy.parse("2h", keep_hourly="1d"), now=T0 + 14 * hour)
            assert len(res.kept) >= 3 and res.segments_written
        with Journal.open(path, readonly=True) as j:
            orig, err = rec_tuples(j)
            assert err is None and j.verify().ok and j.compacted_points() == res.kept
        compacted = [path / "segments" / f"{n:016x}.{ext}" for n in res.segments_written for ext in ("seg", "idx")]
        yield path, orig, [f for f in compacted if f.exists()]


def test_every_byte_of_a_pruned_segment_flipped(pristine_pruned):
    """The same contract for COMPACTED segments: a flip anywhere (a record's
    seq into a gap or across its neighbour, the KEPT flag, the header's
    first seq or flags) is detected and never read as data."""
    path, orig, files = pristine_pruned
    assert any(f.suffix == ".seg" for f in files)
    n = 0
    for f in files:
        data = f.read_bytes()
        rel = f.relative_to(path)
        with open(f, "r+b") as fh:
            for pos in positions(len(data), f.name):
                for x in (0xFF, 1 << (pos % 8)):
                    fh.seek(pos)
                    fh.write(bytes([data[pos] ^ x]))
                    fh.flush()
                    try:
                        check_damaged(path, orig, f"{rel} byte {pos} ^ {x:#x}")
                    finally:
                        fh.seek(pos)
                        fh.write(data[pos : pos + 1])
                        fh.flush()
                    n += 1
    assert n > 1000


def test_rw_open_of_damaged_journal_never_alters_data(pristine):
    """Opening for writing repairs only caches (head, index files) and torn
    tails; damage inside records makes it refuse."""
    path, orig, files = pristine
    # audit.log (written by the bookmark) is not a cache: a flip there is
    # damage that verify reports with the records intact (tests/test_audit.py)
    files = [f for f in files if f.name != "audit.log"]
    rnd = random.Random(2)
    with scratch() as tmp:
        for _ in range(scale(40, 400)):
            work = Path(tmp, "w")
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(path, work)
            f = work / rnd.choice(files).relative_to(path)
            data = bytearray(f.read_bytes())
            pos = rnd.randrange(len(data))
            data[pos] ^= 1 << rnd.randrange(8)
            f.write_bytes(data)
            try:
                j = Journal.open(work)
            except CdpError:
                continue
            with j:
                got, err = rec_tuples(j)
                assert got == orig[: len(got)]
                if err is None:
                    # what the open repaired was a cache: nothing lost
                    assert got == orig and j.verify().ok, f"{f.name}[{pos}]"
                else:
                    # damage in a sealed segment is found when it is read
                    assert not j.verify().ok


def test_truncated_last_segment_recovers(fast_tmp):
    """A torn tail (a crash before the records were synced): every length of
    the last segment recovers to the records that fit entirely."""
    src = fast_tmp / "src"
    build(src, synced=False)
    with Journal.open(src, readonly=True) as j:
        orig, _ = rec_tuples(j)
    last = segs(src)[-1]
    data = last.read_bytes()
    # where records end in the last segment, and the seq of the one before it
    ends = {SEG_HDR.size}
    p = SEG_HDR.size
    while p < len(data):
        n = struct.unpack_from("<I", data, p + 4)[0]
        p += (REC_HDR.size + n + 7) & ~7
        ends.add(p)
    first_in_last = struct.unpack_from("<Q", data, 40)[0]
    lengths = range(len(data) + 1) if THOROUGH else sorted(
        set(range(0, len(data) + 1, 5)) | ends | {e - 1 for e in ends} | {e + 1 for e in ends})
    work = fast_tmp / "w"
    for size in lengths:
        if size > len(data):
            continue
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        with open(work / "segments" / last.name, "r+b") as f:
            f.truncate(size)
        if size < SEG_HDR.size:
            # a torn segment header is not a crash artifact (rotation syncs
            # the header before it publishes the segment): refuse clearly
            with pytest.raises(CorruptJournal):
                Journal.open(work)
            continue
        whole = max(e for e in ends if e <= size)
        n_in_last = sorted(ends).index(whole)
        keep = first_in_last - 1 + n_in_last
        with Journal.open(work, readonly=True) as j:  # a reader sees the same, cuts nothing
            assert rec_tuples(j) == (orig[:keep], None), size
            assert j.verify().ok
            assert bool(j.recovery) == (size != len(data))
        with Journal.open(work) as j:
            got, err = rec_tuples(j)
            assert err is None
            assert got == orig[:keep], size
            if size != len(data):
                assert j.recovery, f"length {size}: recovery left no note"
            else:
                assert not j.recovery
            assert j.verify().ok, size
            # and the journal takes appends again, right after the cut
            seq = j.bookmark("again")
            assert seq == keep + 1
        with Journal.open(work, readonly=True) as j:
            assert not j.recovery
            got, err = rec_tuples(j)
            assert err is None and got[:keep] == orig[:keep] and got[-1][5] == b"again"


def test_truncating_synced_records_is_damage(fast_tmp):
    """Records made durable by sync() that went missing are not a torn tail."""
    src = fast_tmp / "j"
    build(src, synced=True)
    last = segs(src)[-1]
    size = last.stat().st_size
    with open(last, "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(CorruptJournal, match="segment 0000000000000003"):
        Journal.open(src)
    with Journal.open(src, readonly=True) as j:
        assert not j.verify().ok


@pytest.mark.parametrize("tail", [bytes(4096), bytes(8), b"\xde\xad" * 999, "record-header"])
def test_garbage_after_last_record_is_cut(fast_tmp, tail):
    src = fast_tmp / "j"
    build(src)
    with Journal.open(src, readonly=True) as j:
        orig, _ = rec_tuples(j)
    last = segs(src)[-1]
    if tail == "record-header":
        # a plausible header whose payload never made it
        tail = encode_record(Kind.WRITE, len(orig) + 1, T0, 1, 0, b"x" * 100)[:60]
    size = last.stat().st_size
    with open(last, "ab") as f:
        f.write(tail)
    with Journal.open(src, readonly=True) as j:
        got, err = rec_tuples(j)
        assert err is None and got == orig
        assert j.recovery and "torn tail" in j.recovery[0]
        rep = j.verify()
        assert rep.ok and any(p.severity == "warning" for p in rep.problems)
    with Journal.open(src) as j:
        assert any("cut" in m for m in j.recovery)
        assert rec_tuples(j) == (orig, None)
        assert j.verify().ok and not j.verify().problems
    assert last.stat().st_size == size


def record_offsets(data: bytes) -> list[int]:
    out, p = [], SEG_HDR.size
    while p < len(data):
        out.append(p)
        p += (REC_HDR.size + struct.unpack_from("<I", data, p + 4)[0] + 7) & ~7
    return out


@pytest.mark.parametrize("which", [0, 2], ids=["sealed-segment", "last-segment"])
def test_damage_in_the_middle_is_reported_where_it_is(fast_tmp, which):
    src = fast_tmp / "j"
    build(src)
    with Journal.open(src, readonly=True) as j:
        orig, _ = rec_tuples(j)
    seg = segs(src)[which]
    data = bytearray(seg.read_bytes())
    offs = record_offsets(bytes(data))
    assert len(offs) >= 3
    victim = offs[1]
    first = struct.unpack_from("<Q", data, 40)[0]
    data[victim + 20] ^= 0x10  # inside the ts field: checksum mismatch
    seg.write_bytes(data)
    where = f"segment {which + 1:016x} offset {victim}"
    with Journal.open(src, readonly=True) as j:
        got, err = rec_tuples(j)
        assert isinstance(err, CorruptJournal) and where in str(err), err
        assert got == orig[:first]  # everything before the damaged record
        rep = j.verify()
        assert not rep.ok
        dmg = [p for p in rep.problems if p.severity == "damage"]
        assert dmg[0].segment == which + 1 and dmg[0].offset == victim
        assert where in str(dmg[0])
    with pytest.raises(CorruptJournal, match=where), Journal.open(src) as j:
        list(j.records())


def test_not_a_journal(tmp_path):
    with pytest.raises(JournalNotFound):
        Journal.open(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_bytes(os.urandom(1000))
    with pytest.raises(NotAJournal):
        Journal.open(f)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x").write_text("hello")
    with pytest.raises(NotAJournal):
        Journal.open(d)
    with pytest.raises(NotAJournal):
        Journal.open(tmp_path / "dir", readonly=True)
    (d / "journal.json").write_bytes(os.urandom(300))
    with pytest.raises(NotAJournal):
        Journal.open(d)
    (d / "journal.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(NotAJournal):
        Journal.open(d)


def _rewrite_meta(path: Path, **changes) -> None:
    body = json.loads((path / "journal.json").read_text())
    body.pop("checksum")
    body.update(changes)
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["checksum"] = f"{crc32c(canon.encode()):08x}"
    (path / "journal.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def test_unsupported_versions(fast_tmp):
    src = fast_tmp / "j"
    build(src)
    _rewrite_meta(src, version=99)
    for ro in (True, False):
        with pytest.raises(UnsupportedVersion, match="99"):
            Journal.open(src, readonly=ro)
    _rewrite_meta(src, version=1)
    with Journal.open(src):
        pass
    # a segment of a newer format, with a valid checksum
    seg = segs(src)[-1]
    data = bytearray(seg.read_bytes())
    struct.pack_into("<H", data, 8, 2)
    struct.pack_into("<I", data, 60, crc32c(bytes(data[:60])))
    seg.write_bytes(data)
    with pytest.raises(UnsupportedVersion):
        Journal.open(src, readonly=True)


def test_foreign_segment_is_rejected(fast_tmp):
    a, b = fast_tmp / "a", fast_tmp / "b"
    build(a)
    build(b)
    shutil.copy(segs(b)[-1], segs(a)[-1])
    with pytest.raises(CorruptJournal, match="another journal"):
        Journal.open(a, readonly=True)


def test_missing_segment_in_the_chain(fast_tmp):
    src = fast_tmp / "j"
    build(src)
    os.unlink(segs(src)[1])
    with pytest.raises(CorruptJournal, match="0000000000000002 is missing"):
        Journal.open(src, readonly=True)


def _head(path: Path):
    raw = (path / "head").read_bytes()
    return list(HEAD.unpack_from(raw)), raw


def _write_head(path: Path, fields, raw: bytes) -> None:
    buf = bytearray(raw)
    HEAD.pack_into(buf, 0, *fields)
    struct.pack_into("<I", buf, 12, crc32c(bytes(buf[16:128])))
    (path / "head").write_bytes(buf)


def test_damaged_head_is_rebuilt_and_flagged(fast_tmp):
    src = fast_tmp / "j"
    build(src)
    with Journal.open(src, readonly=True) as j:
        orig, _ = rec_tuples(j)
    for pos in (0, 12, 16, 40, 100, 200, 4095):
        raw = bytearray((src / "head").read_bytes())
        raw[pos] ^= 0x01
        (src / "head").write_bytes(raw)
        with Journal.open(src, readonly=True) as j:
            assert not j.verify().ok, pos
            assert rec_tuples(j) == (orig, None)
        with Journal.open(src) as j:  # a writable open rebuilds it
            assert j.verify().ok, pos
            assert rec_tuples(j) == (orig, None)
    # a head that lost its tail (size) is damage too; a lost head as well:
    # a writable open recreates either
    for damage in ("short", "missing"):
        raw = (src / "head").read_bytes()
        if damage == "short":
            (src / "head").write_bytes(raw[:200])
        else:
            (src / "head").unlink()
        with Journal.open(src, readonly=True) as j:
            assert not j.verify().ok
            assert rec_tuples(j) == (orig, None)
        with Journal.open(src) as j:
            # a short head whose live part survived is simply extended
            assert damage == "short" or any("head" in m for m in j.recovery)
            assert j.verify().ok
    with Journal.open(src) as j:  # and appending works on the recreated head
        seq = j.append_flush()
    with Journal.open(src, readonly=True) as j:
        assert rec_tuples(j)[0][: len(orig)] == orig and j.last_seq == seq == len(orig) + 1


def test_head_damaged_under_an_open_writer(fast_tmp):
    """The head is a cache: a writer that finds it damaged (for instance by a
    process killed while updating it) rebuilds it from the segments and goes
    on, instead of failing every append until someone reopens the journal."""
    src = fast_tmp / "j"
    build(src)
    with Journal.open(src) as j:
        n = j.last_seq
        raw = bytearray((src / "head").read_bytes())
        raw[12] ^= 0xFF  # checksum
        (src / "head").write_bytes(raw)
        seq = j.bookmark("after")
        assert seq == n + 1
        assert j.record(seq).data == b"after"
        assert any("head" in m for m in j.recovery)
        assert j.verify().ok


def test_reader_stops_at_the_committed_end(fast_tmp):
    """While an append is in progress (pending set in the head) the bytes past
    the committed end are not records yet: the writer may die and the next
    locker cuts them, and their seqs are then reused. A reader must not
    return them."""
    src = fast_tmp / "j"
    build(src)
    with Journal.open(src, readonly=True) as j:
        orig, _ = rec_tuples(j)
    fields, raw = _head(src)
    next_seq, seg_off = fields[3], fields[5]
    last = segs(src)[-1]
    assert last.stat().st_size == seg_off
    ghost = encode_record(Kind.BOOKMARK, next_seq, T0 + 99, 0, 0, b"ghost")
    with open(last, "ab") as f:
        f.write(ghost)
    fields[6] = 1  # pending
    _write_head(src, fields, raw)
    with Journal.open(src, readonly=True) as j:
        got, err = rec_tuples(j)
        assert err is None and got == orig
        assert j.last_seq == orig[-1][0]
        assert [b.name for b in j.bookmarks()] == ["before"]
    # the next writer cuts the dead writer's append and reuses its seq
    with Journal.open(src) as j:
        assert j.last_seq == orig[-1][0]
        assert j.bookmark("real") == next_seq
        assert [b.name for b in j.bookmarks()] == ["before", "real"]
        assert j.verify().ok
    assert last.stat().st_size == seg_off + len(encode_record(Kind.BOOKMARK, 1, 0, 0, 0, b"real"))


def test_reader_ignores_a_segment_being_started(fast_tmp):
    """A pending append that rotated has created the next segment: readers do
    not read it before the head publishes it."""
    src = fast_tmp / "j"
    build(src)
    with Journal.open(src, readonly=True) as j:
        orig, _ = rec_tuples(j)
    fields, raw = _head(src)
    from cdpcore._native import ffi, lib

    hdr = ffi.new("uint8_t[]", 64)
    lib.cdp_segment_header(hdr, fields[12], 4, fields[3], T0)
    new = src / "segments" / f"{4:016x}.seg"
    new.write_bytes(bytes(ffi.buffer(hdr)) + encode_record(Kind.BOOKMARK, fields[3], T0, 0, 0, b"ghost"))
    fields[6] = 1
    _write_head(src, fields, raw)
    with Journal.open(src, readonly=True) as j:
        assert rec_tuples(j) == (orig, None)
    with Journal.open(src) as j:
        assert rec_tuples(j) == (orig, None)
        assert not new.exists()


def test_power_cut_after_sync_keeps_synced_records(fast_tmp):
    """sync() makes the head durable along with the records. After a power
    cut the head on disk is at worst the one sync() wrote, possibly marked
    pending by a later append that never finished; recovery from it keeps
    every synced record and cuts only what was never synced."""
    root = fast_tmp / "root"
    root.mkdir()
    jpath = fast_tmp / "j"
    with Journal.create(jpath, root, segment_size=SEG) as j:
        for i in range(20):
            j.append_write("f", i, bytes([i]) * 700, ts=T0 + i)
        synced = j.sync()
        assert synced == j.last_seq
        on_disk = (jpath / "head").read_bytes()
        for i in range(20, 40):  # never synced; rotates into new segments
            j.append_write("f", i, bytes([i]) * 700, ts=T0 + i)
        kept = [(r.seq, r.data) for r in j.records(until=f"seq:{synced}")]
    fields = list(HEAD.unpack_from(on_disk))
    assert fields[9] == synced
    fields[6] = 1  # an append was in progress when the page was written back
    _write_head(jpath, fields, on_disk)
    with Journal.open(jpath) as j:
        got = [(r.seq, r.data) for r in j.records()]
        assert got[: len(kept)] == kept
        assert j.last_seq >= synced
        assert j.verify().ok

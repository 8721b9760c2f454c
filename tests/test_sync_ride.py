"""Barriers that ride on the program's own flush (capture.md, "Durability"):
the active segment's durable preallocated tail (its head fields, where it
ends, what rotation, a dead writer's cut and recovery do to it), the
bookkeeping of cdp_sync_ride / cdp_sync_rode, and readers that take the
zero tail for the end of the journal, not for a torn tail.

The tail and the ride need ext4 (the only file system whose fsync is known
to flush the device after the journal's writes completed); elsewhere the
ride must refuse, which these tests check instead."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import cdpcore
from capture_util import make_journal, restore_to, assert_same_tree
from cdpcore import Journal
from cdpcore._native import crc32c
from cdpcore.errors import StaleNamespace
from cdpcore.format import HEAD_PRE_AT, SEG_HDR, head_prealloc, parse_head
from cdpcore.journal import Writer

MIB = 1 << 20
PY = sys.executable


def on_ext4(path: Path) -> bool:
    r = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip().startswith("ext")


def head_bytes(jpath: Path) -> bytes:
    return (jpath / "head").read_bytes()


def active_segment(jpath: Path) -> Path:
    return sorted((jpath / "segments").glob("*.seg"))[-1]


def tail_end(off: int, ahead: int) -> int:
    """Where cdp_prealloc leaves the tail when called with the committed end
    at off (and a file no longer than the next MiB): 1 MiB steps, the first
    boundary at or past off + ahead."""
    return -(-(off + ahead) // MIB) * MIB


def append_some(j: Journal, n: int, size: int = 1000) -> None:
    for i in range(n):
        j.append_write("f", i * size, bytes([i % 251 + 1]) * size)


@pytest.fixture
def ext4_journal(tmp_path: Path) -> tuple[Path, Path]:
    if not on_ext4(tmp_path):
        pytest.skip(f"{tmp_path} is not on ext4")
    return make_journal(tmp_path)


def records_then_tail(jpath: Path, n: int) -> int:
    """Append n records, then preallocate the tail (1 MiB steps, 1 MiB
    ahead) as protect's background thread does; the committed end."""
    with Journal.open(jpath) as j:
        append_some(j, n)
        committed = j._need_writer().get_state().seg_off
        w = Writer(str(jpath))
        w.prealloc(MIB, MIB)
        w.close()
    return committed


def test_prealloc_writes_a_durable_zero_tail(ext4_journal):
    jpath, _ = ext4_journal
    committed = records_then_tail(jpath, 10)
    seg = active_segment(jpath)
    size = seg.stat().st_size
    # in MiB steps, to the first boundary at least 1 MiB past the records
    assert size == tail_end(committed, MIB) == 2 * MIB
    data = seg.read_bytes()
    assert data[committed:] == bytes(size - committed)
    head = head_bytes(jpath)
    end, pending, crc = struct.unpack_from("<QQI", head, HEAD_PRE_AT)
    assert (end, pending) == (size, 0) and crc == crc32c(head[HEAD_PRE_AT:HEAD_PRE_AT + 16])
    assert head_prealloc(head) == (size, 0) and parse_head(head) is not None
    assert head[HEAD_PRE_AT + 20:] == bytes(4096 - HEAD_PRE_AT - 20)
    # readers take the zeros for the end, not for a torn tail; a writable
    # open keeps them
    with Journal.open(jpath, readonly=True) as j:
        assert not j.recovery
        rep = j.verify()
        assert rep.ok and not rep.problems, rep.problems
        assert j.info()["last_seq"] == 11  # a FILEMAP, then the 10 writes
    with Journal.open(jpath) as j:
        assert not j.recovery
        append_some(j, 5)  # appends go over the zeros
        assert j.verify().ok
    assert seg.stat().st_size == size


def test_prealloc_keeps_ahead_in_steps(ext4_journal):
    jpath, _ = ext4_journal
    with Journal.open(jpath) as j:
        w = Writer(str(jpath))
        for _ in range(5):
            w.prealloc(2 * MIB, 3 * MIB)
        # 3 MiB ahead of the records, in 1 MiB steps; then nothing more to do
        assert active_segment(jpath).stat().st_size == 4 * MIB
        assert head_prealloc(head_bytes(jpath)) == (4 * MIB, 0)
        append_some(j, 2500)  # 2.5 MB of records: under 2 MiB of tail left
        off = j._need_writer().get_state().seg_off
        assert 4 * MIB - off < 2 * MIB
        w.prealloc(2 * MIB, 3 * MIB)
        assert active_segment(jpath).stat().st_size == tail_end(off, 3 * MIB) == 6 * MIB
        assert head_prealloc(head_bytes(jpath)) == (6 * MIB, 0)
        w.close()


def test_rotation_cuts_the_tail_of_the_sealed_segment(tmp_path):
    jpath, root = tmp_path / "j", tmp_path / "root"
    root.mkdir()
    Journal.create(jpath, root, base=False, segment_size=256 << 10).close()
    with Journal.open(jpath) as j:
        append_some(j, 20)
        w = Writer(str(jpath))
        w.prealloc(MIB, MIB)
        first = active_segment(jpath)
        # a segment smaller than a step: the tail ends at the segment size
        if on_ext4(tmp_path):
            assert first.stat().st_size == 256 << 10
        append_some(j, 400)  # several rotations
        w.close()
        segs = sorted((jpath / "segments").glob("*.seg"))
        assert len(segs) >= 2
        # a rotation starts the new segment without a tail
        assert head_prealloc(head_bytes(jpath)) == (0, 0) or not on_ext4(tmp_path)
    # verify takes a zero tail only in the last segment: a sealed one with
    # its tail left would be damage
    with Journal.open(jpath) as j:  # writes the sealed segments' indexes
        assert j.verify().ok and not j.verify().problems
    # a sealed segment ends at its last record (its index says so)
    idx = first.with_suffix(".idx").read_bytes()
    assert struct.unpack_from("<Q", idx, 40)[0] == first.stat().st_size


def test_ride_covers_what_the_tail_holds(ext4_journal):
    jpath, _ = ext4_journal
    with Journal.open(jpath) as j:
        w = Writer(str(jpath))
        dev = os.stat(jpath / "segments").st_dev
        append_some(j, 3)
        # no durable tail yet: the records' blocks are not known durable
        with pytest.raises(StaleNamespace):  # CDP_ESTALE: cannot ride
            w.ride(dev)
        w.prealloc(4 * MIB, 8 * MIB)  # also syncs what is in
        assert w.ride(dev) == 0  # nothing left to make durable
        append_some(j, 4)
        last = j.info()["last_seq"]
        # another device: its flush would not cover the journal
        with pytest.raises(StaleNamespace):  # CDP_ESTALE: cannot ride
            w.ride(dev + 1)
        cover = w.ride(dev)
        assert cover == last
        assert j._need_writer().get_state().synced_seq < last  # not before the program's flush
        w.rode(cover)
        assert j._need_writer().get_state().synced_seq == last
        w.close()


def test_ride_refused_off_ext4(fast_tmp):
    if on_ext4(fast_tmp):
        pytest.skip("scratch directory is on ext4")
    jpath, _ = make_journal(fast_tmp)
    with Journal.open(jpath) as j:
        w = Writer(str(jpath))
        w.prealloc(MIB, MIB)
        append_some(j, 2)
        with pytest.raises(StaleNamespace):  # CDP_ESTALE: cannot ride
            w.ride(os.stat(jpath).st_dev)
        w.close()


def test_cutting_a_torn_tail_forgets_the_durable_tail(ext4_journal):
    """Bytes past the committed end that are not the zero tail (a torn
    append) are cut by a writable open; the cut takes the tail with it, so
    the head must no longer claim one: records appended later would grow
    the file again, and a ride over blocks whose allocation is not durable
    could lose them in a power cut."""
    jpath, _ = ext4_journal
    committed = records_then_tail(jpath, 5)
    assert head_prealloc(head_bytes(jpath))[0] == 2 * MIB
    with open(active_segment(jpath), "r+b") as f:
        f.seek(committed)
        f.write(b"\xde\xad" * 50)  # garbage inside the tail
    with Journal.open(jpath, readonly=True) as j:
        assert any("torn tail" in m for m in j.recovery)
    with Journal.open(jpath) as j:
        assert any("cut" in m for m in j.recovery)
        assert head_prealloc(head_bytes(jpath)) == (0, 0)
        assert active_segment(jpath).stat().st_size == committed
        assert j.verify().ok


def test_dead_writers_cut_forgets_the_durable_tail(ext4_journal, tmp_path):
    """A writer killed mid-append leaves `pending`; the next locker cuts
    the segment back to the committed end, zero tail included, and the
    head must say there is no tail any more."""
    jpath, _ = ext4_journal
    with Journal.open(jpath) as j:
        append_some(j, 5)
        committed = j._need_writer().get_state().seg_off
    w = Writer(str(jpath))
    w.prealloc(MIB, MIB)
    assert head_prealloc(head_bytes(jpath))[0] == 2 * MIB
    script = tmp_path / "die.py"
    script.write_text(r"""
import mmap, os, struct, sys
from cdpcore.journal import Writer
from cdpcore._native import crc32c
w = Writer(sys.argv[1])
w.lock()
fd = os.open(os.path.join(sys.argv[1], "head"), os.O_RDWR)
m = mmap.mmap(fd, 4096)
struct.pack_into("<Q", m, 40, 1)  # pending, as begin_append sets it
struct.pack_into("<I", m, 12, crc32c(m[16:128]))
with open(sys.argv[2], "r+b") as f:  # half an append past the committed end
    f.seek(int(sys.argv[3]))
    f.write(b"\x55" * 300)
os._exit(9)
""")
    r = subprocess.run([PY, str(script), str(jpath), str(active_segment(jpath)), str(committed)])
    assert r.returncode == 9
    w.drain()  # takes the lock: cuts what the dead writer left
    w.close()
    assert head_prealloc(head_bytes(jpath)) == (0, 0)
    assert active_segment(jpath).stat().st_size == committed
    with Journal.open(jpath, readonly=True) as j:
        assert j.verify().ok and j.info()["last_seq"] == 6  # the dead append left nothing


def test_protect_with_barriers_rides_and_restores(tmp_path):
    """A program that fsyncs under protect: the background thread keeps a
    preallocated tail (on ext4), the journal reads without any recovery
    message, restores byte for byte, and every barrier left a FLUSH."""
    jpath, root = make_journal(tmp_path)
    script = tmp_path / "w.py"
    script.write_text(r"""
import os
fd = os.open("db", os.O_RDWR | os.O_CREAT, 0o644)
for i in range(300):
    os.pwrite(fd, bytes([i % 256]) * 3000, (i * 7919) % 200 * 4096)
    os.fdatasync(fd) if i % 2 else os.fsync(fd)
os.close(fd)
""")
    res = cdpcore.protect(jpath, [PY, str(script)], cwd=root, resync=False, baseline=False).wait()
    assert res.returncode == 0
    with Journal.open(jpath, readonly=True) as j:
        assert not j.recovery
        rep = j.verify()
        assert rep.ok and not rep.problems, rep.problems
        flushes = sum(1 for r in j.records() if r.kind == cdpcore.Kind.FLUSH)
        state_synced = parse_head(head_bytes(jpath)).synced_seq  # type: ignore[union-attr]
        last = j.info()["last_seq"]
    assert flushes == 300
    assert state_synced == last
    if on_ext4(tmp_path):
        # the tail was kept while the barriers came
        assert active_segment(jpath).stat().st_size % MIB == 0
    dest = tmp_path / "r"
    restore_to(jpath, dest)
    assert_same_tree(root, dest)

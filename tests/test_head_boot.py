"""cdp_sync does not flush the head, so after a power cut the head on disk
may be older than synced records. A head from an earlier boot is never
believed: its committed end and pending flag must not cut anything."""
from __future__ import annotations

import struct

from cdpcore import Journal
from cdpcore._native import crc32c, lib


def stale_head(path, seg_off: int, pending: int, boot: int, synced: int | None = None) -> None:
    """Rewrite the head as an older snapshot written in boot `boot`."""
    with open(path / "head", "r+b") as f:
        head = bytearray(f.read(4096))
        struct.pack_into("<QQ", head, 32, seg_off, pending)
        if synced is not None:
            struct.pack_into("<Q", head, 64, synced)
        struct.pack_into("<Q", head, 120, boot)
        struct.pack_into("<I", head, 12, crc32c(bytes(head[16:128])))
        f.seek(0)
        f.write(head)


def build(jpath, root) -> int:
    with Journal.create(jpath, root, base=False) as j:
        for i in range(50):
            j.append_write("f", i * 100, bytes([i]) * 100)
        j.append_flush()
        j.sync()
        return j.last_seq


def test_head_of_another_boot_cuts_nothing(journal_dirs):
    jpath, root = journal_dirs
    last = build(jpath, root)
    # as if the power failed: the head on disk says an append was pending
    # at the very start of the segment, in a boot that is not this one
    stale_head(jpath, seg_off=64, pending=1, boot=lib.cdp_boot_id() ^ 1)
    with Journal.open(jpath, readonly=True) as j:
        assert j.last_seq == last  # the reader scans past the stale committed end
    with Journal.open(jpath) as j:
        assert j.last_seq == last  # the writable open rebuilt the head, cut nothing
        assert j.verify().ok
        j.append_flush()
    head = (jpath / "head").read_bytes()
    assert struct.unpack_from("<Q", head, 120)[0] == lib.cdp_boot_id()


def test_head_of_this_boot_is_believed(journal_dirs):
    """The same stale head stamped with this boot is trusted: the pending
    append past its committed end is cut (what a crash of a writer, not of
    the machine, leaves)."""
    jpath, root = journal_dirs
    build(jpath, root)
    stale_head(jpath, seg_off=64, pending=1, boot=lib.cdp_boot_id(), synced=0)
    with Journal.open(jpath) as j:
        assert j.last_seq == 0

"""Journal format v1, pinned: a change to any byte of what is written (record,
segment header, index, head) fails here. The fixtures in tests/data/golden/
are hex dumps; after a deliberate format change (which needs a new format
version), regenerate them with CDP_REGEN_GOLDEN=1 and review the diff.
"""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from cdpcore import Journal, Kind
from cdpcore._native import crc32c, ffi, lib
from cdpcore.format import (
    HEAD,
    IDX_HDR,
    REC_HDR,
    SEG_HDR,
    encode_record,
    parse_head,
    parse_index,
    parse_segment_header,
)

GOLDEN = Path(__file__).parent / "data" / "golden"
REGEN = os.environ.get("CDP_REGEN_GOLDEN") == "1"
T0 = 1_700_000_000_000_000


def golden(name: str, data: bytes) -> None:
    """Compare data with the hex fixture `name` (or write it with REGEN)."""
    f = GOLDEN / name
    text = "\n".join(data[i : i + 32].hex() for i in range(0, len(data), 32)) + "\n"
    if REGEN:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        return
    assert f.exists(), f"missing fixture {f}; generate with CDP_REGEN_GOLDEN=1"
    want = bytes.fromhex(f.read_text().replace("\n", ""))
    if data != want:
        first = next((i for i, (a, b) in enumerate(zip(data, want)) if a != b), min(len(data), len(want)))
        pytest.fail(f"{name}: bytes differ from the fixture at offset {first} "
                    f"(got {len(data)} bytes, fixture {len(want)})")


# ---- CRC32C --------------------------------------------------------------------


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bit-at-a-time CRC32C (Castagnoli, reflected 0x82F63B78)."""
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def test_crc32c_known_answers():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_crc32c_every_length_and_alignment():
    """The C code has a word-at-a-time path (hardware or slicing) and byte
    tails; every length and start alignment must agree with the reference."""
    blob = bytes((i * 131 + 7) & 0xFF for i in range(600))
    for start in range(9):
        for n in list(range(80)) + [255, 256, 511, 512, 513, 590]:
            piece = blob[start : start + n]
            assert crc32c(piece) == crc32c_reference(piece), (start, n)
    # continuation: crc(a + b) == crc(b, crc(a))
    for cut in (0, 1, 7, 8, 13, 300, 600):
        assert crc32c(blob[cut:], crc32c(blob[:cut])) == crc32c(blob)


# ---- sizes, numbers ------------------------------------------------------------


def test_struct_sizes_and_constants():
    assert (SEG_HDR.size, REC_HDR.size, IDX_HDR.size) == (64, 48, 88)
    assert HEAD.size == 104  # head fields; bytes 104..127 reserved, CRC over 16..127
    assert lib.CDP_SEG_HDR_SIZE == 64 and lib.CDP_REC_HDR_SIZE == 48 and lib.CDP_HEAD_SIZE == 4096
    assert lib.CDP_REC_MARKER == 0x5243 and struct.pack("<H", lib.CDP_REC_MARKER) == b"CR"
    assert lib.CDP_MAX_PAYLOAD == 16 * 1024 * 1024
    assert ffi.sizeof("struct cdp_scan_result") == 64


KINDS = {
    "WRITE": 1, "TRUNCATE": 2, "FLUSH": 3, "CREATE": 4, "RENAME": 5, "UNLINK": 6, "MKDIR": 7,
    "RMDIR": 8, "SETATTR": 9, "BOOKMARK": 10, "FILEMAP": 11, "BASE": 12, "DIRTY": 13,
    "SYMLINK": 14, "LINK": 15, "AUDIT": 16,
}


def test_record_kind_numbers():
    assert {k.name: int(k) for k in Kind} == KINDS
    for name, v in KINDS.items():
        assert getattr(lib, f"CDP_{name}") == v
    assert lib.CDP_MAX_KIND == max(KINDS.values())


# ---- records ----------------------------------------------------------------------

RECORDS = [
    (Kind.WRITE, 1, T0, 7, 4096, b"hello, journal"),
    (Kind.WRITE, 2, T0 + 1, 7, 0, b""),
    (Kind.WRITE, 3, T0 + 2, 7, 2**40, bytes(range(256)) * 3),
    (Kind.TRUNCATE, 4, T0 + 3, 7, 10, b""),
    (Kind.FLUSH, 5, -1, 0, 0, b""),
    (Kind.CREATE, 6, T0, 8, 0o644, b"dir/file"),
    (Kind.RENAME, 7, T0, 0, 0, b"dir/file\0dir/new"),
    (Kind.BOOKMARK, 8, 2**62, 0, 0, "n\u00e4me".encode()),
    (Kind.SETATTR, 9, T0, 0, 2**64 - 1, struct.pack("<q", -(2**63)) + b"x"),
    (Kind.LINK, 2**64 - 1, -(2**63) + 1, 2**64 - 1, 2**64 - 1, b"a\0b"),
]


def test_record_layout_byte_by_byte():
    """Offsets as docs/journal-format.md gives them, checked without REC_HDR."""
    kind, seq, ts, fid, off, payload = RECORDS[0]
    raw = encode_record(kind, seq, ts, fid, off, payload)
    assert len(raw) == 48 + 16  # 14 bytes of payload padded to 8
    assert struct.unpack_from("<I", raw, 4)[0] == len(payload)
    assert struct.unpack_from("<Q", raw, 8)[0] == seq
    assert struct.unpack_from("<q", raw, 16)[0] == ts
    assert struct.unpack_from("<Q", raw, 24)[0] == fid
    assert struct.unpack_from("<Q", raw, 32)[0] == off
    assert raw[40] == kind and raw[41] == 0 and raw[42:44] == b"CR" and raw[44:48] == bytes(4)
    assert raw[48:62] == payload and raw[62:64] == bytes(2)
    # the checksum covers bytes 4..47 and the payload, not the padding
    assert struct.unpack_from("<I", raw, 0)[0] == crc32c_reference(raw[4:62])


def test_records_golden():
    golden("records.hex", b"".join(encode_record(*r) for r in RECORDS))


def test_c_writer_and_python_encoder_agree(journal_dirs):
    """Both append paths of the C writer (by buffer and by pointer) write
    exactly the bytes encode_record describes."""
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.bookmark("b", ts=T0)
        big = bytes(range(256)) * 100  # big enough to go by pointer
        with j.batch() as b:
            b.append_write("p", 0, big, ts=T0 + 1)
            b.append_write("p", 1, big, ts=T0 + 2)
        j.append_write("q", 3, b"abc", ts=T0 + 3)
    seg = (jpath / "segments" / f"{1:016x}.seg").read_bytes()
    want = b"".join([
        encode_record(Kind.BOOKMARK, 1, T0, 0, 0, b"b"),
        encode_record(Kind.FILEMAP, 2, T0 + 1, 1, 0, b"p"),
        encode_record(Kind.WRITE, 3, T0 + 1, 1, 0, big),
        encode_record(Kind.WRITE, 4, T0 + 2, 1, 1, big),
        encode_record(Kind.FILEMAP, 5, T0 + 3, 2, 0, b"q"),
        encode_record(Kind.WRITE, 6, T0 + 3, 2, 3, b"abc"),
    ])
    assert seg[64:] == want


# ---- segment header -----------------------------------------------------------------

UUID = bytes(range(0xA0, 0xB0))


def seg_header(uuid: bytes, seg_no: int, first_seq: int, created: int) -> bytes:
    buf = ffi.new("uint8_t[]", 64)
    lib.cdp_segment_header(buf, uuid, seg_no, first_seq, created)
    return bytes(ffi.buffer(buf))


def test_segment_header_layout():
    h = seg_header(UUID, 0x1122334455667788, 42, T0)
    assert h[0:8] == b"CDPJSEG\0"
    assert struct.unpack_from("<HHI", h, 8) == (1, 64, 0)  # version, header size, flags
    assert h[16:32] == UUID
    assert struct.unpack_from("<QQq", h, 32) == (0x1122334455667788, 42, T0)
    assert h[56:60] == bytes(4)
    assert struct.unpack_from("<I", h, 60)[0] == crc32c_reference(h[:60])
    parsed = parse_segment_header(h, "x")
    assert (parsed.uuid, parsed.seg_no, parsed.first_seq, parsed.created_us) == (
        UUID, 0x1122334455667788, 42, T0)
    golden("segment_header.hex", h)


def test_segment_header_compacted_flag():
    """flags = 1 (COMPACTED, written by prune): the only known flag. The
    Python encoder writes what the C one does, with the flag set."""
    from cdpcore.errors import CorruptJournal
    from cdpcore.format import SEG_COMPACTED, encode_segment_header

    assert SEG_COMPACTED == 1
    assert encode_segment_header(UUID, 7, 42, T0) == seg_header(UUID, 7, 42, T0)
    h = encode_segment_header(UUID, 7, 42, T0, SEG_COMPACTED)
    assert struct.unpack_from("<HHI", h, 8) == (1, 64, 1)
    assert struct.unpack_from("<I", h, 60)[0] == crc32c_reference(h[:60])
    parsed = parse_segment_header(h, "x")
    assert parsed.compacted and parsed.flags == 1 and parsed.first_seq == 42
    assert not parse_segment_header(seg_header(UUID, 7, 42, T0), "x").compacted
    golden("segment_header_compacted.hex", h)
    bad = encode_segment_header(UUID, 7, 42, T0, 2)
    with pytest.raises(CorruptJournal, match="flags 0x2"):
        parse_segment_header(bad, "x")


# ---- a whole journal, built deterministically ------------------------------------------


def build_fixed(jpath: Path, root: Path) -> None:
    with Journal.create(jpath, root, segment_size=4096) as j:
        j.append_create("db/main.db", mode=0o600, ts=T0)
        for i in range(12):
            j.append_write("db/main.db", i * 4096, bytes([i]) * (500 + 37 * i), ts=T0 + 10 * i)
            if i % 4 == 3:
                j.append_flush("db/main.db", ts=T0 + 10 * i + 1)
        with j.batch() as b:
            b.append_rename("db/main.db", "db/old.db", ts=T0 + 500)
            b.append_mkdir("logs", ts=T0 + 501)
            b.append_symlink("../db/old.db", "logs/current", ts=T0 + 502)
            b.append_link("db/old.db", "db/hard", ts=T0 + 503)
            b.append_setattr("db/hard", mode=0o640, mtime_us=T0, ts=T0 + 499)
            b.append_dirty("db/old.db", 0, 4096, "mmap", ts=T0 + 504)
        j.bookmark("golden", ts=T0 + 600)
        j.append_truncate("db/old.db", 100, ts=T0 + 601)
        j.append_unlink("db/hard", ts=T0 + 602)
        j.append_rmdir("logs", ts=T0 + 603)
    with Journal.open(jpath):  # writes the sealed segments' index files
        pass


def masked_segment(data: bytes) -> bytes:
    """A segment with its UUID, creation time and header CRC zeroed."""
    return data[:16] + bytes(16) + data[32:48] + bytes(8) + data[56:60] + bytes(4) + data[64:]


def test_journal_bytes_golden(journal_dirs):
    jpath, root = journal_dirs
    build_fixed(jpath, root)
    segdir = jpath / "segments"
    names = sorted(p.name for p in segdir.iterdir())
    nseg = sum(n.endswith(".seg") for n in names)
    assert nseg >= 3
    assert names == sorted([f"{n:016x}.seg" for n in range(1, nseg + 1)]
                           + [f"{n:016x}.idx" for n in range(1, nseg)]), names
    with Journal.open(jpath, readonly=True) as j:
        uuid = j.meta.uuid
    for name in names:
        data = (segdir / name).read_bytes()
        if name.endswith(".seg"):
            assert parse_segment_header(data, name).uuid == uuid
            golden(f"journal/{name}.hex", masked_segment(data))
        else:
            golden(f"journal/{name}.hex", data)
    head = (jpath / "head").read_bytes()
    assert len(head) == 4096 and head[128:] == bytes(4096 - 128)
    assert parse_head(head) is not None
    # the boot digest (bytes 120..127) is the machine's, not the format's
    assert int.from_bytes(head[120:128], "little") == lib.cdp_boot_id()
    masked = head[:12] + bytes(4) + head[16:88] + bytes(16) + head[104:120] + bytes(8)
    # ns_gen counts namespace records from 1 in a journal that was never recovered
    golden("journal/head.hex", masked)


def test_index_layout(journal_dirs):
    jpath, root = journal_dirs
    build_fixed(jpath, root)
    seg = (jpath / "segments" / f"{1:016x}.seg").read_bytes()
    raw = (jpath / "segments" / f"{1:016x}.idx").read_bytes()
    (magic, version, hsize, res1, seg_no, first_seq, count, end, ts_min, ts_max, fid_max,
     n, res2, crc) = struct.unpack_from("<8sHHIQQQQqqQQII", raw)
    assert (magic, version, hsize, res1, res2) == (b"CDPJIDX\0", 1, 88, 0, 0)
    assert (seg_no, first_seq, end) == (1, 1, len(seg))
    assert len(raw) == 88 + 24 * n and n >= 1
    assert crc == crc32c_reference(raw[:84] + raw[88:])
    seqs = struct.unpack_from(f"<{n}Q", raw, 88)
    tss = struct.unpack_from(f"<{n}q", raw, 88 + 8 * n)
    offs = struct.unpack_from(f"<{n}Q", raw, 88 + 16 * n)
    # walk the segment: each entry names a record start, its seq, and the
    # running max of ts up to and including it
    pos, seq, run, walked = 64, 1, -(2**63), {}
    tmin, fmax = 2**63, 0
    while pos < len(seg):
        ln, s, ts, fid = struct.unpack_from("<IQqQ", seg, 4 + pos)
        run = max(run, ts)
        tmin = min(tmin, ts)
        fmax = max(fmax, fid)
        walked[pos] = (s, run)
        assert s == seq
        pos += (48 + ln + 7) & ~7
        seq += 1
    assert count == seq - 1 and ts_max == run and ts_min == tmin and fid_max == fmax
    assert offs[0] == 64
    for s, t, o in zip(seqs, tss, offs):
        assert walked[o] == (s, t)
    assert parse_index(raw) is not None


# ---- a pruned journal: COMPACTED segments with seq gaps and KEPT flags ------------


def test_pruned_journal_bytes_golden(journal_dirs):
    """A prune of the fixed journal, pinned: the COMPACTED segments' records
    (net change per kept point, seqs packed at the end of each interval so
    that gaps come first, KEPT (flags bit 0) on each group's last record)
    and the byte-level rules a reader applies to them."""
    from cdpcore.format import REC_KEPT, SEG_COMPACTED
    from cdpcore.retention import Policy, prune

    jpath, root = journal_dirs
    hour = 3600 * 10**6
    with Journal.create(jpath, root, segment_size=4096) as j:
        j.append_create("db/main.db", mode=0o600, ts=T0)
        for i in range(10):  # each hour: a page written twice, a flush
            t = T0 + i * hour
            j.append_write("db/main.db", i % 3 * 4096, bytes([i]) * 700, ts=t + 1)
            j.append_write("db/main.db", i % 3 * 4096 + 100, bytes([i + 100]) * 700, ts=t + 2)
            j.append_flush(ts=t + 3)
            if i == 4:
                with j.batch() as b:
                    b.append_rename("db/main.db", "db/old.db", ts=t + 4)
                    b.append_link("db/old.db", "db/main.db", ts=t + 5)
                    b.append_truncate("db/old.db", 5000, ts=t + 6)
        j.append_write("db/main.db", 0, b"live", ts=T0 + 11 * hour)
    with Journal.open(jpath) as j:
        res = prune(j, Policy.parse("3h", keep_hourly="24h"), now=T0 + 12 * hour)
        assert res.boundary and len(res.kept) >= 4 and res.segments_written
        kept = j.compacted_points()
        assert kept == res.kept
    segdir = jpath / "segments"
    seen_gap = False
    for no in res.segments_written:
        data = (segdir / f"{no:016x}.seg").read_bytes()
        hdr = parse_segment_header(data, "x")
        assert hdr.flags == SEG_COMPACTED
        golden(f"pruned/{no:016x}.seg.hex", masked_segment(data))
        # walk the records: seqs increase, not always by one; KEPT marks
        # exactly the kept points, and the segment ends with one
        pos, prev, flagged = 64, None, []
        while pos < len(data):
            ln, s, ts, fid, off, kind, flags = struct.unpack_from("<IQqQQBB", data, pos + 4)
            assert flags in (0, REC_KEPT)
            if prev is None:
                assert s == hdr.first_seq
            else:
                assert s > prev
                seen_gap |= s > prev + 1
            if flags & REC_KEPT:
                flagged.append(s)
            prev = s
            pos += (48 + ln + 7) & ~7
        assert flagged and flagged[-1] == prev and set(flagged) <= set(kept)
        # the C scan accepts the gaps only when told the segment is COMPACTED
        buf = ffi.from_buffer(data)
        out = ffi.new("struct cdp_scan_result *")
        args = (buf, len(data), 64, hdr.first_seq, -(2**63), 0, 64, 1 << 18,
                ffi.NULL, ffi.NULL, ffi.NULL, 0, out)
        assert lib.cdp_scan(*args, 1) == lib.CDP_OK and out.stop == 0 and out.last_seq == prev
        if seen_gap:
            assert lib.cdp_scan(*args, 0) == lib.CDP_OK and out.stop == 4  # CDP_STOP_SEQ
    assert seen_gap


def test_head_preallocation_fields(journal_dirs, tmp_path):
    """Head bytes 128..147: preallocated end, pending end (u64 each) and a
    CRC32C of those 16 bytes; all zero = no tail; a CRC that does not match
    reads as no tail (and verify says so); bytes from 148 on stay zero."""
    from cdpcore.format import HEAD_PRE_AT, head_prealloc
    from cdpcore.journal import Writer

    jpath, root = journal_dirs
    Journal.create(jpath, root, base=False).close()
    head = (jpath / "head").read_bytes()
    assert head[128:] == bytes(4096 - 128) and head_prealloc(head) == (0, 0)
    fields = struct.pack("<QQ", 3 << 20, 4 << 20)
    good = head[:128] + fields + struct.pack("<I", crc32c_reference(fields)) + head[148:]
    assert HEAD_PRE_AT == 128 and parse_head(good) is not None
    assert head_prealloc(good) == (3 << 20, 4 << 20)
    bad = good[:144] + b"\0\0\0\0" + good[148:]
    assert parse_head(bad) is not None and head_prealloc(bad) == (0, 0)
    (jpath / "head").write_bytes(bad)
    with Journal.open(jpath, readonly=True) as j:
        assert any("preallocation" in p.message for p in j.verify().problems)
    assert parse_head(good[:148] + b"\1" + good[149:]) is None  # reserved bytes
    # what the C writer stores is what this reads (a tail needs ext4)
    ext = tmp_path / "e"
    ext.mkdir()
    r = subprocess.run(["stat", "-f", "-c", "%T", str(ext)], capture_output=True, text=True)
    if not r.stdout.startswith("ext"):
        return
    (ext / "root").mkdir()
    Journal.create(ext / "j", ext / "root", base=False).close()
    w = Writer(str(ext / "j"))
    w.prealloc(1 << 20, 1 << 20)
    w.close()
    raw = (ext / "j" / "head").read_bytes()
    seg = (ext / "j" / "segments" / f"{1:016x}.seg").stat().st_size
    assert head_prealloc(raw) == (seg, 0) and seg == 2 << 20
    assert struct.unpack_from("<I", raw, 144)[0] == crc32c_reference(raw[128:144])
    assert raw[148:] == bytes(4096 - 148)

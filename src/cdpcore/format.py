"""Journal format v1: every on-disk structure, its magic, version and parser.

docs/journal-format.md is the byte-by-byte description of what is here;
tests/test_format_golden.py pins it. Every parse checks size, magic and
version and raises an error that says what was expected and what was found.
"""
from __future__ import annotations

import enum
import json
import os
import posixpath
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from cdpcore._native import INT64_MIN, crc32c, lib
from cdpcore.errors import CorruptJournal, NotAJournal, UnsupportedVersion

FORMAT_VERSION = 1
META_NAME = "journal.json"
META_FORMAT = "cdpcore-journal"
HEAD_NAME = "head"
SEGMENT_DIR = "segments"
BASE_DIR = "base"
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
MIN_SEGMENT_SIZE = 4096
MAX_PAYLOAD = 16 * 1024 * 1024
NO_MODE = 2**64 - 1  # SETATTR offset field when the mode is unchanged

SEGMENT_MAGIC = b"CDPJSEG\0"
INDEX_MAGIC = b"CDPJIDX\0"
HEAD_MAGIC = b"CDPHEAD\0"
REC_MARKER = 0x5243

# magic, version, header size, flags, uuid, segment number, first seq,
# creation time (us), reserved, crc32c of bytes 0..59
SEG_HDR = struct.Struct("<8sHHI16sQQqII")
# crc32c, payload length, seq, ts (us), file id, offset, kind, flags, marker, reserved
REC_HDR = struct.Struct("<IIQqQQBBHI")
# magic, version, header size, reserved, segment number, first seq, count,
# end, ts min, ts max, file id max, entries, reserved, crc32c
IDX_HDR = struct.Struct("<8sHHIQQQQqqQQII")
# magic, version, crc, next seq, segment, segment end, pending, next file id,
# namespace generation, synced seq, last ts, segment size, uuid
HEAD = struct.Struct("<8sIIQQQQQQQqQ16s")
HEAD_CRC_RANGE = (16, 128)
HEAD_SIZE = 4096
HEAD_BOOT = 120  # u64: cdp_boot_id() of the boot that wrote the head
# the active segment's preallocated tail: end, pending end (u64 each) and a
# CRC32C of those 16 bytes of its own (journal-format.md, "Preallocation")
HEAD_PRE = struct.Struct("<QQI")
HEAD_PRE_AT = 128
BOOT_ID = int(lib.cdp_boot_id())
_HEAD_RESERVED = bytes(HEAD_SIZE - HEAD_PRE_AT - HEAD_PRE.size)

SEG_HDR_SIZE = 64
REC_HDR_SIZE = 48
assert SEG_HDR.size == SEG_HDR_SIZE and REC_HDR.size == 48 and IDX_HDR.size == 88


class Kind(enum.IntEnum):
    WRITE = 1
    TRUNCATE = 2
    FLUSH = 3
    CREATE = 4
    RENAME = 5
    UNLINK = 6
    MKDIR = 7
    RMDIR = 8
    SETATTR = 9
    BOOKMARK = 10
    FILEMAP = 11
    BASE = 12
    DIRTY = 13
    SYMLINK = 14
    LINK = 15
    AUDIT = 16  # anchors an audit-log entry (audit.py); changes nothing in the tree


# Kinds whose file_id field names a file (the others carry paths).
FILE_KINDS = frozenset({Kind.WRITE, Kind.TRUNCATE, Kind.FILEMAP, Kind.CREATE, Kind.DIRTY})


def align8(n: int) -> int:
    return (n + 7) & ~7


def record_size(payload_len: int) -> int:
    return align8(REC_HDR.size + payload_len)


def segment_name(seg_no: int) -> str:
    return f"{seg_no:016x}.seg"


def index_name(seg_no: int) -> str:
    return f"{seg_no:016x}.idx"


def parse_segment_name(name: str) -> int | None:
    if len(name) == 20 and name.endswith(".seg"):
        try:
            return int(name[:16], 16)
        except ValueError:
            return None
    return None


# ---- paths ---------------------------------------------------------------


def norm_path(path: str | os.PathLike[str] | bytes) -> str:
    """A path relative to the protected root, '/'-separated, no '..'."""
    p = os.fsdecode(path)
    if not p or "\0" in p:
        raise ValueError(f"invalid path {p!r}")
    if p.startswith("/"):
        raise ValueError(f"path must be relative to the protected root, got {p!r}")
    n = posixpath.normpath(p)
    if n in (".", "") or n == ".." or n.startswith("../"):
        raise ValueError(f"path escapes the protected root: {p!r}")
    return n


def encode_path(path: str) -> bytes:
    return os.fsencode(path)


def decode_path(raw: bytes) -> str:
    """Decode and re-validate a path read from a journal."""
    p = os.fsdecode(raw)
    try:
        n = norm_path(p)
    except ValueError as e:
        raise CorruptJournal(f"record carries an invalid path: {e}") from None
    if n != p:
        raise CorruptJournal(f"record carries a non-normalised path {p!r}")
    return n


# ---- payloads --------------------------------------------------------------


def pair_payload(a: str, b: str) -> bytes:
    return encode_path(a) + b"\0" + encode_path(b)


def split_pair(raw: bytes) -> tuple[bytes, bytes]:
    a, sep, b = raw.partition(b"\0")
    if not sep:
        raise CorruptJournal("two-path record without a NUL separator")
    return a, b


SETATTR_FIXED = struct.Struct("<q")  # mtime in us, INT64_MIN when unchanged
DIRTY_FIXED = struct.Struct("<Q")  # length of the dirty range, 0 = to end of file


def setattr_payload(path: str, mtime_us: int | None) -> bytes:
    return SETATTR_FIXED.pack(INT64_MIN if mtime_us is None else mtime_us) + encode_path(path)


def dirty_payload(length: int, reason: str) -> bytes:
    return DIRTY_FIXED.pack(length) + reason.encode("utf-8", "replace")


# ---- records ---------------------------------------------------------------


def encode_record(
    kind: int,
    seq: int,
    ts: int,
    file_id: int,
    offset: int,
    payload: bytes = b"",
    flags: int = 0,
) -> bytes:
    """A complete record (with checksum) as it lies on disk."""
    body = REC_HDR.pack(0, len(payload), seq, ts, file_id, offset, kind, flags, REC_MARKER, 0)[4:]
    body += payload
    crc = crc32c(body)
    out = struct.pack("<I", crc) + body
    return out + b"\0" * (align8(len(out)) - len(out))


# A pending record header: REC_HDR with crc, seq, flags and reserved left zero.
_PENDING_HDR = struct.Struct("<4xI8xqQQB1xH4x")
_PADS = tuple(bytes(i) for i in range(8))


def pack_pending(
    parts: list[Any], kind: int, file_id: int, offset: int, payload: Any, ts: int | None
) -> None:
    """Add a record's pieces (header, payload, zero padding) to parts;
    bytearray().join(parts) is the buffer for cdp_append_encoded (which fills
    seq and crc). Joining once copies every payload once, where growing a
    bytearray record by record copied the buffer again on each reallocation."""
    n = len(payload)
    parts.append(_PENDING_HDR.pack(n, INT64_MIN if ts is None else ts, file_id, offset, kind, REC_MARKER))
    if n:
        parts.append(payload)
        if n & 7:
            parts.append(_PADS[-n & 7])


# ---- segment header ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    uuid: bytes
    seg_no: int
    first_seq: int
    created_us: int
    flags: int = 0

    @property
    def compacted(self) -> bool:
        return bool(self.flags & SEG_COMPACTED)


# Segment header flags. COMPACTED (written by prune, retention.py): the
# segment's first seq may exceed the previous segment's last + 1; only its
# last record is a point of the journal (the others build that state).
SEG_COMPACTED = 1
SEG_FLAGS_KNOWN = SEG_COMPACTED
# Record flags bit 0, only in a COMPACTED segment: this record ends a group
# written by prune, and its seq is a kept point (docs/journal-format.md, Prune).
REC_KEPT = 1


def encode_segment_header(uuid: bytes, seg_no: int, first_seq: int, created_us: int,
                          flags: int = 0) -> bytes:
    """A segment header (what native cdp_segment_header writes, with flags)."""
    hdr = SEG_HDR.pack(SEGMENT_MAGIC, FORMAT_VERSION, SEG_HDR.size, flags, uuid, seg_no,
                       first_seq, created_us, 0, 0)
    return hdr[:60] + struct.pack("<I", crc32c(hdr[:60]))


def parse_segment_header(data: bytes, where: str) -> SegmentHeader:
    if len(data) < SEG_HDR.size:
        if SEGMENT_MAGIC.startswith(data[:8]):
            raise CorruptJournal(f"{where}: segment header truncated ({len(data)} of 64 bytes)")
        raise NotAJournal(f"{where}: not a journal segment (file too short)")
    magic, version, hsize, flags, uid, seg_no, first_seq, created, _res, crc = SEG_HDR.unpack_from(
        data
    )
    if magic != SEGMENT_MAGIC:
        raise NotAJournal(f"{where}: not a journal segment (magic {magic!r}, expected {SEGMENT_MAGIC!r})")
    if crc != crc32c(data[:60]):
        raise CorruptJournal(f"{where}: segment header checksum mismatch")
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"{where}: journal format version {version}; this cdpcore reads up to {FORMAT_VERSION}"
        )
    if version != FORMAT_VERSION or hsize != SEG_HDR.size or flags & ~SEG_FLAGS_KNOWN or _res != 0:
        raise CorruptJournal(
            f"{where}: bad segment header (version {version}, size {hsize}, flags {flags:#x})")
    return SegmentHeader(uid, seg_no, first_seq, created, flags)


# ---- meta file -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    uuid: bytes
    root: str
    created_us: int
    segment_size: int
    # the stored retention policy (cdpctl prune --save-policy), or None
    retention: dict[str, Any] | None = None

    def to_json(self) -> str:
        body = {
            "format": META_FORMAT,
            "version": FORMAT_VERSION,
            "uuid": str(uuidlib.UUID(bytes=self.uuid)),
            "root": self.root,
            "created_us": self.created_us,
            "segment_size": self.segment_size,
        }
        if self.retention is not None:
            body["retention"] = self.retention
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
        body["checksum"] = f"{crc32c(canon.encode()):08x}"
        return json.dumps(body, indent=2, sort_keys=True) + "\n"


def parse_meta(text: bytes, where: str) -> Meta:
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise NotAJournal(f"{where}: not a cdpcore journal ({META_NAME} is not JSON)") from None
    if not isinstance(body, dict) or body.get("format") != META_FORMAT:
        raise NotAJournal(f"{where}: not a cdpcore journal ({META_NAME} has no cdpcore format tag)")
    version = body.get("version")
    if not isinstance(version, int):
        raise CorruptJournal(f"{where}: {META_NAME} has no version")
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"{where}: journal format version {version}; this cdpcore reads up to {FORMAT_VERSION}"
        )
    claimed = body.pop("checksum", None)
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    if claimed != f"{crc32c(canon.encode()):08x}":
        raise CorruptJournal(f"{where}: {META_NAME} checksum mismatch")
    try:
        meta = Meta(
            uuidlib.UUID(body["uuid"]).bytes,
            str(body["root"]),
            int(body["created_us"]),
            int(body["segment_size"]),
            body.get("retention"),
        )
        if meta.retention is not None and not isinstance(meta.retention, dict):
            raise ValueError("retention is not an object")
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptJournal(f"{where}: {META_NAME} field missing or invalid: {e}") from None
    if meta.segment_size < MIN_SEGMENT_SIZE:
        raise CorruptJournal(f"{where}: segment size {meta.segment_size} below {MIN_SEGMENT_SIZE}")
    return meta


# ---- head file --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    next_seq: int
    seg_no: int
    seg_off: int
    pending: int
    next_file_id: int
    ns_gen: int
    synced_seq: int
    last_ts: int
    seg_size: int
    uuid: bytes
    # written in this boot: only then are its committed end and pending
    # flag to be believed (cdp_sync does not flush the head; docs/journal-format.md)
    current_boot: bool = True


def parse_head(data: bytes) -> Head | None:
    """The shared writer state, or None when absent or damaged (it is a cache
    that a writer rebuilds from the segments)."""
    if len(data) != HEAD_SIZE or bytes(data[HEAD_PRE_AT + HEAD_PRE.size :]) != _HEAD_RESERVED:
        return None  # the C writer maps exactly HEAD_SIZE bytes; the rest is reserved
    f = HEAD.unpack_from(data)
    if f[0] != HEAD_MAGIC or f[1] != 1:
        return None
    if f[2] != crc32c(data[HEAD_CRC_RANGE[0] : HEAD_CRC_RANGE[1]]):
        return None
    return Head(*f[3:], current_boot=head_boot(data) == BOOT_ID)


def head_prealloc(data: bytes) -> tuple[int, int]:
    """The preallocated tail (end, pending end) the head records; (0, 0)
    when its CRC fails (a head written before the fields existed)."""
    end, pending, crc = HEAD_PRE.unpack_from(data, HEAD_PRE_AT)
    if crc != crc32c(data[HEAD_PRE_AT : HEAD_PRE_AT + 16]):
        return 0, 0
    return end, pending


def head_boot(data: bytes) -> int:
    """The boot (cdp_boot_id) the head was written in; 0 before it was kept."""
    return int.from_bytes(data[HEAD_BOOT : HEAD_BOOT + 8], "little")


# ---- index file -------------------------------------------------------------------


@dataclass(slots=True)
class IndexData:
    """What a scan of one segment yields; stored as a .idx file once sealed."""

    seg_no: int
    first_seq: int
    count: int
    end: int
    ts_min: int
    ts_max: int
    file_id_max: int
    seqs: Any  # array('Q')
    tss: Any  # array('q'): running max of ts within the segment, at that record
    offs: Any  # array('Q')

    def to_bytes(self) -> bytes:
        n = len(self.seqs)
        hdr = IDX_HDR.pack(
            INDEX_MAGIC, FORMAT_VERSION, IDX_HDR.size, 0, self.seg_no, self.first_seq,
            self.count, self.end, self.ts_min, self.ts_max, self.file_id_max, n, 0, 0,
        )
        body = self.seqs.tobytes() + self.tss.tobytes() + self.offs.tobytes()
        crc = crc32c(body, crc32c(hdr[:-4]))
        return hdr[:-4] + struct.pack("<I", crc) + body


def parse_index(data: bytes) -> IndexData | None:
    """An index file, or None if it is damaged (it is rebuilt from the segment)."""
    from array import array

    if len(data) < IDX_HDR.size:
        return None
    f = IDX_HDR.unpack_from(data)
    if f[0] != INDEX_MAGIC or f[1] != FORMAT_VERSION or f[2] != IDX_HDR.size:
        return None
    n = f[11]
    if len(data) != IDX_HDR.size + 24 * n:
        return None
    if f[13] != crc32c(data[IDX_HDR.size :], crc32c(data[: IDX_HDR.size - 4])):
        return None
    body = memoryview(data)[IDX_HDR.size :]
    seqs, tss, offs = array("Q"), array("q"), array("Q")
    seqs.frombytes(body[: 8 * n])
    tss.frombytes(body[8 * n : 16 * n])
    offs.frombytes(body[16 * n :])
    return IndexData(f[4], f[5], f[6], f[7], f[8], f[9], f[10], seqs, tss, offs)

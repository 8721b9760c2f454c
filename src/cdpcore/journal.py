"""Journal: create, open, append to, read, index and verify a journal.

A journal is a directory:

    journal.json        format tag, version, UUID, protected root (checksummed)
    head                shared state of the writers (a cache, rebuilt on damage)
    segments/N.seg      records, N = 16 hex digits; only the last one grows
    segments/N.idx      sparse index of a sealed segment (a cache)
    base/NAME/          base snapshots named by BASE records

Appends go through the C writer (native/writer.c). Reading maps segments
read-only, validates every record with the C scan before decoding it, and
never yields bytes past a damaged record. See docs/journal-format.md.
"""
from __future__ import annotations

import bisect
import collections
import json
import os
import shutil
import threading
import uuid as uuidlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cdpcore._native import INT64_MIN, UINT64_MAX, check, ffi, lib, now_us
from cdpcore.errors import (
    CdpError,
    CorruptJournal,
    JournalExists,
    JournalNotFound,
    NotAJournal,
    PointError,
    StaleNamespace,
    UnsupportedVersion,
)
from cdpcore.filemap import FileMap, record_path
from cdpcore.format import (
    BASE_DIR,
    DEFAULT_SEGMENT_SIZE,
    HEAD_NAME,
    MAX_PAYLOAD,
    META_NAME,
    MIN_SEGMENT_SIZE,
    NO_MODE,
    REC_HDR,
    REC_KEPT,
    SEG_HDR,
    SEGMENT_DIR,
    Head,
    IndexData,
    Kind,
    Meta,
    decode_path,
    dirty_payload,
    encode_path,
    norm_path,
    pack_pending,
    pair_payload,
    HEAD_PRE_AT,
    head_prealloc,
    parse_head,
    parse_meta,
    parse_segment_name,
    segment_name,
    setattr_payload,
    split_pair,
)
from cdpcore.point import Point, PointLike, datetime_to_us, format_us, parse_point
from cdpcore.record import Record
from cdpcore.segment import STOP_REASONS, Segment

FILE_ID_BLOCK = 64
OPEN_SEGMENTS = 32  # segment mappings kept open (LRU)
_NS_LOCAL = frozenset({Kind.CREATE, Kind.RENAME, Kind.UNLINK, Kind.RMDIR, Kind.LINK, Kind.SYMLINK, Kind.BASE})
_RECS = -1  # a Batch op: WRITE records made in C (Batch.append_write_records)
_REC_SIZE = ffi.sizeof("struct cdp_rec")


@dataclass(slots=True)
class _BoundRecs:
    """WRITE records made in C, as _encode hands them to Writer.append_records:
    their file id and timestamp are set there (cdp_recs_bind)."""

    recs: Any  # struct cdp_rec[]
    n: int
    file_id: int
    ts: int
_NORM_CACHE: dict[str, str] = {}  # norm_path of recently appended paths
# Batches whose payloads average this many bytes are appended by pointer
# (cdp_append) instead of being copied into one buffer (cdp_append_encoded).
BY_POINTER_MIN = 16384


def _norm(path: Any) -> str:
    """norm_path, cached for str paths: writers name the same few files over
    and over, and normalising took a quarter of a batched 4 KiB append's
    time (docs/benchmarks.md)."""
    if type(path) is not str:
        return norm_path(path)
    p = _NORM_CACHE.get(path)
    if p is None:
        p = norm_path(path)
        if len(_NORM_CACHE) >= 4096:
            _NORM_CACHE.clear()
        _NORM_CACHE[path] = p
    return p


# Bumped in a forked child: an inherited Journal must not share the parent's
# block of file ids or its path cache (both would bind one id to two files).
_fork_gen = 0


def _after_fork_in_child() -> None:
    global _fork_gen
    _fork_gen += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _ensure_head_file(path: str) -> None:
    """A lost or short head (a cache) is recreated in place, zero-filled, so
    that the locker rebuilds it from the segments. In place, never by rename:
    two processes opening at once must end up locking the same file."""
    fd = os.open(os.path.join(path, HEAD_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_size < 4096:
            os.ftruncate(fd, 4096)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str, error: type[CdpError], what: str) -> Any:
    """The JSON document in a small state file, or None when there is none;
    an unreadable or unparsable one is `error` naming the file and `what`
    it should have been."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot read the {what}: {e}") from None


def write_durable(path: str, data: bytes) -> None:
    """temp file, fsync, rename, fsync of the directory."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(path) or ".")


def _ts(ts: int | datetime | None) -> int | None:
    if ts is None or isinstance(ts, int):
        return ts
    return datetime_to_us(ts)


@dataclass(slots=True)
class _SegInfo:
    """What is known of one segment without mapping it."""

    seg_no: int
    first_seq: int
    count: int
    end: int
    ts_max: int  # local max over the segment
    cum_ts_max: int  # running max over the journal through this segment
    file_id_max: int
    seqs: array
    tss: array
    offs: array
    compacted: bool = False  # a COMPACTED segment written by prune (retention.py)
    gap_last: int | None = None  # its last seq (seqs inside may skip: count does not tell)

    @property
    def last_seq(self) -> int:
        if self.gap_last is not None:
            return self.gap_last
        return self.first_seq + self.count - 1


@dataclass(frozen=True, slots=True)
class PointInfo:
    """A named restore point: a FLUSH (crash-consistent) or a BOOKMARK."""

    seq: int
    ts: int
    kind: str
    name: str | None

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "time": format_us(self.ts),
                "kind": self.kind, "name": self.name}


@dataclass(slots=True)
class Problem:
    severity: str  # "damage" or "warning"
    message: str
    segment: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.segment is not None:
            where = f"segment {self.segment:016x}"
            if self.offset is not None:
                where += f" offset {self.offset}"
            where += ": "
        return f"{self.severity}: {where}{self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "message": self.message,
                "segment": self.segment, "offset": self.offset}


@dataclass(slots=True)
class VerifyReport:
    segments: int = 0
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "damage" for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "segments": self.segments, "records": self.records,
                "first_seq": self.first_seq, "last_seq": self.last_seq, "bytes": self.bytes,
                "problems": [p.to_json() for p in self.problems]}


class Writer:
    """Owns a cdp_writer handle (freed by ffi.gc)."""

    def __init__(self, directory: str):
        out = ffi.new("cdp_writer **")
        check(lib.cdp_writer_open(os.fsencode(directory), out), f"open writer of {directory}")
        self.handle = ffi.gc(out[0], lib.cdp_writer_close)
        self.result = ffi.new("struct cdp_append_result *")

    def close(self) -> None:
        if self.handle is not None:
            ffi.release(self.handle)
            self.handle = None

    def lock(self) -> None:
        check(lib.cdp_writer_lock(self.handle), "lock journal")

    def unlock(self) -> None:
        lib.cdp_writer_unlock(self.handle)

    def get_state(self) -> Any:
        st = ffi.new("struct cdp_state *")
        return st if lib.cdp_writer_get_state(self.handle, st) == lib.CDP_OK else None

    def set_state(self, **kw: Any) -> None:
        st = ffi.new("struct cdp_state *")
        for k, v in kw.items():
            if k == "uuid":
                ffi.memmove(st.uuid, v, 16)
            else:
                setattr(st, k, v)
        check(lib.cdp_writer_set_state(self.handle, st))

    def append_encoded(self, buf: bytearray, expect_gen: int) -> tuple[int, int, int]:
        check(lib.cdp_append_encoded(self.handle, ffi.from_buffer(buf), len(buf), expect_gen,
                                     self.result), "append")
        r = self.result
        return r.first_seq, r.last_seq, r.ns_gen

    def set_writeback(self, nbytes: int) -> None:
        """cdp_writer_set_writeback: start the disk's writeback every
        nbytes appended (0: off)."""
        lib.cdp_writer_set_writeback(self.handle, nbytes)

    def append_records(self, recs: list[Any], expect_gen: int) -> tuple[int, int, int]:
        """cdp_append of (kind, flags, file_id, offset, ts, payload pointer,
        len) tuples, and of runs of records made in C (_BoundRecs); the
        pointers' owners are kept alive by recs."""
        if any(type(r) is _BoundRecs for r in recs):
            arr = ffi.new("struct cdp_rec[]", sum(r.n if type(r) is _BoundRecs else 1 for r in recs))
            i = 0
            for r in recs:
                if type(r) is _BoundRecs:
                    ffi.memmove(arr + i, r.recs, r.n * _REC_SIZE)
                    lib.cdp_recs_bind(arr + i, r.n, r.file_id, r.ts)
                    i += r.n
                else:
                    arr[i] = r
                    i += 1
        else:
            arr = ffi.new("struct cdp_rec[]", recs)
        check(lib.cdp_append(self.handle, arr, len(arr), expect_gen, self.result), "append")
        r = self.result
        return r.first_seq, r.last_seq, r.ns_gen

    def alloc_file_ids(self, n: int) -> int:
        first = ffi.new("uint64_t *")
        check(lib.cdp_alloc_file_ids(self.handle, n, first), "allocate file ids")
        return int(first[0])

    def sync(self) -> int:
        synced = ffi.new("uint64_t *")
        check(lib.cdp_sync(self.handle, synced), "sync")
        return int(synced[0])

    def stage_create(self, size: int) -> None:
        """Give the journal a stage (shared memory the capture library
        copies records into; native/writer.c explains)."""
        check(lib.cdp_stage_create(self.handle, size), "create the capture stage")

    def stage_remove(self) -> None:
        check(lib.cdp_stage_remove(self.handle), "remove the capture stage")

    def drain(self) -> None:
        """Move staged records into the journal, letting programs stage on."""
        check(lib.cdp_stage_drain(self.handle), "drain the capture stage")

    def prealloc(self, low: int, ahead: int) -> None:
        """Keep a durable zero tail in the active segment (cdp_prealloc), so
        that barriers can ride on the program's own flush."""
        check(lib.cdp_prealloc(self.handle, low, ahead), "preallocate the active segment")

    def ride(self, dev: int) -> int:
        """cdp_sync_ride: the seq the caller's flush of a file on dev will
        make durable (0: nothing to do); CdpError(ESTALE) when it cannot."""
        cover = ffi.new("uint64_t *")
        check(lib.cdp_sync_ride(self.handle, dev, cover), "ride a sync")
        return int(cover[0])

    def rode(self, cover: int) -> None:
        check(lib.cdp_sync_rode(self.handle, cover), "record a ridden sync")


def _pack_pointer(recs: list[tuple[Any, ...]], kind: int, file_id: int, offset: int, payload: Any,
                  ts: int | None) -> None:
    """pack_pending's counterpart for cdp_append: a record descriptor that
    points at the payload. A bytes payload is immutable and goes without a
    copy; any other buffer is copied first, so that the checksum and the
    bytes written are of one snapshot even if its owner changes it while
    the append runs (the GIL is released during the call)."""
    n = len(payload)
    if n:
        ptr = ffi.from_buffer(payload if type(payload) is bytes else bytes(payload))
    else:
        ptr = ffi.NULL
    recs.append((kind, 0, file_id, offset, INT64_MIN if ts is None else ts, ptr, n))


class Batch:
    """Records appended together, with consecutive sequence numbers, by one
    write. Used as `with journal.batch() as b: b.append_write(...)`; the
    records are written when the block ends without an exception. Appends
    are collected as operations and encoded at commit so that a namespace
    change by another writer in between (CDP_ESTALE) can be retried."""

    def __init__(self, journal: "Journal"):
        self._j = journal
        self._ops: list[tuple[Any, ...]] = []
        self._bytes = 0  # WRITE payload bytes collected
        self._recs = False  # an append_write_records among the ops
        self.first_seq = 0
        self.last_seq = 0

    def __len__(self) -> int:
        return len(self._ops)

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.commit()

    def commit(self, by_pointer: bool | None = None, writeback: int = 0) -> tuple[int, int]:
        """Write the collected records; returns (first_seq, last_seq).
        Bookmarks among them are entered in the audit log (cdpcore.audit).
        by_pointer forces how: None decides by the payloads' average size
        (BY_POINTER_MIN, tuned on a stream of batches, whose joined buffer
        malloc recycles); True suits one large batch in a process (a
        rollback's megabytes of 4 KiB writes), where joining means faulting
        in fresh memory for a copy of every byte. writeback > 0 starts the
        disk's writeback of the records every that many bytes appended
        (by_pointer appends only; cdp_writer_set_writeback), for a large
        batch that is synced right after."""
        if self._ops:
            if by_pointer is None:
                by_pointer = self._bytes >= BY_POINTER_MIN * len(self._ops)
            by_pointer = by_pointer or self._recs  # (records made in C exist as pointers only)
            marks = [bytes(op[4]).decode() for op in self._ops if op[0] == Kind.BOOKMARK]
            self.first_seq, self.last_seq = self._j._commit(self._ops, by_pointer, writeback)
            self._ops = []
            self._bytes = 0
            self._recs = False
            if marks:
                self._j._audit_bookmarks(marks, self.first_seq, self.last_seq)
        return self.first_seq, self.last_seq

    # Each op is (kind, path, file_id_needed, offset, payload, ts).
    def append_write(self, path: str, offset: int, data: Any, ts: int | datetime | None = None) -> None:
        if offset < 0:
            raise ValueError("offset must not be negative")
        # A mutable buffer is copied now: a caller that reuses its buffer for
        # the next page before the batch commits must not change this record.
        mv = data if type(data) is bytes else bytes(memoryview(data).cast("B"))
        p = _norm(path)
        t = ts if ts is None or type(ts) is int else _ts(ts)
        n = len(mv)
        self._bytes += n
        if n <= MAX_PAYLOAD:
            self._ops.append((Kind.WRITE, p, True, offset, mv, t))
            return
        for i in range(0, len(mv), MAX_PAYLOAD):
            self._ops.append((Kind.WRITE, p, True, offset + i, mv[i : i + MAX_PAYLOAD], t))

    def append_write_records(self, path: str, recs: Any, n: int, ts: int | datetime | None = None) -> None:
        """WRITE records to `path` already laid out in C (a struct cdp_rec[]
        of n, as cdp_put_back makes them: kind, offset, payload pointer and
        length set; file id and timestamp set here at commit). The memory
        their payloads point to must stay mapped and unchanged until the
        batch commits (a rollback's plan keeps its sources mapped until
        then); the batch is then written by pointer, without a copy."""
        if n:
            self._recs = True
            self._ops.append((_RECS, _norm(path), True, 0, (recs, n), _ts(ts)))

    def append_truncate(self, path: str, length: int, ts: int | datetime | None = None) -> None:
        if length < 0:
            raise ValueError("length must not be negative")
        self._ops.append((Kind.TRUNCATE, _norm(path), True, length, b"", _ts(ts)))

    def append_flush(self, path: str | None = None, ts: int | datetime | None = None) -> None:
        if path is None:
            self._ops.append((Kind.FLUSH, None, False, 0, b"", _ts(ts)))
        else:
            self._ops.append((Kind.FLUSH, _norm(path), True, 0, b"", _ts(ts)))

    def append_create(self, path: str, mode: int = 0o644, ts: int | datetime | None = None) -> None:
        p = norm_path(path)
        self._ops.append((Kind.CREATE, p, "new", mode & 0o7777, encode_path(p), _ts(ts)))

    def append_rename(self, old: str, new: str, ts: int | datetime | None = None) -> None:
        o, n = norm_path(old), norm_path(new)
        self._ops.append((Kind.RENAME, (o, n), False, 0, pair_payload(o, n), _ts(ts)))

    def append_unlink(self, path: str, ts: int | datetime | None = None) -> None:
        p = norm_path(path)
        self._ops.append((Kind.UNLINK, p, False, 0, encode_path(p), _ts(ts)))

    def append_mkdir(self, path: str, mode: int = 0o755, ts: int | datetime | None = None) -> None:
        p = norm_path(path)
        self._ops.append((Kind.MKDIR, p, False, mode & 0o7777, encode_path(p), _ts(ts)))

    def append_rmdir(self, path: str, ts: int | datetime | None = None) -> None:
        p = norm_path(path)
        self._ops.append((Kind.RMDIR, p, False, 0, encode_path(p), _ts(ts)))

    def append_setattr(self, path: str, mode: int | None = None, mtime_us: int | None = None,
                       ts: int | datetime | None = None) -> None:
        p = norm_path(path)
        m = NO_MODE if mode is None else mode & 0o7777
        self._ops.append((Kind.SETATTR, p, False, m, setattr_payload(p, mtime_us), _ts(ts)))

    def append_symlink(self, target: str, path: str, ts: int | datetime | None = None) -> None:
        p = norm_path(path)
        payload = os.fsencode(target) + b"\0" + encode_path(p)
        if b"\0" in os.fsencode(target):
            raise ValueError("symlink target contains NUL")
        self._ops.append((Kind.SYMLINK, p, False, 0, payload, _ts(ts)))

    def append_link(self, existing: str, new: str, ts: int | datetime | None = None) -> None:
        e, n = norm_path(existing), norm_path(new)
        self._ops.append((Kind.LINK, (e, n), False, 0, pair_payload(e, n), _ts(ts)))

    def append_dirty(self, path: str, offset: int = 0, length: int = 0, reason: str = "",
                     ts: int | datetime | None = None) -> None:
        self._ops.append((Kind.DIRTY, norm_path(path), True, offset, dirty_payload(length, reason), _ts(ts)))

    def bookmark(self, name: str, ts: int | datetime | None = None) -> None:
        self._ops.append((Kind.BOOKMARK, None, False, 0, _bookmark_payload(name), _ts(ts)))

    def append_base(self, reference: str, ts: int | datetime | None = None) -> None:
        self._ops.append((Kind.BASE, None, False, 0, reference.encode(), _ts(ts)))

    def append_audit(self, entry: int, digest: bytes, ts: int | datetime | None = None) -> None:
        """AUDIT: anchors audit-log entry number `entry`, whose SHA-256 is
        `digest` (cdpcore.audit writes these)."""
        if entry < 1 or len(digest) != 32:
            raise ValueError("an AUDIT record needs an entry number >= 1 and a 32-byte digest")
        self._ops.append((Kind.AUDIT, None, False, entry, bytes(digest), _ts(ts)))


def _bookmark_payload(name: str) -> bytes:
    raw = name.encode("utf-8")
    if not name or len(raw) > 255 or any(c in name for c in "\0\n\r"):
        raise ValueError(f"invalid bookmark name {name!r}: 1-255 bytes, no NUL or newline")
    return raw


class Journal:
    """A CDP journal. Use Journal.create() or Journal.open(); close() or a
    with-block releases it. Appending needs a journal opened writable."""

    def __init__(self, path: str, meta: Meta, readonly: bool):
        self.path = path
        self.meta = meta
        self.readonly = readonly
        self.recovery: list[str] = []  # what opening found and cut or ignored
        self._segdir = os.path.join(path, SEGMENT_DIR)
        self._writer: Writer | None = None
        self._segs: list[_SegInfo] = []
        self._open_segs: collections.OrderedDict[int, Segment] = collections.OrderedDict()
        self._damage: CorruptJournal | None = None
        self._cut_tail = False  # _load cut a torn tail: the head must be rebuilt
        self._paths: dict[str, int] = {}
        self._ns_gen = UINT64_MAX
        self._free_ids: list[int] = []
        self._bookmarks: list[PointInfo] | None = None
        self._seen: tuple[int, int, int] | None = None  # the head _load went by
        self._kept: tuple[tuple[tuple[int, int], ...], list[int], frozenset[int]] | None = None
        self._append_lock = threading.Lock()
        self._fork_gen = _fork_gen

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], root: str | os.PathLike[str],
               segment_size: int = DEFAULT_SEGMENT_SIZE, base: bool = True) -> "Journal":
        """Create a journal protecting directory `root`. With base=True and a
        non-empty root, the root is copied as the journal's first base."""
        path, root = os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(root))
        if segment_size < MIN_SEGMENT_SIZE:
            raise ValueError(f"segment size must be at least {MIN_SEGMENT_SIZE} bytes")
        if not os.path.isdir(root):
            raise FileNotFoundError(2, "protected root is not a directory", root)
        if path == root or path.startswith(root + os.sep):
            raise ValueError(f"journal {path} must not lie inside the protected root {root}")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise JournalExists(f"{path} exists and is not an empty directory")
        os.makedirs(os.path.join(path, SEGMENT_DIR), exist_ok=True)
        meta = Meta(uuidlib.uuid4().bytes, root, now_us(), segment_size)
        hdr = ffi.new("uint8_t[]", SEG_HDR.size)
        lib.cdp_segment_header(hdr, meta.uuid, 1, 1, meta.created_us)
        write_durable(os.path.join(path, SEGMENT_DIR, segment_name(1)), bytes(ffi.buffer(hdr)))
        write_durable(os.path.join(path, HEAD_NAME), bytes(4096))
        writer = Writer(path)
        writer.lock()
        try:
            writer.set_state(next_seq=1, seg_no=1, seg_off=SEG_HDR.size, next_file_id=1,
                             ns_gen=1, synced_seq=0, last_ts=INT64_MIN, seg_size=segment_size,
                             uuid=meta.uuid)
        finally:
            writer.unlock()
        writer.close()
        # journal.json last: a directory without it is not (yet) a journal.
        write_durable(os.path.join(path, META_NAME), meta.to_json().encode())
        j = cls.open(path)
        if base and os.listdir(root):
            j.take_base()
        return j

    @classmethod
    def open(cls, path: str | os.PathLike[str], readonly: bool = False) -> "Journal":
        path = os.path.abspath(os.fspath(path))
        from cdpcore.vault.replica import replica_journal

        # A vault's source directory (VAULT/NAME) stands for the replica journal inside it.
        path = replica_journal(path, readonly)
        if not os.path.exists(path):
            raise JournalNotFound(f"{path}: no such journal")
        if not os.path.isdir(path):
            raise NotAJournal(f"{path}: not a journal (not a directory)")
        meta_path = os.path.join(path, META_NAME)
        try:
            with open(meta_path, "rb") as f:
                raw = f.read(1 << 20)
        except FileNotFoundError:
            raise NotAJournal(f"{path}: not a journal (no {META_NAME})") from None
        except OSError as e:
            raise NotAJournal(f"{path}: cannot read {META_NAME}: {e.strerror}") from None
        meta = parse_meta(raw, meta_path)
        if not os.path.isdir(os.path.join(path, SEGMENT_DIR)):
            raise CorruptJournal(f"{path}: {SEGMENT_DIR}/ is missing")
        j = cls(path, meta, readonly)
        try:
            if not readonly:
                _ensure_head_file(path)
                j._writer = Writer(path)
                j._writer.lock()
                try:
                    from cdpcore.retention import recover_prune

                    note = recover_prune(path)
                    if note:
                        j.recovery.append(note)
                    j._load(recover=True)
                finally:
                    j._writer.unlock()
                if j._damage is not None:
                    raise j._damage
            else:
                if os.path.exists(os.path.join(path, "prune.json")):
                    raise CorruptJournal(f"{path}: a prune was interrupted (prune.json); open the "
                                         "journal for writing (Journal.open, cdpctl prune) to finish it")
                j._load(recover=False)
        except BaseException:
            j.close()
            raise
        return j

    def close(self) -> None:
        for seg in self._open_segs.values():
            seg.close()
        self._open_segs.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def root(self) -> str:
        return self.meta.root

    @property
    def uuid(self) -> str:
        return str(uuidlib.UUID(bytes=self.meta.uuid))

    # ---- loading and recovery ---------------------------------------------

    def _segment(self, seg_no: int) -> Segment:
        seg = self._open_segs.get(seg_no)
        if seg is not None:
            self._open_segs.move_to_end(seg_no)
            return seg
        try:
            seg = Segment(self._segdir, seg_no)
        except UnsupportedVersion:
            raise
        except NotAJournal as e:
            # journal.json is valid, so a segment file that is not a segment
            # (zeroed or overwritten header) is damage, not a foreign path.
            raise CorruptJournal(str(e), seg_no, 0) from None
        if seg.header.uuid != self.meta.uuid:
            seg.close()
            raise CorruptJournal("segment belongs to another journal (UUID differs)", seg_no, 0)
        self._open_segs[seg_no] = seg
        while len(self._open_segs) > OPEN_SEGMENTS:
            _, old = self._open_segs.popitem(last=False)
            old.close()
        return seg

    def _segment_numbers(self) -> list[int]:
        nums = sorted(n for n in (parse_segment_name(x) for x in os.listdir(self._segdir)) if n is not None)
        if not nums:
            raise CorruptJournal(f"{self.path}: journal has no segments")
        for a, b in zip(nums, nums[1:]):
            if b != a + 1:
                raise CorruptJournal(f"segment {a + 1:016x} is missing", a + 1)
        return nums

    def _read_head(self) -> Head | None:
        try:
            with open(os.path.join(self.path, HEAD_NAME), "rb") as f:
                data = f.read(4096)
        except OSError:
            return None
        for _ in range(3):  # a writer may be updating it under us
            head = parse_head(data)
            if head is not None:
                # a head from an earlier boot may predate synced records:
                # not to be believed (the segments are scanned instead)
                return head if head.uuid == self.meta.uuid and head.current_boot else None
            with open(os.path.join(self.path, HEAD_NAME), "rb") as f:
                data = f.read(4096)
        return None

    def _load(self, recover: bool) -> None:
        """Index every segment; with recover (lock held), cut a torn tail and
        rebuild the head when it is missing or damaged."""
        if recover:
            for name in os.listdir(self._segdir):
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(self._segdir, name))
        nums = self._segment_numbers()
        head = self._read_head()
        if not recover and head is not None and head.pending:
            # An append is in progress: segments it is starting are not
            # published yet (the writer may die, and the next locker then
            # removes them). Readers stop at the head's committed end.
            nums = [n for n in nums if n <= head.seg_no] or nums[:1]
        self._segs = []
        self._damage = None
        self._cut_tail = False
        expect_seq: int | None = None
        cum = INT64_MIN
        for i, n in enumerate(nums):
            last = i == len(nums) - 1
            seg = self._segment(n)
            seg.remap()
            if expect_seq is not None and seg.header.first_seq != expect_seq and not (
                    seg.header.compacted and seg.header.first_seq > expect_seq
                ):
                if last and recover and seg.size == SEG_HDR.size:
                    # an empty segment left by a rotation that never published
                    seg.close()
                    self._open_segs.pop(n, None)
                    os.unlink(seg.path)
                    break
                self._damage = CorruptJournal(
                    f"segment starts at seq {seg.header.first_seq}, expected {expect_seq}", n, 0)
                break
            if not last:
                data = seg.load_index()
                if data is None:
                    data, r = seg.build_index()
                    if not r.clean or r.end != seg.size:
                        self._segs.append(self._info(data, cum))
                        self._damage = CorruptJournal(r.reason, n, r.end)
                        break
                    if not self.readonly:
                        try:
                            write_durable(seg.index_path, data.to_bytes())
                        except OSError:
                            pass
            else:
                # Records end at the head's committed end. (A writable open
                # holds the lock, which has already cut a dead writer's
                # pending append; a reader must not see one in progress.)
                committed = head.seg_off if head is not None and head.seg_no == n else None
                limit = committed if committed is not None and committed <= seg.size else None
                r = seg.scan(limit=limit, with_index=True)
                assert r.index is not None
                data = IndexData(n, seg.header.first_seq, r.count, r.end, r.ts_min, r.ts_max,
                                 r.file_id_max, *r.index)
                ends = (r.clean and r.end == seg.size) or seg.preallocated_from(r.end, self.meta.segment_size)
                if (not ends or (committed is not None and committed > r.end)
                        or (head is not None and r.last_seq < head.synced_seq)):
                    self._tail(seg, r, head, recover)
            info = self._info(data, cum)
            info.compacted = seg.header.compacted
            if info.compacted:
                # seqs may skip: the last one is read from the records after
                # the index's last entry (at most 64 records or 256 KiB)
                info.gap_last = info.first_seq - 1
                if info.count:
                    r = seg.scan(start=info.offs[-1], expect_seq=info.seqs[-1], limit=info.end)
                    info.gap_last = r.last_seq
                    if not r.clean or r.end != info.end:
                        self._segs.append(info)
                        self._damage = CorruptJournal(r.reason, n, r.end)
                        break
            cum = info.cum_ts_max
            self._segs.append(info)
            expect_seq = info.last_seq + 1
        self._seen = (head.seg_no, head.seg_off, head.next_seq) if head is not None else None
        if recover and self._damage is None:
            self._rebuild_head(head)

    def _info(self, d: IndexData, cum: int) -> _SegInfo:
        return _SegInfo(d.seg_no, d.first_seq, d.count, d.end, d.ts_max, max(cum, d.ts_max),
                        d.file_id_max, d.seqs, d.tss, d.offs)

    def _tail(self, seg: Segment, r: Any, head: Head | None, recover: bool) -> None:
        """Decide what the end of the last segment is: damage (valid records
        follow the bad bytes, or records that sync() made durable are gone)
        or a torn tail (bytes of appends that were never synced, cut by a
        crash), which a writable open cuts."""
        committed = head.seg_off if head is not None and head.seg_no == seg.seg_no else None
        synced = head.synced_seq if head is not None else 0
        if not r.clean:
            follow = seg.find_valid_after(r.end, r.last_seq)
            if follow is not None:
                why = STOP_REASONS.get(r.stop, "damaged record")
                self._damage = CorruptJournal(f"{why}; valid records follow at offset {follow}",
                                              seg.seg_no, r.end)
                return
        if r.last_seq < synced:
            why = STOP_REASONS.get(r.stop, "segment ends") if not r.clean else "segment ends"
            self._damage = CorruptJournal(
                f"{why} after seq {r.last_seq}, but records up to seq {synced} were made durable",
                seg.seg_no, r.end)
            return
        if head is not None and head.pending and not recover:
            return  # an append in progress past the committed end: not ours to judge
        where = f"segment {seg.seg_no:016x} offset {r.end}"
        if committed is not None and committed > seg.size:
            # the head counted records that never reached the disk (a crash
            # before they were synced: allowed to lose them)
            self.recovery.append(
                f"records past seq {r.last_seq} that were appended but not synced are lost: "
                f"{where} ends the journal, the head counted up to offset {committed}")
        cut = seg.size - r.end
        if cut <= 0 or seg.preallocated_from(r.end, self.meta.segment_size):
            return  # the end, or the preallocated tail: nothing torn
        reason = STOP_REASONS.get(r.stop, "bytes past the committed end")
        if recover:
            with open(seg.path, "r+b") as f:
                f.truncate(r.end)
                os.fsync(f.fileno())
            seg.remap()
            # the head's preallocated tail went with the cut: rebuild it
            self._cut_tail = True
            self.recovery.append(f"cut a torn tail of {cut} bytes at {where} ({reason})")
        else:
            self.recovery.append(
                f"torn tail of {cut} bytes at {where} ({reason}); "
                "it is cut when the journal is next opened for writing")

    def _rebuild_head(self, head: Head | None) -> None:
        assert self._writer is not None
        last = self._segs[-1]
        fid = max((s.file_id_max for s in self._segs), default=0) + 1
        trusted = (head is not None and not head.pending and head.seg_no == last.seg_no
                   and head.seg_off == last.end and head.next_seq == last.last_seq + 1
                   and not self._cut_tail)
        if trusted:
            return
        if head is None:
            self.recovery.append("rebuilt the damaged or missing head file from the segments")
        self._writer.set_state(
            next_seq=last.last_seq + 1, seg_no=last.seg_no, seg_off=last.end,
            next_file_id=max(fid, head.next_file_id if head else 1),
            # a new generation invalidates every writer's cached file ids
            ns_gen=(head.ns_gen + 1) if head else now_us(),
            synced_seq=min(head.synced_seq, last.last_seq) if head else 0,
            last_ts=max(s.ts_max for s in self._segs), seg_size=self.meta.segment_size,
            uuid=self.meta.uuid)

    def refresh(self) -> None:
        """Pick up records appended since open (by this or other writers)."""
        head = self._read_head()
        if self._damage is not None:
            return
        if head is not None and (head.seg_no, head.seg_off, head.next_seq) == self._seen:
            return  # nothing published since _load judged this head (a torn tail, say)
        if head is None or head.seg_no != self._segs[-1].seg_no or head.seg_off != self._segs[-1].end:
            if head is not None and head.seg_no == self._segs[-1].seg_no and head.seg_off > self._segs[-1].end:
                self._extend(head.seg_off)
            else:
                self._segs = []
                self._load(recover=False)

    def _extend(self, committed: int) -> None:
        info = self._segs[-1]
        seg = self._segment(info.seg_no)
        seg.remap()
        r = seg.scan(start=info.end, expect_seq=info.last_seq + 1, limit=committed, with_index=True)
        assert r.index is not None
        if not r.clean:
            self._damage = CorruptJournal(r.reason, info.seg_no, r.end)
        if r.count:
            seqs, tss, offs = r.index
            base = info.ts_max
            info.seqs.extend(seqs)
            info.tss.extend(array("q", (max(base, t) for t in tss)))
            info.offs.extend(offs)
            info.count += r.count
            info.ts_max = max(info.ts_max, r.ts_max)
            info.cum_ts_max = max(info.cum_ts_max, r.ts_max)
            info.file_id_max = max(info.file_id_max, r.file_id_max)
        info.end = r.end

    # ---- appending ------------------------------------------------------------

    def _need_writer(self) -> Writer:
        if self._writer is None:
            raise PermissionError("journal is open read-only" if self.readonly else "journal is closed")
        return self._writer

    def _alloc_id(self) -> int:
        if not self._free_ids:
            first = self._need_writer().alloc_file_ids(FILE_ID_BLOCK)
            self._free_ids = list(range(first + FILE_ID_BLOCK - 1, first - 1, -1))
        return self._free_ids.pop()

    def _encode(self, ops: list[tuple[Any, ...]], by_pointer: bool = False) -> list[Any]:
        """Bind paths to file ids (adding FILEMAP records where a path has
        none yet) and lay the records out: as pieces of the buffer for
        cdp_append_encoded (to join), or with by_pointer as cdp_append
        record descriptors."""
        parts: list[Any] = []
        paths = self._paths
        pack = _pack_pointer if by_pointer else pack_pending
        for kind, path, needs_id, offset, payload, ts in ops:
            fid = 0
            if needs_id is True:
                fid = paths.get(path, 0)
                if not fid:
                    fid = self._alloc_id()
                    pack(parts, Kind.FILEMAP, fid, 0, encode_path(path), ts)
                    paths[path] = fid
            elif needs_id == "new":
                fid = self._alloc_id()
            if kind == _RECS:  # (by pointer only: Batch.commit sees to it)
                parts.append(_BoundRecs(payload[0], payload[1], fid, INT64_MIN if ts is None else ts))
                continue
            pack(parts, kind, fid, offset, payload, ts)
            if kind in _NS_LOCAL:
                self._apply_ns(kind, path, fid)
        return parts

    def _apply_ns(self, kind: int, path: Any, fid: int) -> None:
        paths = self._paths
        if kind == Kind.CREATE:
            paths[path] = fid
        elif kind in (Kind.UNLINK, Kind.SYMLINK):
            paths.pop(path, None)  # the name no longer names that file
        elif kind == Kind.RMDIR:
            for p in [p for p in paths if p == path or p.startswith(path + "/")]:
                del paths[p]
        elif kind == Kind.LINK:
            paths.pop(path[1], None)  # the new name: bound afresh (to the linked file) on first use
        elif kind == Kind.RENAME:
            old, new = path
            if old == new:
                return
            for p in [p for p in paths if p == new or p.startswith(new + "/")]:
                del paths[p]
            for p in [p for p in paths if p == old or p.startswith(old + "/")]:
                paths[new + p[len(old):]] = paths.pop(p)
        elif kind == Kind.BASE:
            paths.clear()

    def _commit(self, ops: list[tuple[Any, ...]], by_pointer: bool = False, writeback: int = 0) -> tuple[int, int]:
        # The path -> file id cache and the file-id block are this object's:
        # threads take turns from encoding to the append's result, or one
        # thread's FILEMAP could land after another's record that relies on it.
        if self._fork_gen != _fork_gen:
            self._fork_gen = _fork_gen
            self._append_lock = threading.Lock()  # a parent's thread may have held it
            self._free_ids = []
            self._paths.clear()
            self._ns_gen = UINT64_MAX
        with self._append_lock:
            if not writeback:
                return self._commit_locked(ops, by_pointer)
            writer = self._need_writer()
            writer.set_writeback(writeback)
            try:
                return self._commit_locked(ops, by_pointer)
            finally:
                writer.set_writeback(0)

    def _commit_locked(self, ops: list[tuple[Any, ...]], by_pointer: bool) -> tuple[int, int]:
        writer = self._need_writer()
        repaired = False
        for _ in range(100):
            if self._ns_gen == UINT64_MAX:
                st = writer.get_state()
                if st is None and not repaired:
                    self._repair_head()
                    repaired = True
                    st = writer.get_state()
                if st is None:
                    raise CorruptJournal("journal head is damaged; reopen the journal to rebuild it")
                self._ns_gen = st.ns_gen
                self._paths.clear()
            try:
                if by_pointer:
                    first, last, gen = writer.append_records(self._encode(ops, True), self._ns_gen)
                else:
                    buf = bytearray().join(self._encode(ops))
                    first, last, gen = writer.append_encoded(buf, self._ns_gen)
            except StaleNamespace:
                self._ns_gen = UINT64_MAX
                continue
            except CorruptJournal:
                # the C writer found the head damaged (a writer killed while
                # it updated the head leaves it so): rebuild it, once
                self._ns_gen = UINT64_MAX
                if repaired:
                    raise
                self._repair_head()
                repaired = True
                continue
            except BaseException:
                self._ns_gen = UINT64_MAX  # the cached ids may name records never written
                raise
            self._ns_gen = gen
            return first, last
        raise CorruptJournal("namespace keeps changing under this writer; giving up")

    def _repair_head(self) -> None:
        """Rebuild a damaged head file (a cache) from the segments, under the
        lock, as a writable open does."""
        writer = self._need_writer()
        writer.lock()
        try:
            if writer.get_state() is None:  # nobody repaired it while we waited
                self._load(recover=True)
        finally:
            writer.unlock()
        if self._damage is not None:
            raise self._damage

    def batch(self) -> Batch:
        return Batch(self)

    def _one(self, method: str, *args: Any, **kw: Any) -> int:
        b = Batch(self)
        getattr(b, method)(*args, **kw)
        return b.commit()[1]

    def append_write(self, path: str, offset: int, data: Any, ts: int | datetime | None = None) -> int:
        """Journal that `data` was written at `offset` of `path`; returns the seq."""
        return self._one("append_write", path, offset, data, ts)

    def append_truncate(self, path: str, length: int, ts: int | datetime | None = None) -> int:
        return self._one("append_truncate", path, length, ts)

    def append_flush(self, path: str | None = None, ts: int | datetime | None = None) -> int:
        """A crash-consistent point (of one file, or of everything)."""
        return self._one("append_flush", path, ts)

    def append_create(self, path: str, mode: int = 0o644, ts: int | datetime | None = None) -> int:
        return self._one("append_create", path, mode, ts)

    def append_rename(self, old: str, new: str, ts: int | datetime | None = None) -> int:
        return self._one("append_rename", old, new, ts)

    def append_unlink(self, path: str, ts: int | datetime | None = None) -> int:
        return self._one("append_unlink", path, ts)

    def append_mkdir(self, path: str, mode: int = 0o755, ts: int | datetime | None = None) -> int:
        return self._one("append_mkdir", path, mode, ts)

    def append_rmdir(self, path: str, ts: int | datetime | None = None) -> int:
        return self._one("append_rmdir", path, ts)

    def append_setattr(self, path: str, mode: int | None = None, mtime_us: int | None = None,
                       ts: int | datetime | None = None) -> int:
        return self._one("append_setattr", path, mode, mtime_us, ts)

    def append_symlink(self, target: str, path: str, ts: int | datetime | None = None) -> int:
        return self._one("append_symlink", target, path, ts)

    def append_link(self, existing: str, new: str, ts: int | datetime | None = None) -> int:
        return self._one("append_link", existing, new, ts)

    def append_dirty(self, path: str, offset: int = 0, length: int = 0, reason: str = "",
                     ts: int | datetime | None = None) -> int:
        return self._one("append_dirty", path, offset, length, reason, ts)

    def bookmark(self, name: str, ts: int | datetime | None = None) -> int:
        """Name the current point; restore with at="bookmark:NAME". The
        bookmark is entered in the audit log (durably) before this returns."""
        return self._one("bookmark", name, ts)

    def _audit_bookmarks(self, names: list[str], first_seq: int, last_seq: int) -> None:
        # Here rather than in cdpctl so that an embedder's bookmarks are
        # audited too. Not anchored in the journal (anchor=False): an AUDIT
        # record after every bookmark would put records in the journal that
        # the caller did not ask for; the next anchored action (restore,
        # rollback, prune, `cdpctl audit --anchor`) covers these entries.
        from cdpcore import audit

        for name in names:
            result = {"seq": last_seq} if first_seq == last_seq else {"batch": [first_seq, last_seq]}
            audit.append(self, "bookmark", {"name": name}, result, ok=True, anchor=False)

    def sync(self) -> int:
        """Group commit: every record appended before the call is durable on
        return. Returns the durable sequence number."""
        return self._need_writer().sync()

    def take_base(self) -> int:
        """Copy the protected root (offline: nothing may write to it meanwhile)
        into base/ and append a BASE record naming the copy."""
        writer = self._need_writer()
        st = writer.get_state()
        name = f"{st.next_seq:016x}"
        dest = os.path.join(self.path, BASE_DIR, name)
        tmp = dest + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copytree(self.root, tmp, symlinks=True)
        os.rename(tmp, dest)
        fsync_dir(os.path.dirname(dest))
        b = Batch(self)
        b.append_base(f"{BASE_DIR}/{name}")
        seq = b.commit()[1]
        self.sync()
        return seq

    # ---- reading ----------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self._segs[0].first_seq if self._segs else 1

    @property
    def last_seq(self) -> int:
        """Seq of the newest readable record (first_seq - 1 if none)."""
        self.refresh()
        return self._segs[-1].last_seq if self._segs else 0

    def _locate_seq(self, seq: int) -> tuple[_SegInfo, int]:
        """(segment, offset of an index entry at or before seq)."""
        i = bisect.bisect_right([s.first_seq for s in self._segs], seq) - 1
        info = self._segs[max(i, 0)]
        j = bisect.bisect_right(info.seqs, seq) - 1
        return info, (info.offs[j] if j >= 0 else SEG_HDR.size)

    def _iter_raw(self, start_seq: int, stop_seq: int) -> Iterator[tuple[int, int, int, int, int, int, memoryview]]:
        """(seq, ts, kind, flags, file_id, offset, payload) for seq in [start, stop],
        validated by the C scan before decoding. Raises CorruptJournal where
        reading has to stop."""
        for seg, pos, expect, end, last in self.spans(start_seq, stop_seq):
            # Validate in growing chunks so that a short read (a seek, one
            # record) checks little more than it returns.
            chunk = 64
            while expect <= min(stop_seq, last):
                r = seg.scan(start=pos, expect_seq=expect, limit=end, max_records=chunk)
                chunk = min(chunk * 4, 4096)
                view = seg.view()
                p = pos
                for _ in range(r.count):
                    _crc, n, seq, ts, fid, offset, kind, flags, _m, _r = REC_HDR.unpack_from(view, p)
                    if seq > stop_seq:
                        return
                    if seq >= start_seq:
                        yield seq, ts, kind, flags, fid, offset, view[p + 48 : p + 48 + n]
                    p += (48 + n + 7) & ~7
                if not r.clean:
                    raise CorruptJournal(r.reason, seg.seg_no, r.end)
                if r.count == 0:
                    break
                pos, expect = r.end, r.last_seq + 1

    def spans(self, start_seq: int, stop_seq: int) -> Iterator[tuple[Segment, int, int, int, int]]:
        """Where the records with seq in [start_seq, stop_seq] lie, segment by
        segment: (mapped segment, offset to read from, seq of the record
        there, end of its records, seq of its last record). The offset is an
        index entry at or before start_seq; readers validate from there (the
        C scan) and skip what comes before start_seq. The segment stays
        mapped until the next step. Raises CorruptJournal when the range
        reaches past damage."""
        if not self._segs or start_seq > stop_seq:
            if self._damage is not None and start_seq <= stop_seq:
                raise self._damage
            return
        info, off = self._locate_seq(start_seq)
        idx = self._segs.index(info)
        for info in self._segs[idx:]:
            if info.first_seq > stop_seq:
                return
            seg = self._segment(info.seg_no)
            if seg.size < info.end:
                seg.remap()
            pos = off if info.seg_no == self._segs[idx].seg_no else SEG_HDR.size
            yield seg, pos, self._seq_at(info, pos), info.end, info.last_seq
        if self._damage is not None and stop_seq > self._segs[-1].last_seq:
            raise self._damage

    def _seq_at(self, info: _SegInfo, pos: int) -> int:
        if pos == SEG_HDR.size:
            return info.first_seq
        j = bisect.bisect_left(info.offs, pos)
        return info.seqs[j]

    def records(self, since: PointLike | None = None, until: PointLike | None = None,
                path: str | None = None, kinds: Iterable[int] | None = None) -> Iterator[Record]:
        """Records that take the tree from state `since` to state `until`
        (seq in (resolve(since), resolve(until)]); by default all of them.
        `path` keeps records about that path or anything under it."""
        self.refresh()
        lo = self.resolve(since) + 1 if since is not None else self.first_seq
        # Without `until`, read to the true end: past a damaged record that
        # makes _iter_raw raise instead of stopping silently at the damage.
        hi = self.resolve(until) if until is not None else UINT64_MAX
        yield from self._records(lo, hi, path, kinds)

    def _records(self, lo: int, hi: int, path: str | None, kinds: Iterable[int] | None) -> Iterator[Record]:
        want = frozenset(int(k) for k in kinds) if kinds is not None else None
        top = norm_path(path) if path is not None else None
        fmap = FileMap()
        # File ids are bound by earlier records: replay namespace records
        # from the journal's start to know the paths at `lo`.
        for seq, _ts, kind, _fl, fid, _off, payload in self._iter_raw(self.first_seq, lo - 1):
            if kind in _NS_KINDS:
                fmap.apply(kind, fid, bytes(payload))
        for seq, ts, kind, flags, fid, offset, payload in self._iter_raw(lo, hi):
            raw = bytes(payload)
            if kind in _NS_KINDS:
                fmap.apply(kind, fid, raw)
            # namespace records name their path (MKDIR, SETATTR, LINK, ...
            # too); data records are about the file their id is bound to
            rpath = record_path(kind, raw)
            if rpath is None and fid:
                rpath = fmap.path_of(fid)
            if want is not None and kind not in want:
                continue
            if top is not None:
                other = None
                if kind in (Kind.RENAME, Kind.LINK):
                    other = decode_path(split_pair(raw)[1])
                if not any(p is not None and (p == top or p.startswith(top + "/")) for p in (rpath, other)):
                    continue
            yield Record(seq, ts, Kind(kind), fid, offset, raw, flags, rpath)

    def record(self, seq: int) -> Record:
        """The record with this seq (with its path resolved)."""
        self.refresh()
        if not self._segs or not self.first_seq <= seq <= self._segs[-1].last_seq:
            raise PointError(f"no record with seq {seq} (journal holds {self.first_seq}..{self.last_seq})")
        # by seq, not by point: inside pruned history seq - 1 may be no point
        for rec in self._records(seq, seq, None, None):
            return rec
        raise PointError(f"no record with seq {seq} (pruned)")

    def resolve(self, point: PointLike | Point | None) -> int:
        """The seq whose state the point names: the tree after that record."""
        p = parse_point("latest" if point is None else point)
        self.refresh()
        first = self.first_seq
        last = self._segs[-1].last_seq if self._segs else first - 1
        if p.kind == "latest":
            if self._damage is not None:
                raise self._damage  # the latest state lies past the damage
            return last
        if p.kind == "seq":
            assert isinstance(p.value, int)
            kept, kept_set = self._kept_points()
            if kept and 0 <= p.value < kept[-1] and p.value not in kept_set:
                shown = ", ".join(map(str, kept[:20])) + (", ..." if len(kept) > 20 else "")
                raise PointError(f"seq {p.value} was pruned; kept points: {shown} and every seq "
                                 f"after {kept[-1]}")
            if not first - 1 <= p.value <= last:
                raise PointError(f"seq:{p.value} is not in the journal (it holds {first}..{last})")
            return p.value
        if p.kind == "bookmark":
            hits = [b for b in self.bookmarks() if b.name == p.value]
            if not hits:
                raise PointError(f"no bookmark named {p.value!r}")
            return hits[-1].seq
        assert isinstance(p.value, int)
        return self._resolve_time(p.value)

    def compacted_points(self) -> list[int]:
        """The points a prune kept, oldest first: in COMPACTED segments, the
        records flagged KEPT and each segment's last record. Every seq after
        the last of them is a point too."""
        return self._kept_points()[0]

    def _kept_points(self) -> tuple[list[int], frozenset[int]]:
        key = tuple((s.seg_no, s.end) for s in self._segs if s.compacted)
        if self._kept is None or self._kept[0] != key:
            kept: list[int] = []
            for info in self._segs:
                if info.compacted and info.count:
                    kept.extend(seq for seq, _ts, _k, flags, *_ in self._iter_raw(info.first_seq, info.last_seq)
                                if flags & REC_KEPT or seq == info.last_seq)
            self._kept = (key, kept, frozenset(kept))
        return self._kept[1], self._kept[2]

    def _round_to_kept(self, seq: int) -> int:
        """seq, or inside pruned history the kept point at or before it
        (first_seq - 1 when none is)."""
        kept, kept_set = self._kept_points()
        if not kept or seq >= kept[-1] or seq in kept_set:
            return seq
        i = bisect.bisect_right(kept, seq)
        return kept[i - 1] if i else self.first_seq - 1

    def _resolve_time(self, t: int) -> int:
        """Longest prefix, in seq order, of records with ts <= t."""
        segs = self._segs
        if not segs or segs[-1].count == 0 and len(segs) == 1:
            raise PointError("the journal holds no records yet")
        cums = [s.cum_ts_max for s in segs]
        k = bisect.bisect_right(cums, t)
        if k == len(segs):
            if self._damage is not None:
                raise self._damage  # records past the damage may be at or before t
            return segs[-1].last_seq
        info = segs[k]
        j = bisect.bisect_right(info.tss, t)
        if j == 0:
            # the previous segment's last record (a compacted segment may
            # start past it)
            seq = segs[k - 1].last_seq if k > 0 else info.first_seq - 1
        else:
            seq = info.seqs[j - 1] - 1
            for s, ts, *_ in self._iter_raw(info.seqs[j - 1], info.last_seq):
                if ts > t:
                    break
                seq = s
        # Records folded by a prune keep timestamps up to their kept point's
        # (docs/journal-format.md, Prune): a prefix that ends inside a group
        # stands for the kept point before it.
        rounded = self._round_to_kept(seq)
        kept = self.compacted_points()
        if kept and rounded < kept[0]:
            raise PointError(f"{format_us(t)} is before the oldest kept point (seq {kept[0]}); "
                             "older history was pruned")
        seq = rounded
        if seq < self.first_seq:
            first_ts = next(self._iter_raw(self.first_seq, self.first_seq))[1]
            raise PointError(f"{format_us(t)} is before the journal's first record ({format_us(first_ts)})")
        return seq

    def bookmarks(self) -> list[PointInfo]:
        return [p for p in self.points() if p.kind == "BOOKMARK"]

    def points(self) -> list[PointInfo]:
        """Flush points (crash-consistent) and bookmarks, oldest first."""
        out = []
        kept, kept_set = self._kept_points()
        for rec in self.records(kinds=(Kind.FLUSH, Kind.BOOKMARK)):
            if kept and rec.seq < kept[-1] and rec.seq not in kept_set:
                continue  # inside pruned history: not a point any more
            out.append(PointInfo(rec.seq, rec.ts, rec.kind.name, rec.name if rec.kind == Kind.BOOKMARK else rec.path))
        return out

    def info(self) -> dict[str, Any]:
        self.refresh()
        head = self._read_head()
        first, last = self.first_seq, self._segs[-1].last_seq
        first_ts = last_ts = None
        if last >= first:
            first_ts = next(self._iter_raw(first, first))[1]
            last_ts = next(self._iter_raw(last, last))[1]
        size = sum(s.end for s in self._segs)
        return {
            "path": self.path, "uuid": self.uuid, "root": self.root, "format_version": 1,
            "created": format_us(self.meta.created_us), "segment_size": self.meta.segment_size,
            "segments": len(self._segs), "first_seq": first, "last_seq": last,
            "records": sum(s.count for s in self._segs),  # seqs may have gaps after a prune
            "first_time": format_us(first_ts) if first_ts is not None else None,
            "last_time": format_us(last_ts) if last_ts is not None else None,
            "bytes": size, "synced_seq": head.synced_seq if head else None,
            "recovery": list(self.recovery),
            "damage": str(self._damage) if self._damage else None,
        }

    def verify(self) -> VerifyReport:
        """Check every byte: meta, head, each segment's header and records,
        the chain of sequence numbers across segments, and the index files."""
        rep = VerifyReport()
        head_path = os.path.join(self.path, HEAD_NAME)
        from cdpcore.vault.replica import replica_dir_of

        try:
            with open(head_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError if replica_dir_of(self.path) else ():
            raw = b""  # a vault replica has no head: writers' shared state, not replicated
        except OSError as e:
            raw = b""
            rep.problems.append(Problem("damage", f"head file unreadable: {e.strerror}"))
        head = parse_head(raw) if raw else None
        if raw and head is None:
            rep.problems.append(Problem("damage", "head file is damaged (checksum or magic)"))
        elif head is not None and head.uuid != self.meta.uuid:
            rep.problems.append(Problem("damage", "head file belongs to another journal"))
            head = None
        elif head is not None and any(raw[HEAD_PRE_AT:]) and head_prealloc(raw) == (0, 0):
            rep.problems.append(Problem("damage", "head file's preallocation fields are damaged (checksum)"))
        elif head is not None and not head.current_boot:
            head = None  # written before this boot: a cache to rebuild, not evidence
        try:
            nums = self._segment_numbers()
        except CorruptJournal as e:
            rep.problems.append(Problem("damage", str(e), e.segment))
            return rep
        expect: int | None = None
        rep.first_seq = 0
        for i, n in enumerate(nums):
            last = i == len(nums) - 1
            try:
                seg = Segment(self._segdir, n)
            except (CorruptJournal, NotAJournal) as e:
                rep.problems.append(Problem("damage", str(e), n, 0))
                return rep
            try:
                rep.segments += 1
                if seg.header.uuid != self.meta.uuid:
                    rep.problems.append(Problem("damage", "segment belongs to another journal", n, 0))
                    return rep
                if expect is not None and seg.header.first_seq != expect and not (
                        seg.header.compacted and seg.header.first_seq > expect):
                    rep.problems.append(Problem(
                        "damage", f"segment starts at seq {seg.header.first_seq}, expected {expect}", n, 0))
                    return rep
                if expect is None:
                    rep.first_seq = seg.header.first_seq
                data, r = seg.build_index()
                rep.records += r.count
                rep.bytes += r.end
                expect = r.last_seq + 1
                rep.last_seq = r.last_seq  # also right when damage below returns early
                committed = head.seg_off if head is not None and head.seg_no == n else None
                zero_tail = last and seg.preallocated_from(r.end, self.meta.segment_size)
                if (not r.clean or r.end != seg.size) and not zero_tail:
                    follow = seg.find_valid_after(r.end, r.last_seq) if not r.clean else None
                    # a tail past the last record is torn (not damage) when no
                    # valid record follows and sync() never covered it
                    tail_ok = last and follow is None and (head is None or r.last_seq >= head.synced_seq)
                    if tail_ok:
                        rep.problems.append(Problem(
                            "warning", f"torn tail of {seg.size - r.end} bytes past the last committed "
                            f"record ({r.reason}); cut when next opened for writing", n, r.end))
                    else:
                        msg = r.reason
                        if follow is not None:
                            msg += f"; valid records follow at offset {follow}"
                        rep.problems.append(Problem("damage", msg, n, r.end))
                        return rep
                if last and committed is not None and r.end < committed:
                    lost_synced = head is not None and r.last_seq < head.synced_seq
                    rep.problems.append(Problem(
                        "damage" if lost_synced else "warning",
                        f"records end at offset {r.end}, the head says {committed}"
                        + ("" if lost_synced else " (appends never synced, lost in a crash)"), n, r.end))
                if not last and os.path.exists(seg.index_path):
                    stored = seg.load_index()
                    if stored is None or stored.to_bytes() != data.to_bytes():
                        rep.problems.append(Problem(
                            "damage", "index file is damaged or stale (rebuilt on next writable open)", n))
            finally:
                seg.close()
        rep.last_seq = (expect or 1) - 1
        if head is not None and rep.last_seq < head.synced_seq:
            rep.problems.append(Problem(
                "damage", f"records up to seq {head.synced_seq} were made durable, "
                f"the segments end at seq {rep.last_seq}"))
        elif head is not None and head.next_seq != rep.last_seq + 1 and head.seg_no == nums[-1]:
            rep.problems.append(Problem(
                "warning", f"head expects next seq {head.next_seq}, segments end at {rep.last_seq} "
                "(the head is rebuilt on the next writable open)"))
        self._verify_audit_chain(rep)
        self._verify_checkpoints(rep)
        return rep

    def _verify_checkpoints(self, rep: VerifyReport) -> None:
        # Checkpoints are a cache (checkpoint.py), like index files: one that
        # cannot be used is reported, and `cdpctl checkpoint` replaces it.
        from cdpcore import checkpoint

        for s in checkpoint.seqs(self):
            try:
                if s > rep.last_seq:
                    raise checkpoint.Invalid("past the journal's last record")
                checkpoint.load(self, s)
            except checkpoint.Invalid as e:
                rep.problems.append(Problem(
                    "warning", f"checkpoint at seq {s} is not usable ({e}); restores ignore it, "
                    "`cdpctl checkpoint` replaces it"))

    def _verify_audit_chain(self, rep: VerifyReport) -> None:
        # audit.log is part of the journal directory, so "every byte" covers
        # its hash chain too; comparing it with the AUDIT records is left to
        # `cdpctl audit --verify`, which costs another pass over the records.
        from cdpcore.audit import AUDIT_NAME, AuditLog

        for p in AuditLog(self).verify(cross_check=False).problems:
            where = f"entry {p.entry}" if p.entry is not None else f"line {p.line}"
            rep.problems.append(Problem("damage" if p.severity == "broken" else "warning",
                                        f"{AUDIT_NAME} {where}: {p.message}"))


_NS_KINDS = frozenset({Kind.FILEMAP, Kind.CREATE, Kind.UNLINK, Kind.RMDIR, Kind.SYMLINK, Kind.LINK,
                       Kind.RENAME, Kind.BASE})

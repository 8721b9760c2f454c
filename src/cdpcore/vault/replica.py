"""The replica: one source's copy of its journal in the vault.

Theory of operation. `VAULT/NAME/journal/` is kept a byte-identical prefix
of the source's journal (docs/replication.md, "What is replicated"), so
every read-only command and restore work on it unchanged. The replica is
written only through this class, and only with bytes that are proven
right before they touch the disk:

- segments: each DATA frame is unpacked (references resolved from the
  chunk index and re-verified by id), then the C scan checks the appended
  part is whole records with good CRCs whose seqs continue the segment's
  (gaps only in a COMPACTED segment). Only then is it written. A frame for
  bytes already held must carry the same bytes (a resend: skipped); a frame
  that starts past the end would leave a hole (refused).
- the durable truth after a crash is what the disk holds: a segment is cut
  back to its last valid record at open (bytes past it were never
  acknowledged: sync() acknowledges only what it fsync'd). Other files
  (audit.log, base files) cannot be checked by content, so their durable
  sizes are kept in `position.json`, written at each sync, and a file is
  cut back to that size at open.
- every path comes from this module's own naming (segment numbers) or
  from a frame's `file` string checked by `_rel_parts` and opened one
  component at a time with O_NOFOLLOW below the replica, so neither `..`
  nor a symlink written by an earlier base entry can lead outside.
- prune: the sender ships replacement segments into `N.seg.incoming` and
  new bases, then names the live set; `prune()` writes a manifest
  (`prune.json` in the source directory), swaps, deletes, then removes the
  manifest. A manifest found at open is finished first, so a crash leaves
  either the old set or the new one.

Encrypted sources keep no plaintext here: the work is done by
`sealed.SealedStore` with the same position and idempotence rules.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdpcore._native import INT64_MIN, check, ffi, fill_crcs, lib
from cdpcore.codec import BaseAt
from cdpcore.crypto import chunk_id
from cdpcore.errors import CorruptJournal, NotAJournal, ProtocolError, UnsupportedVersion, VaultError
from cdpcore.journal import fsync_dir, read_json, write_durable
from cdpcore.format import (
    BASE_DIR,
    META_NAME,
    SEG_HDR_SIZE,
    SEGMENT_DIR,
    SegmentHeader,
    parse_meta,
    parse_segment_header,
    parse_segment_name,
    segment_name,
)
from cdpcore.packing import unpack
from cdpcore.segment import STOP_END, STOP_REASONS
from cdpcore.vault.chunkindex import ChunkIndex

if TYPE_CHECKING:
    from cdpcore.vault.sealed import SealedStore

AUDIT_NAME = "audit.log"
INCOMING = ".incoming"
POSITION_NAME = "position.json"
PRUNE_NAME = "prune.json"
LOCK_NAME = "lock"
JOURNAL_DIR = "journal"
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_FRAME_OUTPUT = 64 * 1024 * 1024  # bytes one DATA frame may cover (end - off)
MAX_PATH = 4096

# Tests set this to a function that raises at a chosen step of a prune swap.
crash_hook: Callable[[str], None] | None = None


def _step(what: str) -> None:
    if crash_hook is not None:
        crash_hook(what)


def valid_name(name: str) -> bool:
    """A source, domain or base name: [A-Za-z0-9._-]{1,64}, not . or .."""
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and name not in (".", "..")




SOURCE_META = "source.json"
ACCESS_LOG = "access.log"


MATERIALIZED_MARK = ".cdpcore-replica-of"


def replica_dir_of(path: str) -> str | None:
    """VAULT/NAME when path is a replica journal (VAULT/NAME/journal, or a
    scratch journal materialised from an encrypted one), else None."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.basename(path) == JOURNAL_DIR and os.path.isfile(os.path.join(parent, SOURCE_META)):
        return parent
    try:
        with open(os.path.join(path, MATERIALIZED_MARK), encoding="utf-8") as f:
            rdir = f.read().strip()
    except OSError:
        return None
    return rdir if os.path.isfile(os.path.join(rdir, SOURCE_META)) else None


def replica_journal(path: str, readonly: bool) -> str:
    """The journal directory to open for `path`: VAULT/NAME stands for
    VAULT/NAME/journal. A replica is written only by the vault, so it
    opens read-only; an encrypted one needs its key (cdpctl --encrypt-key)."""
    top = path
    if os.path.isfile(os.path.join(path, SOURCE_META)) and not os.path.exists(os.path.join(path, META_NAME)):
        try:
            with open(os.path.join(path, SOURCE_META), "rb") as f:
                doc = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise VaultError(f"{path}/{SOURCE_META}: unreadable: {e}") from None
        if isinstance(doc, dict) and doc.get("encrypted"):
            from cdpcore.errors import KeyFileError

            raise KeyFileError(f"{path}: encrypted replica: pass --encrypt-key FILE")
        path = os.path.join(path, JOURNAL_DIR)
    else:
        top = replica_dir_of(path) or ""
    if top and not readonly and replica_dir_of(path) is not None:
        raise VaultError(f"{top} is a replica kept by the vault; it opens read-only")
    if top and os.path.exists(os.path.join(top, PRUNE_NAME)):
        raise VaultError(f"{top}: the vault is swapping in a prune of this replica; retry when it is done")
    return path


def access_log(rdir: str, entry: dict[str, Any]) -> None:
    """Who read what out of a replica (restore, verify...): one JSON line per
    action in VAULT/NAME/access.log, fsync'd."""
    line = json.dumps(entry, sort_keys=True, ensure_ascii=True, default=str) + "\n"
    fd = os.open(os.path.join(rdir, ACCESS_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ScanRun:
    end: int  # offset just past the last valid record
    count: int
    first_seq: int | None
    last_seq: int
    stop: int


def scan_records(buf: bytes | bytearray | memoryview | mmap.mmap, start: int, expect_seq: int,
                 gaps: bool, limit: int | None = None) -> ScanRun:
    """The C scan over buf[start:limit): whole records, CRCs good, seqs from
    expect_seq on (consecutive, or increasing when gaps)."""
    n = len(buf) if limit is None else limit
    if n <= start:
        return ScanRun(start, 0, None, expect_seq - 1, STOP_END)
    out = ffi.new("struct cdp_scan_result *")
    cbuf = ffi.from_buffer(buf)
    dummy_u = ffi.new("uint64_t[]", 1)
    dummy_i = ffi.new("int64_t[]", 1)
    check(lib.cdp_scan(cbuf, n, start, expect_seq, INT64_MIN, 0, 1 << 62, 1 << 62, dummy_u, dummy_i,
                       dummy_u, 0, out, 1 if gaps else 0))
    first = int.from_bytes(bytes(buf[start + 8:start + 16]), "little") if out.count else None
    del cbuf
    return ScanRun(int(out.end), int(out.count), first, int(out.last_seq), int(out.stop))


def _rel_parts(path: str) -> list[str]:
    """The components of a relative, normalised path from a frame, or a
    ProtocolError: no absolute path, no '.', '..' or empty component, no NUL."""
    if not isinstance(path, str) or not path or len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise ProtocolError(f"file path {path!r} is empty or too long")
    parts = path.split("/")
    for p in parts:
        if p in ("", ".", "..") or "\0" in p or len(p.encode("utf-8", "surrogateescape")) > 255:
            raise ProtocolError(f"file path {path!r} is not relative and normalised")
    return parts


@dataclass
class _Target:
    """One file being replicated: where, how far written and fsync'd."""

    key: str  # path relative to journal/ (segments/N.seg[.incoming], audit.log, base/X.incoming/P)
    kind: str  # "seg", "append" (audit.log, base files), "meta" (journal.json)
    size: int = 0  # bytes written
    durable: int = 0  # bytes fsync'd
    last_seq: int = 0
    header: SegmentHeader | None = None
    header_crc: int = 0
    seg: int | None = None
    name: str = ""  # what the frames call it: the file path, or "" for a segment


def _with_crcs(data: bytes, digest: int, records: bool, what: str) -> bytes:
    """data with its records' CRCs filled in, once they match the sender's
    digest (codec.to_columns leaves them out of segment runs)."""
    if not records:
        raise ProtocolError(f"record checksums left out of data for {what}, which is not a segment")
    buf = bytearray(data)
    try:
        mine = fill_crcs(buf)
    except ValueError:
        raise ProtocolError(f"data for {what} without record checksums is not a run of whole records") from None
    if mine != digest:
        raise ProtocolError(f"data for {what}: the records rebuilt differ from what the sender checksummed "
                            f"(digest {mine:08x}, the sender's {digest:08x})")
    return bytes(buf)


class Replica:
    """A source's replica; made by Vault.open_source()."""

    def __init__(self, name: str, directory: str, uuid: bytes, encrypted: bool, dedupe_key: bytes | None,
                 index: ChunkIndex, vault_path: str):
        self.name = name
        self.dir = directory
        self.uuid = uuid
        self.encrypted = encrypted
        self.dedupe_key = dedupe_key
        self.index = index
        self.vault_path = vault_path
        self.jdir = os.path.join(directory, JOURNAL_DIR)
        self.segdir = os.path.join(self.jdir, SEGMENT_DIR)
        self.recovery: list[str] = []
        self._targets: dict[str, _Target] = {}
        self._fds: dict[str, int] = {}
        self._dirty: set[str] = set()  # targets written since the last sync
        self._new_dirs: set[str] = set()  # directories holding files created since the last sync
        # base/NAME's own (mode, mtime ns), from its FILE entry: set again
        # once BASE renames the tree into place
        self._base_tops: dict[str, tuple[int, tuple[int, int]]] = {}
        self._sealed: dict[int, tuple[int, int]] = {}  # seg -> (size, last seq) when sealed
        self._position_dirty = False
        self.sealed_store: SealedStore | None = None
        # One writer per replica: a second connection of the same source (a
        # reconnect while the old one has not timed out yet) must not interleave.
        self._lock_fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise VaultError(f"source {name} is already being written (another connection holds "
                             f"{LOCK_NAME})") from None
        try:
            self._open(encrypted)
        except BaseException:
            self.close()
            raise

    def _open(self, encrypted: bool) -> None:
        if encrypted:
            from cdpcore.vault.sealed import SealedStore

            self.sealed_store = SealedStore(self)
        else:
            os.makedirs(self.segdir, exist_ok=True)
            self._load()

    # ---- opening: the durable truth ---------------------------------------------

    def _read_position(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.dir, POSITION_NAME), "rb") as f:
                doc = json.loads(f.read())
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            return doc
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise VaultError(f"{self.dir}/{POSITION_NAME}: unreadable ({e}); the replica needs repair") from None

    def _load(self) -> None:
        doc = self._read_position()
        self._sealed = {int(k): (int(v[0]), int(v[1])) for k, v in doc.get("sealed", {}).items()}
        if self._finish_prune():
            doc = self._read_position()
        for fname in sorted(os.listdir(self.segdir)):
            incoming = fname.endswith(INCOMING)
            base = fname[:-len(INCOMING)] if incoming else fname
            seg = parse_segment_name(base)
            if seg is None:
                continue
            self._load_segment(seg, os.path.join(SEGMENT_DIR, fname), incoming)
        files: dict[str, int] = {str(k): int(v) for k, v in doc.get("files", {}).items()}
        for rel, size in files.items():
            path = os.path.join(self.jdir, rel)
            try:
                have = os.lstat(path).st_size
            except FileNotFoundError:
                continue
            if have > size:
                with open(path, "r+b") as f:
                    f.truncate(size)
                    os.fsync(f.fileno())
                self.recovery.append(f"{self.name}: cut {have - size} unacknowledged bytes from {rel}")
            size = min(size, have)
            kind = "meta" if rel == META_NAME else "append"
            self._targets[rel] = _Target(rel, kind, size, size, name=rel.replace(INCOMING + "/", "/", 1))
        # journal.json is replaced whole, so whatever is there is durable.
        if META_NAME not in self._targets and os.path.exists(os.path.join(self.jdir, META_NAME)):
            n = os.path.getsize(os.path.join(self.jdir, META_NAME))
            self._targets[META_NAME] = _Target(META_NAME, "meta", n, n, name=META_NAME)

    def _load_segment(self, seg: int, key: str, incoming: bool) -> None:
        path = os.path.join(self.jdir, key)
        with open(path, "r+b") as f:
            data = f.read(SEG_HDR_SIZE)
            if len(data) < SEG_HDR_SIZE:
                # created but its header never made it: as if never begun
                f.close()
                os.unlink(path)
                self.recovery.append(f"{self.name}: removed {key} (header incomplete)")
                return
            try:
                hdr = parse_segment_header(data, path)
            except (CorruptJournal, NotAJournal, UnsupportedVersion) as e:
                raise VaultError(f"replica of {self.name}: {e}") from None
            if hdr.uuid != self.uuid or hdr.seg_no != seg:
                raise VaultError(f"replica of {self.name}: {key} belongs to another journal or segment")
            size = os.fstat(f.fileno()).st_size
            sealed = self._sealed.get(seg) if not incoming else None
            if sealed is not None and sealed[0] == size:
                # sealed and fsync'd at that size: trusted without a scan (opening a
                # vault of many sources must not read every byte it holds)
                end, last = sealed
            else:
                with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
                    r = scan_records(m, SEG_HDR_SIZE, hdr.first_seq, hdr.compacted)
                end, last = r.end, r.last_seq
                if end < size:
                    f.truncate(end)
                    os.fsync(f.fileno())
                    why = STOP_REASONS.get(r.stop, "")
                    self.recovery.append(f"{self.name}: cut a torn tail of {size - end} bytes from {key} "
                                         f"at offset {end} ({why})")
        crc = int.from_bytes(data[60:64], "little")
        self._targets[key] = _Target(key, "seg", end, end, last, hdr, crc, seg)

    # ---- position ----------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        """What WELCOME carries: per segment [seg, header_crc, durable size,
        sealed], files {path: durable size}, complete bases."""
        if self.sealed_store is not None:
            return self.sealed_store.position()
        segs = []
        for t in sorted(self._targets.values(), key=lambda t: (t.seg or 0, t.key)):
            if t.kind == "seg":
                assert t.seg is not None
                segs.append([t.seg, t.header_crc, t.durable,
                             not t.key.endswith(INCOMING) and self._sealed.get(t.seg, (-1, 0))[0] == t.durable])
        files = {t.name: t.durable for t in self._targets.values() if t.kind != "seg"}
        return {"segments": segs, "files": files, "bases": self.bases()}

    def bases(self) -> list[str]:
        bdir = os.path.join(self.jdir, BASE_DIR)
        try:
            names = os.listdir(bdir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.endswith(INCOMING) and valid_name(n))

    def last_seq(self) -> int:
        return max((t.last_seq for t in self._targets.values() if t.kind == "seg"), default=0)

    # ---- segments ----------------------------------------------------------------

    def _seg_key(self, seg: int) -> str:
        """The file DATA for segment seg goes to: its replacement when one is
        being shipped (a prune), else the live one."""
        inc = os.path.join(SEGMENT_DIR, segment_name(seg) + INCOMING)
        return inc if inc in self._targets else os.path.join(SEGMENT_DIR, segment_name(seg))

    def begin_segment(self, seg: int, header: bytes, replace: bool = False) -> None:
        """Open segment seg with its 64-byte header (into N.seg.incoming with
        replace, for a prune). Beginning one that exists with the same header
        is a no-op (a resend)."""
        if self.sealed_store is not None:
            return self.sealed_store.begin_segment(seg, header, replace)
        hdr = self._check_header(seg, header)
        live = os.path.join(SEGMENT_DIR, segment_name(seg))
        key = live + INCOMING if replace else live
        crc = int.from_bytes(header[60:64], "little")
        t = self._targets.get(key)
        if t is not None:
            if t.header_crc == crc:
                return
            if not replace:
                raise ProtocolError(f"segment {seg:016x} exists with another header; a prune's replacement "
                                    "must be sent with replace")
            self._close(key)
            os.unlink(os.path.join(self.jdir, key))
            del self._targets[key]
        if not replace:
            live_segs = [x.seg for x in self._targets.values() if x.kind == "seg" and not x.key.endswith(INCOMING)]
            if live_segs and seg != max(live_segs) + 1:  # type: ignore[operator]
                raise ProtocolError(f"segment {seg:016x} out of order: the replica's last segment is "
                                    f"{max(live_segs):016x}")  # type: ignore[type-var]
            self._check_chain(seg - 1, hdr)
        path = os.path.join(self.jdir, key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._fds[key] = fd
        os.pwrite(fd, header, 0)
        self._targets[key] = _Target(key, "seg", SEG_HDR_SIZE, 0, hdr.first_seq - 1, hdr, crc, seg)
        self._dirty.add(key)
        self._new_dirs.add(self.segdir)

    def _check_chain(self, prev: int, nxt: SegmentHeader | None) -> None:
        """Segment prev+1 must start at the seq after prev's last (later, in a
        COMPACTED one), once prev is sealed: else the replica would not open."""
        p = self._targets.get(os.path.join(SEGMENT_DIR, segment_name(prev)))
        if nxt is None:
            n = self._targets.get(os.path.join(SEGMENT_DIR, segment_name(prev + 1)))
            nxt = n.header if n is not None else None
        if p is None or nxt is None or prev not in self._sealed:
            return
        want = p.last_seq + 1
        if nxt.first_seq != want and not (nxt.compacted and nxt.first_seq > want):
            raise ProtocolError(f"segment {prev + 1:016x} starts at seq {nxt.first_seq}, but segment "
                                f"{prev:016x} was sealed ending at seq {p.last_seq}")

    def _check_header(self, seg: int, header: bytes) -> SegmentHeader:
        if not isinstance(header, bytes) or len(header) != SEG_HDR_SIZE:
            raise ProtocolError(f"segment header must be {SEG_HDR_SIZE} bytes")
        try:
            hdr = parse_segment_header(header, f"segment {seg:016x} header")
        except (CorruptJournal, NotAJournal, UnsupportedVersion) as e:
            raise ProtocolError(str(e)) from None
        if hdr.seg_no != seg:
            raise ProtocolError(f"segment header names segment {hdr.seg_no:016x}, frame says {seg:016x}")
        if hdr.uuid != self.uuid:
            raise ProtocolError(f"segment {seg:016x} belongs to another journal (uuid {hdr.uuid.hex()})")
        return hdr

    # ---- data ----------------------------------------------------------------------

    def _target_for(self, target: int | str) -> _Target:
        if isinstance(target, bool) or not isinstance(target, (int, str)):
            raise ProtocolError(f"data target must be a segment number or a file path, got {target!r}")
        if isinstance(target, int):
            t = self._targets.get(self._seg_key(target))
            if t is None:
                raise ProtocolError(f"data for segment {target:016x}, which was not begun")
            return t
        # A file target is registered only when bytes are written (apply_data),
        # so a refused frame leaves no trace in the position.
        if target in (META_NAME, AUDIT_NAME):
            return self._targets.get(target) or _Target(target, "meta" if target == META_NAME else "append",
                                                        name=target)
        parts = _rel_parts(target)
        if parts[0] != BASE_DIR or len(parts) < 3 or not valid_name(parts[1]):
            raise ProtocolError(f"file {target!r} is not journal.json, audit.log or base/NAME/PATH")
        if os.path.lexists(os.path.join(self.jdir, BASE_DIR, parts[1])):
            raise ProtocolError(f"data for {target!r}, but base {parts[1]} is already complete")
        key = "/".join([BASE_DIR, parts[1] + INCOMING, *parts[2:]])
        return self._targets.get(key) or _Target(key, "append", name=target)

    def apply_data(self, target: int | str, off: int, end: int, body: bytes,
                   first_seq: int | None = None, last_seq: int | None = None,
                   crcs: int | None = None) -> list[bytes]:
        """Apply DATA: bytes [off, end) of a segment or file, as a pack.
        Returns the referenced chunk ids the vault no longer has (the
        transport answers NEED and nothing is written), else []. Everything
        is checked before anything is written; a bad frame is a ProtocolError.
        crcs: the sender left the records' CRCs out (zero in the body) and
        sent this digest of them (Decompressor.crcs): each is recomputed
        here and the digest must match."""
        if self.sealed_store is not None:
            if crcs is not None:
                raise ProtocolError("record checksums left out of data for an encrypted source")
            return self.sealed_store.apply_data(target, off, end, body, first_seq, last_seq)
        t = self._target_for(target)
        if type(off) is not int or type(end) is not int or not 0 <= off < end or end - off > MAX_FRAME_OUTPUT:
            raise ProtocolError(f"data range [{off}, {end}) is empty, negative or over {MAX_FRAME_OUTPUT} bytes")
        if t.kind == "seg" and off < SEG_HDR_SIZE:
            raise ProtocolError(f"data for a segment starts at offset {off}, inside its header")
        if t.kind == "meta" and off != 0:
            raise ProtocolError(f"{META_NAME} is sent whole, from offset 0 (got offset {off})")
        if t.kind == "seg" and t.seg in self._sealed and not t.key.endswith(INCOMING) \
                and end > self._sealed[t.seg][0]:
            raise ProtocolError(f"data for {self._describe(t)} past its sealed size {self._sealed[t.seg][0]}")
        if t.kind != "meta" and off > t.size:
            raise ProtocolError(f"data for {self._describe(t)} starts at offset {off}, past the replica's "
                                f"end {t.size}: that would leave a hole")
        u = unpack(body, self.resolve, self.dedupe_key, max_output=end - off)
        if u.missing:
            return u.missing
        if len(u.data) != end - off:
            raise ProtocolError(f"data for {self._describe(t)} [{off}, {end}) unpacks to {len(u.data)} bytes")
        if crcs is not None:
            u.data = _with_crcs(u.data, crcs, t.kind == "seg", self._describe(t))
        if t.kind == "meta":
            self._replace_meta(t, u.data)
            self._targets[t.key] = t
            return []
        fd = self._fd(t)
        overlap = min(end, t.size) - off
        if overlap > 0 and os.pread(fd, overlap, off) != u.data[:overlap]:
            raise ProtocolError(f"resent bytes [{off}, {off + overlap}) of {self._describe(t)} differ from "
                                "the replica's")
        new = memoryview(u.data)[max(overlap, 0):]
        if not len(new):
            return []
        if t.kind == "seg":
            self._check_records(t, new, first_seq if overlap <= 0 else None, last_seq)
        os.pwrite(fd, new, t.size)
        self._targets[t.key] = t
        start = t.size
        t.size = end
        self._dirty.add(t.key)
        for cid, o, n in u.new_chunks:
            if off + o >= start:
                self.index.add(cid, self.name, t.key, off + o, n)
        return []

    def _check_records(self, t: _Target, new: memoryview, first_seq: int | None, last_seq: int | None) -> None:
        assert t.header is not None
        r = scan_records(new, 0, t.last_seq + 1, t.header.compacted)
        if r.stop != STOP_END or r.end != len(new):
            raise ProtocolError(f"data for {self._describe(t)} at offset {t.size + r.end}: "
                                f"{STOP_REASONS.get(r.stop, 'not whole records')} (expected seq "
                                f"{'> ' if t.header.compacted else ''}{r.last_seq + 1})")
        if first_seq is not None and r.first_seq != first_seq:
            raise ProtocolError(f"data for {self._describe(t)} says first seq {first_seq}, records start at "
                                f"{r.first_seq}")
        if last_seq is not None and r.last_seq != last_seq:
            raise ProtocolError(f"data for {self._describe(t)} says last seq {last_seq}, records end at "
                                f"{r.last_seq}")
        t.last_seq = r.last_seq

    def _replace_meta(self, t: _Target, data: bytes) -> None:
        try:
            meta = parse_meta(data, META_NAME)
        except (CorruptJournal, NotAJournal, UnsupportedVersion) as e:
            raise ProtocolError(f"{META_NAME} from the source does not parse: {e}") from None
        if meta.uuid != self.uuid:
            raise ProtocolError(f"{META_NAME} names journal {meta.uuid.hex()}, the source is {self.uuid.hex()}")
        path = os.path.join(self.jdir, META_NAME)
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    return
        except FileNotFoundError:
            pass
        write_durable(path, data)
        t.size = t.durable = len(data)
        self._position_dirty = True

    def _describe(self, t: _Target) -> str:
        return f"segment {t.seg:016x}" if t.kind == "seg" else repr(t.name)

    def _fd(self, t: _Target) -> int:
        fd = self._fds.get(t.key)
        if fd is not None:
            return fd
        if t.kind == "seg" or t.key == AUDIT_NAME:
            fd = os.open(os.path.join(self.jdir, t.key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o644)
        else:
            fd = self._open_below(t.key.split("/"))
        if t.size == 0 and os.fstat(fd).st_size:
            os.ftruncate(fd, 0)  # a file never acknowledged (no position.json entry): start over
        self._fds[t.key] = fd
        self._new_dirs.add(os.path.dirname(os.path.join(self.jdir, t.key)))
        return fd

    def _open_below(self, parts: list[str], directory: bool = False, create: bool = True) -> int:
        """Open (creating, unless not create) journal/PARTS one component at
        a time with O_NOFOLLOW: no symlink, even one made by an earlier base
        entry, is followed on the way."""
        dfd = os.open(self.jdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, p in enumerate(parts[:-1] if not directory else parts):
                if create:
                    try:
                        os.mkdir(p, 0o755, dir_fd=dfd)
                        self._new_dirs.add(os.path.join(self.jdir, *parts[:i]))
                    except FileExistsError:
                        pass
                try:
                    nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    raise ProtocolError(f"{'/'.join(parts[:i + 1])} is not a directory") from None
                os.close(dfd)
                dfd = nfd
            if directory:
                return os.dup(dfd)
            try:
                return os.open(parts[-1], os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            except OSError:
                raise ProtocolError(f"{'/'.join(parts)} is not a regular file") from None
        finally:
            os.close(dfd)

    def read_base(self, at: BaseAt) -> bytes | None:
        """The bytes a zstd-ref base names by place (codec.BaseAt): a range
        of a file of one of this replica's complete bases, read without
        following a symlink on the way; None if it is not there whole."""
        parts = _rel_parts(at.path)
        # bases()'s rule by name, without listing the directory for every
        # base read (hundreds a body); one that is not there fails to open
        if len(parts) < 3 or parts[0] != BASE_DIR or parts[1].endswith(INCOMING) or not valid_name(parts[1]):
            return None
        try:
            fd = self._open_below(parts[:-1], directory=True, create=False)
        except (ProtocolError, OSError):
            return None
        try:
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            data = os.pread(ffd, at.length, at.off)
        except OSError:
            return None
        finally:
            os.close(ffd)
        return data if len(data) == at.length else None

    def resolve(self, cid: bytes) -> bytes | None:
        """A referenced chunk's bytes, read back from the replica (or a
        domain sibling) and checked against its id; None if gone."""
        hit = self.index.lookup(cid)
        if hit is None or self.dedupe_key is None:
            return None
        source, key, off, n = hit
        if not valid_name(source):
            return None
        top = os.path.join(self.vault_path, source, JOURNAL_DIR)
        candidates = [key]
        if INCOMING in key:  # renamed into place since (a completed base or prune)
            candidates.append(key.replace(INCOMING, "", 1))
        for k in candidates:
            fd = self._fds.get(k) if source == self.name else None
            try:
                if fd is not None:
                    data = os.pread(fd, n, off)
                else:
                    with open(os.path.join(top, k), "rb") as f:
                        f.seek(off)
                        data = f.read(n)
            except OSError:
                continue
            if len(data) == n and chunk_id(self.dedupe_key, data) == cid:
                return data
        return None

    # ---- durability -----------------------------------------------------------------

    def sync(self) -> list[tuple[int | str, int, int | None]]:
        """fdatasync what was written since the last sync, then commit the
        chunk index; returns (target, durable size, last seq) for ACKs."""
        if self.sealed_store is not None:
            return self.sealed_store.sync()
        acks: list[tuple[int | str, int, int | None]] = []
        for key in sorted(self._dirty):
            t = self._targets[key]
            fd = self._fds.get(key)
            if fd is not None:
                os.fdatasync(fd)
            if t.kind != "seg" and t.durable != t.size:
                self._position_dirty = True
            t.durable = t.size
            acks.append((t.seg, t.durable, t.last_seq) if t.kind == "seg" else (t.name, t.durable, None))
        for d in sorted(self._new_dirs):
            if os.path.isdir(d):
                fsync_dir(d)
        self._new_dirs.clear()
        self._dirty.clear()
        if self._position_dirty:
            self._write_position()
        self.index.commit()
        return acks

    def _write_position(self) -> None:
        files = {t.key: t.durable for t in self._targets.values() if t.kind != "seg"}
        doc = {"files": files, "sealed": {str(k): list(v) for k, v in sorted(self._sealed.items())}}
        write_durable(os.path.join(self.dir, POSITION_NAME), json.dumps(doc, sort_keys=True).encode())
        self._position_dirty = False

    def seal(self, seg: int, size: int) -> None:
        """The source sealed segment seg at size: the replica must hold
        exactly that much; it is fsync'd and remembered as sealed."""
        if self.sealed_store is not None:
            return self.sealed_store.seal(seg, size)
        t = self._targets.get(os.path.join(SEGMENT_DIR, segment_name(seg)))
        if t is None or t.size != size:
            raise ProtocolError(f"seal of segment {seg:016x} at {size} bytes, the replica holds "
                                f"{'nothing' if t is None else t.size}")
        self.sync()
        old = self._sealed.get(seg)
        self._sealed[seg] = (size, t.last_seq)
        try:
            self._check_chain(seg, None)
        except ProtocolError:
            if old is None:
                del self._sealed[seg]
            else:
                self._sealed[seg] = old
            raise
        self._write_position()

    # ---- bases ------------------------------------------------------------------------

    def file_entry(self, path: str, size: int, mode: int, mtime_us: int, kind: str,
                   target: str | None = None) -> None:
        """A base entry is complete (the FILE frame): its bytes arrived as
        DATA (kind 'file'); directories and symlinks are made here."""
        if self.sealed_store is not None:
            return self.sealed_store.file_entry(path, size, mode, mtime_us, kind, target)
        parts = _rel_parts(path)
        if parts[0] != BASE_DIR or len(parts) < 2 or not valid_name(parts[1]):
            raise ProtocolError(f"base entry {path!r} is not base/NAME or base/NAME/PATH")
        if os.path.lexists(os.path.join(self.jdir, BASE_DIR, parts[1])):
            return  # the base is complete already: a resend
        if type(mode) is not int or type(mtime_us) is not int or type(size) is not int or size < 0:
            raise ProtocolError(f"base entry {path!r}: bad size, mode or mtime")
        if len(parts) == 2:  # base/NAME itself: the base's top directory
            if kind != "dir":
                raise ProtocolError(f"base entry {path!r}: a base is a directory, not a {kind!r}")
            top = os.path.join(self.jdir, BASE_DIR, parts[1] + INCOMING)
            os.makedirs(top, exist_ok=True)
            self._base_tops[parts[1]] = (mode & 0o7777, (mtime_us * 1000, mtime_us * 1000))
            os.chmod(top, (mode & 0o7777) | 0o700)
            os.utime(top, ns=(mtime_us * 1000, mtime_us * 1000))
            return
        inc = [BASE_DIR, parts[1] + INCOMING, *parts[2:]]
        key = "/".join(inc)
        ns = (mtime_us * 1000, mtime_us * 1000)
        if kind == "file":
            t = self._targets.get(key)
            if t is None and size == 0:
                t = self._targets.setdefault(key, _Target(key, "append", name=path))
            if t is None or t.size != size:
                raise ProtocolError(f"base entry {path!r} is {size} bytes, the vault received "
                                    f"{0 if t is None else t.size}")
            fd = self._fd(t)
            os.fchmod(fd, mode & 0o7777)
            os.utime(fd, ns=ns)
            self._dirty.add(key)
        elif kind == "dir":
            fd = self._open_below(inc, directory=True)
            try:
                os.fchmod(fd, (mode & 0o7777) | 0o700)  # the vault must be able to write into it
                os.utime(fd, ns=ns)
            finally:
                os.close(fd)
        elif kind == "symlink":
            if not isinstance(target, str) or not target or "\0" in target or len(target) > MAX_PATH:
                raise ProtocolError(f"base entry {path!r}: bad symlink target")
            dfd = self._open_below(inc[:-1], directory=True)
            try:
                try:
                    os.unlink(inc[-1], dir_fd=dfd)
                except FileNotFoundError:
                    pass
                except IsADirectoryError:
                    raise ProtocolError(f"base entry {path!r}: a directory is in the way") from None
                os.symlink(target, inc[-1], dir_fd=dfd)
                os.utime(inc[-1], ns=ns, dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(dfd)
            self._new_dirs.add(os.path.join(self.jdir, *inc[:-1]))
        else:
            raise ProtocolError(f"base entry {path!r}: unknown kind {kind!r}")

    def base_complete(self, name: str) -> None:
        """base/NAME is complete (the BASE frame): fsync its tree and rename
        it into place."""
        if self.sealed_store is not None:
            return self.sealed_store.base_complete(name)
        if not valid_name(name):
            raise ProtocolError(f"base name {name!r} is not valid")
        bdir = os.path.join(self.jdir, BASE_DIR)
        final, inc = os.path.join(bdir, name), os.path.join(bdir, name + INCOMING)
        if os.path.lexists(final):
            return
        if not os.path.isdir(inc):
            os.makedirs(inc)  # an empty base
        self.sync()
        _fsync_tree(inc)
        os.rename(inc, final)
        top = self._base_tops.pop(name, None)
        if top is not None:  # the top directory's own time, after the rename (which may touch it)
            os.utime(final, ns=top[1])
            fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(bdir)
        prefix = f"{BASE_DIR}/{name}{INCOMING}/"
        for key in [k for k in self._targets if k.startswith(prefix)]:
            self._close(key)
            del self._targets[key]
        self._position_dirty = True
        self._write_position()

    # ---- prune ------------------------------------------------------------------------

    def prune(self, segments: list[list[int]], bases: list[str]) -> None:
        """The source's live set after a prune: [[seg, header_crc, size]] and
        base names. Replacements shipped as N.seg.incoming are swapped in,
        segments and bases not named are removed. Crash-safe by manifest."""
        if self.sealed_store is not None:
            return self.sealed_store.prune(segments, bases)
        self.sync()
        swap: list[int] = []
        keep: list[int] = []
        for item in segments:
            if (not isinstance(item, (list, tuple)) or len(item) != 3
                    or not all(type(x) is int for x in item)):
                raise ProtocolError(f"prune: segment entry {item!r} is not [seg, header_crc, size]")
            seg, crc, size = item
            live = self._targets.get(os.path.join(SEGMENT_DIR, segment_name(seg)))
            inc = self._targets.get(os.path.join(SEGMENT_DIR, segment_name(seg) + INCOMING))
            if inc is not None and inc.header_crc == crc and inc.size == size:
                swap.append(seg)
            elif live is not None and live.header_crc == crc and live.size == size:
                keep.append(seg)
            else:
                raise ProtocolError(f"prune names segment {seg:016x} (crc {crc:08x}, {size} bytes), which the "
                                    "vault does not hold complete")
        for b in bases:
            if not valid_name(b) or not os.path.isdir(os.path.join(self.jdir, BASE_DIR, b)):
                raise ProtocolError(f"prune names base {b!r}, which the vault does not hold complete")
        named = set(swap) | set(keep)
        remove = sorted(t.seg for t in self._targets.values()  # type: ignore[misc]
                        if t.kind == "seg" and not t.key.endswith(INCOMING) and t.seg not in named)
        drop_bases = [b for b in self.bases() if b not in bases]
        manifest = {"swap": sorted(swap), "remove": remove, "bases": drop_bases}
        _step("manifest")
        write_durable(os.path.join(self.dir, PRUNE_NAME), json.dumps(manifest).encode())
        for key in list(self._fds):
            self._close(key)
        self._finish_prune()
        self._targets = {k: t for k, t in self._targets.items() if t.kind != "seg"}
        self._load()

    def _finish_prune(self) -> bool:
        """Finish a swap whose manifest is on disk (every step can be redone)."""
        mpath = os.path.join(self.dir, PRUNE_NAME)
        manifest = read_json(mpath, VaultError, "prune manifest")
        if manifest is None:
            return False
        sealed_changed = False
        for seg in manifest["swap"]:
            live = os.path.join(self.segdir, segment_name(seg))
            if os.path.exists(live + INCOMING):
                _step(f"swap {seg}")
                os.replace(live + INCOMING, live)
                self.index.drop_target(self.name, os.path.join(SEGMENT_DIR, segment_name(seg)))
                self.index.rename_target(self.name, os.path.join(SEGMENT_DIR, segment_name(seg) + INCOMING),
                                         os.path.join(SEGMENT_DIR, segment_name(seg)))
            if self._sealed.pop(seg, None) is not None:
                sealed_changed = True
        for seg in manifest["remove"]:
            path = os.path.join(self.segdir, segment_name(seg))
            if os.path.exists(path):
                _step(f"remove {seg}")
                os.unlink(path)
                self.index.drop_target(self.name, os.path.join(SEGMENT_DIR, segment_name(seg)))
            if self._sealed.pop(seg, None) is not None:
                sealed_changed = True
        fsync_dir(self.segdir)
        for b in manifest["bases"]:
            path = os.path.join(self.jdir, BASE_DIR, b)
            if os.path.lexists(path):
                _step(f"remove base {b}")
                doomed = path + ".removing"
                os.replace(path, doomed)  # one rename: the base is gone or whole, never half
                shutil.rmtree(doomed)
            # its chunks' entries (named under base/NAME.incoming/, where the
            # files were written; resolve() looks in base/NAME/ too): without
            # this the index only grows, and every lookup of them misses
            for prefix in (f"{BASE_DIR}/{b}{INCOMING}/", f"{BASE_DIR}/{b}/"):
                self.index.drop_below(self.name, prefix)
        _step("done")
        if sealed_changed:
            doc = self._read_position()
            doc["sealed"] = {str(k): list(v) for k, v in sorted(self._sealed.items())}
            write_durable(os.path.join(self.dir, POSITION_NAME), json.dumps(doc, sort_keys=True).encode())
        os.unlink(mpath)
        fsync_dir(self.dir)
        self.recovery.append(f"{self.name}: prune swap finished ({len(manifest['swap'])} replaced, "
                             f"{len(manifest['remove'])} removed)")
        return True

    # ---- lifecycle ------------------------------------------------------------------------

    def _close(self, key: str) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self._close(key)
        if self.sealed_store is not None:
            self.sealed_store.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> "Replica":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fsync_tree(top: str) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if stat.S_ISREG(os.lstat(p).st_mode):
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)

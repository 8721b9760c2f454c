"""Feed: the sender's view of a source journal for replication.

Theory of operation (docs/replication.md, "What is replicated", "Position").

The journal keeps being written by other processes while a Feed reads it,
so a Feed never opens it for writing and never trusts bytes the writers
have not published:

* Records are shipped only once the C scan (segment.py) accepts them, and
  in the active segment only up to the head's committed end: a writer that
  dies mid-append leaves valid-looking records past that end which the next
  locker cuts (their seqs are then reused), so shipping them would let the
  replica diverge. While the head says an append is in progress, segments
  past the head's active one are not looked at (a rotation not published
  yet). A head that is missing, damaged or from an earlier boot is not
  believed (journal-format.md, "Boot"); then the scan alone decides, as for
  any read-only reader.
* A segment is sealed once a later segment is published; only then does a
  SealItem go out (after all its records).
* A base copy is complete when its directory has its final name under
  base/: every writer of bases renames the copy into place only once it is
  whole (take_base: before its BASE record; the online baseline: after the
  "baseline NAME complete" bookmark is durable; prune: under its manifest).
  Names ending in ``.tmp`` or ``.prune`` are copies in progress and are never
  shipped. Complete bases are immutable, so they are shipped once, before the
  records (a replica restores nothing without its base).
* While ``prune.json`` exists a prune is swapping segments: the Feed ships
  nothing until it is gone. A prune replaces sealed segments under the same
  numbers with new headers; the header CRC tells them apart. Replacing
  segments go to the receiver's ``.incoming`` (SegmentItem.replace) and a
  PruneItem then names the live set.
* ``journal.json`` is shipped whole, once per connection and again whenever
  its bytes change; ``audit.log`` is shipped append-only and only up to its
  last newline (an interrupted append leaves a torn last line that the next
  append cuts, so those bytes may never become part of the log).

Use: ``plan(position)`` at the start of a connection (the receiver's durable
position from WELCOME) returns an iterator over everything the replica lacks
right now; it reads lazily, so memory stays at one item however far behind
the replica is. The Feed assumes each yielded item is sent; after a
reconnect, ``plan`` again from the new position. In follow mode, ``poll()``
says cheaply (a few stat calls and one 4 KiB read, no scan) whether anything
changed, and ``items()`` yields what is new. Nothing here blocks for long
or imports trio: a transport calls it from its loop (or a worker thread).
"""
from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Union

from cdpcore.errors import CorruptJournal, JournalNotFound, NotAJournal, ProtocolError, VaultError
from cdpcore.format import (
    BASE_DIR,
    HEAD_NAME,
    HEAD_SIZE,
    META_NAME,
    REC_HDR,
    SEG_HDR_SIZE,
    SEGMENT_DIR,
    Head,
    parse_head,
    parse_meta,
    parse_segment_header,
    parse_segment_name,
    segment_name,
)
from cdpcore.segment import STOP_LIMIT, Segment

# The largest run of records per RunItem (one DATA frame's input). 4 MiB:
# on the HIS workload 1 MiB runs cost 9 % more wire bytes (more OFFERs and
# ACKs, and each zstd-ref dictionary sees fewer of the pages a transaction
# touches); 4 MiB of incompressible bytes still fits the 8 MiB frame cap.
DEFAULT_RUN_BYTES = 4 << 20
DB_PAGE = 4096  # SQLite's default page; PostgreSQL's 8 KiB pages are two of them
AUDIT_NAME = "audit.log"
PRUNE_MANIFEST = "prune.json"
_INCOMPLETE_SUFFIXES = (".tmp", ".prune")
_CRC = struct.Struct("<I")


# ---- items ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentItem:
    """Open segment `seg` on the replica with this 64-byte header; with
    replace, into ``segments/N.seg.incoming`` (a prune replaced it)."""

    seg: int
    header: bytes
    replace: bool


@dataclass(frozen=True, slots=True)
class RunItem:
    """Bytes [off, end) of segment `seg`: whole, validated records with seqs
    first_seq..last_seq. first_ts is the first record's timestamp, last_ts
    the largest timestamp in the run (lag: the transport keeps first_ts of
    the oldest unacknowledged run)."""

    seg: int
    off: int
    end: int
    buf: bytes
    first_seq: int
    last_seq: int
    first_ts: int
    last_ts: int


@dataclass(frozen=True, slots=True)
class SealItem:
    """Segment `seg` is complete at `size` bytes (a later segment exists)."""

    seg: int
    size: int


@dataclass(frozen=True, slots=True)
class FileItem:
    """Bytes [off, end) of a journal file: ``journal.json`` (whole: off 0,
    the file is replaced), ``audit.log`` (appended) or ``base/NAME/PATH``
    (a base file's content, in order from 0)."""

    path: str
    off: int
    end: int
    buf: bytes
    whole: bool = False
    page: int = 0  # cut into fixed pages of this size (packing.pack(page=...)), 0: FastCDC


@dataclass(frozen=True, slots=True)
class EntryItem:
    """A base entry is complete (the ``file`` frame): a file after all its
    bytes, a symlink, or a directory after everything inside it (its mtime
    is set last)."""

    path: str
    size: int
    mode: int
    mtime_us: int
    kind: str  # "file", "dir", "symlink"
    target: str | None = None


@dataclass(frozen=True, slots=True)
class BaseItem:
    """base/NAME is complete on the replica once every entry is."""

    name: str


@dataclass(frozen=True, slots=True)
class PruneItem:
    """The replica's live set after a prune on the source: segments
    [(seg, header_crc, size)] and base names. Every segment listed is
    either live on the replica with that header or was just shipped with
    replace=True."""

    segments: list[tuple[int, int, int]]
    bases: list[str]


Item = Union[SegmentItem, RunItem, SealItem, FileItem, EntryItem, BaseItem, PruneItem]


# ---- the receiver's position ------------------------------------------------------


@dataclass(slots=True)
class Position:
    """What a replica holds durably (WELCOME's ``position``, also what ACKs
    build up): per segment (header_crc, durable size, sealed), file sizes,
    complete bases."""

    segments: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    bases: set[str] = field(default_factory=set)
    # A segment number listed twice: a prune's N.seg.incoming beside the
    # live N.seg (the vault lists both, each with its own header CRC).
    twins: dict[int, tuple[int, int, bool]] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any) -> "Position":
        """Check a position from the wire; anything malformed is a ProtocolError."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ProtocolError(f"position: expected a map, got {type(raw).__name__}")
        pos = cls()
        segs = raw.get("segments", [])
        if not isinstance(segs, (list, tuple)):
            raise ProtocolError("position: segments is not a list")
        for e in segs:
            if (not isinstance(e, (list, tuple)) or len(e) != 4
                    or not all(type(v) is int for v in e[:3]) or not isinstance(e[3], bool)):
                raise ProtocolError(f"position: bad segment entry {e!r:.80}")
            seg, crc, size, sealed = e
            if seg < 1 or not 0 <= crc < 2**32 or size < 0 or seg in pos.twins:
                raise ProtocolError(f"position: bad segment entry {e!r:.80}")
            if size and size < SEG_HDR_SIZE:
                raise ProtocolError(f"position: segment {seg} size {size} is inside its header")
            if seg in pos.segments:
                if pos.segments[seg][0] == crc:
                    raise ProtocolError(f"position: segment {seg} listed twice with one header")
                pos.twins[seg] = (crc, size, sealed)
            else:
                pos.segments[seg] = (crc, size, sealed)
        files = raw.get("files", {})
        if not isinstance(files, dict):
            raise ProtocolError("position: files is not a map")
        for k, v in files.items():
            if not isinstance(k, str) or type(v) is not int or v < 0:
                raise ProtocolError(f"position: bad file entry {k!r:.80}")
            pos.files[k] = v
        bases = raw.get("bases", [])
        if not isinstance(bases, (list, tuple)) or not all(isinstance(b, str) for b in bases):
            raise ProtocolError("position: bases is not a list of names")
        pos.bases = set(bases)
        return pos

    def to_wire(self) -> dict[str, Any]:
        segs = sorted([[n, *v] for n, v in self.segments.items()] + [[n, *v] for n, v in self.twins.items()])
        return {"segments": segs,
                "files": dict(self.files), "bases": sorted(self.bases)}


# ---- the source's segments ----------------------------------------------------------


@dataclass(slots=True)
class _Seg:
    """What the Feed knows of one source segment."""

    seg: int
    header: bytes
    crc: int
    first_seq: int
    compacted: bool
    ino: int
    end: int = SEG_HDR_SIZE  # validated end (whole accepted records, never past the committed end)
    last_seq: int = 0        # seq of the record ending at `end` (first_seq - 1 when none)
    sealed: bool = False
    damage: CorruptJournal | None = None
    handle: Segment | None = None
    size: int = 0            # the file's size at the last scan
    done: bool = False       # sealed and validated to its end: nothing left to look at


def _header_crc(header: bytes) -> int:
    return int(_CRC.unpack_from(header, 60)[0])


def is_vault_replica(path: str) -> bool:
    """True for VAULT/NAME/journal: a replica a vault keeps (vault/vault.py
    writes VAULT/vault.json and VAULT/NAME/source.json)."""
    src = os.path.dirname(path)
    return (os.path.basename(path) == "journal" and os.path.isfile(os.path.join(src, "source.json"))
            and os.path.isfile(os.path.join(os.path.dirname(src), "vault.json")))


class Feed:
    """The sender's read-only view of a journal directory (module docstring)."""

    def __init__(self, journal_path: str | os.PathLike[str], run_bytes: int = DEFAULT_RUN_BYTES):
        path = os.path.abspath(os.fspath(journal_path))
        if not os.path.exists(path):
            raise JournalNotFound(f"{path}: no such journal")
        if not os.path.isdir(path):
            raise NotAJournal(f"{path}: not a journal (not a directory)")
        if is_vault_replica(path):
            # its source.json and the vault's vault.json sit right above it.
            # Shipping it to its own vault would append the replica to
            # itself; to another vault, a cascade nobody designed for.
            raise VaultError(f"{path} is a vault replica (VAULT/NAME/journal); ship the source journal "
                             "instead (restore and verify read the replica in place)")
        if run_bytes < 4096:
            raise ValueError("run_bytes must be at least 4096")
        self.path = path
        self.run_bytes = run_bytes
        self._segdir = os.path.join(path, SEGMENT_DIR)
        self._basedir = os.path.join(path, BASE_DIR)
        self._meta_path = os.path.join(path, META_NAME)
        try:
            with open(self._meta_path, "rb") as f:
                meta_raw = f.read(1 << 20)
        except FileNotFoundError:
            raise NotAJournal(f"{path}: not a journal (no {META_NAME})") from None
        except OSError as e:
            raise NotAJournal(f"{path}: cannot read {META_NAME}: {e.strerror}") from None
        self.meta = parse_meta(meta_raw, self._meta_path)
        self.uuid: bytes = self.meta.uuid
        self._segs: dict[int, _Seg] = {}
        self._order: list[int] = []  # published segment numbers, ascending
        self._dir_mtime = -1
        self._fingerprint: tuple[Any, ...] | None = None
        self.notes: list[str] = []  # things a status should show (an audit log that shrank, ...)
        self._reset(Position())

    def close(self) -> None:
        for s in self._segs.values():
            if s.handle is not None:
                s.handle.close()
                s.handle = None

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the source ----------------------------------------------------------

    def _read_head(self) -> Head | None:
        try:
            with open(os.path.join(self.path, HEAD_NAME), "rb") as f:
                data = f.read(HEAD_SIZE)
        except OSError:
            return None
        for _ in range(3):  # a writer may be updating it in place under us
            head = parse_head(data)
            if head is not None:
                return head if head.uuid == self.uuid and head.current_boot else None
            try:
                with open(os.path.join(self.path, HEAD_NAME), "rb") as f:
                    data = f.read(HEAD_SIZE)
            except OSError:
                return None
        return None

    def _stat_key(self, p: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(p)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _fingerprint_now(self) -> tuple[Any, ...]:
        try:
            with open(os.path.join(self.path, HEAD_NAME), "rb") as f:
                head = f.read(128)
        except OSError:
            head = b""
        last = self._order[-1] if self._order else None
        return (
            head,
            self._stat_key(self._segdir),
            self._stat_key(os.path.join(self._segdir, segment_name(last))) if last else None,
            self._stat_key(self._basedir),
            self._stat_key(self._meta_path),
            self._stat_key(os.path.join(self.path, AUDIT_NAME)),
            self._stat_key(os.path.join(self.path, PRUNE_MANIFEST)),
        )

    def poll(self) -> bool:
        """Whether anything may have changed since the last items() pass ended
        (cheap: a few stats and one small read; no scan)."""
        return self._fingerprint_now() != self._fingerprint

    def _refresh(self) -> bool:
        """Bring the view of the segments up to date; False while a prune is
        swapping files (nothing is to be shipped then)."""
        if os.path.exists(os.path.join(self.path, PRUNE_MANIFEST)):
            return False
        head = self._read_head()
        dkey = self._stat_key(self._segdir)
        if dkey is None:
            raise CorruptJournal(f"{self.path}: {SEGMENT_DIR}/ is missing")
        if dkey[2] != self._dir_mtime or not self._order:
            # Segments were created, replaced or removed: look at each again
            # (a directory listing and a stat per segment, no scan).
            nums = sorted(n for n in (parse_segment_name(x) for x in os.listdir(self._segdir))
                          if n is not None)
            for a, b in zip(nums, nums[1:]):
                if b != a + 1:
                    raise CorruptJournal(f"segment {a + 1:016x} is missing", a + 1)
            for n in list(self._segs):
                if n not in nums:
                    self._drop(n)
            for n in nums:
                self._look(n)
            self._order = [n for n in nums if n in self._segs]
            self._dir_mtime = dkey[2]
        order = self._order
        if head is not None and head.pending:
            # an append is under way: a segment it started is not published
            order = [n for n in order if n <= head.seg_no] or order[:1]
        if not order:
            raise CorruptJournal(f"{self.path}: journal has no segments")
        self._published = order
        prev: _Seg | None = None
        for i, n in enumerate(order):
            s = self._segs[n]
            s.sealed = i < len(order) - 1
            if prev is not None:
                ok = s.first_seq == prev.last_seq + 1 or (s.compacted and s.first_seq > prev.last_seq)
                if not ok:
                    s.damage = CorruptJournal(
                        f"segment starts at seq {s.first_seq}, expected {prev.last_seq + 1}", n, 0)
                    break
            if not s.done:
                # the active segment ends at the head's committed end
                limit = head.seg_off if head is not None and head.seg_no == n and not s.sealed else None
                self._scan(s, limit)
                if s.sealed and s.damage is None:
                    if s.end != s.size:
                        s.damage = CorruptJournal("a sealed segment's records end before the file does "
                                                  "(damaged or truncated record)", n, s.end)
                    else:
                        s.done = True  # never scanned or stat'ed again
            if s.damage is not None:
                break
            prev = s
        return True

    def _look(self, n: int) -> None:
        """(Re)read segment n's header when the file is new or was replaced."""
        p = os.path.join(self._segdir, segment_name(n))
        try:
            st = os.stat(p)
        except FileNotFoundError:
            self._drop(n)
            return
        old = self._segs.get(n)
        if old is not None and old.ino == st.st_ino:
            return
        try:
            with open(p, "rb") as f:
                header = f.read(SEG_HDR_SIZE)
        except FileNotFoundError:
            self._drop(n)
            return
        h = parse_segment_header(header, p)
        if h.uuid != self.uuid:
            raise CorruptJournal("segment belongs to another journal (UUID differs)", n, 0)
        if h.seg_no != n:
            raise CorruptJournal(f"{p}: header names segment {h.seg_no:016x}", n, 0)
        self._drop(n)
        self._segs[n] = _Seg(n, header, _header_crc(header), h.first_seq, h.compacted, st.st_ino,
                             last_seq=h.first_seq - 1)

    def _drop(self, n: int) -> None:
        s = self._segs.pop(n, None)
        if s is not None and s.handle is not None:
            s.handle.close()

    def _handle(self, s: _Seg) -> Segment:
        if s.handle is None:
            h = Segment(self._segdir, s.seg)
            if _header_crc(bytes(h.view()[:SEG_HDR_SIZE])) != s.crc:
                h.close()  # replaced between the stat and the open: the next pass sees it
                raise _Replaced()
            s.handle = h
        return s.handle

    def _scan(self, s: _Seg, limit: int | None) -> None:
        """Extend s.end over the records the C scan accepts, up to limit."""
        try:
            h = self._handle(s)
        except (_Replaced, FileNotFoundError):
            return
        h.remap()
        s.size = h.size
        lim = h.size if limit is None else min(limit, h.size)
        if lim <= s.end:
            return
        r = h.scan(start=s.end, expect_seq=s.last_seq + 1, limit=lim)
        if r.count:
            s.end = r.end
            s.last_seq = r.last_seq
        if not r.clean and s.sealed:
            s.damage = CorruptJournal(r.reason, s.seg, r.end)

    # ---- the cursor (what the replica holds or was sent) ----------------------

    def _reset(self, pos: Position) -> None:
        self._vault = dict(pos.segments)       # live on the replica: seg -> (crc, size, sealed)
        self._incoming: dict[int, tuple[int, int, bool]] = {}  # shipped with replace=True
        self._twins = dict(pos.twins)  # sorted out against the source's headers in _segment_items
        self._files = dict(pos.files)
        self._bases = set(pos.bases)
        self._meta_sent: bytes | None = None
        self._fingerprint = None

    def plan(self, position: Position | dict[str, Any] | None) -> Iterator[Item]:
        """Everything the replica at `position` lacks, in an order that keeps
        it a valid journal prefix (module docstring). Lazy: an item is read
        when it is asked for."""
        pos = position if isinstance(position, Position) else Position.parse(position)
        self._reset(pos)
        return self.items()

    def items(self) -> Iterator[Item]:
        """What changed since the last pass (or since plan's position)."""
        while True:
            # The fingerprint is taken before looking, so that a change made
            # during this pass is seen by the next poll; it stats the last
            # segment, so look again when a rotation moved the last one.
            last = self._order[-1] if self._order else None
            fp = self._fingerprint_now()
            if not self._refresh():
                return
            if self._order[-1] == last:
                break
        yield from self._meta_items()
        yield from self._base_items()
        yield from self._segment_items()
        yield from self._audit_items()
        self._fingerprint = fp
        damage = self.damage
        if damage is not None:
            raise damage

    @property
    def damage(self) -> CorruptJournal | None:
        for n in getattr(self, "_published", []):
            d = self._segs[n].damage
            if d is not None:
                return d
        return None

    def _meta_items(self) -> Iterator[Item]:
        try:
            with open(self._meta_path, "rb") as f:
                raw = f.read(1 << 20)
        except OSError as e:
            raise NotAJournal(f"{self.path}: cannot read {META_NAME}: {e.strerror}") from None
        if raw != self._meta_sent:
            parse_meta(raw, self._meta_path)  # never ship a damaged or half-written one
            self._meta_sent = raw
            yield FileItem(META_NAME, 0, len(raw), raw, whole=True)

    def _stale(self, src: dict[int, "_Seg"]) -> bool:
        """Whether the replica holds a segment that the source no longer has
        (or has under another header): only a prune can reconcile that."""
        return any(n not in src or src[n].crc != c for n, (c, _, _) in self._vault.items())

    def _segment_items(self) -> Iterator[Item]:
        published = self._published
        src = {n: self._segs[n] for n in published}
        for n, twin in self._twins.items():
            # Of two entries for one number, the one with the source's
            # header is the .incoming of a prune in progress: resume it.
            live = self._vault[n]
            if n in src and live[0] == src[n].crc:
                live, twin = twin, live
            self._vault[n] = live
            if n in src and twin[0] == src[n].crc:
                self._incoming[n] = twin
        self._twins = {}
        # A prune replaces sealed segments only: a replica holding the active
        # segment under another header, or segments past it, does not hold
        # this journal's past (telling it to prune would destroy its data).
        top = published[-1]
        for n, (c, _, _) in self._vault.items():
            if n > top or (n == top and c != src[top].crc):
                where = "past the source's last" if n > top else "under another header than the source's active"
                raise VaultError(f"the replica holds segment {n:016x} {where}; "
                                 "that is not a prune of this journal: refusing to ship")
        # After a prune on the source, the segments before the first one the
        # replica holds unchanged go to .incoming (sealed, whole), then the
        # PruneItem swaps them in; the rest continues as usual.
        pruning = self._stale(src)
        first_common = None
        if pruning:
            first_common = next((n for n in published if n in self._vault
                                 and self._vault[n][0] == src[n].crc), None)
        for n in published:
            s = src[n]
            if pruning and (first_common is None or n < first_common) and s.sealed:
                yield from self._ship_segment(s, replace=True)
                if s.damage is not None or not self._incoming.get(n, (0, 0, False))[2]:
                    return
                continue
            if pruning:
                yield self._prune_item(src)
                pruning = False
            yield from self._ship_segment(s, replace=False)
            if s.damage is not None or not self._vault.get(n, (0, 0, False))[2]:
                return  # the next segment waits for this one's seal
        if pruning:
            yield self._prune_item(src)

    def _prune_item(self, src: dict[int, _Seg]) -> PruneItem:
        live: dict[int, tuple[int, int, bool]] = {}
        for n, v in self._vault.items():
            if n in src and src[n].crc == v[0]:
                live[n] = v
        live.update(self._incoming)
        self._incoming = {}
        self._vault = live
        bases = sorted(self.live_bases())
        self._bases &= set(bases)
        return PruneItem([(n, c, sz) for n, (c, sz, _) in sorted(live.items())], bases)

    def _ship_segment(self, s: _Seg, replace: bool) -> Iterator[Item]:
        table = self._incoming if replace else self._vault
        have = table.get(s.seg)
        if have is not None and have[0] != s.crc:
            have = None
        if have is None:
            yield SegmentItem(s.seg, s.header, replace)
            have = (s.crc, SEG_HDR_SIZE, False)
            table[s.seg] = have
        off = have[1]
        if off > s.end:
            raise VaultError(f"the replica of segment {s.seg:016x} holds {off} bytes; the source's "
                             f"validated records end at {s.end}")
        cursor_seq = self._seq_at(s, off)
        if off < s.end:
            h = self._handle(s)
            while off < s.end:
                view = h.view()
                r = h.scan(start=off, expect_seq=cursor_seq, limit=min(off + self.run_bytes, s.end))
                if r.count == 0:  # one record larger than a run
                    r = h.scan(start=off, expect_seq=cursor_seq, limit=s.end, max_records=1)
                if r.count == 0:
                    raise CorruptJournal(f"record at offset {off} no longer validates", s.seg, off)
                first = REC_HDR.unpack_from(view, off)  # crc, len, seq, ts, ...
                buf = bytes(view[off:r.end])
                del view
                item = RunItem(s.seg, off, r.end, buf, first[2], r.last_seq, first[3], r.ts_max)
                off, cursor_seq = r.end, r.last_seq + 1
                table[s.seg] = (s.crc, off, False)
                yield item
        if s.done and not table[s.seg][2] and off == s.end:
            table[s.seg] = (s.crc, off, True)
            yield SealItem(s.seg, off)
            if s.handle is not None:  # shipped whole: no need to keep it mapped
                s.handle.close()
                s.handle = None

    def _seq_at(self, s: _Seg, off: int) -> int:
        """The seq expected at offset off (a record boundary the replica
        reached); a position that is not one of ours is refused."""
        if off == SEG_HDR_SIZE:
            return s.first_seq
        h = self._handle(s)
        r = h.scan(start=SEG_HDR_SIZE, expect_seq=s.first_seq, limit=off)
        if r.end != off:
            raise VaultError(f"the replica of segment {s.seg:016x} ends at {off}, which is not a "
                             f"record boundary of the source (records end at {r.end} there)")
        return r.last_seq + 1

    # ---- bases ------------------------------------------------------------------

    def live_bases(self) -> list[str]:
        """The journal's complete bases, oldest first."""
        try:
            names = os.listdir(self._basedir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.endswith(_INCOMPLETE_SUFFIXES)
                      and not n.startswith(".") and os.path.isdir(os.path.join(self._basedir, n)))

    def _base_items(self) -> Iterator[Item]:
        for name in self.live_bases():
            if name in self._bases:
                continue
            try:
                yield from self._walk_base(name)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile (a prune): its absence is shipped as a PruneItem
            self._bases.add(name)
            yield BaseItem(name)

    def _walk_base(self, name: str) -> Iterator[Item]:
        top = os.path.join(self._basedir, name)
        rel_top = f"{BASE_DIR}/{name}"
        yield from self._walk_dir(top, rel_top)
        st = os.lstat(top)
        yield EntryItem(rel_top, 0, stat.S_IMODE(st.st_mode), st.st_mtime_ns // 1000, "dir")

    def _walk_dir(self, d: str, rel: str) -> Iterator[Item]:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            p, r = e.path, f"{rel}/{e.name}"
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                yield EntryItem(r, 0, stat.S_IMODE(st.st_mode), st.st_mtime_ns // 1000, "symlink",
                                os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                yield from self._walk_dir(p, r)
                yield EntryItem(r, 0, stat.S_IMODE(st.st_mode), st.st_mtime_ns // 1000, "dir")
            elif stat.S_ISREG(st.st_mode):
                if self._files.get(r) == st.st_size:
                    continue  # the replica has it whole (a base resumed after a reconnect)
                size = 0
                page = _page_size(st.st_size)
                step = self.run_bytes - self.run_bytes % page if page else self.run_bytes
                with open(p, "rb") as f:
                    while True:
                        buf = f.read(step)
                        if not buf:
                            break
                        yield FileItem(r, size, size + len(buf), buf, page=page)
                        size += len(buf)
                yield EntryItem(r, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns // 1000, "file")
            # other kinds (fifos, sockets) are not copied into bases

    # ---- audit log --------------------------------------------------------------

    def _audit_items(self) -> Iterator[Item]:
        p = os.path.join(self.path, AUDIT_NAME)
        sent = self._files.get(AUDIT_NAME, 0)
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < sent:
                note = f"{AUDIT_NAME} is shorter ({size} bytes) than the replica's ({sent}): not shipped"
                if note not in self.notes:
                    self.notes.append(note)
                return
            f.seek(sent)
            off = sent
            while off < size:
                buf = f.read(min(self.run_bytes, size - off))
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    return  # no complete line yet
                buf = buf[:cut]
                yield FileItem(AUDIT_NAME, off, off + cut, buf)
                off += cut
                self._files[AUDIT_NAME] = off
                f.seek(off)

    # ---- status ------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The seq of the last validated record in the newest published
        segment the feed has read (0 before the first pass, or for a journal
        without records): what the replica holds once the feed's items are
        all acknowledged."""
        if not self._published or self._published[-1] not in self._segs:
            return 0
        return self._segs[self._published[-1]].last_seq

    def backlog(self, acked: Position | dict[str, Any] | None) -> tuple[int, int | None]:
        """(journal bytes the replica has not acknowledged, timestamp of the
        oldest unacknowledged record or None) from the Feed's latest view."""
        pos = acked if isinstance(acked, Position) else Position.parse(acked)
        nbytes = 0
        oldest: int | None = None
        for n in getattr(self, "_published", []):
            s = self._segs[n]
            v = pos.segments.get(n)
            done = v[1] if v is not None and v[0] == s.crc else SEG_HDR_SIZE
            if done < s.end:
                nbytes += s.end - done
                if oldest is None:
                    oldest = self._ts_at(s, done)
        return nbytes, oldest

    def _ts_at(self, s: _Seg, off: int) -> int | None:
        try:
            with open(os.path.join(self._segdir, segment_name(s.seg)), "rb") as f:
                hdr = os.pread(f.fileno(), REC_HDR.size, off)
        except OSError:
            return None
        return int(REC_HDR.unpack(hdr)[3]) if len(hdr) == REC_HDR.size else None


def _page_size(size: int) -> int:
    """Page-aligned chunks for a base file that looks like a database (a
    whole number of 4 KiB pages, at least 16 of them): its pages then dedupe
    with their copies in rollback journals and with page writes. Other
    files (images, documents) keep content-defined chunks."""
    return DB_PAGE if size >= 16 * DB_PAGE and size % DB_PAGE == 0 else 0


class _Replaced(Exception):
    """A segment file was replaced between looking at it and opening it."""

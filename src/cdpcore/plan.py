"""Plan: what the protected tree held at a point, without writing any of it.

Theory of operation. A restore used to replay every record into files, so a
block written a hundred times was written a hundred times. A plan instead
makes one forward pass over the journal that reads only record headers:

- The namespace (names, directories, symlinks, hard links, modes, mtimes) is
  modelled in Python by `Tree`, which sees only the records that change it:
  FILEMAP, CREATE, RENAME, UNLINK, MKDIR, RMDIR, LINK, SYMLINK, SETATTR, BASE.
  Files are inodes with a small integer key (the journal's file ids name
  inodes, like a program's descriptors, and keep naming them across renames
  and unlinks).
- Every WRITE and TRUNCATE becomes one *row* (key, start, end, source file,
  source offset, seq, ts) in flat arrays, written by the C extractor
  (native/record.c cdp_extract), which validates each record (CRC, sequence)
  and stops only at records Python must apply. A WRITE's source is its
  payload inside the segment file; a TRUNCATE to L is a hole row [L, inf)
  (what it cut reads as zeros if the file grows again); a base file is a row
  over its whole size with the base copy as source.
- native/extent.c cdp_cover lays the rows of each inode over each other in
  sequence order (the newest row wins where rows overlap) and yields the
  visible *pieces*, sorted by offset, clipped to the final size; bytes no
  piece covers are holes.

A restore then writes each piece once (cdp_copy_out: gathered pwritev
straight from read-only mappings of the sources) and ftruncates each file to
its size, so holes stay holes. Rollback and diff compare plans.
"""
from __future__ import annotations

import bisect
import itertools
import mmap
import operator
import os
import queue
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cdpcore import checkpoint
from cdpcore._native import INT64_MIN, ffi, lib
from cdpcore.errors import CorruptJournal
from cdpcore.filemap import under
from cdpcore.format import (
    NO_MODE,
    REC_HDR,
    SETATTR_FIXED,
    Kind,
    decode_path,
    split_pair,
)
from cdpcore.journal import Journal
from cdpcore.segment import STOP_END, STOP_LIMIT, STOP_REASONS

HOLE = 2**64 - 1  # source file of a hole row / piece
MAX_TABLE_FID = 1 << 24  # file ids above this are bound in Python only
ROWS_PER_CALL = 1 << 22
HUGE_ROWS = 1 << 18  # columns of at least 2 MiB each get transparent huge pages
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
# Kinds the extractor consumes without stopping: they change no file.
_SKIP = (1 << Kind.FLUSH) | (1 << Kind.BOOKMARK)
_STOP_KIND = 7  # enum cdp_extract_stop
_STOP_LIMIT = 6

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(slots=True)
class Inode:
    key: int
    mode: int = 0o644
    mtime_us: int | None = None
    mtime_seq: int = 0  # seq of the record that set mtime_us (CREATE, SETATTR, BASE)


@dataclass(slots=True)
class Dir:
    mode: int = 0o755
    mtime_us: int | None = None


@dataclass(slots=True)
class Link:
    target: str


Node = Inode | Dir | Link


class Tree:
    """The namespace at a moment: path -> inode, directory or symlink, and
    file id -> inode. Subclasses decide what an inode's content is
    (new_inode) and how data records and bases are applied."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.ids: dict[int, Inode] = {}
        self.next_key = 0

    def new_inode(self, mode: int = 0o644) -> Inode:
        self.next_key += 1
        return Inode(self.next_key, mode)

    def bind(self, fid: int, ino: Inode) -> None:
        self.ids[fid] = ino

    def reset(self) -> None:
        """A BASE record: the whole tree is replaced, every file id unbound."""
        self.nodes.clear()
        self.ids.clear()

    def inode(self, fid: int, what: str) -> Inode:
        ino = self.ids.get(fid)
        if ino is None:
            raise CorruptJournal(f"{what} of file id {fid} that no FILEMAP or CREATE bound")
        return ino

    def name_of(self, ino: Inode | None, fid: int) -> str:
        return next((p for p, n in self.nodes.items() if n is ino), f"file id {fid}")

    def parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            node = self.nodes.get(p)
            if node is None:
                self.nodes[p] = Dir()
            elif not isinstance(node, Dir):
                raise CorruptJournal(f"journal uses {p!r} as a directory but it is a file")

    def remove(self, path: str, subtree: bool) -> list[tuple[str, Node]]:
        gone = [(p, n) for p, n in self.nodes.items() if (under(p, path) if subtree else p == path)]
        for p, _ in gone:
            del self.nodes[p]
        return gone

    def apply_ns(self, kind: int, fid: int, offset: int, payload: bytes, seq: int, ts: int) -> None:
        """Apply a namespace record (FLUSH, BOOKMARK, DIRTY change nothing)."""
        if kind == Kind.FILEMAP:
            path = decode_path(payload)
            node = self.nodes.get(path)
            if isinstance(node, Inode):
                self.bind(fid, node)
            elif node is None:
                self.parents(path)
                ino = self.new_inode()
                self.nodes[path] = ino
                self.bind(fid, ino)
            else:
                raise CorruptJournal(f"FILEMAP names {path!r}, which is not a regular file")
        elif kind == Kind.CREATE:
            path = decode_path(payload)
            if isinstance(self.nodes.get(path), Dir):
                raise CorruptJournal(f"CREATE over directory {path!r}")
            self.parents(path)
            ino = self.new_inode(offset & 0o7777)
            ino.mtime_us, ino.mtime_seq = ts, seq
            self.nodes[path] = ino
            self.bind(fid, ino)
        elif kind == Kind.MKDIR:
            path = decode_path(payload)
            self.parents(path)
            node = self.nodes.get(path)
            if isinstance(node, Dir):
                node.mode = offset & 0o7777
            else:
                self.nodes[path] = Dir(offset & 0o7777)
        elif kind in (Kind.UNLINK, Kind.RMDIR):
            self.remove(decode_path(payload), subtree=kind == Kind.RMDIR)
        elif kind == Kind.RENAME:
            a, b = split_pair(payload)
            old, new = decode_path(a), decode_path(b)
            if old == new or old not in self.nodes:
                return
            moving = self.remove(old, subtree=True)
            self.remove(new, subtree=True)
            self.parents(new)
            for p, n in moving:
                self.nodes[new + p[len(old):]] = n
        elif kind == Kind.LINK:
            a, b = split_pair(payload)
            src, dst = decode_path(a), decode_path(b)
            node = self.nodes.get(src)
            if isinstance(node, Inode):
                self.parents(dst)
                self.nodes[dst] = node
        elif kind == Kind.SYMLINK:
            target, b = split_pair(payload)
            path = decode_path(b)
            self.parents(path)
            self.nodes[path] = Link(os.fsdecode(target))
        elif kind == Kind.SETATTR:
            path = decode_path(payload[SETATTR_FIXED.size :])
            node = self.nodes.get(path)
            if isinstance(node, (Inode, Dir)):
                mtime = SETATTR_FIXED.unpack_from(payload)[0]
                if offset != NO_MODE:
                    node.mode = offset & 0o7777
                if mtime != -(2**63):
                    node.mtime_us = mtime
                    if isinstance(node, Inode):
                        node.mtime_seq = seq

    def walk_base(self, base_dir: str) -> Iterator[tuple[str, str, os.stat_result]]:
        """Load a base copy's directories and symlinks; yield its regular
        files (relative path, full path, lstat) for the subclass to fill."""
        for top, dirs, files in os.walk(base_dir):
            rel_top = os.path.relpath(top, base_dir).replace(os.sep, "/")
            for name in dirs + files:
                rel = name if rel_top == "." else f"{rel_top}/{name}"
                full = os.path.join(top, name)
                st = os.lstat(full)
                if os.path.islink(full):
                    self.nodes[rel] = Link(os.readlink(full))
                elif name in dirs:
                    self.nodes[rel] = Dir(st.st_mode & 0o7777, st.st_mtime_ns // 1000)
                else:
                    yield rel, full, st


def base_path(j: Journal, seq: int, payload: bytes) -> str:
    """The directory a BASE record names, checked to lie inside the journal."""
    ref = payload.decode("utf-8", "replace")
    base = os.path.join(j.path, *ref.split("/"))
    if ".." in ref.split("/") or not os.path.isdir(base):
        raise CorruptJournal(f"BASE record {seq} names missing base {ref!r}")
    return base


class _Columns:
    """Parallel 64-bit columns in one anonymous mapping. Its pages cost
    nothing until written, unlike a zero-filled array: the first touch of
    fresh memory costs several microseconds a page on these machines, and
    a million-record plan sizes its outputs for the worst case. Large ones
    ask for transparent huge pages (MADV_HUGEPAGE: one fault and one zeroing
    per 2 MiB instead of 512 faults; 32 MB came to 8-13 ms instead of 21-23
    ms here); small ones do not, since a huge page per column would zero
    2 MiB for a few rows."""

    def __init__(self, codes: str, capacity: int):
        self.codes = codes
        self.cap = 0
        self._maps: list[mmap.mmap] = []
        self.cols: list[memoryview] = []
        self._grow(capacity, 0)

    def _grow(self, cap: int, keep: int) -> None:
        cap = max(cap, 1)
        m = mmap.mmap(-1, 8 * cap * len(self.codes))
        if cap >= HUGE_ROWS and _MADV_HUGEPAGE is not None:
            m.madvise(_MADV_HUGEPAGE)
        view = memoryview(m)
        cols = [view[8 * cap * i : 8 * cap * (i + 1)].cast(c) for i, c in enumerate(self.codes)]  # type: ignore[call-overload]
        view.release()
        for new, old in zip(cols, self.cols):
            new[:keep] = old[:keep]
        self.close()
        self._maps, self.cols, self.cap = [m], cols, cap

    def pointers(self, at: int) -> list[Any]:
        """cffi pointers to each column at row `at` (take them right before
        a call: they do not keep the mapping alive across a _grow)."""
        return [ffi.from_buffer("int64_t[]" if c == "q" else "uint64_t[]", col) + at
                for col, c in zip(self.cols, self.codes)]

    def detach(self, n: int) -> tuple[memoryview, ...]:
        """The first n rows of each column, as views that keep the mapping
        alive after this object is dropped (not closed): a plan's pieces,
        used where the C layer wrote them instead of copied into arrays
        (fresh memory twice over for 256,000 pieces)."""
        out = tuple(col[:n] for col in self.cols)
        self.cols = []
        self._maps = []
        return out

    def close(self) -> None:
        for v in self.cols:
            v.release()
        for m in self._maps:
            m.close()
        self._maps, self.cols = [], []


class _Rows(_Columns):
    """The rows of the plan, which the C extractor writes into directly:
    key, start, end, file, src, seq, ts; and rec, the record a row of a
    checkpoint's pieces comes from (rows [0, n_rec) only: the others'
    record is their src)."""

    def __init__(self, capacity: int) -> None:
        super().__init__("QQQQQQqQ", capacity)
        self.n = 0
        self.n_rec = 0

    def reserve(self, extra: int) -> None:
        if self.n + extra > self.cap:
            self._grow(max(self.n + extra, 2 * self.cap), self.n)

    def add(self, *row: int) -> None:
        self.reserve(1)
        for c, v in zip(self.cols, row):
            c[self.n] = v
        self.n += 1


class PlanTree(Tree):
    """A Tree whose file ids are mirrored into the key table that the C
    extractor translates file ids with."""

    def __init__(self) -> None:
        super().__init__()
        self.table = array("Q", bytes(8 * 64))

    def bind(self, fid: int, ino: Inode) -> None:
        super().bind(fid, ino)
        if fid < MAX_TABLE_FID:
            if fid >= len(self.table):
                self.table.extend(array("Q", bytes(8 * (max(fid + 1, 2 * len(self.table)) - len(self.table)))))
            self.table[fid] = ino.key

    def reset(self) -> None:
        super().reset()
        self.table = array("Q", bytes(8 * len(self.table)))


@dataclass
class Plan:
    """The tree at `seq`: names, and for each inode its size and the pieces
    of source files that make up its content."""

    seq: int
    ts: int | None
    tree: Tree
    sources: Sources  # indexed by a piece's file column; close() unmaps them
    sizes: array = field(default_factory=lambda: array("Q"))  # by inode key
    # key, start, len, file, src, rec (offset of the source record's
    # payload): sorted by key, start
    pieces: tuple[Any, ...] = ()  # u64 columns (memoryviews or arrays)
    records: int = 0  # records from the base (or the start) to seq
    dirty: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.sources.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size_of(self, ino: Inode) -> int:
        return self.sizes[ino.key] if ino.key < len(self.sizes) else 0

    def piece_range(self, ino: Inode) -> tuple[int, int]:
        """Indexes [lo, hi) of this inode's pieces."""
        keys = self.pieces[0]
        return bisect.bisect_left(keys, ino.key), bisect.bisect_right(keys, ino.key)

    def extents(self, ino: Inode) -> Iterator[tuple[int, int, int, int]]:
        """(offset, length, source file, source offset) of each data piece."""
        _k, start, length, file, src, _r = self.pieces
        lo, hi = self.piece_range(ino)
        for i in range(lo, hi):
            yield start[i], length[i], file[i], src[i]

    def read(self, ino: Inode, start: int, length: int) -> bytes:
        """The file's bytes in [start, start + length): pieces from their
        sources, zeros where it has holes (or past its end)."""
        out = bytearray(length)
        _k, starts, lens, files, srcs, _r = self.pieces
        lo, hi = self.piece_range(ino)
        i = max(lo, bisect.bisect_right(starts, start, lo, hi) - 1)
        end = start + length
        while i < hi and starts[i] < end:
            a, b = max(starts[i], start), min(starts[i] + lens[i], end)
            if a < b:
                src = srcs[i] + (a - starts[i])
                out[a - start : b - start] = self.sources.view(files[i])[src : src + (b - a)]
            i += 1
        return bytes(out)

    def put_back(self, ino: Inode, fd: int, ranges: Spans,
                 every: bool = False, kick: int = 0) -> tuple[Any, int, bytearray]:
        """Make fd hold this file's bytes in each range (sorted, disjoint,
        below its size), writing only the ranges whose bytes differ (one C
        call: native/extent.c cdp_put_back, which compares and writes from
        the mapped sources, without copying the wanted bytes). Returns the
        WRITE records that say what was written (with `every`, what every
        range holds now): a struct cdp_rec[] of n records whose payloads
        point into this plan's sources (valid until close(); their file id
        and timestamp are unset, for Batch.append_write_records), then a
        flag per range: 1 if written. On a failed write the ranges before
        it are done, and OSError says why: nothing is journaled for them,
        and a rerun of the rollback finds them equal and goes on. With
        `kick` > 0, the file's writeback is started after every `kick`
        bytes written (not waited for: the caller still fsyncs)."""
        n = len(ranges)
        r_start, r_len = ranges.start, ranges.lengths()
        scratch = bytearray(max(r_len, default=0))
        differs = bytearray(n)
        lo, hi = self.piece_range(ino)
        # fragments: of each piece and hole a range meets (ranges and pieces
        # are both sorted and disjoint), holes split at 64 KiB, pieces at
        # the largest payload
        cap = 3 * n + 2 * (hi - lo) + sum(r_len) // (1 << 16) + 2
        recs = ffi.new("struct cdp_rec[]", cap)
        _k, start, length, file, src, _r = (ffi.from_buffer("uint64_t[]", c) for c in self.pieces)
        ptrs, lens = self.sources.pointers(self.pieces[3][lo:hi])
        n_recs, done = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        u64 = "uint64_t[]"
        status = lib.cdp_put_back(fd, n, ffi.from_buffer(u64, r_start or array("Q", [0])),
                                  ffi.from_buffer(u64, r_len or array("Q", [0])), hi - lo,
                                  start + lo, length + lo, file + lo, src + lo, ptrs, lens, len(self.sources.paths),
                                  ffi.from_buffer(scratch or bytearray(1)), every,
                                  ffi.from_buffer(differs or bytearray(1)), recs, cap, n_recs, done, kick)
        if status == lib.CDP_EIO:
            err = ffi.errno
            raise OSError(err, f"rollback: putting back bytes: {os.strerror(err)}")
        if status == lib.CDP_ENOMEM:
            raise AssertionError("rollback: more records than the bound on them")  # (a bug, not a state)
        if status != lib.CDP_OK:
            raise CorruptJournal("rollback plan names bytes outside its source files")
        return recs, int(n_recs[0]), differs

    def layout(self, ino: Inode | None) -> tuple[list[tuple[int, int, tuple[str, int]]], int]:
        """(start, end, identity) of each data piece, and the size. Two
        pieces hold the same bytes when their identity (source file, source
        offset - start) is equal: the same journal bytes at the same place."""
        if ino is None:
            return [], 0
        paths = self.sources.paths
        return [(s, s + n, (paths[f], src - s)) for s, n, f, src in self.extents(ino)], self.size_of(ino)

    def data_bytes(self) -> int:
        """Bytes of data in the files that have names (what a restore copies)."""
        seen: set[int] = set()
        total = 0
        for node in self.tree.nodes.values():
            if isinstance(node, Inode) and node.key not in seen:
                seen.add(node.key)
                lo, hi = self.piece_range(node)
                total += sum(self.pieces[2][lo:hi])
        return total


class Validator:
    """Checks records' checksums on a thread of its own while the plan is
    built and written (cffi releases the GIL during cdp_scan). Reading 4 GiB
    of payloads to check them is bound by memory bandwidth and was half of a
    restore's time on one CPU; with the check beside it, a restore costs
    little more than its copy. A restore is not done, and reports no
    success, before finish() has returned."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[str, int, int, int, int, int, bool] | None] = queue.SimpleQueue()
        self._error: CorruptJournal | None = None
        self._thread = threading.Thread(target=self._run, name="cdpcore-validate", daemon=True)
        self._thread.start()

    def submit(self, path: str, seg_no: int, pos: int, end: int, expect: int, count: int,
               gaps: bool = False) -> None:
        """Check the records with seq in [expect, expect + count) from offset
        pos of a segment (gaps: a COMPACTED one, whose seqs may skip)."""
        self._jobs.put((path, seg_no, pos, end, expect, count, gaps))

    def submit_pieces(self, sources: Sources, file: array, rec: array) -> None:
        """Check the record that each piece of a plan comes from, where its
        source is a segment (a plan from a checkpoint: the records before
        it are not read, and only those whose bytes are copied are
        checked), on the thread, through the plan's own mappings: the
        restore's copy reads the same pages, which were mapped once
        (populated) instead of faulted in a second mapping of the thread's
        (half a million faults for a 1 GiB restore, on a core the copy may
        need). The mappings are made here, on the caller's thread; the
        sources join this validator before they unmap (Sources.close). The
        arrays must not change until finish()."""
        ptrs = sources.segment_pointers(file)
        lens = sources.pointers(())[1]
        sources.close_after(self.error)
        self._jobs.put((list(sources.paths), file, rec, ptrs, lens))  # type: ignore[arg-type]

    def check_pieces_now(self, sources: Sources, file: Any, rec: Any,
                         origin: tuple[Any, Any] | None = None) -> None:
        """submit_pieces' check on the calling thread, for a plan of few
        pieces whose caller waits for the check at once (a rollback's: no
        handoff to the thread), where the rollback then reads them (in its
        buffer of records read, or its mappings). `origin` (file, rec
        columns as they were before the records were read into a buffer:
        gather_records) names the segment and offset of damage. Damage is
        raised by finish(), as the thread's is."""
        if self._error is not None or not len(file):
            return
        ptrs = sources.segment_pointers(file)
        lens = sources.pointers(())[1]
        bad = ffi.new("uint64_t *")
        status = lib.cdp_check_records(ptrs, lens, len(sources.paths), ffi.from_buffer("uint64_t[]", file),
                                       ffi.from_buffer("uint64_t[]", rec), len(file), bad)
        if status != lib.CDP_OK:
            i = bad[0]
            if origin is not None:
                file, rec = origin
            path = sources.paths[file[i]]
            self._error = CorruptJournal("a record that the restore copies from is damaged",
                                         int(os.path.basename(path).split(".")[0], 16), rec[i] - 48)

    def _run_pieces(self, paths: list[str], file: array, rec: array, ptrs: Any, lens: Any) -> None:
        bad = ffi.new("uint64_t *")
        status = lib.cdp_check_records(ptrs, lens, len(paths), ffi.from_buffer("uint64_t[]", file),
                                       ffi.from_buffer("uint64_t[]", rec), len(file), bad)
        if status != lib.CDP_OK:
            i = bad[0]
            path = paths[file[i]]
            self._error = CorruptJournal("a record that the restore copies from is damaged",
                                         int(os.path.basename(path).split(".")[0], 16), rec[i] - 48)

    def _run(self) -> None:
        out = ffi.new("struct cdp_scan_result *")
        while (job := self._jobs.get()) is not None:
            if self._error is not None:
                continue
            if len(job) == 5:
                self._run_pieces(*job)  # type: ignore[misc]
                continue
            path, seg_no, pos, end, expect, count, gaps = job
            # mapped (and populated) from the page of pos on, not from the
            # segment's start: a rollback checks the last 10 MB of a 64 MB
            # segment, and populating the rest cost this thread a CPU that
            # the main thread needed on a busy machine
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            try:
                with open(path, "rb") as f, mmap.mmap(f.fileno(), end - base, prot=mmap.PROT_READ,
                                                   flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, offset=base) as m:
                    buf = ffi.from_buffer(m)
                    lib.cdp_scan(buf, end - base, pos - base, expect, INT64_MIN, count, 0, 0,
                                 ffi.NULL, ffi.NULL, ffi.NULL, 0, out, gaps)
                    del buf
                # count records reach seq expect + count - 1 (or beyond it, with gaps)
                if out.stop not in (STOP_END, STOP_LIMIT) or out.last_seq < expect + count - 1:
                    self._error = CorruptJournal(STOP_REASONS.get(out.stop, "records end early"),
                                                 seg_no, base + out.end)
            except (OSError, ValueError) as e:
                self._error = CorruptJournal(f"cannot read segment: {e}", seg_no)

    def error(self) -> CorruptJournal | None:
        """Wait for every check; the first damage found, if any."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        return self._error

    def finish(self) -> None:
        err = self.error()
        if err is not None:
            raise err


def build_plan(j: Journal, seq: int, progress: Progress | None = None,
               validator: Validator | None = None, use_checkpoints: bool = True) -> Plan:
    """The plan of the state after record `seq` (first_seq - 1: before any),
    from the newest checkpoint at or before seq when there is one
    (checkpoint.py), else from the journal's first record. Every record
    read is checked (CRC) on the way, or, with a validator, handed to it:
    then the plan must not be trusted before validator.finish(). With a
    validator, the records before the checkpoint whose bytes the plan uses
    are checked too (sealed segments never change, but disks rot); without
    one, they were checked when the checkpoint was made."""
    plan, rows, _ck = _begin(j, seq, progress, validator, use_checkpoints)
    try:
        _cover(plan, rows)
        if validator is not None and rows.n_rec:
            validator.submit_pieces(plan.sources, plan.pieces[3], plan.pieces[5])
    except BaseException:
        plan.close()
        raise
    finally:
        rows.close()
    return plan


def _begin(j: Journal, seq: int, progress: Progress | None, validator: Validator | None,
           use_checkpoints: bool, pieces: bool = True) -> tuple[Plan, _Rows, checkpoint.Checkpoint | None]:
    # (without pieces, a rollback: it reads a few pieces scattered over every
    # segment, where mapping whole segments with MAP_POPULATE costs more
    # than the faults it saves)
    """The tree at seq, and the rows to lay over each other (not yet laid);
    without `pieces`, a checkpoint's pieces are left out of the rows (the
    caller adds those it needs, before the rows)."""
    tree = PlanTree()
    sources = Sources(populate=pieces)
    plan = Plan(seq, None, tree, sources)
    ck = checkpoint.best(j, seq) if use_checkpoints else None
    first = ck.seq + 1 if ck is not None else j.first_seq
    # a row per record at most (plus base files, added as they come)
    rows = _Rows(max(seq - first + 1, 0) + 64 + (_from_checkpoint_rows(ck, pieces) if ck is not None else 0))
    try:
        start_seq = first
        if ck is not None:
            if pieces:
                # the sources the checkpoint's pieces come from, mapped
                # while its rows are loaded, the records after it read and
                # the rows laid out
                for path in ck.sources:
                    sources.add(path)
                sources.prefetch(ck.pieces[3])
            _load_checkpoint(ck, plan, tree, rows, pieces)
            start_seq = ck.start_seq
        start_seq = _forward(j, seq, plan, tree, rows, progress, validator, first, start_seq)
        plan.records = max(0, seq - start_seq + 1)
    except BaseException:
        sources.close()
        rows.close()
        raise
    return plan, rows, ck


def build_rollback_plan(j: Journal, seq: int, later: int, validator: Validator) -> tuple[Plan, After]:
    """The plan at seq, and what the records up to `later` changed (After),
    for a rollback from later to seq. Only the bytes those records wrote or
    cut, and files that must be recreated, get pieces: the plan's other
    files have their names, sizes, modes and mtimes but no pieces (a
    rollback of recent damage reads back megabytes, not the whole root).
    The validator checks every record read and every record copied from."""
    plan, rows, ck = _begin(j, seq, None, validator, True, pieces=False)
    try:
        n_keys = plan.tree.next_key + 1
        full = _row_sizes(rows, n_keys)
        plan.sizes = full[0]
        _stamp(plan.tree, full[1], full[2])  # before the tree is copied for the later state
        now = continue_plan(j, plan, later, validator)
        named_now = {n.key for n in now.tree.nodes.values() if isinstance(n, Inode)}
        mode = bytearray(n_keys)
        for node in plan.tree.nodes.values():
            if isinstance(node, Inode):
                if node.key not in named_now:
                    mode[node.key] = 1  # to be recreated: all of it
                elif node.key in now.ranges:
                    mode[node.key] = 2  # only where it changed
        w_lo, w_hi = array("Q", bytes(8 * n_keys)), array("Q", bytes(8 * n_keys))
        w_start, w_end = array("Q"), array("Q")
        for k in sorted(now.ranges):
            if k < n_keys and mode[k] == 2:
                w_lo[k] = len(w_start)
                w_start.extend(now.ranges[k].start)
                w_end.extend(now.ranges[k].end)
                w_hi[k] = len(w_start)
        u64 = "uint64_t[]"
        windows = (mode, n_keys, ffi.from_buffer(u64, w_lo), ffi.from_buffer(u64, w_hi),
                   ffi.from_buffer(u64, w_start or array("Q", [0])), ffi.from_buffer(u64, w_end or array("Q", [0])))
        # the checkpoint's pieces that still matter first (the oldest
        # rows), then the rows read since, then each kept file's size
        if ck is not None and plan.records != seq - ck.start_seq + 1:
            ck = None  # a BASE after the checkpoint replaced its state
        m = _compact_sorted([ffi.from_buffer(u64, c) for c in ck.pieces], len(ck.pieces[0]), windows) if ck else 0
        n = _compact(rows.pointers(0), rows.n, windows)
        laid = _Rows(m + n + n_keys + 1)
        if m:
            assert ck is not None
            for c in range(6):
                laid.cols[(0, 1, 2, 3, 4, 7)[c]][:m] = ck.pieces[c][:m]
            laid.cols[5][:m] = array("Q", bytes(8 * m))  # seq 0: never newer than the tree's mtime
            laid.cols[6][:m] = array("q", bytes(8 * m))
        for c in range(8):
            laid.cols[c][m : m + n] = rows.cols[c][:n]
        laid.n, laid.n_rec = m + n, m
        sizes, last_seq, last_ts = full
        for k in range(n_keys):  # each kept file's size, as the rows left out would make it
            if mode[k]:
                laid.add(k, sizes[k], HOLE, HOLE, 0, last_seq[k], last_ts[k], 0)
        rows.close()
        rows = laid
        _cover(plan, rows, full)
        if plan.pieces[0]:
            origin = gather_records(plan)
            validator.check_pieces_now(plan.sources, plan.pieces[3], plan.pieces[5], origin)
    except BaseException:
        plan.close()
        raise
    finally:
        rows.close()
    return plan, now


# A rollback reads the records it puts back into one buffer (gather_records)
# only up to this many bytes; past it (a rollback that recreates large
# files) its pieces stay in the segments, mapped: the page cache, no copy.
GATHER_MAX = 256 << 20


# gather_records reads in this many parts at once, one per thread (the
# calling thread reads the first), when there are at least GATHER_SPLIT
# pieces: the preads and the buffer's fresh pages are CPU work (copies and
# zeroing), which a second CPU halves.
GATHER_PARTS = 2
GATHER_SPLIT = 256


def gather_records(plan: Plan) -> tuple[Any, Any] | None:
    """Read the records that the plan's pieces in segments come from into
    buffers (pread, native/extent.c cdp_read_records), sources of the plan's
    own, and point those pieces at them. A rollback's 2,600 pieces lie in
    records scattered over every segment: through mappings, each record
    cost a fault and a page-table page (11-15 ms for the check that reads
    them first), and unmapping 64 segments 9-11 ms more, which the journal's
    append and fdatasync no longer hide once that fdatasync has little left
    to do (rollback.JOURNAL_KICK). The reads and the buffer's fresh memory
    cost about as much as the faults (10-14 ms: 2,600 preads of 3-4 us,
    11 MB of huge pages at 0.5 ms a MB), but nothing is left to unmap, and
    the CPU per rollback drops by about a tenth; the pieces are read in
    GATHER_PARTS parts on as many threads, each into a buffer of its own.
    Returns the pieces' file and rec columns as they were (to name a
    damaged record's segment), or None if nothing was read: no piece in a
    segment, or more than GATHER_MAX bytes of records."""
    _k, _s, length, file, src, rec = plan.pieces
    sources = plan.sources
    n = len(file)
    segs = [i for i in sorted(distinct(file, range(len(sources.paths)))) if sources.paths[i].endswith(".seg")]
    if not segs:
        return None
    parts = GATHER_PARTS if n >= GATHER_SPLIT else 1
    bounds = [n * p // parts for p in range(parts + 1)]
    fds = array("i", [-1] * len(sources.paths))
    outs = [array("Q", bytes(8 * n)) for _ in range(3)]
    first = len(sources.paths)  # the index of part p's buffer: first + p
    read: list[tuple[mmap.mmap, int] | None] = [None] * parts
    errors: list[BaseException | None] = [None] * parts

    def run(p: int) -> None:
        try:
            read[p] = _read_part(sources.paths, fds, plan.pieces, bounds[p], bounds[p + 1], first + p, outs,
                                 GATHER_MAX // parts)
        except BaseException as e:  # raised on the calling thread
            errors[p] = e

    threads = []
    try:
        for i in segs:
            fds[i] = os.open(sources.paths[i], os.O_RDONLY | os.O_CLOEXEC)
        threads = [threading.Thread(target=run, args=(p,), name="cdpcore-gather", daemon=True)
                   for p in range(1, parts)]
        for t in threads:
            t.start()
        run(0)
    finally:
        for t in threads:
            if t.ident is not None:  # (started)
                t.join()
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    try:
        for e in errors:
            if e is not None:
                raise e
        if any(r is None for r in read):  # more than GATHER_MAX: the mappings as before
            return None
    except BaseException:
        for r in read:
            if r is not None:
                r[0].close()
        raise
    for buf, used in read:  # type: ignore[misc]
        sources.add_records(buf, used)
    origin = (array("Q", file), array("Q", rec))
    plan.pieces = (*plan.pieces[:3], *outs)
    return origin


def _read_part(paths: list[str], fds: array, pieces: tuple[Any, ...], lo: int, hi: int, buf_file: int,
               outs: list[array], limit: int) -> tuple[mmap.mmap, int] | None:
    """gather_records' part: pieces [lo, hi) read into a buffer of their own
    (source buf_file), their new places written to outs[..][lo:hi]. Returns
    the buffer and the bytes used, None past limit bytes."""
    _k, _s, length, file, src, rec = (c[lo:hi] for c in pieces)
    n = hi - lo
    # enough for every piece's own record, header and 4 KiB at least
    cap = sum(length) + sum(src) - sum(rec) + n * (REC_HDR.size + 4096 + 8)
    u64 = "uint64_t[]"
    used, bad = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    while True:
        if cap > limit:
            return None
        # private: shared anonymous memory (mmap's default) is shmem, which
        # gets no huge pages here (shmem_enabled: never)
        buf = mmap.mmap(-1, cap, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if _MADV_HUGEPAGE is not None:
            buf.madvise(_MADV_HUGEPAGE)
        cbuf = ffi.from_buffer(buf)
        status = lib.cdp_read_records(ffi.from_buffer("int[]", fds), len(fds), n, ffi.from_buffer(u64, file),
                                      ffi.from_buffer(u64, src), ffi.from_buffer(u64, length),
                                      ffi.from_buffer(u64, rec), cbuf, cap, buf_file,
                                      *(ffi.from_buffer(u64, o) + lo for o in outs), used, bad)
        ffi.release(cbuf)
        if status == lib.CDP_OK:
            return buf, int(used[0])
        buf.close()
        if status == lib.CDP_ENOMEM:  # records longer than the pieces need: room for them
            cap *= 4
            continue
        if status == lib.CDP_EIO:
            err = ffi.errno
            raise OSError(err, f"rollback plan: reading records: {os.strerror(err)}")
        i = bad[0]
        raise CorruptJournal("a record that the restore copies from is damaged",
                             int(os.path.basename(paths[file[i]]).split(".")[0], 16), rec[i] - REC_HDR.size)


def _compact(ptrs: list[Any], n: int, windows: tuple[Any, ...]) -> int:
    """cdp_compact_rows over columns (key, start, end first): the rows kept."""
    cols = ffi.new("uint64_t *[]", [ffi.cast("uint64_t *", p) for p in ptrs])
    n_out, n_rec_out = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    mode, *rest = windows
    status = lib.cdp_compact_rows(n, cols, len(ptrs), 0, ffi.from_buffer(mode), *rest, n_out, n_rec_out)
    if status != lib.CDP_OK:
        raise CorruptJournal(f"rollback plan: bad rows (status {status})")
    return int(n_out[0])


def _compact_sorted(ptrs: list[Any], n: int, windows: tuple[Any, ...]) -> int:
    """cdp_compact_sorted over a checkpoint's pieces (sorted by key and
    start, disjoint: checkpoint.py's format): the rows kept, found by binary
    search (a pass over its 262,144 pieces cost 2-3 ms a rollback)."""
    cols = ffi.new("uint64_t *[]", [ffi.cast("uint64_t *", p) for p in ptrs])
    n_out = ffi.new("uint64_t *")
    mode, *rest = windows
    status = lib.cdp_compact_sorted(n, cols, len(ptrs), ffi.from_buffer(mode), *rest, n_out)
    if status != lib.CDP_OK:
        raise CorruptJournal(f"rollback plan: bad checkpoint rows (status {status})")
    return int(n_out[0])


def _row_sizes(rows: _Rows, n_keys: int) -> tuple[array, array, array]:
    """Size, seq and timestamp of the last row of every key, over all rows."""
    sizes, last_seq, last_ts = array("Q", bytes(8 * n_keys)), array("Q", bytes(8 * n_keys)), array("q", bytes(8 * n_keys))
    key, start, end, file, _src, seq, ts, _rec = rows.pointers(0)
    status = lib.cdp_row_sizes(rows.n, key, start, end, file, seq, ts, n_keys, ffi.from_buffer("uint64_t[]", sizes),
                               ffi.from_buffer("uint64_t[]", last_seq), ffi.from_buffer("int64_t[]", last_ts))
    if status != lib.CDP_OK:
        raise CorruptJournal(f"restore plan: bad rows (status {status})")
    return sizes, last_seq, last_ts


_ALL_KINDS = (1 << 32) - 1


def _forward(j: Journal, seq: int, plan: Plan, tree: PlanTree, rows: _Rows, progress: Progress | None,
             validator: Validator | None, first: int | None = None, start_seq: int | None = None) -> int:
    """The pass over the records first..seq (default: from the journal's
    first): namespace into the tree, data into rows. Returns the seq the
    state starts from (the last BASE, else start_seq, else `first`)."""
    sources = plan.sources
    first = j.first_seq if first is None else first
    start_seq = first if start_seq is None else start_seq
    res = ffi.new("struct cdp_extract_result *")
    total = seq - first + 1
    for seg, pos, expect, end, last in j.spans(first, seq):
        if last < first:
            continue  # `first` lies in a gap after this COMPACTED segment's records
        file_no = sources.add(seg.path)
        view = sources.view(file_no)
        gaps = seg.header.compacted
        end = min(end, len(view))
        stop = min(seq, last)
        if expect < first:
            # the span starts at an index entry before `first`: step over
            # (and check) the records in between
            buf = ffi.from_buffer(view)
            status = lib.cdp_extract(buf, end, pos, expect, first - expect, _ALL_KINDS, validator is None,
                                     ffi.NULL, 0, 0, *([ffi.NULL] * 7), 0, res, gaps)
            del buf
            if status != lib.CDP_OK or res.stop != _STOP_LIMIT:
                raise CorruptJournal(STOP_REASONS.get(res.stop, "records end early"), seg.seg_no, res.end)
            pos, expect = res.end, first
        if validator is not None and expect <= stop:
            validator.submit(seg.path, seg.seg_no, pos, end, expect, stop - expect + 1, gaps)
        try:
            while expect <= stop:
                rows.reserve(min(stop - expect + 1, ROWS_PER_CALL))
                cap = rows.cap - rows.n
                buf = ffi.from_buffer(view)
                table = ffi.from_buffer("uint64_t[]", tree.table)
                ptrs = rows.pointers(rows.n)[:7]  # not rec: the extractor leaves it
                status = lib.cdp_extract(buf, end, pos, expect, stop - expect + 1, _SKIP,
                                         validator is None, table,
                                         len(tree.table), file_no, *ptrs, cap, res, gaps)
                del buf, table, ptrs  # release the arrays before they may grow
                if status != lib.CDP_OK:
                    raise CorruptJournal(f"cannot read records (status {status})", seg.seg_no, pos)
                rows.n += res.n_out
                if res.count:
                    plan.ts = res.last_ts
                pos, expect = res.end, res.last_seq + 1
                if res.stop == _STOP_KIND:
                    # one record for Python: namespace, base, dirty, or data
                    # through a file id the table does not hold
                    _crc, n, rseq, ts, fid, offset, kind, _fl, _m, _r = REC_HDR.unpack_from(view, pos)
                    payload = bytes(view[pos + 48 : pos + 48 + n])
                    if kind == Kind.BASE:
                        rows.n = rows.n_rec = 0
                        start_seq = rseq
                        _load_base(tree, rows, sources, base_path(j, rseq, payload), rseq)
                    else:
                        _apply(tree, rows, plan, kind, fid, offset, payload, rseq, ts, file_no, pos + 48)
                    plan.ts = ts
                    pos += (48 + n + 7) & ~7
                    expect = rseq + 1  # (a COMPACTED segment's seqs may skip)
                elif res.stop != _STOP_LIMIT and expect <= stop:
                    raise CorruptJournal(STOP_REASONS.get(res.stop, "records end early"), seg.seg_no, pos)
                if progress is not None:
                    progress("plan", expect - first, total)
        finally:
            del view
    return start_seq


@dataclass(slots=True)
class Spans:
    """Sorted, disjoint byte ranges [start[i], end[i]) of one file, as two
    u64 columns: a rollback handles thousands of them per file, and passes
    them to C as they are (as lists of tuples they cost it 4-6 ms in Python
    per 2,600 ranges, between _touched, clipping and put_back's arrays)."""

    start: array
    end: array

    @classmethod
    def of(cls, ranges: Iterable[tuple[int, int]]) -> Spans:
        pairs = list(ranges)
        return cls(array("Q", (a for a, _b in pairs)), array("Q", (b for _a, b in pairs)))

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, i: slice) -> Spans:
        return Spans(self.start[i], self.end[i])

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.start, self.end))

    def lengths(self) -> array:
        return array("Q", map(operator.sub, self.end, self.start))

    def clip(self, size: int) -> Spans:
        """The parts below size (a file cut shorter since)."""
        n = bisect.bisect_left(self.start, size)
        if n == len(self.start) and (not n or self.end[-1] <= size):
            return self
        start, end = self.start[:n], self.end[:n]
        if n and end[-1] > size:
            end[-1] = size
        return Spans(start, end)


@dataclass
class After:
    """What the records after a plan's point did: the tree at a later seq,
    and per inode key the ranges those records wrote or cut, and the size
    it has then. Built by continuing the plan's pass over those records
    only (rollback: the few records after the point, not the journal)."""

    seq: int
    tree: Tree
    sizes: dict[int, int]  # of the inodes the records touched
    ranges: dict[int, Spans]
    before: array  # the plan's sizes, for the inodes they did not touch

    def size_of(self, ino: Inode) -> int:
        k = ino.key
        return self.sizes[k] if k in self.sizes else (self.before[k] if k < len(self.before) else 0)


def continue_plan(j: Journal, plan: Plan, seq: int, validator: Validator | None = None) -> After:
    """The state after record `seq` > plan.seq, as far as the records in
    between changed it. Every one of them is checked (CRC): here, or with a
    validator on its thread (then nothing may be done with the result
    before validator.finish())."""
    import copy

    tree = copy.deepcopy(plan.tree)
    assert isinstance(tree, PlanTree)
    rows = _Rows(seq - plan.seq + 64)
    # not populated: MAP_POPULATE of the whole segment (64 MiB) for the
    # records after a rollback's point (its last 10 MB, say) cost 3 ms
    later = Plan(seq, None, tree, Sources(populate=False))
    try:
        _forward(j, seq, later, tree, rows, None, validator, first=plan.seq + 1)
        ranges = _touched(rows)
        # the sizes then: each touched file from its size at the plan (a
        # cut row to it), changed by its rows in order
        keys = list(ranges)
        cut = _Rows(len(keys) + rows.n)
        before = plan.sizes
        for k in keys:
            cut.add(k, before[k] if k < len(before) else 0, HOLE, HOLE, 0, 0, 0, 0)
        for c in range(8):
            cut.cols[c][cut.n : cut.n + rows.n] = rows.cols[c][: rows.n]
        cut.n += rows.n
        try:
            after = _row_sizes(cut, tree.next_key + 1)[0]
        finally:
            cut.close()
        sizes = {k: after[k] for k in keys}
    finally:
        rows.close()
        later.close()
    return After(seq, tree, sizes, ranges, plan.sizes)


def _touched(rows: _Rows) -> dict[int, Spans]:
    """Per key, the merged byte ranges the rows wrote or cut (C: sorting
    and joining the rows of the records after a rollback's point took
    Python 4 us a row)."""
    out = _Columns("QQQ", max(rows.n, 1))
    n_out = ffi.new("uint64_t *")
    try:
        key, start, end = rows.pointers(0)[:3]
        status = lib.cdp_touched_ranges(rows.n, key, start, end, *out.pointers(0), n_out)
        if status == lib.CDP_ENOMEM:
            raise MemoryError("rollback plan: cannot sort the changed ranges")
        if status != lib.CDP_OK:
            raise CorruptJournal(f"rollback plan: bad rows (status {status})")
        m = int(n_out[0])
        ks, starts, ends = (array("Q", c[:m]) for c in out.cols)
    finally:
        out.close()
    ranges: dict[int, Spans] = {}
    i = 0
    for k, group in itertools.groupby(ks):  # (sorted by key)
        n = sum(1 for _ in group)
        ranges[k] = Spans(starts[i : i + n], ends[i : i + n])
        i += n
    return ranges


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges [a, b) sorted, overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _apply(tree: PlanTree, rows: _Rows, plan: Plan, kind: int, fid: int, offset: int,
           payload: bytes, seq: int, ts: int, file_no: int, src: int) -> None:
    """A record the extractor left to Python. WRITE and TRUNCATE come here
    only for file ids outside the key table (or bound by nothing: error)."""
    if kind == Kind.WRITE:
        ino = tree.inode(fid, "write")
        rows.add(ino.key, offset, offset + len(payload), file_no, src, seq, ts)
    elif kind == Kind.TRUNCATE:
        ino = tree.inode(fid, "truncate")
        rows.add(ino.key, offset, HOLE, HOLE, 0, seq, ts)
    elif kind == Kind.DIRTY:
        name = tree.name_of(tree.ids.get(fid), fid)
        plan.dirty.append(f"{name} (seq {seq}): {payload[8:].decode('utf-8', 'replace')}")
    else:
        tree.apply_ns(kind, fid, offset, payload, seq, ts)


def _from_checkpoint_rows(ck: checkpoint.Checkpoint, pieces: bool = True) -> int:
    return (len(ck.pieces[0]) if pieces else 0) + len(ck.sizes)


def _load_checkpoint(ck: checkpoint.Checkpoint, plan: Plan, tree: PlanTree, rows: _Rows,
                     pieces: bool = True) -> None:
    """The checkpoint's tree into `tree`, and its state into rows that the
    later records are laid over: per inode a cut to its size (a hole row
    from the size on: bytes past it read as zeros if the file grows), then
    its pieces. Their seq is 0, so they never make an mtime newer than the
    one the tree holds."""
    plan.ts = ck.ts
    plan.dirty = list(ck.dirty)
    for path in ck.sources:
        plan.sources.add(path)
    inodes = {}
    for key, mode, mtime_us, mtime_seq in ck.inodes:
        ino = Inode(key, mode, mtime_us, mtime_seq)
        inodes[key] = ino
    for path, tag, a, b in ck.nodes:
        tree.nodes[path] = inodes[a] if tag == 0 else Dir(a, b) if tag == 1 else Link(a)
    ids = ck.ids
    for i in range(0, len(ids), 2):
        tree.bind(ids[i], inodes[ids[i + 1]])
    tree.next_key = ck.next_key
    keys = [k for k in range(len(ck.sizes)) if ck.sizes[k]]
    n_cut, n = len(keys), len(ck.pieces[0]) if pieces else 0
    rows.reserve(n_cut + n)
    at = rows.n
    key, start, end, file, src, seq, ts, rec = rows.cols
    for i, k in enumerate(keys):
        key[at + i], start[at + i], end[at + i], file[at + i] = k, ck.sizes[k], HOLE, HOLE
        src[at + i] = seq[at + i] = ts[at + i] = rec[at + i] = 0
    at += n_cut
    if not n:
        rows.n = rows.n_rec = at
        return
    pk, ps, pl, pf, psrc, prec = ck.pieces
    key[at : at + n] = pk
    start[at : at + n] = ps
    file[at : at + n] = pf
    src[at : at + n] = psrc
    end[at : at + n] = pl  # the checkpoint stores ends in the length column's place
    # zeros from a bytes object, not an array copied from it: a large
    # bytes(n) is calloc'd, untouched pages that read as the shared zero
    # page, where an array is 2 MB of fresh memory to fault in and fill
    zeros = memoryview(bytes(8 * n))
    seq[at : at + n] = zeros.cast("Q")
    ts[at : at + n] = zeros.cast("q")
    rec[at : at + n] = prec
    rows.n = rows.n_rec = at + n


def _load_base(tree: PlanTree, rows: _Rows, sources: Sources, base: str, seq: int) -> None:
    tree.reset()
    linked: dict[tuple[int, int], Inode] = {}  # hard links inside the base stay one inode
    for rel, full, st in tree.walk_base(base):
        if st.st_nlink > 1:
            same = linked.get((st.st_dev, st.st_ino))
            if same is not None:
                tree.nodes[rel] = same
                continue
        ino = tree.new_inode(st.st_mode & 0o7777)
        if st.st_nlink > 1:
            linked[(st.st_dev, st.st_ino)] = ino
        ino.mtime_us, ino.mtime_seq = st.st_mtime_ns // 1000, seq
        tree.nodes[rel] = ino
        if st.st_size:
            rows.add(ino.key, 0, st.st_size, sources.add(full), 0, seq, ino.mtime_us)


def _cover(plan: Plan, rows: _Rows, full: tuple[array, array, array] | None = None) -> None:
    """Lay the rows over each other: the plan's sizes and pieces, and the
    mtimes of files whose data changed last. With `full` (sizes, last seq,
    last ts of every key over rows that were left out since), those stand
    for the sizes and last changes instead of what the rows left say."""
    n_keys = plan.tree.next_key + 1
    plan.sizes = array("Q", bytes(8 * n_keys))
    last_seq = array("Q", bytes(8 * n_keys))
    last_ts = array("q", bytes(8 * n_keys))
    cap = 2 * rows.n + 1
    out = _Columns("QQQQQQ", cap)
    n_pieces = ffi.new("uint64_t *")
    u64 = "uint64_t[]"
    try:
        *cols, rec = rows.pointers(0)
        status = lib.cdp_cover(rows.n, *cols, n_keys, ffi.from_buffer(u64, plan.sizes),
                               ffi.from_buffer(u64, last_seq), ffi.from_buffer("int64_t[]", last_ts),
                               rec, rows.n_rec, *out.pointers(0), cap, n_pieces)
        if status == lib.CDP_ENOMEM:
            raise MemoryError("restore plan: cannot lay out the extents")
        if status != lib.CDP_OK:
            raise CorruptJournal(f"restore plan: bad rows (status {status})")
        plan.pieces = out.detach(int(n_pieces[0]))
    finally:
        out.close()
    if full is not None:
        plan.sizes, last_seq, last_ts = full
    _stamp(plan.tree, last_seq, last_ts)


def _stamp(tree: Tree, last_seq: array, last_ts: array) -> None:
    """A file's mtime is that of its last change: data rows (C) or the
    CREATE / SETATTR / base load the tree saw, whichever came later."""
    n_keys = len(last_seq)
    for node in tree.nodes.values():
        if isinstance(node, Inode) and node.key < n_keys and last_seq[node.key] > node.mtime_seq:
            node.mtime_us = last_ts[node.key]
            node.mtime_seq = last_seq[node.key]


def _populate(m: mmap.mmap) -> None:
    """Fill in the page tables of a read-only file mapping now
    (cdp_populate_read: MADV_POPULATE_READ with the GIL released, under the
    mmap lock taken for reading). Advice only: where the kernel cannot
    (EINVAL before Linux 5.14), the pages are faulted in when read, as
    without it."""
    buf = ffi.from_buffer(m)
    try:
        lib.cdp_populate_read(buf, len(m))
    finally:
        ffi.release(buf)


def distinct(values: Iterable[int], universe: Iterable[int]) -> set[int]:
    """The distinct values of a column of source indices, taken in slices
    that stop as soon as every index of `universe` has been seen: a
    restore's 256,000 pieces name 70 segments, mostly all of them within
    the first few thousand pieces, and a whole set() of the column took 8
    ms while holding the GIL (the plan's thread waited for it)."""
    want = set(universe)
    if not isinstance(values, memoryview | array):
        return set(values)
    found: set[int] = set()
    for a in range(0, len(values), 4096):
        found.update(values[a : a + 4096])
        if want <= found:
            break
    return found


class Sources:
    """The files a plan's pieces come from (segments, base copies), mapped
    read-only on first use. A restore's are populated: page tables for the
    whole file at once (MAP_POPULATE, or MADV_POPULATE_READ for those the
    prefetch thread maps), instead of a fault for every 16 pages that the
    extractor and the copy touch (a fifth of a restore's time on a 4 GB
    journal)."""

    def __init__(self, populate: bool = True) -> None:
        self.populate = populate
        self.paths: list[str] = []
        self._index: dict[str, int] = {}
        self._maps: list[mmap.mmap | None] = []
        self._bufs: list[Any] = []
        self._ptrs: Any = None
        self._lens: Any = None
        self._prefetch: threading.Thread | None = None
        self._help: Callable[[], None] = lambda: None
        self._cancel: Callable[[], None] = lambda: None
        self._pending: set[int] = set()  # what the prefetch thread maps
        self._fetched: dict[int, mmap.mmap | None] = {}
        self._readers: list[Callable[[], object]] = []
        self._records: set[int] = set()  # sources that are buffers of records read (gather_records)

    def add_records(self, buf: mmap.mmap, used: int) -> int:
        """A buffer of records read from segments (its first `used` bytes),
        as a source of its own: checked like a segment, unmapped by
        close()."""
        i = len(self.paths)
        self.paths.append(f"<{used} bytes of records read>")
        self._records.add(i)
        self._maps.append(buf)
        self._bufs.append(ffi.from_buffer(buf))
        self._ptrs = None
        return i

    def close_after(self, wait: Callable[[], object]) -> None:
        """Call wait() first when closing: another thread reads the mappings
        (a Validator), and unmapping under it would crash the process."""
        self._readers.append(wait)

    def prefetch(self, indices: Iterable[int]) -> None:
        """Map these sources on a thread of its own while the caller goes on
        (laying out the plan), and fill in their page tables: a restore's
        4 GB of segments take 0.08-0.3 s of page-table work, as long as the
        plan itself or longer. `indices` may be a large array (a
        checkpoint's source column: its distinct values are taken on the
        thread). The thread first maps every source without populating
        (under a millisecond for 64 segments), then populates them one by
        one with MADV_POPULATE_READ: mmap() takes the process's mmap lock
        for writing, and with MAP_POPULATE on each mmap a second thread's
        mmap waited for the first one's populate, so two threads took as
        long as one; populating mappings that exist takes the lock for
        reading only. _map() of a source known now (not of those added
        later, the segments after a checkpoint) populates, from the other
        end of the list, what the thread has not reached (help()), so that
        two cores share what is left instead of one idling. A mapping that
        failed is simply made again there, so that its error is raised
        where it is used."""
        if not self.populate or self._prefetch is not None:
            return
        known = {i for i in range(len(self.paths)) if self._bufs[i] is None}
        if not known:
            return
        paths = list(self.paths)
        todo: list[mmap.mmap] = []
        ready = threading.Event()
        lock = threading.Lock()

        def take(last: bool) -> mmap.mmap | None:
            with lock:
                return (todo.pop() if last else todo.pop(0)) if todo else None

        def run() -> None:
            try:
                for i in sorted(known.intersection(distinct(indices, known))):
                    try:
                        m = self._open_map(paths[i], populate=False)
                    except (OSError, ValueError):
                        continue
                    self._fetched[i] = m
                    if m is not None:
                        todo.append(m)
            finally:
                ready.set()
            while (m := take(False)) is not None:
                _populate(m)

        def help() -> None:
            ready.wait()
            while (m := take(True)) is not None:
                _populate(m)

        def cancel() -> None:
            with lock:
                todo.clear()

        self._pending = known
        self._help, self._cancel = help, cancel
        self._prefetch = threading.Thread(target=run, name="cdpcore-map", daemon=True)
        self._prefetch.start()

    def _join_prefetch(self, help: bool = True) -> None:
        if self._prefetch is not None:
            if help:
                self._help()
            else:
                self._cancel()  # (closing: what is not mapped yet never will be)
            self._prefetch.join()
            self._prefetch = None
            self._pending = set()

    def _open_map(self, path: str, populate: bool | None = None) -> mmap.mmap | None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if (self.populate if populate is None else populate) else 0)
            return mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=flags) if size else None
        finally:
            os.close(fd)

    def add(self, path: str) -> int:
        """The index of source `path`, added if it is new."""
        if path in self._index:
            return self._index[path]
        self._index[path] = len(self.paths)
        self.paths.append(path)
        self._maps.append(None)
        self._bufs.append(None)
        self._ptrs = None
        return len(self.paths) - 1

    def view(self, i: int) -> memoryview:
        """The bytes of source i (mapped now if it was not)."""
        m = self._map(i)
        return memoryview(m) if m is not None else memoryview(b"")

    def _map(self, i: int) -> mmap.mmap | None:
        if self._bufs[i] is None:
            if i in self._pending:  # (the records after a checkpoint: not waited for)
                self._join_prefetch()
            if i in self._fetched:
                m = self._fetched.pop(i)
            else:
                m = self._open_map(self.paths[i])
            self._maps[i] = m
            self._bufs[i] = ffi.from_buffer(m) if m is not None else ffi.NULL
            self._ptrs = None
        return self._maps[i]

    def pointers(self, files: Iterable[int]) -> tuple[Any, Any]:
        """The C view of the sources (base pointers and lengths, by index),
        with these files mapped; valid until the next add() or close()."""
        for f in distinct(files, range(len(self.paths))):
            self._map(f)
        if self._ptrs is None:
            self._ptrs = ffi.new("const uint8_t *[]", [ffi.NULL if b is None else b for b in self._bufs] or [ffi.NULL])
            self._lens = ffi.new("uint64_t[]", [len(m) if m is not None else 0 for m in self._maps] or [0])
        return self._ptrs, self._lens

    def segment_pointers(self, files: Iterable[int]) -> Any:
        """Base pointers (by index) with these files mapped, NULL for every
        source that is not a segment or a buffer of records (a base copy's file has no records to
        check: cdp_check_records skips NULL); valid while the sources are."""
        ptrs, _lens = self.pointers(files)
        return ffi.new("const uint8_t *[]", [ptrs[i] if p.endswith(".seg") or i in self._records else ffi.NULL
                                             for i, p in enumerate(self.paths)] or [ffi.NULL])

    def copy(self, fd: int, plan: Plan, lo: int, hi: int) -> int:
        """Write pieces [lo, hi) of plan into fd; returns the bytes written."""
        if hi <= lo:
            return 0
        ptrs, lens = self.pointers(plan.pieces[3][lo:hi])
        _k, start, length, file, src, _r = (ffi.from_buffer("uint64_t[]", c) for c in plan.pieces)
        written = ffi.new("uint64_t *")
        status = lib.cdp_copy_out(fd, hi - lo, start + lo, length + lo, file + lo, src + lo,
                                  ptrs, lens, len(self.paths), written)
        if status == lib.CDP_EIO:
            err = ffi.errno
            raise OSError(err, os.strerror(err))
        if status != lib.CDP_OK:
            raise CorruptJournal("restore plan names bytes outside its source files")
        return int(written[0])

    def close(self) -> None:
        readers, self._readers = self._readers, []
        for wait in readers:
            wait()
        self._join_prefetch(help=False)
        for m in self._fetched.values():
            if m is not None:
                m.close()
        self._fetched.clear()
        self._ptrs = self._lens = None
        for b in self._bufs:
            if b is not None and b != ffi.NULL:
                ffi.release(b)
        self._bufs = [None] * len(self._bufs)
        for m in self._maps:
            if m is not None:
                m.close()
        self._maps = [None] * len(self._maps)


def last_global_flush(j: Journal, seq: int) -> int | None:
    """Seq of the last FLUSH of all files (file id 0) at or before seq. The
    extractor skips every other kind in C and stops at each FLUSH."""
    skip = sum(1 << k for k in Kind if k != Kind.FLUSH)
    res = ffi.new("struct cdp_extract_result *")
    found = None
    for seg, pos, expect, end, last in j.spans(j.first_seq, seq):
        view = seg.view()
        stop = min(seq, last)
        try:
            while expect <= stop:
                buf = ffi.from_buffer(view)
                status = lib.cdp_extract(buf, end, pos, expect, stop - expect + 1, skip, 1, ffi.NULL, 0, 0,
                                         *([ffi.NULL] * 7), 0, res, seg.header.compacted)
                del buf
                if status != lib.CDP_OK:
                    raise CorruptJournal(f"cannot read records (status {status})", seg.seg_no, pos)
                pos, expect = res.end, res.last_seq + 1
                if res.stop == _STOP_KIND:
                    _crc, n, rseq, _ts, fid, *_rest = REC_HDR.unpack_from(view, pos)
                    if fid == 0:
                        found = rseq
                    pos += (48 + n + 7) & ~7
                    expect = rseq + 1
                elif res.stop != _STOP_LIMIT and expect <= stop:
                    raise CorruptJournal(STOP_REASONS.get(res.stop, "records end early"), seg.seg_no, pos)
        finally:
            del view
    return found


def changed_ranges(a: Plan, ia: Inode | None, b: Plan, ib: Inode | None) -> list[tuple[int, int]]:
    """Merged byte ranges, below the larger size, where file ia of plan a
    and file ib of plan b may differ: where one has data the other has not,
    or the two have data from different journal bytes. (Different bytes
    that happen to be equal count as changed; a hole and bytes past the end
    do not differ: both read as zeros, and sizes are compared apart.)"""
    pa, sa = a.layout(ia)
    pb, sb = b.layout(ib)
    bounds = sorted({0, max(sa, sb)}.union(*((x[0], x[1]) for x in pa), *((x[0], x[1]) for x in pb)))
    out: list[tuple[int, int]] = []
    i = k = 0
    for lo, hi in itertools.pairwise(bounds):
        while i < len(pa) and pa[i][1] <= lo:
            i += 1
        while k < len(pb) and pb[k][1] <= lo:
            k += 1
        ida = pa[i][2] if i < len(pa) and pa[i][0] <= lo else None
        idb = pb[k][2] if k < len(pb) and pb[k][0] <= lo else None
        if ida != idb:
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
    return out

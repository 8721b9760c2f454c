"""Versions: where the sender last saw the bytes of each range a journal
record wrote, so that zstd-ref can compress a page's new version against
its previous one (docs/replication.md, "Base chunks").

A database that overwrites its pages in place (PostgreSQL writes a data
page at eviction and again at a checkpoint) sends each page many times. Its
previous version is in the vault, but no reference brings it into the
dictionary the way a SQLite rollback journal's copy does, and it is
usually far beyond zstd's window. Measured on pgbench (scale 10, 30 s,
benchmarks.md §9): data pages compressed in 4 MB bodies took 7.27 MB with
the previous body's tail as dictionary and 4.39 MB with each page's
previous version added.

The map is keyed by (file id, offset, length) of a WRITE record whose
payload is one chunk (packing: LITERAL_BELOW <= length <= ONE_CHUNK_UP_TO)
and holds where those bytes are: the record's payload in its segment file
(segments are append-only, so the bytes stay what they were), with the
chunk's id, which names it to the vault. A range not written since this
process started is looked up in the journal's newest base, when the vault
holds that base complete (Feed.complete_bases: bases are shipped before
the records after them, and the vault applies frames in order): the base
names it by place (codec.BaseAt: path, offset, length), which the vault
reads from its replica of the base, so nothing is hashed and nothing is
guessed. A base whose bytes at the receiver differ (a damaged replica) is
caught by zstd's checksum, never decoded into other bytes.
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cdpcore.codec import HISTORY, BaseAt
from cdpcore.format import BASE_DIR, REC_HDR, REC_HDR_SIZE, SEGMENT_DIR, Kind, segment_name
from cdpcore.packing import LITERAL_BELOW, ONE_CHUNK_UP_TO, Pack

MIN_TRIES = 32  # base-file guesses per file before its success rate counts
PROBE_EVERY = 64  # a file whose guesses seldom match still tries one in this many
MAX_ENTRIES = 1 << 20  # ranges remembered (~150 bytes each); past it the map starts afresh
_OPEN_FILES = 16  # segment and base files kept open for reading back
_SAMPLE = 32  # _alike compares every this-many-th byte
_HDR = struct.Struct("<4xI16xQQB")  # of format.REC_HDR: payload length, file id, offset, kind
assert _HDR.size == REC_HDR.size - 7
_NAMING = (Kind.CREATE, Kind.FILEMAP)  # records that bind a file id to a path (their payload)


# A range's last version: (chunk id, segment number, offset in the segment,
# its place in the stream of runs this map saw). A tuple: a frozen
# dataclass's __init__ was a tenth of bases()'s time on pgbench.
_Where = tuple[bytes, int, int, int]


@dataclass
class _Tries:
    """How a file's base-file guesses fared (a WAL file's recycled
    segments never match; a table's pages do)."""

    tried: int = 0  # guesses read and compared
    alike: int = 0  # of which alike
    skipped: int = 0  # guesses not made

    def worth(self) -> bool:
        if self.tried < MIN_TRIES or self.alike * 8 >= self.tried:
            return True
        self.skipped += 1
        return self.skipped % PROBE_EVERY == 0


class Versions:
    """One per connection: a reconnect starts afresh (what the vault holds
    is learned again from its WELCOME)."""

    def __init__(self, journal: str, newest_base: Callable[[], str | None] = lambda: None) -> None:
        """newest_base: the name of the journal's newest base when the
        vault holds it complete (or will, before the next body is
        applied), else None."""
        self._journal = journal
        self._segdir = os.path.join(journal, SEGMENT_DIR)
        self._newest_base = newest_base
        self._map: dict[tuple[int, int, int], _Where] = {}
        self._pos = 0  # bytes of runs seen so far
        self._paths: dict[int, str] = {}  # file id -> its path under the root
        self._tries: dict[str, _Tries] = {}  # path -> how its base-file guesses fared
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._base: str | None = None  # the newest complete base's name ("": none), per run
        self._tries_of = ""  # the base self._tries are about

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def bases(self, seg: int, off: int, buf: bytes, pk: Pack, new: set[bytes],
              held: Callable[[bytes], bool]) -> list[tuple[bytes | BaseAt, bytes]]:
        """For a run of whole records (segment `seg`, at `off`), packed as
        pk, of which the chunks in `new` travel as bytes: the (id, bytes) of
        the previous version of each such chunk's range, where one is known
        and the vault holds it before this body is applied: a chunk id for
        which held(id) says so (not one of this body), or a place in a
        complete base.
        Then remembers this run's versions.

        A previous version is left out when zstd sees it anyway (in this
        run, or in the previous body's tail that the dictionary starts
        with: PostgreSQL rewrites its current WAL page at every commit),
        and when it is not alike (_alike): a recycled WAL segment in the
        base holds other bytes at the same offsets. Only the last
        2^(hash_log + 3) bytes of a dictionary are indexed (2 MiB at the
        hash_log zstd-ref uses), so filling it with unlike pages would push
        the useful ones out."""
        starts = {p.start: p.id for p in pk.pieces if p.id is not None}
        in_body = set(starts.values())
        self._base = None  # looked up again at most once a run: a prune may make a new one
        near = self._pos - HISTORY  # versions after this are in reach already
        out: list[tuple[bytes | BaseAt, bytes]] = []
        taken: set[bytes] = set()
        pos, n = 0, len(buf)
        unpack, naming, write, paths, vmap = _HDR.unpack_from, _NAMING, Kind.WRITE, self._paths, self._map
        while pos + REC_HDR_SIZE <= n:
            plen, fid, foff, kind = unpack(buf, pos)
            pstart = pos + REC_HDR_SIZE
            if kind == write and LITERAL_BELOW <= plen <= ONE_CHUNK_UP_TO:
                cid = starts.get(pstart)
                if cid is not None:
                    key = (fid, foff, plen)
                    if cid in new and cid not in taken:
                        taken.add(cid)
                        prev = self._previous(key, near, buf, pstart)
                        if prev is not None and (type(prev[0]) is BaseAt or
                                                 (prev[0] not in in_body and held(prev[0]))):
                            out.append(prev)
                    if len(vmap) >= MAX_ENTRIES:
                        vmap.clear()
                    vmap[key] = (cid, seg, off + pstart, self._pos + pos)
            elif kind in naming and fid:
                paths[fid] = os.fsdecode(bytes(buf[pstart:pstart + plen]))
            pos += (REC_HDR_SIZE + plen + 7) & ~7  # format.align8
        self._pos += n
        return out

    def _previous(self, key: tuple[int, int, int], near: int, buf: bytes,
                  start: int) -> tuple[bytes | BaseAt, bytes] | None:
        """The previous version of key's range (its new bytes at buf[start:]),
        (id or place, bytes), when one is known, out of zstd's reach and
        alike."""
        w = self._map.get(key)
        if w is not None:
            cid, seg, off, at = w
            if at >= near:
                return None
            data = self._read(os.path.join(self._segdir, segment_name(seg)), off, key[2])
            return (cid, data) if data is not None and _alike(buf, start, data) else None
        return self._from_base(key, buf, start)

    def _from_base(self, key: tuple[int, int, int], buf: bytes, start: int) -> tuple[BaseAt, bytes] | None:
        fid, off, length = key
        rel = self._paths.get(fid)
        if rel is None:
            return None
        if self._base is None:
            self._base = self._newest_base() or ""
            if self._base != self._tries_of:
                self._tries.clear()  # another base: other bytes
                self._tries_of = self._base
        if not self._base:
            return None
        tries = self._tries.get(rel)
        if tries is None:
            tries = self._tries[rel] = _Tries()
        if not tries.worth():
            return None
        where = f"{BASE_DIR}/{self._base}/{rel}"
        data = self._read(os.path.join(self._journal, where), off, length)
        tries.tried += 1
        if data is None or not _alike(buf, start, data):
            return None
        tries.alike += 1
        return BaseAt(where, off, length), data

    def _read(self, path: str, off: int, length: int) -> bytes | None:
        fd = self._fds.get(path)
        try:
            if fd is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self._fds[path] = fd
                if len(self._fds) > _OPEN_FILES:
                    os.close(self._fds.popitem(last=False)[1])
            else:
                self._fds.move_to_end(path)
            data = os.pread(fd, length, off)
        except OSError:
            return None  # pruned or replaced meanwhile: no base for this one
        return data if len(data) == length else None


def _alike(buf: bytes, start: int, old: bytes) -> bool:
    """At least half of a sample of bytes (every 32nd) of buf[start:] and
    old equal at the same offsets: a page's next version (a few rows and
    hint bits changed), not another page. Sampled in place: comparing
    every byte in Python cost an eighth of the sender's CPU on pgbench."""
    if start + len(old) > len(buf):
        return False
    a, b = buf[start:start + len(old):_SAMPLE], old[::_SAMPLE]
    x = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
    return 2 * x.count(0) >= len(a)

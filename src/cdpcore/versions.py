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
chunk's id. A range not written since this process started is looked up in
the newest base (cut into 4 KiB chunks when it looks like a database:
feed._page_size), whose chunks the vault holds if it holds the base. A
guess that the vault does not hold costs one NEED and a resend without
bases (the caller then stops using base files); a wrong guess never
changes the replica, since the receiver decodes with exactly the bytes
its store has for those ids (zstd's checksum catches any mismatch).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cdpcore.crypto import chunk_id
from cdpcore.format import BASE_DIR, REC_HDR_SIZE, SEGMENT_DIR, Kind, align8, segment_name
from cdpcore.codec import HISTORY
from cdpcore.packing import LITERAL_BELOW, ONE_CHUNK_UP_TO, Pack

MAX_ENTRIES = 1 << 20  # ranges remembered (~150 bytes each); past it the map starts afresh
BASE_PAGE = 4096  # feed.DB_PAGE: the chunk size of a database file in a base
_OPEN_FILES = 16  # segment and base files kept open for reading back
_SAMPLE = 32  # _alike compares every this-many-th byte
_NAMING = (Kind.CREATE, Kind.FILEMAP)  # records that bind a file id to a path (their payload)


@dataclass(frozen=True, slots=True)
class _Where:
    id: bytes  # the chunk id of the bytes
    path: str  # the segment file holding them
    off: int
    length: int
    at: int  # where they were in the stream of runs this map saw (Versions.bases)


class Versions:
    """One per connection (the map outlives reconnects: ids stay valid)."""

    def __init__(self, journal: str, chunk_key: bytes) -> None:
        self._journal = journal
        self._segdir = os.path.join(journal, SEGMENT_DIR)
        self._key = chunk_key
        self._map: dict[tuple[int, int, int], _Where] = {}
        self._pos = 0  # bytes of runs seen so far
        self._paths: dict[int, str] = {}  # file id -> its path under the root
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._base: str | None = None  # the newest base's directory ("": none), per run
        self._sizes: dict[str, int | None] = {}  # base file -> its size (None: absent)
        self._sizes_of = ""  # the base those sizes are of
        self.use_base_files = True  # cleared once the vault lacked a base file's chunk
        self.base_file_ids: set[bytes] = set()  # ids taken from base files (NEED tells them apart)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def bases(self, seg: int, off: int, buf: bytes, pk: Pack, new: set[bytes],
              held: Callable[[bytes], bool]) -> list[tuple[bytes, bytes]]:
        """For a run of whole records (segment `seg`, at `off`), packed as
        pk, of which the chunks in `new` travel as bytes: the (id, bytes) of
        the previous version of each such chunk's range, where one is known
        and the vault holds every id of it before this body is applied:
        held(id) says so, or the id is a base file's page (a guess).
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
        segpath = os.path.join(self._segdir, segment_name(seg))
        self._base = None  # looked up again at most once a run: a prune may make a new one
        near = self._pos - HISTORY  # versions after this are in reach already
        out: list[tuple[bytes, bytes]] = []
        taken: set[bytes] = set()
        pos, n = 0, len(buf)
        while pos + REC_HDR_SIZE <= n:
            plen = int.from_bytes(buf[pos + 4:pos + 8], "little")
            fid = int.from_bytes(buf[pos + 24:pos + 32], "little")
            kind = buf[pos + 40]
            pstart = pos + REC_HDR_SIZE
            if kind in _NAMING and fid:
                self._paths[fid] = os.fsdecode(bytes(buf[pstart:pstart + plen]))
            elif kind == Kind.WRITE and LITERAL_BELOW <= plen <= ONE_CHUNK_UP_TO:
                cid = starts.get(pstart)
                if cid is not None:
                    key = (fid, int.from_bytes(buf[pos + 32:pos + 40], "little"), plen)
                    if cid in new and cid not in taken:
                        taken.add(cid)
                        prev = self._previous(key, near, buf[pstart:pstart + plen])
                        if prev and all(b not in in_body and (held(b) or b in self.base_file_ids) for b, _ in prev):
                            out += prev
                    if len(self._map) >= MAX_ENTRIES:
                        self._map.clear()
                        self.base_file_ids.clear()
                    self._map[key] = _Where(cid, segpath, off + pstart, plen, self._pos + pos)
            pos += align8(REC_HDR_SIZE + plen)
        self._pos += n
        return out

    def _previous(self, key: tuple[int, int, int], near: int, new: bytes) -> list[tuple[bytes, bytes]] | None:
        """The previous version of key's range as (id, bytes) pieces, when
        one is known, out of zstd's reach and alike."""
        w = self._map.get(key)
        if w is not None:
            if w.at >= near:
                return None
            data = self._read(w.path, w.off, w.length)
            return [(w.id, data)] if data is not None and _alike(new, data) else None
        if not self.use_base_files:
            return None
        return self._from_base(key, new)

    def _from_base(self, key: tuple[int, int, int], new: bytes) -> list[tuple[bytes, bytes]] | None:
        fid, off, length = key
        rel = self._paths.get(fid)
        if rel is None or off % BASE_PAGE or length % BASE_PAGE:
            return None
        if self._base is None:
            self._base = _newest_base(self._journal) or ""
            if self._base != self._sizes_of:
                self._sizes.clear()
                self._sizes_of = self._base
        if not self._base:
            return None
        path = os.path.join(self._base, rel)
        size = self._sizes.get(path, -1)
        if size == -1:
            try:
                size = self._sizes[path] = os.stat(path).st_size
            except OSError:
                size = self._sizes[path] = None
        # feed._page_size: only such files are cut at pages in a base
        if size is None or size < 16 * BASE_PAGE or size % BASE_PAGE or off + length > size:
            return None
        data = self._read(path, off, length)
        if data is None or not _alike(new, data):
            return None  # hashed only when it will be used
        out = [(chunk_id(self._key, data[i:i + BASE_PAGE]), data[i:i + BASE_PAGE]) for i in range(0, length, BASE_PAGE)]
        self.base_file_ids.update(cid for cid, _ in out)
        return out

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


def _alike(new: bytes, old: bytes) -> bool:
    """At least half of a sample of bytes (every 32nd) equal at the same
    offsets: a page's next version (a few rows and hint bits changed),
    not another page. Sampled: comparing every byte in Python cost an
    eighth of the sender's CPU on pgbench."""
    if len(new) != len(old):
        return False
    a, b = new[::_SAMPLE], old[::_SAMPLE]
    x = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
    return 2 * x.count(0) >= len(a)


def _newest_base(journal: str) -> str | None:
    top = os.path.join(journal, BASE_DIR)
    try:
        names = sorted(n for n in os.listdir(top) if not n.startswith(".") and n.isdigit())
    except OSError:
        return None
    return os.path.join(top, names[-1]) if names else None

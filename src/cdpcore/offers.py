"""Offer policy: which unknown chunk ids the sender asks the vault about.

An OFFER costs 32 bytes per id (plus one HAVE bit back), paid whatever the
answer. For some streams the answer is almost always "no": a database
file's page writes are new versions, never seen before, and on a HIS-like
workload those ids were a fifth of all wire bytes. For others it is often
"yes": a rollback journal's copy of a page from the base, a PACS image
stored twice. So the sender learns, per journal file id (records of one
file share a fate), how often its offers were held, and stops offering for
a file whose hit rate cannot pay for the ids: after MIN_SAMPLES offers,
a file is offered only when hits x the bytes a hit saves exceeds the ids'
cost, and otherwise every PROBE_EVERY-th chunk (so a file that starts
being copied is noticed). A chunk not offered travels as bytes (and the
receiver still dedupes it in storage), so a wrong guess costs wire bytes,
never correctness.

Files are told apart by name: the record's file id is mapped to the path
its CREATE or FILEMAP record named (until one is seen, the id itself is
the key). SQLite recreates its rollback journal every transaction, under
a new file id but the same name, so what was learned about it carries
over: its page copies (pages of the base the vault holds) keep being
offered, while the database file's own page writes soon are not. Within
a file, chunks are grouped by size class (the bit length of the size): a
rollback journal's 512-byte header is new every transaction, its 4 KiB
page copies are not.
"""
from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cdpcore.format import REC_HDR_SIZE, align8
from cdpcore.packing import ID_SIZE, Pack

MIN_SAMPLES = 32  # offers per file before its hit rate is trusted
PROBE_EVERY = 64  # a file not offered for still has one chunk in this many offered
ID_COST = ID_SIZE + 2  # bytes an id costs in an OFFER (msgpack bin header included)
_FID = struct.Struct("<Q")


@dataclass(slots=True)
class _Stats:
    offered: int = 0
    held: int = 0
    skipped: int = 0
    saved_bytes: int = 0  # raw bytes of held chunks (what a hit saves, before compression)


class OfferPolicy:
    """Per-connection (or per-sender) learning of which files' chunks are
    worth offering (module docstring)."""

    def __init__(self, ratio: float = 0.3) -> None:
        # ratio: the expected wire/raw ratio of a chunk sent as bytes; a hit
        # saves about ratio x its size
        self.ratio = ratio
        self._stats: dict[Any, _Stats] = {}  # per (file: its path, else its id; size class)
        self._paths: dict[int, bytes] = {}  # file id -> path (from CREATE and FILEMAP records)

    def _worth(self, s: _Stats) -> bool:
        if s.offered < MIN_SAMPLES:
            return True
        if s.held == 0:
            return False
        return s.saved_bytes * self.ratio > s.offered * ID_COST

    def _key(self, fid: int, size: int) -> tuple[int | bytes, int]:
        return (self._paths.get(fid, fid), size.bit_length())

    def choose(self, run: bytes, pack: Pack) -> tuple[list[bytes], dict[bytes, Any]]:
        """Of pack.ids (unknown to the sender), those to offer, and the file
        each chunk belongs to (for learn). run is the pack's input: whole
        journal records (plain file bytes: everything is offered)."""
        owner = _owners(run, self._paths) if run else None
        out: list[bytes] = []
        keys: dict[bytes, Any] = {}
        if not pack.ids:
            return out, keys
        want = set(pack.ids)
        for piece in pack.pieces:
            cid = piece.id
            if cid is None or cid not in want or cid in keys:
                continue
            key = self._key(owner(piece.start), piece.end - piece.start) if owner is not None else -1
            keys[cid] = key
            s = self._stats.setdefault(key, _Stats())
            if key == -1 or self._worth(s):
                out.append(cid)
            else:
                s.skipped += 1
                if s.skipped % PROBE_EVERY == 0:
                    out.append(cid)  # a probe: does this file's content start to repeat?
        return out, keys

    def learn(self, offered: list[bytes], held: set[bytes], keys: dict[bytes, Any],
              sizes: dict[bytes, int]) -> None:
        """The HAVE answer to an offer made from choose()."""
        for cid in offered:
            s = self._stats.setdefault(keys.get(cid, -1), _Stats())
            s.offered += 1
            if cid in held:
                s.held += 1
                s.saved_bytes += sizes.get(cid, 0)


_NAMING = (4, 11)  # CREATE, FILEMAP: the record binds its file id to the path in its payload


def _owners(run: bytes, paths: dict[int, bytes]) -> Callable[[int], int]:
    """A function from an offset in a run of whole records to the file id
    of the record that holds it; records that name a file update paths."""
    starts: list[int] = []
    fids: list[int] = []
    pos, n = 0, len(run)
    while pos + REC_HDR_SIZE <= n:
        plen = int.from_bytes(run[pos + 4:pos + 8], "little")
        fid = _FID.unpack_from(run, pos + 24)[0]
        if run[pos + 40] in _NAMING and fid:
            paths[fid] = bytes(run[pos + REC_HDR_SIZE:pos + REC_HDR_SIZE + plen])
        starts.append(pos)
        fids.append(fid)
        pos += align8(REC_HDR_SIZE + plen)

    def owner(off: int) -> int:
        i = bisect_right(starts, off) - 1
        return fids[i] if i >= 0 else -1

    return owner

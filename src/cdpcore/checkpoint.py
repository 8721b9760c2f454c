"""Checkpoint: a restore plan saved beside the journal, so that planning a
later point starts from it instead of from the journal's first record.

Why. A plan reads every record header from the base (or the journal's
start) to its point and lays all the rows over each other: on a journal of
a million writes that is most of a restore's time, and all of a rollback's
time when the damage to undo is recent. The state at a sealed segment's
last record never changes (sealed segments are immutable), so its plan can
be computed once: the tree (names, file ids, modes, mtimes), each inode's
size, and the visible pieces (which bytes of which segment or base file
make up each file). build_plan() then loads the newest checkpoint at or
before its point, turns its pieces into rows that the later records are
laid over, and reads only the records after it.

A checkpoint is a cache, like a segment's index file: it names its source
files with their sizes and an identity (the segment header's checksum, a
base file's mtime), and a checkpoint whose sources changed, whose checksum
fails or whose journal is another is ignored and removed by update().
Prune rewrites segments, so it discards every checkpoint (discard(), in
the step that swaps the segments, which recovery repeats).

When. update() (`cdpctl checkpoint`) keeps a checkpoint at the end of each
of the newest DENSE sealed segments (a rollback of recent damage then reads
at most one segment of records), and further back one wherever the
segments after the previous kept one hold `spacing` bytes: at least
256 MiB and at least 8 times that checkpoint's own size, so those take at
most an eighth of the journal's space and a plan never reads more than one
spacing of records. Checkpoints of older segments that fall between are
removed as the journal grows.
Capture runs it when it stops, prune after it compacts, and an operator
may run it from cron; nothing depends on it but speed.

File format (`checkpoints/<16 hex digits of seq>.ckpt`), little-endian:

| offset | size | field |
|---|---|---|
| 0 | 8 | magic `CDPJCKP\\0` |
| 8 | 2 | version = 1 |
| 10 | 2 | header size = 64 |
| 12 | 4 | flags = 0 |
| 16 | 16 | journal UUID |
| 32 | 8 | seq: the state after this record |
| 40 | 8 | n: number of pieces |
| 48 | 8 | m: length of the metadata |
| 56 | 4 | CRC32C of the body (everything after the header) |
| 60 | 4 | CRC32C of bytes 0..59 |

The body is the metadata (msgpack, m bytes), zero padding to a multiple of
8, then six columns of n u64 each: key, start, end, source, source
offset, and the offset of the payload of the record the piece comes from
(0 for a base file), sorted by (key, start) as the plan's pieces are.
"""
from __future__ import annotations

import mmap
import os
import struct
import uuid as uuidlib
from array import array
from dataclasses import dataclass
from typing import Any

import msgpack

from cdpcore._native import crc32c
from cdpcore.format import SEG_HDR
from cdpcore.journal import Journal, fsync_dir

DIR = "checkpoints"
SUFFIX = ".ckpt"
MAGIC = b"CDPJCKP\0"
VERSION = 1
HDR = struct.Struct("<8sHHI16sQQQII")
MIN_SPACING = 256 << 20
SPACING_FACTOR = 8
DENSE = 4  # the newest sealed segments that all get one (recent damage is the common case)

assert HDR.size == 64


@dataclass
class Checkpoint:
    """A plan's state as loaded from a checkpoint file (plan.build_plan
    turns it back into a tree and rows)."""

    seq: int
    ts: int | None
    start_seq: int  # the seq the state starts from (the last BASE, or the journal's first)
    sources: list[str]  # absolute paths, indexed by the pieces' source column
    next_key: int
    inodes: list[tuple[int, int, int | None, int]]  # key, mode, mtime_us, mtime_seq
    nodes: list[tuple[str, int, Any, Any]]  # path, tag (0 inode, 1 dir, 2 symlink), a, b
    ids: list[int]  # flat: file id, key, file id, key, ...
    sizes: array
    pieces: tuple[Any, ...]  # memoryviews of u64: key, start, end, source, source offset, record
    dirty: list[str]
    path: str
    file_size: int


def _dir(j: Journal) -> str:
    return os.path.join(j.path, DIR)


def name_of(seq: int) -> str:
    return f"{seq:016x}{SUFFIX}"


def _identity(path: str) -> tuple[int, int]:
    """(size, identity) of a source file: a segment by its header checksum
    (sealed segments never change), a base file by its mtime."""
    st = os.stat(path)
    if path.endswith(".seg"):
        with open(path, "rb") as f:
            hdr = f.read(SEG_HDR.size)
        return st.st_size, int.from_bytes(hdr[60:64], "little") if len(hdr) == SEG_HDR.size else -1
    return st.st_size, st.st_mtime_ns


def seqs(j: Journal) -> list[int]:
    """Sequence numbers of the checkpoint files present (not yet checked)."""
    try:
        names = os.listdir(_dir(j))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.endswith(SUFFIX) and len(n) == 16 + len(SUFFIX):
            try:
                out.append(int(n[:16], 16))
            except ValueError:
                continue
    return sorted(out)


def save(j: Journal, plan: Any) -> str:
    """Write the plan (plan.Plan, built by build_plan) as a checkpoint;
    returns its path. Written to a temporary name and renamed, so a reader
    sees a whole file or none."""
    from cdpcore.plan import Dir, Inode, Link

    tree = plan.tree
    inodes: dict[int, Inode] = {}
    nodes: list[list[Any]] = []
    for p, node in tree.nodes.items():
        if isinstance(node, Inode):
            inodes[node.key] = node
            nodes.append([os.fsencode(p), 0, node.key, None])
        elif isinstance(node, Dir):
            nodes.append([os.fsencode(p), 1, node.mode, node.mtime_us])
        elif isinstance(node, Link):
            nodes.append([os.fsencode(p), 2, os.fsencode(node.target), None])
    ids: list[int] = []
    for fid, ino in tree.ids.items():
        inodes[ino.key] = ino
        ids += (fid, ino.key)
    root = j.path
    sources = []
    for sp in plan.sources.paths:
        size, ident = _identity(sp)
        sources.append([os.fsencode(os.path.relpath(sp, root)), size, ident])
    meta = msgpack.packb({
        "seq": plan.seq, "ts": plan.ts, "start_seq": plan.seq - plan.records + 1,
        "sources": sources, "next_key": tree.next_key,
        "inodes": [[i.key, i.mode, i.mtime_us, i.mtime_seq] for i in inodes.values()],
        "nodes": nodes, "ids": ids, "sizes": plan.sizes.tobytes(), "dirty": plan.dirty,
    })
    n = len(plan.pieces[0]) if plan.pieces else 0
    body = bytearray(meta)
    body += bytes(-len(body) % 8)
    cols = list(plan.pieces) or [array("Q")] * 6
    ends = array("Q", cols[1])
    for i, length in enumerate(cols[2]):
        ends[i] += length
    cols[2] = ends  # stored as ends: they become rows (start, end) when loaded
    for col in cols:
        body += col.tobytes()
    head = HDR.pack(MAGIC, VERSION, HDR.size, 0, uuidlib.UUID(j.uuid).bytes, plan.seq, n, len(meta),
                    crc32c(bytes(body)), 0)
    head = head[:60] + crc32c(head[:60]).to_bytes(4, "little")
    d = _dir(j)
    os.makedirs(d, exist_ok=True)
    final = os.path.join(d, name_of(plan.seq))
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(body)
        f.flush()
        os.fdatasync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(d)
    return final


class Invalid(Exception):
    """A checkpoint file that cannot be used (the reason is the message)."""


def load(j: Journal, seq: int) -> Checkpoint:
    """The checkpoint at seq, checked: header, checksums, journal, sources.
    Raises Invalid when it cannot be used."""
    path = os.path.join(_dir(j), name_of(seq))
    try:
        # A private writable mapping: the columns are used in place, and a
        # rollback compacts them in place (copy on write: its few pages).
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HDR.size:
                raise Invalid("shorter than its header")
            data = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise Invalid(f"cannot read: {e.strerror}") from None
    magic, version, hsize, flags, uid, cseq, n, m, body_crc, hdr_crc = HDR.unpack_from(data)
    if magic != MAGIC or hsize != HDR.size or crc32c(data[:60]) != hdr_crc:
        raise Invalid("not a checkpoint header")
    if version != VERSION or flags != 0:
        raise Invalid(f"version {version} flags {flags} not known")
    if uid != uuidlib.UUID(j.uuid).bytes or cseq != seq:
        raise Invalid("of another journal or point")
    meta_end = HDR.size + m
    cols_at = meta_end + (-m % 8)
    if len(data) != cols_at + 48 * n or crc32c(memoryview(data)[HDR.size:]) != body_crc:  # type: ignore[arg-type]
        raise Invalid("damaged (checksum)")
    try:
        meta = msgpack.unpackb(memoryview(data)[HDR.size:meta_end], strict_map_key=False)
        sources = []
        for rel, size, ident in meta["sources"]:
            full = os.path.join(j.path, os.fsdecode(rel))
            try:
                if _identity(full) != (size, ident):
                    raise Invalid(f"source {os.fsdecode(rel)} changed")
            except OSError:
                raise Invalid(f"source {os.fsdecode(rel)} is gone") from None
            sources.append(full)
        sizes = array("Q")
        sizes.frombytes(meta["sizes"])
        view = memoryview(data)
        pieces = [view[cols_at + 8 * n * c : cols_at + 8 * n * (c + 1)].cast("Q") for c in range(6)]
        nodes = [(os.fsdecode(p), tag, os.fsdecode(a) if tag == 2 else a, b) for p, tag, a, b in meta["nodes"]]
        return Checkpoint(meta["seq"], meta["ts"], meta["start_seq"], sources, meta["next_key"],
                          [tuple(x) for x in meta["inodes"]], nodes, meta["ids"], sizes,  # type: ignore[misc]
                          tuple(pieces), list(meta["dirty"]), path, len(data))
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
        raise Invalid(f"bad metadata: {e}") from None


def best(j: Journal, seq: int) -> Checkpoint | None:
    """The newest usable checkpoint at or before seq (None if there is
    none). Unusable ones are skipped here and removed by update()."""
    first = j.first_seq
    for s in reversed(seqs(j)):
        if s > seq or s < first - 1:
            continue
        try:
            return load(j, s)
        except Invalid:
            continue
    return None


@dataclass
class UpdateResult:
    created: list[int]
    removed: list[tuple[int, str]]  # seq, why
    kept: list[int]
    bytes: int  # of all checkpoint files after the update

    def to_json(self) -> dict[str, Any]:
        return {"created": self.created, "removed": [{"seq": s, "reason": r} for s, r in self.removed],
                "kept": self.kept, "bytes": self.bytes}


def update(j: Journal, spacing: int | None = None) -> UpdateResult:
    """Remove unusable checkpoints and add one at the end of each sealed
    segment that lies `spacing` bytes (default: the rule in the module
    docstring) of segments after the previous checkpoint."""
    from cdpcore.plan import build_plan

    result = UpdateResult([], [], [], 0)
    last_seq = j.last_seq
    sizes: dict[int, int] = {}
    for s in seqs(j):
        try:
            if s > last_seq or s < j.first_seq - 1:
                raise Invalid("outside the journal's records")
            sizes[s] = load(j, s).file_size
        except Invalid as e:
            os.unlink(os.path.join(_dir(j), name_of(s)))
            result.removed.append((s, str(e)))
    infos = [i for i in j._segs[:-1] if i.count]  # sealed (the last may grow), not empty
    dense = {i.last_seq for i in infos[-DENSE:]}
    prev: int | None = None
    since = 0
    for info in infos:
        since += info.end
        s = info.last_seq
        need = spacing if spacing is not None else max(MIN_SPACING, SPACING_FACTOR * sizes.get(prev or -1, 0))
        if since >= need or s in dense:
            if s not in sizes:
                with build_plan(j, s) as plan:
                    sizes[s] = os.path.getsize(save(j, plan))
                result.created.append(s)
            if since >= need:
                prev, since = s, 0
        elif s in sizes:  # thinned: the newest segments have moved on
            os.unlink(os.path.join(_dir(j), name_of(s)))
            del sizes[s]
            result.removed.append((s, "thinned"))
    result.kept = sorted(sizes)
    result.bytes = sum(sizes.values())
    return result


def discard(journal_path: str) -> None:
    """Remove every checkpoint of the journal at journal_path. Prune calls
    it before it swaps segments: a checkpoint inside the pruned history
    could otherwise be continued over the compacted records that replace
    the ones after it."""
    d = os.path.join(journal_path, DIR)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith(SUFFIX) or n.endswith(SUFFIX + ".tmp"):
            try:
                os.unlink(os.path.join(d, n))
            except FileNotFoundError:
                pass
    fsync_dir(d)

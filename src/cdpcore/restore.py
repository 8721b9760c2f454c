"""restore(): materialise the protected tree as it was at a point.

This is the basic replay: the latest base at or before the point, then every
record after it up to the point, applied in sequence order. Files are
modelled as inodes (the journal's file ids name inodes, not paths, exactly
like a program's open descriptors), staged in a hidden directory inside
DEST and moved to their names at the end, so that writes to a renamed or
unlinked file land where they did in the original tree.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from cdpcore.errors import CorruptJournal, RestoreError
from cdpcore.filemap import fs_path, under
from cdpcore.format import NO_MODE, SETATTR_FIXED, Kind, decode_path, split_pair
from cdpcore.journal import Journal
from cdpcore.point import PointLike, format_us

STAGING = ".cdpcore-restore"


@dataclass(slots=True)
class RestoreResult:
    seq: int
    ts: int | None
    files: int = 0
    dirs: int = 0
    bytes_written: int = 0
    records: int = 0
    dirty: list[str] = field(default_factory=list)  # files capture could not fully see

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "time": format_us(self.ts) if self.ts else None,
                "files": self.files, "dirs": self.dirs, "bytes_written": self.bytes_written,
                "records": self.records, "dirty": self.dirty}


@dataclass(slots=True)
class _Inode:
    key: int
    mode: int = 0o644
    mtime_us: int | None = None


@dataclass(slots=True)
class _Dir:
    mode: int = 0o755
    mtime_us: int | None = None


@dataclass(slots=True)
class _Link:
    target: str


class _Tree:
    """The namespace being rebuilt: path -> inode, directory or symlink."""

    def __init__(self, staging: str):
        self.staging = staging
        self.nodes: dict[str, Any] = {}
        self.ids: dict[int, _Inode] = {}
        self.next_key = 0
        self.bytes_written = 0

    def inode_path(self, ino: _Inode) -> str:
        return os.path.join(self.staging, str(ino.key))

    def new_inode(self, mode: int = 0o644) -> _Inode:
        self.next_key += 1
        ino = _Inode(self.next_key, mode)
        open(self.inode_path(ino), "wb").close()
        return ino

    def parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            node = self.nodes.get(p)
            if node is None:
                self.nodes[p] = _Dir()
            elif not isinstance(node, _Dir):
                raise CorruptJournal(f"journal uses {p!r} as a directory but it is a file")

    def remove(self, path: str, subtree: bool) -> list[tuple[str, Any]]:
        gone = [(p, n) for p, n in self.nodes.items() if (under(p, path) if subtree else p == path)]
        for p, _ in gone:
            del self.nodes[p]
        return gone

    def apply(self, kind: int, fid: int, offset: int, payload: bytes) -> None:
        if kind == Kind.WRITE:
            ino = self.ids.get(fid)
            if ino is None:
                raise CorruptJournal(f"write to file id {fid} that no FILEMAP or CREATE bound")
            fd = os.open(self.inode_path(ino), os.O_WRONLY)
            try:
                os.pwrite(fd, payload, offset)
            finally:
                os.close(fd)
            self.bytes_written += len(payload)
        elif kind == Kind.TRUNCATE:
            ino = self.ids.get(fid)
            if ino is None:
                raise CorruptJournal(f"truncate of file id {fid} that no FILEMAP or CREATE bound")
            os.truncate(self.inode_path(ino), offset)
        elif kind == Kind.FILEMAP:
            path = decode_path(payload)
            node = self.nodes.get(path)
            if isinstance(node, _Inode):
                self.ids[fid] = node
            elif node is None:
                self.parents(path)
                self.nodes[path] = self.ids[fid] = self.new_inode()
            else:
                raise CorruptJournal(f"FILEMAP names {path!r}, which is not a regular file")
        elif kind == Kind.CREATE:
            path = decode_path(payload)
            if isinstance(self.nodes.get(path), _Dir):
                raise CorruptJournal(f"CREATE over directory {path!r}")
            self.parents(path)
            self.nodes[path] = self.ids[fid] = self.new_inode(offset & 0o7777)
        elif kind == Kind.MKDIR:
            path = decode_path(payload)
            self.parents(path)
            if not isinstance(self.nodes.get(path), _Dir):
                self.nodes[path] = _Dir(offset & 0o7777)
            else:
                self.nodes[path].mode = offset & 0o7777
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
            if isinstance(node, _Inode):
                self.parents(dst)
                self.nodes[dst] = node
        elif kind == Kind.SYMLINK:
            target, b = split_pair(payload)
            path = decode_path(b)
            self.parents(path)
            self.nodes[path] = _Link(os.fsdecode(target))
        elif kind == Kind.SETATTR:
            path = decode_path(payload[SETATTR_FIXED.size :])
            node = self.nodes.get(path)
            if isinstance(node, (_Inode, _Dir)):
                mtime = SETATTR_FIXED.unpack_from(payload)[0]
                if offset != NO_MODE:
                    node.mode = offset & 0o7777
                if mtime != -(2**63):
                    node.mtime_us = mtime
        # FLUSH, BOOKMARK, DIRTY change nothing in the tree.

    def load_base(self, base_dir: str) -> None:
        self.nodes.clear()
        self.ids.clear()
        for top, dirs, files in os.walk(base_dir):
            rel_top = os.path.relpath(top, base_dir).replace(os.sep, "/")
            for name in dirs + files:
                rel = name if rel_top == "." else f"{rel_top}/{name}"
                src = os.path.join(top, name)
                st = os.lstat(src)
                if os.path.islink(src):
                    self.nodes[rel] = _Link(os.readlink(src))
                elif name in dirs:
                    self.nodes[rel] = _Dir(st.st_mode & 0o7777, st.st_mtime_ns // 1000)
                else:
                    ino = self.new_inode(st.st_mode & 0o7777)
                    ino.mtime_us = st.st_mtime_ns // 1000
                    shutil.copyfile(src, self.inode_path(ino))
                    self.nodes[rel] = ino
                    self.bytes_written += st.st_size

    def materialise(self, dest: str, result: RestoreResult) -> None:
        placed: dict[int, str] = {}
        for path in sorted(self.nodes, key=lambda p: p.count("/")):
            node = self.nodes[path]
            target = fs_path(dest, path)
            if isinstance(node, _Dir):
                os.mkdir(target, 0o700)
                result.dirs += 1
            elif isinstance(node, _Link):
                os.symlink(node.target, target)
            elif node.key in placed:
                os.link(placed[node.key], target)
            else:
                os.rename(self.inode_path(node), target)
                placed[node.key] = target
                result.files += 1
        # modes and mtimes last, deepest first, so that setting them does
        # not change them again (writing into a directory touches its mtime)
        for path in sorted(self.nodes, key=lambda p: -p.count("/")):
            node = self.nodes[path]
            if isinstance(node, _Link):
                continue
            target = fs_path(dest, path)
            os.chmod(target, node.mode)
            if node.mtime_us is not None:
                ns = node.mtime_us * 1000
                os.utime(target, ns=(ns, ns))


def restore(journal: Journal | str | os.PathLike[str], dest: str | os.PathLike[str],
            at: PointLike | None = "latest") -> RestoreResult:
    """Materialise the protected root as it was at point `at` into `dest`,
    which must be absent or an empty directory."""
    if isinstance(journal, Journal):
        return _restore(journal, os.path.abspath(os.fspath(dest)), at)
    with Journal.open(journal, readonly=True) as j:
        return _restore(j, os.path.abspath(os.fspath(dest)), at)


def _restore(j: Journal, dest: str, at: PointLike | None) -> RestoreResult:
    seq = j.resolve(at)
    if os.path.exists(dest):
        if not os.path.isdir(dest):
            raise RestoreError(f"{dest} exists and is not a directory")
        if os.listdir(dest):
            raise RestoreError(f"{dest} is not empty; restore needs an empty or absent directory")
        created = False
    else:
        os.makedirs(dest)
        created = True
    try:
        return _replay(j, dest, seq)
    except BaseException:
        # leave DEST as it was found: an operator must not mistake a
        # half-restored tree for a restore
        for name in os.listdir(dest):
            p = os.path.join(dest, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        if created:
            os.rmdir(dest)
        raise


def _replay(j: Journal, dest: str, seq: int) -> RestoreResult:
    staging = os.path.join(dest, STAGING)
    os.mkdir(staging, 0o700)
    tree = _Tree(staging)
    result = RestoreResult(seq, None)
    try:
        # Start from the newest BASE at or before seq.
        start = j.first_seq
        for rec in j.records(until=f"seq:{seq}", kinds=(Kind.BASE,)):
            start = rec.seq
        for s, ts, kind, _fl, fid, offset, payload in j._iter_raw(start, seq):
            raw = bytes(payload)
            if kind == Kind.BASE:
                ref = raw.decode("utf-8", "replace")
                base = os.path.join(j.path, *ref.split("/"))
                if ".." in ref.split("/") or not os.path.isdir(base):
                    raise CorruptJournal(f"BASE record {s} names missing base {ref!r}")
                tree.load_base(base)
            elif kind == Kind.DIRTY:
                ino = tree.ids.get(fid)
                name = next((p for p, n in tree.nodes.items() if n is ino), f"file id {fid}")
                result.dirty.append(f"{name} (seq {s}): {raw[8:].decode('utf-8', 'replace')}")
            else:
                tree.apply(kind, fid, offset, raw)
                if kind in (Kind.WRITE, Kind.TRUNCATE, Kind.CREATE):
                    # the file changed then: its mtime is no longer the base's
                    # (a restored file must not look unmodified to rsync or make)
                    tree.ids[fid].mtime_us = ts
            result.records += 1
            result.ts = ts
        tree.materialise(dest, result)
        result.bytes_written = tree.bytes_written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result

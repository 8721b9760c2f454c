"""restore(): materialise the protected tree as it was at a point.

The default method writes each byte of the result once: a Plan (plan.py)
says, for every file, which pieces of which segment or base file it is made
of; the pieces are copied straight from read-only mappings of those files
(gathered pwritev, native/extent.c) and each file is ftruncated to its size,
so holes stay holes.

method="replay" is the reference implementation the tests compare against:
the latest base at or before the point, then every record after it up to
the point, applied in sequence order to staged inode files (a hidden
directory inside DEST), moved to their names at the end.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cdpcore.errors import PointError, RestoreError
from cdpcore.filemap import fs_path
from cdpcore.format import Kind
from cdpcore.journal import Journal
from cdpcore.plan import (
    Dir,
    Inode,
    Link,
    Plan,
    Progress,
    Tree,
    Validator,
    base_path,
    build_plan,
    last_global_flush,
)
from cdpcore.point import PointLike, format_us

STAGING = ".cdpcore-restore"
_GLOBAL_FLUSH = 0  # file id of a FLUSH of all files

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


class _ReplayTree(Tree):
    """The reference: every inode is a staged file, every WRITE a pwrite."""

    def __init__(self, staging: str):
        super().__init__()
        self.staging = staging
        self.bytes_written = 0

    def inode_path(self, ino: Inode) -> str:
        return os.path.join(self.staging, str(ino.key))

    def new_inode(self, mode: int = 0o644) -> Inode:
        ino = super().new_inode(mode)
        open(self.inode_path(ino), "wb").close()
        return ino

    def apply(self, kind: int, fid: int, offset: int, payload: bytes, seq: int, ts: int) -> None:
        if kind == Kind.WRITE:
            ino = self.inode(fid, "write")
            fd = os.open(self.inode_path(ino), os.O_WRONLY)
            try:
                os.pwrite(fd, payload, offset)
            finally:
                os.close(fd)
            self.bytes_written += len(payload)
        elif kind == Kind.TRUNCATE:
            os.truncate(self.inode_path(self.inode(fid, "truncate")), offset)
        else:
            self.apply_ns(kind, fid, offset, payload, seq, ts)
        if kind in (Kind.WRITE, Kind.TRUNCATE):
            # the file changed then: its mtime is no longer the base's
            # (a restored file must not look unmodified to rsync or make)
            self.ids[fid].mtime_us = ts

    def load_base(self, base_dir: str) -> None:
        self.reset()
        for rel, full, st in self.walk_base(base_dir):
            ino = self.new_inode(st.st_mode & 0o7777)
            ino.mtime_us = st.st_mtime_ns // 1000
            shutil.copyfile(full, self.inode_path(ino))
            self.nodes[rel] = ino
            self.bytes_written += st.st_size


def materialise(nodes: dict[str, Any], dest: str, result: RestoreResult,
                place: Callable[[Inode, str], None]) -> None:
    """Create the tree's names under dest: directories, symlinks, and each
    inode once through place(inode, path) (hard links after), then modes and
    mtimes."""
    placed: dict[int, str] = {}
    for path in sorted(nodes, key=lambda p: p.count("/")):
        node = nodes[path]
        target = fs_path(dest, path)
        if isinstance(node, Dir):
            os.mkdir(target, 0o700)
            result.dirs += 1
        elif isinstance(node, Link):
            os.symlink(node.target, target)
        elif node.key in placed:
            os.link(placed[node.key], target)
        else:
            place(node, target)
            placed[node.key] = target
            result.files += 1
    # modes and mtimes last, deepest first, so that setting them does
    # not change them again (writing into a directory touches its mtime)
    for path in sorted(nodes, key=lambda p: -p.count("/")):
        node = nodes[path]
        if isinstance(node, Link):
            continue
        target = fs_path(dest, path)
        os.chmod(target, node.mode)
        if node.mtime_us is not None:
            ns = node.mtime_us * 1000
            os.utime(target, ns=(ns, ns))


Method = Literal["plan", "replay"]


def restore(journal: Journal | str | os.PathLike[str], dest: str | os.PathLike[str],
            at: PointLike | None = "latest", consistent: bool = False, method: Method = "plan",
            progress: Progress | None = None, audit: bool = True, sync: bool = False) -> RestoreResult:
    """Materialise the protected root as it was at point `at` into `dest`,
    which must be absent or an empty directory. With consistent=True, the
    last FLUSH of all files at or before `at` is restored instead.
    method="replay" is the slow reference implementation. progress, if
    given, is called as progress(phase, done, total) with phase "plan"
    (records) or "copy" (bytes). Every restore (and every failed one) is
    entered in the journal's audit log unless audit=False (for callers that
    audit the larger action themselves); an unwritable log only warns, so
    that restoring from read-only media works. With sync=True every file
    and directory written (and DEST's entry in its parent) is on disk when
    restore returns: what an operator needs before starting a database on
    the result, since a power cut would otherwise lose what the page cache
    held."""
    if method not in ("plan", "replay"):
        raise ValueError(f"unknown restore method {method!r}")
    target = os.path.abspath(os.fspath(dest))

    def run(j: Journal) -> RestoreResult:
        return _restore(j, target, at, consistent, method, progress, sync)

    def audited_run(j: Journal) -> RestoreResult:
        if not audit:
            return run(j)
        from cdpcore import audit as log

        args = {"at": str(at), "dest": target, "consistent": consistent, **({"sync": True} if sync else {})}
        return log.audited(j, "restore", args, lambda: run(j), anchor=False, required=False)

    if isinstance(journal, Journal):
        return audited_run(journal)
    with Journal.open(journal, readonly=True) as j:
        return audited_run(j)


def sync_tree(dest: str) -> None:
    """fsync every regular file and directory under dest, dest itself and
    its parent (whose entry for dest may be new). Files first: a directory's
    fsync makes its entries durable, not the data they name."""
    dirs = []
    for top, _dirs, files in os.walk(dest):
        dirs.append(top)
        for name in files:
            p = os.path.join(top, name)
            if os.path.islink(p):
                continue  # a symlink is its directory's entry
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [*reversed(dirs), os.path.dirname(dest) or "."]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolve_point(j: Journal, at: PointLike | None, consistent: bool) -> int:
    """The seq a restore of `at` materialises. A consistent point is the last
    FLUSH with file id 0 (all files) at or before `at`: a FLUSH of one file
    says nothing of the others, so it is not a point of the whole tree."""
    seq = j.resolve(at)
    if not consistent:
        return seq
    flush = last_global_flush(j, seq)
    if flush is None:
        raise PointError(f"no consistent point (a FLUSH of all files) at or before seq {seq}")
    return flush


def _restore(j: Journal, dest: str, at: PointLike | None, consistent: bool, method: Method,
             progress: Progress | None, sync: bool = False) -> RestoreResult:
    seq = resolve_point(j, at, consistent)
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
        if method == "replay":
            result = _replay(j, dest, seq)
            if sync:
                sync_tree(dest)
            return result
        validator = Validator()
        try:
            with build_plan(j, seq, progress, validator) as plan:
                result = write_plan(plan, dest, progress)
        except BaseException:
            # unchecked records may have led the plan astray (a damaged
            # length, say): the damage is the error to report
            damage = validator.error()
            if damage is not None:
                raise damage from None
            raise
        validator.finish()
        if sync:  # (a failure here empties DEST too: nothing half-durable is left)
            sync_tree(dest)
        return result
    except BaseException:
        # leave DEST as it was found: an operator must not mistake a
        # half-restored tree for a restore
        for name in os.listdir(dest):
            p = os.path.join(dest, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        if created:
            os.rmdir(dest)
        raise


def write_plan(plan: Plan, dest: str, progress: Progress | None = None) -> RestoreResult:
    """Create the plan's tree under dest (which must exist and be empty)."""
    result = RestoreResult(plan.seq, plan.ts, records=plan.records, dirty=list(plan.dirty))
    total = plan.data_bytes() if progress is not None else 0

    def place(ino: Inode, target: str) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            lo, hi = plan.piece_range(ino)
            result.bytes_written += plan.sources.copy(fd, plan, lo, hi)
            # the size last: what no piece covers stays a hole
            os.ftruncate(fd, plan.size_of(ino))
        finally:
            os.close(fd)
        if progress is not None:
            progress("copy", result.bytes_written, total)

    materialise(plan.tree.nodes, dest, result, place)
    return result


def _replay(j: Journal, dest: str, seq: int) -> RestoreResult:
    staging = os.path.join(dest, STAGING)
    os.mkdir(staging, 0o700)
    tree = _ReplayTree(staging)
    result = RestoreResult(seq, None)
    try:
        # Start from the newest BASE at or before seq.
        start = j.first_seq
        for rec in j.records(until=f"seq:{seq}", kinds=(Kind.BASE,)):
            start = rec.seq
        for s, ts, kind, _fl, fid, offset, payload in j._iter_raw(start, seq):
            raw = bytes(payload)
            if kind == Kind.BASE:
                tree.load_base(base_path(j, s, raw))
            elif kind == Kind.DIRTY:
                name = tree.name_of(tree.ids.get(fid), fid)
                result.dirty.append(f"{name} (seq {s}): {raw[8:].decode('utf-8', 'replace')}")
            else:
                tree.apply(kind, fid, offset, raw, s, ts)
            result.records += 1
            result.ts = ts
        materialise(tree.nodes, dest, result, lambda ino, target: os.rename(tree.inode_path(ino), target))
        result.bytes_written = tree.bytes_written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result

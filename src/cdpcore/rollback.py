"""rollback(): return the live protected root to a point, in place.

Theory of operation. The journal's latest state is what the live root holds
(nothing writes to the root unseen while no capture runs: rollback refuses
while one does). The point's plan (`want`) is built as for a restore; the
latest state (`now`) is that plan continued over the records after the
point only (plan.continue_plan), which also yields, per file, the byte
ranges those records wrote or cut: only there can the root differ from the
point. So the point's plan lays out pieces only there, and for files the
root lost (plan.build_rollback_plan); it starts from the newest checkpoint
before the point (checkpoint.py), so a rollback of recent damage reads the
records since that checkpoint and the bytes it puts back, not the journal. Inode keys are handed out in record order, so a file that exists at
both moments has the same key in both. Rollback rewrites only those:

1. names that must go elsewhere are first moved into a staging directory
   inside the root (`.cdpcore-rollback`), so that swaps and renames over
   each other cannot lose a file;
2. what the point does not have is removed, deepest first;
3. directories are made, staged files moved to their names (a rename
   undone), files the point has and the root lacks are created, hard links
   and symlinks made;
4. in the ranges the later records touched, the bytes that differ from
   the root are rewritten; sizes set, modes and mtimes put back.

Every operation is recorded, in order, as the journal record that says
the same thing (RENAME into and out of the staging directory included),
and appended in one batch at the end with a FLUSH and a BOOKMARK
`rollback-to-<seq>`: restoring the latest point then equals the rolled-back
root, and a point before the rollback's records still restores what was
there before it.

Crash safety. Before the root is touched, JOURNAL/rollback.json (the
intent: from which seq to which) is written durably. Each operation is
"make it so" and tolerates having been done already (a rename whose source
is gone and whose target exists, an unlink of a missing name, a rewrite of
bytes already rewritten), so a rollback killed at any step is completed by
running it again: the intent pins `now` to the seq it started from, and
the records, appended in one batch, are all-or-nothing. A rerun journals
every byte range it puts back, even one it finds already right: the killed
run may have written it without journaling it (and it fsyncs those files
too: the killed run's writes may be in the page cache only). The
intent is removed last; a rerun that finds the rollback's bookmark after
the intent's seq just removes it.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from cdpcore._native import now_us
from cdpcore.errors import CaptureRunning, RestoreError
from cdpcore.filemap import fs_path
from cdpcore.journal import Journal, read_json, write_durable
from cdpcore.plan import (
    After,
    Dir,
    Inode,
    Link,
    Node,
    Plan,
    Spans,
    Validator,
    build_rollback_plan,
)
from cdpcore.point import PointLike, format_us

CAPTURE_LOCK = "capture.lock"
INTENT = "rollback.json"
STAGE = ".cdpcore-rollback"
# Put back starts the root's writeback every this many bytes written
# (cdp_put_back's kick: sync_file_range WRITE), so that the disk writes
# them while the rest is put back, instead of all of them in the fsync
# after, which no CPU work overlapped (35-60 ms of waiting for 10.6 MB of
# random pages). Measured on the benchmark's rollback (docs/benchmarks.md,
# section 6, rb4): put back + the wait for the fsync 75-87 ms without,
# 45-75 with 16-64 KiB, worse again at 256 KiB-4 MiB (each kick then
# blocks longer on a queue of requests the disk has not taken yet).
PUT_BACK_KICK = 1 << 16
# The rollback's journal append starts its writeback every this many bytes
# (cdp_writer_set_writeback): its fdatasync waited 12-17 ms for 10.6 MB
# written in one go, 2-4 ms after this. Sequential, so larger steps than
# put back's.
JOURNAL_KICK = 1 << 20
# Test hook: SIGKILL this process after that many operations (crash tests).
KILL_ENV = "CDPCORE_ROLLBACK_KILL_AFTER"


@dataclass(slots=True)
class RollbackResult:
    to_seq: int
    from_seq: int
    seq: int = 0  # the rollback's bookmark (0: nothing to do)
    ts: int | None = None
    bytes_written: int = 0
    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    records: int = 0  # appended to the journal
    resumed: bool = False  # completed an interrupted rollback

    def to_json(self) -> dict[str, Any]:
        return {"to_seq": self.to_seq, "from_seq": self.from_seq, "seq": self.seq, "ts": self.ts,
                "time": format_us(self.ts) if self.ts is not None else None,
                "bytes_written": self.bytes_written, "created": self.created, "removed": self.removed,
                "renamed": [list(p) for p in self.renamed], "changed": self.changed,
                "records": self.records, "resumed": self.resumed}


@contextmanager
def capture_lock(j: Journal, force: bool) -> Iterator[None]:
    """Hold JOURNAL/capture.lock exclusively for the rollback. A capture
    holds it shared for its lifetime; if one does, refuse (or, with force,
    go on without it: the operator says the capture is not writing)."""
    fd = os.open(os.path.join(j.path, CAPTURE_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not force:
                raise CaptureRunning(
                    f"a capture of {j.root} is running (it holds {os.path.join(j.path, CAPTURE_LOCK)}); "
                    "stop it first, or use --force if it is not writing") from None
        yield
    finally:
        os.close(fd)


def rollback(journal: Journal | str | os.PathLike[str], to: PointLike, force: bool = False,
             ts: int | None = None) -> RollbackResult:
    """Return the live protected root (journal.root) to point `to`,
    rewriting only what changed after it; the rollback is journaled and
    entered (anchored) in the audit log, as is a failed attempt. `ts`
    stamps the rollback's records and their audit anchor (epoch
    microseconds; default: now), for vendor code and tests that run the
    journal on a clock of their own."""
    from cdpcore import audit

    def run(j: Journal) -> RollbackResult:
        with capture_lock(j, force):
            return _rollback(j, to, ts)

    def audited_run(j: Journal) -> RollbackResult:
        return audit.audited(j, "rollback", {"to": str(to), "force": force}, lambda: run(j), anchor_ts=ts)

    if isinstance(journal, Journal):
        return audited_run(journal)
    with Journal.open(journal) as j:
        return audited_run(j)


def _rollback(j: Journal, to: PointLike, ts: int | None = None) -> RollbackResult:
    intent_path = os.path.join(j.path, INTENT)
    to_seq = j.resolve(to)
    intent = _read_intent(intent_path)
    if intent is not None:
        if intent["to"] != to_seq:
            raise _interrupted(j, intent)
        from_seq = intent["from"]
        done = [b for b in j.bookmarks() if b.name == _bookmark(to_seq) and b.seq > from_seq]
        if done:  # killed after the records were appended: only the intent is left
            os.unlink(intent_path)
            return RollbackResult(to_seq, from_seq, done[-1].seq, done[-1].ts, resumed=True)
    else:
        from_seq = j.last_seq
    result = RollbackResult(to_seq, from_seq, resumed=intent is not None)
    if to_seq >= from_seq:
        return result
    validator = Validator()
    # the point's plan (from the nearest checkpoint), continued over the
    # records after it (few, for a rollback of recent damage) to the state
    # the root holds; only what those records changed gets read back
    want, now = build_rollback_plan(j, to_seq, from_seq, validator)
    with want:
        validator.finish()
        if intent is None:
            write_durable(intent_path, json.dumps({"to": to_seq, "from": from_seq}).encode())
        ops = _Ops(j.root, resumed=intent is not None)
        _apply(now, want, ops, result)
        if not ops.journal:  # the root already holds the point's tree
            os.unlink(intent_path)
            return result
        # The root's changes must be on disk before the journal says they
        # happened (a rerun trusts the journal's bookmark), so the journal
        # is written only after the root's fsync; its records are collected
        # while that fsync runs, on a thread (os.fsync releases the GIL).
        syncing = _Background(ops.sync)
        # one timestamp for the whole rollback: it is one event, and the
        # result can say when without reading the journal back
        result.ts = now_us() if ts is None else ts
        b = j.batch()
        try:
            for name, args in ops.journal:
                getattr(b, name)(*args, ts=result.ts)
            b.append_flush(ts=result.ts)
            b.bookmark(_bookmark(to_seq), ts=result.ts)
        except BaseException:
            syncing.join()  # (its own error, if any, comes second to this one)
            raise
        syncing.result()
        ops.step()
        # by pointer: the put-back records point into the plan's sources
        # (its buffer of the records read, plan.gather_records; no second
        # copy of their 10 MB: fresh memory costs 4-7 us a page here), so
        # the plan stays open until the commit. Its writeback is started as
        # it goes: the journal's fdatasync right after then waits for
        # little more than the last megabyte.
        b.commit(by_pointer=True, writeback=JOURNAL_KICK)
        result.seq = b.last_seq
        result.records = b.last_seq - b.first_seq + 1
        # the journal's fdatasync waits for the disk, closing the plan (its
        # buffer, and the segments still mapped: those since the
        # checkpoint, or all of them past GATHER_MAX) needs a CPU: both at
        # once. (Nothing reads the sources any more: the records are
        # written.)
        journal_sync = _Background(j.sync)
        try:
            want.close()
        finally:
            journal_sync.result()
    ops.step()
    os.unlink(intent_path)
    return result


class _Background:
    """fn() on a thread of its own; result() waits for it and raises what it
    raised."""

    def __init__(self, fn: Callable[[], object]):
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # handed to result(), on the caller's thread
                self._error = e

        self._thread = threading.Thread(target=run, name="cdpcore-rollback-sync", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _bookmark(to_seq: int) -> str:
    return f"rollback-to-{to_seq}"


def refuse_if_interrupted(j: Journal) -> None:
    """Raise RestoreError while a killed rollback of j's root awaits its
    rerun (JOURNAL/rollback.json): the root then holds bytes that the run
    wrote and the journal does not say (they are journaled by the rerun),
    so a program must not run on it, nor a capture journal on top of it."""
    intent = _read_intent(os.path.join(j.path, INTENT))
    if intent is not None:
        raise _interrupted(j, intent)


def _interrupted(j: Journal, intent: dict[str, int]) -> RestoreError:
    return RestoreError(f"an interrupted rollback of {j.root} to seq {intent['to']} must be completed first "
                        f"(run the rollback to seq:{intent['to']} again)")


def _read_intent(path: str) -> dict[str, int] | None:
    doc = read_json(path, RestoreError, "rollback intent")
    if doc is None:
        return None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), int) for k in ("to", "from")):
        raise RestoreError(f"{path}: not a rollback intent")
    return {"to": doc["to"], "from": doc["from"]}


class _Ops:
    """File-system operations on the live root that tolerate having been
    done already, each noted as the journal append that says the same."""

    def __init__(self, root: str, resumed: bool = False):
        self.root = root
        # completing a killed rollback: the root may hold bytes that run
        # wrote and never journaled (see put_back)
        self.resumed = resumed
        self.journal: list[tuple[str, tuple[Any, ...]]] = []
        self.dirty_fds: list[str] = []
        self.dirs: set[str] = set()
        self._fds: dict[str, int] = {}  # open data files, by name (closed by any namespace op)
        self.count = 0
        kill = os.environ.get(KILL_ENV)
        self.kill_after = int(kill) if kill else -1

    def step(self) -> None:
        """Count an operation; the crash tests' hook kills the process here."""
        self.count += 1
        if self.count == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def path(self, rel: str) -> str:
        return fs_path(self.root, rel)

    def _fd(self, rel: str) -> int:
        """A descriptor of the file at rel, kept open while names stay put:
        a rollback of scattered damage reads and writes thousands of ranges
        of one file."""
        fd = self._fds.get(rel)
        if fd is None:
            fd = self._fds[rel] = os.open(self.path(rel), os.O_RDWR | os.O_CLOEXEC)
        return fd

    def _close_fds(self, sync: bool = False) -> None:
        fds, self._fds = self._fds, {}
        try:
            for fd in fds.values():
                if sync:
                    os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _done(self, append: str, args: tuple[Any, ...], *names: str) -> None:
        """Note the journal append for an operation done, and the
        directories whose entries it changed (synced before journaling)."""
        if names:
            self._close_fds()  # names change: descriptors by name go stale (sync() reopens)
        for rel in names:
            self.dirs.add(os.path.dirname(self.path(rel)))
        self.journal.append((append, args))
        self.step()

    def mkdir(self, rel: str, mode: int) -> None:
        with suppress(FileExistsError):
            os.mkdir(self.path(rel), 0o700)
        self._done("append_mkdir", (rel, mode), rel)

    def rename(self, a: str, b: str) -> None:
        try:
            os.rename(self.path(a), self.path(b))
        except FileNotFoundError:
            if not os.path.lexists(self.path(b)):
                raise  # neither there nor already moved
        self._done("append_rename", (a, b), a, b)

    def remove(self, rel: str, node: Node) -> None:
        p = self.path(rel)
        with suppress(FileNotFoundError):
            if isinstance(node, Dir) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        self._done("append_rmdir" if isinstance(node, Dir) else "append_unlink", (rel,), rel)

    def symlink(self, target: str, rel: str) -> None:
        with suppress(FileExistsError):
            os.symlink(target, self.path(rel))
        self._done("append_symlink", (target, rel), rel)

    def link(self, a: str, b: str) -> None:
        with suppress(FileExistsError):
            os.link(self.path(a), self.path(b))
        self._done("append_link", (a, b), b)

    def create(self, rel: str, mode: int) -> None:
        fd = os.open(self.path(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._done("append_create", (rel, mode), rel)

    def write(self, rel: str, offset: int, data: bytes) -> None:
        os.pwrite(self._fd(rel), data, offset)
        self.dirty_fds.append(rel)
        self._done("append_write", (rel, offset, data))

    def put_back(self, rel: str, want: Plan, ino: Inode, ranges: Spans) -> int:
        """Make the file at rel hold the point's bytes in these ranges,
        writing (and journaling) only those that differ: one C call reads
        back, compares and writes (Plan.put_back), and lays out the journal
        records of what it wrote, pointing into the plan's sources
        (no copy of the bytes, no Python object per range: 10 MB over 2,662
        ranges cost 20-25 ms in bytes copies and per-range journaling).
        Completing a killed rollback, every range is journaled, written or
        not: the killed run may have written some that nothing journaled,
        and the journal's latest state must equal the root. Under the crash
        tests' hook, one range per call, so that a kill can still fall
        between two writes. Returns the bytes written."""
        step = 1 if self.kill_after >= 0 else max(len(ranges), 1)
        total = 0
        for i in range(0, len(ranges), step):
            part = ranges[i : i + step]
            recs, n, differs = want.put_back(ino, self._fd(rel), part, every=self.resumed, kick=PUT_BACK_KICK)
            if any(differs) or self.resumed:  # (the killed run's writes may be in the page cache only)
                self.dirty_fds.append(rel)
            if n:
                self._done("append_write_records", (rel, recs, n))
            total += sum(itertools.compress(part.lengths(), differs))
        return total

    def truncate(self, rel: str, size: int) -> None:
        os.ftruncate(self._fd(rel), size)
        self.dirty_fds.append(rel)
        self._done("append_truncate", (rel, size))

    def setattr(self, rel: str, mode: int, mtime_us: int | None) -> None:
        p = self.path(rel)
        os.chmod(p, mode)
        if mtime_us is not None:
            os.utime(p, ns=(mtime_us * 1000, mtime_us * 1000))
        else:
            # The point never stamped it: as a restore would, give it the
            # current time (not a stamp set after the point); the journal
            # cannot say "unknown", so it records that time, and a later
            # restore of the latest point equals the root.
            os.utime(p)
            mtime_us = os.lstat(p).st_mtime_ns // 1000
        self._done("append_setattr", (rel, mode, mtime_us))

    def sync(self) -> None:
        """The root's changes on disk before the journal says they happened."""
        synced = set(self._fds)
        self._close_fds(sync=True)
        for rel in dict.fromkeys(self.dirty_fds):
            if rel in synced:
                continue
            try:
                fd = os.open(self.path(rel), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # written, then moved: its new name's directory is synced below
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in self.dirs:
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _same(a: Node | None, b: Node | None) -> bool:
    """Whether a name can stay as it is (its content may still change)."""
    if isinstance(a, Dir) and isinstance(b, Dir):
        return True
    if isinstance(a, Link) and isinstance(b, Link):
        return a.target == b.target
    return isinstance(a, Inode) and isinstance(b, Inode) and a.key == b.key


def _names(nodes: dict[str, Node]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for p in sorted(nodes):
        n = nodes[p]
        if isinstance(n, Inode):
            out.setdefault(n.key, []).append(p)
    return out


def _depth(p: str) -> tuple[int, str]:
    return p.count("/"), p


def _apply(now: After, want: Plan, ops: _Ops, result: RollbackResult) -> None:
    N, T = now.tree.nodes, want.tree.nodes
    now_names, want_names = _names(N), _names(T)
    # a file keeps a name it has at both moments, if it has one
    placed = {key: next(q for q in targets if _same(N.get(q), T[q]))
              for key, targets in want_names.items() if any(_same(N.get(q), T[q]) for q in targets)}
    kept = set(placed)
    # 1. files the point has under other names only: into staging first, so
    # that renames over each other (a swap) lose nothing
    staged: dict[int, str] = {}
    for key, targets in want_names.items():
        currents = now_names.get(key, [])
        if key not in kept and currents:
            if not staged:
                ops.mkdir(STAGE, 0o700)
            staged[key] = f"{STAGE}/{key}"
            ops.rename(currents[0], staged[key])
            result.renamed.append((currents[0], targets[0]))
    moved = {now_names[k][0] for k in staged}
    # 2. what the point does not have, deepest first; a directory takes its
    # contents with it
    gone = [p for p in N if p not in moved and not _same(N[p], T.get(p))]
    gone_dirs = [q for q in gone if isinstance(N[q], Dir)]
    for p in sorted(gone, key=_depth, reverse=True):
        if not any(p.startswith(q + "/") for q in gone_dirs):
            ops.remove(p, N[p])
            result.removed.append(p)
    # 3. directories, symlinks, staged files to their names, lost files
    # recreated, hard links
    fresh: set[int] = set()
    for p in sorted(T, key=_depth):
        node = T[p]
        if _same(N.get(p), node):
            continue
        if isinstance(node, Dir):
            ops.mkdir(p, node.mode)
        elif isinstance(node, Link):
            ops.symlink(node.target, p)
            result.created.append(p)
        elif node.key in placed:
            ops.link(placed[node.key], p)
            result.created.append(p)
        elif node.key in staged:
            ops.rename(staged.pop(node.key), p)
            placed[node.key] = p
            fresh.add(node.key)
            _rewrite(now, want, node, p, ops, result)
        else:
            _recreate(want, node, p, ops, result)
            placed[node.key] = p
            fresh.add(node.key)
    if moved:
        ops.remove(STAGE, Dir())  # empty again: every staged file has its name
    # 4. bytes of the files that kept a name; then modes and mtimes, deepest
    # first (changing a directory's entries changes its mtime)
    for key in kept:
        _rewrite(now, want, T[placed[key]], placed[key], ops, result)  # type: ignore[arg-type]
    changed = set(result.changed)
    for p in sorted(T, key=_depth, reverse=True):
        node, old = T[p], N.get(p)
        if isinstance(node, Link) or (isinstance(node, Inode) and placed.get(node.key) != p):
            continue
        if isinstance(node, Dir):
            touched = ops.path(p) in ops.dirs and node.mtime_us is not None
        else:  # written after the point (its mtime moved), here or before
            touched = p in changed or node.key in fresh or node.key in now.ranges
        same_attrs = (_same(old, node) and old.mode == node.mode  # type: ignore[union-attr]
                      and old.mtime_us == node.mtime_us)  # type: ignore[union-attr]
        if not same_attrs or touched:
            ops.setattr(p, node.mode, node.mtime_us)


def _rewrite(now: After, want: Plan, ino: Inode, rel: str, ops: _Ops, result: RollbackResult) -> None:
    """Put back the bytes of a file that exists at both moments (the same
    key: the same inode). Only what the records after the point wrote or
    cut can differ; of that, only what differs from the root is written."""
    size = want.size_of(ino)
    # ranges rewritten with the same bytes (a rollback's own writes, say)
    # are left alone: put_back compares before it writes
    spans = now.ranges.get(ino.key)
    ranges = spans.clip(size) if spans is not None else None
    written = ops.put_back(rel, want, ino, ranges) if ranges else 0
    result.bytes_written += written
    wrote = written > 0
    if now.size_of(ino) != size:
        ops.truncate(rel, size)
    elif not wrote:
        return
    result.changed.append(rel)


def _recreate(want: Plan, ino: Inode, rel: str, ops: _Ops, result: RollbackResult) -> None:
    """A file the point has and the root lost: created with all its bytes."""
    ops.create(rel, ino.mode)
    for start, length, _f, _s in want.extents(ino):
        data = want.read(ino, start, length)
        ops.write(rel, start, data)
        result.bytes_written += len(data)
    ops.truncate(rel, want.size_of(ino))
    result.created.append(rel)


"""Capture: run unmodified programs with the capture library preloaded
(protect), take a baseline of the root while they run, repair what capture
could not see (resync), and a journaled file object for vendor code.

How the pieces fit (docs/capture.md tells it for users):

* protect() holds flock(LOCK_SH) on JOURNAL/capture.lock for the program's
  lifetime (rollback refuses while it is held), starts the program with
  LD_PRELOAD=libcdpcapture.so and CDPCORE_JOURNAL / CDPCORE_ROOT in its
  environment, which every child inherits.
* Online baseline. A journal without a BASE record gets one while the
  program already runs, like a database base backup: a BASE record naming
  base/NAME is appended first (at seq S), under the same journal lock every
  captured write holds across its system call; then the root is copied into
  base/NAME.tmp. The copy is fuzzy, but every change made after S has a
  record after S, which restore replays over the copy, so from the moment
  the copy finished (a bookmark "baseline NAME complete", seq E) every
  point is complete. (Except for names moved during the copy, which it may
  have missed in both places: their live content is journaled again, under
  the lock, just before E; _rejournal_moved.) The base directory is renamed into place only after
  that bookmark is durable: a baseline that died half way leaves a BASE that
  names a missing directory (restore says so) rather than a silently short
  copy. Points in [S, E) and before the first BASE are incomplete;
  incomplete_ranges() lists them and `cdpctl points` marks them.
* resync() restores the latest point into a scratch directory and journals
  whatever differs from the live root (content, size, mode, missing and
  extra names), then a FLUSH: afterwards the journal's latest point equals
  the live tree again.
"""
from __future__ import annotations

import builtins
import fcntl
import io
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from cdpcore import checkpoint
from cdpcore.errors import CaptureError, CdpError
from cdpcore.format import Kind
from cdpcore.journal import Journal, fsync_dir

LIBRARY_NAME = "libcdpcapture.so"
ENV_JOURNAL = "CDPCORE_JOURNAL"
ENV_ROOT = "CDPCORE_ROOT"
CAPTURE_LOCK = "capture.lock"
BASE_DIR = "base"
COMPLETE_SUFFIX = " complete"
CHUNK = 1 << 20
PT_INTERP = 3
STAGE_SIZE = 16 << 20  # default; CDPCORE_STAGE_SIZE overrides
DRAIN_INTERVAL = 0.01  # seconds between background drains; CDPCORE_DRAIN_INTERVAL overrides
# bytes of durable zero tail kept ahead of the active segment's end while the
# program makes barriers (capture.md, "Durability"); CDPCORE_PREALLOC
# overrides, 0 turns it off
PREALLOC_AHEAD = 8 << 20


def library_path() -> str:
    """The capture library built next to this package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)
    if not os.path.exists(path):
        raise CaptureError(f"capture library {path} is missing; reinstall cdpcore")
    return path


# ---- static binaries ----------------------------------------------------------


def find_program(name: str, env: dict[str, str] | None = None) -> str | None:
    path = (env or os.environ).get("PATH", os.defpath)
    return shutil.which(name, path=path) if os.sep not in name else (name if os.path.exists(name) else None)


def is_static(path: str) -> bool:
    """Whether path is an ELF executable without a program interpreter
    (PT_INTERP): the dynamic loader never runs, so LD_PRELOAD cannot work.
    A script (#!) is judged by its interpreter."""
    try:
        with builtins.open(path, "rb") as f:
            head = f.read(64)
            if head[:2] == b"#!":
                line = (head + f.read(256)).split(b"\n", 1)[0][2:].strip().split()
                if line:
                    interp = os.fsdecode(line[0])
                    if os.path.basename(interp) == "env" and len(line) > 1:
                        found = find_program(os.fsdecode(line[1]))
                        return bool(found) and is_static(found)
                    return os.path.exists(interp) and is_static(interp)
                return False
            if head[:4] != b"\x7fELF" or len(head) < 64:
                return False
            is64, little = head[4] == 2, head[5] == 1
            end = "<" if little else ">"
            import struct

            if is64:
                phoff, = struct.unpack_from(end + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
            else:
                phoff, = struct.unpack_from(end + "I", head, 28)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                p_type, = struct.unpack_from(end + "I", table, i * phentsize)
                if p_type == PT_INTERP:
                    return False
            return True
    except OSError:
        return False


# ---- capture lock -----------------------------------------------------------------


def hold_capture_lock(journal_path: str) -> int:
    """Open JOURNAL/capture.lock and take LOCK_SH; returns the descriptor
    (closing it releases the lock)."""
    fd = os.open(os.path.join(journal_path, CAPTURE_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


# ---- baseline ------------------------------------------------------------------------


@dataclass
class BaselineResult:
    name: str
    base_seq: int      # the BASE record
    complete_seq: int  # from here on every point is complete
    files: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "base_seq": self.base_seq, "complete_seq": self.complete_seq,
                "files": self.files, "bytes": self.bytes}


def has_base(j: Journal) -> bool:
    return any(True for _ in j.records(kinds=(Kind.BASE,)))


def _copy_file(src: str, dst: str) -> int:
    """Copy one file that may be changing or vanish; fsync it."""
    n = 0
    try:
        fin = builtins.open(src, "rb")
    except (FileNotFoundError, NotADirectoryError):
        return 0
    with fin, builtins.open(dst, "wb") as fout:
        while True:
            buf = fin.read(CHUNK)
            if not buf:
                break
            fout.write(buf)
            n += len(buf)
        fout.flush()
        os.fsync(fout.fileno())
    try:
        shutil.copystat(src, dst)
    except FileNotFoundError:
        pass
    return n


def _copy_tree(src: str, dst: str) -> tuple[int, int]:
    """A fuzzy copy of a live tree: names that vanish meanwhile are skipped
    (their removal is journaled after the BASE record anyway)."""
    files = nbytes = 0
    os.makedirs(dst)
    for top, dirs, names in os.walk(src):
        rel = os.path.relpath(top, src)
        out_top = dst if rel == "." else os.path.join(dst, rel)
        for d in list(dirs):
            s, t = os.path.join(top, d), os.path.join(out_top, d)
            try:
                st = os.lstat(s)
            except FileNotFoundError:
                dirs.remove(d)
                continue
            if stat.S_ISLNK(st.st_mode):
                dirs.remove(d)
                os.symlink(os.readlink(s), t)
                continue
            os.mkdir(t)
            os.chmod(t, stat.S_IMODE(st.st_mode))
        for name in names:
            s, t = os.path.join(top, name), os.path.join(out_top, name)
            try:
                st = os.lstat(s)
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(s), t)
                elif stat.S_ISREG(st.st_mode):
                    nbytes += _copy_file(s, t)
                    files += 1
            except FileNotFoundError:
                continue
        fsync_dir(out_top)
    return files, nbytes


def baseline(journal: Journal | str | os.PathLike[str]) -> BaselineResult:
    """Take a base copy of the protected root, safe while captured programs
    write to it (module docstring)."""
    if not isinstance(journal, Journal):
        with Journal.open(journal) as j:
            return baseline(j)
    j = journal
    st = j._need_writer().get_state()
    name = f"{st.next_seq:016x}"
    base_dir = os.path.join(j.path, BASE_DIR)
    dest = os.path.join(base_dir, name)
    tmp = dest + ".tmp"
    os.makedirs(base_dir, exist_ok=True)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    if os.path.exists(dest):
        raise CaptureError(f"{dest} exists already")
    base_seq = j._one("append_base", f"{BASE_DIR}/{name}")
    j.sync()
    files, nbytes = _copy_tree(j.root, tmp)
    writer = j._need_writer()
    writer.lock()  # captured programs wait: the tree holds still
    try:
        _rejournal_moved(j, base_seq)
        complete_seq = j.bookmark(f"baseline {name}{COMPLETE_SUFFIX}")
    finally:
        writer.unlock()
    j.sync()
    os.rename(tmp, dest)
    fsync_dir(base_dir)
    return BaselineResult(name, base_seq, complete_seq, files, nbytes)


def _rejournal_moved(j: Journal, base_seq: int) -> None:
    """The fuzzy copy's blind spot: a file renamed (or linked) while the copy
    ran, from a name the copy had not reached to one it had already passed,
    is in neither place in the copy, and replaying the RENAME finds nothing
    to move. So, with the append lock held (nothing changes meanwhile),
    journal the live content of every name a RENAME or LINK after the BASE
    points to (the whole subtree for a directory): after this the plan at
    this point equals the live tree for those names too. Renames are rare in
    the databases this protects, so this is cheap."""
    targets: dict[str, None] = {}
    for rec in j.records(since=f"seq:{base_seq}", kinds=(Kind.RENAME, Kind.LINK)):
        if rec.target:
            targets[rec.target] = None
    b = j.batch()
    for rel in targets:
        full = os.path.join(j.root, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue  # moved on again or removed: its own records say so
        entries = [(rel, full, st)]
        if stat.S_ISDIR(st.st_mode):
            for top, dirs, names in os.walk(full):
                for n in dirs + names:
                    f = os.path.join(top, n)
                    entries.append((os.path.relpath(f, j.root).replace(os.sep, "/"), f, os.lstat(f)))
        for r, f, fst in entries:
            if stat.S_ISDIR(fst.st_mode):
                b.append_mkdir(r, stat.S_IMODE(fst.st_mode))
            elif stat.S_ISLNK(fst.st_mode):
                b.append_symlink(os.readlink(f), r)
            elif stat.S_ISREG(fst.st_mode):
                b.append_truncate(r, fst.st_size)
                with builtins.open(f, "rb") as fin:
                    off = 0
                    while chunk := fin.read(CHUNK):
                        b.append_write(r, off, chunk)
                        off += len(chunk)
                # the content was not changed now: keep the file's own mtime
                b.append_setattr(r, mode=stat.S_IMODE(fst.st_mode), mtime_us=fst.st_mtime_ns // 1000)
            if len(b) > 4096:
                b.commit()
    b.commit()


def incomplete_ranges(j: Journal) -> list[tuple[int, int]]:
    """Seq ranges [a, b) whose points are not complete: before the first
    base, and between an online BASE and the end of its copy."""
    bases: list[tuple[int, str]] = []
    done: dict[str, int] = {}
    for rec in j.records(kinds=(Kind.BASE, Kind.BOOKMARK)):
        if rec.kind == Kind.BASE:
            bases.append((rec.seq, os.path.basename(rec.name or "")))
        else:
            label = rec.name or ""
            if label.startswith("baseline ") and label.endswith(COMPLETE_SUFFIX):
                done[label[len("baseline "):-len(COMPLETE_SUFFIX)]] = rec.seq
    out: list[tuple[int, int]] = []
    for i, (seq, name) in enumerate(bases):
        end = done.get(name, seq)
        if i == 0 and seq > j.first_seq:
            out.append((j.first_seq, end))
        elif end > seq:
            out.append((seq, end))
    return out


# ---- resync ------------------------------------------------------------------------------


@dataclass
class ResyncResult:
    changed: list[str] = field(default_factory=list)   # paths whose content or mode was journaled
    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seq: int = 0                                       # the FLUSH that closes the resync (0: nothing to do)

    def to_json(self) -> dict[str, Any]:
        return {"changed": self.changed, "created": self.created, "removed": self.removed, "seq": self.seq}


def dirty_files(j: Journal, since: int = 0) -> list[str]:
    """Paths with DIRTY records after seq `since`."""
    seen: dict[str, None] = {}
    for rec in j.records(kinds=(Kind.DIRTY,)):
        if rec.seq > since:
            seen[f"{rec.path or f'file id {rec.file_id}'}: {rec.name}"] = None
    return list(seen)


def _changed_chunks(full: str, plan: Any, ino: Any) -> list[tuple[int, bytes]]:
    """Chunks (offset, bytes) of the live file that differ from the plan's
    content of inode ino (compared up to the live size; sizes apart)."""
    diffs = []
    with builtins.open(full, "rb") as f:
        off = 0
        while chunk := f.read(CHUNK):
            if chunk != plan.read(ino, off, len(chunk)):
                diffs.append((off, chunk))
            off += len(chunk)
    return diffs


def _walk(top: str) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for d, dirs, files in os.walk(top):
        for name in dirs + files:
            full = os.path.join(d, name)
            rel = os.path.relpath(full, top).replace(os.sep, "/")
            try:
                out[rel] = os.lstat(full)
            except FileNotFoundError:
                continue
    return out


def resync(journal: Journal | str | os.PathLike[str]) -> ResyncResult:
    """Journal whatever the live root holds that the journal's latest point
    does not (dirty files, changes no capture saw). Run it when nothing
    writes the root: protect does, after the program exits.

    The root is compared with the latest point's plan (plan.py: names,
    modes, symlinks, and each file's bytes read from the journal where they
    lie), not with a restored copy: a copy would need as much free space
    as the root, and a journal's file system that filled up is the
    commonest reason to resync."""
    if not isinstance(journal, Journal):
        with Journal.open(journal) as j:
            return resync(j)
    from cdpcore.plan import Dir, Inode, Link, build_plan

    j = journal
    result = ResyncResult()
    with build_plan(j, j.last_seq) as plan:
        old = plan.tree.nodes
        live = _walk(j.root)
        b = j.batch()
        # removals first, deepest first
        for rel in sorted(set(old) - set(live), key=lambda p: -p.count("/")):
            if any(rel.startswith(p + "/") for p in result.removed):
                continue
            b.append_rmdir(rel) if isinstance(old[rel], Dir) else b.append_unlink(rel)
            result.removed.append(rel)
        for rel in sorted(live, key=lambda p: (p.count("/"), p)):
            st, full = live[rel], os.path.join(j.root, rel)
            prev = old.get(rel)
            kind_now = (Dir if stat.S_ISDIR(st.st_mode) else Link if stat.S_ISLNK(st.st_mode)
                        else Inode if stat.S_ISREG(st.st_mode) else None)
            if kind_now is None:
                continue  # sockets, fifos, devices: nothing a journal holds
            if prev is not None and not isinstance(prev, kind_now):
                b.append_rmdir(rel) if isinstance(prev, Dir) else b.append_unlink(rel)
                prev = None
            try:
                if isinstance(prev, Dir) or (prev is None and kind_now is Dir):
                    if prev is None or prev.mode != stat.S_IMODE(st.st_mode):
                        b.append_mkdir(rel, stat.S_IMODE(st.st_mode))
                        (result.created if prev is None else result.changed).append(rel)
                elif kind_now is Link:
                    target = os.readlink(full)
                    if prev is None or prev.target != target:  # type: ignore[union-attr]
                        if prev is not None:
                            b.append_unlink(rel)
                        b.append_symlink(target, rel)
                        (result.created if prev is None else result.changed).append(rel)
                elif prev is None:
                    b.append_create(rel, stat.S_IMODE(st.st_mode))
                    with builtins.open(full, "rb") as f:
                        off = 0
                        while chunk := f.read(CHUNK):
                            b.append_write(rel, off, chunk)
                            off += len(chunk)
                    result.created.append(rel)
                    continue
                else:
                    assert isinstance(prev, Inode)
                    touched = False
                    if plan.size_of(prev) != st.st_size:
                        b.append_truncate(rel, st.st_size)
                        touched = True
                    for off, chunk in _changed_chunks(full, plan, prev):
                        b.append_write(rel, off, chunk)
                        touched = True
                    if prev.mode != stat.S_IMODE(st.st_mode):
                        b.append_setattr(rel, mode=stat.S_IMODE(st.st_mode))
                        touched = True
                    if touched:
                        result.changed.append(rel)
            except FileNotFoundError:
                continue
            if len(b) > 4096:
                b.commit()
        b.commit()
    if result.changed or result.created or result.removed:
        result.seq = j.append_flush()
        j.sync()
    return result


# ---- protect --------------------------------------------------------------------------------


@dataclass
class ProtectResult:
    returncode: int
    first_seq: int                       # first seq this run could have written
    last_seq: int
    dirty: list[str] = field(default_factory=list)
    baseline: BaselineResult | None = None
    resync: ResyncResult | None = None
    static_warning: str | None = None
    checkpoints: list[int] = field(default_factory=list)  # seqs of the checkpoints saved at exit
    checkpoint_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"returncode": self.returncode, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "dirty": self.dirty, "baseline": self.baseline.to_json() if self.baseline else None,
                "resync": self.resync.to_json() if self.resync else None,
                "static_warning": self.static_warning, "checkpoints": self.checkpoints,
                "checkpoint_error": self.checkpoint_error}


def capture_env(j: Journal, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a program (and its children) captured."""
    out = dict(os.environ if env is None else env)
    lib = library_path()
    pre = out.get("LD_PRELOAD", "")
    out["LD_PRELOAD"] = lib + ((" " + pre) if pre and lib not in pre.split() else "")
    out[ENV_JOURNAL] = j.path
    out[ENV_ROOT] = j.root
    return out


class Protection:
    """A program running under capture. Use as a context manager (the
    program is waited for at the end of the block) or call wait()."""

    def __init__(self, journal: str | os.PathLike[str], argv: Sequence[str], baseline: bool = True,
                 resync: bool = True, env: dict[str, str] | None = None, **popen: Any) -> None:
        if not argv:
            raise CaptureError("no program to run")
        self.journal = Journal.open(journal)
        self._lock_fd = -1
        try:
            j = self.journal
            if not os.path.isdir(j.root):
                raise CaptureError(f"protected root {j.root} is not a directory")
            prog = find_program(argv[0], env)
            if prog is None:
                raise CaptureError(f"{argv[0]}: program not found")
            self.static_warning = (
                f"{prog} is statically linked: the capture library cannot be loaded into it, "
                "so its writes are NOT captured (resync at exit journals the end state only)"
                if is_static(prog) else None)
            self._do_resync = resync
            self._lock_fd = hold_capture_lock(j.path)
            # (under the lock: no rollback runs now, and none can start)
            from cdpcore.rollback import refuse_if_interrupted

            refuse_if_interrupted(j)
            self.first_seq = j.last_seq + 1
            self._staged = False
            stage_size = int(os.environ.get("CDPCORE_STAGE_SIZE", STAGE_SIZE))
            if stage_size > 0:
                try:
                    j._need_writer().stage_create(stage_size)
                    self._staged = True
                except (CdpError, OSError):
                    pass  # no shared memory: the library appends directly
            self._stop = threading.Event()
            self._drainer: threading.Thread | None = None
            if self._staged:
                self._drainer = threading.Thread(target=self._drain_loop, daemon=True)
                self._drainer.start()
            self._baseline_result: BaselineResult | None = None
            self._baseline_error: BaseException | None = None
            want_base = baseline and not has_base(j)
            self.process = subprocess.Popen(list(argv), env=capture_env(j, env), **popen)
            self._thread: threading.Thread | None = None
            if want_base:
                self._thread = threading.Thread(target=self._baseline, daemon=True)
                self._thread.start()
        except BaseException:
            self._release()
            raise

    def _baseline(self) -> None:
        try:
            with Journal.open(self.journal.path) as j:
                self._baseline_result = baseline(j)
        except BaseException as e:  # reported by wait()
            self._baseline_error = e

    def _drain_loop(self) -> None:
        # the stage is shared memory: it survives the program, not the
        # machine; moving it into the journal often bounds what a power cut
        # can take (barriers drain it themselves)
        writer = self.journal._need_writer()
        interval = float(os.environ.get("CDPCORE_DRAIN_INTERVAL", DRAIN_INTERVAL))
        ahead = int(os.environ.get("CDPCORE_PREALLOC", PREALLOC_AHEAD))
        st = writer.get_state()
        synced = st.synced_seq if st is not None else 0
        while not self._stop.wait(interval):
            try:
                writer.drain()
                # Only a program that makes barriers gains from a durable
                # tail (its fsyncs ride on it); zeros written for one that
                # does not would cost page cache and disk bandwidth for nothing.
                st = writer.get_state()
                if ahead > 0 and st is not None and st.synced_seq != synced:
                    synced = st.synced_seq
                    writer.prealloc(ahead // 2, ahead)
            except (CdpError, OSError):
                pass  # the journal is full or failing: the library marks files dirty

    def _unstage(self) -> None:
        if getattr(self, "_drainer", None) is not None:
            self._stop.set()
            assert self._drainer is not None
            self._drainer.join()
            self._drainer = None
        if getattr(self, "_staged", False):
            self._staged = False
            try:
                self.journal._need_writer().stage_remove()
            except (CdpError, OSError):
                pass  # left for the next writer to drain

    def _release(self) -> None:
        self._unstage()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self.journal.close()

    def __enter__(self) -> "Protection":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock_fd >= 0:
            self.wait()

    def wait(self) -> ProtectResult:
        try:
            while True:
                try:
                    rc = self.process.wait()
                    break
                except KeyboardInterrupt:
                    # the program got the SIGINT too (same process group); wait for it
                    continue
            if self._thread is not None:
                self._thread.join()
            self._unstage()
            if self._baseline_error is not None:
                raise self._baseline_error
            j = self.journal
            j.refresh()
            res = ProtectResult(rc, self.first_seq, j.last_seq, baseline=self._baseline_result,
                                static_warning=self.static_warning)
            res.dirty = dirty_files(j, self.first_seq - 1)
            if self._do_resync:
                res.resync = resync(j)
                j.refresh()
                res.last_seq = j.last_seq
            # Maintenance while nothing else writes: restore plans at the
            # new sealed segments, so that a restore or rollback of what
            # this run did reads only the records since (checkpoint.py).
            # Only speed depends on it: a failure is reported, not raised.
            try:
                res.checkpoints = checkpoint.update(j).created
            except (OSError, CdpError) as e:
                res.checkpoint_error = str(e)
            return res
        finally:
            self._release()


def protect(journal: str | os.PathLike[str], argv: Sequence[str], baseline: bool = True,
            resync: bool = True, env: dict[str, str] | None = None, **popen: Any) -> Protection:
    """Run argv with every change it (and every process it starts) makes
    under the journal's root journaled. Returns a Protection: call wait()
    for the ProtectResult, or use it as a context manager."""
    return Protection(journal, argv, baseline=baseline, resync=resync, env=env, **popen)


# ---- a journaled file object ------------------------------------------------------------------


class JournaledFile(io.RawIOBase):
    """A binary file under the protected root whose every write, truncate and
    fsync is journaled, in order with captured programs (the journal lock is
    held across the write and its record)."""

    def __init__(self, journal: str | os.PathLike[str], path: str | os.PathLike[str], mode: str = "r+b"):
        super().__init__()
        self._j = Journal.open(journal)
        try:
            full = os.path.abspath(os.fspath(path)) if os.path.isabs(os.fspath(path)) else \
                os.path.join(self._j.root, os.fspath(path))
            parent = os.path.realpath(os.path.dirname(full))
            root = os.path.realpath(self._j.root)
            if parent != root and not parent.startswith(root + os.sep):
                raise ValueError(f"{full} is not under the protected root {root}")
            self.name = os.path.join(parent, os.path.basename(full))
            self.rel = os.path.relpath(self.name, root).replace(os.sep, "/")
            m = mode.replace("b", "").replace("t", "")
            flags = {"r": os.O_RDONLY, "r+": os.O_RDWR, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND, "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     "x+": os.O_RDWR | os.O_CREAT | os.O_EXCL}.get(m)
            if flags is None:
                raise ValueError(f"invalid mode {mode!r}")
            self.mode = mode
            self._append = bool(flags & os.O_APPEND)
            w = self._j._need_writer()
            w.lock()
            try:
                existed = os.path.exists(self.name)
                self._fd = os.open(self.name, flags | os.O_CLOEXEC, 0o666)
                if (flags & os.O_CREAT) and not existed:
                    self._j.append_create(self.rel, stat.S_IMODE(os.fstat(self._fd).st_mode))
                elif flags & os.O_TRUNC:
                    self._j.append_truncate(self.rel, 0)
            finally:
                w.unlock()
            self._writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        except BaseException:
            self._j.close()
            raise

    def readable(self) -> bool:
        return "r" in self.mode or "+" in self.mode

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, b: Any) -> int:
        data = os.read(self._fd, len(b))
        b[: len(data)] = data
        return len(data)

    def write(self, b: Any) -> int:
        data = bytes(b)
        w = self._j._need_writer()
        w.lock()
        try:
            off = os.lseek(self._fd, 0, os.SEEK_END if self._append else os.SEEK_CUR)
            n = os.write(self._fd, data)
            if n > 0:
                self._j.append_write(self.rel, off, data[:n])
            return n
        finally:
            w.unlock()

    def seek(self, pos: int, whence: int = 0) -> int:
        return os.lseek(self._fd, pos, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else size
        w = self._j._need_writer()
        w.lock()
        try:
            os.ftruncate(self._fd, size)
            self._j.append_truncate(self.rel, size)
        finally:
            w.unlock()
        return size

    def fsync(self) -> None:
        """os.fsync of the file, then a FLUSH record, durable before return."""
        os.fsync(self._fd)
        self._j.append_flush()
        self._j.sync()

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                self._j.close()
        super().close()


def open(journal: str | os.PathLike[str], path: str | os.PathLike[str], mode: str = "r+b",
         encoding: str | None = None) -> IO[Any]:
    """Open a file under the journal's root; its writes are journaled. Binary
    modes return the unbuffered JournaledFile (each write is one record);
    text modes wrap it in a write-through TextIOWrapper."""
    raw = JournaledFile(journal, path, mode)
    if "b" in mode:
        return raw
    return io.TextIOWrapper(io.BufferedRandom(raw) if raw.readable() else io.BufferedWriter(raw),
                            encoding=encoding or "utf-8", write_through=True)


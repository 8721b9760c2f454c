"""restore(): the tree at a point equals a simple model of it.

The model keeps inodes (so hard links and writes to renamed files behave as
on a real file system), directories and symlinks, each with mode and mtime;
every operation is valid POSIX at the moment it is generated. A file's mtime
is that of its last CREATE/WRITE/TRUNCATE or the mtime a SETATTR set; a
directory's is checked only where the journal set one (SETATTR or base).
"""
from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import scratch
from hypothesis import given, note
from hypothesis import strategies as st

from cdpcore import Journal, Kind, PointError, RestoreError, restore
from cdpcore._native import check, ffi, lib
from cdpcore.format import REC_HDR, REC_MARKER

UINT64_MAX = 2**64 - 1


@dataclass
class Ino:
    data: bytearray
    mode: int
    mtime: int | None


@dataclass
class Tree:
    files: dict[str, Ino] = field(default_factory=dict)  # path -> inode (shared by links)
    dirs: dict[str, list] = field(default_factory=dict)  # path -> [mode, mtime or None]
    links: dict[str, str] = field(default_factory=dict)  # path -> target

    def snapshot(self) -> Tree:
        return copy.deepcopy(self)  # deepcopy keeps inode sharing between names

    def kind(self, p: str) -> str | None:
        return "f" if p in self.files else "d" if p in self.dirs else "l" if p in self.links else None

    def all(self) -> list[str]:
        return sorted([*self.files, *self.dirs, *self.links])

    def parents(self, p: str) -> None:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dirs.setdefault("/".join(parts[:i]), [0o755, None])

    def parent_ok(self, p: str) -> bool:
        parts = p.split("/")[:-1]
        return all(self.kind("/".join(parts[:i])) in (None, "d") for i in range(1, len(parts) + 1))

    def children(self, d: str) -> list[str]:
        return [p for p in self.all() if p.startswith(d + "/")]

    def remove(self, p: str) -> None:
        self.files.pop(p, None)
        self.dirs.pop(p, None)
        self.links.pop(p, None)


def read_tree(dest: Path) -> dict[str, tuple]:
    """What restore produced: path -> description, hard links by group."""
    out: dict[str, tuple] = {}
    inos: dict[int, str] = {}
    for top, dnames, fnames in os.walk(dest):
        for name in dnames + fnames:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, dest).replace(os.sep, "/")
            st_ = os.lstat(full)
            if os.path.islink(full):
                out[rel] = ("l", os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = ("d", st_.st_mode & 0o7777, st_.st_mtime_ns // 1000)
            else:
                first = inos.setdefault(st_.st_ino, rel)
                out[rel] = ("f", Path(full).read_bytes(), st_.st_mode & 0o7777,
                            st_.st_mtime_ns // 1000, first)
    return out


def expect_tree(t: Tree) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    first: dict[int, str] = {}
    for p in t.all():
        if p in t.links:
            out[p] = ("l", t.links[p])
        elif p in t.dirs:
            out[p] = ("d", t.dirs[p][0], t.dirs[p][1])
        else:
            ino = t.files[p]
            out[p] = ("f", bytes(ino.data), ino.mode, ino.mtime, first.setdefault(id(ino), p))
    return out


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), "different names"
    for p, w in want.items():
        g = got[p]
        assert g[0] == w[0], p
        if w[0] == "l":
            assert g == w, p
        elif w[0] == "d":
            assert g[1] == w[1], f"{p}: mode {g[1]:o} != {w[1]:o}"
            if w[2] is not None:
                assert g[2] == w[2], f"{p}: mtime"
        else:
            assert g[1] == w[1], f"{p}: content"
            assert g[2] == w[2], f"{p}: mode {g[2]:o} != {w[2]:o}"
            if w[3] is not None:
                assert g[3] == w[3], f"{p}: mtime {g[3]} != {w[3]}"

    def groups(tree: dict) -> set[frozenset]:
        by: dict[str, set] = {}
        for p, v in tree.items():
            if v[0] == "f":
                by.setdefault(v[4], set()).add(p)
        return {frozenset(g) for g in by.values()}

    # hard links: names share an inode exactly where the model's do
    assert groups(got) == groups(want)


class Runner:
    """Applies operations to the journal and to the model side by side."""

    def __init__(self, j: Journal, tree: Tree, t0: int):
        self.j, self.t, self.ts = j, tree, t0
        self.points: list[tuple[int, int, Tree]] = []  # (seq after op, ts of op, model)

    def tick(self, rnd: random.Random) -> int:
        r = rnd.random()
        if r < 0.15:
            pass  # same timestamp as the previous operation
        elif r < 0.25:
            self.ts -= rnd.randint(1, 50)  # the clock steps back
        else:
            self.ts += rnd.randint(1, 1000)
        return self.ts

    def op(self, rnd: random.Random) -> str:
        j, t = self.j, self.t
        names = ["a", "b", "c", "d", "d/a", "d/b", "d/e", "d/e/a", "f", "f/a", "g/h/i"]
        free = [p for p in names if t.kind(p) is None and t.parent_ok(p)]
        files = sorted(t.files)
        dirs = sorted(t.dirs)
        ts = self.tick(rnd)
        choices = ["write", "write", "flush"]
        if free:
            choices += ["create", "mkdir", "symlink", "write"]
        if files:
            choices += ["write", "write", "truncate", "unlink", "rename", "setattr"]
            if free:
                choices += ["link"]
        if t.links:
            choices += ["unlink", "rename"]
        if dirs:
            choices += ["setattr", "rmdir", "rename", "bookmark"]
        what = rnd.choice(choices)
        if what == "create":
            p, mode = rnd.choice(free), rnd.choice([0o644, 0o600, 0o755])
            j.append_create(p, mode=mode, ts=ts)
            t.parents(p)
            t.files[p] = Ino(bytearray(), mode, ts)
        elif what == "write":
            p = rnd.choice(files + free[:1]) if files or free else None
            if p is None:
                return self.op(rnd)
            off = rnd.choice([0, 3, 100, 5000])
            data = random.Random(ts).randbytes(rnd.choice([0, 1, 50, 3000]))
            j.append_write(p, off, data, ts=ts)
            if p not in t.files:
                t.parents(p)
                t.files[p] = Ino(bytearray(), 0o644, None)
            ino = t.files[p]
            if data:  # pwrite of nothing does not extend the file
                if len(ino.data) < off:
                    ino.data.extend(bytes(off - len(ino.data)))
                ino.data[off : off + len(data)] = data
            ino.mtime = ts
        elif what == "truncate":
            p, n = rnd.choice(files), rnd.choice([0, 2, 7000])
            j.append_truncate(p, n, ts=ts)
            ino = t.files[p]
            del ino.data[n:]
            ino.data.extend(bytes(n - len(ino.data)))
            ino.mtime = ts
        elif what == "mkdir":
            p, mode = rnd.choice(free), rnd.choice([0o755, 0o700, 0o750])
            j.append_mkdir(p, mode=mode, ts=ts)
            t.parents(p)
            t.dirs[p] = [mode, None]
        elif what == "rmdir":
            empty = [d for d in dirs if not t.children(d)]
            if not empty:
                return self.op(rnd)
            p = rnd.choice(empty)
            j.append_rmdir(p, ts=ts)
            t.remove(p)
        elif what == "unlink":
            p = rnd.choice(files + sorted(t.links))
            j.append_unlink(p, ts=ts)
            t.remove(p)
        elif what == "symlink":
            p, target = rnd.choice(free), rnd.choice(["a", "../x/y", "/abs"])
            j.append_symlink(target, p, ts=ts)
            t.parents(p)
            t.links[p] = target
        elif what == "link":
            src, p = rnd.choice(files), rnd.choice(free)
            j.append_link(src, p, ts=ts)
            t.parents(p)
            t.files[p] = t.files[src]
        elif what == "setattr":
            p = rnd.choice(files + dirs)
            mode = rnd.choice([None, 0o600, 0o711])
            mtime = rnd.choice([None, ts - 10**9, 86400 * 10**6])
            j.append_setattr(p, mode=mode, mtime_us=mtime, ts=ts)
            node = t.files.get(p)
            if node is not None:
                if mode is not None:
                    node.mode = mode
                if mtime is not None:
                    node.mtime = mtime
            else:
                if mode is not None:
                    t.dirs[p][0] = mode
                if mtime is not None:
                    t.dirs[p][1] = mtime
        elif what == "rename":
            src = rnd.choice(files + dirs + sorted(t.links))
            k = t.kind(src)
            targets = [p for p in free if not p.startswith(src + "/")]
            if k == "f":
                targets += [p for p in files if p != src]  # replaces a file
            elif k == "d":
                targets += [d for d in dirs if not t.children(d) and d != src
                            and not d.startswith(src + "/") and not src.startswith(d + "/")]
            if not targets:
                return self.op(rnd)
            dst = rnd.choice(targets)
            j.append_rename(src, dst, ts=ts)
            moving = [src] + t.children(src)
            t.remove(dst)
            t.parents(dst)
            for p in moving:
                q = dst + p[len(src):]
                if p in t.files:
                    t.files[q] = t.files.pop(p)
                elif p in t.dirs:
                    t.dirs[q] = t.dirs.pop(p)
                else:
                    t.links[q] = t.links.pop(p)
        elif what == "flush":
            j.append_flush(ts=ts)
        elif what == "bookmark":
            j.bookmark(f"bm{len(self.points)}", ts=ts)
        self.points.append((j.last_seq, ts, t.snapshot()))
        return what


def prefix_state(points, base_tree: Tree, t: int) -> Tree | None:
    """Model state at time t: after the longest prefix of ops with ts <= t."""
    state = None
    for _seq, ts, tree in points:
        if ts > t:
            break
        state = tree
    return state


def check_restore(j: Journal | str, dest: Path, at, want: Tree) -> None:
    res = restore(j, dest, at=at)
    if isinstance(j, str):
        with Journal.open(j, readonly=True) as jr:
            assert res.seq == jr.resolve(at)
    else:
        assert res.seq == j.resolve(at)
    assert_same(read_tree(dest), expect_tree(want))
    assert not (dest / ".cdpcore-restore").exists()


def make_root(root: Path) -> Tree:
    """A small non-empty protected root, and its model."""
    tree = Tree()
    (root / "d").mkdir()
    (root / "a").write_bytes(b"base a")
    (root / "d" / "a").write_bytes(b"base d/a" * 100)
    os.chmod(root / "d" / "a", 0o640)
    os.symlink("d/a", root / "c")
    os.utime(root / "a", ns=(10**18, 1_000_000_000_123_456_000))
    os.utime(root / "d" / "a", ns=(10**18, 1_100_000_000_000_000_000))
    os.utime(root / "d", ns=(10**18, 1_200_000_000_000_000_000))
    tree.files["a"] = Ino(bytearray(b"base a"), 0o644, 1_000_000_000_123_456)
    tree.files["d/a"] = Ino(bytearray(b"base d/a" * 100), 0o640, 1_100_000_000_000_000)
    tree.dirs["d"] = [0o755, 1_200_000_000_000_000]
    tree.links["c"] = "d/a"
    return tree


@given(seed=st.integers(0, 2**32), n_ops=st.integers(1, 40), with_base=st.booleans(),
       seg_size=st.sampled_from([4096, 65536]))
def test_restore_matches_model(seed, n_ops, with_base, seg_size):
    rnd = random.Random(seed)
    with scratch() as tmp:
        tmp = Path(tmp)
        root = tmp / "root"
        root.mkdir()
        tree = make_root(root) if with_base else Tree()
        t0 = time.time_ns() // 1000 + 10**9  # after the BASE record's "now"
        with Journal.create(tmp / "j", root, segment_size=seg_size) as j:
            run = Runner(j, tree, t0)
            start = j.last_seq
            base_tree = tree.snapshot()
            for _ in range(n_ops):
                run.op(rnd)
            note(f"{len(run.points)} ops, {j.last_seq} records")
            # seq points at operation boundaries (and the start)
            picks = rnd.sample(run.points, min(3, len(run.points))) + [run.points[-1]]
            for k, (seq, _ts, want) in enumerate(picks):
                check_restore(j, tmp / f"s{k}", f"seq:{seq}", want)
            if with_base:
                check_restore(j, tmp / "base", f"seq:{start}", base_tree)
            # time points: ties and steps back included
            for k in range(3):
                _seq, ts, _ = rnd.choice(run.points)
                t = ts + rnd.choice([-1, 0, 1])
                want = prefix_state(run.points, base_tree, t)
                if want is None:
                    if with_base:
                        want = base_tree  # only the BASE record is at or before t
                    else:
                        with pytest.raises(PointError):
                            j.resolve(t)
                        continue
                check_restore(j, tmp / f"t{k}", t, want)
        # latest, by path, from a closed journal
        check_restore(str(tmp / "j"), tmp / "latest", "latest", run.points[-1][2])


def test_restore_with_base(journal_dirs):
    jpath, root = journal_dirs
    tree = make_root(root)
    with Journal.create(jpath, root) as j:
        assert [r.kind for r in j.records()] == [Kind.BASE]
        ts = time.time_ns() // 1000 + 10**6
        j.append_write("d/a", 0, b"CHANGED", ts=ts)
        (root / "a").write_bytes(b"the live tree is not what restore reads")
        check_restore(j, jpath.parent / "r1", "seq:1", tree)
        tree.files["d/a"].data[0:7] = b"CHANGED"
        tree.files["d/a"].mtime = ts  # modified after the base: not the base's mtime
        check_restore(j, jpath.parent / "r2", "latest", tree)
        # a second base replaces the first entirely
        (root / "new").write_bytes(b"n")
        j.take_base()
        got = read_tree(_fresh(jpath.parent / "r3", j, "latest"))
        assert sorted(got) == ["a", "c", "d", "d/a", "new"]
        assert got["a"][1] == b"the live tree is not what restore reads"


def _fresh(dest: Path, j: Journal, at) -> Path:
    restore(j, dest, at=at)
    return dest


def test_restore_destination_rules(journal_dirs):
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_write("x", 0, b"1")
        busy = jpath.parent / "busy"
        busy.mkdir()
        (busy / "keep").write_text("mine")
        with pytest.raises(RestoreError):
            restore(j, busy)
        assert os.listdir(busy) == ["keep"]
        (jpath.parent / "file").write_text("f")
        with pytest.raises(RestoreError):
            restore(j, jpath.parent / "file")
        empty = jpath.parent / "empty"
        empty.mkdir()
        assert restore(j, empty).files == 1
        assert (empty / "x").read_bytes() == b"1"
        absent = jpath.parent / "deep" / "absent"
        assert restore(j, absent).seq == 2 and (absent / "x").read_bytes() == b"1"
        with pytest.raises(PointError):
            restore(j, jpath.parent / "never", at="seq:99")
        assert not (jpath.parent / "never").exists()


def test_writes_after_rename_land_in_the_renamed_file(journal_dirs):
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_create("a")
        j.append_write("a", 0, b"first ")
        j.append_rename("a", "b")
        j.append_write("b", 6, b"second")
        j.append_mkdir("dir")
        j.append_write("dir/f", 0, b"in dir")
        j.append_rename("dir", "moved")
        j.append_write("moved/f", 6, b", still")
        restore(j, jpath.parent / "r")
    r = jpath.parent / "r"
    assert sorted(os.listdir(r)) == ["b", "moved"]
    assert (r / "b").read_bytes() == b"first second"
    assert (r / "moved" / "f").read_bytes() == b"in dir, still"


def _write_by_id(j: Journal, fid: int, offset: int, data: bytes, ts: int) -> int:
    """Append a WRITE that names a file id, as the capture library does for a
    write(2) through a descriptor whose path may since have changed."""
    buf = bytearray(REC_HDR.pack(0, len(data), 0, ts, fid, offset, Kind.WRITE, 0, REC_MARKER, 0))
    buf += data + bytes(-len(data) & 7)
    res = ffi.new("struct cdp_append_result *")
    check(lib.cdp_append_encoded(j._writer.handle, ffi.from_buffer(buf), len(buf), UINT64_MAX, res))
    return int(res.last_seq)


def test_writes_through_an_unlinked_file_do_not_appear(journal_dirs):
    jpath, root = journal_dirs
    ts = time.time_ns() // 1000
    with Journal.create(jpath, root) as j:
        j.append_create("a", ts=ts)
        fid = j.record(j.last_seq).file_id
        j.append_write("a", 0, b"visible", ts=ts + 1)
        j.append_create("keep", ts=ts + 2)
        j.append_write("keep", 0, b"untouched", ts=ts + 3)
        j.append_unlink("a", ts=ts + 4)
        _write_by_id(j, fid, 0, b"ghost write", ts + 5)
        j.append_create("a", ts=ts + 6)  # a new file at the old name
        j.append_write("a", 0, b"new a", ts=ts + 7)
        seq = _write_by_id(j, fid, 3, b"ghost again", ts + 8)
        assert j.record(seq).path is None  # the id names no path any more
        for at, want_a in (("latest", b"new a"), (f"seq:{seq - 3}", None)):
            dest = jpath.parent / f"r{want_a}"
            restore(j, dest, at=at)
            got = {p: (dest / p).read_bytes() for p in os.listdir(dest)}
            assert got.pop("keep") == b"untouched"
            assert got == ({} if want_a is None else {"a": want_a})


def test_hard_links_share_one_inode(journal_dirs):
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_create("a", mode=0o600)
        j.append_write("a", 0, b"one")
        j.append_link("a", "b")
        j.append_write("b", 3, b" two")
        j.append_rename("c-missing", "d")  # renaming a name that is not there changes nothing
        j.append_unlink("a")
        j.append_write("b", 0, b"ONE")
        restore(j, jpath.parent / "r")
        restore(j, jpath.parent / "r2", at=f"seq:{j.last_seq - 2}")
    r, r2 = jpath.parent / "r", jpath.parent / "r2"
    assert os.listdir(r) == ["b"] and (r / "b").read_bytes() == b"ONE two"
    assert sorted(os.listdir(r2)) == ["a", "b"]
    assert os.stat(r2 / "a").st_ino == os.stat(r2 / "b").st_ino
    assert os.stat(r2 / "a").st_nlink == 2
    assert os.stat(r2 / "a").st_mode & 0o7777 == 0o600


def test_dirty_records_are_reported(journal_dirs):
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        j.append_write("db", 0, b"x")
        j.append_dirty("db", 0, 0, "shared writable mmap")
        res = restore(j, jpath.parent / "r")
    assert len(res.dirty) == 1 and "shared writable mmap" in res.dirty[0] and "db" in res.dirty[0]

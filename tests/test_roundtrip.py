"""Round trip: whatever is appended is read back exactly, in order, across
segment rotation, batches, close and reopen (writable and read-only); and the
point-in-time contract (resolve) agrees with a brute-force model.

The model is deliberately simple: a list of the records each operation must
produce (kind, ts, offset, payload, path). FILEMAP records that the writer adds
to bind a file id to a path are checked for their own invariants and then set
aside, since when they appear is the writer's business.
"""
from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import scratch
from hypothesis import given, note
from hypothesis import strategies as st

from cdpcore import Journal, Kind, PointError
from cdpcore.point import format_us, us_to_datetime

INT64_MIN = -(2**63)
NO_MODE = 2**64 - 1
T0 = 1_600_000_000_000_000  # 2020-09-13, well before "now": explicit times step back

PATHS = ["a", "b", "d/x", "d/y", "d", "e/f/g", "e"]
NAMES = ["m1", "m2", "\u00fc-\u03b2"]
SIZES = [0, 1, 7, 8, 9, 100, 3000, 5000, 70000]

paths = st.sampled_from(PATHS)


def wall_us() -> int:
    return time.time_ns() // 1000


# ---- operations and what each must leave in the journal ---------------------


@st.composite
def operations(draw):
    kind = draw(st.sampled_from(
        ["write", "write", "write", "truncate", "flush", "create", "rename", "unlink", "mkdir",
         "rmdir", "setattr", "symlink", "link", "bookmark", "dirty"]))
    if kind == "write":
        return ("append_write", draw(paths), draw(st.sampled_from([0, 1, 4095, 2**40])),
                draw(st.sampled_from(SIZES)), draw(st.integers(0, 2**32)))
    if kind == "truncate":
        return ("append_truncate", draw(paths), draw(st.sampled_from([0, 5, 2**33])))
    if kind == "flush":
        return ("append_flush", draw(st.none() | paths))
    if kind == "create":
        return ("append_create", draw(paths), draw(st.sampled_from([0o644, 0o600, 0o100755])))
    if kind == "rename":
        return ("append_rename", draw(paths), draw(paths))
    if kind == "unlink":
        return ("append_unlink", draw(paths))
    if kind == "mkdir":
        return ("append_mkdir", draw(paths), draw(st.sampled_from([0o755, 0o700])))
    if kind == "rmdir":
        return ("append_rmdir", draw(paths))
    if kind == "setattr":
        return ("append_setattr", draw(paths), draw(st.none() | st.sampled_from([0o600, 0o4755])),
                draw(st.none() | st.sampled_from([0, -5, T0, 2**62])))
    if kind == "symlink":
        return ("append_symlink", draw(st.sampled_from(["../a", "/abs/t", "x y"])), draw(paths))
    if kind == "link":
        return ("append_link", draw(paths), draw(paths))
    if kind == "bookmark":
        return ("bookmark", draw(st.sampled_from(NAMES)))
    return ("append_dirty", draw(paths), draw(st.sampled_from([0, 4096])),
            draw(st.sampled_from([0, 10])), draw(st.sampled_from(["", "mmap", "\u00e9"])))


def payload_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def call_args(op):
    """Arguments for the Journal/Batch method (data materialised)."""
    if op[0] == "append_write":
        return (op[1], op[2], payload_of(op[3], op[4]))
    if op[0] == "append_setattr":
        return (op[1],), {"mode": op[2], "mtime_us": op[3]}
    if op[0] == "append_dirty":
        return (op[1],), {"offset": op[2], "length": op[3], "reason": op[4]}
    return op[1:]


def expected(op) -> tuple[Kind, int, bytes, str | None]:
    """(kind, offset, payload, path) that an operation must produce, written
    out independently of cdpcore's encoder."""
    m, *a = op
    enc = str.encode
    if m == "append_write":
        return Kind.WRITE, a[1], payload_of(a[2], a[3]), a[0]
    if m == "append_truncate":
        return Kind.TRUNCATE, a[1], b"", a[0]
    if m == "append_flush":
        return Kind.FLUSH, 0, b"", a[0]
    if m == "append_create":
        return Kind.CREATE, a[1] & 0o7777, enc(a[0]), a[0]
    if m == "append_rename":
        return Kind.RENAME, 0, enc(a[0]) + b"\0" + enc(a[1]), a[0]
    if m == "append_unlink":
        return Kind.UNLINK, 0, enc(a[0]), a[0]
    if m == "append_mkdir":
        return Kind.MKDIR, a[1] & 0o7777, enc(a[0]), a[0]
    if m == "append_rmdir":
        return Kind.RMDIR, 0, enc(a[0]), a[0]
    if m == "append_setattr":
        mode = NO_MODE if a[1] is None else a[1] & 0o7777
        mt = INT64_MIN if a[2] is None else a[2]
        return Kind.SETATTR, mode, struct.pack("<q", mt) + enc(a[0]), a[0]
    if m == "append_symlink":
        return Kind.SYMLINK, 0, enc(a[0]) + b"\0" + enc(a[1]), a[1]
    if m == "append_link":
        return Kind.LINK, 0, enc(a[0]) + b"\0" + enc(a[1]), a[0]
    if m == "bookmark":
        return Kind.BOOKMARK, 0, a[0].encode("utf-8"), None
    if m == "append_dirty":
        return Kind.DIRTY, a[1], struct.pack("<Q", a[2]) + a[3].encode("utf-8"), a[0]
    raise AssertionError(m)


ts_modes = st.sampled_from(["now", "same", "fwd", "back"]) | st.none()


@st.composite
def groups(draw):
    """A group of operations: one single append, or one batch."""
    ops = draw(st.lists(st.tuples(operations(), ts_modes), min_size=1, max_size=5))
    return draw(st.booleans()), ops


@dataclass
class Exp:
    kind: Kind
    offset: int
    data: bytes
    path: str | None
    ts: int | None  # explicit ts, or None for "the writer's clock"
    lo: int = 0  # wall clock bounds for ts=None
    hi: int = 0
    returned: int | None = None  # seq returned by a single append
    batch: int = -1


class Runner:
    def __init__(self) -> None:
        self.exp: list[Exp] = []
        self.clock = T0
        self.nbatch = 0

    def ts_for(self, mode: str | None) -> int | None:
        if mode is None or mode == "now":
            return None
        if mode == "fwd":
            self.clock += random.Random(self.clock).randint(1, 3000)
        elif mode == "back":
            self.clock -= random.Random(self.clock).randint(1, 3000)
        return self.clock

    def run(self, j: Journal, groups) -> None:
        for is_batch, ops in groups:
            self.nbatch += 1
            if is_batch or len(ops) > 1:
                lo = wall_us()
                mine = []
                with j.batch() as b:
                    for op, mode in ops:
                        mine.append(self._call(b, op, mode))
                hi = wall_us()
                for e in mine:
                    e.lo, e.hi, e.batch = lo, hi, self.nbatch
                assert (b.first_seq, b.last_seq)[1] >= b.first_seq
                self.exp.extend(mine)
                # the batch's records are the last ones: check the returned range
                n_own = len(mine)
                got = list(j.records(since=f"seq:{b.first_seq - 1}", until=f"seq:{b.last_seq}"))
                assert [r.kind for r in got if r.kind != Kind.FILEMAP] == [e.kind for e in mine][:n_own]
            else:
                op, mode = ops[0]
                lo = wall_us()
                e = self._call(j, op, mode)
                e.hi = wall_us()
                e.lo = lo
                e.returned = self._last_return
                self.exp.append(e)

    def _call(self, target, op, mode) -> Exp:
        ts = self.ts_for(mode)
        args = call_args(op)
        kw = {}
        if len(args) == 2 and isinstance(args[1], dict):
            args, kw = args
        self._last_return = getattr(target, op[0])(*args, **kw, ts=ts)
        kind, offset, data, path = expected(op)
        return Exp(kind, offset, data, path, ts)


def check_records(recs, exp: list[Exp]) -> None:
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1)), "sequence numbers not contiguous"
    own = [r for r in recs if r.kind != Kind.FILEMAP]
    # FILEMAP: binds the file id of the very next record to its path, same ts
    for i, r in enumerate(recs):
        if r.kind == Kind.FILEMAP:
            nxt = recs[i + 1]
            assert nxt.file_id == r.file_id and nxt.path == r.path and nxt.ts == r.ts
            assert r.data == r.path.encode()
            assert nxt.kind in (Kind.WRITE, Kind.TRUNCATE, Kind.FLUSH, Kind.DIRTY)
    assert len(own) == len(exp)
    batch_now: dict[int, int] = {}
    for r, e in zip(own, exp):
        got = (r.kind, r.offset, r.data, r.path)
        assert got == (e.kind, e.offset, e.data, e.path), f"seq {r.seq}"
        if e.ts is not None:
            assert r.ts == e.ts, f"seq {r.seq}: explicit ts lost"
        else:
            assert e.lo - 1000 <= r.ts <= e.hi + 1000, f"seq {r.seq}: writer clock ts {r.ts} not in [{e.lo}, {e.hi}]"
            if e.batch >= 0:
                # one clock reading per batch, taken under the append lock
                assert batch_now.setdefault(e.batch, r.ts) == r.ts
        if e.returned is not None:
            assert e.returned == r.seq, "single append returned the wrong seq"
        if r.kind in (Kind.WRITE, Kind.TRUNCATE, Kind.CREATE, Kind.DIRTY) or (
                r.kind == Kind.FLUSH and r.path is not None):
            assert r.file_id > 0
        if r.kind in (Kind.BOOKMARK, Kind.RENAME, Kind.UNLINK, Kind.MKDIR, Kind.RMDIR,
                      Kind.LINK, Kind.SYMLINK, Kind.SETATTR) or (r.kind == Kind.FLUSH and r.path is None):
            assert r.file_id == 0


def brute_resolve(recs, t: int) -> int | None:
    """Longest prefix (in seq order) of records with ts <= t; None if empty."""
    n = 0
    for r in recs:
        if r.ts > t:
            break
        n += 1
    return recs[n - 1].seq if n else None


def under(p: str | None, top: str) -> bool:
    return p is not None and (p == top or p.startswith(top + "/"))


def check_points(j: Journal, recs, rnd: random.Random) -> None:
    last = recs[-1].seq if recs else 0
    assert j.resolve("latest") == last == j.last_seq
    assert j.resolve(None) == last
    for n in range(last + 1):
        assert j.resolve(f"seq:{n}") == n
    with pytest.raises(PointError):
        j.resolve(f"seq:{last + 1}")
    if not recs:
        return
    tss = sorted({r.ts for r in recs})
    cands = {tss[0] - 1, tss[-1] + 1, 0, 2**62}
    for t in tss:
        cands.update((t - 1, t, t + 1))
    cands.update(rnd.randint(tss[0] - 10, tss[-1] + 10) for _ in range(20))
    for t in sorted(cands):
        want = brute_resolve(recs, t)
        if want is None:
            with pytest.raises(PointError):
                j.resolve(t)
        else:
            assert j.resolve(t) == want, f"resolve({t}) ({format_us(t)})"
    # the same times in the other spellings
    for t in rnd.sample(sorted(cands), min(5, len(cands))):
        want = brute_resolve(recs, t)
        if want is None or not -2**55 < t < 2**55:
            continue
        assert j.resolve(format_us(t)) == want
        assert j.resolve(us_to_datetime(t)) == want
        if t >= 0:
            assert j.resolve(str(t)) == want
    # bookmarks: the newest of that name
    marks: dict[str, int] = {}
    for r in recs:
        if r.kind == Kind.BOOKMARK:
            marks[r.data.decode()] = r.seq
    for name, seq in marks.items():
        assert j.resolve(f"bookmark:{name}") == seq
    for name in set(NAMES) - set(marks):
        with pytest.raises(PointError):
            j.resolve(f"bookmark:{name}")
    assert [(p.seq, p.name) for p in j.bookmarks()] == [
        (r.seq, r.data.decode()) for r in recs if r.kind == Kind.BOOKMARK]
    # records(since, until) == the model's slice
    spots = [f"seq:{rnd.randint(0, last)}" for _ in range(4)] + [rnd.choice(tss) for _ in range(3)]
    spots += [f"bookmark:{n}" for n in marks]
    spots = [s for s in spots if not isinstance(s, int) or brute_resolve(recs, s) is not None]
    for since in spots + [None]:
        for until in rnd.sample(spots, min(3, len(spots))) + [None]:
            lo = j.resolve(since) if since is not None else 0
            hi = j.resolve(until) if until is not None else last
            want = [r for r in recs if lo < r.seq <= hi]
            assert list(j.records(since=since, until=until)) == want, (since, until)
    for top in ["a", "d", "e/f", "e/f/g", "zz"]:
        want = [r for r in recs if under(r.path, top)
                or (r.kind in (Kind.RENAME, Kind.LINK) and under(r.target, top))]
        assert list(j.records(path=top)) == want, top
    for kinds in ([Kind.WRITE], [Kind.FLUSH, Kind.BOOKMARK], [Kind.FILEMAP, Kind.CREATE]):
        assert list(j.records(kinds=kinds)) == [r for r in recs if r.kind in kinds]
    for r in rnd.sample(recs, min(5, len(recs))):
        assert j.record(r.seq) == r


@given(
    seg_size=st.sampled_from([4096, 5000, 8192, 65536]),
    part1=st.lists(groups(), max_size=14),
    part2=st.lists(groups(), max_size=8),
    seed=st.integers(0, 2**32),
)
def test_roundtrip(seg_size, part1, part2, seed):
    rnd = random.Random(seed)
    with scratch() as tmp:
        root = Path(tmp, "root")
        root.mkdir()
        jpath = Path(tmp, "j")
        runner = Runner()
        with Journal.create(jpath, root, segment_size=seg_size) as j, \
                Journal.open(jpath, readonly=True) as reader:
            runner.run(j, part1)
            recs = list(j.records())
            check_records(recs, runner.exp)
            # a reader opened before the appends sees them too
            assert list(reader.records()) == recs
        with Journal.open(jpath) as j:
            assert list(j.records()) == recs
            assert not j.recovery
            runner.run(j, part2)
            recs = list(j.records())
            check_records(recs, runner.exp)
            assert j.verify().ok
        note(f"{len(recs)} records in {len(list(Path(jpath, 'segments').glob('*.seg')))} segments")
        for readonly in (True, False):
            with Journal.open(jpath, readonly=readonly) as j:
                assert list(j.records()) == recs
                assert not j.recovery
                check_points(j, recs, rnd)


def test_rotation_splits_into_segments(journal_dirs):
    """A small segment size really rotates, a record larger than a segment
    gets one of its own, and records stay readable across the boundaries."""
    jpath, root = journal_dirs
    with Journal.create(jpath, root, segment_size=4096) as j:
        datas = [payload_of(n, n) for n in (10, 4000, 100, 9000, 0, 5000, 1)]
        seqs = [j.append_write("f", i, d) for i, d in enumerate(datas)]
        segs = sorted((jpath / "segments").glob("*.seg"))
        assert len(segs) >= 4
        for s in segs[:-1]:
            # sealed segments: not more than one record past the limit
            assert s.stat().st_size <= 4096 or s.stat().st_size <= 64 + 48 + 9000 + 8
        got = [r for r in j.records() if r.kind == Kind.WRITE]
        assert [r.data for r in got] == datas and [r.seq for r in got] == seqs
    with Journal.open(jpath) as j:
        # sealed segments got their index files on the writable open
        assert len(list((jpath / "segments").glob("*.idx"))) == len(segs) - 1
        assert [r.data for r in j.records() if r.kind == Kind.WRITE] == datas


def test_batch_is_atomic_and_consecutive(journal_dirs):
    jpath, root = journal_dirs
    with Journal.create(jpath, root, segment_size=4096) as j:
        j.append_write("x", 0, b"1")
        with j.batch() as b:
            for i in range(50):
                b.append_write(f"f{i % 3}", i, b"y" * 200, ts=T0 + i)
        first, last = b.first_seq, b.last_seq
        assert last - first + 1 == 50 + 3  # three FILEMAPs
        # an exception inside the block writes nothing
        with pytest.raises(RuntimeError), j.batch() as b2:
            b2.append_write("x", 0, b"never")
            raise RuntimeError
        assert j.last_seq == last
        assert [r.ts for r in j.records(since=f"seq:{first}") if r.kind == Kind.WRITE] == [
            T0 + i for i in range(50)]


def test_invalid_arguments_write_nothing(journal_dirs):
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        for bad in (lambda: j.append_write("/abs", 0, b"x"), lambda: j.append_write("../up", 0, b"x"),
                    lambda: j.append_write("a", -1, b"x"), lambda: j.append_truncate("a", -1),
                    lambda: j.bookmark(""), lambda: j.bookmark("a\nb"), lambda: j.append_write("", 0, b"")):
            with pytest.raises(ValueError):
                bad()
        assert j.last_seq == 0
    with Journal.open(jpath, readonly=True) as r, pytest.raises(PermissionError):
        r.append_write("a", 0, b"x")


def test_batch_keeps_what_a_reused_buffer_held(journal_dirs):
    """Vendor code often fills one buffer page after page: each record must
    hold the page as it was when it was appended, not when the batch commits."""
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        buf = bytearray(4096)
        with j.batch() as b:
            for i in range(4):
                buf[:] = bytes([i]) * 4096
                b.append_write("f", i * 4096, buf)
            big = bytearray(b"x" * 65536)  # the by-pointer path
            b.append_write("g", 0, big)
            big[:] = b"y" * 65536
        got = [(r.path, r.data) for r in j.records(kinds=[Kind.WRITE])]
    assert got == [("f", bytes([i]) * 4096) for i in range(4)] + [("g", b"x" * 65536)]

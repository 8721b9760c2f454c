"""prune(): retention. Every kept point restores exactly as before; pruned
seqs are refused; a kill at any step leaves a journal that verifies and
restores; the CLI through its real entry point."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import pytest

import cdpcore
from cdpcore import Journal, PointError, Policy, prune, retention
from cdpcore.retention import KILL_ENV, MANIFEST

H = 3600 * 10**6
D = 24 * H
T0 = 1_700_000_000 * 10**6  # 2023-11-14
NOW = T0 + 12 * D


def build(jdir: Path, root: Path, days: int = 12) -> Journal:
    """A journal over 12 days: writes, truncates, creates, renames, unlinks,
    symlinks, links, directories, flushes and bookmarks, many segments."""
    j = Journal.create(jdir, root, segment_size=4096)
    j.append_create("seed.txt", 0o644, ts=T0 - 1)
    j.append_write("seed.txt", 0, b"seed data\n" * 50, ts=T0 - 1)
    t = T0
    for day in range(days):
        for hour in range(0, 24, 3):
            t = T0 + day * D + hour * H
            j.append_write("a.bin", (day * 7 + hour) * 100 % 3000, bytes([day, hour]) * 150, ts=t)
            j.append_write(f"d{day % 3}/f{hour % 4}.txt", hour * 10, f"day {day} hour {hour}\n".encode(), ts=t + 1)
            if hour == 9:
                j.append_truncate("a.bin", 1000 + day * 50, ts=t + 2)
            if hour == 12:
                j.append_create(f"new{day}.dat", 0o600, ts=t + 3)
                j.append_write(f"new{day}.dat", 0, os.urandom(300), ts=t + 4)
                if day % 2:
                    j.append_rename(f"new{day}.dat", f"renamed{day}.dat", ts=t + 5)
            if hour == 15 and day > 1:
                j.append_unlink(f"new{day - 1}.dat" if day % 2 == 0 else f"renamed{day - 2}.dat", ts=t + 6)
            if hour == 18 and day % 4 == 0:
                j.append_symlink(f"new{day}.dat", f"link{day}", ts=t + 7)
                j.append_mkdir(f"empty{day}", 0o700, ts=t + 7)
                j.append_setattr("seed.txt", mode=0o640, ts=t + 8)
            j.append_flush(ts=t + 9)
        if day in (2, 5):
            j.bookmark(f"day{day}", ts=T0 + day * D + 22 * H)
    return j


def _data_map(path: Path) -> tuple[tuple[int, int], ...]:
    """Where the file has data (SEEK_DATA/SEEK_HOLE): holes must stay holes."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return tuple(out)


def snapshot(top: Path) -> dict[str, tuple]:
    """Everything a restore puts in a tree: kinds, contents, sizes, where the
    data lies (holes), modes, mtimes of files, symlink targets, and which
    names are hard links to one file."""
    out = {}
    inodes: dict[int, list[str]] = {}
    for d, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(d) / name
            rel = str(p.relative_to(top))
            st = os.lstat(p)
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, st.st_size, p.read_bytes(), _data_map(p),
                            st.st_mtime_ns)
                inodes.setdefault(st.st_ino, []).append(rel)
    for names in inodes.values():
        if len(names) > 1:
            for n in names:
                out[n] += (tuple(sorted(names)),)
    return out


def state(j: Journal, at: str, dest: Path) -> dict[str, tuple]:
    cdpcore.restore(j, dest, at=at, audit=False)
    return snapshot(dest)


POLICY = Policy.parse("2d", keep_hourly="3d", keep_daily="7d", keep_monthly="1y")


def seg_bytes(jdir: Path) -> int:
    return sum(p.stat().st_size for p in (jdir / "segments").glob("*.seg"))


@pytest.fixture
def built(fast_tmp):
    root = fast_tmp / "root"
    root.mkdir()
    j = build(fast_tmp / "j", root)
    yield fast_tmp, j
    j.close()


def test_prune_keeps_every_kept_point(built):
    tmp, j = built
    dry = prune(j, POLICY, now=NOW, dry_run=True)
    assert dry.boundary and dry.kept and seg_bytes(tmp / "j") > 0
    last = j.last_seq
    before = {k: state(j, f"seq:{k}", tmp / f"a{k}") for k in dry.kept}
    latest = state(j, "latest", tmp / "latest-a")
    after_b = dry.boundary + 5
    later = state(j, f"seq:{after_b}", tmp / "later-a")
    day2 = state(j, "bookmark:day2", tmp / "bm-a")
    size0 = seg_bytes(tmp / "j")
    other = Journal.open(tmp / "j")  # another writer, with cached file ids
    other.append_write("a.bin", 5, b"other writer", ts=NOW - 10)
    latest = state(j, "latest", tmp / "latest-a0")
    res = prune(j, POLICY, now=NOW)
    other.append_write("a.bin", 10, b"after the prune", ts=NOW - 5)
    other.close()
    want = bytearray(latest["a.bin"][3])
    want[10:25] = b"after the prune"
    got = state(j, "latest", tmp / "latest-o")
    assert got["a.bin"][3] == bytes(want)
    assert {k: v for k, v in got.items() if k != "a.bin"} == {
        k: v for k, v in latest.items() if k != "a.bin"}
    assert res.kept == dry.kept and res.boundary == dry.boundary
    assert seg_bytes(tmp / "j") < size0 * 0.8, (seg_bytes(tmp / "j"), size0)
    assert res.bytes_after < res.bytes_before * 0.8 and not res.bases_written, res
    for k in res.kept:
        assert state(j, f"seq:{k}", tmp / f"b{k}") == before[k], k
    assert state(j, f"seq:{after_b}", tmp / "later-b") == later
    assert state(j, "bookmark:day2", tmp / "bm-b") == day2
    pruned = next(s for s in range(j.first_seq, res.boundary) if s not in res.kept)
    with pytest.raises(PointError, match="was pruned"):
        j.resolve(f"seq:{pruned}")
    assert j.verify().ok, j.verify().problems
    # a time between two kept points resolves to the earlier one
    from datetime import datetime
    pts = {p.seq: p.ts for p in j.points()}
    for a, b in zip(res.kept, res.kept[1:]):
        if a in pts and b in pts and pts[b] - 1 >= pts[a]:
            t = datetime.fromtimestamp((pts[b] - 1) / 1e6, tz=UTC)
            assert j.resolve(t) == a
    with pytest.raises(PointError):
        j.resolve(f"seq:{j.first_seq - 1}")
    # reopen, append, prune again
    j.close()
    j2 = Journal.open(tmp / "j")
    assert j2.verify().ok
    assert j2.last_seq > last  # the prune's AUDIT anchor
    j2.append_write("a.bin", 0, b"after prune", ts=NOW + 1)
    assert state(j2, "latest", tmp / "latest-c")["a.bin"][3][:11] == b"after prune"
    res2 = prune(j2, POLICY, now=NOW + 2 * D)
    for k in res2.kept:
        if k in before:
            assert state(j2, f"seq:{k}", tmp / f"c{k}") == before[k], k
    assert j2.verify().ok
    j2.close()



def crash_at_every_step(tmp: Path, jdir: Path, policy: Policy, now: int, points: list) -> int:
    """Run the prune of a copy of jdir, SIGKILLed after step 1, 2, ... until
    it completes; after each, a writable open recovers a journal that
    verifies and restores every point as before. Returns the steps seen."""
    with Journal.open(jdir) as j:
        want = {p: state(j, p if p == "latest" else f"seq:{p}", tmp / f"w{p}") for p in points}
    step, finished = 0, False
    while not finished:
        step += 1
        assert step < 200
        work = tmp / f"crash{step}"
        subprocess.run(["cp", "-a", str(jdir), str(work)], check=True)
        # a forked child (no interpreter start-up per step) runs the prune
        # and SIGKILLs itself after step `step`
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.environ[KILL_ENV] = str(step)
                retention._steps = 0
                prune(str(work), policy, now=now)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 or (
            os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), status
        finished = os.WIFEXITED(status)
        with Journal.open(work) as j2:
            assert not (work / MANIFEST).exists()
            assert not list((work / "segments").glob("*.prune"))
            assert not list((work / "base").glob("*.prune")) if (work / "base").exists() else True
            rep = j2.verify()
            assert rep.ok, (step, [str(p) for p in rep.problems])
            for p in points:
                got = state(j2, p if p == "latest" else f"seq:{p}", tmp / f"g{step}-{p}")
                assert got == want[p], (step, p)
        subprocess.run(["rm", "-rf", str(work)], check=True)
    return step


def test_prune_crash_at_every_step(fast_tmp):
    root = fast_tmp / "root"
    root.mkdir()
    days = 8
    now = T0 + days * D
    policy = Policy.parse("1d", keep_hourly="2d", keep_daily="7d")
    with build(fast_tmp / "j", root, days=days) as j:
        plan = prune(j, policy, now=now, dry_run=True)
        assert plan.boundary and len(plan.kept) >= 5 and not plan.dropped
        assert {b.seq for b in j.bookmarks()} & set(plan.kept)
    steps = crash_at_every_step(fast_tmp, fast_tmp / "j", policy, now, plan.kept + ["latest"])
    assert steps > 10  # the hook saw every step of a real prune


def ransomed(jdir: Path, root: Path) -> Journal:
    """A journal started from a base of 40 files of 32 KiB, all rewritten
    whole on day 1 (the base is dead weight after that), then a few
    changes a day."""
    for i in range(40):
        (root / f"scan{i:02}.dcm").write_bytes(os.urandom(32 << 10))
    j = Journal.create(jdir, root, segment_size=128 << 10, base=False)
    (jdir / "base").mkdir()
    subprocess.run(["cp", "-a", str(root), str(jdir / "base" / "first")], check=True)
    with j.batch() as b:
        b.append_base("base/first", ts=T0 - 1)
    for i in range(40):
        j.append_write(f"scan{i:02}.dcm", 0, os.urandom(32 << 10), ts=T0 + D + i)
    j.append_flush(ts=T0 + D + 100)
    for day in range(2, 8):
        for i in range(5):
            j.append_write(f"scan{(day * 5 + i) % 40:02}.dcm", 4096 * i, os.urandom(16 << 10), ts=T0 + day * D + i)
        j.append_create(f"new{day}.txt", ts=T0 + day * D + 10)
        j.append_write(f"new{day}.txt", 0, b"new\n", ts=T0 + day * D + 11)
        j.append_flush(ts=T0 + day * D + 100)
    return j


def test_a_dead_base_is_replaced_by_one_at_the_first_kept_point(fast_tmp):
    root = fast_tmp / "root"
    root.mkdir()
    now = T0 + 8 * D
    policy = Policy.parse("12h", keep_daily="5d")
    with ransomed(fast_tmp / "j", root) as j:
        dry = prune(j, policy, now=now, dry_run=True)
        want = {k: state(j, f"seq:{k}", fast_tmp / f"w{k}") for k in dry.kept}
        res = prune(j, policy, now=now)
        assert res.kept == dry.kept and len(res.kept) >= 4
        assert res.bases_written == [f"pruned-{res.kept[0]:016x}"] and res.bases_removed == ["first"]
        assert res.bytes_after < res.bytes_before * 0.6, res
        for k in res.kept:
            assert state(j, f"seq:{k}", fast_tmp / f"g{k}") == want[k], k
        assert j.verify().ok


def test_a_dead_base_crash_at_every_step(fast_tmp):
    root = fast_tmp / "root"
    root.mkdir()
    now = T0 + 8 * D
    policy = Policy.parse("12h", keep_daily="5d")
    with ransomed(fast_tmp / "j", root) as j:
        kept = prune(j, policy, now=now, dry_run=True).kept
    steps = crash_at_every_step(fast_tmp, fast_tmp / "j", policy, now, sorted({kept[0], kept[-1]}) + ["latest"])
    assert steps >= 5


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "cdpcore.cli.main", *args], env=env,
                          capture_output=True, text=True, check=False)


def test_prune_cli(built):
    tmp, j = built
    jp = str(tmp / "j")
    j.close()
    now = str(NOW // 10**6)
    r = run_cli("prune", jp, "--keep-all", "2x")
    assert r.returncode == 2 and "invalid duration" in r.stderr
    r = run_cli("prune", jp, "--keep-all", "2d", "--keep-daily", "7d", "--now", now, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would fold" in r.stdout
    assert not list((tmp / "j" / "base").glob("pruned-*"))
    r = run_cli("--json", "prune", jp, "--keep-all", "2d", "--keep-daily", "7d", "--now", now,
                "--save-policy")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["boundary"] and doc["kept"] and doc["reclaimed_segments"] > 0
    meta = json.loads((tmp / "j" / "journal.json").read_text())
    assert meta["retention"]["keep_all"] == "2d"
    # the stored policy is used when none is given
    r = run_cli("--json", "prune", jp, "--now", now)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["policy"]["keep_daily"] == "7d"
    r = run_cli("verify", jp)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("audit", jp, "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("--json", "prune", jp, "--keep-all", "2d", "--keep-daily", "-3d")
    assert r.returncode == 2 and json.loads(r.stdout)


@pytest.mark.parametrize("verbatim", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_prune_random_history(fast_tmp, seed, verbatim, monkeypatch):
    """Random operations at timestamps that sometimes repeat or step back;
    two prunes; every kept point, bookmark and the latest state restore as
    before, times resolve where they did (rounded down to a kept point),
    and seqs that are gone are refused. Also with every group written by
    the verbatim fallback."""
    import random

    if verbatim:
        monkeypatch.setenv(retention.VERBATIM_ENV, "1")

    rnd = random.Random(seed)
    root = fast_tmp / "root"
    root.mkdir()
    j = Journal.create(fast_tmp / "j", root, segment_size=4096)
    files: list[str] = []
    t = T0
    for i in range(400):
        t += rnd.choice([0, H // 4, H, 3 * H, -H // 2])
        op = rnd.random()
        if not files or op < 0.1:
            name = f"d{rnd.randrange(3)}/f{i}"
            j.append_create(name, rnd.choice([0o644, 0o600]), ts=t)
            files.append(name)
        elif op < 0.5:
            j.append_write(rnd.choice(files), rnd.randrange(2000), os.urandom(rnd.randrange(1, 300)), ts=t)
        elif op < 0.6:
            j.append_truncate(rnd.choice(files), rnd.randrange(1500), ts=t)
        elif op < 0.67:
            old = rnd.choice(files)
            new = f"r{i}"
            j.append_rename(old, new, ts=t)
            files[files.index(old)] = new
        elif op < 0.72 and len(files) > 2:
            victim = rnd.choice(files)
            j.append_unlink(victim, ts=t)
            files.remove(victim)
        elif op < 0.74:
            j.append_symlink(rnd.choice(files), f"s{i}", ts=t)
        elif op < 0.76:
            j.bookmark(f"b{i}", ts=t)
        elif op < 0.78:
            j.append_link(rnd.choice(files), f"h{i}", ts=t)  # a hard link
            files.append(f"h{i}")
        elif op < 0.80:
            j.append_setattr(rnd.choice(files), mode=rnd.choice([None, 0o640]),
                             mtime_us=rnd.choice([None, t - 5 * H, t + H]), ts=t)
        elif op < 0.83:  # sparse: far past the end, or a truncate that extends
            f = rnd.choice(files)
            if rnd.random() < 0.5:
                j.append_write(f, rnd.randrange(1 << 16, 1 << 20), os.urandom(rnd.randrange(1, 5000)), ts=t)
            else:
                j.append_truncate(f, rnd.randrange(1 << 20), ts=t)
        elif op < 0.84:
            j.append_write(rnd.choice(files), rnd.randrange(3000), b"", ts=t)  # empty: sets mtime only
        else:
            j.append_flush(ts=t)
    now = t + 3 * H
    kept_all: dict[int, dict] = {}
    for step, (when, pol) in enumerate([
            (now - 2 * D, Policy.parse("1d", keep_hourly="2d", keep_daily="30d")),
            (now, Policy.parse("12h", keep_daily="30d"))]):
        dry = prune(j, pol, now=when, dry_run=True)
        want = {k: state(j, f"seq:{k}", fast_tmp / f"w{step}-{k}") for k in dry.kept}
        latest = state(j, "latest", fast_tmp / f"wl{step}")
        marks = {b.name: state(j, f"bookmark:{b.name}", fast_tmp / f"wb{step}-{b.name}")
                 for b in j.bookmarks()[:5]}
        # times: on every record's timestamp, and a microsecond either side
        stamps = sorted({r.ts + d for r in j.records() for d in (-1, 0, 1)})[::3]
        resolved = {}
        for ts in stamps:
            try:
                resolved[ts] = j.resolve(ts)
            except PointError:
                resolved[ts] = None
        res = prune(j, pol, now=when)
        assert res.kept == dry.kept
        for ts, seq in resolved.items():
            # a time lands where it landed, rounded down to a kept point
            if seq is None or (res.boundary and seq < res.kept[0]):
                with pytest.raises(PointError):
                    j.resolve(ts)
            elif res.boundary is None or seq >= res.kept[-1]:
                assert j.resolve(ts) == seq, ts
            else:
                assert j.resolve(ts) == max(k for k in res.kept if k <= seq), (ts, seq)
        if step == 0:
            assert res.boundary and res.segment_bytes_after < res.segment_bytes_before
        for k in res.dropped:  # asked for by the policy but did not fit: refused, not wrong
            with pytest.raises(PointError, match="was pruned"):
                j.resolve(f"seq:{k}")
        for k in res.kept:
            assert state(j, f"seq:{k}", fast_tmp / f"g{step}-{k}") == want[k], (seed, step, k)
        assert state(j, "latest", fast_tmp / f"gl{step}") == latest
        for name, snap in marks.items():
            assert state(j, f"bookmark:{name}", fast_tmp / f"gb{step}-{name}") == snap
        if res.boundary:
            gone = [s for s in range(j.first_seq, res.boundary) if s not in res.kept]
            for s in gone[:3]:
                with pytest.raises(PointError):
                    j.resolve(f"seq:{s}")
        rep = j.verify()
        assert rep.ok, [str(p) for p in rep.problems]
        kept_all.update(want)
    assert any(kept_all)
    j.close()


def test_readonly_open_refuses_an_interrupted_prune(built):
    tmp, j = built
    j.close()
    (tmp / "j" / MANIFEST).write_text(json.dumps(
        {"version": 1, "new_segments": [], "old_segments": [], "new_bases": [], "old_bases": []}))
    with pytest.raises(cdpcore.CorruptJournal, match="interrupted"):
        Journal.open(tmp / "j", readonly=True)
    with Journal.open(tmp / "j") as j2:  # a writable open finishes it
        assert any("prune" in r for r in j2.recovery)
    assert not (tmp / "j" / MANIFEST).exists()
    with Journal.open(tmp / "j", readonly=True):
        pass


def test_many_kept_points_in_few_segments(fast_tmp):
    """Large segments, an hourly policy: far more kept points than folded
    segments (the first design kept at most one per segment and dropped the
    rest); all kept, each restores as before, the others are refused."""
    root = fast_tmp / "root"
    root.mkdir()
    j = Journal.create(fast_tmp / "j", root, segment_size=1 << 20)
    t = T0
    for i in range(400):
        t = T0 + i * H // 4
        j.append_write(f"f{i % 7}", (i * 37) % 2000, os.urandom(64), ts=t)
        if i % 4 == 3:
            j.append_flush(ts=t + 1)
    j._need_writer()
    j.append_write("tail", 0, bytes(1 << 20), ts=t + 2)  # seals the first segment
    j.append_write("tail", 0, b"x", ts=t + 3 * D)
    now = t + 3 * D
    pol = Policy.parse("1h", keep_hourly="30d")
    dry = prune(j, pol, now=now, dry_run=True)
    want = {k: state(j, f"seq:{k}", fast_tmp / f"w{k}") for k in dry.kept}
    res = prune(j, pol, now=now)
    assert len(res.segments_replaced) <= 2 and len(res.kept) >= 90, (res.segments_replaced, len(res.kept))
    assert res.kept == dry.kept and not res.dropped
    for k in res.kept:
        assert state(j, f"seq:{k}", fast_tmp / f"g{k}") == want[k], k
    assert j.compacted_points() == res.kept
    gone = sorted(set(range(j.first_seq, res.boundary)) - set(res.kept))
    for s in gone[::17]:
        with pytest.raises(PointError, match="was pruned"):
            j.resolve(f"seq:{s}")
    assert j.verify().ok
    j.close()


def test_small_files_take_less_than_a_full_copy(fast_tmp):
    """Many small files, a few changed between kept points: the pruned
    journal (segments and bases) is smaller than the journal was, and
    smaller than one materialised copy of the tree, which is what the first
    design stored for every kept point."""
    root = fast_tmp / "root"
    root.mkdir()
    j = Journal.create(fast_tmp / "j", root, segment_size=64 << 10)
    for i in range(600):
        j.append_create(f"img/{i // 100}/f{i}.txt", 0o644, ts=T0)
        j.append_write(f"img/{i // 100}/f{i}.txt", 0, f"file {i}\n".encode() * 20, ts=T0)
    j.append_flush(ts=T0)
    for day in range(10):
        for k in range(150):  # 30 files a day, each rewritten 5 times
            i = (day * 31 + k % 30 * 7) % 600
            j.append_write(f"img/{i // 100}/f{i}.txt", 0, f"day {day} {k}\n".encode() * 3,
                           ts=T0 + day * D + k)
        j.append_flush(ts=T0 + day * D + 100)
    now = T0 + 11 * D
    pol = Policy.parse("1d", keep_daily="30d")
    dry = prune(j, pol, now=now, dry_run=True)
    want = {k: state(j, f"seq:{k}", fast_tmp / f"w{k}") for k in dry.kept}
    full_copy = retention._dir_bytes(str(fast_tmp / f"w{dry.kept[0]}"))
    res = prune(j, pol, now=now)
    assert len(res.kept) >= 7
    assert res.bytes_after < res.bytes_before, res
    assert res.bytes_after < full_copy, (res.bytes_after, full_copy)
    for k in res.kept:
        assert state(j, f"seq:{k}", fast_tmp / f"g{k}") == want[k], k
    assert j.verify().ok
    j.close()


@pytest.mark.parametrize("verbatim", [False, True])
def test_bases_hard_links_and_the_verbatim_fallback(fast_tmp, monkeypatch, verbatim):
    """A journal that starts from a base (with a hard link and a sparse
    file) and takes another base half-way: kept points before, across and
    after the second base restore as before; also when every group is
    written as its interval's own records (the fallback for net changes
    that would not fit their seqs)."""
    if verbatim:
        monkeypatch.setenv(retention.VERBATIM_ENV, "1")
    root = fast_tmp / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a.txt").write_bytes(b"base a\n" * 100)
    os.link(root / "d" / "a.txt", root / "hard.txt")
    with open(root / "sparse.bin", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    j = Journal.create(fast_tmp / "j", root, segment_size=4096, base=False)

    def take_base(name: str, ts: int) -> None:  # Journal.take_base, at a chosen time
        # cp -a keeps the hard link: one inode with two names in the base
        (fast_tmp / "j" / "base").mkdir(exist_ok=True)
        subprocess.run(["cp", "-a", str(root), str(fast_tmp / "j" / "base" / name)], check=True)
        with j.batch() as b:
            b.append_base(f"base/{name}", ts=ts)

    take_base("first", T0 - 1)
    t = T0
    for day in range(8):
        for hour in range(0, 24, 4):
            t = T0 + day * D + hour * H
            j.append_write("hard.txt", hour * 7, f"d{day}h{hour}".encode(), ts=t)
            j.append_write("sparse.bin", (day * 24 + hour) * 4096, b"page" * 64, ts=t + 1)
            if hour == 8:
                j.append_link("d/a.txt", f"d/link{day}", ts=t + 2)
                j.append_setattr("d/a.txt", mtime_us=t - D, ts=t + 3)
            if hour == 12:
                j.append_truncate("sparse.bin", (1 << 20) - day * 8192, ts=t + 4)
            j.append_flush(ts=t + 5)
        if day == 3:
            take_base("second", t + 6)  # the live root: the journal's state before no longer matters
    now = T0 + 8 * D
    pol = Policy.parse("1d", keep_hourly="3d", keep_daily="30d")
    dry = prune(j, pol, now=now, dry_run=True)
    want = {k: state(j, f"seq:{k}", fast_tmp / f"w{k}") for k in dry.kept}
    latest = state(j, "latest", fast_tmp / "wl")
    res = prune(j, pol, now=now)
    assert len(res.kept) >= 8 and not res.bases_removed  # kept points before the second base need the first
    if verbatim:
        assert "verbatim" in res.message and "net" not in res.message
    for k in res.kept:
        assert state(j, f"seq:{k}", fast_tmp / f"g{k}") == want[k], k
    assert state(j, "latest", fast_tmp / "gl") == latest
    assert j.verify().ok
    # a second prune that keeps nothing from before the second base: the
    # first base goes, its group starts at the second
    res2 = prune(j, Policy.parse("1d", keep_hourly="1d"), now=now)
    assert res2.kept
    assert res2.bases_removed == ["first"] and not (fast_tmp / "j" / "base" / "first").exists()
    for k in res2.kept:
        if k in want:
            assert state(j, f"seq:{k}", fast_tmp / f"h{k}") == want[k], k
    assert state(j, "latest", fast_tmp / "hl") == latest
    assert j.verify().ok
    j.close()


@pytest.mark.parametrize("drop", [False, True])
def test_bookmarks_kept_unless_asked(fast_tmp, drop):
    root = fast_tmp / "root"
    root.mkdir()
    with build(fast_tmp / "j", root) as j:
        marks = {b.name: b.seq for b in j.bookmarks()}
        assert set(marks) == {"day2", "day5"}
        want = {n: state(j, f"bookmark:{n}", fast_tmp / f"w{n}") for n in marks}
        pol = Policy.parse("2d", keep_daily="3d", drop_bookmarks=drop)
        res = prune(j, pol, now=NOW)
        assert res.boundary and res.boundary > max(marks.values())
        if drop:
            assert not j.bookmarks() and not set(marks.values()) & set(res.kept)
            for n, seq in marks.items():
                with pytest.raises(PointError):
                    j.resolve(f"bookmark:{n}")
                with pytest.raises(PointError, match="was pruned"):
                    j.resolve(f"seq:{seq}")
        else:
            assert {b.name: b.seq for b in j.bookmarks()} == marks and set(marks.values()) <= set(res.kept)
            for n in marks:
                assert state(j, f"bookmark:{n}", fast_tmp / f"g{n}") == want[n]
        # points() lists kept points only inside pruned history
        assert {p.seq for p in j.points() if p.seq <= res.boundary} <= set(res.kept)
        assert j.verify().ok


def test_rollback_and_plans_from_kept_points(fast_tmp):
    """Reading on from a kept point whose next records lie past a gap (in
    the next segment): continue_plan (rollback's) and a rollback to each
    kept point work, and the live tree ends as the point restores."""
    from cdpcore.plan import build_plan, continue_plan
    from cdpcore.rollback import rollback

    root = fast_tmp / "root"
    root.mkdir()
    with build(fast_tmp / "j", root) as j:
        res = prune(j, POLICY, now=NOW)
        assert len(res.segments_written) > 1
        for k in res.kept:
            with build_plan(j, k) as plan:
                after = continue_plan(j, plan, j.last_seq)
                assert after.seq == j.last_seq
        os.rmdir(root)
        cdpcore.restore(j, root, at="latest", audit=False)  # the live tree, as journaled
        for k in res.kept[-3:]:
            want = state(j, f"seq:{k}", fast_tmp / f"w{k}")
            rollback(j, f"seq:{k}", force=True)
            got = snapshot(root)
            assert {p: v[:5] for p, v in got.items()} == {p: v[:5] for p, v in want.items()}, k
        assert j.verify().ok


def test_show_records_in_pruned_history(built):
    """Any record still in the journal reads by seq (cdpctl show), kept
    point or not; a seq in a gap says it was pruned."""
    tmp, j = built
    res = prune(j, POLICY, now=NOW)
    seqs = [r.seq for r in j.records(until=f"seq:{res.boundary}")]
    gaps = sorted(set(range(j.first_seq, res.boundary)) - set(seqs))
    assert gaps and set(res.kept) <= set(seqs)
    for s in seqs[:40]:
        assert j.record(s).seq == s
    with pytest.raises(PointError, match="pruned"):
        j.record(gaps[0])
    j.close()
    r = run_cli("show", str(tmp / "j"), str(res.kept[1]))
    assert r.returncode == 0, r.stderr

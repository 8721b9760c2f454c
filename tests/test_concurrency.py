"""Order and integrity under concurrency: threads sharing one Journal,
processes (spawned and forked) sharing one journal directory, writers killed
with SIGKILL in the middle of appends, and sync()'s group commit.

Every record's content says who wrote it and its number (thread/process id,
counter), so the checks need no shared state beyond the journal itself."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import scale

from cdpcore import Journal, Kind
from cdpcore.format import parse_head

SHARED = ["shared/0", "shared/1", "shared/2"]


def tag(who: int, i: int) -> bytes:
    return f"{who}:{i}:".encode() + bytes([i % 251]) * (i % 300)


def untag(data: bytes) -> tuple[int, int]:
    who, i, _ = data.split(b":", 2)
    return int(who), int(i)


def path_for(who: int, i: int) -> str:
    return SHARED[i % 3] if i % 2 else f"own{who}"


def append_some(j: Journal, who: int, n: int, rnd: random.Random, report=None) -> list[tuple[int, int]]:
    """Append n tagged WRITE records (singles and batches, with some
    namespace traffic in between); returns [(seq, i)] as the calls returned."""
    out = []
    i = 0
    while i < n:
        r = rnd.random()
        if r < 0.1:
            # namespace changes invalidate every writer's cached file ids
            j.append_create(f"tmp{who}/{i}")
            j.append_rename(f"tmp{who}/{i}", f"tmp{who}/r{i}")
        if r < 0.5:
            seq = j.append_write(path_for(who, i), i, tag(who, i))
            out.append((seq, i))
            i += 1
        else:
            k = min(n - i, rnd.randint(1, 6))
            with j.batch() as b:
                for m in range(i, i + k):
                    b.append_write(path_for(who, m), m, tag(who, m))
            out.append((b.last_seq, i + k - 1))
            i += k
        if report is not None:
            report(out[-1])
    return out


def check_all(jpath: Path, writers: dict[int, int], returned: dict[int, list[tuple[int, int]]]) -> None:
    """Every writer's n records present once, in its own order, under the
    right path, and every seq a call returned names the record it wrote."""
    with Journal.open(jpath, readonly=True) as j:
        recs = list(j.records())
        assert j.verify().ok
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1))
    by_seq = {r.seq: r for r in recs}
    seen: dict[int, list[int]] = {w: [] for w in writers}
    for r in recs:
        if r.kind == Kind.WRITE:
            who, i = untag(r.data)
            assert r.data == tag(who, i)
            assert r.offset == i
            assert r.path == path_for(who, i), f"record {r.seq} of writer {who} bound to {r.path}"
            seen[who].append(i)
    for w, n in writers.items():
        assert seen[w] == list(range(n)), f"writer {w}: records missing, doubled or out of order"
    for w, pairs in returned.items():
        for seq, i in pairs:
            assert by_seq[seq].kind == Kind.WRITE and untag(by_seq[seq].data) == (w, i), (
                f"writer {w}: append {i} returned seq {seq}, which holds another record")


# ---- threads -------------------------------------------------------------------


def test_threads_share_one_journal(journal_dirs):
    jpath, root = journal_dirs
    n = scale(150, 1500)
    returned: dict[int, list] = {}
    errors = []
    with Journal.create(jpath, root, segment_size=8192) as j:
        start = threading.Barrier(8)

        def run(who: int) -> None:
            try:
                start.wait()
                returned[who] = append_some(j, who, n, random.Random(who))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    check_all(jpath, {w: n for w in range(8)}, returned)


def test_sync_group_commit_from_threads(journal_dirs):
    """After sync() returns, the head's synced_seq covers every record that
    thread appended before calling it (and sync() says so)."""
    jpath, root = journal_dirs
    errors = []
    with Journal.create(jpath, root, segment_size=4096) as j:

        def run(who: int) -> None:
            try:
                for i in range(scale(40, 300)):
                    seq = j.append_write(f"f{who}", i, b"x" * 500)
                    if i % 3 == 0:
                        synced = j.sync()
                        # read under the append lock: other threads rewrite
                        # the head in place, and a read racing them is torn
                        writer = j._need_writer()
                        writer.lock()
                        try:
                            head = parse_head((jpath / "head").read_bytes())
                        finally:
                            writer.unlock()
                        assert head is not None
                        assert synced >= seq and head.synced_seq >= seq
                        assert head.synced_seq <= head.next_seq - 1
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        last = j.last_seq
        assert j.sync() == last
        assert j.sync() == last  # nothing new: no-op
    with Journal.open(jpath, readonly=True) as r:
        assert r.info()["synced_seq"] == last


# ---- processes -------------------------------------------------------------------


def proc_writer(jpath: str, who: int, n: int, conn) -> None:
    with Journal.open(jpath) as j:
        conn.send(append_some(j, who, n, random.Random(who)))
    conn.close()


def run_procs(ctx, jpath: Path, n: int, procs: int = 4) -> None:
    pipes, ps = [], []
    for w in range(procs):
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=proc_writer, args=(str(jpath), w, n, b))
        p.start()
        b.close()
        pipes.append(a)
        ps.append(p)
    returned = {w: pipes[w].recv() for w in range(procs)}
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    check_all(jpath, {w: n for w in range(procs)}, returned)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_processes_share_one_journal(journal_dirs, method):
    jpath, root = journal_dirs
    Journal.create(jpath, root, segment_size=4096).close()
    run_procs(multiprocessing.get_context(method), jpath, scale(150, 1500))


def test_forked_children_inherit_an_open_journal(journal_dirs):
    """A child forked from a process with an open Journal keeps using it
    (os.fork without exec): its records must not be confused with the
    parent's (file ids, cached paths, the flock, the head mapping)."""
    jpath, root = journal_dirs
    n = scale(60, 600)
    with Journal.create(jpath, root, segment_size=4096) as j:
        j.append_write("own0", 0, b"warm up the file-id cache")
        kids = {}
        for who in (1, 2, 3):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    os.close(r)
                    pairs = append_some(j, who, n, random.Random(who))
                    os.write(w, repr(pairs).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            kids[who] = (pid, r)
        mine = append_some(j, 0, n, random.Random(0))
        returned = {0: mine}
        for who, (pid, r) in kids.items():
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
            os.close(r)
            assert os.waitpid(pid, 0)[1] == 0
            returned[who] = eval(b"".join(chunks))
    # the warm-up record is writer 0's too: drop it from the comparison
    with Journal.open(jpath) as j:
        j.append_flush()
    recs_ok = {w: n for w in (0, 1, 2, 3)}
    _check_with_warmup(jpath, recs_ok, returned)


def _check_with_warmup(jpath, writers, returned):
    with Journal.open(jpath, readonly=True) as j:
        first = next(r for r in j.records() if r.kind == Kind.WRITE)
        assert first.data.startswith(b"warm up")
    # rewrite nothing: check_all skips non-tagged data by recognising it
    with Journal.open(jpath, readonly=True) as j:
        recs = [r for r in j.records() if not (r.kind == Kind.WRITE and r.data.startswith(b"warm"))]
        assert j.verify().ok
    by_seq = {r.seq: r for r in recs}
    seen: dict[int, list[int]] = {w: [] for w in writers}
    for r in recs:
        if r.kind == Kind.WRITE:
            who, i = untag(r.data)
            assert r.path == path_for(who, i), f"record {r.seq} of writer {who} bound to {r.path}"
            seen[who].append(i)
    for w, n in writers.items():
        assert seen[w] == list(range(n))
    for w, pairs in returned.items():
        for seq, i in pairs:
            assert untag(by_seq[seq].data) == (w, i)


def order_first(jpath: str, ev, conn) -> None:
    with Journal.open(jpath) as j:
        seq = j.bookmark("A")
        ev.set()  # A's append has returned
        conn.send(seq)


def order_second(jpath: str, ev, conn) -> None:
    with Journal.open(jpath) as j:  # opened (and its state read) before A
        j.append_write("warm", 0, b"x")
        assert ev.wait(30)
        conn.send(j.bookmark("B"))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_order_across_processes(journal_dirs, method):
    """If append A returned before append B started, in any process, then
    A.seq < B.seq."""
    ctx = multiprocessing.get_context(method)
    jpath, root = journal_dirs
    Journal.create(jpath, root, segment_size=4096).close()
    for _ in range(scale(2, 10)):
        ev = ctx.Event()
        a_r, a_w = ctx.Pipe(duplex=False)
        b_r, b_w = ctx.Pipe(duplex=False)
        pb = ctx.Process(target=order_second, args=(str(jpath), ev, b_w))
        pb.start()
        time.sleep(0.05)
        pa = ctx.Process(target=order_first, args=(str(jpath), ev, a_w))
        pa.start()
        a, b = a_r.recv(), b_r.recv()
        pa.join(30)
        pb.join(30)
        assert a < b
        with Journal.open(jpath, readonly=True) as j:
            assert j.record(a).name == "A" and j.record(b).name == "B"


# ---- SIGKILL -------------------------------------------------------------------------


def _killable_child(jpath: Path, who: int, wfd: int, seed: int) -> None:
    """Append forever; after each append returns, report (seq, i) on the pipe."""
    try:
        with Journal.open(jpath) as j:
            rnd = random.Random(seed)
            i = 0
            while True:
                if rnd.random() < 0.3:
                    k = rnd.randint(2, 5)
                    with j.batch() as b:
                        for m in range(i, i + k):
                            b.append_write(path_for(who, m), m, tag(who, m))
                    os.write(wfd, f"{b.last_seq} {i + k - 1}\n".encode())
                    i += k
                else:
                    seq = j.append_write(path_for(who, i), i, tag(who, i))
                    os.write(wfd, f"{seq} {i}\n".encode())
                    i += 1
    finally:
        os._exit(0)


def _spawn_killable(jpath: Path, who: int, seed: int) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _killable_child(jpath, who, w, seed)
    os.close(w)
    return pid, r


def _reported(r: int) -> list[tuple[int, int]]:
    buf = b""
    while chunk := os.read(r, 1 << 16):
        buf += chunk
    os.close(r)
    lines = buf.split(b"\n")[:-1]  # the last line may be cut by the kill
    return [tuple(map(int, ln.split())) for ln in lines]


def _check_killed(jpath: Path, returned: dict[tuple[int, int], list[tuple[int, int]]]) -> None:
    with Journal.open(jpath) as j:  # recovery
        rep = j.verify()
        assert rep.ok, rep.problems
        recs = list(j.records())
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1))
    by_seq = {r.seq: r for r in recs}
    for (who, _gen), pairs in returned.items():
        for seq, i in pairs:
            r = by_seq.get(seq)
            assert r is not None, f"seq {seq} was returned to writer {who} but is gone"
            assert r.kind == Kind.WRITE and r.data == tag(who, i), f"seq {seq} holds another record"


@pytest.mark.parametrize("with_survivor", [False, True], ids=["alone", "with-survivor"])
def test_sigkill_in_the_middle_of_appends(journal_dirs, with_survivor):
    jpath, root = journal_dirs
    Journal.create(jpath, root, segment_size=4096).close()
    rnd = random.Random(7 + with_survivor)
    returned: dict[tuple[int, int], list] = {}
    for it in range(scale(6, 40)):
        who = 1 + it % 5
        victim, vr = _spawn_killable(jpath, who, rnd.randrange(2**32))
        survivor = None
        if with_survivor:
            survivor = _spawn_killable(jpath, 10 + it, rnd.randrange(2**32))
        time.sleep(rnd.uniform(0.005, 0.06))
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)
        returned[(who, it)] = _reported(vr)
        if survivor is not None:
            # the survivor goes on appending past the dead writer's leftovers
            time.sleep(rnd.uniform(0.005, 0.03))
            os.kill(survivor[0], signal.SIGKILL)
            os.waitpid(survivor[0], 0)
            returned[(10 + it, it)] = _reported(survivor[1])
        _check_killed(jpath, returned)
    assert sum(len(v) for v in returned.values()) > 10

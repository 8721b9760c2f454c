"""feed.py: the sender's view of a journal. A small replica model applies
the items as the receiver would (checking offsets: no hole, no overlap);
after every pass the replica must be a valid prefix of the source, and
byte-identical once caught up."""
from __future__ import annotations

import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import scale, scratch
from cdpcore import Journal, Policy, prune
from cdpcore.errors import CorruptJournal, ProtocolError, VaultError
from cdpcore.feed import (
    BaseItem,
    EntryItem,
    Feed,
    FileItem,
    Item,
    Position,
    PruneItem,
    RunItem,
    SealItem,
    SegmentItem,
)
from cdpcore.format import HEAD_NAME, REC_HDR, segment_name

H = 3600 * 10**6
D = 24 * H
T0 = 1_700_000_000 * 10**6


class Replica:
    """What a receiver does with the items, minus network and chunks: the
    contract checks (offsets continue, headers match) are asserted."""

    def __init__(self, top: Path):
        self.top = top
        (top / "segments").mkdir(parents=True)
        self.pos = Position()
        self.incoming: dict[int, tuple[int, int, bool]] = {}
        self.open_replace: set[int] = set()

    def seg_path(self, n: int, incoming: bool = False) -> Path:
        return self.top / "segments" / (segment_name(n) + (".incoming" if incoming else ""))

    def apply(self, item: Item) -> None:
        if isinstance(item, SegmentItem):
            assert len(item.header) == 64
            crc = struct.unpack_from("<I", item.header, 60)[0]
            if item.replace:
                self.open_replace.add(item.seg)
                self.seg_path(item.seg, True).write_bytes(item.header)
                self.incoming[item.seg] = (crc, 64, False)
            else:
                assert item.seg not in self.pos.segments
                if self.pos.segments:  # segments open in order, each after the previous is sealed
                    last = max(self.pos.segments)
                    assert item.seg == last + 1 and self.pos.segments[last][2]
                self.open_replace.discard(item.seg)
                self.seg_path(item.seg).write_bytes(item.header)
                self.pos.segments[item.seg] = (crc, 64, False)
        elif isinstance(item, RunItem):
            table, inc = ((self.incoming, True) if item.seg in self.open_replace
                          else (self.pos.segments, False))
            crc, size, sealed = table[item.seg]
            assert not sealed and item.off == size and item.end == size + len(item.buf)
            first = REC_HDR.unpack_from(item.buf, 0)
            assert first[2] == item.first_seq and first[3] == item.first_ts
            with open(self.seg_path(item.seg, inc), "ab") as f:
                f.write(item.buf)
            table[item.seg] = (crc, item.end, False)
        elif isinstance(item, SealItem):
            table = self.incoming if item.seg in self.open_replace else self.pos.segments
            crc, size, sealed = table[item.seg]
            assert size == item.size
            table[item.seg] = (crc, size, True)
        elif isinstance(item, FileItem):
            p = self.top / item.path
            p.parent.mkdir(parents=True, exist_ok=True)
            if item.whole:
                p.write_bytes(item.buf)
            else:
                have = p.stat().st_size if p.exists() else 0
                assert item.off == have, (item.path, item.off, have)
                with open(p, "ab") as f:
                    f.write(item.buf)
            self.pos.files[item.path] = item.end
        elif isinstance(item, EntryItem):
            p = self.top / item.path
            p.parent.mkdir(parents=True, exist_ok=True)
            if item.kind == "symlink":
                os.symlink(item.target, p)
            elif item.kind == "dir":
                p.mkdir(exist_ok=True)
                os.chmod(p, item.mode)
            else:
                if not p.exists():
                    p.write_bytes(b"")
                assert p.stat().st_size == item.size
                os.chmod(p, item.mode)
        elif isinstance(item, BaseItem):
            assert (self.top / "base" / item.name).is_dir()
            self.pos.bases.add(item.name)
        elif isinstance(item, PruneItem):
            live = {}
            for n, crc, size in item.segments:
                if n in self.incoming:
                    assert self.incoming[n][:2] == (crc, size) and self.incoming[n][2]
                    os.replace(self.seg_path(n, True), self.seg_path(n))
                    live[n] = self.incoming[n]
                else:
                    assert self.pos.segments[n][0] == crc
                    live[n] = self.pos.segments[n]
            for n in self.pos.segments:
                if n not in live:
                    self.seg_path(n).unlink()
            self.pos.segments = live
            self.incoming.clear()
            self.open_replace.clear()
            for b in list(self.pos.bases):
                if b not in item.bases:
                    shutil.rmtree(self.top / "base" / b)
                    self.pos.bases.discard(b)
        else:
            raise AssertionError(item)

    def wire_position(self) -> dict:
        # as the vault does: a prune's N.seg.incoming is listed beside N.seg
        pos = Position(dict(self.pos.segments), dict(self.pos.files), set(self.pos.bases),
                       {n: v for n, v in self.incoming.items() if n in self.pos.segments})
        incoming_only = {n: v for n, v in self.incoming.items() if n not in self.pos.segments}
        wire = pos.to_wire()
        wire["segments"] = sorted(wire["segments"] + [[n, *v] for n, v in incoming_only.items()])
        return wire


def ship(feed: Feed, rep: Replica, position: dict | None = None) -> list[Item]:
    items = list(feed.plan(rep.wire_position() if position is None else position))
    for it in items:
        rep.apply(it)
    return items


def follow(feed: Feed, rep: Replica) -> list[Item]:
    items = list(feed.items())
    for it in items:
        rep.apply(it)
    return items


def same_segments(src: Path, rep: Replica) -> None:
    want = {p.name: p.read_bytes() for p in (src / "segments").glob("*.seg")}
    got = {p.name: p.read_bytes() for p in (rep.top / "segments").glob("*.seg")}
    assert got == want
    assert not list((rep.top / "segments").glob("*.incoming"))


def records_of(path: Path) -> list[tuple]:
    with Journal.open(path, readonly=True) as j:
        return [(r.seq, r.ts, r.kind, r.offset, r.data, r.path) for r in j.records()]


def make(tmp: Path, segment_size: int = 4096) -> tuple[Journal, Path]:
    root = tmp / "root"
    root.mkdir()
    return Journal.create(tmp / "j", root, segment_size=segment_size), tmp / "j"


# ---- basics ------------------------------------------------------------------


def test_ships_a_journal_byte_for_byte_and_follows(fast_tmp):
    j, jdir = make(fast_tmp)
    for i in range(200):
        j.append_write(f"f{i % 5}", i * 100, os.urandom(300 + i))
    j.bookmark("mid")
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir, run_bytes=4096) as feed:
        items = ship(feed, rep)
        assert isinstance(items[0], FileItem) and items[0].path == "journal.json" and items[0].whole
        runs = [i for i in items if isinstance(i, RunItem)]
        assert all(len(r.buf) <= 4096 for r in runs)
        same_segments(jdir, rep)
        assert (rep.top / "journal.json").read_bytes() == (jdir / "journal.json").read_bytes()
        assert records_of(rep.top) == records_of(jdir)
        # seals go out for every segment but the active one
        seals = {i.seg for i in items if isinstance(i, SealItem)}
        assert seals == set(range(1, len(list((jdir / "segments").glob("*.seg")))))
        assert not feed.poll()
        assert list(feed.items()) == []
        j.append_write("later", 0, b"x" * 5000)
        assert feed.poll()
        new = follow(feed, rep)
        assert new and all(not isinstance(i, FileItem) for i in new)
        assert not feed.poll()
        same_segments(jdir, rep)
        assert feed.backlog(rep.wire_position()) == (0, None)
    j.close()


def test_resume_from_the_replicas_position(fast_tmp):
    j, jdir = make(fast_tmp)
    for i in range(100):
        j.append_write("a", i * 64, os.urandom(200), ts=T0 + i)
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir, run_bytes=4096) as feed:
        items = list(feed.plan(None))
        # the replica made only the first half durable: the rest comes again
        half = len(items) // 2
        for it in items[:half]:
            rep.apply(it)
        nbytes, oldest = feed.backlog(rep.wire_position())
        assert nbytes > 0
        first_missing = next(i for i in items[half:] if isinstance(i, RunItem))
        assert oldest == first_missing.first_ts
        again = ship(feed, rep)
        assert not any(isinstance(i, SegmentItem) and i.seg in
                       {x.seg for x in items[:half] if isinstance(x, SealItem)} for i in again)
        same_segments(jdir, rep)
    j.close()


def test_a_record_larger_than_a_run_goes_alone(fast_tmp):
    j, jdir = make(fast_tmp, segment_size=1 << 20)
    j.append_write("big", 0, os.urandom(20000))
    j.append_write("small", 0, b"s")
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir, run_bytes=4096) as feed:
        runs = [i for i in ship(feed, rep) if isinstance(i, RunItem)]
        big = [r for r in runs if len(r.buf) > 4096]
        assert len(big) == 1 and big[0].first_seq == big[0].last_seq
        same_segments(jdir, rep)
    j.close()


# ---- what must never be shipped -----------------------------------------------


def test_a_torn_tail_is_not_shipped(fast_tmp):
    j, jdir = make(fast_tmp, segment_size=1 << 20)
    for i in range(10):
        j.append_write("a", i, b"abc" * 50)
    j.close()
    seg = jdir / "segments" / segment_name(1)
    good = seg.read_bytes()
    # half a record past the end, as a crash mid-append leaves it
    with Journal.open(jdir) as j2:
        j2.append_write("a", 0, b"tail" * 100)
    full = seg.read_bytes()
    seg.write_bytes(full[: len(good) + 40])  # less than a record header
    head = (jdir / HEAD_NAME)
    head.unlink()  # no head to believe: the scan decides
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir) as feed:
        ship(feed, rep)
    assert (rep.top / "segments" / segment_name(1)).read_bytes() == good


def test_records_past_the_committed_end_wait(fast_tmp):
    """Valid records past the head's committed end belong to an append that
    has not returned (a dead writer's are cut and their seqs reused)."""
    j, jdir = make(fast_tmp, segment_size=1 << 20)
    for i in range(5):
        j.append_write("a", i, b"x" * 100)
    old_head = (jdir / HEAD_NAME).read_bytes()
    size_then = (jdir / "segments" / segment_name(1)).stat().st_size
    for i in range(5):
        j.append_write("a", i, b"y" * 100)
    new_head = (jdir / HEAD_NAME).read_bytes()
    (jdir / HEAD_NAME).write_bytes(old_head)
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir) as feed:
        ship(feed, rep)
        assert (rep.top / "segments" / segment_name(1)).stat().st_size == size_then
        (jdir / HEAD_NAME).write_bytes(new_head)  # the append is published
        assert feed.poll()
        follow(feed, rep)
        same_segments(jdir, rep)
    j.close()


def test_damage_in_a_sealed_segment_stops_there(fast_tmp):
    j, jdir = make(fast_tmp)
    for i in range(60):
        j.append_write("a", i * 10, os.urandom(500))
    j.close()
    seg1 = jdir / "segments" / segment_name(1)
    data = bytearray(seg1.read_bytes())
    offs = [64]
    while len(offs) < 5:
        offs.append(offs[-1] + REC_HDR.size + ((REC_HDR.unpack_from(data, offs[-1])[1] + 7) & ~7))
    rec2 = offs[3]
    data[rec2 + 60] ^= 0xFF
    seg1.write_bytes(bytes(data))
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir) as feed:
        got: list[Item] = []
        with pytest.raises(CorruptJournal, match="segment 0000000000000001 offset"):
            for it in feed.plan(None):
                got.append(it)
                rep.apply(it)
    assert not any(isinstance(i, SealItem) for i in got)
    assert (rep.top / "segments" / segment_name(1)).read_bytes() == bytes(data[:rec2])
    assert not (rep.top / "segments" / segment_name(2)).exists()


def test_audit_log_ships_whole_lines_only(fast_tmp):
    j, jdir = make(fast_tmp)
    j.bookmark("one")
    j.bookmark("two")
    log = (jdir / "audit.log").read_bytes()
    assert log.count(b"\n") == 2
    with open(jdir / "audit.log", "ab") as f:
        f.write(b'{"v":1,"n":3,"torn')
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir) as feed:
        ship(feed, rep)
        assert (rep.top / "audit.log").read_bytes() == log
        j.bookmark("three")  # cuts the torn line and appends
        follow(feed, rep)
        assert (rep.top / "audit.log").read_bytes() == (jdir / "audit.log").read_bytes()
    j.close()


# ---- bases and prunes ---------------------------------------------------------


def test_bases_ship_when_complete_with_their_metadata(fast_tmp):
    j, jdir = make(fast_tmp)
    root = fast_tmp / "root"
    (root / "d").mkdir()
    (root / "d" / "f.bin").write_bytes(os.urandom(70000))
    os.chmod(root / "d" / "f.bin", 0o640)
    os.symlink("d/f.bin", root / "ln")
    (root / "empty").mkdir(mode=0o700)
    os.utime(root / "d" / "f.bin", ns=(T0 * 1000, T0 * 1000))
    (jdir / "base").mkdir()
    (jdir / "base" / "0000000000000009.tmp").mkdir()  # a copy in progress
    j.take_base()
    j.append_write("d/f.bin", 0, b"changed")
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir, run_bytes=16384) as feed:
        items = ship(feed, rep)
    names = [i.name for i in items if isinstance(i, BaseItem)]
    assert len(names) == 1 and not names[0].endswith(".tmp")
    b = f"base/{names[0]}"
    entries = {i.path: i for i in items if isinstance(i, EntryItem)}
    assert entries[f"{b}/d/f.bin"].size == 70000 and entries[f"{b}/d/f.bin"].mode == 0o640
    assert entries[f"{b}/d/f.bin"].mtime_us == T0
    assert entries[f"{b}/ln"].kind == "symlink" and entries[f"{b}/ln"].target == "d/f.bin"
    assert entries[f"{b}/empty"].kind == "dir" and entries[f"{b}/empty"].mode == 0o700
    # a directory's entry comes after everything inside it; the base item last of all
    order = [i.path for i in items if isinstance(i, EntryItem)]
    assert order.index(f"{b}/d") > order.index(f"{b}/d/f.bin") and order[-1] == b
    assert (rep.top / b / "d" / "f.bin").read_bytes() == (jdir / b / "d" / "f.bin").read_bytes()
    assert records_of(rep.top) == records_of(jdir)
    j.close()


def test_a_base_the_replica_has_is_not_shipped_again(fast_tmp):
    j, jdir = make(fast_tmp)
    (fast_tmp / "root" / "x").write_bytes(b"x" * 5000)
    j.take_base()
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir) as feed:
        ship(feed, rep)
        again = list(feed.plan(rep.wire_position()))
    assert not any(isinstance(i, (BaseItem, EntryItem)) for i in again)
    j.close()


def build_days(j: Journal, days: int) -> None:
    j.append_write("seed", 0, b"seed" * 100, ts=T0 - 1)
    for day in range(days):
        for hour in range(0, 24, 3):
            t = T0 + day * D + hour * H
            j.append_write("a.bin", (day * 7 + hour) * 100 % 3000, bytes([day, hour]) * 150, ts=t)
            j.append_write(f"d{day % 3}.txt", hour * 10, f"day {day} hour {hour}\n".encode(), ts=t + 1)
            j.append_flush(ts=t + 2)


@pytest.mark.parametrize("behind", [False, True])
def test_a_prune_on_the_source_reaches_the_replica(fast_tmp, behind):
    j, jdir = make(fast_tmp)
    build_days(j, 10)
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir) as feed:
        items = list(feed.plan(None))
        if behind:  # the replica holds only the first segments when the prune happens
            cut = next(k for k, it in enumerate(items) if isinstance(it, SegmentItem) and it.seg == 4)
            items = items[:cut]
        for it in items:
            rep.apply(it)
        res = prune(j, Policy.parse("3d", keep_daily="30d"), now=T0 + 10 * D)
        assert res.segments_replaced
        j.append_write("after", 0, b"after prune")
        assert feed.poll()
        got = ship(feed, rep) if behind else follow(feed, rep)
        prunes = [i for i in got if isinstance(i, PruneItem)]
        assert len(prunes) == 1
        k = got.index(prunes[0])
        assert any(isinstance(i, SegmentItem) and i.replace for i in got[:k])
        same_segments(jdir, rep)
        assert records_of(rep.top) == records_of(jdir)
        # a reconnect afterwards finds nothing to do but journal.json
        again = ship(feed, rep)
        assert [type(i) for i in again] == [FileItem]
    j.close()


def test_a_prune_shipment_resumes_after_a_reconnect(fast_tmp):
    j, jdir = make(fast_tmp)
    build_days(j, 10)
    rep = Replica(fast_tmp / "rep")
    with Feed(jdir) as feed:
        ship(feed, rep)
        prune(j, Policy.parse("3d", keep_daily="30d"), now=T0 + 10 * D)
        items = list(feed.items())
        runs = [k for k, it in enumerate(items) if isinstance(it, RunItem)]
        cut = runs[len(runs) // 2]  # the connection drops half way through the new segments
        assert not any(isinstance(it, PruneItem) for it in items[:cut])
        for it in items[:cut]:
            rep.apply(it)
        assert rep.incoming
        wire = rep.wire_position()
        assert len({e[0] for e in wire["segments"]}) < len(wire["segments"])  # twins listed
        again = ship(feed, rep, wire)
        opened = [it.seg for it in again if isinstance(it, SegmentItem) and it.replace]
        resumed = [n for n, v in rep.incoming.items()]
        assert not (set(opened) & {n for n, v in Position.parse(wire).twins.items()
                                    if v[0] == struct.unpack_from("<I", (jdir / "segments" / segment_name(n)).read_bytes(), 60)[0]})
        assert any(isinstance(it, PruneItem) for it in again) and not resumed
        same_segments(jdir, rep)
        assert records_of(rep.top) == records_of(jdir)
    j.close()


def test_nothing_ships_while_a_prune_swaps_segments(fast_tmp):
    j, jdir = make(fast_tmp)
    j.append_write("a", 0, b"a")
    (jdir / "prune.json").write_text("{}")
    with Feed(jdir) as feed:
        assert list(feed.plan(None)) == []
        (jdir / "prune.json").unlink()
        assert feed.poll()
        assert any(isinstance(i, RunItem) for i in feed.items())
    j.close()


# ---- positions from the wire ----------------------------------------------------


@pytest.mark.parametrize("bad", [
    [], {"segments": "x"}, {"segments": [[1, 2, 3]]}, {"segments": [[1, 2, 3, "no"]]},
    {"segments": [[0, 1, 64, False]]}, {"segments": [[1, 2**32, 64, False]]},
    {"segments": [[1, 1, 10, False]]}, {"segments": [[1, 1, 64, False], [1, 1, 80, False]]},
    {"files": []}, {"files": {"audit.log": -1}}, {"bases": "b"}, {"bases": [1]},
    {"segments": [[1, 5, 64, False], [1, 6, 64, False], [1, 7, 64, False]]},
])
def test_a_malformed_position_is_a_protocol_error(fast_tmp, bad):
    j, jdir = make(fast_tmp)
    with Feed(jdir) as feed, pytest.raises(ProtocolError, match="position"):
        list(feed.plan(bad))
    j.close()


def test_a_replica_ahead_of_the_source_or_off_a_boundary_is_refused(fast_tmp):
    j, jdir = make(fast_tmp, segment_size=1 << 20)
    for i in range(5):
        j.append_write("a", i, b"q" * 100)
    with Feed(jdir) as feed:
        crc = struct.unpack_from("<I", (jdir / "segments" / segment_name(1)).read_bytes(), 60)[0]
        size = (jdir / "segments" / segment_name(1)).stat().st_size
        with pytest.raises(VaultError, match="validated records end"):
            list(feed.plan({"segments": [[1, crc, size + 8, False]]}))
        with pytest.raises(VaultError, match="not a record boundary"):
            list(feed.plan({"segments": [[1, crc, 64 + 8, False]]}))
    j.close()


def test_a_replica_ahead_of_the_source_is_not_pruned(fast_tmp):
    j, jdir = make(fast_tmp, segment_size=1 << 20)
    j.append_write("a", 0, b"a")
    crc = struct.unpack_from("<I", (jdir / "segments" / segment_name(1)).read_bytes(), 60)[0]
    with Feed(jdir) as feed:
        with pytest.raises(VaultError, match="past the source"):
            list(feed.plan({"segments": [[1, crc, 64, True], [2, 5, 64, False]]}))
        with pytest.raises(VaultError, match="another header"):
            list(feed.plan({"segments": [[1, crc ^ 1, 64, False]]}))
    j.close()


# ---- a random history against the model ----------------------------------------


@settings(max_examples=scale(10, 100))
@given(st.lists(st.tuples(st.sampled_from(["write", "big", "bookmark", "pass", "reconnect", "lose"]),
                          st.integers(0, 2**16)), min_size=1, max_size=scale(25, 80)),
       st.sampled_from([4096, 6000, 1 << 20]))
def test_random_history_keeps_the_replica_a_prefix(ops, run_bytes):
    with scratch() as d:
        tmp = Path(d)
        j, jdir = make(tmp)
        rep = Replica(tmp / "rep")
        feed = Feed(jdir, run_bytes=run_bytes)
        try:
            ship(feed, rep)
            for op, n in ops:
                if op == "write":
                    j.append_write(f"f{n % 3}", n, n.to_bytes(4, "little") * (n % 200 + 1))
                elif op == "big":
                    j.append_write("big", 0, bytes([n % 256]) * (n % 9000 + 3000))
                elif op == "bookmark":
                    j.bookmark(f"b{n}")
                elif op == "pass":
                    follow(feed, rep)
                elif op == "reconnect":
                    ship(feed, rep)
                else:  # the replica lost (never made durable) the tail of its last segment
                    if rep.pos.segments:
                        last = max(rep.pos.segments)
                        crc, size, sealed = rep.pos.segments[last]
                        p = rep.seg_path(last)
                        data = p.read_bytes()
                        # cut back to a record boundary: the first record after the header
                        keep = 64
                        if size > 64:
                            ln = REC_HDR.unpack_from(data, 64)[1]
                            keep = 64 + REC_HDR.size + ((ln + 7) & ~7)
                        keep = min(keep, size)
                        p.write_bytes(data[:keep])
                        rep.pos.segments[last] = (crc, keep, False)
                    ship(feed, rep)
                # the replica is always a prefix of the source
                for p in (rep.top / "segments").glob("*.seg"):
                    src = (jdir / "segments" / p.name).read_bytes()
                    assert src.startswith(p.read_bytes())
            ship(feed, rep)
            same_segments(jdir, rep)
            assert records_of(rep.top) == records_of(jdir)
            assert feed.backlog(rep.wire_position())[0] == 0
        finally:
            feed.close()
            j.close()


# ---- base database files are cut at their pages ---------------------------------


def test_database_like_base_files_are_cut_at_pages(fast_tmp):
    from cdpcore import packing
    from cdpcore.crypto import chunk_id

    j, jdir = make(fast_tmp)
    root = fast_tmp / "root"
    db = os.urandom(4096 * 40)
    (root / "his.db").write_bytes(db)  # 40 pages: cut at pages
    (root / "img.dcm").write_bytes(os.urandom(70001))  # not whole pages: content-defined
    j.take_base()
    key = bytes(32)
    with Feed(jdir, run_bytes=4096 * 10 + 100) as feed:
        items = [i for i in feed.plan(None) if isinstance(i, FileItem) and i.path.startswith("base/")]
    dbi = [i for i in items if i.path.endswith("his.db")]
    assert {i.page for i in dbi} == {4096} and all(i.off % 4096 == 0 for i in dbi)
    assert {i.page for i in items if i.path.endswith("img.dcm")} == {0}
    ids: set[bytes] = set()
    for i in dbi:
        p = packing.pack(i.buf, key, records=False, page=i.page)
        ids.update(p.all_ids)
        assert packing.unpack(p.encode(), lambda _: None, key).data == i.buf
    # a page written again later (a rollback journal's copy) has the same id
    assert ids == {chunk_id(key, db[o:o + 4096]) for o in range(0, len(db), 4096)}
    j.close()


# ---- a live writer in another process ---------------------------------------------

WRITER = r"""
import os, sys
from cdpcore import Journal
j = Journal.open(sys.argv[1])
for i in range(int(sys.argv[2])):
    j.append_write(f"f{i % 4}", (i * 4096) % 65536, os.urandom(100 + (i * 37) % 5000))
    if i % 50 == 0:
        j.sync()
j.close()
"""


def test_following_a_journal_another_process_writes(fast_tmp):
    import subprocess
    import sys

    j, jdir = make(fast_tmp, segment_size=64 * 1024)
    j.close()
    n = scale(1500, 8000)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(jdir), str(n)])
    rep = Replica(fast_tmp / "rep")
    passes = 0
    with Feed(jdir, run_bytes=16384) as feed:
        ship(feed, rep)
        while proc.poll() is None:
            if feed.poll():
                follow(feed, rep)
                passes += 1
            # the replica is a prefix of the source at every moment
            for p in (rep.top / "segments").glob("*.seg"):
                with open(jdir / "segments" / p.name, "rb") as f:
                    assert f.read(p.stat().st_size) == p.read_bytes()
        assert proc.wait() == 0
        follow(feed, rep)
    same_segments(jdir, rep)
    assert records_of(rep.top) == records_of(jdir)
    assert passes > 1


def test_a_tail_torn_at_every_byte_ships_only_whole_records(fast_tmp):
    """Cut the last segment at every byte of its last two records (a crash
    mid-append, no head to believe): the feed ships exactly the records
    that end before the cut."""
    j, jdir = make(fast_tmp, segment_size=1 << 20)
    for i in range(3):
        j.append_write("a", i, bytes([i]) * 60)
    j.close()
    (jdir / HEAD_NAME).unlink()
    seg = jdir / "segments" / segment_name(1)
    full = seg.read_bytes()
    ends = [64]
    while ends[-1] < len(full):
        ends.append(ends[-1] + REC_HDR.size + ((REC_HDR.unpack_from(full, ends[-1])[1] + 7) & ~7))
    step = 1 if scale(0, 1) else 3
    for cut in range(ends[-3], len(full), step):
        seg.write_bytes(full[:cut])
        with Feed(jdir) as feed:
            got = b"".join(i.buf for i in feed.plan(None) if isinstance(i, RunItem))
        want_end = max(e for e in ends if e <= cut)
        assert got == full[64:want_end], cut

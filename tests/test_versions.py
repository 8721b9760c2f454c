"""versions.Versions: the sender's map from a written range to its previous
version's chunk, for zstd-ref's base chunks. Runs of real records in real
segment and base files laid out as in a journal."""
from __future__ import annotations

import os
import random
from pathlib import Path

from cdpcore import packing
from cdpcore.codec import HISTORY, BaseAt
from cdpcore.format import BASE_DIR, SEGMENT_DIR, Kind, encode_record, segment_name
from cdpcore.versions import Versions, _alike

KEY = bytes(range(32))


class Sender:
    """Appends runs to segment 1 of a journal directory and asks Versions
    for each run's bases, as the shipper does (new: the chunks the body
    carries as bytes; usable: the vault holds them)."""

    def __init__(self, top: Path) -> None:
        self.journal = top / "j"
        (self.journal / SEGMENT_DIR).mkdir(parents=True)
        self.seg = self.journal / SEGMENT_DIR / segment_name(1)
        self.seg.write_bytes(b"")
        self.complete: set[str] = set()  # the bases the vault holds complete
        self.v = Versions(str(self.journal), self.newest_complete)
        self.seq = 1
        self.held: set[bytes] = set()

    def newest_complete(self) -> str | None:
        """The shipper's rule: the newest base, if the vault holds it complete."""
        top = self.journal / BASE_DIR
        names = sorted(p.name for p in top.iterdir()) if top.is_dir() else []
        return names[-1] if names and names[-1] in self.complete else None

    def run(self, writes: list[tuple[int, int, bytes]], kind: int = Kind.WRITE,
            usable: bool = True) -> list[tuple[bytes, bytes]]:
        buf = b""
        for fid, off, data in writes:
            buf += encode_record(kind, self.seq, 1000 + self.seq, fid, off, data)
            self.seq += 1
        at = self.seg.stat().st_size
        with open(self.seg, "ab") as f:
            f.write(buf)
        pk = packing.pack(buf, KEY, known=self.held.__contains__)
        new = set(pk.new_ids(self.held))
        out = self.v.bases(1, at, buf, pk, new, self.held.__contains__ if usable else (lambda c: False))
        self.held.update(pk.all_ids)
        return out

    def filler(self, nbytes: int = HISTORY + (64 << 10)) -> None:
        """Other pages, enough to take earlier ones out of zstd's reach."""
        rng = random.Random(nbytes)
        for k in range(nbytes // (32 << 10) + 1):
            self.run([(99, (k * 8 + i) * 4096, rng.randbytes(4096)) for i in range(8)])


def edited(page: bytes, k: int) -> bytes:
    return page[:64 * k] + b"<row%03d>" % k + page[64 * k + 8:]


def cid(data: bytes) -> bytes:
    return packing.pack(encode_record(Kind.WRITE, 1, 1, 1, 0, data), KEY).all_ids[0]


def test_a_page_out_of_reach_gets_its_previous_version(fast_tmp: Path) -> None:
    s = Sender(fast_tmp)
    page = os.urandom(8192)
    assert s.run([(7, 8192, page)]) == []  # nothing known before
    near = edited(page, 1)
    assert s.run([(7, 8192, near)]) == []  # the previous version is within zstd's reach
    s.filler()
    far = edited(near, 2)
    assert s.run([(7, 8192, far)]) == [(cid(near), near)]  # read back from the segment
    s.filler()
    assert s.run([(7, 8192, edited(far, 3))], usable=False) == []  # the vault may not hold it
    s.filler()
    assert s.run([(7, 8192, os.urandom(8192))]) == []  # not alike: another page, no use
    s.filler()
    # another range, another length, another file: no base
    assert s.run([(7, 0, edited(page, 4)), (8, 8192, edited(page, 5)), (7, 8192, os.urandom(4096))]) == []
    s.v.close()


def test_a_page_the_body_carries_twice_or_already_references_gets_no_base(fast_tmp: Path) -> None:
    s = Sender(fast_tmp)
    page = os.urandom(4096)
    s.run([(7, 0, page)])
    s.filler()
    # the old version is also copied in this run (a rollback journal): it is
    # a reference already, so it is not a base as well
    assert s.run([(5, 0, page), (7, 0, edited(page, 1))]) == []
    s.v.close()


def test_a_range_first_written_after_the_base_gets_the_base_files_bytes_by_place(fast_tmp: Path) -> None:
    """A range not written since the sender started: its bytes in the
    journal's newest base, named by place, once the vault holds that base
    complete (and only then: it reads them from its replica)."""
    s = Sender(fast_tmp)
    base = s.journal / BASE_DIR / "0000000000000002" / "data"
    base.mkdir(parents=True)
    (s.journal / BASE_DIR / "0000000000000001").mkdir()  # an older base
    db = os.urandom(64 << 10)
    (base / "db").write_bytes(db)
    s.run([(9, 0, b"data/db"), (10, 0, b"data/none")], kind=Kind.FILEMAP)
    new = edited(db[8192:16384], 1)
    assert s.run([(9, 8192, new)]) == []  # the vault does not hold that base yet
    s.complete.update({"0000000000000001", "0000000000000002"})
    s.filler()
    want = (BaseAt("base/0000000000000002/data/db", 8192, 8192), db[8192:16384])
    assert s.run([(9, 16384, edited(db[16384:24576], 1))]) == [
        (BaseAt("base/0000000000000002/data/db", 16384, 8192), db[16384:24576])]
    assert s.run([(9, 100, edited(db[100:4196], 1))]) == [(BaseAt("base/0000000000000002/data/db", 100, 4096),
                                                           db[100:4196])]  # any place, not only pages
    assert s.run([(10, 0, os.urandom(4096))]) == []  # not in the base
    assert s.run([(9, 65536 - 100, os.urandom(512))]) == []  # past the file's end
    assert want[1] != new and s.run([(9, 8192, os.urandom(8192))]) == []  # in the map now, not alike
    s.v.close()


def test_a_file_whose_base_bytes_never_match_is_seldom_tried(fast_tmp: Path) -> None:
    """A WAL file recycled in the base holds other bytes at every offset:
    after MIN_TRIES misses the sender reads it for one write in
    PROBE_EVERY only."""
    from cdpcore.versions import MIN_TRIES, PROBE_EVERY
    s = Sender(fast_tmp)
    wal = s.journal / BASE_DIR / "0000000000000001" / "wal"
    wal.mkdir(parents=True)
    (wal / "seg").write_bytes(os.urandom(1 << 20))
    s.complete.add("0000000000000001")
    s.run([(3, 0, b"wal/seg")], kind=Kind.FILEMAP)
    reads = []
    read = s.v._read
    s.v._read = lambda *a: reads.append(a) or read(*a)  # type: ignore[method-assign]
    n = MIN_TRIES + 3 * PROBE_EVERY
    for k in range(n):
        assert s.run([(3, k * 8192, os.urandom(8192))]) == []
    assert len(reads) == MIN_TRIES + 3
    s.v.close()


def test_alike_is_about_equal_bytes_at_the_same_offsets() -> None:
    page = os.urandom(8192)
    assert _alike(edited(page, 3), 0, page)
    assert not _alike(os.urandom(8192), 0, page)
    assert not _alike(page[:4096], 0, page)
    assert not _alike(page[1:] + page[:1], 0, page)  # shifted: other bytes at each offset

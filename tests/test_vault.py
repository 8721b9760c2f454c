"""The vault: replicas built from real journals shipped in random pieces with
resends, duplicates and reopens equal the source byte for byte and restore
the same trees; torn tails, bad frames, uuid and name checks, domain dedupe,
the prune swap under a crash at every step, and encrypted sources."""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import scale, scratch
from cdpcore._native import fill_crcs
from cdpcore import Journal, Policy, crypto, packing, prune, restore
from cdpcore.errors import KeyFileError, PointError, ProtocolError, VaultError
from cdpcore.format import SEG_HDR_SIZE, parse_segment_name
from cdpcore.vault import Vault
from cdpcore.vault import replica as replica_mod
from cdpcore.vault.replica import Replica

UUID_B = bytes(16)


# ---- a sender, as simple as possible (feed.py is the real one) -----------------------

def record_ends(seg: bytes) -> list[int]:
    """End offsets of the records of a segment file's bytes."""
    ends = []
    pos = SEG_HDR_SIZE
    while pos < len(seg):
        n = int.from_bytes(seg[pos + 4:pos + 8], "little")
        pos += (48 + n + 7) & ~7
        ends.append(pos)
    return ends


def source_segments(jdir: Path) -> dict[int, bytes]:
    out = {}
    for name in os.listdir(jdir / "segments"):
        n = parse_segment_name(name)
        if n is not None:
            out[n] = (jdir / "segments" / name).read_bytes()
    return dict(sorted(out.items()))


class Sender:
    """Ships a journal directory to a replica from its position, in random
    pieces, with random resends and duplicate frames."""

    def __init__(self, jdir: Path, rnd: random.Random, keys: crypto.Keys | None = None):
        self.jdir, self.rnd, self.keys = jdir, rnd, keys
        self.sent: list[tuple] = []  # frames applied, for duplicate resends

    def apply(self, rep: Replica, target, off: int, data: bytes, records: bool = True, replace=False) -> None:
        known = rep.index.has if self.keys is None else None
        p = packing.pack(data, rep.dedupe_key or b"", known, self.keys, records=records, level=1)
        held = {i for i in p.ids if rep.index.has(i)} if self.rnd.random() < 0.7 else set()
        body = p.encode(held)
        missing = rep.apply_data(target, off, off + len(data), body)
        if missing:
            assert rep.apply_data(target, off, off + len(data), p.encode(held, resend=set(missing))) == []
        self.sent.append((target, off, off + len(data), body))
        if self.rnd.random() < 0.2:  # a duplicate of an earlier frame: changes nothing
            t, o, e, b = self.rnd.choice(self.sent)
            missing = rep.apply_data(t, o, e, b)  # never an error: the same bytes again
            assert isinstance(missing, list)  # [] or NEED (a chunk not committed before a reopen)
        if self.rnd.random() < 0.3:
            rep.sync()

    def ship(self, rep: Replica, reopen=None) -> Replica:
        pos = rep.position()
        have = {s[0]: (s[1], s[2]) for s in pos["segments"]}
        for seg, data in source_segments(self.jdir).items():
            crc = int.from_bytes(data[60:64], "little")
            if seg in have and have[seg][0] == crc:
                start = have[seg][1]
            else:
                # a segment the vault holds with another header was replaced by a prune
                rep.begin_segment(seg, data[:SEG_HDR_SIZE], replace=seg in have)
                if seg in have:
                    self.sent = [f for f in self.sent if f[0] != seg]  # old frames of a replaced segment
                start = SEG_HDR_SIZE
            ends = [e for e in record_ends(data) if e > start]
            while ends:
                k = self.rnd.randint(1, min(len(ends), 6))
                end = ends[k - 1]
                self.apply(rep, seg, start, data[start:end])
                start, ends = end, ends[k:]
                if reopen is not None and self.rnd.random() < 0.1:
                    rep = reopen(rep)
                    start = {s[0]: s[2] for s in rep.position()["segments"]}[seg]
                    ends = [e for e in record_ends(data) if e > start]
        rep.sync()
        for seg, data in list(source_segments(self.jdir).items())[:-1]:
            if not (seg in have and have[seg][0] != int.from_bytes(data[60:64], "little")):
                rep.seal(seg, len(data))  # (a replacement is sealed after the prune swap)
        self.ship_files(rep)
        return rep

    def ship_files(self, rep: Replica) -> None:
        files = rep.position()["files"]
        meta = (self.jdir / "journal.json").read_bytes()
        self.apply(rep, "journal.json", 0, meta, records=False)
        audit = self.jdir / "audit.log"
        if audit.exists():
            data = audit.read_bytes()
            have = files.get("audit.log", 0)
            if len(data) > have:
                self.apply(rep, "audit.log", have, data[have:], records=False)
        done = set(rep.position()["bases"])
        base = self.jdir / "base"
        for name in sorted(os.listdir(base)) if base.exists() else []:
            if name in done:
                continue
            for top, dnames, fnames in os.walk(base / name):
                for d in sorted(dnames) + sorted(fnames):
                    full = Path(top) / d
                    rel = "base/" + str(full.relative_to(self.jdir)).split("/", 1)[1]
                    st = full.lstat()
                    if full.is_symlink():
                        rep.file_entry(rel, 0, st.st_mode, st.st_mtime_ns // 1000, "symlink", os.readlink(full))
                    elif full.is_dir():
                        rep.file_entry(rel, 0, st.st_mode, st.st_mtime_ns // 1000, "dir")
                    else:
                        data = full.read_bytes()
                        if data:
                            self.apply(rep, rel, 0, data, records=False)
                        rep.file_entry(rel, len(data), st.st_mode, st.st_mtime_ns // 1000, "file")
            # directory mtimes change as entries are made in them: set them again last
            for top, dnames, _f in os.walk(base / name):
                for d in dnames:
                    full = Path(top) / d
                    if not full.is_symlink():
                        rel = "base/" + str(full.relative_to(self.jdir)).split("/", 1)[1]
                        rep.file_entry(rel, 0, full.lstat().st_mode, full.lstat().st_mtime_ns // 1000, "dir")
            rep.base_complete(name)
        rep.sync()


# ---- source journals ---------------------------------------------------------------------

def build_source(tmp: Path, rnd: random.Random, n: int, segment_size: int = 8192,
                 marker: bytes = b"") -> Path:
    root = tmp / "root"
    root.mkdir()
    (root / "seed.txt").write_bytes(b"seed " * 300 + marker)
    (root / "sub").mkdir()
    (root / "sub" / "pic.dcm").write_bytes(rnd.randbytes(20_000))
    os.symlink("seed.txt", root / "link")
    jdir = tmp / "src"
    j = Journal.create(jdir, root, segment_size=segment_size)
    pages = [rnd.randbytes(4096) for _ in range(4)]
    t = 1_700_000_000_000_000
    for i in range(n):
        t += rnd.randint(1, 1000)
        r = rnd.random()
        if r < 0.4:
            j.append_write("db.sqlite", rnd.randrange(64) * 4096, rnd.choice(pages), ts=t)
        elif r < 0.6:
            j.append_write(f"f{i % 5}.txt", rnd.randrange(1000), rnd.randbytes(rnd.randrange(1, 600)) + marker, ts=t)
        elif r < 0.65:
            j.append_write("big.bin", 0, rnd.randbytes(rnd.randrange(65_000, 150_000)), ts=t)
        elif r < 0.75:
            j.append_flush(ts=t)
        elif r < 0.8:
            j.append_truncate(f"f{i % 5}.txt", rnd.randrange(100), ts=t)
        elif r < 0.85:
            j.bookmark(f"b{i}", ts=t)
        else:
            j.append_write("db.sqlite", rnd.randrange(64) * 4096, rnd.randbytes(4096), ts=t)
    j.sync()
    j.close()
    return jdir


def tree(top: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dnames, fnames in os.walk(top):
        for nm in dnames + fnames:
            full = Path(dirpath) / nm
            rel = str(full.relative_to(top))
            st = full.lstat()
            if full.is_symlink():
                out[rel] = ("l", os.readlink(full))
            elif full.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = ("f", full.read_bytes(), st.st_mode & 0o7777, st.st_mtime_ns // 1000)
    return out


def same_restores(src: Path, replica: Path, tmp: Path, rnd: random.Random, points: int = 3) -> None:
    with Journal.open(src, readonly=True) as j:
        first, last = j.first_seq, j.last_seq
    for i, at in enumerate(["latest"] + [f"seq:{rnd.randint(first, last)}" for _ in range(points)]):
        a, b = tmp / f"ra{i}", tmp / f"rb{i}"
        try:
            restore(str(src), a, at=at, audit=False)
        except PointError:
            with pytest.raises(PointError):  # a pruned seq: refused alike
                restore(str(replica), b, at=at, audit=False)
            continue
        restore(str(replica), b, at=at, audit=False)
        assert tree(a) == tree(b), at


def same_files(src: Path, dst: Path) -> None:
    assert source_segments(src) == source_segments(dst)
    assert (src / "journal.json").read_bytes() == (dst / "journal.json").read_bytes()
    assert tree(src / "base") == tree(dst / "base")


def uuid_of(jdir: Path) -> bytes:
    return bytes.fromhex(json.loads((jdir / "journal.json").read_text())["uuid"].replace("-", ""))


# ---- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(scale(3, 12)))
def test_ship_in_random_pieces_with_resends_and_reopens(fast_tmp, seed):
    rnd = random.Random(seed)
    src = build_source(fast_tmp, rnd, scale(150, 800))
    vault = Vault(fast_tmp / "vault", create=True)
    uid = uuid_of(src)

    def reopen(rep: Replica) -> Replica:
        if rnd.random() < 0.5:
            rep.sync()
        rep.close()
        return vault.open_source("hosp-1", uid, False)

    rep = vault.open_source("hosp-1", uid, False)
    rep = Sender(src, rnd).ship(rep, reopen)
    # a second full pass from the position changes nothing
    rep = Sender(src, rnd).ship(reopen(rep))
    rep.close()
    rdir = fast_tmp / "vault" / "hosp-1" / "journal"
    same_files(src, rdir)
    same_restores(src, fast_tmp / "vault" / "hosp-1", fast_tmp, rnd)
    with Journal.open(fast_tmp / "vault" / "hosp-1", readonly=True) as j:
        assert j.verify().ok
    # the position after reopening is the durable truth: every segment, sealed but the last
    pos = vault.open_source("hosp-1", uid, False).position()
    segs = source_segments(src)
    assert [s[0] for s in pos["segments"]] == list(segs)
    assert [s[2] for s in pos["segments"]] == [len(b) for b in segs.values()]
    assert [s[3] for s in pos["segments"]] == [True] * (len(segs) - 1) + [False]
    assert pos["files"]["journal.json"] == len((src / "journal.json").read_bytes())
    assert pos["bases"] == sorted(os.listdir(src / "base"))


def test_dedupe_sends_references(fast_tmp):
    """A page the vault already holds (written again under another header)
    crosses as a 32-byte reference and is read back from the replica."""
    rnd = random.Random(5)
    src = build_source(fast_tmp, rnd, 120, segment_size=1 << 20)
    vault = Vault(fast_tmp / "v", create=True)
    rep = Sender(src, rnd).ship(vault.open_source("a", uuid_of(src), False))
    assert rep.index.count() > 0
    seg = (src / "segments" / "0000000000000001.seg").read_bytes()
    ends = record_ends(seg)
    pages = [seg[e - 4096:e] for e in ends if int.from_bytes(seg[e - 4096 - 44:e - 4096 - 40], "little") == 4096]
    assert pages
    with Journal.open(src) as j:
        j.append_write("copy.bin", 0, pages[0])
        j.sync()
    seg2 = (src / "segments" / "0000000000000001.seg").read_bytes()
    p = packing.pack(seg2[len(seg):], rep.dedupe_key, rep.index.has)
    body = p.encode()
    assert p.ids == [] and len(body) < 200
    assert rep.apply_data(1, len(seg), len(seg2), body) == []
    rep.sync()
    assert (fast_tmp / "v" / "a" / "journal" / "segments" / "0000000000000001.seg").read_bytes() == seg2


def test_torn_tail_is_cut_at_open(fast_tmp):
    rnd = random.Random(2)
    src = build_source(fast_tmp, rnd, 60, segment_size=1 << 20)
    vault = Vault(fast_tmp / "v", create=True)
    rep = Sender(src, rnd).ship(vault.open_source("s", uuid_of(src), False))
    rep.close()
    seg = fast_tmp / "v" / "s" / "journal" / "segments" / "0000000000000001.seg"
    data = seg.read_bytes()
    ends = record_ends(data)
    # a crash mid-record: the file holds half of the last record
    with open(seg, "r+b") as f:
        f.truncate(ends[-2] + 20)
    rep = vault.open_source("s", uuid_of(src), False)
    assert any("torn tail" in r for r in rep.recovery)
    assert rep.position()["segments"][0][2] == ends[-2]
    assert seg.stat().st_size == ends[-2]
    # garbage past the last record (not zeros) is cut too, and a resend completes it
    rep.close()
    with open(seg, "ab") as f:
        f.write(os.urandom(100))
    rep = vault.open_source("s", uuid_of(src), False)
    Sender(src, rnd).ship(rep)
    assert seg.read_bytes() == data


def fresh(fast_tmp: Path, n: int = 40) -> tuple[Path, Vault, Replica, bytes]:
    rnd = random.Random(9)
    src = build_source(fast_tmp, rnd, n, segment_size=1 << 20)
    vault = Vault(fast_tmp / "v", create=True)
    rep = vault.open_source("s", uuid_of(src), False)
    data = source_segments(src)[1]
    rep.begin_segment(1, data[:64])
    return src, vault, rep, data


def test_bad_frames_write_nothing(fast_tmp):
    src, vault, rep, data = fresh(fast_tmp)
    ends = record_ends(data)
    key = rep.dedupe_key
    seg = fast_tmp / "v" / "s" / "journal" / "segments" / "0000000000000001.seg"

    def body(b: bytes) -> bytes:
        return packing.pack(b, key).encode()

    # a hole: starts past the end
    with pytest.raises(ProtocolError, match="hole"):
        rep.apply_data(1, ends[0], ends[1], body(data[ends[0]:ends[1]]))
    # out of order: the second record first is caught by the seq check (offset 64 is free)
    with pytest.raises(ProtocolError, match="sequence number"):
        rep.apply_data(1, 64, 64 + ends[1] - ends[0], body(data[ends[0]:ends[1]]))
    # a bad CRC
    bad = bytearray(data[64:ends[2]])
    bad[60] ^= 1
    with pytest.raises(ProtocolError, match="checksum"):
        rep.apply_data(1, 64, ends[2], packing.pack(bytes(bad), key).encode())
    # a torn record (not whole records)
    with pytest.raises(ValueError):
        body(data[64:ends[0] - 8])
    with pytest.raises(ProtocolError, match="truncated|not a record"):
        rep.apply_data(1, 64, ends[0] - 8, packing.pack(data[64:ends[0] - 8], key, records=False).encode())
    # wrong claimed seqs, wrong length, header range
    with pytest.raises(ProtocolError, match="last seq"):
        rep.apply_data(1, 64, ends[1], body(data[64:ends[1]]), last_seq=99)
    with pytest.raises(ProtocolError, match="unpacks to"):
        rep.apply_data(1, 64, ends[1] + 8, body(data[64:ends[1]]))
    with pytest.raises(ProtocolError, match="inside its header"):
        rep.apply_data(1, 0, ends[0], body(data[64:ends[0]]))
    with pytest.raises(ProtocolError, match="not begun"):
        rep.apply_data(2, 64, ends[0], body(data[64:ends[0]]))
    # records whose CRCs were left out (zstd-ref layout 2): zero CRCs and a digest
    zeroed = bytearray(data[64:ends[1]])
    for o in (0, ends[0] - 64):
        zeroed[o:o + 4] = bytes(4)
    digest = fill_crcs(bytearray(zeroed))
    with pytest.raises(ProtocolError, match="differ from what the sender checksummed"):
        rep.apply_data(1, 64, ends[1], body(bytes(zeroed)), crcs=digest ^ 1)
    flipped = bytearray(zeroed)
    flipped[100] ^= 1  # a payload byte changed on the way: the sender's CRCs no longer match
    with pytest.raises(ProtocolError, match="differ from what the sender checksummed"):
        rep.apply_data(1, 64, ends[1], packing.pack(bytes(flipped), key, records=False).encode(), crcs=digest)
    with pytest.raises(ProtocolError, match="not a segment"):
        rep.apply_data("journal.json", 0, 3, packing.pack(b"abc", key, records=False).encode(), crcs=0)
    for bad_target in ["../x", "/etc/passwd", "base/../../x", "base/a", "segments/x", "base/n/./x", "", 3.5]:
        with pytest.raises(ProtocolError):
            rep.apply_data(bad_target, 0, 3, packing.pack(b"abc", key, records=False).encode())
    assert rep.position()["files"] == {}  # refused frames leave no trace
    rep.sync()
    assert seg.read_bytes() == data[:64]
    # now the right frame goes in (here without its CRCs, rebuilt by the vault),
    # and a resend with other bytes is refused
    assert rep.apply_data(1, 64, ends[1], body(bytes(zeroed)), crcs=digest) == []
    other = bytearray(data[64:ends[1]])
    other[100] ^= 1
    with pytest.raises(ProtocolError, match="differ"):
        rep.apply_data(1, 64, ends[1], packing.pack(bytes(other), key, records=False).encode())
    assert rep.apply_data(1, 64, ends[1], body(data[64:ends[1]])) == []
    # an overlapping frame appends only its new part
    rep.apply_data(1, ends[0], ends[2], body(data[ends[0]:ends[2]]))
    rep.sync()
    assert seg.read_bytes() == data[:ends[2]]


def test_segment_headers_checked(fast_tmp):
    src, vault, rep, data = fresh(fast_tmp)
    hdr = bytearray(data[:64])
    hdr[20] ^= 1
    with pytest.raises(ProtocolError, match="checksum"):
        rep.begin_segment(2, bytes(hdr))
    with pytest.raises(ProtocolError, match="names segment"):
        rep.begin_segment(2, data[:64])
    from cdpcore.format import encode_segment_header
    with pytest.raises(ProtocolError, match="another journal"):
        rep.begin_segment(2, encode_segment_header(b"x" * 16, 2, 5, 0))
    with pytest.raises(ProtocolError, match="out of order"):
        rep.begin_segment(3, encode_segment_header(rep.uuid, 3, 5, 0))
    with pytest.raises(ProtocolError, match="another header"):
        rep.begin_segment(1, encode_segment_header(rep.uuid, 1, 5, 0))
    rep.begin_segment(1, data[:64])  # same header: a resend


def test_uuid_binding_and_names(fast_tmp):
    vault = Vault(fast_tmp / "v", create=True)
    vault.open_source("a", b"1" * 16, False).close()
    with pytest.raises(VaultError, match="bound to journal"):
        vault.open_source("a", b"2" * 16, False)
    with pytest.raises(VaultError, match="encryption"):
        vault.open_source("a", b"1" * 16, True)
    for bad in ["../x", "a/b", "", "x" * 65, ".", "..", "a b", "é"]:
        with pytest.raises(VaultError, match="not valid"):
            vault.open_source(bad, b"1" * 16, False)
    # the binding is on disk: another Vault object refuses too
    with pytest.raises(VaultError, match="bound to journal"):
        Vault(fast_tmp / "v").open_source("a", b"3" * 16, False)
    assert Vault(fast_tmp / "v").sources() == ["a"]
    with pytest.raises(VaultError, match="not a vault"):
        Vault(fast_tmp / "nothing")
    (fast_tmp / "full").mkdir()
    (fast_tmp / "full" / "x").write_text("x")
    with pytest.raises(VaultError, match="neither a vault"):
        Vault(fast_tmp / "full", create=True)
    with pytest.raises(VaultError, match="not in dedupe domain"):
        vault.open_source("b", b"1" * 16, False, domain="pacs")
    # one writer per replica
    first = vault.open_source("a", b"1" * 16, False)
    with pytest.raises(VaultError, match="already being written"):
        Vault(fast_tmp / "v").open_source("a", b"1" * 16, False)
    first.close()
    vault.open_source("a", b"1" * 16, False).close()


def test_domain_dedupe_across_two_sources(fast_tmp):
    vault = Vault(fast_tmp / "v", create=True, domains={"pacs": ["a", "b"]})
    shared = os.urandom(30_000)
    bodies = {}
    for name in ["a", "b"]:
        (fast_tmp / name).mkdir()
        root = fast_tmp / name / "root"
        root.mkdir()
        j = Journal.create(fast_tmp / name / "j", root)
        j.append_write("img.dcm", 0, shared)
        j.append_write("other", 0, os.urandom(1000))
        j.sync()
        j.close()
        jdir = fast_tmp / name / "j"
        rep = vault.open_source(name, uuid_of(jdir), False, domain="pacs")
        data = source_segments(jdir)[1]
        rep.begin_segment(1, data[:64])
        p = packing.pack(data[64:], rep.dedupe_key, rep.index.has)
        bodies[name] = p.encode()
        assert rep.apply_data(1, 64, len(data), bodies[name]) == []
        rep.sync()
        assert (fast_tmp / "v" / name / "journal" / "segments" / "0000000000000001.seg").read_bytes() == data
        rep.close()
    assert len(bodies["b"]) < len(bodies["a"]) - 25_000  # b referenced a's copy
    # a source outside the domain has another key: its ids say nothing about a's chunks
    c = vault.open_source("c", b"c" * 16, False)
    assert c.dedupe_key != vault.open_source("a", uuid_of(fast_tmp / "a" / "j"), False, domain="pacs").dedupe_key
    assert not c.index.has(crypto.chunk_id(c.dedupe_key, shared[:4096]))


def test_references_to_lost_chunks_come_back_as_missing(fast_tmp):
    src, vault, rep, data = fresh(fast_tmp)
    p = packing.pack(data[64:], rep.dedupe_key)
    missing = rep.apply_data(1, 64, len(data), p.encode(set(p.ids)))
    assert set(missing) == set(p.ids) and missing
    assert rep.position()["segments"][0][2] == 0
    assert rep.apply_data(1, 64, len(data), p.encode(set(p.ids), resend=set(missing))) == []
    rep.sync()
    # a chunk index entry whose bytes changed on disk is not trusted
    cid = p.ids[0]
    source, key, off, n = rep.index.lookup(cid)
    assert rep.resolve(cid) is not None
    path = fast_tmp / "v" / "s" / "journal" / key
    raw = bytearray(path.read_bytes())
    raw[off] ^= 1
    path.write_bytes(bytes(raw))
    assert rep.resolve(cid) is None


def prune_source(tmp: Path, rnd: random.Random) -> tuple[Path, Path]:
    """A source journal over twelve days (the prune tests' journal)."""
    from test_prune import build

    root = tmp / "root"
    root.mkdir()
    src = tmp / "src"
    build(src, root).close()
    return src, root


def ship_prune(src: Path, rep: Replica, rnd: random.Random) -> None:
    """After a prune on the source: replacements into .incoming (and what was
    appended meanwhile), new bases, then PRUNE with the source's live set."""
    Sender(src, rnd).ship(rep)
    segs = source_segments(src)
    bases = sorted(os.listdir(src / "base")) if (src / "base").exists() else []
    rep.prune([[s, int.from_bytes(d[60:64], "little"), len(d)] for s, d in segs.items()], bases)


def listdir(p: Path) -> list[str]:
    return sorted(os.listdir(p)) if p.exists() else []


def test_prune_swap(fast_tmp):
    from test_prune import NOW

    rnd = random.Random(3)
    src, _root = prune_source(fast_tmp, rnd)
    vault = Vault(fast_tmp / "v", create=True)
    rep = Sender(src, rnd).ship(vault.open_source("s", uuid_of(src), False))
    before = source_segments(src)
    prune(str(src), Policy.parse("2d", keep_daily="30d"), now=NOW)
    after = source_segments(src)
    assert after != before
    ship_prune(src, rep, rnd)
    Sender(src, rnd).ship(rep)  # anything the source appended after
    rep.close()
    same_files(src, fast_tmp / "v" / "s" / "journal")
    same_restores(src, fast_tmp / "v" / "s", fast_tmp, rnd, points=2)


def test_prune_drops_the_chunk_index_entries_of_removed_bases(fast_tmp):
    rnd = random.Random(5)
    src = build_source(fast_tmp, rnd, 30)
    vault = Vault(fast_tmp / "v", create=True)
    rep = Sender(src, rnd).ship(vault.open_source("s", uuid_of(src), False))
    (name,) = listdir(src / "base")

    def base_targets() -> set[str]:
        return {t for t in rep.index.targets("s") if t.startswith("base/")}

    assert base_targets(), "the base has no chunk in the index: the test proves nothing"
    segs = source_segments(src)
    # the source's live set names no base any more (a prune that dropped it)
    rep.prune([[sg, int.from_bytes(d[60:64], "little"), len(d)] for sg, d in segs.items()], [])
    rep.index.commit()
    assert not (fast_tmp / "v" / "s" / "journal" / "base" / name).exists()
    assert base_targets() == set()  # the index would otherwise only grow
    assert rep.index.targets("s")  # the segments' entries stay
    rep.close()


def test_prune_swap_crash_at_every_step(fast_tmp):
    from test_prune import NOW

    rnd = random.Random(4)
    src, _root = prune_source(fast_tmp, rnd)
    vault = Vault(fast_tmp / "v", create=True)
    Sender(src, rnd).ship(vault.open_source("s", uuid_of(src), False)).close()
    old_files = source_segments(fast_tmp / "v" / "s" / "journal")
    old_bases = listdir(fast_tmp / "v" / "s" / "journal" / "base")
    import shutil
    shutil.copytree(fast_tmp / "v", fast_tmp / "v0", symlinks=True)
    prune(str(src), Policy.parse("2d", keep_daily="30d"), now=NOW)
    new_files = source_segments(src)
    new_bases = listdir(src / "base")
    step = 0
    while True:
        step += 1
        shutil.rmtree(fast_tmp / "v")
        shutil.copytree(fast_tmp / "v0", fast_tmp / "v", symlinks=True)
        vault = Vault(fast_tmp / "v")
        rep = vault.open_source("s", uuid_of(src), False)
        calls = []

        def hook(what: str) -> None:
            calls.append(what)
            if len(calls) == step:
                raise OSError(f"injected crash at {what}")

        replica_mod.crash_hook = hook
        try:
            ship_prune(src, rep, rnd)
            crashed = False
        except OSError as e:
            assert "injected" in str(e)
            crashed = True
        finally:
            replica_mod.crash_hook = None
        rep.close()
        vault.close()
        if crashed and step > 1:  # the manifest is on disk: readers wait for the swap
            with pytest.raises(VaultError, match="swapping in a prune"):
                Journal.open(fast_tmp / "v" / "s", readonly=True)
        rep = Vault(fast_tmp / "v").open_source("s", uuid_of(src), False)
        got = source_segments(fast_tmp / "v" / "s" / "journal")
        bases = listdir(fast_tmp / "v" / "s" / "journal" / "base")
        if step == 1 and crashed:
            # crash before the manifest: the old set (its last segment may have grown)
            assert {k: v[:64] for k, v in got.items()} == {k: v[:64] for k, v in old_files.items()}
            assert bases == old_bases
        else:
            assert (got, bases) == (new_files, new_bases), step  # manifest written: finished at open
        with Journal.open(fast_tmp / "v" / "s", readonly=True) as j:
            assert j.verify().ok
        rep.close()
        if not crashed:
            break
    assert step > 3


def test_status(fast_tmp):
    rnd = random.Random(1)
    src = build_source(fast_tmp, rnd, 30)
    vault = Vault(fast_tmp / "v", create=True)
    Sender(src, rnd).ship(vault.open_source("s", uuid_of(src), False)).close()
    st = vault.status()
    assert st["sources"]["s"]["segments"] == len(source_segments(src))
    assert st["sources"]["s"]["encrypted"] is False and st["sources"]["s"]["bytes"] > 0


def test_replica_opens_readonly_only(fast_tmp):
    rnd = random.Random(1)
    src = build_source(fast_tmp, rnd, 30)
    vault = Vault(fast_tmp / "v", create=True)
    Sender(src, rnd).ship(vault.open_source("s", uuid_of(src), False)).close()
    with pytest.raises(VaultError, match="read-only"):
        Journal.open(fast_tmp / "v" / "s")
    with Journal.open(fast_tmp / "v" / "s", readonly=True) as j:
        assert j.last_seq > 0
    # restore from the replica does not write into it (the replica's audit.log is the source's)
    before = source_segments(fast_tmp / "v" / "s" / "journal")
    restore(str(fast_tmp / "v" / "s"), fast_tmp / "out")
    assert source_segments(fast_tmp / "v" / "s" / "journal") == before
    assert json.loads((fast_tmp / "v" / "s" / "access.log").read_text())["action"] == "restore"
    assert not (fast_tmp / "v" / "s" / "journal" / "audit.log").exists() or \
        (fast_tmp / "v" / "s" / "journal" / "audit.log").read_bytes() == (src / "audit.log").read_bytes()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """cdpctl in-process (an interpreter per call would dominate the test's time)."""
    from cdpcore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main.main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_cli_on_a_replica(fast_tmp):
    rnd = random.Random(1)
    src = build_source(fast_tmp, rnd, 30)
    vault = Vault(fast_tmp / "v", create=True)
    Sender(src, rnd).ship(vault.open_source("s", uuid_of(src), False)).close()
    r = subprocess.run([sys.executable, "-m", "cdpcore.cli.main", "restore", str(fast_tmp / "v" / "s"),
                        str(fast_tmp / "out"), "--at", "latest"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = run_cli("points", str(fast_tmp / "v" / "s"))
    assert r.returncode == 0, r.stderr
    r = run_cli("verify", str(fast_tmp / "v" / "s"))
    assert r.returncode == 0, r.stderr + r.stdout


# ---- encrypted sources ---------------------------------------------------------------------

MARKER = b"PATIENT-ZHANG-SAN-0123456789"


def encrypted_replica(fast_tmp: Path, seed: int = 7, reopen_prob: bool = True):
    rnd = random.Random(seed)
    src = build_source(fast_tmp, rnd, scale(100, 500), marker=MARKER)
    keys = crypto.write_key_file(fast_tmp / "key")
    vault = Vault(fast_tmp / "v", create=True)
    uid = uuid_of(src)

    def reopen(rep: Replica) -> Replica:
        if rnd.random() < 0.5:
            rep.sync()
        rep.close()
        return vault.open_source("enc", uid, True)

    rep = Sender(src, rnd, keys).ship(vault.open_source("enc", uid, True), reopen if reopen_prob else None)
    rep = Sender(src, rnd, keys).ship(reopen(rep))  # a second pass changes nothing
    rep.close()
    return src, keys, vault, rnd


def all_bytes(top: Path) -> bytes:
    out = []
    for dirpath, _d, files in os.walk(top):
        for fn in files:
            out.append(Path(dirpath, fn).read_bytes())
            out.append(fn.encode())
    return b"".join(out)


def test_encrypted_source_round_trip(fast_tmp):
    from cdpcore.vault.sealed import materialize

    src, keys, vault, rnd = encrypted_replica(fast_tmp)
    vdir = fast_tmp / "v" / "enc"
    assert MARKER in all_bytes(src)
    assert MARKER not in all_bytes(fast_tmp / "v")
    assert b"seed seed" not in all_bytes(fast_tmp / "v")
    assert not (vdir / "journal").exists()
    out = materialize(vdir, keys, fast_tmp / "mat")
    same_files(src, Path(out))
    same_restores(src, Path(out), fast_tmp, rnd)
    # without the key: a clear error; with a wrong one: a clear error
    with pytest.raises(KeyFileError, match="encrypt-key"):
        Journal.open(vdir, readonly=True)
    with pytest.raises(KeyFileError, match="wrong key"):
        materialize(vdir, crypto.derive_keys(os.urandom(64)), fast_tmp / "mat2")
    # position of an encrypted replica: same shape, plaintext sizes
    pos = vault.open_source("enc", uuid_of(src), True).position()
    assert [s[2] for s in pos["segments"]] == [len(b) for b in source_segments(src).values()]


def test_encrypted_torn_recipe_and_pack(fast_tmp):
    from cdpcore.vault.sealed import materialize

    src, keys, vault, rnd = encrypted_replica(fast_tmp, seed=3, reopen_prob=False)
    vdir = fast_tmp / "v" / "enc"
    last = sorted((vdir / "sealed" / "recipes").glob("*.seg"))[-1]
    with open(last, "r+b") as f:  # a torn recipe entry
        f.truncate(last.stat().st_size - 5)
    pack = sorted((vdir / "sealed" / "packs").glob("*.pack"))[-1]
    with open(pack, "ab") as f:  # a torn chunk at the end of a pack
        f.write(os.urandom(20))
    rep = vault.open_source("enc", uuid_of(src), True)
    assert any("torn tail" in r for r in rep.recovery)
    Sender(src, rnd, keys).ship(rep).close()
    same_files(src, Path(materialize(vdir, keys, fast_tmp / "m")))


def test_encrypted_damaged_chunk_is_an_error(fast_tmp):
    from cdpcore.vault.sealed import materialize

    src, keys, vault, rnd = encrypted_replica(fast_tmp, seed=4, reopen_prob=False)
    pack = sorted((fast_tmp / "v" / "enc" / "sealed" / "packs").glob("*.pack"))[0]
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 1
    pack.write_bytes(bytes(raw))
    with pytest.raises((KeyFileError, VaultError)):
        materialize(fast_tmp / "v" / "enc", keys, fast_tmp / "m")


def test_restore_cli_with_encrypt_key(fast_tmp):
    src, keys, vault, rnd = encrypted_replica(fast_tmp, seed=5, reopen_prob=False)
    vdir = fast_tmp / "v" / "enc"
    r = run_cli("restore", str(vdir), str(fast_tmp / "out"))
    assert r.returncode == 24 and "encrypt-key" in r.stderr and "Traceback" not in r.stderr
    (fast_tmp / "wrong").write_text(os.urandom(64).hex())
    r = run_cli("restore", str(vdir), str(fast_tmp / "out"), "--encrypt-key", str(fast_tmp / "wrong"))
    assert r.returncode == 24 and "wrong key" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("restore", str(vdir), str(fast_tmp / "out"), "--encrypt-key", str(fast_tmp / "key"))
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (vdir / "access.log").read_text().splitlines()]
    assert [e["action"] for e in log] == ["restore"] and log[0]["ok"]
    restore(str(src), fast_tmp / "want", audit=False)
    assert tree(fast_tmp / "out") == tree(fast_tmp / "want")
    assert not os.listdir(fast_tmp / "v" / "_tmp") if (fast_tmp / "v" / "_tmp").exists() else True


def test_verify_cli_with_encrypt_key(fast_tmp):
    src, keys, vault, rnd = encrypted_replica(fast_tmp, seed=6, reopen_prob=False)
    r = run_cli("verify", str(fast_tmp / "v" / "enc"), "--encrypt-key", str(fast_tmp / "key"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("points", str(fast_tmp / "v" / "enc"), "--encrypt-key", str(fast_tmp / "nokey"))
    assert r.returncode == 24 and "not found" in r.stderr


def test_base_paths_cannot_leave_the_replica(fast_tmp):
    src, vault, rep, data = fresh(fast_tmp)
    outside = fast_tmp / "outside"
    outside.mkdir()
    rep.file_entry("base/b1/link", 0, 0o777, 0, "symlink", str(outside))
    rep.file_entry("base/b1/up", 0, 0o777, 0, "symlink", "../../../..")
    body = packing.pack(b"evil", rep.dedupe_key, records=False).encode()
    for path in ["base/b1/link/evil", "base/b1/up/evil", "base/b1/../../x", "base/../x/y"]:
        with pytest.raises(ProtocolError):
            rep.apply_data(path, 0, 4, body)
    with pytest.raises(ProtocolError):
        rep.file_entry("base/b1/link/evil", 0, 0o755, 0, "dir")
    assert os.listdir(outside) == []
    # a regular file through a real directory is fine
    assert rep.apply_data("base/b1/d/ok", 0, 4, body) == []
    rep.file_entry("base/b1/d/ok", 4, 0o600, 1_000_000, "file")
    rep.base_complete("b1")
    got = fast_tmp / "v" / "s" / "journal" / "base" / "b1" / "d" / "ok"
    assert got.read_bytes() == b"evil" and got.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ProtocolError, match="already complete"):
        rep.apply_data("base/b1/d/more", 0, 4, body)


def test_sealed_segment_does_not_grow(fast_tmp):
    src, vault, rep, data = fresh(fast_tmp)
    ends = record_ends(data)
    rep.apply_data(1, 64, ends[0], packing.pack(data[64:ends[0]], rep.dedupe_key).encode())
    rep.seal(1, ends[0])
    with pytest.raises(ProtocolError, match="sealed size"):
        rep.apply_data(1, ends[0], ends[1], packing.pack(data[ends[0]:ends[1]], rep.dedupe_key).encode())
    with pytest.raises(ProtocolError, match="seal of segment"):
        rep.seal(1, ends[1])


def test_reader_sees_a_prefix_while_the_receiver_appends(fast_tmp):
    """Open the replica between frames (nothing synced): it reads as the
    source at the replica's last seq."""
    rnd = random.Random(11)
    src = build_source(fast_tmp, rnd, 80, segment_size=1 << 20)
    vault = Vault(fast_tmp / "v", create=True)
    rep = vault.open_source("s", uuid_of(src), False)
    Sender(src, rnd).ship_files(rep)  # journal.json and the base first
    data = source_segments(src)[1]
    rep.begin_segment(1, data[:64])
    ends = record_ends(data)
    start = 64
    for k, e in enumerate(ends[::15]):
        rep.apply_data(1, start, e, packing.pack(data[start:e], rep.dedupe_key).encode())
        start = e
        with Journal.open(fast_tmp / "v" / "s", readonly=True) as j:
            last = j.last_seq
        restore(str(src), fast_tmp / f"a{k}", at=f"seq:{last}", audit=False)
        restore(str(fast_tmp / "v" / "s"), fast_tmp / f"b{k}", audit=False)
        assert tree(fast_tmp / f"a{k}") == tree(fast_tmp / f"b{k}")


def test_encrypted_prune(fast_tmp):
    from test_prune import NOW

    from cdpcore.vault.sealed import materialize

    rnd = random.Random(12)
    src, _root = prune_source(fast_tmp, rnd)
    keys = crypto.write_key_file(fast_tmp / "key")
    vault = Vault(fast_tmp / "v", create=True)
    rep = Sender(src, rnd, keys).ship(vault.open_source("e", uuid_of(src), True))
    prune(str(src), Policy.parse("2d", keep_daily="30d"), now=NOW)
    Sender(src, rnd, keys).ship(rep)
    segs = source_segments(src)
    packs = fast_tmp / "v" / "e" / "sealed" / "packs"
    before = sum(p.stat().st_size for p in packs.iterdir())
    rep.prune([[s, int.from_bytes(d[60:64], "little"), len(d)] for s, d in segs.items()],
              listdir(src / "base"))
    assert rep.sealed_store.compact(threshold=1.0) > 0  # rewrite any pack with a dead chunk
    after = sum(p.stat().st_size for p in packs.iterdir())
    assert after < before * 0.8, (before, after)  # the pruned history's chunks are reclaimed
    rep.close()
    out = Path(materialize(fast_tmp / "v" / "e", keys, fast_tmp / "m"))
    same_files(src, out)
    same_restores(src, out, fast_tmp, rnd, points=2)


def test_crash_at_every_byte_of_a_frame(fast_tmp):
    """A crash mid-write leaves any prefix of a frame's bytes: reopening
    cuts back to the last whole record, and a resend completes the segment."""
    rnd = random.Random(13)
    (fast_tmp / "root").mkdir()
    src = fast_tmp / "src"
    with Journal.create(src, fast_tmp / "root") as j:
        for i in range(12):
            j.append_write("f", i * 50, rnd.randbytes(rnd.choice([20, 100, 700])))
        j.sync()
    data = source_segments(src)[1]
    ends = record_ends(data)
    vault = Vault(fast_tmp / "v", create=True)
    rep = vault.open_source("s", uuid_of(src), False)
    rep.begin_segment(1, data[:64])
    mid = ends[-4]
    rep.apply_data(1, 64, mid, packing.pack(data[64:mid], rep.dedupe_key).encode())
    rep.sync()
    rep.close()
    seg = fast_tmp / "v" / "s" / "journal" / "segments" / "0000000000000001.seg"
    step = 1 if scale(0, 1) else 5
    for cut in range(mid, len(data) + 1, step):
        seg.write_bytes(data[:cut])
        rep = vault.open_source("s", uuid_of(src), False)
        held = rep.position()["segments"][0][2]
        assert held == max([64] + [e for e in ends if e <= cut])
        rep.apply_data(1, held, len(data), packing.pack(data[held:], rep.dedupe_key).encode()) if held < len(data) else None
        rep.sync()
        rep.close()
        assert seg.read_bytes() == data


def test_encrypted_prune_crash_at_every_step(fast_tmp):
    from test_prune import NOW

    from cdpcore.vault.sealed import materialize

    rnd = random.Random(14)
    src, _root = prune_source(fast_tmp, rnd)
    keys = crypto.write_key_file(fast_tmp / "key")
    vault = Vault(fast_tmp / "v", create=True)
    rep = Sender(src, rnd, keys).ship(vault.open_source("e", uuid_of(src), True))
    rep.close()
    vault.close()
    old_headers = {k: v[:64] for k, v in source_segments(src).items()}
    import shutil
    shutil.copytree(fast_tmp / "v", fast_tmp / "v0")
    prune(str(src), Policy.parse("2d", keep_daily="30d"), now=NOW)
    new = source_segments(src)
    step = 0
    while True:
        step += 1
        shutil.rmtree(fast_tmp / "v")
        shutil.copytree(fast_tmp / "v0", fast_tmp / "v")
        rep = Vault(fast_tmp / "v").open_source("e", uuid_of(src), True)
        calls = []

        def hook(what: str) -> None:
            calls.append(what)
            if len(calls) == step:
                raise OSError("injected crash")

        Sender(src, rnd, keys).ship(rep)
        replica_mod.crash_hook = hook
        try:
            rep.prune([[s, int.from_bytes(d[60:64], "little"), len(d)] for s, d in new.items()],
                      listdir(src / "base"))
            crashed = False
        except OSError:
            crashed = True
        finally:
            replica_mod.crash_hook = None
        rep.close()
        Vault(fast_tmp / "v").open_source("e", uuid_of(src), True).close()  # finishes a manifest
        out = Path(materialize(fast_tmp / "v" / "e", keys, fast_tmp / f"m{step}"))
        got = source_segments(out)
        if step == 1 and crashed:
            assert {k: v[:64] for k, v in got.items()} == old_headers
        else:
            assert got == new, step
        if not crashed:
            break
    assert step > 2


_SOURCE: dict[str, object] = {}


def small_source() -> tuple[Path, bytes]:
    """One source segment for the property test, built once."""
    if not _SOURCE:
        d = scratch()
        _SOURCE["dir"] = d
        top = Path(d.name)
        (top / "root").mkdir()
        rnd = random.Random(21)
        with Journal.create(top / "src", top / "root") as j:
            page = rnd.randbytes(4096)
            for i in range(30):
                j.append_write("f", i, page if i % 3 == 0 else rnd.randbytes(rnd.choice([10, 600, 5000])))
            j.sync()
        _SOURCE["src"] = top / "src"
    src = _SOURCE["src"]
    return src, source_segments(src)[1]  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from(["ok", "flip", "held", "reopen"])),
                max_size=25))
def test_replica_is_always_a_prefix(ops):
    """Model: the replica's segment is always a prefix of the source's, of
    the size position() says, whatever frames arrive (any range, resends,
    corrupt bytes, references to chunks it may not hold, reopens)."""
    src, data = small_source()
    ends = [64] + record_ends(data)
    with scratch() as d:
        vault = Vault(Path(d) / "v", create=True)
        rep = vault.open_source("s", uuid_of(src), False)
        rep.begin_segment(1, data[:64])
        seg = Path(d) / "v" / "s" / "journal" / "segments" / "0000000000000001.seg"
        for a, b, how in ops:
            if how == "reopen":
                rep.close()
                rep = vault.open_source("s", uuid_of(src), False)
                continue
            lo, hi = sorted((ends[a % len(ends)], ends[b % len(ends)]))
            if lo == hi:
                continue
            chunk = bytearray(data[lo:hi])
            if how == "flip":
                chunk[len(chunk) // 2] ^= 0x10
            # (a flipped byte may break record framing, which pack() refuses: cut it as plain bytes)
            p = packing.pack(bytes(chunk), rep.dedupe_key, records=how != "flip")
            body = p.encode(set(p.ids) if how == "held" else set())
            try:
                rep.apply_data(1, lo, hi, body)
            except ProtocolError:
                pass
            rep.sync()
            size = rep.position()["segments"][0][2]
            assert size in ends
            assert seg.read_bytes() == data[:size]
        rep.close()
        vault.close()


def test_byte_streams_resume_from_their_durable_size(fast_tmp):
    """audit.log and base files: bytes written but never synced (never
    acknowledged) are cut at open; the sender resumes from position()."""
    src, vault, rep, data = fresh(fast_tmp)
    key = rep.dedupe_key
    log = b"".join(b'{"n":%d,"entry":"x"}\n' % i for i in range(200))
    pic = os.urandom(50_000)

    def body(b: bytes) -> bytes:
        return packing.pack(b, key, records=False).encode()

    rep.apply_data("audit.log", 0, 1000, body(log[:1000]))
    rep.apply_data("base/b1/pic.dcm", 0, 20_000, body(pic[:20_000]))
    rep.sync()
    rep.apply_data("audit.log", 1000, 2000, body(log[1000:2000]))  # not synced: a crash loses it
    rep.apply_data("base/b1/pic.dcm", 20_000, 30_000, body(pic[20_000:30_000]))
    rep.close()
    rep = vault.open_source("s", uuid_of(src), False)
    files = rep.position()["files"]
    assert files == {"audit.log": 1000, "base/b1/pic.dcm": 20_000}
    assert any("unacknowledged" in r for r in rep.recovery)
    rep.apply_data("audit.log", 1000, len(log), body(log[1000:]))
    rep.apply_data("base/b1/pic.dcm", 20_000, len(pic), body(pic[20_000:]))
    rep.file_entry("base/b1/pic.dcm", len(pic), 0o644, 1_700_000_000_000_000, "file")
    rep.base_complete("b1")
    rep.sync()
    rep.close()
    top = fast_tmp / "v" / "s" / "journal"
    assert (top / "audit.log").read_bytes() == log
    assert (top / "base" / "b1" / "pic.dcm").read_bytes() == pic
    rep = vault.open_source("s", uuid_of(src), False)
    assert rep.position()["bases"] == ["b1"] and "base/b1/pic.dcm" not in rep.position()["files"]


def test_next_segment_must_continue_the_sealed_one(fast_tmp):
    from cdpcore.format import SEG_COMPACTED, encode_segment_header

    src, vault, rep, data = fresh(fast_tmp)
    rep.apply_data(1, 64, len(data), packing.pack(data[64:], rep.dedupe_key).encode())
    last = rep.sync()[0][2]
    rep.seal(1, len(data))
    for first in (last, last + 2):
        with pytest.raises(ProtocolError, match="sealed ending at seq"):
            rep.begin_segment(2, encode_segment_header(rep.uuid, 2, first, 0))
    rep.begin_segment(2, encode_segment_header(rep.uuid, 2, last + 5, 0, SEG_COMPACTED))  # gaps allowed


def test_seal_checks_the_next_segment(fast_tmp):
    from cdpcore.format import encode_segment_header

    src, vault, rep, data = fresh(fast_tmp)
    rep.apply_data(1, 64, len(data), packing.pack(data[64:], rep.dedupe_key).encode())
    last = rep.sync()[0][2]
    rep.begin_segment(2, encode_segment_header(rep.uuid, 2, last + 3, 0))  # 1 not sealed yet: unknown
    with pytest.raises(ProtocolError, match="sealed ending at seq"):
        rep.seal(1, len(data))
    assert rep.position()["segments"][0][3] is False


def test_read_base_reads_only_complete_bases_without_following_links(fast_tmp):
    """zstd-ref's bases named by place (codec.BaseAt) are read from the
    replica's complete bases only: no '..', no other directory, no
    symlink, no incomplete base, nothing past a file's end."""
    from cdpcore.codec import BaseAt
    from cdpcore.errors import ProtocolError
    rnd = random.Random(9)
    src = build_source(fast_tmp, rnd, 20, segment_size=1 << 20)
    vault = Vault(fast_tmp / "v", create=True)
    rep = Sender(src, rnd).ship(vault.open_source("a", uuid_of(src), False))
    (name,) = rep.bases()
    pic = (fast_tmp / "root" / "sub" / "pic.dcm").read_bytes()
    assert rep.read_base(BaseAt(f"base/{name}/sub/pic.dcm", 1000, 4096)) == pic[1000:5096]
    assert rep.read_base(BaseAt(f"base/{name}/sub/pic.dcm", 19_000, 4096)) is None  # past the end
    assert rep.read_base(BaseAt(f"base/{name}/link", 0, 10)) is None  # a symlink in the base
    assert rep.read_base(BaseAt(f"base/{name}/sub/none", 0, 10)) is None
    assert rep.read_base(BaseAt("base/0000000000000099/seed.txt", 0, 10)) is None  # no such base
    assert rep.read_base(BaseAt("segments/0000000000000001.seg", 0, 10)) is None  # not a base
    jdir = fast_tmp / "v" / "a" / "journal"
    (jdir / "base" / (name + ".incoming")).mkdir()
    (jdir / "base" / (name + ".incoming") / "x").write_bytes(b"y" * 100)
    assert rep.read_base(BaseAt(f"base/{name}.incoming/x", 0, 10)) is None  # not complete
    os.symlink(jdir / "segments", jdir / "base" / name / "sub" / "out")
    assert rep.read_base(BaseAt(f"base/{name}/sub/out/0000000000000001.seg", 0, 10)) is None
    for bad in (f"base/{name}/../../segments/0000000000000001.seg", f"/base/{name}/seed.txt", f"base/{name}//seed.txt"):
        with pytest.raises(ProtocolError):
            rep.read_base(BaseAt(bad, 0, 10))
    rep.close()

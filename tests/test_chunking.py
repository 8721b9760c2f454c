"""FastCDC chunking (native/chunker.c via cdpcore.chunking).

Against a plain-Python model of the same algorithm (one byte at a time,
no two-byte trick), so the C loop's unrolling, its mask shifts and its
streaming stops are checked against something obviously right; plus the
properties dedupe relies on."""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdpcore._native import lib
from cdpcore.chunking import Chunker, cuts

M64 = (1 << 64) - 1


def _gear() -> list[int]:
    s, out = 0x6364706368756E6B, []
    for _ in range(256):
        s = (s + 0x9E3779B97F4A7C15) & M64
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


GEAR = _gear()


def model_cuts(data: bytes, avg: int, lo: int, hi: int) -> list[int]:
    bits = avg.bit_length() - 1
    ms, ml = lib.cdp_chunk_mask(bits + 2), lib.cdp_chunk_mask(bits - 2)
    out, pos = [], 0
    while pos < len(data):
        left = len(data) - pos
        if left <= lo:
            out.append(len(data))
            break
        end = min(left, hi)
        fp, cut = 0, end
        for i in range(lo, end):
            fp = ((fp << 1) + GEAR[data[pos + i]]) & M64
            if not fp & (ms if i < min(avg, end) else ml):
                cut = i + 1
                break
        pos += cut
        out.append(pos)
    return out


def test_masks_and_gear_are_pinned() -> None:
    """Chunk boundaries are part of the vault's contract: these never change."""
    assert lib.cdp_chunk_mask(14) == 0x4912244912240000
    assert bin(lib.cdp_chunk_mask(16)).count("1") == 16
    assert GEAR[0] == 0xA8ECCCD140E40DDA
    data = random.Random(1).randbytes(1 << 16)
    assert cuts(data, 1024) == model_cuts(data, 1024, 256, 8192)
    assert cuts(data, 1024)[:6] == PINNED


PINNED = [1300, 2590, 3434, 4588, 5935, 7029]


@given(data=st.binary(max_size=20000), avg=st.sampled_from([256, 512, 1024]), seed=st.integers(0, 99))
def test_c_matches_the_model(data: bytes, avg: int, seed: int) -> None:
    data = data + random.Random(seed).randbytes(seed * 97)
    assert cuts(data, avg) == model_cuts(data, avg, avg // 4, avg * 8)


def test_low_entropy_and_edge_sizes() -> None:
    for data in (bytes(100_000), b"ab" * 50_000, bytes(range(256)) * 400, b"x" * 63, b"", b"y" * 64):
        c = cuts(data, 1024)
        assert c == model_cuts(data, 1024, 256, 8192)
        if data:
            assert c[-1] == len(data)
            sizes = [b - a for a, b in zip([0, *c], c)]
            assert all(s <= 8192 for s in sizes)
            assert all(s > 256 for s in sizes[:-1])


@given(data=st.binary(min_size=0, max_size=60000), splits=st.lists(st.integers(0, 60000), max_size=8),
       seed=st.integers(0, 50))
def test_streaming_equals_one_shot(data: bytes, splits: list[int], seed: int) -> None:
    data += random.Random(seed).randbytes(seed * 1000)
    ch = Chunker(512)
    got: list[bytes] = []
    prev = 0
    for s in sorted(x % (len(data) + 1) for x in splits) + [len(data)]:
        got += ch.feed(data[prev:s])
        prev = s
    got += ch.finish()
    ends = cuts(data, 512)
    assert [len(c) for c in got] == [b - a for a, b in zip([0, *ends], ends)]
    assert b"".join(got) == data


def test_an_insertion_moves_only_nearby_cuts() -> None:
    rnd = random.Random(2)
    data = rnd.randbytes(1 << 20)
    before = cuts(data, 4096)
    edited = data[:300_000] + b"INSERTED" + data[300_000:]
    after = cuts(edited, 4096)
    chunks_a = {data[a:b] for a, b in zip([0, *before], before)}
    chunks_b = [edited[a:b] for a, b in zip([0, *after], after)]
    new = [c for c in chunks_b if c not in chunks_a]
    assert 1 <= len(new) <= 3  # the edited chunk (and maybe its neighbour)
    sizes = [b - a for a, b in zip([0, *before], before)]
    assert 2048 < sum(sizes) / len(sizes) < 8192  # normalized: round the average


def test_bad_sizes() -> None:
    for args in ((1000,), (1024, 32), (1024, 512, 1024), (1024, 256, 1 << 31)):
        with pytest.raises(ValueError, match="chunk sizes"):
            cuts(b"x" * 10, *args)

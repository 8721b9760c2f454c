"""CRC32C: every implementation the C layer can dispatch to (portable,
crc32 instruction in one and three streams, carry-less folding) against a
bit-at-a-time reference written from the definition."""
from __future__ import annotations

import random

import pytest

from cdpcore._native import crc32c, lib
from test_format_golden import crc32c_reference as reference


@pytest.fixture(params=[0, 1, 2], ids=["portable", "sse42", "fold"])
def level(request: pytest.FixtureRequest):
    before = lib.cdp_crc32c_level(-1)
    if request.param > before:
        pytest.skip(f"CPU lacks level {request.param} (has {before})")
    lib.cdp_crc32c_level(request.param)
    yield request.param
    lib.cdp_crc32c_level(before)


def test_check_value(level: int) -> None:
    assert crc32c(b"123456789") == 0xE3069283


# lengths around every block boundary of the three implementations
LENGTHS = [0, 1, 7, 8, 15, 16, 17, 255, 256, 257, 511, 512, 513, 767, 768, 769, 1000,
           3 * 4096 - 1, 3 * 4096, 3 * 4096 + 1, 12345, 65536 + 3]


def test_against_reference(level: int) -> None:
    rng = random.Random(level)
    blob = rng.randbytes(65536 + 64)
    for n in LENGTHS:
        for shift in (0, 1, 5):  # misaligned starts take the byte-wise prologue
            data = blob[shift : shift + n]
            assert crc32c(data) == reference(data), (n, shift)


def test_continuation(level: int) -> None:
    rng = random.Random(7)
    data = rng.randbytes(20000)
    whole = crc32c(data)
    for cut in (0, 1, 9, 300, 4096, 13000, 20000):
        assert crc32c(data[cut:], crc32c(data[:cut])) == whole


def test_levels_agree_on_random_buffers() -> None:
    before = lib.cdp_crc32c_level(-1)
    rng = random.Random(3)
    try:
        for _ in range(200):
            data = rng.randbytes(rng.randrange(0, 40000))
            results = set()
            for lv in range(before + 1):
                lib.cdp_crc32c_level(lv)
                results.add(crc32c(data))
            assert len(results) == 1
    finally:
        lib.cdp_crc32c_level(before)

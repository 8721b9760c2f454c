"""The sender's CPU budget for packing (issue 5): pack + encode of a 1 MiB
DATA frame of 4 KiB-payload records, plaintext and sealed (zstd-3 +
AES-SIV per chunk), and the receiver's unpack. Reported, no target here:
the budget is 25 % of a core at 500 KiB/s, i.e. >= 2 MB/s."""
from __future__ import annotations

import random

import pytest

from cdpcore import crypto, packing
from cdpcore.format import encode_record

KEY = bytes(32)
KEYS = crypto.derive_keys(bytes(64))


def frame(compressible: bool) -> bytes:
    rnd = random.Random(1)
    words = [rnd.randbytes(6).hex().encode() for _ in range(300)]

    def page() -> bytes:
        if compressible:  # text-like: database pages of repeated words
            return b" ".join(rnd.choice(words) for _ in range(400))[:4096].ljust(4096, b" ")
        return rnd.randbytes(4096)

    return b"".join(encode_record(1, i + 1, 1000 + i, 7, i * 4096, page()) for i in range(253))


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed-zstd3"])
@pytest.mark.parametrize("compressible", [False, True], ids=["random", "text"])
def test_pack_encode(benchmark, sealed, compressible):
    buf = frame(compressible)
    benchmark.group = "pack+encode 1 MiB of 4 KiB records"
    benchmark(lambda: packing.pack(buf, KEY, keys=KEYS if sealed else None, level=3).encode())
    benchmark.extra_info["MB/s (median)"] = round(len(buf) / benchmark.stats.stats.median / 1e6, 1)


def test_unpack(benchmark):
    buf = frame(False)
    body = packing.pack(buf, KEY).encode()
    benchmark.group = "unpack 1 MiB"
    benchmark(lambda: packing.unpack(body, {}.get, KEY))
    benchmark.extra_info["MB/s (median)"] = round(len(buf) / benchmark.stats.stats.median / 1e6, 1)

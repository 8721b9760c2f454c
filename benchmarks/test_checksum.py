"""Target 4: CRC32C (cdpcore, SSE4.2 / VPCLMULQDQ) vs xxh3_64 (the xxhash
package) vs zlib.crc32 over 4 KiB and 64 KiB buffers, called from Python."""
from __future__ import annotations

import os

import _bench
import pytest
from _bench import ROUNDS

FUNCS = _bench.checksum_functions()


@pytest.mark.parametrize("name", list(FUNCS), ids=["crc32c", "crc32c-bare", "xxh3_64", "zlib.crc32"])
@pytest.mark.parametrize("size", [4096, 65536], ids=["4KiB", "64KiB"])
def test_checksum(benchmark, name, size):
    benchmark.group = f"checksum {size // 1024} KiB"
    buf = os.urandom(size)
    benchmark(FUNCS[name], buf)
    benchmark.extra_info["GB/s (median)"] = round(size / benchmark.stats.stats.median / 1e9, 2)


def test_checksum_abab(record):
    record("checksum", _bench.checksum_suite(rounds=ROUNDS))

"""Frame encoding and decoding cost (protocol/frames.py): a DATA frame of
1 MiB and of 16 MiB, encoded, and decoded whole, in 64 KiB reads and in
1,460-byte reads (a TCP segment: the worst split a socket gives). The
per-MiB times of the two sizes should match: the decoder's buffering is
linear, not quadratic. A plain copy of the same bytes is the baseline.
Nothing asserts on a time.
"""
from __future__ import annotations

import os

import pytest

from cdpcore.protocol.frames import MAX_FRAME, Data, FrameDecoder, encode

SIZES = {"1MiB": 1 << 20, "16MiB": 16 << 20}


def frame_of(size: int) -> Data:
    body = os.urandom(size)
    return Data(seg=1, off=64, end=64 + size, first_seq=1, last_seq=100, last_ts=0, codec="none", raw=size,
                body=body)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_copy_baseline(benchmark, size):
    benchmark.group = f"protocol frame {size >> 20} MiB"
    data = os.urandom(size)
    benchmark(lambda: bytes(bytearray(data)))


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_encode(benchmark, size):
    benchmark.group = f"protocol frame {size >> 20} MiB"
    frame = frame_of(size)
    benchmark(encode, frame)


@pytest.mark.parametrize("piece", [0, 65536, 1460], ids=["whole", "64KiB-reads", "1460B-reads"])
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_decode(benchmark, size, piece):
    benchmark.group = f"protocol frame {size >> 20} MiB"
    wire = encode(frame_of(size))
    pieces = [wire] if not piece else [wire[i:i + piece] for i in range(0, len(wire), piece)]

    def run():
        d = FrameDecoder(MAX_FRAME)
        out = []
        for p in pieces:
            out += d.feed(p)
        assert len(out) == 1
    benchmark(run)

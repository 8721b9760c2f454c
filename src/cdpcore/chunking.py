"""Chunking: content-defined cut points of a byte stream (FastCDC in C,
native/chunker.c), for the replication's dedupe: identical content gives
identical chunks wherever it sits, and an insertion moves only the cuts
near it.

`Chunker(avg_size)` with min = avg / 4 and max = avg * 8 by default (the
FastCDC paper's normalized-chunking setting). `cuts(data)` gives the end
offsets of the chunks of a whole buffer; `Chunker.feed()` / `finish()`
chunk a stream that arrives in pieces and give the same chunks as one
call over the concatenation.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from cdpcore._native import ffi, lib

DEFAULT_AVG = 16384


def _check(min_size: int, avg_size: int, max_size: int) -> None:
    if avg_size & (avg_size - 1) or not 64 <= min_size < avg_size < max_size <= 1 << 30:
        raise ValueError(f"chunk sizes must satisfy 64 <= min < avg < max <= 1 GiB with avg a power "
                         f"of two (got {min_size}, {avg_size}, {max_size})")


def cuts(data: bytes | bytearray | memoryview, avg_size: int = DEFAULT_AVG, min_size: int | None = None,
         max_size: int | None = None, last: bool = True) -> list[int]:
    """End offsets of the chunks of `data` (the last is len(data) when
    `last`; without it, bytes after the last cut are left over)."""
    lo = min_size if min_size is not None else avg_size // 4
    hi = max_size if max_size is not None else avg_size * 8
    _check(lo, avg_size, hi)
    n = len(data)
    if n == 0:
        return []
    cap = n // lo + 2
    out = ffi.new("uint64_t[]", cap)
    count = ffi.new("uint64_t *")
    buf = ffi.from_buffer(data)
    status = lib.cdp_chunk(buf, n, lo, avg_size, hi, 1 if last else 0, out, cap, count)
    if status != lib.CDP_OK:
        raise ValueError(f"cdp_chunk failed ({status})")
    return list(ffi.unpack(out, count[0]))


@dataclass
class Chunker:
    """Chunks of a stream fed in pieces: feed() yields every chunk whose
    end is decided, finish() the rest."""

    avg_size: int = DEFAULT_AVG
    min_size: int = 0
    max_size: int = 0

    def __post_init__(self) -> None:
        self.min_size = self.min_size or self.avg_size // 4
        self.max_size = self.max_size or self.avg_size * 8
        _check(self.min_size, self.avg_size, self.max_size)
        self._pending = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        self._pending += data
        yield from self._cut(last=False)

    def finish(self) -> Iterator[bytes]:
        yield from self._cut(last=True)

    def _cut(self, last: bool) -> Iterator[bytes]:
        ends = cuts(self._pending, self.avg_size, self.min_size, self.max_size, last) if self._pending else []
        view = memoryview(self._pending)
        try:
            chunks = [bytes(view[start:end]) for start, end in zip([0, *ends], ends)]
        finally:
            view.release()
        if ends:
            del self._pending[: ends[-1]]
        yield from chunks

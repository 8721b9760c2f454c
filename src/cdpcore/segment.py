"""A journal segment file: its header, a read-only mapping of its bytes, and
the C scan that validates records and builds the sparse index."""
from __future__ import annotations

import mmap
import os
from array import array
from dataclasses import dataclass

from cdpcore._native import INT64_MIN, check, ffi, lib
from cdpcore.format import (
    REC_HDR,
    SEG_HDR_SIZE,
    IndexData,
    SegmentHeader,
    index_name,
    parse_index,
    parse_segment_header,
    segment_name,
)

# An index entry every INDEX_EVERY_RECORDS records or INDEX_EVERY_BYTES bytes,
# so that a seek reads at most that much after a binary search.
INDEX_EVERY_RECORDS = 64
INDEX_EVERY_BYTES = 256 * 1024

STOP_END, STOP_SHORT, STOP_MARKER, STOP_CRC, STOP_SEQ, STOP_PAD, STOP_LIMIT = range(7)
STOP_REASONS = {
    STOP_SHORT: "record truncated",
    STOP_MARKER: "not a record (zeroed or overwritten bytes)",
    STOP_CRC: "checksum mismatch",
    STOP_SEQ: "sequence number out of order",
    STOP_PAD: "non-zero padding",
}


@dataclass(slots=True)
class ScanResult:
    end: int
    count: int
    last_seq: int
    ts_min: int
    ts_max: int
    file_id_max: int
    stop: int
    index: tuple[array, array, array] | None

    @property
    def clean(self) -> bool:
        return self.stop in (STOP_END, STOP_LIMIT)

    @property
    def reason(self) -> str:
        return STOP_REASONS.get(self.stop, "ok")


_ZEROS = bytes(1 << 20)
PREALLOC_ALIGN = 1 << 20  # native/writer.c PRE_STEP: where a preallocated tail ends


class Segment:
    """One segment file, mapped read-only. The mapping covers the file as it
    was when mapped; remap() follows growth of the active segment."""

    def __init__(self, directory: str, seg_no: int):
        self.seg_no = seg_no
        self.path = os.path.join(directory, segment_name(seg_no))
        self.index_path = os.path.join(directory, index_name(seg_no))
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._map: mmap.mmap | None = None
        self.size = 0
        try:
            self.remap()
            self.header: SegmentHeader = parse_segment_header(bytes(self.view()[:64]), self.path)
        except BaseException:
            self.close()
            raise
        if self.header.seg_no != seg_no:
            from cdpcore.errors import CorruptJournal

            self.close()
            raise CorruptJournal(
                f"{self.path}: header names segment {self.header.seg_no:016x}", seg_no, 0
            )

    def remap(self) -> None:
        size = os.fstat(self._fd).st_size
        if self._map is not None and size == self.size:
            return
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the old map lives on with it
        self._map = mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if size else None
        self.size = size

    def view(self) -> memoryview:
        return memoryview(self._map) if self._map is not None else memoryview(b"")

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def scan(
        self,
        start: int = SEG_HDR_SIZE,
        expect_seq: int | None = None,
        limit: int | None = None,
        with_index: bool = False,
        max_records: int = 0,
    ) -> ScanResult:
        """Validate records from start (8-aligned) up to limit bytes."""
        if expect_seq is None:
            expect_seq = self.header.first_seq
        end = self.size if limit is None else min(limit, self.size)
        if self._map is None or end <= start:
            return ScanResult(start, 0, expect_seq - 1, 0, INT64_MIN, 0, STOP_END,
                              (array("Q"), array("q"), array("Q")) if with_index else None)
        buf = ffi.from_buffer(self._map)
        cap = 0
        if with_index:
            cap = (end - start) // INDEX_EVERY_BYTES + (end - start) // (REC_HDR.size * INDEX_EVERY_RECORDS) + 2
        iseq = ffi.new("uint64_t[]", max(cap, 1))
        its = ffi.new("int64_t[]", max(cap, 1))
        ioff = ffi.new("uint64_t[]", max(cap, 1))
        out = ffi.new("struct cdp_scan_result *")
        check(lib.cdp_scan(buf, end, start, expect_seq, INT64_MIN, max_records,
                           INDEX_EVERY_RECORDS, INDEX_EVERY_BYTES, iseq, its, ioff, cap, out,
                           self.header.compacted))
        index = None
        if with_index:
            n = out.n_index
            index = (
                array("Q", ffi.unpack(iseq, n)),
                array("q", ffi.unpack(its, n)),
                array("Q", ffi.unpack(ioff, n)),
            )
        del buf
        return ScanResult(out.end, out.count, out.last_seq, out.ts_min, out.ts_max,
                          out.file_id_max, out.stop, index)

    def preallocated_from(self, start: int, segment_size: int) -> bool:
        """Whether the bytes from start to the end of the file are the
        active segment's preallocated tail (journal-format.md,
        "Preallocation"): zeros, ending on a PREALLOC_ALIGN boundary or at
        the segment size. No record is all zeros (its marker is not), so
        nothing is lost by reading them as the end; zeros ending elsewhere
        are a torn tail."""
        if self._map is None or start >= self.size:
            return False
        if self.size % PREALLOC_ALIGN and self.size != segment_size:
            return False
        for p in range(start, self.size, len(_ZEROS)):
            n = min(len(_ZEROS), self.size - p)
            if self._map[p : p + n] != _ZEROS[:n]:
                return False
        return True

    def find_valid_after(self, start: int, after_seq: int) -> int | None:
        """Offset of a valid record with seq > after_seq past start, if any:
        tells damage in the middle (valid data follows) from a torn tail."""
        if self._map is None:
            return None
        found = ffi.new("uint64_t *")
        buf = ffi.from_buffer(self._map)
        check(lib.cdp_find_valid(buf, self.size, start, after_seq, found))
        del buf
        return None if found[0] == 2**64 - 1 else int(found[0])

    def build_index(self) -> tuple[IndexData, ScanResult]:
        r = self.scan(with_index=True)
        assert r.index is not None
        data = IndexData(self.seg_no, self.header.first_seq, r.count, r.end, r.ts_min,
                         r.ts_max, r.file_id_max, *r.index)
        return data, r

    def load_index(self) -> IndexData | None:
        """The stored index if it is intact and matches this segment."""
        try:
            with open(self.index_path, "rb") as f:
                data = parse_index(f.read())
        except OSError:
            return None
        if (data is None or data.seg_no != self.seg_no or data.end != self.size
                or data.first_seq != self.header.first_seq):
            return None
        return data

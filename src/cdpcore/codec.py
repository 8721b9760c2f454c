"""Codec: compression of DATA bodies for one replication connection, and
the choice of its level.

Theory of operation (docs/replication.md, "Compression").

* zstd is *streamed*: one compression context per connection, flushed at
  the end of every DATA body (FLUSH_BLOCK), so each body decompresses on
  its own arrival yet may refer back to the bytes of earlier bodies within
  the window. A database page rewritten a second later, or its copy in a
  rollback journal, then costs a few bytes. The receiver caps the window
  (window_log in WELCOME), which bounds its memory; the sender never asks
  for more. A level change or a reconnect starts a new context, which the
  DATA frame says (`reset`).
* zstd-ref (the same ladder levels) adds what the vault already holds:
  the body's header and piece list go through the streamed context as
  above, and the rest (literals and new chunks) is one zstd frame whose
  dictionary is the previous body's tail plus the bytes of the chunks the
  body *references* and the vault holds (packing.prefix_plan). A database
  page is saved by its rollback journal (a reference: the vault has that
  version) right before its new version is written, so the new version
  compresses against the old one to a few dozen bytes, even when the old
  version is only in the vault (a base) and never crossed this
  connection. The receiver resolves the references from its chunk store
  before it decompresses the rest; a reference it cannot resolve raises
  MissingRefs (answer NEED). Layout of the body: u32 compressed head
  length, u32 raw head length, u32 bitmap length, u32 CRC-32 of the raw
  head and the bitmap (the streamed blocks carry no checksum), the
  compressed head, the bitmap (bit i, LSB first: the i-th reference of the
  piece list is in the dictionary), the rest's zstd frame (with a
  checksum: a dictionary that differs is caught, not decoded into wrong
  bytes). With the dedupe key (chunk_key), a reference to a chunk that
  this connection sent as bytes among its last RECENT new chunks is written
  in the head as its distance back (msgpack ext type 1, a varint) instead
  of its 32-byte id, and one to a chunk the same body carries as its
  number among them (ext type 2): both ends compute the ids of every
  body's new chunks, so the receiver restores the ids (and the body)
  exactly. The literal column is laid out as columns (to_columns). The
  ladder's rungs apply as they are: zstd N becomes zstd-ref N.
* lz4 is one lz4 frame per body (for fast links, where CPU is the limit).
* The Decompressor is the receiver's guard: a window above the cap, output
  beyond the frame's announced `raw` size or beyond the body limit, or
  output that ends short, is a ProtocolError. (Plain streamed zstd blocks
  carry no checksum; TLS protects the wire, and the vault's pack parse and
  record CRCs check what comes out.) Output goes through a counting sink
  in pieces of at most the body limit + 1 bytes, so a decompression bomb
  fails after that much, without allocating its claimed size.
* AdaptiveLevel picks a rung of the ladder (lz4, zstd 1 ... 19) from
  measurements that the transport feeds it: the link's acknowledged
  throughput and this process's compression speed (CPU time) and ratio per
  rung. Rungs not measured yet are estimated from tables of relative
  speeds and ratios scaled by what was measured (the machine's speed, the
  data's compressibility). CPU samples are summed over SAMPLE_BYTES of
  frames. The choice is
  the strongest rung whose compression could fill the link with margin and
  whose CPU, added to the sender's other CPU per byte (observe_overhead),
  stays under the budget; it moves up only after the same better
  rung won `hold` decisions in a row (hysteresis), and down at once when
  the current rung falls behind.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lz4.frame
import msgpack
import zstandard

from cdpcore import packing
from cdpcore._native import columns_decode, columns_encode
from cdpcore.crypto import chunk_id
from cdpcore.errors import ProtocolError

CODECS = ("zstd", "zstd-ref", "lz4", "none")
REF_HDR = struct.Struct("<IIII")  # zstd-ref: compressed head, raw head, bitmap lengths; CRC-32 of head + bitmap
REF_HASH_LOG = 18  # zstd-ref: smallest match-finder hash table, whatever the level (Compressor._params)
REF_HASH_LOG_MAX = 21  # ... and the largest a big dictionary grows it to
BASES_FOR_NO_HISTORY = 8  # zstd-ref: bases of at least 1/this of the new chunks' bytes replace the history
HISTORY = 1 << 20  # zstd-ref: bytes of the previous body's tail in the next dictionary
COLUMNS_LEVEL = 9  # zstd-ref: the least level of the literal columns' own frame (Compressor._ref_body)
COLUMNS_FRAME_MIN = 16 << 10  # zstd-ref: smaller columns share the chunks' frame
_REC = struct.Struct("<IIQqQQ8s")  # a record header: crc, len, seq, ts, file id, offset, the rest
# first byte of a zstd-ref literal column (native/cdp.h, enum cdp_columns_layout)
_RAW, _PLANAR, _PLANAR_NO_CRC = 0, 3, 4
RECENT = 1 << 20  # zstd-ref: new chunks of this connection a reference may name by distance
_SHORT_REF = 1  # msgpack ext type in a zstd-ref head: a recent chunk, by distance back
_LOCAL_REF = 2  # ... a chunk this same body carries as bytes, by its number among them
# zstd-ref: flags in the high bits of REF_HDR's bitmap length
BASES_FLAG = 1 << 31  # a list of base chunks follows the bitmap (Compressor.compress(bases=))
NO_HISTORY_FLAG = 1 << 30  # the previous body's tail is not in this body's dictionary
_BLEN_MASK = (1 << 30) - 1
DEFAULT_WINDOW_LOG = 25  # 32 MiB: the receiver's default cap (replication.md, limits)
MIN_WINDOW_LOG = 10
MAX_WINDOW_LOG = 31
DEFAULT_MAX_BODY = 24 << 20  # decompressed body of one DATA frame
OUT_STEP = 1 << 17  # decompressor output step: what a bomb costs before it is caught


# ---- compressing ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Compressed:
    """One compressed DATA body and the DATA fields that describe it."""

    codec: str
    level: int
    reset: bool
    raw: int
    body: bytes


class Compressor:
    """The sender's side: one per connection."""

    def __init__(self, codec: str = "zstd", level: int = 3, window_log: int = DEFAULT_WINDOW_LOG,
                 ldm: bool = False, chunk_key: bytes | None = None):
        """codec "zstd-ref" needs compress(body, prefix=packing.prefix_plan(...));
        chunk_key (the dedupe key, as the receiver's Decompressor has it)
        enables short references."""
        self.chunk_key = chunk_key
        self._recent = _Recent()
        if not MIN_WINDOW_LOG <= window_log <= MAX_WINDOW_LOG:
            raise ValueError(f"window_log {window_log} outside {MIN_WINDOW_LOG}..{MAX_WINDOW_LOG}")
        self.window_log = window_log
        self.ldm = ldm
        self._ctx: Any = None
        self.codec = codec
        self.level = level
        self.set_level(codec, level)

    def set_level(self, codec: str, level: int) -> None:
        """Switch codec or level; a zstd context starts afresh (next body has reset)."""
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
        if codec.startswith("zstd") and not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level {level} outside 1..{zstandard.MAX_COMPRESSION_LEVEL}")
        if self._ctx is not None and (codec, level) == (self.codec, self.level):
            return
        self.codec, self.level = codec, (level if codec.startswith("zstd") else 0)
        self.reset()

    def reset(self) -> None:
        """Forget the stream (a reconnect): the next body starts a new context."""
        self._ctx = None
        self._reset = True
        self._history = b""
        if hasattr(self, "_recent"):
            self._recent = _Recent()

    def _context(self) -> Any:
        # Every level gets the receiver's whole window: the point of the
        # streamed context is to reach back to a page's earlier version, and
        # default windows of low levels (2 MiB at level 3) are too short.
        params = zstandard.ZstdCompressionParameters.from_level(
            self.level, window_log=self.window_log, enable_ldm=self.ldm,
            ldm_hash_log=min(self.window_log - 1, 20) if self.ldm else 0)
        return zstandard.ZstdCompressor(compression_params=params).compressobj()

    def _params(self, dict_size: int = 0) -> Any:
        # The dictionary (the previous body's tail and the referenced
        # chunks: 1-2 MiB) is indexed in the match-finder's hash table,
        # which low levels keep small (2^14 entries at level 1): most of the
        # dictionary's positions then fall out of it and a new page version
        # no longer finds its old one. Measured on the HIS workload
        # (3,000 transactions, 164 MB of journal): level 1 shipped 17.5 MB
        # with its own table, 2.11 MB with 2^17 (level 3's size), for the
        # same CPU. zstd also indexes only the last 2^(hash_log + 3) bytes
        # of a dictionary: with bases (the previous versions of the pages a
        # body carries, 1-3 MB a body on pgbench) 2^18 indexed too little
        # of them (16.3 MB shipped, 13.7 MB with 2^19; 2^20 13.4, no
        # better than 2^19's 13.43 in a pinned run). A larger table costs
        # CPU for every body (HIS: 2^19 took its compression from 0.64-0.79
        # to 0.83-0.91 CPU-s for 0.5-1 % fewer bytes), so it grows only as
        # far as the dictionary needs.
        hash_log = max(REF_HASH_LOG, zstandard.ZstdCompressionParameters.from_level(self.level).hash_log)
        while dict_size > 1 << (hash_log + 3) and hash_log < REF_HASH_LOG_MAX:
            hash_log += 1
        return zstandard.ZstdCompressionParameters.from_level(
            self.level, window_log=self.window_log, hash_log=hash_log, write_checksum=True,
            write_content_size=False, write_dict_id=False)

    def _columns_params(self) -> Any:
        return zstandard.ZstdCompressionParameters.from_level(
            max(COLUMNS_LEVEL, self.level), window_log=self.window_log, write_checksum=True,
            write_content_size=False, write_dict_id=False)

    def compress(self, body: bytes, prefix: tuple[bytes, bytes] | None = None,
                 new_ids: list[bytes] | None = None, records: bool = False,
                 bases: list[tuple[bytes | BaseAt, bytes]] | None = None) -> Compressed:
        """One DATA body. prefix (zstd-ref only): (bitmap, bytes) from
        packing.prefix_plan for this body. new_ids (zstd-ref with a
        chunk_key, optional): the ids of the chunks the body carries as
        bytes, in order (Pack.new_ids), which saves hashing them again;
        they must be what new_chunk_ids(body) gives. records (zstd-ref):
        the body is a run of whole segment records, whose CRCs the receiver
        can recompute: they are left out (to_columns). bases (zstd-ref):
        (key, bytes) of what the receiver holds, added to the dictionary
        after the referenced chunks: the previous versions of the pages
        this body carries (versions.Versions), which no reference brings
        in. A key is a chunk id (a chunk the vault holds before this body
        is applied, not one this body carries) or a BaseAt (bytes of a
        file of a base the vault holds complete)."""
        reset = self._reset
        self._reset = False
        if self.codec == "zstd-ref":
            if prefix is None:
                raise ValueError("codec zstd-ref needs the body's prefix (packing.prefix_plan)")
            out = self._ref_body(body, *prefix, new_ids, records, bases or ())
            return Compressed(self.codec, self.level, reset, len(body), out)
        if self.codec == "none":
            out = bytes(body)
        elif self.codec == "lz4":
            out = lz4.frame.compress(body, store_size=False)
        else:
            if self._ctx is None:
                self._ctx = self._context()
            out = self._ctx.compress(body) + self._ctx.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return Compressed(self.codec, self.level, reset, len(body), out)

    def _ref_body(self, body: bytes, bits: bytes, refs: bytes, new_ids: list[bytes] | None = None,
                  records: bool = False, bases: Sequence[tuple[bytes | BaseAt, bytes]] = ()) -> bytes:
        split = packing.head_size(body)
        if self._ctx is None:
            self._ctx = self._context()
        h = body[:split]
        # the base list names recent chunks by distance as the head does,
        # so it is written before this body's own chunks join the table
        blist = _encode_bases([key for key, _ in bases], self._recent if self.chunk_key is not None else None)
        if self.chunk_key is not None:
            if new_ids is None:
                new_ids = new_chunk_ids(body, self.chunk_key)
            h = self._recent.shorten(h, new_ids)
            self._recent.add(new_ids)
        head = self._ctx.compress(h) + self._ctx.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        llen = packing.BODY_HDR.unpack_from(body)[5]
        cols = to_columns(body[split:split + llen], crcs=not records)
        chunks = body[split + llen:]
        rest = cols + chunks
        base_bytes = b"".join(data for _, data in bases)
        # Measured on PostgreSQL under pgbench (benchmarks.md §9): when
        # bases cover a good part of the body, the previous body's tail
        # adds nothing to the ratio and loading it into the dictionary
        # costs CPU (pinned zstd-ref 3, two runs each: with the tail 13.65
        # and 13.67 MB, 9.1 and 9.6 CPU-s; without it when bases are 1/8
        # of the chunks 13.64 and 13.65 MB, 8.9 and 8.7 CPU-s); on the HIS
        # workload bases are few (a page's old version is a reference
        # already) and the tail is worth 8 % of the bytes.
        history = b"" if BASES_FOR_NO_HISTORY * len(base_bytes) >= len(chunks) > 0 else self._history
        flags = (BASES_FLAG if bases else 0) | (NO_HISTORY_FLAG if bases and not history else 0)
        d = history + refs + base_bytes
        cctx = zstandard.ZstdCompressor(
            compression_params=self._params(len(d)),
            dict_data=zstandard.ZstdCompressionDict(d, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if d else None)
        # Columns of some size go in a frame of their own, at COLUMNS_LEVEL
        # at least and without the dictionary (they do not match page
        # bytes): they are 3 % of the raw bytes, so a strong level costs
        # little CPU, and on the HIS workload it saved 56 KB of 1.55 MB
        # (benchmarks.md §9). A frame costs ~12 bytes, more than a small
        # body's columns gain. zstd frames follow each other; the
        # receiver's one streaming decompressor reads both into `rest`.
        if len(cols) >= COLUMNS_FRAME_MIN:
            tail = (zstandard.ZstdCompressor(compression_params=self._columns_params()).compress(cols)
                    + cctx.compress(chunks))
        else:
            tail = cctx.compress(rest)
        self._history = rest[-HISTORY:] if len(rest) >= HISTORY else (self._history + rest)[-HISTORY:]
        # the head travels in the streamed context, whose blocks carry no
        # checksum: a CRC over it and the bitmap catches damage there (the
        # rest's frame has zstd's own checksum)
        section = bits + (struct.pack("<I", len(blist)) + blist if bases else b"")
        return (REF_HDR.pack(len(head), len(h), len(bits) | flags, zlib.crc32(section, zlib.crc32(h)))
                + head + section + tail)


class _Recent:
    """The ids of the new chunks a connection carried, newest last, so
    that a reference can name one by its distance back (zstd-ref)."""

    def __init__(self) -> None:
        self.ids: list[bytes] = []
        self.base = 0  # the number of the first id kept in self.ids
        self.where: dict[bytes, int] = {}  # id -> its newest number

    def add(self, ids: list[bytes]) -> None:
        for cid in ids:
            self.where[cid] = self.base + len(self.ids)
            self.ids.append(cid)
        if len(self.ids) > 2 * RECENT:
            drop = len(self.ids) - RECENT
            for cid in self.ids[:drop]:
                if self.where.get(cid, -1) < self.base + drop:
                    self.where.pop(cid, None)
            del self.ids[:drop]
            self.base += drop

    def shorten(self, head: bytes, new_ids: list[bytes]) -> bytes:
        """The head with each reference to a recent chunk, or to one this
        body carries as bytes (new_ids, in order), made short."""
        mlen = packing.BODY_HDR.unpack_from(head)[4]
        meta = msgpack.unpackb(head[packing.BODY_HDR.size:packing.BODY_HDR.size + mlen])
        end = self.base + len(self.ids)
        local: dict[bytes, int] = {}
        out: list[Any] = []
        k = 0
        for item in meta:
            if type(item) is int:
                if item < 0:
                    local.setdefault(new_ids[k], k)
                    k += 1
                out.append(item)
                continue
            j = local.get(item)
            n = self.where.get(item)
            if j is not None:
                out.append(msgpack.ExtType(_LOCAL_REF, _varint(j)))
            elif n is not None and 0 < end - n <= RECENT:
                out.append(msgpack.ExtType(_SHORT_REF, _varint(end - n)))
            else:
                out.append(item)
        return head[:packing.BODY_HDR.size] + msgpack.packb(out)

    def parse(self, head: bytes) -> tuple[list[Any], int]:
        """The receiver's first step: the piece list with recent references
        restored and references to this body's own new chunks left as
        _Local (their ids are known only after decompression)."""
        if len(head) < packing.BODY_HDR.size:
            raise ProtocolError("zstd-ref head is shorter than a pack header")
        mlen = packing.BODY_HDR.unpack_from(head)[4]
        end = self.base + len(self.ids)

        def ext(code: int, data: bytes) -> Any:
            d = _unvarint(data)
            if code == _LOCAL_REF:
                return _Local(d)
            if code != _SHORT_REF:
                raise ProtocolError(f"zstd-ref head: unknown extension {code}")
            if not 0 < d <= min(RECENT, len(self.ids)):
                raise ProtocolError(f"zstd-ref head: short reference {d} names no recent chunk")
            return self.ids[end - d - self.base]

        try:
            meta = msgpack.unpackb(head[packing.BODY_HDR.size:], ext_hook=ext, max_bin_len=packing.ID_SIZE,
                                   max_str_len=0, max_map_len=0, max_ext_len=10)
        except ProtocolError:
            raise
        except Exception as e:  # msgpack raises several unrelated types for bad input
            raise ProtocolError(f"zstd-ref head does not decode ({type(e).__name__})") from None
        if not isinstance(meta, list):
            raise ProtocolError("zstd-ref head: piece list is not an array")
        for item in meta:
            if type(item) is bytes and len(item) != packing.ID_SIZE:
                raise ProtocolError("zstd-ref head: a reference is not a chunk id")
            if type(item) not in (int, bytes, _Local):
                raise ProtocolError(f"zstd-ref head: piece of type {type(item).__name__}")
        return meta, mlen

    def restore(self, head: bytes) -> bytes:
        """parse() for a head without local references (tests, tools)."""
        meta, mlen = self.parse(head)
        if any(type(x) is _Local for x in meta):
            raise ProtocolError("zstd-ref head: local references need the body")
        restored = msgpack.packb(meta)
        if len(restored) != mlen:
            raise ProtocolError(f"zstd-ref head: piece list of {len(restored)} bytes, the pack says {mlen}")
        return head[:packing.BODY_HDR.size] + restored


@dataclass(frozen=True, slots=True)
class _Local:
    """A reference to the k-th chunk this body carries as bytes."""

    k: int


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int, error: str) -> tuple[int, int]:
    """The varint (_varint, at most 9 bytes) at data[pos:] and where it
    ends, or ProtocolError(error)."""
    n = shift = 0
    while pos < len(data) and shift <= 56:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos
    raise ProtocolError(error)


def _unvarint(data: bytes) -> int:
    n, end = _read_varint(data, 0, "zstd-ref head: malformed short reference")
    if end != len(data):
        raise ProtocolError("zstd-ref head: malformed short reference")
    return n


@dataclass(frozen=True, slots=True)
class BaseAt:
    """A zstd-ref base named by where the receiver's replica holds it:
    bytes [off, off + length) of `path`, a file of one of its complete
    bases (path relative to the journal: base/NAME/...)."""

    path: str
    off: int
    length: int


MAX_BASE_AT = 1 << 16  # bytes one BaseAt may name (packing.ONE_CHUNK_UP_TO: a page write)
_MAX_BASE_PATH = 4096


def _encode_bases(keys: list[bytes | BaseAt], recent: _Recent | None) -> bytes:
    """A zstd-ref base list: per base a varint k (7 bits a byte, low
    first): 0, then its 32-byte id; 1, then a location in the replica's
    base (varint path length, the path in UTF-8, varint offset, varint
    length); 2, then varint offset and length in the previous location's
    file; k >= 3 names the chunk this connection carried k - 2 new chunks
    back (as the head's short references count)."""
    out = bytearray()
    end = recent.base + len(recent.ids) if recent is not None else 0
    last_path = None
    for key in keys:
        if isinstance(key, BaseAt):
            if key.path == last_path:
                out += b"\x02"
            else:
                name = key.path.encode("utf-8", "surrogateescape")
                out += b"\x01" + _varint(len(name)) + name
                last_path = key.path
            out += _varint(key.off) + _varint(key.length)
            continue
        n = recent.where.get(key) if recent is not None else None
        if n is not None and 0 < end - n <= RECENT:
            out += _varint(end - n + 2)
        else:
            out += b"\x00" + key
    return bytes(out)


def _decode_bases(data: bytes, recent: _Recent | None) -> list[bytes | BaseAt]:
    """The bases of a base list (_encode_bases), or ProtocolError."""
    out: list[bytes | BaseAt] = []
    end = recent.base + len(recent.ids) if recent is not None else 0
    pos = 0
    last_path: str | None = None

    def varint() -> int:
        nonlocal pos
        n, pos = _read_varint(data, pos, "zstd-ref base list: malformed varint")
        return n

    while pos < len(data):
        k = varint()
        if k == 0:
            if pos + packing.ID_SIZE > len(data):
                raise ProtocolError("zstd-ref base list: an id runs past its end")
            out.append(bytes(data[pos:pos + packing.ID_SIZE]))
            pos += packing.ID_SIZE
        elif k in (1, 2):
            if k == 1:
                n = varint()
                if n > _MAX_BASE_PATH or pos + n > len(data):
                    raise ProtocolError("zstd-ref base list: a path runs past its end or is too long")
                last_path = bytes(data[pos:pos + n]).decode("utf-8", "surrogateescape")
                pos += n
            elif last_path is None:
                raise ProtocolError("zstd-ref base list: a location in the same file as none")
            off, length = varint(), varint()
            if not 0 < length <= MAX_BASE_AT:
                raise ProtocolError(f"zstd-ref base list: a location of {length} bytes")
            out.append(BaseAt(last_path, off, length))
        elif recent is None or not k - 2 <= min(RECENT, len(recent.ids)):
            raise ProtocolError(f"zstd-ref base list: distance {k - 2} names no recent chunk")
        else:
            out.append(recent.ids[end - (k - 2) - recent.base])
    return out


def new_chunk_ids(body: bytes, chunk_key: bytes) -> list[bytes]:
    """The ids of the chunks a plaintext body carries as bytes, in order."""
    h = packing.BODY_HDR.unpack_from(body)
    mlen, llen = h[4], h[5]
    start = packing.BODY_HDR.size
    meta = msgpack.unpackb(body[start:start + mlen])
    pos = start + mlen + llen
    view = memoryview(body)
    out = []
    for item in meta:
        if type(item) is int and item < 0:
            out.append(chunk_id(chunk_key, view[pos:pos - item]))
            pos -= item
    view.release()
    return out


class MissingRefs(Exception):
    """zstd-ref: the body references chunks the receiver's store does not
    hold (pruned meanwhile); answer NEED with `ids`. The sender resends the
    frame with them as bytes *in a new context* (Compressor.reset(), so the
    DATA frame has reset): the two sides' dictionaries' history parted at
    the failed frame."""

    def __init__(self, ids: list[bytes]):
        super().__init__(f"{len(ids)} referenced chunks are not in the store")
        self.ids = ids


# ---- decompressing ----------------------------------------------------------------


class _Sink:
    """Counts what a decompressor writes and refuses more than allowed."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.n = 0
        self.limit = 0

    def write(self, data: Any) -> int:
        self.n += len(data)
        if self.n > self.limit:
            raise _TooBig()
        self.parts.append(bytes(data))
        return len(data)


class _TooBig(Exception):
    pass


def _over_limit(message: str) -> ProtocolError:
    """A ProtocolError whose ERROR frame code is "limit" (an announced
    limit was exceeded), not "protocol"."""
    e = ProtocolError(message)
    e.code = "limit"  # type: ignore[attr-defined]
    return e


class Decompressor:
    """The receiver's side: one per connection, enforcing its own limits."""

    def __init__(self, window_log: int = DEFAULT_WINDOW_LOG, max_body: int = DEFAULT_MAX_BODY,
                 chunk_key: bytes | None = None):
        self.window_log = window_log
        self.max_body = max_body
        self.chunk_key = chunk_key  # the dedupe key, as the sender's Compressor has it
        self._recent = _Recent()
        self._sink = _Sink()
        self._zstd: Any = None
        self._broken = False
        self._history = b""
        # the last body's CRC digest when its records' CRCs were left out
        # (to_columns): the caller fills them in and checks (_native.fill_crcs)
        self.crcs: int | None = None

    def decompress(self, codec: str, body: bytes, raw: int, reset: bool = False,
                   resolve: Callable[[bytes], bytes | None] | None = None,
                   read_base: Callable[[BaseAt], bytes | None] | None = None) -> bytes:
        """The body of one DATA frame, exactly `raw` bytes, or ProtocolError.
        resolve (zstd-ref): a chunk's bytes from the receiver's store, or
        None (then MissingRefs). read_base (zstd-ref): the bytes a BaseAt
        names in the replica, or None (a ProtocolError: the sender names
        only complete bases)."""
        if self._broken:
            raise ProtocolError("the compressed stream failed earlier; the connection must close")
        if type(raw) is not int or not 0 <= raw <= self.max_body:
            raise _over_limit(f"DATA raw size {raw!r} outside 0..{self.max_body}")
        self.crcs = None
        if codec == "none":
            out = bytes(body)
        elif codec == "lz4":
            out = self._lz4(body, raw)
        elif codec == "zstd":
            out = self._zstd_body(body, raw, reset)
        elif codec == "zstd-ref":
            out = self._ref_body(body, raw, reset, resolve, read_base)
        else:
            raise ProtocolError(f"unknown codec {codec!r}")
        if len(out) != raw:
            raise ProtocolError(f"{codec} body decompressed to {len(out)} bytes, DATA said {raw}")
        return out

    def _lz4(self, body: bytes, raw: int) -> bytes:
        d = lz4.frame.LZ4FrameDecompressor()
        try:
            out = d.decompress(body, max_length=raw + 1)
        except RuntimeError as e:
            raise ProtocolError(f"lz4 body is damaged: {e}") from None
        if len(out) > raw:
            raise ProtocolError(f"lz4 body decompresses past the {raw} bytes DATA announced")
        if not d.eof or d.unused_data:
            raise ProtocolError("lz4 body is not exactly one complete frame")
        return out

    def _ref_body(self, body: bytes, raw: int, reset: bool,
                  resolve: Callable[[bytes], bytes | None] | None,
                  read_base: Callable[[BaseAt], bytes | None] | None = None) -> bytes:
        if resolve is None:
            raise ProtocolError("codec zstd-ref needs the receiver's chunk store")
        if reset:
            self._history = b""
            self._recent = _Recent()
        if len(body) < REF_HDR.size:
            raise ProtocolError(f"zstd-ref body of {len(body)} bytes is shorter than its header")
        hlen, hraw, blen, hcrc = REF_HDR.unpack_from(body)
        flags, blen = blen & ~_BLEN_MASK, blen & _BLEN_MASK
        if flags & NO_HISTORY_FLAG and not flags & BASES_FLAG:
            raise ProtocolError("zstd-ref body: no history without a base list")
        if REF_HDR.size + hlen + blen > len(body) or hraw > raw:
            raise ProtocolError("zstd-ref body: lengths in its header run past the body")
        blist = b""
        tail_at = REF_HDR.size + hlen + blen  # where the zstd frames start
        if flags & BASES_FLAG:
            if tail_at + 4 > len(body):
                raise ProtocolError("zstd-ref body: its base list's length runs past the body")
            n = struct.unpack_from("<I", body, tail_at)[0]
            if tail_at + 4 + n > len(body):
                raise ProtocolError("zstd-ref body: its base list runs past the body")
            blist = body[tail_at + 4:tail_at + 4 + n]
            tail_at += 4 + n
        pos = REF_HDR.size
        head = self._zstd_body(body[pos:pos + hlen], hraw, reset)
        if len(head) != hraw:
            raise ProtocolError(f"zstd-ref head decompressed to {len(head)} bytes, header said {hraw}")
        meta: list[Any] | None = None
        if zlib.crc32(body[pos + hlen:tail_at], zlib.crc32(head)) != hcrc:
            self._broken = True
            raise ProtocolError("zstd-ref body: its head or bitmap is damaged (checksum mismatch)")
        if self.chunk_key is not None:
            meta, mlen = self._recent.parse(head)
            refs: list[Any] = [x for x in meta if type(x) is not int]
        else:
            refs = packing.head_refs(head)
        bits = body[pos + hlen:pos + hlen + blen]
        if blen != (len(refs) + 7) // 8:
            raise ProtocolError(f"zstd-ref body: bitmap of {blen} bytes for {len(refs)} references")
        parts: list[bytes] = []
        missing: list[bytes] = []
        history = b"" if flags & NO_HISTORY_FLAG else self._history
        total = len(history)
        wanted: list[Any] = [cid for i, cid in enumerate(refs) if bits[i // 8] >> (i % 8) & 1]
        if flags & BASES_FLAG:
            wanted += _decode_bases(blist, self._recent if self.chunk_key is not None else None)
        for cid in wanted:
            if type(cid) is _Local:
                raise ProtocolError("zstd-ref body: a chunk of the body itself marked as held")
            if type(cid) is BaseAt:
                data = read_base(cid) if read_base is not None else None
                if data is None or len(data) != cid.length:
                    raise ProtocolError(f"zstd-ref base list: {cid.path} at {cid.off} (+{cid.length}) "
                                        "is not in the replica")
            else:
                data = resolve(cid)
            if data is None:
                missing.append(cid)
                continue
            total += len(data)
            if total > 2 * self.max_body + HISTORY:
                raise _over_limit("zstd-ref dictionary exceeds twice the body limit")
            parts.append(data)
        if missing:
            raise MissingRefs(list(dict.fromkeys(missing)))
        d = history + b"".join(parts)
        dctx = zstandard.ZstdDecompressor(
            max_window_size=1 << self.window_log,
            dict_data=zstandard.ZstdCompressionDict(d, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if d else None)
        sink = _Sink()
        # the column layout of the literals adds 5 bytes and 4 per record header
        sink.limit = raw - hraw + 5 + 4 * (raw // _REC.size + 1)
        try:
            with dctx.stream_writer(sink, write_size=OUT_STEP) as w:
                w.write(body[tail_at:])
        except _TooBig:
            self._broken = True
            raise _over_limit(f"zstd-ref body decompresses past the {raw} bytes DATA announced") from None
        except zstandard.ZstdError as e:
            self._broken = True
            raise ProtocolError(f"zstd-ref body refused: {e}") from None
        rest = b"".join(sink.parts)
        self._history = rest[-HISTORY:] if len(rest) >= HISTORY else (self._history + rest)[-HISTORY:]
        llen = packing.BODY_HDR.unpack_from(head)[5]
        lit, used, self.crcs = from_columns(rest, llen)
        new = rest[used:]
        if meta is not None:
            assert self.chunk_key is not None
            # the ids of the chunks this body carries, then its own references
            view = memoryview(new)
            new_ids: list[bytes] = []
            off = 0
            for item in meta:
                if type(item) is int and item < 0:
                    if off - item > len(new):
                        raise ProtocolError("zstd-ref body: new chunks run past the body")
                    new_ids.append(chunk_id(self.chunk_key, view[off:off - item]))
                    off -= item
            view.release()
            for i, item in enumerate(meta):
                if type(item) is _Local:
                    if item.k >= len(new_ids):
                        raise ProtocolError(f"zstd-ref head: local reference {item.k} past the body's chunks")
                    meta[i] = new_ids[item.k]
            restored = msgpack.packb(meta)
            if len(restored) != mlen:
                raise ProtocolError(f"zstd-ref head: piece list of {len(restored)} bytes, the pack says {mlen}")
            head = head[:packing.BODY_HDR.size] + restored
            self._recent.add(new_ids)
        return head + lit + new

    def _zstd_body(self, body: bytes, raw: int, reset: bool) -> bytes:
        if reset or self._zstd is None:
            dctx = zstandard.ZstdDecompressor(max_window_size=1 << self.window_log)
            # The output buffer must hold a whole body: python-zstandard's
            # writer stops once the input is consumed, and output that did
            # not fit a full buffer then stays inside zstd until the next
            # frame's bytes arrive (a body short by up to write_size bytes).
            # One byte more than the limit still lets the sink catch a bomb.
            self._zstd = dctx.stream_writer(self._sink, write_size=self.max_body + 1)
        sink = self._sink
        sink.parts, sink.n, sink.limit = [], 0, raw
        try:
            self._zstd.write(body)
        except _TooBig:
            self._broken = True
            raise _over_limit(f"zstd body decompresses past the {raw} bytes DATA announced "
                              "(a decompression bomb?)") from None
        except zstandard.ZstdError as e:
            self._broken = True
            if "memory" in str(e):  # the frame asks for a window above the cap
                raise _over_limit(f"zstd body needs a window above 2^{self.window_log}: {e}") from None
            raise ProtocolError(f"zstd body refused: {e}") from None
        out = b"".join(sink.parts)
        sink.parts = []
        return out


# ---- the literal column as columns (zstd-ref) ------------------------------------------


def to_columns(lit: bytes, crcs: bool = True) -> bytes:
    """A pack's literal column laid out field by field. It holds each
    record's 48-byte header followed by its payload when that is literal
    (packing keeps payloads under 512 bytes literal) and its padding;
    stored row by row, the headers' CRCs, sequence numbers and timestamps
    interleave and compress poorly. As columns (lengths, seq deltas,
    timestamp deltas, file ids, offsets, the count of literal bytes after
    each header, the last 8 header bytes, then those bytes), each stored as
    byte planes (native/columns.c), the seq deltas vanish and the high
    bytes of every column are runs of zeros: on the HIS workload 1.22 MB of
    rows took 0.79 MB of zstd-3 as plain columns, and byte planes took the
    columns a further 26 % down (434 -> 322 KB of zstd-1).
    Which payloads are literal is checked against the bytes (a header's
    marker must follow) and recorded, so a change of packing's threshold
    costs compression, never correctness. Bytes that do not parse as
    records (a file's literal tail) stay as they are: first byte _RAW.
    crcs=False (a segment run, whose records the receiver rebuilds whole):
    the CRC column, 4 incompressible bytes a record (17 % of the HIS
    workload's wire bytes), is replaced by one CRC32C over it; the receiver
    recomputes each record's CRC and checks them against it
    (_native.fill_crcs), so the sender's checksums still vouch for what the
    vault stores."""
    out = columns_encode(lit, packing.LITERAL_BELOW, crcs)
    return bytes([_RAW]) + lit if out is None else out


def from_columns(buf: bytes, lit_len: int) -> tuple[bytes, int, int | None]:
    """The inverse of to_columns over the start of buf: (the literal
    column, bytes of buf it used, the CRC digest when the records' CRCs were
    left out: they are zero in the column then, for the receiver to fill
    in and check). Anything inconsistent is a ProtocolError."""
    if not buf:
        raise ProtocolError("zstd-ref body: the literal column is missing")
    if buf[0] == _RAW:
        if len(buf) < 1 + lit_len:
            raise ProtocolError("zstd-ref body: the literal column is short")
        return buf[1:1 + lit_len], 1 + lit_len, None
    if buf[0] not in (_PLANAR, _PLANAR_NO_CRC):
        raise ProtocolError(f"zstd-ref body: the literal column has an unknown layout {buf[0]}")
    got = columns_decode(buf, lit_len)
    if got is None:
        raise ProtocolError(f"zstd-ref body: the literal column's records do not fit its {lit_len} bytes")
    lit, used, digest = got
    return lit, used, None if buf[0] == _PLANAR else digest


# ---- the adaptive level -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rung:
    codec: str
    level: int

    def __str__(self) -> str:
        return "lz4" if self.codec == "lz4" else f"zstd-{self.level}"


LADDER: tuple[Rung, ...] = (Rung("lz4", 0),) + tuple(Rung("zstd", n) for n in (1, 3, 6, 9, 12, 15, 19))
# Relative compression speed (raw bytes per CPU second, zstd-3 = 1) and
# wire/raw ratio, as priors until a rung is measured on this connection's
# data. The speeds are scaled by what measured rungs show (a slower CPU
# slows all rungs); the ratios are replaced once measured. Measured with
# the zstd and lz4 CLIs' benchmark mode on text-like 64 KiB blocks here.
PRIOR_SPEED = {"lz4": 2.5, "zstd-1": 1.4, "zstd-3": 1.0, "zstd-6": 0.45, "zstd-9": 0.3,
               "zstd-12": 0.12, "zstd-15": 0.05, "zstd-19": 0.012}
PRIOR_RATIO = {"lz4": 0.55, "zstd-1": 0.45, "zstd-3": 0.42, "zstd-6": 0.40, "zstd-9": 0.39,
               "zstd-12": 0.385, "zstd-15": 0.38, "zstd-19": 0.37}
PRIOR_ZSTD3_SPEED = 150e6  # bytes per CPU second before anything is measured
DEFAULT_CPU_BUDGET = 0.25  # of one core
DEFAULT_MARGIN = 2.0  # compression must be able to fill the link this many times over
DEFAULT_HOLD = 5  # decisions a stronger rung must win in a row before moving up
DEFAULT_ALPHA = 0.2  # weight of a new sample in the moving averages
# CPU measurements are summed until they cover this many raw bytes before
# they make one sample: a 250-byte frame costs its fixed overheads (a
# context, a dictionary, thread hand-offs) and, taken alone, reads as a
# compressor 100x slower than it is on the 4 MiB frames around it.
SAMPLE_BYTES = 256 << 10
PROBE_EVERY = 4  # decisions between probes of an unmeasured neighbour rung (AdaptiveLevel.probe)


@dataclass(slots=True)
class _Avg:
    value: float | None = None

    def add(self, x: float, alpha: float) -> None:
        self.value = x if self.value is None else (1 - alpha) * self.value + alpha * x


@dataclass(slots=True)
class _Batch:
    """CPU seconds and raw bytes summed until SAMPLE_BYTES (see there)."""

    raw: int = 0
    cpu: float = 0.0

    def add(self, raw_bytes: int, cpu_seconds: float) -> tuple[int, float] | None:
        self.raw += raw_bytes
        self.cpu += cpu_seconds
        if self.raw < SAMPLE_BYTES:
            return None
        out = self.raw, self.cpu
        self.raw, self.cpu = 0, 0.0
        return out


@dataclass
class AdaptiveLevel:
    """Chooses the ladder rung from measurements (module docstring). No
    clock inside: the transport feeds measured quantities."""

    cpu_budget: float = DEFAULT_CPU_BUDGET
    margin: float = DEFAULT_MARGIN
    hold: int = DEFAULT_HOLD
    alpha: float = DEFAULT_ALPHA
    current: int = 2  # zstd-3 until measurements say otherwise
    link_rate: _Avg = field(default_factory=_Avg)      # wire bytes acknowledged per second
    demand: _Avg = field(default_factory=_Avg)         # raw bytes per second the journal produces
    speed: dict[int, _Avg] = field(default_factory=dict)  # raw bytes per CPU second, per rung
    overhead: _Avg = field(default_factory=_Avg)       # CPU seconds per raw byte outside compression
    _cpu_batch: dict[int, _Batch] = field(default_factory=dict)  # per rung
    _overhead_batch: _Batch = field(default_factory=_Batch)
    ratio: dict[int, _Avg] = field(default_factory=dict)  # wire / raw, per rung
    _pending: int | None = None
    _streak: int = 0
    _decisions: int = 0

    @property
    def rung(self) -> Rung:
        return LADDER[self.current]

    def observe_link(self, wire_bytes: int, seconds: float) -> None:
        """The receiver acknowledged wire_bytes over `seconds`."""
        if seconds > 0 and wire_bytes > 0:
            self.link_rate.add(wire_bytes / seconds, self.alpha)

    def observe_demand(self, raw_bytes: int, seconds: float) -> None:
        """The journal grew by raw_bytes over `seconds` (0 is a valid sample:
        idle). While the sender is catching up, leave this alone: the link
        sets the pace then."""
        if seconds > 0:
            self.demand.add(raw_bytes / seconds, self.alpha)

    def observe_compression(self, rung: int | Rung, raw_bytes: int, wire_bytes: int,
                            cpu_seconds: float) -> None:
        """One real frame: raw_bytes in, wire_bytes out, cpu_seconds of this
        thread's CPU (time.thread_time) spent compressing it."""
        i = LADDER.index(rung) if isinstance(rung, Rung) else rung
        if raw_bytes <= 0:
            return
        self.ratio.setdefault(i, _Avg()).add(max(wire_bytes, 1) / raw_bytes, self.alpha)
        sample = self._cpu_batch.setdefault(i, _Batch()).add(raw_bytes, max(cpu_seconds, 0.0))
        if sample is not None and sample[1] > 0:
            self.speed.setdefault(i, _Avg()).add(sample[0] / sample[1], self.alpha)

    def observe_overhead(self, raw_bytes: int, cpu_seconds: float) -> None:
        """The sender spent cpu_seconds of process CPU outside compression
        (reading the journal, packing and hashing chunks, TLS, the event
        loop) on raw_bytes of DATA bodies. The budget is the sender's whole
        CPU: on a well compressing workload (HIS: 11x) the link carries
        13 MB/s of raw bodies at 10 Mbit/s, and this part alone then
        takes 15 % of a core, which the rung's compression must leave."""
        if raw_bytes > 0:
            sample = self._overhead_batch.add(raw_bytes, max(cpu_seconds, 0.0))
            if sample is not None:
                self.overhead.add(sample[1] / sample[0], self.alpha)

    def estimate(self, i: int) -> tuple[float, float]:
        """(raw bytes per CPU second, wire/raw ratio) of rung i: measured, or
        the prior scaled by the machine speed and the data's compressibility
        the measured rungs show."""
        name = str(LADDER[i])
        r = self.ratio.get(i)
        if r is not None and r.value is not None:
            ratio = r.value
        else:
            # scaled like the speeds: on data that compresses 11x at zstd-3,
            # zstd-9's absolute prior (0.39) would promise a raw pace 4x too
            # low, so a rung far over the CPU budget looked cheap until tried.
            # By rungs of the same codec where there are some: zstd-ref's
            # 95x on page versions and lz4's 3x (no dictionary) averaged
            # say nothing of either. Scaled by the other codec's rungs, a
            # rung is only ever made to look worse, never better: zstd-ref's
            # 95x comes from its dictionary, which lz4 does not have, and
            # credited with it lz4 looked 30 % worse than zstd-3 instead of
            # 25x, and was chosen while catching up (pgbench: 37 frames of 187).
            same: list[float] = []
            other: list[float] = []
            for j, a in self.ratio.items():
                if a.value is not None:
                    (same if LADDER[j].codec == LADDER[i].codec else other).append(
                        a.value / PRIOR_RATIO[str(LADDER[j])])
            if same:
                scale = sum(same) / len(same)
            else:
                scale = max(1.0, sum(other) / len(other)) if other else 1.0
            ratio = PRIOR_RATIO[name] * scale
        s = self.speed.get(i)
        if s is not None and s.value is not None:
            return s.value, ratio
        factors = [a.value / (PRIOR_SPEED[str(LADDER[j])] * PRIOR_ZSTD3_SPEED)
                   for j, a in self.speed.items() if a.value is not None]
        machine = sum(factors) / len(factors) if factors else 1.0
        return PRIOR_SPEED[name] * PRIOR_ZSTD3_SPEED * machine, ratio

    def fits(self, i: int, slack: float = 1.0) -> bool:
        """Whether rung i keeps up with the link (with margin) and within
        the CPU budget, both tightened by `slack` (> 1 to move up)."""
        link = self.link_rate.value
        if link is None:
            return i <= 2  # nothing known: nothing stronger than the default
        speed, ratio = self.estimate(i)
        full = link / ratio  # raw bytes per second that fill the link
        # The sender compresses what the journal produces, or, when behind,
        # what the link can take; the CPU that costs must fit the budget.
        pace = full if self.demand.value is None else min(full, self.demand.value)
        cpu = pace * (1 / speed + (self.overhead.value or 0.0))  # of one core
        return speed >= self.margin * slack * pace and cpu <= self.cpu_budget / slack

    def drain(self, i: int, slack: float = 1.0) -> float:
        """Raw bytes per second rung i moves while behind: what the link
        takes at its ratio, or what the CPU budget (tightened by slack)
        lets it prepare, whichever is less (0 when the link is not
        measured yet)."""
        link = self.link_rate.value
        if link is None:
            return 0.0
        speed, ratio = self.estimate(i)
        return min(link / ratio, self.cpu_budget / slack / (1 / speed + (self.overhead.value or 0.0)))

    def smallest(self, rungs: list[int]) -> int | None:
        """Of rungs, the one expected to send the fewest bytes (the highest
        on a tie). A higher level is not always smaller: zstd-ref at level 3
        sends more than at level 1 on a database's page versions (probe),
        and what is measured on this connection's data decides."""
        return min(rungs, key=lambda i: (self.estimate(i)[1], -i), default=None)

    def best(self, slack: float = 1.0) -> int:
        """The strongest rung (fewest bytes) that keeps up within the
        budget (`fits`), unless, while catching up, another rung would
        drain the backlog clearly faster within the same budget."""
        fit = self.smallest([i for i in range(len(LADDER)) if self.fits(i, slack)])
        if fit is not None and (self.demand.value is not None or self.link_rate.value is None):
            return fit  # keeping up with the journal: the fewest bytes that do
        # Catching up. On data that dedupes and compresses 40-100x (a
        # database's page versions under zstd-ref) the sender's own work per
        # raw byte (reading, chunk ids, packing) is over the budget at any
        # rung that fills the link, so only lz4 (no dictionary) "fits": it
        # fills the link with 20x the bytes and drains the backlog 4x
        # slower than zstd-ref 1 would on the same CPU. Take the rung that
        # drains fastest within the budget (the strongest of those within
        # 10 % of it); a fitting rung that drains as fast stays.
        rates = [self.drain(i, slack) for i in range(len(LADDER))]
        top = max(rates)
        if fit is not None and rates[fit] >= 0.8 * top:
            return fit
        return self.smallest([i for i, r in enumerate(rates) if r >= 0.9 * top]) or 0

    def choose(self) -> Rung:
        """Decide after new measurements: at most one change, with
        hysteresis. The rung returned is the one to use for the next
        frame: the current one, or now and then a neighbour to measure
        (`probe`); observe_compression must be told which."""
        self._decisions += 1
        if not self.fits(self.current):
            self.current = self.best()
            self._pending, self._streak = None, 0
            return self.probe() or self.rung
        up = self.best(slack=1.25)
        # up must also be where the next decision would stay: a rung the
        # drain rule picks (it does not fit) is left at once for the fitting
        # one best() keeps, and the level would swing between the two
        if up != self.current and self.smallest([up, self.current]) == up and (self.fits(up) or self.best() == up):
            if up == self._pending:
                self._streak += 1
            else:
                self._pending, self._streak = up, 1
            if self._streak >= self.hold:
                self.current = up
                self._pending, self._streak = None, 0
        else:
            self._pending, self._streak = None, 0
        return self.probe() or self.rung

    def probe(self) -> Rung | None:
        """Every PROBE_EVERY decisions, a zstd neighbour of the current
        rung whose ratio is not measured yet, for one frame. The priors
        order the levels as plain zstd does, and zstd-ref does not always
        follow them: on page versions compressed against the vault's old
        ones level 1 sends less than level 3 (HIS: 1.50 vs 1.64 MB), on
        new images level 3 sends 9 % less than level 1 (PACS). Only a
        measurement tells; a probe costs one frame at the neighbour's
        ratio or CPU. lz4 is never probed: on page versions it sends 25x
        the bytes (one 4 MiB frame would add most of HIS's 1.5 MB)."""
        if self._decisions % PROBE_EVERY:
            return None
        for j in (self.current - 1, self.current + 1):
            if 0 <= j < len(LADDER) and LADDER[j].codec == "zstd" and \
                    (j not in self.ratio or self.ratio[j].value is None):
                return LADDER[j]
        return None

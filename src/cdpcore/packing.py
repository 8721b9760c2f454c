"""The pack: what one DATA frame's body holds before compression.

Theory of operation. A sender has a run of bytes of one target (whole
journal records of a segment, or plain bytes of audit.log or a base file).
Most of a journal's volume is payload that the vault may already hold (a
page written twice, a PACS file copied), while the 48-byte record headers
never repeat (seq and CRC differ). So a plaintext pack cuts each record into
its header (always literal), and its payload: literal under 512 bytes, one
chunk from 512 bytes to 64 KiB, FastCDC chunks beyond. Plain bytes are cut
by FastCDC alone. Chunks the vault holds travel as their 32-byte id; the
rest travel as bytes, and the receiver computes their ids itself (with its
own dedupe key), so a sender can neither poison the vault's chunk index nor
waste wire bytes on ids the receiver can compute.

The body keeps literals and new chunks in two columns after the piece
list, so that the compressor sees headers next to headers.

Encrypted sources: the vault must not learn plaintext, so everything is a
chunk (FastCDC over the raw bytes, headers included), compressed alone and
sealed with AES-SIV (crypto.py); the body carries the recipe (id, plain
length, ciphertext length) and the new ciphertexts. The vault stores them
as they are; only a holder of the key file can rebuild the bytes
(`open_chunk`).

The byte layout is in docs/protocol.md, "Pack (DATA body)"; tests pin it.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import zstandard

from cdpcore.chunking import cuts
from cdpcore.crypto import ID_SIZE, Keys, chunk_id, seal, unseal
from cdpcore.errors import KeyFileError, ProtocolError
from cdpcore.format import REC_HDR_SIZE, align8

MAGIC = b"CDPK"
VERSION = 1
MODE_PLAIN = 0
MODE_SEALED = 1
BODY_HDR = struct.Struct("<4sBBHIII")  # magic, version, mode, reserved, meta, literals, chunks

LITERAL_BELOW = 512  # a payload shorter than this is not worth an id
ONE_CHUNK_UP_TO = 64 * 1024  # a payload up to this size is one chunk
CDC_AVG = 16 * 1024  # FastCDC average for longer payloads, plain files, sealed packs
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024  # what unpack rebuilds at most, unless told
DEFAULT_SEALED_LEVEL = 3

# First byte of a sealed chunk's plaintext: how the rest is stored.
_STORED, _ZSTD = 0, 1


@dataclass(frozen=True)
class _Piece:
    start: int
    end: int
    id: bytes | None  # None: a literal


@dataclass
class Pack:
    """One target's bytes cut into pieces; encode() gives the raw body."""

    buf: bytes
    pieces: list[_Piece]
    ids: list[bytes]  # chunk ids worth offering (unknown to the sender), first occurrence order
    known: set[bytes]  # ids the sender already knew the vault holds
    keys: Keys | None = None
    level: int = DEFAULT_SEALED_LEVEL
    _sealed_cache: dict[bytes, bytes] = field(default_factory=dict, repr=False)

    @property
    def all_ids(self) -> list[bytes]:
        return [p.id for p in self.pieces if p.id is not None]

    def encode(self, held: set[bytes] | frozenset[bytes] = frozenset(),
               resend: set[bytes] | frozenset[bytes] = frozenset()) -> bytes:
        """The raw body. A chunk in `held` or known at pack time travels as a
        reference, unless it is in `resend` (the vault answered NEED for it);
        a chunk repeated inside the pack is sent once."""
        if self.keys is not None:
            return self._encode_sealed(held, resend)
        meta: list[int | bytes] = []
        lit: list[memoryview] = []
        new: list[memoryview] = []
        sent: set[bytes] = set()
        view = memoryview(self.buf)
        for p in self.pieces:
            if p.id is None:
                lit.append(view[p.start:p.end])
                if meta and isinstance(meta[-1], int) and meta[-1] > 0:
                    meta[-1] += p.end - p.start  # literals next to each other are one run
                else:
                    meta.append(p.end - p.start)
            elif p.id in sent or ((p.id in held or p.id in self.known) and p.id not in resend):
                meta.append(p.id)
            else:
                new.append(view[p.start:p.end])
                meta.append(-(p.end - p.start))
                sent.add(p.id)
        return _body(MODE_PLAIN, msgpack.packb(meta), b"".join(lit), b"".join(new))

    def new_ids(self, held: set[bytes] | frozenset[bytes] = frozenset(),
                resend: set[bytes] | frozenset[bytes] = frozenset()) -> list[bytes]:
        """The ids of the chunks encode(held, resend) carries as bytes, in
        body order: what codec.new_chunk_ids would compute from the body by
        hashing every new chunk again (a tenth of the sender's CPU on the
        HIS workload), known here from the pack for free. The choice below
        must stay encode()'s."""
        assert self.keys is None, "sealed bodies carry no plaintext chunk ids"
        out: list[bytes] = []
        sent: set[bytes] = set()
        for p in self.pieces:
            if p.id is None or p.id in sent or ((p.id in held or p.id in self.known) and p.id not in resend):
                continue
            out.append(p.id)
            sent.add(p.id)
        return out

    def _encode_sealed(self, held: set[bytes] | frozenset[bytes],
                       resend: set[bytes] | frozenset[bytes]) -> bytes:
        meta: list[int | bytes] = []
        new: list[bytes] = []
        sent: set[bytes] = set()
        for p in self.pieces:
            assert p.id is not None
            if p.id in sent or ((p.id in held or p.id in self.known) and p.id not in resend):
                meta += [p.id, p.end - p.start, 0]
            else:
                ct = self._sealed_cache.get(p.id)
                if ct is None:
                    ct = self._sealed_cache[p.id] = seal_chunk(self.keys, self.buf[p.start:p.end], self.level)  # type: ignore[arg-type]
                meta += [p.id, p.end - p.start, len(ct)]
                new.append(ct)
                sent.add(p.id)
        return _body(MODE_SEALED, msgpack.packb(meta), b"", b"".join(new))


def _body(mode: int, meta: bytes, lit: bytes, new: bytes) -> bytes:
    return BODY_HDR.pack(MAGIC, VERSION, mode, 0, len(meta), len(lit), len(new)) + meta + lit + new


def pack(buf: bytes, chunk_key: bytes, known: Callable[[bytes], bool] | None = None,
         keys: Keys | None = None, *, records: bool = True, level: int = DEFAULT_SEALED_LEVEL,
         page: int = 0) -> Pack:
    """Cut `buf` into a pack. `records`: buf is a run of whole journal records
    (plain bytes otherwise: audit.log, base files). `known(id)`: the sender
    already knows the vault holds this chunk (it will not be offered).
    `keys`: an encrypted source (chunk_key is then unused: ids are keyed
    with keys.ids); `level` is the zstd level of each sealed chunk.
    `page` (plain bytes only, buf starting at a multiple of it in its
    file): cut into fixed pages of this size instead of FastCDC chunks. A
    database file in a base is cut at its pages so that a page copied later
    (a rollback journal saves a page's old content before it is changed)
    dedupes against the base; the wire format is the same either way."""
    buf = bytes(buf)
    if keys is not None:
        pieces = _cdc_pieces(buf, 0, len(buf), keys.ids, min_chunk=1)
    elif records:
        pieces = _record_pieces(buf, chunk_key)
    elif page:
        view = memoryview(buf)
        pieces = [_Piece(o, min(o + page, len(buf)),
                         chunk_id(chunk_key, view[o:o + page]) if len(buf) - o >= LITERAL_BELOW else None)
                  for o in range(0, len(buf), page)]
        view.release()
    else:
        pieces = _cdc_pieces(buf, 0, len(buf), chunk_key, min_chunk=LITERAL_BELOW)
    ids: list[bytes] = []
    known_ids: set[bytes] = set()
    seen: set[bytes] = set()
    for p in pieces:
        if p.id is None or p.id in seen:
            continue
        seen.add(p.id)
        if known is not None and known(p.id):
            known_ids.add(p.id)
        else:
            ids.append(p.id)
    return Pack(buf, pieces, ids, known_ids, keys, level)


def _cdc_pieces(buf: bytes, start: int, end: int, key: bytes, min_chunk: int) -> list[_Piece]:
    """FastCDC chunks of buf[start:end]; a chunk under min_chunk (only the
    last can be) is a literal."""
    out: list[_Piece] = []
    view = memoryview(buf)[start:end]
    prev = 0
    for cut in cuts(view, CDC_AVG):
        if cut - prev < min_chunk:
            out.append(_Piece(start + prev, start + cut, None))
        else:
            out.append(_Piece(start + prev, start + cut, chunk_id(key, view[prev:cut])))
        prev = cut
    view.release()
    return out


def _record_pieces(buf: bytes, key: bytes) -> list[_Piece]:
    out: list[_Piece] = []
    view = memoryview(buf)
    n = len(buf)
    pos = 0
    lit_start = 0  # start of the literal run being built
    while pos < n:
        if pos + REC_HDR_SIZE > n:
            raise ValueError(f"pack: record header at offset {pos} runs past the end of the buffer ({n})")
        plen = int.from_bytes(buf[pos + 4:pos + 8], "little")
        pstart = pos + REC_HDR_SIZE
        pend = pstart + plen
        nxt = pos + align8(REC_HDR_SIZE + plen)
        if nxt > n:
            raise ValueError(f"pack: record at offset {pos} ({plen} byte payload) runs past the end "
                             f"of the buffer ({n})")
        if plen >= LITERAL_BELOW:
            if pstart > lit_start:
                out.append(_Piece(lit_start, pstart, None))
            if plen <= ONE_CHUNK_UP_TO:
                out.append(_Piece(pstart, pend, chunk_id(key, view[pstart:pend])))
            else:
                out.extend(_cdc_pieces(buf, pstart, pend, key, min_chunk=1))
            lit_start = pend  # the padding joins the next header's literal run
        pos = nxt
    if n > lit_start:
        out.append(_Piece(lit_start, n, None))
    view.release()
    return out


# ---- the receiving side ------------------------------------------------------

@dataclass
class Unpacked:
    data: bytes  # the target's bytes (empty when chunks are missing)
    new_chunks: list[tuple[bytes, int, int]]  # (id, offset in data, length) of chunks sent as bytes
    missing: list[bytes]  # referenced ids that resolve() did not find


@dataclass
class SealedPack:
    recipe: list[tuple[bytes, int]]  # (id, plaintext length) in order
    new: list[tuple[bytes, bytes]]  # (id, ciphertext) sent in this body


def _parse(raw: bytes | bytearray | memoryview, want_mode: int) -> tuple[list[object], memoryview, memoryview]:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"pack body must be bytes, got {type(raw).__name__}")
    raw = memoryview(raw)
    if len(raw) < BODY_HDR.size:
        raise ProtocolError(f"pack body of {len(raw)} bytes is shorter than its {BODY_HDR.size}-byte header")
    magic, version, mode, reserved, mlen, llen, clen = BODY_HDR.unpack_from(raw)
    if magic != MAGIC:
        raise ProtocolError(f"pack body: expected magic {MAGIC!r}, got {bytes(magic)!r}")
    if version != VERSION:
        raise ProtocolError(f"pack body: expected version {VERSION}, got {version}")
    if mode != want_mode:
        names = {MODE_PLAIN: "plaintext", MODE_SEALED: "sealed"}
        raise ProtocolError(f"pack body: expected a {names[want_mode]} pack, got mode {mode}")
    if reserved:
        raise ProtocolError(f"pack body: reserved field is {reserved}, expected 0")
    if BODY_HDR.size + mlen + llen + clen != len(raw):
        raise ProtocolError(f"pack body: header says {BODY_HDR.size + mlen + llen + clen} bytes, "
                            f"body has {len(raw)}")
    m0 = BODY_HDR.size
    try:
        meta = msgpack.unpackb(raw[m0:m0 + mlen], use_list=True, max_bin_len=ID_SIZE, max_str_len=0,
                               max_array_len=mlen, max_map_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"pack body: piece list does not decode ({type(e).__name__})") from None
    if not isinstance(meta, list):
        raise ProtocolError("pack body: piece list is not an array")
    return meta, raw[m0 + mlen:m0 + mlen + llen], raw[m0 + mlen + llen:]


def unpack(raw: bytes | bytearray | memoryview, resolve: Callable[[bytes], bytes | None],
           chunk_key: bytes | None, max_output: int = DEFAULT_MAX_OUTPUT) -> Unpacked:
    """Rebuild a plaintext pack's bytes. `resolve(id)` gives a referenced
    chunk's bytes or None; chunks sent earlier in the same body resolve
    first. The ids of new chunks are computed with `chunk_key` (ids are
    b"" without it). Any malformed body, or output beyond max_output, is a
    ProtocolError; nothing larger than max_output is ever allocated."""
    meta, lit, new = _parse(raw, MODE_PLAIN)
    # First pass: check the structure and the total before building anything.
    total = lit_used = new_used = 0
    for item in meta:
        if type(item) is int:
            if item == 0:
                raise ProtocolError("pack body: empty piece")
            if item > 0:
                lit_used += item
            else:
                new_used -= item
            total += abs(item)
        elif type(item) is bytes:
            if len(item) != ID_SIZE:
                raise ProtocolError(f"pack body: chunk reference of {len(item)} bytes, expected {ID_SIZE}")
        else:
            raise ProtocolError(f"pack body: piece of type {type(item).__name__}")
        if total > max_output:
            raise ProtocolError(f"pack body: output exceeds the limit of {max_output} bytes")
    if lit_used != len(lit) or new_used != len(new):
        raise ProtocolError(f"pack body: pieces use {lit_used} literal and {new_used} chunk bytes, "
                            f"columns hold {len(lit)} and {len(new)}")
    out = bytearray()
    new_chunks: list[tuple[bytes, int, int]] = []
    local: dict[bytes, tuple[int, int]] = {}  # id -> (offset, length) in out, for chunks of this body
    missing: list[bytes] = []
    lp = cp = 0
    for item in meta:
        if type(item) is int and item > 0:
            out += lit[lp:lp + item]
            lp += item
        elif type(item) is int:
            n = -item
            piece = new[cp:cp + n]
            cp += n
            cid = chunk_id(chunk_key, piece) if chunk_key is not None else b""
            new_chunks.append((cid, len(out), n))
            if cid:
                local.setdefault(cid, (len(out), n))
            out += piece
        else:
            assert isinstance(item, bytes)
            if item in local:
                o, n = local[item]
                out += out[o:o + n]
                continue
            data = resolve(item)
            if data is None:
                missing.append(item)
                continue
            out += data
        if len(out) > max_output:
            raise ProtocolError(f"pack body: output exceeds the limit of {max_output} bytes")
    if missing:
        return Unpacked(b"", [], list(dict.fromkeys(missing)))
    return Unpacked(bytes(out), new_chunks, [])


def unpack_sealed(raw: bytes | bytearray | memoryview, max_output: int = DEFAULT_MAX_OUTPUT) -> SealedPack:
    """The recipe and the new ciphertexts of a sealed pack, for a vault that
    cannot decrypt: it checks the structure and sizes only."""
    meta, lit, new = _parse(raw, MODE_SEALED)
    if len(lit):
        raise ProtocolError("pack body: a sealed pack carries no literals")
    if len(meta) % 3:
        raise ProtocolError("pack body: sealed recipe is not (id, length, sealed length) triples")
    recipe: list[tuple[bytes, int]] = []
    out: list[tuple[bytes, bytes]] = []
    total = cp = 0
    for i in range(0, len(meta), 3):
        cid, plen, clen = meta[i:i + 3]
        if type(cid) is not bytes or len(cid) != ID_SIZE:
            raise ProtocolError(f"pack body: sealed chunk {i // 3} has no {ID_SIZE}-byte id")
        if type(plen) is not int or type(clen) is not int or plen <= 0 or clen < 0:
            raise ProtocolError(f"pack body: sealed chunk {i // 3} has bad lengths ({plen!r}, {clen!r})")
        total += plen
        if total > max_output:
            raise ProtocolError(f"pack body: output exceeds the limit of {max_output} bytes")
        recipe.append((cid, plen))
        if clen:
            if cp + clen > len(new):
                raise ProtocolError("pack body: sealed chunks run past the end of the body")
            out.append((cid, bytes(new[cp:cp + clen])))
            cp += clen
    if cp != len(new):
        raise ProtocolError(f"pack body: {len(new) - cp} bytes after the last sealed chunk")
    return SealedPack(recipe, out)


def seal_chunk(keys: Keys, plain: bytes | memoryview, level: int = DEFAULT_SEALED_LEVEL) -> bytes:
    """Compress one chunk alone (kept stored if zstd does not shrink it),
    then seal it."""
    z = zstandard.ZstdCompressor(level=level).compress(plain)
    inner = bytes([_ZSTD]) + z if len(z) < len(plain) else bytes([_STORED]) + bytes(plain)
    return seal(keys, inner)


def open_chunk(keys: Keys, cid: bytes, ciphertext: bytes, plain_len: int) -> bytes:
    """The inverse of seal_chunk, checked three ways: the AEAD tag, the
    plaintext length the recipe gives, and the chunk id."""
    inner = unseal(keys, ciphertext)
    if inner[:1] == bytes([_ZSTD]):
        try:
            plain = zstandard.ZstdDecompressor().decompress(inner[1:], max_output_size=plain_len)
        except zstandard.ZstdError:
            raise KeyFileError(f"sealed chunk {cid.hex()[:16]} does not decompress") from None
    elif inner[:1] == bytes([_STORED]):
        plain = inner[1:]
    else:
        raise KeyFileError(f"sealed chunk {cid.hex()[:16]}: unknown storage byte")
    if len(plain) != plain_len:
        raise KeyFileError(f"sealed chunk {cid.hex()[:16]}: {len(plain)} bytes, recipe says {plain_len}")
    if chunk_id(keys.ids, plain) != cid:
        raise KeyFileError(f"sealed chunk {cid.hex()[:16]}: content does not match its id")
    return plain


# ---- references the receiver can resolve before decompressing (codec zstd-ref) ----


def head_size(body: bytes | bytearray | memoryview) -> int:
    """Length of a plaintext body's header and piece list (what the receiver
    must see first to know the body's references)."""
    if len(body) < BODY_HDR.size:
        raise ProtocolError(f"pack body of {len(body)} bytes is shorter than its {BODY_HDR.size}-byte header")
    mlen = BODY_HDR.unpack_from(body)[4]
    return BODY_HDR.size + mlen


def prefix_plan(p: Pack, held: set[bytes] | frozenset[bytes] = frozenset(),
                resend: set[bytes] | frozenset[bytes] = frozenset()) -> tuple[bytes, bytes]:
    """For the body p.encode(held, resend) gives: a bitmap over its
    references in piece-list order (bit i of byte i//8, LSB first) marking
    those the receiver resolves from its store (held before this body, each
    id marked once), and those chunks' bytes in that order. The codec uses
    them as a dictionary, so a page compresses against its previous version
    that the vault already holds (a rollback journal's copy of it)."""
    if p.keys is not None:
        raise ValueError("sealed packs have no resolvable prefix")
    sent: set[bytes] = set()
    taken: set[bytes] = set()
    bits = bytearray()
    data: list[bytes] = []
    n = 0
    view = memoryview(p.buf)
    for piece in p.pieces:
        if piece.id is None:
            continue
        if piece.id in sent or ((piece.id in held or piece.id in p.known) and piece.id not in resend):
            if n % 8 == 0:
                bits.append(0)
            if piece.id not in sent and piece.id not in taken:
                bits[-1] |= 1 << (n % 8)
                taken.add(piece.id)
                data.append(bytes(view[piece.start:piece.end]))
            n += 1
        else:
            sent.add(piece.id)
    view.release()
    return bytes(bits), b"".join(data)


def head_refs(head: bytes | bytearray | memoryview) -> list[bytes]:
    """The references (chunk ids, in piece-list order, repeats included) of
    a plaintext body's header and piece list; malformed input is a
    ProtocolError."""
    head = memoryview(head)
    if len(head) < BODY_HDR.size:
        raise ProtocolError(f"pack head of {len(head)} bytes is shorter than its {BODY_HDR.size}-byte header")
    magic, version, mode, reserved, mlen, _llen, _clen = BODY_HDR.unpack_from(head)
    if magic != MAGIC or version != VERSION or mode != MODE_PLAIN or reserved:
        raise ProtocolError(f"pack head: expected a version {VERSION} plaintext pack header")
    if BODY_HDR.size + mlen != len(head):
        raise ProtocolError(f"pack head: piece list of {mlen} bytes, head holds {len(head) - BODY_HDR.size}")
    try:
        meta = msgpack.unpackb(head[BODY_HDR.size:], use_list=True, max_bin_len=ID_SIZE, max_str_len=0,
                               max_array_len=mlen, max_map_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"pack head: piece list does not decode ({type(e).__name__})") from None
    if not isinstance(meta, list):
        raise ProtocolError("pack head: piece list is not an array")
    out = []
    for item in meta:
        if type(item) is bytes:
            if len(item) != ID_SIZE:
                raise ProtocolError(f"pack head: chunk reference of {len(item)} bytes, expected {ID_SIZE}")
            out.append(item)
        elif type(item) is not int:
            raise ProtocolError(f"pack head: piece of type {type(item).__name__}")
    return out

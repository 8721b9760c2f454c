"""Frames of the replication protocol: one frozen dataclass per frame type,
`encode()` to bytes and an incremental `FrameDecoder` (docs/protocol.md).

Theory of operation
-------------------
A frame on the wire is a 4-byte little-endian length L, then L bytes holding
one msgpack map whose key "t" names the frame type. The peer is not trusted:
every byte it sends goes through three gates before a frame object exists.

1. The length prefix is checked against the decoder's cap *before* any of
   the body is buffered, so a huge prefix costs four bytes, not a buffer.
   The decoder holds at most cap + 4 bytes whatever the peer sends.
2. A structural pre-scan walks the msgpack bytes without building anything:
   container nesting depth, the total number of objects, declared container
   lengths against the bytes that remain (msgpack's C unpacker allocates a
   list or dict of the *declared* size up front, so without this a few bytes
   of nested "array of 65,536" headers would allocate gigabytes), no ext
   types, no trailing bytes. After it, building the objects costs memory in
   proportion to the frame's size.
3. msgpack builds the objects (strings decoded with surrogateescape, so that
   a path that is not UTF-8 on the source's file system survives byte for
   byte, as `os.fsdecode` gives it), duplicate or non-string map keys are
   refused, and the frame class's `__post_init__` checks the presence, type
   and range of every field. Unknown keys are ignored (forward
   compatibility); an unknown "t" is an error.

Every failure is a `ProtocolError` with a one-line message naming the frame
and field; nothing else escapes the decoder (tests/test_protocol_fuzz.py).

Field values are checked in `__post_init__`, so a frame object that exists
is a valid frame: the sending side cannot build an invalid one either.
Checks that need context (the peer's limits, which offers are outstanding,
which segments are open) belong to `connection.py`.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple, Union

import msgpack

from .errors import ERROR_CODE_RE, ProtocolError, fail, short

__all__ = [
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS",
    "DEFAULT_FRAME", "DEFAULT_BODY", "DEFAULT_WINDOW_LOG", "DEFAULT_INFLIGHT", "DEFAULT_OFFERS",
    "DEFAULT_OFFER_IDS", "MIN_FRAME", "MAX_FRAME", "MAX_BODY", "MAX_OFFERS", "MAX_OFFER_IDS",
    "MAX_LIST", "MAX_OBJECTS", "MAX_DEPTH", "PREFIX",
    "Limits", "SegPos", "PruneSeg", "Position",
    "Hello", "Welcome", "Error", "Segment", "Offer", "Have", "Data", "Need", "Seal", "File",
    "Base", "Prune", "Ack", "Ping", "Pong", "Bye", "Frame", "FRAME_TYPES",
    "encode", "decode_payload", "FrameDecoder", "check_file_path", "check_base_name",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1, 1)  # [min, max] this code speaks

PREFIX = struct.Struct("<I")

# Defaults the receiver announces in WELCOME (docs/replication.md, "Flow
# control and limits"), and the hard bounds on what it may announce.
DEFAULT_FRAME = 8 << 20
DEFAULT_BODY = 24 << 20
DEFAULT_WINDOW_LOG = 25
DEFAULT_INFLIGHT = 64 << 20
DEFAULT_OFFERS = 4
DEFAULT_OFFER_IDS = 65536
MIN_FRAME = 64 << 10  # below this a DATA frame carries too little to be worth its overhead
MAX_FRAME = 64 << 20  # no decoder ever buffers more than this (+ 4)
MAX_BODY = 256 << 20
MAX_OFFERS = 64
MAX_OFFER_IDS = 65536
MAX_LIST = 65536  # segments or bases in a position or a prune: 4 TiB of 64 MiB segments
MAX_OBJECTS = 1 << 19  # msgpack objects in one frame: bounds the memory a frame can expand to
MAX_DEPTH = 8  # nested containers; the deepest frame needs 4 (welcome > position > segments > [seg, ...])
MAX_PATH = 4096  # bytes, as PATH_MAX
MAX_NAME = 255  # bytes of one path component, as NAME_MAX
MAX_AGENT = 256
MAX_MESSAGE = 1024

U63 = 1 << 63
I64_MIN = -(1 << 63)
U32 = 1 << 32

CODECS = frozenset({"zstd", "zstd-ref", "lz4", "none"})  # zstd-ref: codec.py (docs/replication.md, Compression)
KINDS = frozenset({"file", "dir", "symlink"})
# A source name is a certificate CN; a domain name has the same rules.
_SOURCE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Control characters (C0, DEL, C1) and surrogates have no place in the text
# fields (agent, message, names): they would break the one-line logs.
_UNSANE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Paths may hold any byte but NUL; undecodable bytes arrive as the lone
# surrogates U+DC80..U+DCFF (surrogateescape), other surrogates cannot be
# encoded back and are refused.
_BAD_PATH_RE = re.compile(r"[\x00\ud800-\udc7f\udd00-\udfff]")


# ---- field checks ------------------------------------------------------------
#
# Each returns the (possibly normalised) value or raises ProtocolError naming
# the frame and field. `bool` is a subclass of `int` in Python but a distinct
# msgpack type, so integer fields test `type(v) is int`.


def _where(t: str, name: str) -> str:
    return f"{t} frame, field {name!r}"


def _tname(v: object) -> str:
    return "nil" if v is None else type(v).__name__


def _int(t: str, name: str, v: object, lo: int = 0, hi: int = U63) -> int:
    if type(v) is not int:
        fail(_where(t, name), f"expected an integer, got {_tname(v)}")
    if not lo <= v < hi:
        fail(_where(t, name), f"{v} out of range [{lo}, {hi})")
    return v


def _opt_int(t: str, name: str, v: object, lo: int = 0, hi: int = U63) -> int | None:
    return None if v is None else _int(t, name, v, lo, hi)


def _bool(t: str, name: str, v: object) -> bool:
    if type(v) is not bool:
        fail(_where(t, name), f"expected a boolean, got {_tname(v)}")
    return v


def _bin(t: str, name: str, v: object, size: int | None = None, max_size: int | None = None) -> bytes:
    if type(v) is not bytes:
        if isinstance(v, (bytearray, memoryview)):
            v = bytes(v)  # a caller's buffer; frames hold immutable bytes
        else:
            fail(_where(t, name), f"expected bin, got {_tname(v)}")
    if size is not None and len(v) != size:
        fail(_where(t, name), f"expected {size} bytes, got {len(v)}")
    if max_size is not None and len(v) > max_size:
        fail(_where(t, name), f"{len(v)} bytes, more than {max_size}", "limit")
    return v


def _text(t: str, name: str, v: object, max_len: int) -> str:
    if type(v) is not str:
        fail(_where(t, name), f"expected a string, got {_tname(v)}")
    if len(v) > max_len:
        fail(_where(t, name), f"{len(v)} characters, more than {max_len}", "limit")
    if _UNSANE_RE.search(v):
        fail(_where(t, name), f"control character or invalid UTF-8 in {short(v)}")
    return v


def _source(t: str, name: str, v: object) -> str:
    if type(v) is not str:
        fail(_where(t, name), f"expected a string, got {_tname(v)}")
    if not _SOURCE_RE.fullmatch(v) or v in (".", ".."):
        fail(_where(t, name), f"{short(v)} is not a name of 1-64 characters [A-Za-z0-9._-]")
    return v


def _choice(t: str, name: str, v: object, allowed: frozenset[str]) -> str:
    if type(v) is not str:
        fail(_where(t, name), f"expected a string, got {_tname(v)}")
    if v not in allowed:
        fail(_where(t, name), f"{short(v)} is not one of {', '.join(sorted(allowed))}")
    return v


def _seq(t: str, name: str, v: object, max_len: int, min_len: int = 0) -> tuple[Any, ...]:
    if not isinstance(v, (list, tuple)):
        fail(_where(t, name), f"expected an array, got {_tname(v)}")
    if len(v) > max_len:
        fail(_where(t, name), f"{len(v)} entries, more than {max_len}", "limit")
    if len(v) < min_len:
        fail(_where(t, name), f"{len(v)} entries, fewer than {min_len}")
    return tuple(v)


def _ids(t: str, name: str, v: object) -> tuple[bytes, ...]:
    ids = _seq(t, name, v, MAX_OFFER_IDS, 1)
    if set(map(type, ids)) != {bytes} or set(map(len, ids)) != {32}:  # (C loops; the names come after)
        for i, x in enumerate(ids):
            if type(x) is not bytes or len(x) != 32:
                fail(_where(t, f"{name}[{i}]"), f"expected a 32-byte bin, got {_tname(x)} {short(x)}")
    return ids


def _component(where: str, part: str, whole: str) -> None:
    if part in ("", ".", ".."):
        fail(where, f"{short(whole)} is not a normalised relative path")
    if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
        fail(where, f"a component of {short(whole)} is longer than {MAX_NAME} bytes", "limit")


def _path_text(where: str, v: object) -> str:
    if type(v) is not str:
        fail(where, f"expected a string, got {_tname(v)}")
    if _BAD_PATH_RE.search(v):
        fail(where, f"NUL or an unencodable character in {short(v)}")
    if len(v.encode("utf-8", "surrogateescape")) > MAX_PATH:
        fail(where, f"path longer than {MAX_PATH} bytes", "limit")
    return v


def check_base_name(where: str, v: object) -> str:
    """A base's NAME: one path component (base/NAME/ in the journal)."""
    v = _path_text(where, v)
    if "/" in v:
        fail(where, f"{short(v)} is not a single path component")
    _component(where, v, v)
    return v


def check_file_path(where: str, v: object, base_only: bool = False, base_root: bool = False) -> str:
    """A replicated file's path, relative to the journal directory:
    `journal.json`, `audit.log` or `base/NAME/PATH`, normalised (no empty,
    '.' or '..' component, no leading or doubled '/'), so that a receiver
    joining it under its replica cannot leave it. `base_root`: `base/NAME`
    itself is allowed too (a FILE frame giving the base directory's mode
    and mtime)."""
    v = _path_text(where, v)
    if not base_only and v in ("journal.json", "audit.log"):
        return v
    parts = v.split("/")
    if len(parts) < (2 if base_root else 3) or parts[0] != "base":
        allowed = "base/NAME/PATH" if base_only else "journal.json, audit.log or base/NAME/PATH"
        fail(where, f"{short(v)} is not {allowed}")
    for part in parts:
        _component(where, part, v)
    return v


def _target(t: str, seg: object, file: object) -> tuple[int | None, str | None]:
    """The seg-or-file pair of DATA, NEED and ACK: exactly one is set."""
    if (seg is None) == (file is None):
        fail(f"{t} frame", "exactly one of 'seg' and 'file' must be given")
    if seg is not None:
        return _int(t, "seg", seg), None
    return None, check_file_path(_where(t, "file"), file)


# ---- plain data carried in frames -------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What the receiver announces in WELCOME and enforces; the sender obeys.

    frame: largest frame (the length prefix L), bytes.
    body: largest decompressed DATA body (`raw`), bytes.
    window_log: largest zstd window the receiver will decompress with (log2).
    inflight: DATA frame bytes (as encoded) the sender may have unacknowledged.
    offers: OFFERs the sender may have unanswered.
    offer_ids: ids in one OFFER (and in one NEED).
    """

    frame: int = DEFAULT_FRAME
    body: int = DEFAULT_BODY
    window_log: int = DEFAULT_WINDOW_LOG
    inflight: int = DEFAULT_INFLIGHT
    offers: int = DEFAULT_OFFERS
    offer_ids: int = DEFAULT_OFFER_IDS

    def __post_init__(self) -> None:
        t = "welcome"
        _int(t, "limits.frame", self.frame, MIN_FRAME, MAX_FRAME + 1)
        _int(t, "limits.body", self.body, MIN_FRAME, MAX_BODY + 1)
        _int(t, "limits.window_log", self.window_log, 10, 32)
        # At least one frame of the largest size (and its length prefix) must
        # fit in flight, or the sender could never send it.
        _int(t, "limits.inflight", self.inflight, self.frame + PREFIX.size, U63)
        _int(t, "limits.offers", self.offers, 1, MAX_OFFERS + 1)
        _int(t, "limits.offer_ids", self.offer_ids, 1, MAX_OFFER_IDS + 1)

    def _wire(self) -> dict[str, Any]:
        return {"frame": self.frame, "body": self.body, "window_log": self.window_log,
                "inflight": self.inflight, "offers": self.offers, "offer_ids": self.offer_ids}

    @classmethod
    def _from_wire(cls, m: object) -> Limits:
        m = _map("welcome", "limits", m)
        return cls(**{k: _get("welcome", m, k, prefix="limits.")
                      for k in ("frame", "body", "window_log", "inflight", "offers", "offer_ids")})


class SegPos(NamedTuple):
    """One segment in a WELCOME position: the receiver holds `size` bytes of
    segment `seg` whose header has CRC `header_crc`, durably."""

    seg: int
    header_crc: int
    size: int
    sealed: bool


class PruneSeg(NamedTuple):
    """One live segment in a PRUNE: number, header CRC, size."""

    seg: int
    header_crc: int
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Position:
    """The receiver's durable position (WELCOME): per segment its durable
    size, per replicated file its durable size, and the complete bases.
    `files` is a plain dict: treat it as read-only."""

    segments: tuple[SegPos, ...] = ()
    files: Mapping[str, int] = field(default_factory=dict)
    bases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t = "welcome"
        segs = []
        seen: set[int] = set()
        for i, s in enumerate(_seq(t, "position.segments", self.segments, MAX_LIST)):
            n = f"position.segments[{i}]"
            if not isinstance(s, (list, tuple)) or len(s) != 4:
                fail(_where(t, n), f"expected [seg, header_crc, size, sealed], got {short(s)}")
            sp = SegPos(_int(t, n + ".seg", s[0]), _int(t, n + ".header_crc", s[1], 0, U32),
                        _int(t, n + ".size", s[2]), _bool(t, n + ".sealed", s[3]))
            if sp.seg in seen:
                fail(_where(t, n), f"segment {sp.seg} listed twice")
            seen.add(sp.seg)
            segs.append(sp)
        object.__setattr__(self, "segments", tuple(segs))
        if not isinstance(self.files, Mapping):
            fail(_where(t, "position.files"), f"expected a map, got {_tname(self.files)}")
        if len(self.files) > MAX_LIST:
            fail(_where(t, "position.files"), f"{len(self.files)} entries, more than {MAX_LIST}", "limit")
        files = {}
        for k, v in self.files.items():
            files[check_file_path(_where(t, "position.files"), k)] = _int(t, f"position.files[{k!r}]", v)
        object.__setattr__(self, "files", files)
        bases = _seq(t, "position.bases", self.bases, MAX_LIST)
        for b in bases:
            check_base_name(_where(t, "position.bases"), b)
        object.__setattr__(self, "bases", bases)

    def segment(self, seg: int) -> SegPos | None:
        """The entry for segment `seg`, or None when the receiver has none."""
        for s in self.segments:
            if s.seg == seg:
                return s
        return None

    def _wire(self) -> dict[str, Any]:
        return {"segments": [list(s) for s in self.segments], "files": dict(self.files),
                "bases": list(self.bases)}

    @classmethod
    def _from_wire(cls, m: object) -> Position:
        m = _map("welcome", "position", m)
        return cls(segments=_get("welcome", m, "segments", prefix="position."),
                   files=_get("welcome", m, "files", prefix="position."),
                   bases=_get("welcome", m, "bases", prefix="position."))


# ---- frames ------------------------------------------------------------------

_MISSING: Any = object()


def _map(t: str, name: str, v: object) -> dict[str, Any]:
    if not isinstance(v, dict):
        fail(_where(t, name), f"expected a map, got {_tname(v)}")
    return v


def _get(t: str, m: dict[str, Any], key: str, nullable: bool = False, prefix: str = "") -> Any:
    """A field from a decoded map. Nullable fields may be absent (= nil);
    the others must be present."""
    v = m.get(key, _MISSING)
    if v is _MISSING:
        if nullable:
            return None
        fail(f"{t} frame", f"missing field {prefix + key!r}")
    return v


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """Sender -> receiver, first frame."""

    T: ClassVar[str] = "hello"
    versions: tuple[int, int]
    uuid: bytes
    encrypted: bool
    domain: str | None
    agent: str
    # the end-to-end key's fingerprint (crypto.key_id), encrypted sources
    # only; optional on the wire: an older sender does not send it
    key_id: bytes | None = None

    def __post_init__(self) -> None:
        v = _seq(self.T, "versions", self.versions, 2, 2)
        lo, hi = _int(self.T, "versions[0]", v[0], 1, U32), _int(self.T, "versions[1]", v[1], 1, U32)
        if lo > hi:
            fail(_where(self.T, "versions"), f"[{lo}, {hi}] is not a range")
        object.__setattr__(self, "versions", (lo, hi))
        object.__setattr__(self, "uuid", _bin(self.T, "uuid", self.uuid, 16))
        _bool(self.T, "encrypted", self.encrypted)
        if self.domain is not None:
            _source(self.T, "domain", self.domain)
        _text(self.T, "agent", self.agent, MAX_AGENT)
        if self.key_id is not None:
            object.__setattr__(self, "key_id", _bin(self.T, "key_id", self.key_id, 16))

    def _wire(self) -> dict[str, Any]:
        m = {"versions": list(self.versions), "uuid": self.uuid, "encrypted": self.encrypted,
             "domain": self.domain, "agent": self.agent}
        if self.key_id is not None:  # absent rather than nil: a hello without a key stays as it was
            m["key_id"] = self.key_id
        return m

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Hello:
        g = _getter(cls.T, m)
        return cls(versions=g("versions"), uuid=g("uuid"), encrypted=g("encrypted"),
                   domain=g("domain", True), agent=g("agent"),
                   key_id=g("key_id", True) if "key_id" in m else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """Receiver -> sender, the reply to HELLO."""

    T: ClassVar[str] = "welcome"
    version: int
    source: str
    dedupe_key: bytes | None
    position: Position
    limits: Limits

    def __post_init__(self) -> None:
        _int(self.T, "version", self.version, 1, U32)
        _source(self.T, "source", self.source)
        if self.dedupe_key is not None:
            object.__setattr__(self, "dedupe_key", _bin(self.T, "dedupe_key", self.dedupe_key, 32))
        if not isinstance(self.position, Position):
            fail(_where(self.T, "position"), f"expected a Position, got {_tname(self.position)}")
        if not isinstance(self.limits, Limits):
            fail(_where(self.T, "limits"), f"expected a Limits, got {_tname(self.limits)}")

    def _wire(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source, "dedupe_key": self.dedupe_key,
                "position": self.position._wire(), "limits": self.limits._wire()}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Welcome:
        g = _getter(cls.T, m)
        return cls(version=g("version"), source=g("source"), dedupe_key=g("dedupe_key", True),
                   position=Position._from_wire(g("position")), limits=Limits._from_wire(g("limits")))


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Either way: why the connection is being closed. Then close."""

    T: ClassVar[str] = "error"
    code: str
    message: str

    def __post_init__(self) -> None:
        if type(self.code) is not str or not ERROR_CODE_RE.fullmatch(self.code):
            fail(_where(self.T, "code"), f"{short(self.code)} is not an error code")
        _text(self.T, "message", self.message, MAX_MESSAGE)

    @classmethod
    def about(cls, exc: BaseException, code: str | None = None) -> Error:
        """The ERROR frame telling the peer about `exc` (a ProtocolError
        gives its own code): the message made one sane line."""
        c = code or getattr(exc, "code", None) or "internal"
        if type(c) is not str or not ERROR_CODE_RE.fullmatch(c):
            c = "internal"
        text = _UNSANE_RE.sub("?", str(exc) or type(exc).__name__)
        if len(text) > MAX_MESSAGE:
            text = text[:MAX_MESSAGE - 3] + "..."
        return cls(code=c, message=text)

    def _wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Error:
        g = _getter(cls.T, m)
        return cls(code=g("code"), message=g("message"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """Sender: open segment `seg` with this header (replace: into
    `.incoming`, for a prune)."""

    T: ClassVar[str] = "segment"
    seg: int
    header: bytes
    replace: bool = False

    def __post_init__(self) -> None:
        _int(self.T, "seg", self.seg)
        object.__setattr__(self, "header", _bin(self.T, "header", self.header, 64))
        _bool(self.T, "replace", self.replace)

    def _wire(self) -> dict[str, Any]:
        return {"seg": self.seg, "header": self.header, "replace": self.replace}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Segment:
        g = _getter(cls.T, m)
        return cls(seg=g("seg"), header=g("header"), replace=g("replace"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """Sender: which of these chunk ids does the vault hold? (answer: HAVE)"""

    T: ClassVar[str] = "offer"
    req: int
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _int(self.T, "req", self.req)
        object.__setattr__(self, "ids", _ids(self.T, "ids", self.ids))

    def _wire(self) -> dict[str, Any]:
        return {"req": self.req, "ids": list(self.ids)}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Offer:
        g = _getter(cls.T, m)
        return cls(req=g("req"), ids=g("ids"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Have:
    """Receiver: bit i (byte i // 8, LSB first) set = the offer's ids[i] is held."""

    T: ClassVar[str] = "have"
    req: int
    bits: bytes

    def __post_init__(self) -> None:
        _int(self.T, "req", self.req)
        object.__setattr__(self, "bits", _bin(self.T, "bits", self.bits, max_size=MAX_OFFER_IDS // 8))

    def held(self, i: int) -> bool:
        """Whether the offer's ids[i] is held."""
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    @classmethod
    def of(cls, req: int, held: "list[bool] | tuple[bool, ...]") -> Have:
        """The HAVE for an offer whose ids[i] is held iff held[i]."""
        bits = bytearray(math.ceil(len(held) / 8))
        for i, h in enumerate(held):
            if h:
                bits[i >> 3] |= 1 << (i & 7)
        return cls(req=req, bits=bytes(bits))

    def _wire(self) -> dict[str, Any]:
        return {"req": self.req, "bits": self.bits}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Have:
        g = _getter(cls.T, m)
        return cls(req=g("req"), bits=g("bits"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Data:
    """Sender: bytes [off, end) of segment `seg` or of file `file`, as a pack
    (its body compressed with `codec` at `level`; `raw` is its size
    decompressed). Segment data names its records' seq range and the last
    record's timestamp; file data carries none of them."""

    T: ClassVar[str] = "data"
    seg: int | None = None
    file: str | None = None
    off: int
    end: int
    first_seq: int | None = None
    last_seq: int | None = None
    last_ts: int | None = None
    codec: str = "none"
    level: int = 0
    reset: bool = False
    raw: int
    body: bytes

    def __post_init__(self) -> None:
        t = self.T
        _target(t, self.seg, self.file)
        _int(t, "off", self.off)
        _int(t, "end", self.end, self.off)
        seqs = (self.first_seq, self.last_seq, self.last_ts)
        if self.file is not None and seqs != (None, None, None):
            fail(f"{t} frame", "file data carries no 'first_seq', 'last_seq' or 'last_ts'")
        if (self.first_seq is None) != (self.last_seq is None) or (self.last_seq is None) != (self.last_ts is None):
            fail(f"{t} frame", "'first_seq', 'last_seq' and 'last_ts' are given together or not at all")
        if self.first_seq is not None:
            _int(t, "first_seq", self.first_seq)
            _int(t, "last_seq", self.last_seq, self.first_seq)
            _int(t, "last_ts", self.last_ts, I64_MIN)  # a record timestamp: signed microseconds
        _choice(t, "codec", self.codec, CODECS)
        _int(t, "level", self.level, -(1 << 31), 1 << 31)
        _bool(t, "reset", self.reset)
        _int(t, "raw", self.raw, 0, MAX_BODY + 1)
        object.__setattr__(self, "body", _bin(t, "body", self.body, max_size=MAX_FRAME))
        if self.codec == "none" and self.raw != len(self.body):
            fail(_where(t, "raw"), f"{self.raw} but the uncompressed body holds {len(self.body)} bytes")

    def wire_size(self) -> int:
        """len(encode(self)), without copying the body: what the frame will
        count in flight (`ShipConnection.can_send`)."""
        m = self._wire()
        m["body"] = b""
        m["t"] = self.T
        n = len(self.body)
        head = 2 if n < 1 << 8 else 3 if n < 1 << 16 else 5  # msgpack bin8/16/32 header
        return PREFIX.size + len(msgpack.packb(m, use_bin_type=True, unicode_errors="surrogateescape")) \
            - 2 + head + n

    @property
    def target(self) -> tuple[str, int | str]:
        """("seg", N) or ("file", PATH): the key of what this frame writes."""
        return ("seg", self.seg) if self.seg is not None else ("file", self.file)  # type: ignore[return-value]

    def _wire(self) -> dict[str, Any]:
        return {"seg": self.seg, "file": self.file, "off": self.off, "end": self.end,
                "first_seq": self.first_seq, "last_seq": self.last_seq, "last_ts": self.last_ts,
                "codec": self.codec, "level": self.level, "reset": self.reset, "raw": self.raw,
                "body": self.body}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Data:
        g = _getter(cls.T, m)
        return cls(seg=g("seg", True), file=g("file", True), off=g("off"), end=g("end"),
                   first_seq=g("first_seq", True), last_seq=g("last_seq", True), last_ts=g("last_ts", True),
                   codec=g("codec"), level=g("level"), reset=g("reset"), raw=g("raw"), body=g("body"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Need:
    """Receiver: the DATA frame at (`seg`/`file`, `off`) referenced these
    chunks, which are gone: resend it with them as literals."""

    T: ClassVar[str] = "need"
    seg: int | None = None
    file: str | None = None
    off: int
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _target(self.T, self.seg, self.file)
        _int(self.T, "off", self.off)
        object.__setattr__(self, "ids", _ids(self.T, "ids", self.ids))

    @property
    def target(self) -> tuple[str, int | str]:
        return ("seg", self.seg) if self.seg is not None else ("file", self.file)  # type: ignore[return-value]

    def _wire(self) -> dict[str, Any]:
        return {"seg": self.seg, "file": self.file, "off": self.off, "ids": list(self.ids)}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Need:
        g = _getter(cls.T, m)
        return cls(seg=g("seg", True), file=g("file", True), off=g("off"), ids=g("ids"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Seal:
    """Sender: segment `seg` is sealed at `size` bytes (never grows again)."""

    T: ClassVar[str] = "seal"
    seg: int
    size: int

    def __post_init__(self) -> None:
        _int(self.T, "seg", self.seg)
        _int(self.T, "size", self.size)

    def _wire(self) -> dict[str, Any]:
        return {"seg": self.seg, "size": self.size}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Seal:
        g = _getter(cls.T, m)
        return cls(seg=g("seg"), size=g("size"))


@dataclass(frozen=True, slots=True, kw_only=True)
class File:
    """Sender: the base entry `file` (base/NAME/PATH) is complete: its bytes
    (kind "file", `size` of them, sent as DATA before), mode, mtime; a
    directory (base/NAME itself included: the base's own mode and mtime);
    or a symlink to `target`."""

    T: ClassVar[str] = "file"
    file: str
    size: int
    mode: int
    mtime_us: int
    kind: str
    target: str | None = None

    def __post_init__(self) -> None:
        t = self.T
        check_file_path(_where(t, "file"), self.file, base_only=True, base_root=self.kind == "dir")
        _int(t, "size", self.size)
        _int(t, "mode", self.mode, 0, 0o10000)  # permission bits; the type is `kind`
        _int(t, "mtime_us", self.mtime_us, I64_MIN)  # files older than 1970 exist
        _choice(t, "kind", self.kind, KINDS)
        if self.kind == "symlink":
            _path_text(_where(t, "target"), self.target)  # any text but NUL: absolute targets are fine
            if not self.target:
                fail(_where(t, "target"), "a symlink needs a target")
        elif self.target is not None:
            fail(_where(t, "target"), f"only a symlink has a target, this is a {self.kind}")
        if self.kind != "file" and self.size != 0:
            fail(_where(t, "size"), f"a {self.kind} has size 0, got {self.size}")

    def _wire(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "mode": self.mode, "mtime_us": self.mtime_us,
                "kind": self.kind, "target": self.target}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> File:
        g = _getter(cls.T, m)
        return cls(file=g("file"), size=g("size"), mode=g("mode"), mtime_us=g("mtime_us"),
                   kind=g("kind"), target=g("target", True))


@dataclass(frozen=True, slots=True, kw_only=True)
class Base:
    """Sender: base/NAME is complete."""

    T: ClassVar[str] = "base"
    name: str

    def __post_init__(self) -> None:
        check_base_name(_where(self.T, "name"), self.name)

    def _wire(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Base:
        return cls(name=_getter(cls.T, m)("name"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Prune:
    """Sender: the source's complete live set after a prune."""

    T: ClassVar[str] = "prune"
    segments: tuple[PruneSeg, ...]
    bases: tuple[str, ...]

    def __post_init__(self) -> None:
        t = self.T
        segs = []
        seen: set[int] = set()
        for i, s in enumerate(_seq(t, "segments", self.segments, MAX_LIST)):
            n = f"segments[{i}]"
            if not isinstance(s, (list, tuple)) or len(s) != 3:
                fail(_where(t, n), f"expected [seg, header_crc, size], got {short(s)}")
            ps = PruneSeg(_int(t, n + ".seg", s[0]), _int(t, n + ".header_crc", s[1], 0, U32),
                          _int(t, n + ".size", s[2]))
            if ps.seg in seen:
                fail(_where(t, n), f"segment {ps.seg} listed twice")
            seen.add(ps.seg)
            segs.append(ps)
        object.__setattr__(self, "segments", tuple(segs))
        bases = _seq(t, "bases", self.bases, MAX_LIST)
        for b in bases:
            check_base_name(_where(t, "bases"), b)
        if len(set(bases)) != len(bases):
            fail(_where(t, "bases"), "a base listed twice")
        object.__setattr__(self, "bases", bases)

    def _wire(self) -> dict[str, Any]:
        return {"segments": [list(s) for s in self.segments], "bases": list(self.bases)}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Prune:
        g = _getter(cls.T, m)
        return cls(segments=g("segments"), bases=g("bases"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Receiver: `seg`/`file` is durable (fsynced) up to `size`; for a
    segment, `last_seq` is the last record in it (nil when it holds none)."""

    T: ClassVar[str] = "ack"
    seg: int | None = None
    file: str | None = None
    size: int
    last_seq: int | None = None

    def __post_init__(self) -> None:
        _target(self.T, self.seg, self.file)
        _int(self.T, "size", self.size)
        _opt_int(self.T, "last_seq", self.last_seq)
        if self.file is not None and self.last_seq is not None:
            fail(_where(self.T, "last_seq"), "an ack of a file carries no seq")

    @property
    def target(self) -> tuple[str, int | str]:
        return ("seg", self.seg) if self.seg is not None else ("file", self.file)  # type: ignore[return-value]

    def _wire(self) -> dict[str, Any]:
        return {"seg": self.seg, "file": self.file, "size": self.size, "last_seq": self.last_seq}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Ack:
        g = _getter(cls.T, m)
        return cls(seg=g("seg", True), file=g("file", True), size=g("size"), last_seq=g("last_seq", True))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Either way, after the handshake: answer with PONG of the same `n`."""

    T: ClassVar[str] = "ping"
    n: int

    def __post_init__(self) -> None:
        _int(self.T, "n", self.n)

    def _wire(self) -> dict[str, Any]:
        return {"n": self.n}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Ping:
        return cls(n=_getter(cls.T, m)("n"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    T: ClassVar[str] = "pong"
    n: int

    def __post_init__(self) -> None:
        _int(self.T, "n", self.n)

    def _wire(self) -> dict[str, Any]:
        return {"n": self.n}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Pong:
        return cls(n=_getter(cls.T, m)("n"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye:
    """Sender: caught up, closing; receiver: acknowledged everything, closing."""

    T: ClassVar[str] = "bye"

    def _wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_wire(cls, m: dict[str, Any]) -> Bye:
        return cls()


Frame = Union[Hello, Welcome, Error, Segment, Offer, Have, Data, Need, Seal, File, Base, Prune,
              Ack, Ping, Pong, Bye]
FRAME_TYPES: dict[str, type[Frame]] = {c.T: c for c in (Hello, Welcome, Error, Segment, Offer, Have, Data, Need,
                                                  Seal, File, Base, Prune, Ack, Ping, Pong, Bye)}


_FRAME_CLASSES = tuple(FRAME_TYPES.values())


def _getter(t: str, m: dict[str, Any]) -> Callable[..., Any]:
    return lambda key, nullable=False: _get(t, m, key, nullable)


# ---- encoding ----------------------------------------------------------------


def encode(frame: Frame, max_frame: int = MAX_FRAME) -> bytes:
    """The frame's bytes on the wire: length prefix + msgpack map. Raises
    ProtocolError (code "limit") when it would exceed `max_frame`."""
    if not isinstance(frame, _FRAME_CLASSES):
        raise TypeError(f"not a frame: {frame!r}")
    m = frame._wire()
    m["t"] = frame.T
    payload: bytes = msgpack.packb(m, use_bin_type=True, unicode_errors="surrogateescape")
    if len(payload) > max_frame:
        fail(f"{frame.T} frame", f"{len(payload)} bytes, more than the frame limit {max_frame}", "limit")
    # One copy of a large body here (and one in packb): linear, never per byte.
    return PREFIX.pack(len(payload)) + payload


# ---- decoding ----------------------------------------------------------------

# msgpack first bytes -> (kind, fixed extra length). Kinds: "s" scalar with
# `n` more bytes, "b8"/"b16"/"b32" str or bin with a 1/2/4-byte length,
# "a16"/"a32"/"m16"/"m32" array/map with a 2/4-byte count, "x" refused.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_LEN_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_COUNT = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # bytes of the count, objects per entry


def _prescan(buf: memoryview) -> None:
    """Walk one msgpack object filling `buf` exactly, building nothing;
    refuse what could make unpacking expensive (see the module docstring)."""
    n = len(buf)
    if n == 0 or not (0x80 <= buf[0] <= 0x8F or buf[0] in (0xDE, 0xDF)):
        fail("frame", "not a msgpack map")
    pos = 0
    objects = 0
    stack = [1]  # objects still to read at each open nesting level
    while stack:
        if stack[-1] == 0:
            stack.pop()
            continue
        stack[-1] -= 1
        if pos >= n:
            fail("frame", "msgpack data ends inside an object")
        objects += 1
        if objects > MAX_OBJECTS:
            fail("frame", f"more than {MAX_OBJECTS} msgpack objects", "limit")
        b = buf[pos]
        pos += 1
        count = -1
        if b <= 0x7F or b >= 0xE0:  # positive / negative fixint
            continue
        if b <= 0x8F:
            count = (b & 0x0F) * 2
        elif b <= 0x9F:
            count = b & 0x0F
        elif b <= 0xBF:
            pos += b & 0x1F
        elif b == 0xC4:  # bin 8: chunk ids and headers, the common case, inline
            if pos >= n:
                fail("frame", "msgpack data ends inside a length")
            pos += 1 + buf[pos]
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _LEN_BYTES:
            w = _LEN_BYTES[b]
            if pos + w > n:
                fail("frame", "msgpack data ends inside a length")
            pos += w + int.from_bytes(buf[pos:pos + w], "big")
        elif b in _COUNT:
            w, per = _COUNT[b]
            if pos + w > n:
                fail("frame", "msgpack data ends inside a length")
            count = int.from_bytes(buf[pos:pos + w], "big") * per
            pos += w
        else:  # 0xC1 (never used) and the ext types
            fail("frame", f"msgpack type 0x{b:02x} is not allowed")
        if pos > n:
            fail("frame", "msgpack data ends inside an object")
        if count >= 0:
            # Every element takes at least one byte: a count beyond the bytes
            # left is a lie meant to make the unpacker allocate.
            if count > n - pos:
                fail("frame", f"a msgpack container declares {count} elements in {n - pos} bytes")
            if len(stack) > MAX_DEPTH:
                fail("frame", f"msgpack containers nested deeper than {MAX_DEPTH}", "limit")
            if count >= 16 and (0x90 <= b <= 0x9F or b in (0xDC, 0xDD)):
                # An array of 32-byte bins (the ids of an OFFER or NEED):
                # checked with two strided compares instead of one Python
                # step per id.
                end = pos + 34 * count
                if end <= n and objects + count <= MAX_OBJECTS and \
                        buf[pos:end:34].tobytes() == b"\xc4" * count and \
                        buf[pos + 1:end:34].tobytes() == b"\x20" * count:
                    objects += count
                    pos = end
                    continue
            stack.append(count)
    if pos != n:
        fail("frame", f"{n - pos} bytes after the msgpack map")


class _BadMap(Exception):
    pass


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _BadMap("a msgpack map repeats a key")
    for k in d:
        if type(k) is not str:
            raise _BadMap(f"a msgpack map key is {_tname(k)}, not a string")
    return d


def decode_payload(payload: bytes | bytearray | memoryview) -> Frame:
    """One frame from its msgpack bytes (without the length prefix)."""
    with memoryview(payload) as mv:
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        _prescan(mv)
        try:
            m = msgpack.unpackb(mv, raw=False, use_list=True, strict_map_key=True,
                                object_pairs_hook=_pairs, unicode_errors="surrogateescape",
                                )
        except _BadMap as e:
            fail("frame", str(e))
        except Exception as e:  # the pre-scan should leave nothing here; never let it escape
            fail("frame", f"msgpack: {type(e).__name__}: {e}")
    t = m.get("t")
    if type(t) is not str:
        fail("frame", f"field 't' must be the frame type string, got {short(t)}")
    cls = FRAME_TYPES.get(t)
    if cls is None:
        fail("frame", f"unknown frame type {short(t)}")
    try:
        return cls._from_wire(m)
    except ProtocolError:
        raise
    except Exception as e:  # a bug in a field check must still be a protocol error, not a crash
        fail(f"{t} frame", f"{type(e).__name__}: {e}")


class FrameDecoder:
    """Feed bytes in any split; get whole frames, the same ones whatever the
    split. Holds at most `max_frame` + 4 bytes between calls: a frame
    longer than that is refused as soon as its length prefix is read.

    After an error the decoder is spent: every later `feed` raises the same
    error (the stream's framing is lost; the connection must close)."""

    def __init__(self, max_frame: int = DEFAULT_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need = -1  # payload length of the frame being buffered, -1 until its prefix is in
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as a frame (a partial frame,
        its length prefix included)."""
        return len(self._buf) + (4 if self._need >= 0 else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """The frames completed by `data`, in order."""
        return [f for f, _ in self.feed_sized(data)]

    def feed_sized(self, data: bytes | bytearray | memoryview) -> list[tuple[Frame, int]]:
        """As `feed`, with each frame's size on the wire (prefix included),
        which flow control counts."""
        return list(self.frames(data))

    def frames(self, data: bytes | bytearray | memoryview) -> Iterator[tuple[Frame, int]]:
        """As `feed_sized`, one frame at a time: a caller that stops
        iterating (the peer's ERROR came) never decodes the bytes after it.
        The decoder is then spent."""
        if self._error is not None:
            raise ProtocolError(str(self._error), self._error.code)
        try:
            yield from self._feed(data)
        except ProtocolError as e:
            self._error = e
            self._buf = bytearray()
            self._need = -1
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> Iterator[tuple[Frame, int]]:
        with memoryview(data) as mv:
            mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
            pos, n = 0, len(mv)
            while pos < n:
                if self._need >= 0 or self._buf or n - pos < 4:
                    # Complete the buffered prefix/frame from the new bytes,
                    # taking no more than it needs.
                    if self._need < 0:
                        take = min(4 - len(self._buf), n - pos)
                        self._buf += mv[pos:pos + take]
                        pos += take
                        if len(self._buf) < 4:
                            break
                        self._need = self._check_length(PREFIX.unpack_from(self._buf)[0])
                        self._buf.clear()
                    take = min(self._need - len(self._buf), n - pos)
                    self._buf += mv[pos:pos + take]
                    pos += take
                    if len(self._buf) == self._need:
                        frame = decode_payload(self._buf), 4 + self._need
                        self._buf = bytearray()
                        self._need = -1
                        yield frame
                    continue
                # Nothing buffered: decode whole frames straight from `data`.
                length = self._check_length(PREFIX.unpack_from(mv, pos)[0])
                if n - pos - 4 >= length:
                    frame = decode_payload(mv[pos + 4:pos + 4 + length]), 4 + length
                    pos += 4 + length
                    yield frame
                else:
                    self._need = length
                    self._buf += mv[pos + 4:]
                    pos = n

    def _check_length(self, length: int) -> int:
        if length == 0:
            fail("frame", "length prefix 0 (a frame holds at least a map)")
        if length > self.max_frame:
            fail("frame", f"length prefix {length} exceeds the frame limit {self.max_frame}", "limit")
        return length

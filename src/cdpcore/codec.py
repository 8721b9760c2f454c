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
* lz4 is one lz4 frame per body (for fast links, where CPU is the limit).
* The Decompressor is the receiver's guard: a window above the cap, output
  beyond the frame's announced `raw` size or beyond the body limit, or
  output that ends short, is a ProtocolError. Output goes through a
  counting sink in pieces of at most the body limit + 1 bytes, so a
  decompression bomb fails after that much, without allocating its
  claimed size.
* AdaptiveLevel picks a rung of the ladder (lz4, zstd 1 ... 19) from
  measurements that the transport feeds it: the link's acknowledged
  throughput and this process's compression speed (CPU time) and ratio per
  rung. Rungs not measured yet are estimated from a table of relative
  speeds scaled by what was measured (the machine's speed). The choice is
  the strongest rung whose compression could fill the link with margin and
  whose CPU stays under the budget; it moves up only after the same better
  rung won `hold` decisions in a row (hysteresis), and down at once when
  the current rung falls behind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lz4.frame
import zstandard

from cdpcore.errors import ProtocolError

CODECS = ("zstd", "lz4", "none")
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
                 ldm: bool = False):
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
        if codec == "zstd" and not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level {level} outside 1..{zstandard.MAX_COMPRESSION_LEVEL}")
        if self._ctx is not None and (codec, level) == (self.codec, self.level):
            return
        self.codec, self.level = codec, (level if codec == "zstd" else 0)
        self.reset()

    def reset(self) -> None:
        """Forget the stream (a reconnect): the next body starts a new context."""
        self._ctx = None
        self._reset = True

    def _context(self) -> Any:
        # Every level gets the receiver's whole window: the point of the
        # streamed context is to reach back to a page's earlier version, and
        # default windows of low levels (2 MiB at level 3) are too short.
        params = zstandard.ZstdCompressionParameters.from_level(
            self.level, window_log=self.window_log, enable_ldm=self.ldm,
            ldm_hash_log=min(self.window_log - 1, 20) if self.ldm else 0)
        return zstandard.ZstdCompressor(compression_params=params).compressobj()

    def compress(self, body: bytes) -> Compressed:
        reset = self._reset
        self._reset = False
        if self.codec == "none":
            out = bytes(body)
        elif self.codec == "lz4":
            out = lz4.frame.compress(body, store_size=False)
        else:
            if self._ctx is None:
                self._ctx = self._context()
            out = self._ctx.compress(body) + self._ctx.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return Compressed(self.codec, self.level, reset, len(body), out)


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

    def __init__(self, window_log: int = DEFAULT_WINDOW_LOG, max_body: int = DEFAULT_MAX_BODY):
        self.window_log = window_log
        self.max_body = max_body
        self._sink = _Sink()
        self._zstd: Any = None
        self._broken = False

    def decompress(self, codec: str, body: bytes, raw: int, reset: bool = False) -> bytes:
        """The body of one DATA frame, exactly `raw` bytes, or ProtocolError."""
        if self._broken:
            raise ProtocolError("the compressed stream failed earlier; the connection must close")
        if type(raw) is not int or not 0 <= raw <= self.max_body:
            raise _over_limit(f"DATA raw size {raw!r} outside 0..{self.max_body}")
        if codec == "none":
            out = bytes(body)
        elif codec == "lz4":
            out = self._lz4(body, raw)
        elif codec == "zstd":
            out = self._zstd_body(body, raw, reset)
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


@dataclass(slots=True)
class _Avg:
    value: float | None = None

    def add(self, x: float, alpha: float) -> None:
        self.value = x if self.value is None else (1 - alpha) * self.value + alpha * x


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
    ratio: dict[int, _Avg] = field(default_factory=dict)  # wire / raw, per rung
    _pending: int | None = None
    _streak: int = 0

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
        if cpu_seconds > 0:
            self.speed.setdefault(i, _Avg()).add(raw_bytes / cpu_seconds, self.alpha)

    def estimate(self, i: int) -> tuple[float, float]:
        """(raw bytes per CPU second, wire/raw ratio) of rung i: measured, or
        the prior scaled by the machine speed the measured rungs show."""
        name = str(LADDER[i])
        r = self.ratio.get(i)
        ratio = r.value if r is not None and r.value is not None else PRIOR_RATIO[name]
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
        return speed >= self.margin * slack * pace and pace / speed <= self.cpu_budget / slack

    def best(self, slack: float = 1.0) -> int:
        for i in range(len(LADDER) - 1, -1, -1):
            if self.fits(i, slack):
                return i
        return 0

    def choose(self) -> Rung:
        """Decide after new measurements: at most one change, with hysteresis."""
        if not self.fits(self.current):
            self.current = self.best()
            self._pending, self._streak = None, 0
            return self.rung
        up = self.best(slack=1.25)
        if up > self.current:
            if up == self._pending:
                self._streak += 1
            else:
                self._pending, self._streak = up, 1
            if self._streak >= self.hold:
                self.current = up
                self._pending, self._streak = None, 0
        else:
            self._pending, self._streak = None, 0
        return self.rung

"""Link: the parameters of one direction of an emulated WAN link.

A `Link` is plain data (frozen, comparable, printable); the behaviour lives
in `cdpcore.testing.stream` (the in-memory pipe and stream ends) and
`cdpcore.testing.proxy` (a TCP proxy). `Link.parse()` reads the short
form that CLIs and demos take, e.g. ``"10mbit,50ms,jitter=5ms"``, and
`str(link)` writes it back (``Link.parse(str(link)) == link``).

Units are deliberately unambiguous: bandwidth only in bits per second
(``bit``, ``kbit``, ``mbit``, ``gbit``, decimal multiples as in `tc`),
durations with ``us``, ``ms`` or ``s``, sizes in bytes (``KiB``, ``MiB``
or a plain integer). "mbps" is refused: tc reads it as megabytes, most
people as megabits.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

DEFAULT_SEGMENT = 1460  # a TCP MSS on Ethernet: the pacing granularity
DEFAULT_BUFFER = 1 << 20  # bytes one direction holds: Linux's autotuned socket buffers are of this order

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_TIME_UNITS = {"us": -10**6, "ms": -1000, "s": 1}  # negative: divide (200us is 200 / 1e6, exactly 0.0002)
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_NUMBER = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)"


@dataclass(frozen=True)
class Link:
    """One direction of a link.

    bandwidth: bits per second, None for unlimited.
    latency: one-way delay in seconds.
    jitter: each segment's delay is latency + uniform(-jitter, +jitter)
        (never below zero), but a segment never overtakes the one before
        it: a TCP byte stream stays in order, so jitter only ever delays.
    segment: bytes per segment on the wire (pacing and jitter are per
        segment); None sends each write as one segment.
    buffer: bytes one direction holds at most (send buffer + in flight +
        the reader's unread bytes); a sender blocks while it is full.
    drop_after: cut the connection once this many bytes have crossed
        this direction.
    drop_at: cut the connection this many seconds after it opened.
    drop_rate: cut the connection at a random moment, with this
        probability per second (a Poisson process drawn from `seed`).
    seed: makes jitter and drop_rate deterministic.
    """

    bandwidth: float | None = None
    latency: float = 0.0
    jitter: float = 0.0
    segment: int | None = DEFAULT_SEGMENT
    buffer: int = DEFAULT_BUFFER
    drop_after: int | None = None
    drop_at: float | None = None
    drop_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        def finite(name: str, v: float, lo: float, strict: bool = False) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (strict and v == lo):
                bound = f"> {lo}" if strict else f">= {lo}"
                raise ValueError(f"Link {name} must be a finite number {bound}, got {v!r}")

        def whole(name: str, v: int, lo: int) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"Link {name} must be an integer >= {lo}, got {v!r}")

        if self.bandwidth is not None:
            finite("bandwidth", self.bandwidth, 0, strict=True)
        finite("latency", self.latency, 0)
        finite("jitter", self.jitter, 0)
        if self.segment is not None:
            whole("segment", self.segment, 1)
        whole("buffer", self.buffer, 1)
        if self.drop_after is not None:
            whole("drop_after", self.drop_after, 0)
        if self.drop_at is not None:
            finite("drop_at", self.drop_at, 0)
        finite("drop_rate", self.drop_rate, 0)
        whole("seed", self.seed, 0)

    def transmit_time(self, nbytes: int) -> float:
        """Seconds the wire takes to serialise `nbytes`."""
        return 0.0 if self.bandwidth is None else nbytes * 8 / self.bandwidth

    @classmethod
    def parse(cls, text: str) -> Link:
        """Read ``"10mbit,50ms,jitter=5ms,drop-after=64KiB,seed=3"``.

        Bare items are the bandwidth (a rate or ``unlimited``) and the
        latency (a duration); keys: rate, latency (or delay), jitter,
        segment (or mtu), buffer, drop-after, drop-at, drop-rate (per
        second, ``0.1`` or ``0.1/s``), seed. Raises ValueError with a
        one-line message naming the bad item.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty link description {text!r}: expected e.g. '10mbit,50ms,jitter=5ms'")
        kw: dict[str, object] = {}

        def put(name: str, value: object, item: str) -> None:
            if name in kw:
                raise ValueError(f"link {text!r}: {name} given twice (at {item!r})")
            kw[name] = value

        for raw in text.split(","):
            item = raw.strip()
            if not item:
                raise ValueError(f"link {text!r}: empty item between commas")
            if "=" in item:
                key, _, value = item.partition("=")
                key = key.strip().lower().replace("_", "-")
                value = value.strip()
                parser = _KEYS.get(key)
                if parser is None:
                    raise ValueError(f"link {text!r}: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
                name, fn = parser
                try:
                    put(name, fn(value), item)
                except _Bad as e:
                    raise ValueError(f"link {text!r}: {key}={value!r}: {e}") from None
                continue
            try:
                put("bandwidth", parse_bandwidth(item), item)
                continue
            except _Bad:
                pass
            try:
                put("latency", parse_duration(item), item)
                continue
            except _Bad:
                pass
            raise ValueError(f"link {text!r}: {item!r} is neither a rate (e.g. 10mbit) nor a duration "
                             f"(e.g. 50ms), nor key=value")
        try:
            return cls(**kw)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"link {text!r}: {e}") from None

    def __str__(self) -> str:
        parts = ["unlimited" if self.bandwidth is None else _fmt_rate(self.bandwidth), _fmt_time(self.latency)]
        defaults = {f.name: f.default for f in fields(self)}
        if self.jitter:
            parts.append(f"jitter={_fmt_time(self.jitter)}")
        if self.segment != defaults["segment"]:
            parts.append(f"segment={'none' if self.segment is None else self.segment}")
        if self.buffer != defaults["buffer"]:
            parts.append(f"buffer={self.buffer}")
        if self.drop_after is not None:
            parts.append(f"drop-after={self.drop_after}")
        if self.drop_at is not None:
            parts.append(f"drop-at={_fmt_time(self.drop_at)}")
        if self.drop_rate:
            parts.append(f"drop-rate={self.drop_rate!r}")
        if self.seed:
            parts.append(f"seed={self.seed}")
        return ",".join(parts)


class _Bad(ValueError):
    """A value that does not parse (Link.parse adds the item it was in)."""


def _number(text: str, units: dict[str, float], what: str, example: str) -> float:
    m = re.fullmatch(_NUMBER + r"\s*([a-z]*)", text.strip().lower())
    if m is None or m.group(2) not in units:
        raise _Bad(f"not a {what} (expected e.g. {example}; units: {', '.join(u for u in units if u)})")
    unit = units[m.group(2)]
    value = float(m.group(1)) * unit if unit > 0 else float(m.group(1)) / -unit
    if not math.isfinite(value):
        raise _Bad(f"{what} out of range")
    return value


def parse_bandwidth(text: str) -> float | None:
    """``"10mbit"`` -> 10e6 bits/s; ``"unlimited"`` -> None. Raises ValueError."""
    if text.strip().lower() in ("unlimited", "none", "inf"):
        return None
    return _number(text, _RATE_UNITS, "rate", "10mbit")


def parse_duration(text: str) -> float:
    """``"50ms"`` -> 0.05 seconds (``0`` alone is allowed). Raises ValueError."""
    if text.strip() == "0":
        return 0.0
    return _number(text, _TIME_UNITS, "duration", "50ms")


def parse_size(text: str) -> int:
    """``"64KiB"`` -> 65536, ``"1500"`` -> 1500. Raises ValueError."""
    value = _number(text, _SIZE_UNITS, "size in bytes", "64KiB")
    if value != int(value):
        raise _Bad("not a whole number of bytes")
    return int(value)


def _parse_segment(text: str) -> int | None:
    return None if text.strip().lower() == "none" else parse_size(text)


def _parse_rate_per_second(text: str) -> float:
    t = text.strip().lower()
    t = t[:-2] if t.endswith("/s") else t
    if re.fullmatch(_NUMBER, t) is None:
        raise _Bad("not a probability per second (expected e.g. 0.1/s)")
    return float(t)


def _parse_seed(text: str) -> int:
    if not text.strip().isdigit():
        raise _Bad("not a non-negative integer")
    return int(text)


_KEYS = {
    "rate": ("bandwidth", parse_bandwidth),
    "bandwidth": ("bandwidth", parse_bandwidth),
    "latency": ("latency", parse_duration),
    "delay": ("latency", parse_duration),
    "jitter": ("jitter", parse_duration),
    "segment": ("segment", _parse_segment),
    "mtu": ("segment", _parse_segment),
    "buffer": ("buffer", parse_size),
    "drop-after": ("drop_after", parse_size),
    "drop-at": ("drop_at", parse_duration),
    "drop-rate": ("drop_rate", _parse_rate_per_second),
    "seed": ("seed", _parse_seed),
}


def _fmt_rate(bps: float) -> str:
    for unit in ("gbit", "mbit", "kbit"):
        scale = _RATE_UNITS[unit]
        if bps >= scale and bps % scale == 0:
            return f"{int(bps // scale)}{unit}"
    return f"{int(bps)}bit" if bps == int(bps) else f"{bps!r}bit"


def _fmt_time(seconds: float) -> str:
    # repr() of the float in seconds round-trips exactly; "50ms" is nicer when it is exact.
    ms = seconds * 1000
    if ms == int(ms) and int(ms) / 1000 == seconds:
        return f"{int(ms)}ms"
    return f"{seconds!r}s"

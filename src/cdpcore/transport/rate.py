"""rate: how fast and how often the sender may use the link (and its CPU).

`parse_rate` reads ``--rate``; `TokenBucket` paces the sender's writes to
it, and (counting CPU seconds instead of bytes) its work to ``--cpu-limit``;
`Backoff` spaces reconnection attempts.

Units of ``--rate`` (per second; a trailing ``/s`` is allowed):

=================  =============================================
``bit`` ``kbit``   bits, decimal multiples as in tc: 10mbit = 10,000,000 bit/s
``mbit`` ``gbit``
``B`` ``KB``       bytes, decimal: 1.5MB = 1,500,000 bytes/s
``MB`` ``GB``
``KiB`` ``MiB``    bytes, binary: 1MiB = 1,048,576 bytes/s
``GiB``
``unlimited``      no pacing (the default)
=================  =============================================

"mbps", "Mb" (a byte unit needs a capital B) and a bare number are refused: people read them differently (bits
or bytes), and a rate off by a factor of eight on a hospital's WAN link is
exactly the mistake this should not let through.
"""
from __future__ import annotations

import math
import random
import re

import trio

_UNITS: dict[str, float] = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9,
    "kib": 1024.0, "mib": 1024.0**2, "gib": 1024.0**3,
}
_RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)(?:/s)?")

DEFAULT_BURST_SECONDS = 0.05  # a bucket holds this much time's worth of bytes
MIN_BURST = 16 * 1024  # ... but at least one TLS record's worth


def parse_rate(text: str) -> float | None:
    """Bytes per second from ``10mbit``, ``500kbit``, ``1.5MB``, ``2MiB/s``;
    None for ``unlimited``. ValueError with the accepted units otherwise."""
    t = text.strip()
    if t.lower() in ("unlimited", "none"):
        return None
    m = _RATE.fullmatch(t.lower())
    unit = t[m.start(2):m.end(2)] if m else ""
    # A byte unit must be written with a capital B: "Mb" is read as megabits
    # by half the people who write it and as megabytes by the other half.
    if m is None or m.group(2) not in _UNITS or (not m.group(2).endswith("bit") and not unit.endswith("B")):
        raise ValueError(f"invalid rate {text!r}: expected e.g. 10mbit, 500kbit, 1.5MB, 2MiB "
                         f"(units: bit kbit mbit gbit per second, B KB MB GB KiB MiB GiB per second, "
                         f"or 'unlimited')")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid rate {text!r}: must be more than zero")
    return value


def format_rate(bytes_per_second: float | None) -> str:
    """For people: ``1.25 MB/s (10.0 Mbit/s)``."""
    if bytes_per_second is None:
        return "unlimited"
    bits = bytes_per_second * 8
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bytes_per_second >= f:
            return f"{bytes_per_second / f:.2f} {unit}B/s ({bits / f:.1f} {unit}bit/s)"
    return f"{bytes_per_second:.0f} B/s ({bits:.0f} bit/s)"


class TokenBucket:
    """Paces writes to `rate` bytes per second (None: no pacing).

    A write of n bytes takes n tokens and may drive the bucket into debt; the
    *next* write waits until the debt is paid. This lets a write larger than
    the bucket through (a frame is never split for pacing) while the
    average stays at the rate, and the first write of an idle link goes at
    once (up to `burst` saved tokens).
    """

    def __init__(self, rate: float | None, burst: float | None = None, full: bool = True) -> None:
        self.rate = rate
        self.burst = float(burst if burst is not None else
                           max(MIN_BURST, int((rate or 0) * DEFAULT_BURST_SECONDS)))
        self._tokens = self.burst if full else 0.0  # full: the first write goes at once
        self._stamp: float | None = None

    def _refill(self, now: float) -> None:
        assert self.rate is not None
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, n: float) -> None:
        """Wait until the bucket is out of debt, then take n bytes' tokens."""
        if self.rate is None:
            return
        self._refill(trio.current_time())
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)
            self._refill(trio.current_time())
        self._tokens -= n


class Backoff:
    """Delays between reconnection attempts: exponential with full jitter
    (delay drawn uniformly from [initial, min(cap, initial * factor**k)]),
    so that many sources cut by one WAN outage do not all return in the same
    second; the exponent returns to zero once a connection has stayed up for
    `healthy` seconds (a link that flaps keeps backing off, one that
    recovered starts again from quick retries)."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0, factor: float = 2.0,
                 healthy: float = 60.0, rng: random.Random | None = None) -> None:
        if not (0 < initial <= cap and factor >= 1 and healthy >= 0):
            raise ValueError("backoff needs 0 < initial <= cap, factor >= 1, healthy >= 0")
        self.initial, self.cap, self.factor, self.healthy = initial, cap, factor, healthy
        self.attempts = 0
        self._rng = rng or random.Random()
        self._up_since: float | None = None

    def connected(self, now: float) -> None:
        """A connection was established (handshake done) at `now`."""
        self._up_since = now

    def failed(self, now: float) -> float:
        """A connection failed or was lost at `now`: the delay before the next try."""
        if self._up_since is not None and now - self._up_since >= self.healthy:
            self.attempts = 0
        self._up_since = None
        ceiling = min(self.cap, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return self._rng.uniform(self.initial, ceiling)

"""Emulated streams: a connection through an emulated WAN link, as trio streams.

Theory of operation
-------------------
Each direction of a connection is a `_Pipe`. It runs no task: when the
sender hands it bytes it computes, there and then, the whole future of
those bytes on the wire, and the reader only compares those times with
`trio.current_time()`. That keeps a pipe exact under `MockClock` (virtual
time jumps straight to the next arrival) and cheap under the real clock
(one sleep per read, not one per segment).

For each segment (``Link.segment`` bytes, or one write):

    start   = max(wire free, now)                  # the wire serialises in order
    tx_end  = start + 8 * len / bandwidth
    arrival = max(previous arrival, tx_end + latency + uniform(-jitter, jitter))

The ``max`` with the previous arrival is what keeps a byte stream in
order: a TCP receiver does not hand out a segment before the ones in front
of it, so jitter delays delivery and never reorders it.

Flow control: a direction holds at most ``Link.buffer`` bytes (queued,
in flight or arrived and unread); `send_all` blocks while it is full, as a
socket's send blocks when the send buffer and the peer's window are full.
The window update is instantaneous (no acknowledgement latency), so a
buffer smaller than bandwidth x latency caps the throughput at
buffer / latency.

Cuts (drops of the connection) are modelled as a reset sent at a moment
``T`` that ends both directions:

- bytes whose transmission ended by ``T`` still arrive as scheduled and can
  be read; nothing transmitted after ``T`` is ever delivered;
- a reader gets `trio.BrokenResourceError` once it has read those bytes and
  the reset has crossed the link (``T + latency``); a blocked reader wakes;
- a sender gets `trio.BrokenResourceError` from ``T`` on (a blocked sender
  wakes then), and so does one whose peer end has been closed.

``drop_after=N`` puts ``T`` at the end of the transmission of the N-th
byte: the reader gets exactly the first N bytes, then the error. A send
that would go past N blocks until ``T`` and raises. A clean close
(`aclose`, `send_eof`) is an EOF after the bytes in flight, as TCP's FIN
is; an EOF already delivered before a cut stays an EOF.
"""
from __future__ import annotations

import math
import operator
import random
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from cdpcore.testing.link import Link

# The far side of a wrapped stream, when the caller does not shape it: no delay, one segment per write.
PASS_THROUGH = Link(segment=None)


class _Busy:
    """Raise BusyResourceError when two tasks use one side of a stream at once."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already in {self._what} on this stream")
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class _Connection:
    """What the two directions share: the moment of the reset (inf = none yet)."""

    def __init__(self) -> None:
        self.cut_time = math.inf
        self.pipes: list[_Pipe] = []

    def cut(self, at: float) -> None:
        if at < self.cut_time:
            self.cut_time = at
            for p in self.pipes:
                p.notify()


class _Segment:
    __slots__ = ("data", "tx_end", "arrival")

    def __init__(self, data: bytes, tx_end: float, arrival: float) -> None:
        self.data = data
        self.tx_end = tx_end
        self.arrival = arrival


class _Pipe:
    """One direction of a connection (see the module's docstring)."""

    def __init__(self, link: Link, conn: _Connection, direction: str) -> None:
        self.link = link
        self.conn = conn
        now = trio.current_time()
        # Separate generators, so that how many segments were jittered does not move the drop.
        self._rng = random.Random(f"jitter:{link.seed}:{direction}")
        drops = random.Random(f"drop:{link.seed}:{direction}")
        self._queue: deque[_Segment] = deque()
        self._held = 0  # bytes accepted and not yet read (or lost)
        self._wire_free = now
        self._last_arrival = now
        self.sent = 0  # bytes accepted onto the wire
        self.received = 0  # bytes handed to the reader
        self._eof_tx: float | None = None
        self._eof_arrival = math.inf
        self.sender_closed = False
        self.reader_closed = False
        self._changed = trio.Event()
        conn.pipes.append(self)
        if link.drop_at is not None:
            conn.cut(now + link.drop_at)
        if link.drop_rate > 0:
            conn.cut(now + drops.expovariate(link.drop_rate))
        if link.drop_after == 0:
            conn.cut(now)  # nothing may cross: the connection is reset as it opens

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self, deadline: float) -> None:
        changed = self._changed
        with trio.move_on_at(deadline):
            await changed.wait()

    # -- sender side -------------------------------------------------------------------------

    def _check_send(self) -> None:
        if self.sender_closed:
            raise trio.ClosedResourceError("this end of the emulated link was closed")
        if self._eof_tx is not None:
            raise trio.ClosedResourceError("send_eof() was called on this end of the emulated link")
        if trio.current_time() >= self.conn.cut_time:
            raise trio.BrokenResourceError("connection reset (the emulated link was cut)")
        if self.reader_closed:
            raise trio.BrokenResourceError("connection reset (the peer closed its end)")

    def _room(self) -> int:
        room = self.link.buffer - self._held
        if self.link.drop_after is not None:
            # At the limit the cut is already scheduled (at the end of the last allowed byte): wait for it.
            room = min(room, self.link.drop_after - self.sent)
        return room

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as raw, raw.cast("B") as view:
            while True:
                self._check_send()
                if not view:
                    return
                room = self._room()
                if room <= 0:
                    await self._wait(self.conn.cut_time)
                    continue
                n = min(room, len(view))
                self._schedule(view[:n])
                view = view[n:]

    async def wait_writable(self) -> None:
        while True:
            if self.sender_closed:
                raise trio.ClosedResourceError("this end of the emulated link was closed")
            if self._room() > 0 or self.reader_closed or trio.current_time() >= self.conn.cut_time:
                return  # the next send_all will not block (it may raise)
            await self._wait(self.conn.cut_time)

    def _schedule(self, view: memoryview) -> None:
        link = self.link
        cutting = link.drop_after is not None and self.sent + len(view) >= link.drop_after
        now = trio.current_time()
        start = max(self._wire_free, now)
        step = link.segment or max(len(view), 1)
        for i in range(0, len(view), step):
            chunk = bytes(view[i:i + step])
            end = start + link.transmit_time(len(chunk))
            delay = link.latency
            if link.jitter:
                delay = max(0.0, delay + self._rng.uniform(-link.jitter, link.jitter))
            self._last_arrival = max(self._last_arrival, end + delay)
            self._queue.append(_Segment(chunk, end, self._last_arrival))
            start = end
        self._wire_free = start
        self._held += len(view)
        self.sent += len(view)
        if cutting:
            self.conn.cut(start)  # the reset leaves right behind the N-th byte
        self.notify()

    def send_eof(self) -> None:
        if self._eof_tx is None:
            self._eof_tx = max(self._wire_free, trio.current_time())
            self._eof_arrival = max(self._last_arrival, self._eof_tx + self.link.latency)
            self.notify()

    def close_sender(self) -> None:
        self.send_eof()  # a clean close is a FIN after the bytes in flight
        self.sender_closed = True
        self.notify()

    # -- reader side -------------------------------------------------------------------------

    def close_reader(self) -> None:
        self.reader_closed = True
        self._queue.clear()
        self._held = 0
        self.notify()

    async def receive(self, max_bytes: int | None) -> bytes:
        q = self._queue
        while True:
            if self.reader_closed:
                raise trio.ClosedResourceError("this end of the emulated link was closed")
            now = trio.current_time()
            cut = self.conn.cut_time
            if q and q[0].tx_end > cut:
                # Transmitted after the reset: lost, and so is everything behind it on the wire.
                q.clear()
                self._held = 0
                self.notify()
            if q and q[0].arrival <= now:
                return self._take(now, max_bytes)
            if not q:
                eof_delivered = self._eof_tx is not None and self._eof_tx <= cut
                if eof_delivered and now >= self._eof_arrival:
                    return b""
                if not eof_delivered and now >= cut + self.link.latency:
                    raise trio.BrokenResourceError("connection reset (the emulated link was cut)")
            # Bytes still on their way come before an EOF or a reset (the max() in _schedule keeps order).
            deadline = q[0].arrival if q else min(self._eof_arrival, cut + self.link.latency)
            await self._wait(deadline)

    def _take(self, now: float, max_bytes: int | None) -> bytes:
        q = self._queue
        limit = math.inf if max_bytes is None else max_bytes
        parts: list[bytes] = []
        n = 0
        while q and q[0].arrival <= now and n < limit:
            seg = q[0]
            take = int(min(len(seg.data), limit - n))
            if take == len(seg.data):
                parts.append(seg.data)
                q.popleft()
            else:
                parts.append(seg.data[:take])
                seg.data = seg.data[take:]
            n += take
        self._held -= n
        self.received += n
        self.notify()  # room for a blocked sender
        return b"".join(parts)


class EmulatedStream(trio.abc.HalfCloseableStream):
    """One end of a connection through an emulated link.

    Made by `memory_link_pair()` (both ends in memory) or by
    `EmulatedStream.wrap()` (in front of a real stream). Sends go out
    through this end's outgoing `Link`; receives come from the peer's.
    """

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming
        self._send_busy = _Busy("send_all/send_eof/wait_send_all_might_not_block")
        self._receive_busy = _Busy("receive_some")
        self._closed = False

    @property
    def bytes_sent(self) -> int:
        """Bytes accepted by send_all (the ones a cut kept from the wire excluded)."""
        return self._out.sent

    @property
    def bytes_received(self) -> int:
        return self._in.received

    def reset(self) -> None:
        """Cut the connection now, as a scheduled drop would."""
        self._out.conn.cut(trio.current_time())

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_busy:
            await trio.lowlevel.checkpoint()
            await self._out.send(data)

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_busy:
            await trio.lowlevel.checkpoint()
            await self._out.wait_writable()

    async def send_eof(self) -> None:
        with self._send_busy:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("this end of the emulated link was closed")
            self._out.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, as trio's own streams
            if max_bytes < 1:
                raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        with self._receive_busy:
            await trio.lowlevel.checkpoint()
            return await self._in.receive(max_bytes)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.close_sender()
            self._in.close_reader()
        await trio.lowlevel.checkpoint()

    @classmethod
    @asynccontextmanager
    async def wrap(cls, inner: trio.abc.Stream, link: Link,
                   receive_link: Link | None = None) -> AsyncIterator[EmulatedStream]:
        """Shape a real stream: what the caller sends crosses `link` before
        it reaches `inner`; what `inner` receives crosses `receive_link`
        (default: passed straight through, e.g. when the peer shapes its
        own sends). Two relay tasks run for the block's lifetime.

        Leaving the block normally closes the emulated end and waits until
        the bytes in flight have reached `inner` (or the link was cut), as
        a socket's close lets queued bytes go; leaving by an exception
        drops them. `inner` is closed either way; after a cut it is reset
        (SO_LINGER 0 on a socket), so a real peer sees ECONNRESET.
        """
        near, far = memory_link_pair(link, receive_link or PASS_THROUGH)
        flushed = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay_out, far, inner, None, flushed.set)
                nursery.start_soon(_relay_in, inner, far)
                try:
                    yield near
                except BaseException:
                    nursery.cancel_scope.cancel()
                    raise
                await near.aclose()
                await flushed.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await near.aclose()
                await inner.aclose()


def memory_link_pair(link_ab: Link, link_ba: Link | None = None) -> tuple[EmulatedStream, EmulatedStream]:
    """Two connected in-memory stream ends, A and B: what A sends crosses
    `link_ab`, what B sends crosses `link_ba` (default: the same
    parameters). Call it inside trio (times start at `trio.current_time()`).
    No tasks run; under `MockClock(autojump_threshold=0)` the emulated time
    passes in no real time."""
    conn = _Connection()
    ab = _Pipe(link_ab, conn, "ab")
    ba = _Pipe(link_ba if link_ba is not None else link_ab, conn, "ba")
    return EmulatedStream(ab, ba), EmulatedStream(ba, ab)


async def reset_stream(stream: trio.abc.Stream) -> None:
    """Close `stream` abortively: on a TCP socket, SO_LINGER 0 makes the
    kernel send RST instead of FIN, so the peer sees a reset (ECONNRESET,
    trio.BrokenResourceError), not an orderly EOF."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed or not a TCP socket: a plain close is all we can do
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def _relay_out(end: EmulatedStream, stream: trio.abc.Stream, count: Callable[[int], None] | None,
                     done: Callable[[], None] | None = None) -> None:
    """Bytes that crossed the link -> a real stream; EOF and resets go along."""
    try:
        while True:
            try:
                data = await end.receive_some()
            except trio.BrokenResourceError:
                await reset_stream(stream)
                return
            except trio.ClosedResourceError:
                return
            try:
                if not data:
                    if isinstance(stream, trio.abc.HalfCloseableStream):
                        await stream.send_eof()
                    return
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                end.reset()  # the real connection broke: the emulated one breaks too
                return
            if count is not None:
                count(len(data))
    finally:
        if done is not None:
            done()


async def _relay_in(stream: trio.abc.Stream, end: EmulatedStream) -> None:
    """Bytes from a real stream -> into the link; EOF and resets go along."""
    while True:
        try:
            data = await stream.receive_some()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            end.reset()
            return
        try:
            if not data:
                await end.send_eof()
                return
            await end.send_all(data)
        except trio.BrokenResourceError:
            await reset_stream(stream)
            return
        except trio.ClosedResourceError:
            return

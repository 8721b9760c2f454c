"""The WAN link emulator (cdpcore.testing): timing under trio's MockClock
(virtual time, so exact and fast), ordering under jitter, drops, bounded
buffering, half-close, trio's stream contract, the TCP proxy over real
loopback sockets, and Link.parse.
"""
from __future__ import annotations

import random
from functools import partial
import time

import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st

from cdpcore.testing import EmulatedStream, Link, LinkProxy, memory_link_pair

MB = 1_250_000  # 10 Mbit


async def _read_all(stream: trio.abc.ReceiveStream, log: list[tuple[float, int]] | None = None) -> bytes:
    out = bytearray()
    while data := await stream.receive_some():
        if log is not None:
            log.append((trio.current_time(), len(data)))
        out += data
    return bytes(out)


async def _read_until_broken(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    with pytest.raises(trio.BrokenResourceError):
        while True:
            data = await stream.receive_some()
            assert data, "EOF where a reset was expected"
            out += data
    return bytes(out)


# -- timing --------------------------------------------------------------------------------------

@pytest.mark.trio
async def test_10mbit_50ms_carries_1_25_MB_in_1_05_virtual_seconds(autojump_clock):
    a, b = memory_link_pair(Link.parse("10mbit,50ms"))
    payload = random.Random(1).randbytes(MB)
    got = bytearray()
    start_real = time.perf_counter()
    start = trio.current_time()

    async def send():
        await a.send_all(payload)
        await a.send_eof()

    async with trio.open_nursery() as n:
        n.start_soon(send)
        got += await _read_all(b)
    elapsed = trio.current_time() - start
    real = time.perf_counter() - start_real
    assert bytes(got) == payload
    # 1.25 MB at 10 Mbit/s is exactly 1.0 s on the wire, plus 50 ms for the last byte to arrive.
    assert 1.049 <= elapsed <= 1.051, elapsed
    assert real < 10, real  # a sanity bound only: the point is virtual time (typically ~0.1 s)


@pytest.mark.trio
async def test_latency_delays_the_first_byte_and_bandwidth_alone_does_not(autojump_clock):
    a, b = memory_link_pair(Link(latency=0.2))
    t0 = trio.current_time()
    await a.send_all(b"x")
    assert await b.receive_some() == b"x"
    assert trio.current_time() - t0 == pytest.approx(0.2, abs=1e-9)
    # A 1000-byte write on an 8000 bit/s link, no latency: the last segment ends at 1 s.
    a, b = memory_link_pair(Link(bandwidth=8000, segment=None))
    t0 = trio.current_time()
    await a.send_all(bytes(1000))
    assert len(await b.receive_some()) == 1000
    assert trio.current_time() - t0 == pytest.approx(1.0, abs=1e-9)


@pytest.mark.trio
async def test_pacing_delivers_segment_by_segment(autojump_clock):
    # 100 bytes per segment at 8000 bit/s: one segment every 0.1 s, then 0.05 s of latency.
    a, b = memory_link_pair(Link(bandwidth=8000, latency=0.05, segment=100))
    t0 = trio.current_time()
    await a.send_all(bytes(300))
    await a.send_eof()
    log: list[tuple[float, int]] = []
    assert len(await _read_all(b, log)) == 300
    assert [(round(t - t0, 6), n) for t, n in log] == [(0.15, 100), (0.25, 100), (0.35, 100)]


@pytest.mark.trio
async def test_directions_are_independent(autojump_clock):
    a, b = memory_link_pair(Link(latency=0.1), Link(latency=0.3))
    t0 = trio.current_time()
    await a.send_all(b"ping")
    assert await b.receive_some() == b"ping"
    await b.send_all(b"pong")
    assert await a.receive_some() == b"pong"
    assert trio.current_time() - t0 == pytest.approx(0.4, abs=1e-9)


# -- jitter never reorders -----------------------------------------------------------------------

@given(
    payload=st.binary(min_size=1, max_size=20_000),
    splits=st.lists(st.integers(1, 5000), min_size=1, max_size=20),
    reads=st.lists(st.integers(1, 4000), min_size=1, max_size=20),
    latency=st.floats(0, 0.2),
    jitter=st.floats(0, 0.5),
    bandwidth=st.one_of(st.none(), st.floats(1e4, 1e8)),
    segment=st.one_of(st.none(), st.integers(1, 3000)),
    gaps=st.lists(st.floats(0, 0.05), min_size=1, max_size=20),
    seed=st.integers(0, 2**32),
)
def test_jitter_never_reorders_or_loses(payload, splits, reads, latency, jitter, bandwidth, segment, gaps, seed):
    link = Link(bandwidth=bandwidth, latency=latency, jitter=jitter, segment=segment, seed=seed)
    sends: list[tuple[float, int]] = []  # (time, end offset) of each write
    log: list[tuple[float, int]] = []

    async def main():
        a, b = memory_link_pair(link)

        async def send():
            pos = 0
            i = 0
            while pos < len(payload):
                n = splits[i % len(splits)]
                sends.append((trio.current_time(), pos + n))
                await a.send_all(payload[pos:pos + n])
                pos += n
                await trio.sleep(gaps[i % len(gaps)])
                i += 1
            await a.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            out = bytearray()
            i = 0
            while data := await b.receive_some(reads[i % len(reads)]):
                log.append((trio.current_time(), len(out)))
                out += data
                i += 1
        return bytes(out)

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got == payload
    times = [t for t, _ in log]
    assert times == sorted(times)  # arrivals are monotonic in virtual time
    # No byte arrives before it was written plus the smallest possible delay.
    floor = max(0.0, latency - jitter)
    for t, first in log:
        written = next(ts for ts, end in sends if end > first)
        assert t >= written + floor - 1e-9


# -- drops ---------------------------------------------------------------------------------------

@pytest.mark.trio
@pytest.mark.parametrize("n", [0, 1, 1459, 1460, 50_000])
async def test_drop_after_n_bytes_delivers_exactly_n(autojump_clock, n):
    a, b = memory_link_pair(Link.parse(f"10mbit,20ms,jitter=5ms,drop-after={n}"))
    payload = random.Random(n).randbytes(100_000)

    async def send():
        with pytest.raises(trio.BrokenResourceError):
            await a.send_all(payload)
        with pytest.raises(trio.BrokenResourceError):
            await a.send_all(b"more")
        with pytest.raises(trio.BrokenResourceError):
            await a.receive_some()  # the other direction is cut too

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        got = await _read_until_broken(b)
    assert got == payload[:n]
    with pytest.raises(trio.BrokenResourceError):
        await b.send_all(b"x")


@pytest.mark.trio
async def test_drop_at_time_cuts_both_ways_and_keeps_a_prefix(autojump_clock):
    a, b = memory_link_pair(Link.parse("1mbit,10ms,drop-at=300ms,buffer=16KiB"))
    payload = random.Random(2).randbytes(200_000)  # 1.6 s of wire time: the cut comes first
    t0 = trio.current_time()

    async def send():
        with pytest.raises(trio.BrokenResourceError):
            await a.send_all(payload)
        assert trio.current_time() - t0 == pytest.approx(0.3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        got = await _read_until_broken(b)
    assert payload.startswith(got)
    # What was fully on the wire by 300 ms: 37,500 bytes (the buffer keeps the wire busy), less the
    # segment on the wire at the cut (a segment is cut whole; writes make segments of up to 1460 bytes).
    assert 37_500 - 1460 <= len(got) <= 37_500
    assert trio.current_time() - t0 == pytest.approx(0.31)


@pytest.mark.trio
async def test_drop_rate_is_deterministic_per_seed(autojump_clock):
    async def cut_time(seed: int) -> float:
        a, b = memory_link_pair(Link(latency=0.01, drop_rate=2.0, seed=seed))
        t0 = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            await b.receive_some()
        return trio.current_time() - t0

    first = [await cut_time(s) for s in range(5)]
    again = [await cut_time(s) for s in range(5)]
    assert first == pytest.approx(again, abs=1e-9)
    assert len(set(first)) == 5 and all(t > 0.01 for t in first)


@pytest.mark.trio
async def test_reset_wakes_a_blocked_sender_and_reader(autojump_clock):
    a, b = memory_link_pair(Link(buffer=10))

    async def blocked_send():
        with pytest.raises(trio.BrokenResourceError):
            await a.send_all(bytes(100))

    async def blocked_receive():
        with pytest.raises(trio.BrokenResourceError):
            await a.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_send)
        nursery.start_soon(blocked_receive)
        await trio.sleep(1)
        b.reset()


# -- buffering, half-close, trio's contract ------------------------------------------------------

@pytest.mark.trio
async def test_a_sender_without_a_reader_blocks_at_the_buffer(autojump_clock):
    a, b = memory_link_pair(Link(bandwidth=1e6, latency=0.05, buffer=64 * 1024))
    with trio.move_on_after(10) as scope:
        await a.send_all(bytes(1_000_000))
    assert scope.cancelled_caught  # it never finished: nobody reads
    assert a.bytes_sent == 64 * 1024  # exactly the buffer was accepted
    with trio.move_on_after(1):
        await a.wait_send_all_might_not_block()
        pytest.fail("wait_send_all_might_not_block returned with the buffer full")
    assert len(await b.receive_some(1000)) == 1000
    await a.wait_send_all_might_not_block()  # room again
    await a.send_all(bytes(1000))
    with trio.move_on_after(1):
        await a.send_all(b"x")
        pytest.fail("send_all went past the buffer")


@pytest.mark.trio
async def test_send_eof_arrives_after_the_bytes_in_flight(autojump_clock):
    a, b = memory_link_pair(Link(bandwidth=80_000, latency=0.1))
    t0 = trio.current_time()
    await a.send_all(bytes(10_000))  # 1 s on the wire
    await a.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"after eof")
    log: list[tuple[float, int]] = []
    assert len(await _read_all(b, log)) == 10_000
    assert trio.current_time() - t0 == pytest.approx(1.1)
    assert await b.receive_some() == b""  # EOF stays EOF
    # The other direction is still open (half-close).
    await b.send_all(b"reply")
    assert await a.receive_some() == b"reply"


@pytest.mark.trio
async def test_close_is_eof_for_the_peer_and_reset_for_its_sender(autojump_clock):
    a, b = memory_link_pair(Link(latency=0.01))
    await a.send_all(b"last words")
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await a.receive_some()
    assert await _read_all(b) == b"last words"
    with pytest.raises(trio.BrokenResourceError):
        await b.send_all(b"to a closed end")


@pytest.mark.trio
async def test_aclose_wakes_this_ends_blocked_calls_with_closed(autojump_clock):
    a, b = memory_link_pair(Link(buffer=4))

    async def receiver():
        with pytest.raises(trio.ClosedResourceError):
            await a.receive_some()

    async def sender():
        with pytest.raises(trio.ClosedResourceError):
            await a.send_all(bytes(100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        nursery.start_soon(sender)
        await trio.sleep(1)
        await a.aclose()


@pytest.mark.trio
async def test_concurrent_calls_raise_busy(autojump_clock):
    a, b = memory_link_pair(Link(buffer=4))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, bytes(100))  # blocks: the buffer is full
        nursery.start_soon(b.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await a.send_all(b"x")
        with pytest.raises(trio.BusyResourceError):
            await a.send_eof()
        with pytest.raises(trio.BusyResourceError):
            await a.wait_send_all_might_not_block()
        nursery.cancel_scope.cancel()
    a, b = memory_link_pair(Link())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await b.receive_some()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_passes_trios_generic_stream_checks():
    from trio.testing import check_half_closeable_stream

    async def maker():
        return memory_link_pair(Link(latency=0.001, buffer=1 << 16))

    async def clogged():
        # One-byte buffers each holding a byte nobody has read: the next send blocks, either way.
        a, b = memory_link_pair(Link(buffer=1))
        await a.send_all(b"\0")
        await b.send_all(b"\0")
        return a, b

    await check_half_closeable_stream(maker, clogged)


# -- wrap and the proxy over real sockets (real clock, little data) -------------------------------

async def _echo_upper(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data.upper())


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        assert data, f"EOF after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


@pytest.mark.trio
async def test_proxy_forwards_both_ways_and_counts_bytes(nursery):
    listeners = await nursery.start(partial(trio.serve_tcp, _echo_upper, 0, host="127.0.0.1"))
    target_port = listeners[0].socket.getsockname()[1]
    proxy = LinkProxy("127.0.0.1", target_port, Link.parse("100mbit,2ms,jitter=1ms"), Link.parse("1ms"))
    async with proxy as port:
        for _ in range(2):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                payload = random.Random(3).randbytes(30_000).replace(b"\n", b"") + b"hello"
                await client.send_all(payload)
                assert await _read_exactly(client, len(payload)) == payload.upper()
                await client.send_eof()
                assert await client.receive_some() == b""
        for _ in range(100):  # the proxy counts as the relays finish; they do within a few ms
            if all(c.closed for c in proxy.connections):
                break
            await trio.sleep(0.01)
    assert [(c.bytes_up, c.bytes_down, c.closed) for c in proxy.connections] == [
        (len(payload), len(payload), True)] * 2
    assert proxy.bytes_up == proxy.bytes_down == 2 * len(payload)


@pytest.mark.trio
async def test_proxy_drop_resets_both_sockets_after_n_bytes(nursery):
    received = bytearray()
    target_saw: list[str] = []

    async def sink(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some():
                received.extend(data)
            target_saw.append("eof")
        except trio.BrokenResourceError:
            target_saw.append("reset")

    listeners = await nursery.start(partial(trio.serve_tcp, sink, 0, host="127.0.0.1"))
    target_port = listeners[0].socket.getsockname()[1]
    async with LinkProxy("127.0.0.1", target_port, Link.parse("1ms,drop-after=1000")) as port:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        payload = random.Random(4).randbytes(5000)
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(payload)
            with trio.fail_after(5):  # a hang here is the bug
                await client.receive_some()
        await client.aclose()
        with trio.fail_after(5):
            while not target_saw:
                await trio.sleep(0.01)
    assert payload[:1000].startswith(bytes(received))  # a prefix of the first 1000 bytes, never more
    assert target_saw == ["reset"]


@pytest.mark.trio
async def test_wrap_shapes_a_real_socket(nursery):
    listeners = await nursery.start(partial(trio.serve_tcp, _echo_upper, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = trio.current_time()
    async with EmulatedStream.wrap(sock, Link.parse("20ms")) as s:
        await s.send_all(b"abc")
        assert await _read_exactly(s, 3) == b"ABC"
        assert trio.current_time() - t0 >= 0.02  # the latency was paid (a lower bound only)
        await s.send_eof()
        assert await s.receive_some() == b""


# -- Link.parse ----------------------------------------------------------------------------------

def test_parse_reads_the_short_form():
    assert Link.parse("10mbit,50ms,jitter=5ms") == Link(bandwidth=10e6, latency=0.05, jitter=0.005)
    assert Link.parse(" 50ms , unlimited ") == Link(latency=0.05)
    assert Link.parse("rate=1.5Mbit,delay=200us,mtu=9000,buffer=64KiB,drop-after=1MiB,drop-at=2s,"
                      "drop-rate=0.5/s,seed=7") == Link(
        bandwidth=1.5e6, latency=200e-6, segment=9000, buffer=65536, drop_after=1 << 20, drop_at=2.0,
        drop_rate=0.5, seed=7)
    assert Link.parse("segment=none").segment is None


@pytest.mark.parametrize("text, words", [
    ("", "empty link description"),
    ("10mbps", "neither a rate"),
    ("10", "neither a rate"),
    ("10mbit,,50ms", "empty item"),
    ("10mbit,20mbit", "bandwidth given twice"),
    ("50ms,latency=10ms", "latency given twice"),
    ("colour=red", "unknown key 'colour'"),
    ("jitter=5", "not a duration"),
    ("jitter=-5ms", "not a duration"),
    ("rate=fast", "not a rate"),
    ("0mbit", "bandwidth must be a finite number > 0"),
    ("segment=0", "segment must be an integer >= 1"),
    ("buffer=1.3KiB", "whole number of bytes"),
    ("drop-rate=often", "probability per second"),
    ("seed=-1", "non-negative integer"),
    ("rate=1e999mbit", "out of range"),
])
def test_parse_rejects_bad_input_with_one_clear_line(text, words):
    with pytest.raises(ValueError) as e:
        Link.parse(text)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


@given(st.builds(
    Link,
    bandwidth=st.one_of(st.none(), st.integers(1, 10**10).map(float), st.floats(1, 1e10)),
    latency=st.floats(0, 10),
    jitter=st.floats(0, 1),
    segment=st.one_of(st.none(), st.integers(1, 1 << 20)),
    buffer=st.integers(1, 1 << 30),
    drop_after=st.one_of(st.none(), st.integers(0, 1 << 40)),
    drop_at=st.one_of(st.none(), st.floats(0, 1e4)),
    drop_rate=st.floats(0, 100),
    seed=st.integers(0, 2**63),
))
def test_str_round_trips_through_parse(link):
    assert Link.parse(str(link)) == link


@pytest.mark.trio
async def test_wrap_flushes_on_exit_and_resets_the_socket_on_a_cut(nursery):
    seen: list[tuple[bytes, str]] = []

    async def sink(stream: trio.SocketStream) -> None:
        got = bytearray()
        try:
            while data := await stream.receive_some():
                got += data
            seen.append((bytes(got), "eof"))
        except trio.BrokenResourceError:
            seen.append((bytes(got), "reset"))

    listeners = await nursery.start(partial(trio.serve_tcp, sink, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    payload = random.Random(5).randbytes(20_000)
    # Leaving the block normally lets the bytes in flight reach the socket, then an orderly close.
    async with EmulatedStream.wrap(await trio.open_tcp_stream("127.0.0.1", port), Link.parse("10ms")) as s:
        await s.send_all(payload)
    # A cut: the real peer sees a reset, after a prefix of the allowed bytes.
    link = Link.parse("10ms,drop-after=5000")
    async with EmulatedStream.wrap(await trio.open_tcp_stream("127.0.0.1", port), link) as s:
        with pytest.raises(trio.BrokenResourceError):
            await s.send_all(payload)
    with trio.fail_after(5):
        while len(seen) < 2:
            await trio.sleep(0.01)
    assert seen[0] == (payload, "eof")
    assert seen[1][1] == "reset" and payload[:5000].startswith(seen[1][0])

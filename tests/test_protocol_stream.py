"""The sans-IO connections driven by a minimal trio loop over the project's
WAN link emulator (10 Mbit/s, 50 ms, under MockClock): the way the
transport uses them. Real byte streams split reads anywhere; the sender
pipelines OFFERs and DATA under the receiver's in-flight window and waits
only on ACKs; the receiver acks in batches. The replica must equal what was
shipped and both ends must close cleanly, without deadlock.
"""
from __future__ import annotations

import random

import pytest
import trio

from cdpcore.protocol.connection import ServeConnection, ShipConnection, State
from cdpcore.protocol.frames import (
    Ack, Bye, Data, Have, Hello, Limits, Offer, Ping, Pong, Position, Seal, Segment, Welcome,
)
from cdpcore.testing import Link, memory_link_pair
from conftest import scale

HEADER = b"H" * 64


async def run_sender(stream: trio.abc.Stream, payload: bytes, rng: random.Random) -> dict[str, int]:
    ship = ShipConnection()
    stats = {"max_inflight": 0, "frames": 0}
    changed = trio.Condition()
    done = trio.Event()
    lock = trio.Lock()  # send() and the write of its bytes, in one piece (docs/protocol.md)

    async def send(frame: object) -> None:
        async with lock:
            await stream.send_all(ship.send(frame))  # type: ignore[arg-type]

    async def reader() -> None:
        while ship.state is not State.CLOSED:
            data = await stream.receive_some(65536)
            assert data, "the receiver closed early"
            for f in ship.receive_data(data):
                if isinstance(f, Ping):
                    await send(Pong(n=f.n))
            async with changed:
                changed.notify_all()
        done.set()

    async def wait_until(pred: object) -> None:
        async with changed:
            while not pred():  # type: ignore[operator]
                await changed.wait()

    await send(Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=False, domain=None, agent="test"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await wait_until(lambda: ship.state is State.OPEN)
        assert ship.limits is not None
        await send(Segment(seg=1, header=HEADER))
        off, req = 0, 0
        while off < len(payload):
            n = min(rng.randint(1, 40_000), len(payload) - off)
            req += 1
            await wait_until(ship.can_offer)
            await send(Offer(req=req, ids=(bytes([req % 256]) * 32,)))
            f = Data(seg=1, off=64 + off, end=64 + off + n, first_seq=req, last_seq=req, last_ts=req,
                     raw=n, body=payload[off:off + n])
            await wait_until(lambda: ship.can_send(f.wire_size()))
            await send(f)
            stats["max_inflight"] = max(stats["max_inflight"], ship.inflight_bytes)
            stats["frames"] += 1
            off += n
        await send(Seal(seg=1, size=64 + len(payload)))
        await wait_until(lambda: ship.inflight_bytes == 0 and ship.outstanding_offers == 0)
        await send(Bye())
        await done.wait()
    assert ship.state is State.CLOSED and ship.error is None and ship.peer_error is None
    return stats


async def run_receiver(stream: trio.abc.Stream, limits: Limits, rng: random.Random) -> bytearray:
    """Reads and answers; a committer task acks what arrived every 50 ms
    (a receiver that fsyncs in groups), and sooner when half the window is
    waiting."""
    serve = ServeConnection()
    replica = bytearray(HEADER)
    state = {"acked": 64, "frames": 0}
    lock = trio.Lock()  # one writer at a time on the stream
    closed = trio.Event()

    async def ack_now() -> None:
        async with lock:
            if len(replica) > state["acked"] and serve.state is State.OPEN:
                state["acked"] = len(replica)
                await stream.send_all(serve.send(Ack(seg=1, size=len(replica), last_seq=None)))

    async def committer() -> None:
        while not closed.is_set():
            with trio.move_on_after(0.05):
                await closed.wait()
            await ack_now()

    async def reader() -> None:
        while serve.state is not State.CLOSED:
            data = await stream.receive_some(rng.choice([1460, 16384, 65536]))
            assert data, "the sender closed early"
            out = bytearray()
            async with lock:
                for f in serve.receive_data(data):
                    if isinstance(f, Hello):
                        out += serve.send(Welcome(version=serve.version or 1, source="s", dedupe_key=b"k" * 32,
                                                  position=Position(), limits=limits))
                    elif isinstance(f, Offer):
                        out += serve.send(Have.of(f.req, [False] * len(f.ids)))
                    elif isinstance(f, Data):
                        assert f.off == len(replica), "data out of sequence"
                        replica.extend(f.body)
                        state["frames"] += 1
                        if state["frames"] % 7 == 1:  # the sender's reader answers while its writer writes
                            out += serve.send(Ping(n=state["frames"]))
                    elif isinstance(f, Seal):
                        assert f.size == len(replica)
                    elif isinstance(f, Bye):
                        out += serve.send(Bye())
                if out:
                    await stream.send_all(bytes(out))
            if len(replica) - state["acked"] > limits.inflight // 2:
                await ack_now()
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer)
        nursery.start_soon(reader)
    assert serve.error is None
    return replica


@pytest.mark.trio
@pytest.mark.parametrize("seed", range(scale(2, 10)))
async def test_conversation_over_an_emulated_wan(autojump_clock: object, seed: int) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(scale(1_000_000, 4_000_000))
    limits = Limits(frame=64 << 10, inflight=256 << 10, offers=2)
    a, b = memory_link_pair(Link.parse("10mbit,50ms"))
    result: dict[str, object] = {}

    async def sender() -> None:
        result["stats"] = await run_sender(a, payload, random.Random(seed + 1000))

    async def receiver() -> None:
        result["replica"] = await run_receiver(b, limits, random.Random(seed + 2000))

    with trio.fail_after(3600):  # virtual seconds: a deadlock fails instead of hanging
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
    assert bytes(result["replica"]) == HEADER + payload  # type: ignore[arg-type]
    stats = result["stats"]
    assert isinstance(stats, dict) and 0 < stats["max_inflight"] <= limits.inflight

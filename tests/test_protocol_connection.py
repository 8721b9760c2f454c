"""The connection state machines (cdpcore.protocol.connection): a whole
conversation between a ShipConnection and a ServeConnection wired back to
back in memory, version negotiation, flow control, and every out-of-order
case of the state table, from both ends (what the peer sends, and what our
own caller tries to send).
"""
from __future__ import annotations

import os
import random
from typing import Callable

import pytest
from hypothesis import given, strategies as st

from cdpcore.errors import ProtocolError
from cdpcore.protocol.connection import HELLO_FRAME_CAP, MAX_PINGS, ServeConnection, ShipConnection, State
from cdpcore.protocol.frames import (
    Ack, Base, Bye, Data, Error, File, Frame, Have, Hello, Limits, Need, Offer, Ping, Pong, Position, Prune,
    Seal, Segment, SegPos, Welcome, encode,
)

UUID = b"J" * 16
KEY = b"K" * 32
HEADER = b"H" * 64
ID = [bytes([i]) * 32 for i in range(256)]


def hello(versions: tuple[int, int] = (1, 1), encrypted: bool = False) -> Hello:
    return Hello(versions=versions, uuid=UUID, encrypted=encrypted, domain=None, agent="cdpcore test")


def welcome(serve: ServeConnection, position: Position | None = None, limits: Limits | None = None,
            key: bytes | None = KEY) -> Welcome:
    return Welcome(version=serve.version or 1, source="ward-3", dedupe_key=key,
                   position=position or Position(), limits=limits or Limits())


def data(seg: int | None = 1, off: int = 64, end: int = 164, body: bytes = b"x" * 100, file: str | None = None,
         ) -> Data:
    if file is not None:
        return Data(file=file, off=off, end=end, raw=len(body), body=body)
    return Data(seg=seg, off=off, end=end, first_seq=1, last_seq=2, last_ts=5, raw=len(body), body=body)


def pipe(b: bytes, dst: ShipConnection | ServeConnection, rng: random.Random | None = None) -> list[Frame]:
    """Deliver bytes to `dst`, in random pieces when an rng is given."""
    if rng is None:
        return dst.receive_data(b)
    out: list[Frame] = []
    i = 0
    while i < len(b):
        n = rng.randint(1, max(1, len(b) // 3))
        out += dst.receive_data(b[i:i + n])
        i += n
    return out


def connect(position: Position | None = None, limits: Limits | None = None, encrypted: bool = False,
            ) -> tuple[ShipConnection, ServeConnection]:
    ship, serve = ShipConnection(), ServeConnection()
    assert pipe(ship.send(hello(encrypted=encrypted)), serve) == [hello(encrypted=encrypted)]
    assert serve.state is State.HANDSHAKE and serve.version == 1
    w = welcome(serve, position, limits, None if encrypted else KEY)
    assert pipe(serve.send(w), ship) == [w]
    assert ship.state is serve.state is State.OPEN
    return ship, serve


def opened() -> tuple[ShipConnection, ServeConnection]:
    """Connected, segment 1 opened."""
    ship, serve = connect()
    pipe(ship.send(Segment(seg=1, header=HEADER)), serve)
    return ship, serve


# ---- a whole conversation ------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_full_conversation(split: bool) -> None:
    rng = random.Random(5) if split else None
    ship, serve = ShipConnection(), ServeConnection()
    assert ship.state is serve.state is State.HANDSHAKE
    pos = Position(segments=(SegPos(1, 7, 4096, True), SegPos(2, 8, 200, False)), files={"journal.json": 50})
    [h] = pipe(ship.send(hello(versions=(1, 1))), serve, rng)
    assert serve.hello == h and serve.version == 1
    [w] = pipe(serve.send(welcome(serve, pos)), ship, rng)
    assert ship.version == 1 and ship.position == pos and ship.limits == Limits() and ship.source == "ward-3"
    assert ship.dedupe_key == KEY

    # resume segment 2 from its durable size, then open and fill segment 3
    sent = [data(seg=2, off=200, end=300), Segment(seg=3, header=HEADER), Offer(req=1, ids=tuple(ID[:10])),
            data(seg=3, off=64, end=1000), Seal(seg=2, size=300)]
    got: list[Frame] = []
    for f in sent:
        got += pipe(ship.send(f), serve, rng)
    assert got == sent
    assert ship.inflight_bytes == serve.inflight_bytes > 0 and ship.outstanding_offers == 1
    assert not ship.can_send(Limits().inflight)

    [have] = pipe(serve.send(Have.of(1, [i % 3 == 0 for i in range(10)])), ship, rng)
    assert [have.held(i) for i in range(10)] == [i % 3 == 0 for i in range(10)]
    assert ship.outstanding_offers == 0
    pipe(serve.send(Ack(seg=2, size=300, last_seq=2)), ship, rng)
    inflight_after_one = ship.inflight_bytes
    assert 0 < inflight_after_one < serve.inflight_bytes + 1
    pipe(serve.send(Ack(seg=3, size=1000, last_seq=2)), ship, rng)
    assert ship.inflight_bytes == serve.inflight_bytes == 0

    # a base: its file's bytes, the file, a directory, the base
    for f in [data(file="base/b0/a", off=0, end=5, body=b"hello"),
              File(file="base/b0/a", size=5, mode=0o644, mtime_us=1, kind="file"),
              File(file="base/b0/d", size=0, mode=0o755, mtime_us=1, kind="dir"), Base(name="b0")]:
        assert pipe(ship.send(f), serve, rng) == [f]
    pipe(serve.send(Ack(file="base/b0/a", size=5)), ship, rng)

    assert pipe(ship.send(Ping(n=7)), serve, rng) == [Ping(n=7)]
    assert pipe(serve.send(Pong(n=7)), ship, rng) == [Pong(n=7)]
    assert pipe(ship.send(Bye()), serve, rng) == [Bye()]
    assert ship.state is serve.state is State.CLOSING
    assert pipe(serve.send(Bye()), ship, rng) == [Bye()]
    assert ship.state is serve.state is State.CLOSED
    assert ship.error is serve.error is None


def test_encrypted_source_gets_no_dedupe_key() -> None:
    ship, serve = connect(encrypted=True)
    assert ship.dedupe_key is None


# ---- version negotiation -----------------------------------------------------------------------


@given(st.integers(1, 9), st.integers(0, 4), st.integers(1, 9), st.integers(0, 4))
def test_version_negotiation_picks_the_highest_common(slo: int, sspan: int, rlo: int, rspan: int) -> None:
    ours, theirs = (slo, slo + sspan), (rlo, rlo + rspan)
    ship, serve = ShipConnection(versions=ours), ServeConnection(versions=theirs)
    b = ship.send(hello(versions=ours))
    common = range(max(slo, rlo), min(ours[1], theirs[1]) + 1)
    if not common:
        with pytest.raises(ProtocolError, match="no common protocol version") as e:
            serve.receive_data(b)
        assert e.value.code == "version" and serve.state is State.CLOSED
        err = Error.about(e.value)
        assert pipe(serve.send(err), ship) == [err]
        assert ship.state is State.CLOSED and ship.peer_error == err
        return
    serve.receive_data(b)
    assert serve.version == max(common)
    ship.receive_data(serve.send(welcome(serve)))
    assert ship.version == max(common)


def test_welcome_must_carry_the_negotiated_version() -> None:
    ship, serve = ShipConnection(versions=(1, 3)), ServeConnection(versions=(1, 2))
    serve.receive_data(ship.send(hello(versions=(1, 3))))
    assert serve.version == 2
    with pytest.raises(ProtocolError, match="negotiated") as e:
        serve.send(Welcome(version=1, source="s", dedupe_key=KEY, position=Position(), limits=Limits()))
    assert e.value.code == "version"


@pytest.mark.parametrize("version", [1, 4])
def test_sender_refuses_a_welcome_outside_its_range(version: int) -> None:
    ship = ShipConnection(versions=(2, 3))
    ship.send(hello(versions=(2, 3)))
    with pytest.raises(ProtocolError, match="not in our range") as e:
        ship.receive_data(encode(Welcome(version=version, source="s", dedupe_key=KEY, position=Position(),
                                         limits=Limits())))
    assert e.value.code == "version" and ship.state is State.CLOSED


def test_hello_outside_what_the_code_speaks_is_a_misuse() -> None:
    with pytest.raises(ProtocolError, match="outside what this code speaks"):
        ShipConnection(versions=(1, 1)).send(hello(versions=(1, 2)))
    with pytest.raises(ValueError):
        ShipConnection(versions=(2, 1))


# ---- flow control ------------------------------------------------------------------------------


def test_inflight_window_is_enforced_on_both_ends() -> None:
    limits = Limits(frame=64 << 10, inflight=200 << 10)
    ship, serve = connect(limits=limits)
    pipe(ship.send(Segment(seg=1, header=HEADER)), serve)
    body = b"b" * 60_000
    off = 64
    frames = []
    while ship.can_send(len(encode(data(off=off, end=off + 60_000, body=body)))):
        f = data(off=off, end=off + 60_000, body=body)
        pipe(ship.send(f), serve)
        frames.append(f)
        off += 60_000
    assert len(frames) == 3 and ship.inflight_bytes == serve.inflight_bytes
    over = data(off=off, end=off + 60_000, body=body)
    # our caller cannot exceed it...
    with pytest.raises(ProtocolError, match="in flight") as e:
        ship.send(over)
    assert e.value.code == "limit" and ship.state is State.CLOSED
    # ...and a sender that does is refused by the receiver
    with pytest.raises(ProtocolError, match="in flight") as e:
        serve.receive_data(encode(over))
    assert e.value.code == "limit"


def test_acks_release_frames_up_to_their_size() -> None:
    ship, serve = opened()
    sizes = []
    for off in range(64, 664, 100):
        sizes.append(len(ship.send(data(off=off, end=off + 100))))
        serve.receive_data(encode(data(off=off, end=off + 100)))
    assert ship.inflight_bytes == serve.inflight_bytes == sum(sizes)
    pipe(serve.send(Ack(seg=1, size=250)), ship)  # covers only the frame ending at 164
    assert ship.inflight_bytes == serve.inflight_bytes == sum(sizes[1:])
    pipe(serve.send(Ack(seg=1, size=464)), ship)
    assert ship.inflight_bytes == sum(sizes[4:])
    pipe(serve.send(Ack(seg=1, size=664, last_seq=9)), ship)
    assert ship.inflight_bytes == serve.inflight_bytes == 0


def test_need_answers_a_frame_and_the_resend_is_acked() -> None:
    ship, serve = opened()
    pipe(ship.send(data(off=64, end=164)), serve)
    pipe(ship.send(data(off=164, end=264)), serve)
    [need] = pipe(serve.send(Need(seg=1, off=64, ids=(ID[1],))), ship)
    assert need.ids == (ID[1],)
    # the refused frame no longer counts; the sender resends from 64
    pipe(ship.send(data(off=64, end=164, body=b"y" * 100)), serve)
    pipe(ship.send(data(off=164, end=264)), serve)
    pipe(serve.send(Ack(seg=1, size=264)), ship)
    assert ship.inflight_bytes == serve.inflight_bytes == 0


def test_offers_window() -> None:
    ship, serve = connect(limits=Limits(offers=2, offer_ids=3))
    pipe(ship.send(Offer(req=1, ids=(ID[0],))), serve)
    assert ship.can_offer()
    pipe(ship.send(Offer(req=2, ids=(ID[0], ID[1], ID[2]))), serve)
    assert not ship.can_offer()
    pipe(serve.send(Have(req=2, bits=b"\x07")), ship)
    assert ship.can_offer() and ship.outstanding_offers == serve.outstanding_offers == 1


def test_can_send_is_false_outside_open() -> None:
    ship = ShipConnection()
    assert not ship.can_send(1) and not ship.can_offer()


# ---- out of order: what the sender may not send ----------------------------------------------
#
# Each case gives the two connections in some state and a frame that the
# *sender* side emits. Both checks must fire: our caller's send() refuses it,
# and a receiver fed those bytes anyway (a broken or hostile sender) refuses
# them too. Either way the connection ends CLOSED.


def _fresh() -> tuple[ShipConnection, ServeConnection]:
    return ShipConnection(), ServeConnection()


def _hello_sent() -> tuple[ShipConnection, ServeConnection]:
    ship, serve = _fresh()
    serve.receive_data(ship.send(hello()))
    return ship, serve


def _with_data() -> tuple[ShipConnection, ServeConnection]:
    ship, serve = opened()
    pipe(ship.send(data(off=64, end=164)), serve)
    return ship, serve


def _sealed() -> tuple[ShipConnection, ServeConnection]:
    ship, serve = opened()
    pipe(ship.send(data(off=64, end=164)), serve)
    pipe(ship.send(Seal(seg=1, size=164)), serve)
    return ship, serve


def _offered() -> tuple[ShipConnection, ServeConnection]:
    ship, serve = connect(limits=Limits(offers=1))
    pipe(ship.send(Offer(req=4, ids=(ID[0],))), serve)
    return ship, serve


def _replacing() -> tuple[ShipConnection, ServeConnection]:
    ship, serve = opened()
    pipe(ship.send(Segment(seg=1, header=HEADER, replace=True)), serve)
    return ship, serve


def _closing() -> tuple[ShipConnection, ServeConnection]:
    ship, serve = connect()
    pipe(ship.send(Bye()), serve)
    return ship, serve


SENDER_CASES: list[tuple[str, Callable[[], tuple[ShipConnection, ServeConnection]], Frame, str]] = [
    ("data before hello", _fresh, data(), "out of order"),
    ("segment before hello", _fresh, Segment(seg=1, header=HEADER), "out of order"),
    ("ping before hello", _fresh, Ping(n=1), "out of order"),
    ("data before welcome", _hello_sent, data(), "out of order"),
    ("ping before welcome", _hello_sent, Ping(n=1), "out of order"),
    ("hello twice", _hello_sent, hello(), "out of order"),
    ("hello after welcome", connect, hello(), "out of order"),
    ("have from the sender", connect, Have(req=1, bits=b""), "out of order"),
    ("need from the sender", _with_data, Need(seg=1, off=64, ids=(ID[0],)), "out of order"),
    ("ack from the sender", _with_data, Ack(seg=1, size=100), "out of order"),
    ("welcome from the sender", connect,
     Welcome(version=1, source="s", dedupe_key=KEY, position=Position(), limits=Limits()), "out of order"),
    ("data for a segment never opened", connect, data(seg=9), "neither in the position nor opened"),
    ("data leaving a hole", opened, data(off=65, end=100), "would leave a hole"),
    ("data leaving a hole in a file", connect, data(file="audit.log", off=1, end=5, body=b"x"),
     "would leave a hole"),
    ("data beyond the seal", _sealed, data(off=164, end=200), "beyond its seal"),
    ("data over the body limit", opened,
     Data(seg=1, off=64, end=99, codec="zstd", raw=(24 << 20) + 1, body=b"z"), "more than the limit"),
    ("seal at a size not sent", _with_data, Seal(seg=1, size=100), "bytes were sent"),
    ("seal of a segment never opened", connect, Seal(seg=3, size=64), "neither in the position"),
    ("file complete at a size not sent", connect,
     File(file="base/b/x", size=3, mode=0, mtime_us=0, kind="file"), "were sent"),
    ("offer beyond the offers limit", _offered, Offer(req=5, ids=(ID[1],)), "offers outstanding"),
    ("offer reusing an outstanding req", connect, Offer(req=1, ids=(ID[0],) * 3), None),
    ("offer over offer_ids", lambda: connect(limits=Limits(offer_ids=2)), Offer(req=1, ids=tuple(ID[:3])),
     "more than the limit"),
    ("segment reopened with data in flight", _with_data, Segment(seg=1, header=HEADER, replace=True),
     "in flight"),
    ("segment un-replaced before the prune", _replacing, Segment(seg=1, header=HEADER), "being replaced"),
    ("prune with data in flight", _with_data, Prune(segments=(), bases=()), "in flight"),
    ("bye with data in flight", _with_data, Bye(), "in flight"),
    ("bye with an offer unanswered", _offered, Bye(), "unanswered"),
    ("data after bye", _closing, data(), "out of order"),
    ("bye twice", _closing, Bye(), "out of order"),
    ("pong for no ping", connect, Pong(n=3), "no ping 3"),
]


@pytest.mark.parametrize("name,setup,frame,match", SENDER_CASES, ids=[c[0] for c in SENDER_CASES])
def test_sender_out_of_order(name: str, setup: Callable[[], tuple[ShipConnection, ServeConnection]],
                             frame: Frame, match: str | None) -> None:
    if name == "offer reusing an outstanding req":
        ship, serve = connect()
        pipe(ship.send(Offer(req=1, ids=(ID[0],))), serve)
        match = "already outstanding"
    else:
        ship, serve = setup()
    with pytest.raises(ProtocolError, match=match) as e:
        ship.send(frame)
    assert ship.state is State.CLOSED and ship.error is e.value
    with pytest.raises(ProtocolError, match=match):
        serve.receive_data(encode(frame))
    assert serve.state is State.CLOSED
    # either end can still say why, once
    assert Error.about(e.value).code in ("protocol", "limit")
    ship.send(Error.about(e.value))
    with pytest.raises(ProtocolError, match="already sent"):
        ship.send(Error(code="protocol", message="again"))


# ---- out of order: what the receiver may not send ------------------------------------------------


def _closed() -> tuple[ShipConnection, ServeConnection]:
    ship, serve = _closing()
    pipe(serve.send(Bye()), ship)
    return ship, serve


RECEIVER_CASES: list[tuple[str, Callable[[], tuple[ShipConnection, ServeConnection]], Frame, str]] = [
    ("welcome before hello", _fresh,
     Welcome(version=1, source="s", dedupe_key=KEY, position=Position(), limits=Limits()), "out of order"),
    ("ack before welcome", _hello_sent, Ack(seg=1, size=1), "out of order"),
    ("pong before welcome", _hello_sent, Pong(n=1), "out of order"),
    ("welcome twice", connect,
     Welcome(version=1, source="s", dedupe_key=KEY, position=Position(), limits=Limits()), "out of order"),
    ("data from the receiver", opened, data(), "out of order"),
    ("segment from the receiver", connect, Segment(seg=1, header=HEADER), "out of order"),
    ("bye before the sender's", connect, Bye(), "only after the sender"),
    ("have for no offer", connect, Have(req=1, bits=b"\x01"), "not an outstanding offer"),
    ("have with too many bits", _offered, Have(req=4, bits=b"\x01\x00"), "bytes of bits"),
    ("have with too few bits", _offered, Have(req=4, bits=b""), "bytes of bits"),
    ("have with a bit past the ids", _offered, Have(req=4, bits=b"\x03"), "beyond the offer"),
    ("ack of a segment never opened", connect, Ack(seg=1, size=64), "neither in the position"),
    ("ack beyond what was sent", _with_data, Ack(seg=1, size=165), "beyond the 164 bytes sent"),
    ("ack of a file never sent", connect, Ack(file="audit.log", size=0), "no data was sent"),
    ("need for no frame in flight", _with_data, Need(seg=1, off=100, ids=(ID[0],)), "in flight"),
    ("need over offer_ids", lambda: connect(limits=Limits(offer_ids=1)), Need(seg=1, off=64, ids=tuple(ID[:2])),
     "more than the limit"),
    ("ack after the sender's bye beyond what was sent", _closing, Ack(seg=1, size=1), "neither in the position"),
    ("have after the sender's bye", _closing, Have(req=1, bits=b""), "out of order"),
    ("pong for no ping", connect, Pong(n=1), "no ping 1"),
    ("anything after close", _closed, Ping(n=1), "closed"),
]


@pytest.mark.parametrize("name,setup,frame,match", RECEIVER_CASES, ids=[c[0] for c in RECEIVER_CASES])
def test_receiver_out_of_order(name: str, setup: Callable[[], tuple[ShipConnection, ServeConnection]],
                               frame: Frame, match: str) -> None:
    ship, serve = setup()
    with pytest.raises(ProtocolError, match=match):
        serve.send(frame)
    assert serve.state is State.CLOSED
    with pytest.raises(ProtocolError, match=match):
        ship.receive_data(encode(frame))
    assert ship.state is State.CLOSED


def test_ack_going_backwards_on_a_segment() -> None:
    ship, serve = opened()
    pipe(ship.send(data(off=64, end=164)), serve)
    pipe(serve.send(Ack(seg=1, size=164)), ship)
    with pytest.raises(ProtocolError, match="acks go forward"):
        ship.receive_data(encode(Ack(seg=1, size=100)))


def test_a_file_ack_may_shrink_when_the_file_was_rewritten() -> None:
    ship, serve = connect(position=Position(files={"journal.json": 500}))
    pipe(ship.send(data(file="journal.json", off=0, end=300, body=b"j" * 300)), serve)
    pipe(serve.send(Ack(file="journal.json", size=300)), ship)
    assert ship.inflight_bytes == serve.inflight_bytes == 0


def test_first_frame_must_be_hello_and_small() -> None:
    serve = ServeConnection()
    with pytest.raises(ProtocolError, match="the first frame must be hello"):
        serve.receive_data(encode(Bye()))
    serve = ServeConnection()
    with pytest.raises(ProtocolError, match="length prefix") as e:
        serve.receive_data((HELLO_FRAME_CAP + 1).to_bytes(4, "little"))
    assert e.value.code == "limit"


def test_after_welcome_the_receiver_enforces_its_frame_limit() -> None:
    ship, serve = connect(limits=Limits(frame=64 << 10))
    pipe(ship.send(Segment(seg=1, header=HEADER)), serve)
    big = Data(seg=1, off=64, end=70_064, raw=70_000, body=b"q" * 70_000)
    with pytest.raises(ProtocolError, match="frame limit") as e:
        ship.send(big)
    assert e.value.code == "limit"
    with pytest.raises(ProtocolError, match="frame limit"):
        serve.receive_data(encode(big))


def test_an_error_frame_closes_both_ends_with_its_reason() -> None:
    ship, serve = opened()
    err = Error(code="storage", message="vault disk full")
    assert pipe(serve.send(err), ship) == [err]
    assert ship.state is serve.state is State.CLOSED
    assert ship.peer_error == err and ship.error is None
    with pytest.raises(ProtocolError, match="closed"):
        ship.send(data())
    with pytest.raises(ProtocolError, match="after the connection closed"):
        ship.receive_data(encode(Ack(seg=1, size=64)))


def test_error_in_the_same_read_as_frames_after_it() -> None:
    ship, serve = opened()
    err = Error(code="internal", message="m")
    assert ship.receive_data(encode(Ack(seg=1, size=64)) + encode(err) + encode(Ack(seg=1, size=64)) + b"junk") \
        == [Ack(seg=1, size=64), err]
    assert ship.peer_error == err and ship.state is State.CLOSED and ship.error is None
    with pytest.raises(ProtocolError, match="after the connection closed"):
        ship.receive_data(b"more")


def test_frames_after_a_protocol_error_in_the_same_read_are_not_returned() -> None:
    ship, serve = opened()
    with pytest.raises(ProtocolError):
        serve.receive_data(encode(data(off=64, end=164)) + encode(data(seg=7)) + encode(Bye()))
    assert serve.state is State.CLOSED


def test_too_many_pings() -> None:
    ship, serve = connect()
    for n in range(MAX_PINGS):
        pipe(ship.send(Ping(n=n)), serve)
    with pytest.raises(ProtocolError, match="pings unanswered"):
        ship.send(Ping(n=MAX_PINGS))
    with pytest.raises(ProtocolError, match="pings unanswered"):
        serve.receive_data(encode(Ping(n=MAX_PINGS)))


def test_ping_pong_both_ways_and_in_closing() -> None:
    ship, serve = connect()
    pipe(serve.send(Ping(n=1)), ship)
    pipe(ship.send(Pong(n=1)), serve)
    pipe(ship.send(Bye()), serve)
    pipe(serve.send(Ping(n=2)), ship)
    pipe(ship.send(Pong(n=2)), serve)
    pipe(serve.send(Bye()), ship)
    assert ship.state is serve.state is State.CLOSED


def test_prune_drops_segments_and_ends_replacement() -> None:
    ship, serve = connect(position=Position(segments=(SegPos(1, 1, 100, True), SegPos(2, 2, 100, False))))
    pipe(ship.send(Segment(seg=2, header=HEADER, replace=True)), serve)
    pipe(ship.send(data(seg=2, off=64, end=80, body=b"n" * 16)), serve)
    pipe(serve.send(Ack(seg=2, size=80)), ship)
    pipe(ship.send(Prune(segments=((2, 9, 80),), bases=())), serve)
    with pytest.raises(ProtocolError, match="neither in the position"):
        ship.send(data(seg=1, off=100, end=110, body=b"x" * 10))
    # segment 2 is live again: it continues where the replacement ended
    ship2, serve2 = connect(position=Position(segments=(SegPos(2, 2, 100, False),)))
    pipe(ship2.send(Segment(seg=2, header=HEADER, replace=True)), serve2)
    pipe(ship2.send(Prune(segments=((2, 9, 64),), bases=())), serve2)
    pipe(ship2.send(Segment(seg=2, header=HEADER)), serve2)
    pipe(ship2.send(data(seg=2, off=64, end=80, body=b"n" * 16)), serve2)


def test_segment_reopened_without_replace_keeps_its_position() -> None:
    ship, serve = connect(position=Position(segments=(SegPos(1, 1, 500, False),)))
    pipe(ship.send(Segment(seg=1, header=HEADER)), serve)
    pipe(ship.send(data(seg=1, off=500, end=600)), serve)  # not a hole: 500 bytes are held


# ---- a random conversation: both ends keep the same books ------------------------------------------


@given(st.randoms(use_true_random=False), st.integers(5, 60))
def test_random_conversations_keep_both_books_equal(rng: random.Random, steps: int) -> None:
    limits = Limits(frame=64 << 10, inflight=256 << 10, offers=3, offer_ids=8)
    ship, serve = connect(limits=limits, position=Position(segments=(SegPos(1, 1, 64, False),)))
    to_serve: list[bytes] = []  # bytes on the wire, not yet delivered
    to_ship: list[bytes] = []
    high = {1: 64}
    unacked: dict[int, int] = {}  # seg -> end the receiver has seen but not acked
    seen_data: list[Data] = []
    offers: list[Offer] = []
    req = 0

    def deliver_to_serve() -> None:
        for f in pipe(b"".join(to_serve), serve, rng):
            if isinstance(f, Data):
                seen_data.append(f)
                unacked[f.seg] = max(unacked.get(f.seg, 0), f.end)  # type: ignore[index]
            elif isinstance(f, Offer):
                offers.append(f)
        to_serve.clear()

    for _ in range(steps):
        action = rng.choice(["data", "data", "offer", "ack", "have", "deliver", "deliver_back", "segment"])
        if action == "data":
            seg = rng.choice(sorted(high))
            n = rng.randint(1, 20_000)
            f = Data(seg=seg, off=high[seg] - rng.choice([0, 0, min(10, high[seg] - 64)]), end=high[seg] + n,
                     codec="zstd", raw=n, body=os.urandom(rng.randint(0, 30_000)))
            if ship.can_send(len(encode(f))):
                to_serve.append(ship.send(f))
                high[seg] = f.end
        elif action == "segment" and len(high) < 4:
            seg = max(high) + 1
            to_serve.append(ship.send(Segment(seg=seg, header=HEADER)))
            high[seg] = 64
        elif action == "offer" and ship.can_offer():
            req += 1
            to_serve.append(ship.send(Offer(req=req, ids=tuple(ID[:rng.randint(1, 8)]))))
        elif action == "deliver":
            deliver_to_serve()
        elif action == "ack" and unacked:
            seg = rng.choice(sorted(unacked))
            to_ship.append(serve.send(Ack(seg=seg, size=unacked.pop(seg))))
        elif action == "have" and offers:
            o = offers.pop(0)
            to_ship.append(serve.send(Have.of(o.req, [rng.random() < 0.5 for _ in o.ids])))
        elif action == "deliver_back":
            pipe(b"".join(to_ship), ship, rng)
            to_ship.clear()
        # the receiver's books never show more than the sender's (module docstring)
        assert serve.inflight_bytes <= ship.inflight_bytes <= limits.inflight
        assert serve.outstanding_offers <= ship.outstanding_offers <= limits.offers
    # drain: deliver everything, ack everything, answer every offer
    deliver_to_serve()
    for seg in sorted(unacked):
        to_ship.append(serve.send(Ack(seg=seg, size=unacked[seg])))
    for o in offers:
        to_ship.append(serve.send(Have.of(o.req, [True] * len(o.ids))))
    pipe(b"".join(to_ship), ship, rng)
    assert ship.inflight_bytes == serve.inflight_bytes == 0
    assert ship.outstanding_offers == serve.outstanding_offers == 0
    pipe(ship.send(Bye()), serve)
    pipe(serve.send(Bye()), ship)
    assert ship.state is serve.state is State.CLOSED


def test_books_of_complete_base_files_are_forgotten() -> None:
    ship, serve = connect()
    for i in range(200):
        path = f"base/b0/f{i}"
        pipe(ship.send(data(file=path, off=0, end=3, body=b"abc")), serve)
        pipe(ship.send(File(file=path, size=3, mode=0o600, mtime_us=0, kind="file")), serve)
        pipe(serve.send(Ack(file=path, size=3)), ship)
    assert len(ship._books.targets) == len(serve._books.targets) == 0  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="no data was sent"):
        ship.receive_data(encode(Ack(file="base/b0/f1", size=3)))


def test_a_complete_file_stays_known_while_in_flight_and_after_a_need() -> None:
    ship, serve = connect()
    pipe(ship.send(data(file="base/b0/x", off=0, end=3, body=b"abc")), serve)
    pipe(ship.send(data(file="base/b0/x", off=3, end=6, body=b"def")), serve)
    pipe(ship.send(File(file="base/b0/x", size=6, mode=0o600, mtime_us=0, kind="file")), serve)
    pipe(serve.send(Need(file="base/b0/x", off=3, ids=(ID[0],))), ship)
    pipe(ship.send(data(file="base/b0/x", off=3, end=6, body=b"def")), serve)
    pipe(serve.send(Ack(file="base/b0/x", size=6)), ship)
    assert ship.inflight_bytes == serve.inflight_bytes == 0


def test_can_send_with_the_exact_wire_size() -> None:
    limits = Limits(frame=64 << 10, inflight=(64 << 10) + 4)  # the smallest window: one largest frame
    ship, serve = connect(limits=limits)
    pipe(ship.send(Segment(seg=1, header=HEADER)), serve)
    n = limits.inflight
    for _ in range(5):  # the headers' size depends on the body's: converge on the exact length
        exact = Data(seg=1, off=64, end=100, raw=n, body=b"w" * n)
        n += limits.inflight - exact.wire_size()
    assert exact.wire_size() == limits.inflight and ship.can_send(exact.wire_size())
    assert exact.wire_size() - 4 == limits.frame  # also exactly the largest frame
    pipe(ship.send(exact), serve)
    assert ship.inflight_bytes == limits.inflight and not ship.can_send(1)


def test_acks_of_a_segment_or_seal_may_follow_the_senders_bye() -> None:
    ship, serve = opened()
    pipe(ship.send(data(off=64, end=164)), serve)
    pipe(serve.send(Ack(seg=1, size=164)), ship)
    pipe(ship.send(Seal(seg=1, size=164)), serve)
    pipe(ship.send(Segment(seg=2, header=HEADER)), serve)
    pipe(ship.send(Bye()), serve)
    # the receiver's sync after the seal and the new header acks them now
    assert pipe(serve.send(Ack(seg=1, size=164, last_seq=2)), ship) == [Ack(seg=1, size=164, last_seq=2)]
    pipe(serve.send(Ack(seg=2, size=64)), ship)
    with pytest.raises(ProtocolError, match="beyond the 64 bytes sent"):
        serve.send(Ack(seg=2, size=65))


def test_several_needs_for_one_frame_and_bye_waits_for_the_resend() -> None:
    ship, serve = opened()
    pipe(ship.send(data(off=64, end=164)), serve)
    pipe(serve.send(Need(seg=1, off=64, ids=(ID[1],))), ship)
    pipe(serve.send(Need(seg=1, off=64, ids=(ID[2],))), ship)  # more ids than one NEED holds
    assert ship.inflight_bytes == serve.inflight_bytes == 0
    for frame in (Bye(), Seal(seg=1, size=164), Segment(seg=1, header=HEADER, replace=True),
                  Prune(segments=(), bases=())):
        s2, v2 = opened()
        pipe(s2.send(data(off=64, end=164)), v2)
        pipe(v2.send(Need(seg=1, off=64, ids=(ID[1],))), s2)
        with pytest.raises(ProtocolError, match="still owes the resend at offset 64"):
            s2.send(frame)
        with pytest.raises(ProtocolError, match="still owes the resend at offset 64"):
            v2.receive_data(encode(frame))
    pipe(ship.send(data(off=64, end=164)), serve)
    assert ship.inflight_of(seg=1) == serve.inflight_of(seg=1) > 0


def test_need_takes_the_frame_and_all_after_it_out_of_flight() -> None:
    ship, serve = opened()
    frames = [data(off=64 + 100 * i, end=164 + 100 * i) for i in range(4)]
    pipe(ship.send(frames[0]), serve)
    pipe(ship.send(frames[1]), serve)
    b2, b3 = ship.send(frames[2]), ship.send(frames[3])  # still on the wire when the NEED is sent
    pipe(serve.send(Need(seg=1, off=164, ids=(ID[1],))), ship)
    one = len(encode(frames[0]))
    assert ship.inflight_bytes == serve.inflight_bytes == one  # only the frame before the refused one
    # the frames sent before the sender read the NEED arrive: stale, dropped, not counted
    assert pipe(b2 + b3, serve) == []
    assert serve.inflight_bytes == one
    # the sender must resend from the refused frame on
    with pytest.raises(ProtocolError, match="must come first"):
        ShipConnection.send(_copy_of(ship), frames[2])
    resent = [pipe(ship.send(f), serve) for f in frames[1:]]
    assert resent == [[f] for f in frames[1:]]
    pipe(serve.send(Ack(seg=1, size=464)), ship)
    assert ship.inflight_bytes == serve.inflight_bytes == 0


def _copy_of(conn: ShipConnection) -> ShipConnection:
    import copy
    return copy.deepcopy(conn)


def test_a_need_for_another_offset_while_a_resend_is_awaited() -> None:
    ship, serve = opened()
    pipe(ship.send(data(off=64, end=164)), serve)
    pipe(ship.send(data(off=164, end=264)), serve)
    pipe(serve.send(Need(seg=1, off=164, ids=(ID[1],))), ship)
    with pytest.raises(ProtocolError, match="while the resend at 164 is awaited"):
        serve.send(Need(seg=1, off=64, ids=(ID[1],)))
    with pytest.raises(ProtocolError, match="while the resend at 164 is awaited"):
        ship.receive_data(encode(Need(seg=1, off=64, ids=(ID[1],))))


def test_inflight_of_a_segment_gates_its_reopening() -> None:
    ship, serve = opened()
    pipe(ship.send(data(off=64, end=164)), serve)
    assert ship.inflight_of(seg=1) > 0 and ship.inflight_of(seg=2) == 0
    assert ship.inflight_of(file="audit.log") == 0
    pipe(serve.send(Ack(seg=1, size=164)), ship)
    assert ship.inflight_of(seg=1) == 0
    pipe(ship.send(Segment(seg=1, header=HEADER, replace=True)), serve)


# ---- the state table, exhaustively ---------------------------------------------------------------
#
# docs/protocol.md's table of who may send what in which state, checked for
# every frame type in every state from both ends. A frame the table allows
# may still break a bookkeeping rule (a HAVE with no offer), but then the
# error is not "out of order"; a frame the table forbids is refused as out
# of order (or "closed" once closed).

STATES = ["fresh", "hello", "open", "closing", "closed"]
SENDER_MAY = {"fresh": {"hello"}, "hello": set(), "closing": {"ping", "pong"}, "closed": set(),
              "open": {"segment", "offer", "data", "seal", "file", "base", "prune", "ping", "pong", "bye"}}
RECEIVER_MAY = {"fresh": set(), "hello": {"welcome"}, "open": {"have", "need", "ack", "ping", "pong"},
                "closing": {"ack", "ping", "pong", "bye"}, "closed": set()}
TABLE_FRAMES: dict[str, Frame] = {
    "hello": hello(), "welcome": Welcome(version=1, source="s", dedupe_key=KEY, position=Position(),
                                         limits=Limits()),
    "segment": Segment(seg=2, header=HEADER), "offer": Offer(req=1, ids=(ID[0],)), "data": data(),
    "seal": Seal(seg=1, size=64), "file": File(file="base/b/d", size=0, mode=0, mtime_us=0, kind="dir"),
    "base": Base(name="b"), "prune": Prune(segments=((1, 1, 64),), bases=()), "ping": Ping(n=2),
    "pong": Pong(n=1), "bye": Bye(), "have": Have(req=1, bits=b"\x01"),
    "need": Need(seg=1, off=64, ids=(ID[0],)), "ack": Ack(seg=1, size=64),
}


def in_state(state: str) -> tuple[ShipConnection, ServeConnection]:
    ship, serve = ShipConnection(), ServeConnection()
    if state == "fresh":
        return ship, serve
    serve.receive_data(ship.send(hello()))
    if state == "hello":
        return ship, serve
    ship.receive_data(serve.send(welcome(serve, Position(segments=(SegPos(1, 1, 64, False),)))))
    serve.receive_data(ship.send(Ping(n=1)))  # a ping outstanding each way, so that pong(1) is in order
    ship.receive_data(serve.send(Ping(n=1)))
    if state == "open":
        return ship, serve
    serve.receive_data(ship.send(Bye()))
    if state == "closing":
        return ship, serve
    ship.receive_data(serve.send(Bye()))
    return ship, serve


def _check(action: Callable[[], object], allowed: bool) -> None:
    try:
        action()
    except ProtocolError as e:
        refused = "out of order" in str(e) or "closed" in str(e)
        assert refused != allowed, str(e)
    else:
        assert allowed


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("t", sorted(TABLE_FRAMES))
def test_state_table(state: str, t: str) -> None:
    frame = TABLE_FRAMES[t]
    sender_frame = t in {"hello", "segment", "offer", "data", "seal", "file", "base", "prune", "bye"} or \
        t in ("ping", "pong")
    receiver_frame = t in {"welcome", "have", "need", "ack", "bye", "ping", "pong"}
    if sender_frame:
        ship, serve = in_state(state)
        _check(lambda: ship.send(frame), t in SENDER_MAY[state])
        ship, serve = in_state(state)
        _check(lambda: serve.receive_data(encode(frame)), t in SENDER_MAY[state])
    if receiver_frame:
        ship, serve = in_state(state)
        _check(lambda: serve.send(frame), t in RECEIVER_MAY[state])
        ship, serve = in_state(state)
        _check(lambda: ship.receive_data(encode(frame)), t in RECEIVER_MAY[state])
    if not sender_frame:  # a receiver's frame from the sender is always out of order, and vice versa
        ship, serve = in_state(state)
        _check(lambda: ship.send(frame), False)
        ship, serve = in_state(state)
        _check(lambda: serve.receive_data(encode(frame)), False)
    if not receiver_frame:
        ship, serve = in_state(state)
        _check(lambda: serve.send(frame), False)
        ship, serve = in_state(state)
        _check(lambda: ship.receive_data(encode(frame)), False)


@given(st.randoms(use_true_random=False), st.integers(10, 80))
def test_random_conversations_with_needs_seals_and_pings(rng: random.Random, steps: int) -> None:
    """A receiver that refuses frames (NEED) and acks what it applied, a
    sender that resends from a refused frame on before anything new of that
    segment, seals, pings both ways; every byte delivered in random pieces.
    The model: each segment's bytes are applied in order exactly once. Both
    ends agree all along and drain to nothing in flight."""
    limits = Limits(frame=64 << 10, inflight=192 << 10, offers=2, offer_ids=4)
    ship, serve = connect(limits=limits, position=Position(segments=(SegPos(1, 1, 64, False),)))
    wire_up: list[bytes] = []  # sender -> receiver, not yet delivered
    wire_down: list[bytes] = []
    sent: dict[int, list[Data]] = {1: []}  # sender: the frames of each segment, in offset order
    high = {1: 64}
    sealed: set[int] = set()
    resend: dict[int, list[Data]] = {}  # sender: per segment, frames to send again first
    applied = {1: 64}  # receiver: bytes applied per segment (in order, no hole, no overlap)
    acked = {1: 64}
    refused: dict[int, int] = {}  # receiver: seg -> offset it sent a NEED for, until the resend comes
    pings = [0, 0]
    req = 0

    def up() -> None:
        for f in pipe(b"".join(wire_up), serve, rng):
            if isinstance(f, Data):
                seg = f.seg
                assert seg is not None
                assert f.off == applied[seg], "the connection passed a frame out of sequence"
                refused.pop(seg, None)
                applied[seg] = f.end
            elif isinstance(f, Segment):
                applied[f.seg], acked[f.seg] = 64, 0
            elif isinstance(f, Ping):
                wire_down.append(serve.send(Pong(n=f.n)))
            elif isinstance(f, Offer):
                wire_down.append(serve.send(Have.of(f.req, [False] * len(f.ids))))
        wire_up.clear()

    def down() -> None:
        for f in pipe(b"".join(wire_down), ship, rng):
            if isinstance(f, Need):
                assert f.seg is not None
                resend[f.seg] = [d for d in sent[f.seg] if d.off >= f.off]
            elif isinstance(f, Ping):
                wire_up.append(ship.send(Pong(n=f.n)))
        wire_down.clear()

    def send_data() -> None:
        owing = [s for s in resend if resend[s]]
        if owing:
            seg = rng.choice(owing)
            f = resend[seg][0]
        else:
            open_segs = sorted(s for s in high if s not in sealed)
            if not open_segs:
                return
            seg = rng.choice(open_segs)
            n = rng.randint(1, 30_000)
            f = Data(seg=seg, off=high[seg], end=high[seg] + n, codec="lz4", raw=n,
                     body=rng.randbytes(rng.randint(0, 20_000)))
        if not ship.can_send(f.wire_size()):
            return
        wire_up.append(ship.send(f))
        if owing:
            resend[seg].pop(0)
        else:
            sent[seg].append(f)
            high[seg] = f.end

    for _ in range(steps):
        action = rng.choice(["data", "data", "data", "deliver", "deliver", "back", "ack", "need", "segment",
                             "seal", "ping", "offer"])
        if action == "data":
            send_data()
        elif action == "segment" and len(high) < 4:
            seg = max(high) + 1
            wire_up.append(ship.send(Segment(seg=seg, header=HEADER)))
            high[seg], sent[seg] = 64, []
        elif action == "seal":
            cands = [s for s in high if s not in sealed and ship.inflight_of(seg=s) == 0 and not resend.get(s)
                     and s not in refused]
            if cands:
                seg = rng.choice(cands)
                try:
                    wire_up.append(ship.send(Seal(seg=seg, size=high[seg])))
                except ProtocolError as e:  # a NEED the sender has read but not answered
                    assert "owes the resend" in str(e)
                    return
                sealed.add(seg)
        elif action == "deliver":
            up()
        elif action == "back":
            down()
        elif action == "ack":
            cands = [s for s in applied if applied[s] > acked[s]]
            if cands:
                seg = rng.choice(cands)
                wire_down.append(serve.send(Ack(seg=seg, size=applied[seg])))
                acked[seg] = applied[seg]
        elif action == "need":
            # refuse the last frame applied of a segment, if not acknowledged yet
            cands = [s for s in applied if s not in refused and applied[s] > acked[s]]
            if cands:
                seg = rng.choice(cands)
                last = next((d for d in reversed(sent[seg]) if d.end == applied[seg] and d.off >= acked[seg]),
                            None)
                if last is not None and serve.inflight_of(seg=seg):
                    try:
                        wire_down.append(serve.send(Need(seg=seg, off=last.off, ids=(ID[0],))))
                    except ProtocolError as e:  # that frame was already acked by a covering ack
                        assert "in flight" in str(e)
                        return
                    refused[seg] = last.off
                    applied[seg] = last.off
        elif action == "ping":
            if rng.random() < 0.5 and len(ship._our_pings) < 4:
                pings[0] += 1
                wire_up.append(ship.send(Ping(n=pings[0])))
            elif len(serve._our_pings) < 4:
                pings[1] += 1
                wire_down.append(serve.send(Ping(n=pings[1])))
        elif action == "offer" and ship.can_offer():
            req += 1
            wire_up.append(ship.send(Offer(req=req, ids=(ID[1],))))
        assert serve.inflight_bytes <= ship.inflight_bytes <= limits.inflight
        assert serve.outstanding_offers <= ship.outstanding_offers <= limits.offers
    # drain: deliver, ack, answer, resend until quiet
    for _ in range(100):
        up()
        for seg in applied:
            if applied[seg] > acked[seg]:
                wire_down.append(serve.send(Ack(seg=seg, size=applied[seg])))
                acked[seg] = applied[seg]
        down()
        while any(resend.values()) and ship.can_send(max(1, 0)):
            before = len(wire_up)
            send_data()
            if len(wire_up) == before:
                break
        if not wire_up and not wire_down and not any(resend.values()):
            break
    assert ship.inflight_bytes == serve.inflight_bytes == 0
    assert ship.outstanding_offers == serve.outstanding_offers == 0
    assert applied == high
    pipe(ship.send(Bye()), serve)
    assert serve.state is State.CLOSING



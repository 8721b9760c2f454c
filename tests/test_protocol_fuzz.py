"""Hostile bytes against the frame decoder and the receiver's connection:
random bytes, valid streams with bytes flipped, inserted and deleted,
wrong-typed values in every field, huge length prefixes, and msgpack built
to make an unpacker allocate (deep nesting, lying container counts, millions
of tiny objects). The only acceptable outcomes are valid frames or one
ProtocolError; the memory a frame costs stays in proportion to its size.
"""
from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, strategies as st

from cdpcore.errors import ProtocolError
from cdpcore.protocol import frames
from cdpcore.protocol.connection import ServeConnection
from cdpcore.protocol.frames import (
    FRAME_TYPES, MAX_OBJECTS, Frame, FrameDecoder, Hello, Limits, Position, Segment, Welcome, encode,
)
from conftest import scale
from protocol_util import STRATEGIES, any_frame


def feed_all(d: FrameDecoder, data: bytes, pieces: list[int]) -> list[Frame] | ProtocolError:
    """Feed `data` in pieces; return the frames or the ProtocolError. Any
    other exception fails the test (it propagates)."""
    out: list[Frame] = []
    i = 0
    try:
        for n in [*pieces, len(data)]:
            out += d.feed(data[i:i + max(n, 1)])
            i += max(n, 1)
            assert d.buffered <= d.max_frame + 4
            if i >= len(data):
                break
        if i < len(data):
            out += d.feed(data[i:])
    except ProtocolError as e:
        assert str(e) and "\n" not in str(e)
        assert e.code in ("protocol", "limit")
        return e
    return out


@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=10))
def test_random_bytes(data: bytes, pieces: list[int]) -> None:
    feed_all(FrameDecoder(), data, pieces)


@given(st.binary(min_size=1, max_size=300))
def test_random_payload_behind_a_correct_length_prefix(payload: bytes) -> None:
    r = feed_all(FrameDecoder(), struct.pack("<I", len(payload)) + payload, [])
    if not isinstance(r, ProtocolError):  # then it was a valid frame after all
        assert len(r) == 1


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[list[Frame], bytes]:
    frames = draw(st.lists(any_frame, min_size=1, max_size=4))
    stream = bytearray(b"".join(encode(f) for f in frames))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(0, len(stream) - 1))
        if op == "flip":
            stream[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            stream[i] = draw(st.integers(0, 255))
        elif op == "insert":
            stream[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif len(stream) > 1:
            del stream[i:i + draw(st.integers(1, 4))]
    return frames, bytes(stream)


@given(mutated_streams(), st.lists(st.integers(1, 64), max_size=8))
def test_mutated_valid_streams(case: tuple[list[Frame], bytes], pieces: list[int]) -> None:
    frames, stream = case
    r = feed_all(FrameDecoder(), stream, pieces)
    if not isinstance(r, ProtocolError):
        # whatever decoded is made of valid frames (encoding them again works)
        for f in r:
            assert type(f) in FRAME_TYPES.values()
            encode(f)


# Any msgpack value, nested a little: what a confused or hostile peer puts in a field.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=10) | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10)


@pytest.mark.parametrize("t", sorted(STRATEGIES))
@given(data=st.data())
def test_any_value_in_any_field(t: str, data: st.DataObject) -> None:
    frame = data.draw(STRATEGIES[t])
    m: dict[str, Any] = msgpack.unpackb(encode(frame)[4:], raw=False, unicode_errors="surrogateescape")
    keys = sorted(m)
    key = data.draw(st.sampled_from(keys + ["extra"]))
    m[key] = data.draw(values)
    payload = msgpack.packb(m, use_bin_type=True, unicode_errors="surrogateescape")
    r = feed_all(FrameDecoder(), struct.pack("<I", len(payload)) + payload, [])
    if not isinstance(r, ProtocolError):
        [f] = r
        assert key == "extra" or type(f).T == m["t"]


@given(st.integers(0, 2**32 - 1))
def test_any_length_prefix(length: int) -> None:
    d = FrameDecoder(1 << 20)
    r = feed_all(d, struct.pack("<I", length) + b"\x80", [])
    if length == 0 or length > 1 << 20:
        assert isinstance(r, ProtocolError)
    else:
        assert r == [] or isinstance(r, ProtocolError)
    assert d.buffered <= 5


# ---- allocation bombs ----------------------------------------------------------------------------


def frame_of(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def peak_memory(fn: Any) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def refused(b: bytes, code: str, match: str, max_frame: int = 64 << 20) -> int:
    """Feed a bomb, expect a ProtocolError; return the peak memory it cost."""
    d = FrameDecoder(max_frame)

    def go() -> None:
        with pytest.raises(ProtocolError, match=match) as e:
            d.feed(b)
        assert e.value.code == code
    return peak_memory(go)


def test_deep_nesting() -> None:
    depth = scale(2000, 200_000)
    payload = b"\x81\xa1x" + b"\x91" * depth + b"\xc0"
    assert refused(frame_of(payload), "limit", "nested deeper") < 4 * len(payload) + (1 << 20)


def test_lying_container_counts() -> None:
    # Each level declares 2**32-1 (array 32) or 65535 entries; C msgpack would
    # preallocate a list of that size per level before noticing the lie.
    for head in (b"\xdd\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xde\xff\xff"):
        payload = b"\x81\xa1x" + head * 6 + b"\xc0"
        assert refused(frame_of(payload), "protocol", "declares") < 1 << 20


def test_nested_lying_counts_within_the_bytes() -> None:
    # Nested arrays whose declared counts fit the remaining bytes at each
    # level are legal msgpack shapes; depth and the object budget bound them.
    payload = b"\x81\xa1x" + b"\xdc\x00\x10" * 8 + b"\x90" * 2000
    r = feed_all(FrameDecoder(), frame_of(payload), [])
    assert isinstance(r, ProtocolError)


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> int:
    """The object budget: the real one in the thorough profile, a smaller one
    by default (tracemalloc makes each traced allocation slow)."""
    n = scale(20_000, MAX_OBJECTS)
    monkeypatch.setattr(frames, "MAX_OBJECTS", n)
    return n


def test_millions_of_tiny_objects(budget: int) -> None:
    n = budget + 10
    # {"t": "bye", "x": [[], [], ...]}: one byte per empty list, 56+ bytes each once built.
    payload = b"\x82\xa1t\xa3bye\xa1x\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    peak = refused(frame_of(payload), "limit", "msgpack objects")
    assert peak < 2 * len(payload) + (1 << 20), peak


def test_a_frame_just_under_the_object_budget_costs_memory_in_proportion(budget: int) -> None:
    n = budget // 2
    payload = b"\x82\xa1t\xa3bye\xa1x\xdd" + n.to_bytes(4, "big") + b"\xcd\x01\x00" * n  # uint16 256
    d = FrameDecoder()
    got: list[Frame] = []
    peak = peak_memory(lambda: got.extend(d.feed(frame_of(payload))))
    assert [type(f).T for f in got] == ["bye"]
    assert peak < 64 * n + (1 << 20), peak


def test_large_bins_and_strings_are_bounded_by_the_frame() -> None:
    # a bin that claims 4 GiB inside a 20-byte frame
    payload = b"\x82\xa1t\xa3bye\xa1x\xc6\xff\xff\xff\xff"
    assert refused(frame_of(payload), "protocol", "ends inside an object") < 1 << 20


def test_ext_types_and_timestamps_are_refused() -> None:
    payload = msgpack.packb({"t": "bye", "x": msgpack.ExtType(1, b"abc")})
    refused(frame_of(payload), "protocol", "not allowed")
    payload = msgpack.packb({"t": "bye", "x": msgpack.Timestamp(1, 0)})
    refused(frame_of(payload), "protocol", "not allowed")


def test_floats_in_unknown_fields_are_ignored_but_not_in_known_ones() -> None:
    assert FrameDecoder().feed(frame_of(msgpack.packb({"t": "ping", "n": 1, "x": 1.5}))) != []
    with pytest.raises(ProtocolError, match="'n'"):
        FrameDecoder().feed(frame_of(msgpack.packb({"t": "ping", "n": 1.0})))


# ---- through the receiver's connection -----------------------------------------------------------


def open_receiver() -> ServeConnection:
    serve = ServeConnection()
    serve.receive_data(encode(Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=False, domain=None, agent="a")))
    serve.send(Welcome(version=1, source="s", dedupe_key=b"k" * 32, position=Position(),
                       limits=Limits(frame=64 << 10, inflight=128 << 10)))
    return serve


@given(mutated_streams())
def test_receiver_connection_survives_mutated_streams(case: tuple[list[Frame], bytes]) -> None:
    _, stream = case
    serve = open_receiver()
    serve.receive_data(encode(Segment(seg=1, header=b"h" * 64)))
    try:
        serve.receive_data(stream)
    except ProtocolError as e:
        assert "\n" not in str(e)
        assert serve.state.value == "closed"


@given(mutated_streams(), st.lists(st.integers(1, 64), max_size=6))
def test_sender_connection_survives_mutated_streams(case: tuple[list[Frame], bytes], pieces: list[int]) -> None:
    """The same against the sender's end (a broken or hostile receiver)."""
    from cdpcore.protocol.connection import ShipConnection
    _, stream = case
    ship = ShipConnection()
    ship.send(Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=False, domain=None, agent="a"))
    ship.receive_data(encode(Welcome(version=1, source="s", dedupe_key=b"k" * 32, position=Position(),
                                     limits=Limits())))
    ship.send(Segment(seg=1, header=b"h" * 64))
    i = 0
    try:
        for n in [*pieces, len(stream)]:
            ship.receive_data(stream[i:i + n])
            i += n
    except ProtocolError as e:
        assert "\n" not in str(e) and e.code in ("protocol", "limit", "version")
        assert ship.state.value == "closed"


@given(st.lists(st.binary(min_size=30, max_size=34), min_size=16, max_size=40), st.data())
def test_the_ids_fast_path_agrees_with_the_walk(items: list[bytes], data: st.DataObject) -> None:
    """Arrays of 32-byte bins are pre-scanned by strided compares; arrays
    that only nearly look like that (other lengths, a str among them, cut
    short) must be walked and judged exactly as before."""
    m: dict[str, Any] = {"t": "offer", "req": 1, "ids": items}
    payload = bytearray(msgpack.packb(m, use_bin_type=True))
    if data.draw(st.booleans()) and len(payload) > 10:
        del payload[data.draw(st.integers(10, len(payload) - 1)):]
    r = feed_all(FrameDecoder(), frame_of(bytes(payload)), [])
    valid = all(len(x) == 32 for x in items) and len(payload) == len(msgpack.packb(m, use_bin_type=True))
    assert (not isinstance(r, ProtocolError)) == valid

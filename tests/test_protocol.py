"""Replication frames (cdpcore.protocol.frames): round trips of every frame
type, the incremental decoder under every split and truncation, and the
validation of every field (presence, type, range, paths, limits).

The decoder's robustness against hostile bytes is in test_protocol_fuzz.py,
the connection state machines in test_protocol_connection.py.
"""
from __future__ import annotations

import os
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, strategies as st

from cdpcore.errors import ProtocolError
from cdpcore.protocol import frames as F
from cdpcore.protocol.frames import (
    Ack, Base, Bye, Data, Error, File, FrameDecoder, Have, Hello, Limits, Need, Offer, Ping, Pong, Position,
    Prune, Seal, Segment, Welcome, decode_payload, encode,
)
from protocol_util import STRATEGIES, any_frame


def raw_frame(m: dict[str, Any]) -> bytes:
    """A frame built by hand from a map (bypassing the dataclasses' checks)."""
    payload = msgpack.packb(m, use_bin_type=True, unicode_errors="surrogateescape")
    return struct.pack("<I", len(payload)) + payload


def decode_one(b: bytes, max_frame: int = F.MAX_FRAME) -> F.Frame:
    d = FrameDecoder(max_frame)
    got = d.feed(b)
    assert len(got) == 1 and d.buffered == 0
    return got[0]


def wire(frame: F.Frame) -> dict[str, Any]:
    return msgpack.unpackb(encode(frame)[4:], raw=False, unicode_errors="surrogateescape")


# One valid example of each frame type, used as the base of mutations.
EXAMPLES: dict[str, F.Frame] = {
    "hello": Hello(versions=(1, 2), uuid=b"u" * 16, encrypted=False, domain="pacs", agent="cdpcore 0.1"),
    "welcome": Welcome(version=1, source="ward-3", dedupe_key=b"k" * 32,
                       position=Position(segments=((1, 7, 4096, True), (2, 8, 100, False)),
                                         files={"journal.json": 300, "base/b0/etc/x": 5}, bases=("b0",)),
                       limits=Limits()),
    "error": Error(code="storage", message="disk full"),
    "segment": Segment(seg=3, header=b"h" * 64, replace=True),
    "offer": Offer(req=9, ids=(b"a" * 32, b"b" * 32)),
    "have": Have(req=9, bits=b"\x01"),
    "data": Data(seg=3, off=64, end=4096, first_seq=10, last_seq=20, last_ts=-1, codec="zstd", level=3,
                 reset=True, raw=5000, body=b"zzz"),
    "need": Need(file="audit.log", off=0, ids=(b"c" * 32,)),
    "seal": Seal(seg=3, size=4096),
    "file": File(file="base/b0/a/b", size=5, mode=0o644, mtime_us=-5, kind="file"),
    "base": Base(name="b0"),
    "prune": Prune(segments=((4, 1, 64),), bases=("b0",)),
    "ack": Ack(seg=3, size=4096, last_seq=20),
    "ping": Ping(n=1),
    "pong": Pong(n=1),
    "bye": Bye(),
}


def test_every_frame_type_has_an_example_and_a_strategy() -> None:
    assert set(EXAMPLES) == set(F.FRAME_TYPES) == set(STRATEGIES)


@pytest.mark.parametrize("t", sorted(EXAMPLES))
def test_example_round_trips_and_names_its_type(t: str) -> None:
    frame = EXAMPLES[t]
    b = encode(frame)
    assert struct.unpack_from("<I", b)[0] == len(b) - 4
    assert wire(frame)["t"] == t
    assert decode_one(b) == frame


@pytest.mark.parametrize("t", sorted(STRATEGIES))
@given(data=st.data())
def test_round_trip_of_every_frame_type(t: str, data: st.DataObject) -> None:
    frame = data.draw(STRATEGIES[t])
    assert decode_one(encode(frame)) == frame


@given(st.lists(any_frame, max_size=8), st.data())
def test_any_split_gives_the_same_frames(frames: list[F.Frame], data: st.DataObject) -> None:
    stream = b"".join(encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    d = FrameDecoder()
    got: list[F.Frame] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        got += d.feed(stream[prev:c])
        assert d.buffered <= d.max_frame + 4
        prev = c
    assert got == frames and d.buffered == 0


def test_every_byte_truncation_of_a_stream_yields_exactly_the_whole_frames() -> None:
    frames = [EXAMPLES[t] for t in sorted(EXAMPLES)]
    encoded = [encode(f) for f in frames]
    stream = b"".join(encoded)
    ends = []
    total = 0
    for e in encoded:
        total += len(e)
        ends.append(total)
    for cut in range(len(stream) + 1):
        d = FrameDecoder()
        got = d.feed(stream[:cut])
        whole = sum(1 for e in ends if e <= cut)
        assert got == frames[:whole]
        assert d.buffered == cut - (ends[whole - 1] if whole else 0)
        # and the rest completes the stream
        assert d.feed(stream[cut:]) == frames[whole:]


def test_one_byte_feeds_of_a_large_data_frame() -> None:
    body = os.urandom(200_000)
    frame = Data(file="journal.json", off=0, end=len(body), raw=len(body), body=body)
    b = encode(frame)
    d = FrameDecoder()
    got = []
    for i in range(len(b)):
        got += d.feed(b[i:i + 1])
        assert d.buffered <= len(b)
    assert got == [frame]


def test_decoder_accepts_bytearray_and_memoryview() -> None:
    b = encode(EXAMPLES["data"]) + encode(EXAMPLES["bye"])
    assert FrameDecoder().feed(bytearray(b)) == [EXAMPLES["data"], EXAMPLES["bye"]]
    assert FrameDecoder().feed(memoryview(b)) == [EXAMPLES["data"], EXAMPLES["bye"]]


# ---- the length prefix ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [F.DEFAULT_FRAME + 1, 2**31, 2**32 - 1])
def test_huge_length_prefix_is_refused_after_four_bytes(length: int) -> None:
    d = FrameDecoder()
    assert d.feed(struct.pack("<I", length)[:3]) == []
    with pytest.raises(ProtocolError, match="length prefix") as e:
        d.feed(struct.pack("<I", length)[3:])
    assert e.value.code == "limit" and e.value.exit_code == 20
    assert d.buffered == 0


def test_length_prefix_zero_is_refused() -> None:
    with pytest.raises(ProtocolError, match="length prefix 0"):
        FrameDecoder().feed(b"\0\0\0\0")


def test_frame_exactly_at_the_cap_passes_and_one_over_fails() -> None:
    frame = Data(file="audit.log", off=0, end=0, raw=0, body=b"")
    b = encode(frame)
    n = len(b) - 4
    assert decode_one(b, max_frame=n) == frame
    with pytest.raises(ProtocolError) as e:
        FrameDecoder(n - 1).feed(b)
    assert e.value.code == "limit"


def test_encode_refuses_a_frame_over_the_limit() -> None:
    frame = Data(file="audit.log", off=0, end=10, raw=100_000, body=b"x" * 100_000)
    with pytest.raises(ProtocolError, match="more than the frame limit") as e:
        encode(frame, max_frame=65536)
    assert e.value.code == "limit"


def test_a_spent_decoder_keeps_failing() -> None:
    d = FrameDecoder()
    with pytest.raises(ProtocolError):
        d.feed(raw_frame({"t": "nope"}))
    with pytest.raises(ProtocolError, match="unknown frame type"):
        d.feed(encode(Bye()))


# ---- map level ---------------------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    m = wire(EXAMPLES["seal"])
    m["future"] = {"nested": [1, 2.5, None]}
    assert decode_one(raw_frame(m)) == EXAMPLES["seal"]


@pytest.mark.parametrize("m,match", [
    ({"t": "launch"}, "unknown frame type"),
    ({"seg": 1}, "field 't'"),
    ({"t": 7}, "field 't'"),
    ({"t": b"bye"}, "field 't'"),
])
def test_bad_frame_type(m: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as e:
        decode_one(raw_frame(m))
    assert e.value.code == "protocol"


@pytest.mark.parametrize("payload,match", [
    (b"\x93\x01\x02\x03", "not a msgpack map"),  # an array, not a map
    (b"\x81\xa1t\xa3bye\xc0", "after the msgpack map"),  # trailing byte
    (b"\x82\xa1t\xa3bye\xa1t\xa3bye", "repeats a key"),
    (b"\x82\xa1t\xa3bye\x01\x02", "int is not allowed for map key"),
    (b"\x82\xa1t\xa3bye\xc4\x01k\x02", "key is bytes"),
    (b"\x81\xa1t\xd4\x01\x00", "0xd4 is not allowed"),  # fixext 1
    (b"\x81\xa1t\xc7\x00\x05", "0xc7 is not allowed"),  # ext 8
    (b"\x81\xa1t\xc1", "0xc1 is not allowed"),
    (b"\x81\xa1t\xa5by", "ends inside an object"),
    (b"\x81\xa1t\xc5\x00", "ends inside a length"),
])
def test_malformed_msgpack(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_one(struct.pack("<I", len(payload)) + payload)


# ---- every field -------------------------------------------------------------------------------

WRONG = [None, True, 0, -1, 2**63, 2**64 - 1, -(2**63) - 0, "x", b"x", [], {}, 1.5, b"\0" * 32, [1, 2]]


@pytest.mark.parametrize("t", sorted(EXAMPLES))
def test_every_field_missing_or_mistyped_is_a_protocol_error(t: str) -> None:
    base = wire(EXAMPLES[t])
    for key in [k for k in base if k != "t"]:
        m = dict(base)
        del m[key]
        try:
            got = decode_one(raw_frame(m))
        except ProtocolError as e:
            assert key in str(e) or t in str(e), str(e)
        else:  # only a nullable field may be absent, and then it reads as nil
            assert getattr(got, key) in (None, ()), (t, key)
        for bad in WRONG:
            m = dict(base)
            m[key] = bad
            try:
                got = decode_one(raw_frame(m))
            except ProtocolError as e:
                assert e.code in ("protocol", "limit")
                assert "\n" not in str(e)
            else:  # the value was valid for the field after all: it must be carried as is
                v = getattr(got, key)
                assert v == bad or (isinstance(bad, list) and tuple(bad) == tuple(v)), (t, key, bad)


@pytest.mark.parametrize("make,match", [
    (lambda: Data(seg=1, file="audit.log", off=0, end=0, raw=0, body=b""), "exactly one of"),
    (lambda: Data(off=0, end=0, raw=0, body=b""), "exactly one of"),
    (lambda: Data(seg=1, off=10, end=9, raw=0, body=b""), "'end'"),
    (lambda: Data(seg=1, off=0, end=9, raw=1, body=b""), "uncompressed body"),
    (lambda: Data(seg=1, off=0, end=9, raw=0, body=b"", codec="brotli"), "'codec'"),
    (lambda: Data(seg=1, off=0, end=9, raw=0, body=b"", first_seq=5, last_seq=4, last_ts=0), "'last_seq'"),
    (lambda: Data(seg=1, off=0, end=9, raw=0, body=b"", first_seq=5, last_seq=6), "together"),
    (lambda: Data(file="audit.log", off=0, end=9, raw=0, body=b"", first_seq=5, last_seq=6, last_ts=0),
     "file data"),
    (lambda: Data(seg=1, off=0, end=9, raw=(256 << 20) + 1, body=b"", codec="zstd"), "'raw'"),
    (lambda: Data(seg=2**63, off=0, end=9, raw=0, body=b""), "'seg'"),
    (lambda: Hello(versions=(2, 1), uuid=b"u" * 16, encrypted=False, domain=None, agent=""), "not a range"),
    (lambda: Hello(versions=(0, 1), uuid=b"u" * 16, encrypted=False, domain=None, agent=""), "versions"),
    (lambda: Hello(versions=(1,), uuid=b"u" * 16, encrypted=False, domain=None, agent=""), "versions"),
    (lambda: Hello(versions=(1, 1), uuid=b"u" * 15, encrypted=False, domain=None, agent=""), "16 bytes"),
    (lambda: Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=1, domain=None, agent=""), "boolean"),
    (lambda: Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=False, domain="..", agent=""), "'domain'"),
    (lambda: Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=False, domain="a/b", agent=""), "'domain'"),
    (lambda: Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=False, domain=None, agent="a\nb"), "control"),
    (lambda: Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=False, domain=None, agent="\udcff"), "control"),
    (lambda: Hello(versions=(1, 1), uuid=b"u" * 16, encrypted=False, domain=None, agent="a" * 257), "more than"),
    (lambda: Welcome(version=1, source="x" * 65, dedupe_key=None, position=Position(), limits=Limits()),
     "'source'"),
    (lambda: Welcome(version=1, source="s", dedupe_key=b"k" * 31, position=Position(), limits=Limits()),
     "32 bytes"),
    (lambda: Limits(frame=1000), "limits.frame"),
    (lambda: Limits(frame=(64 << 20) + 1), "limits.frame"),
    (lambda: Limits(inflight=(8 << 20) + 3), "limits.inflight"),
    (lambda: Limits(offers=0), "limits.offers"),
    (lambda: Limits(offer_ids=65537), "limits.offer_ids"),
    (lambda: Limits(window_log=32), "limits.window_log"),
    (lambda: Position(segments=((1, 2, 3),)), "position.segments"),
    (lambda: Position(segments=((1, 2**32, 3, False),)), "header_crc"),
    (lambda: Position(segments=((1, 2, 3, False), (1, 2, 3, False))), "listed twice"),
    (lambda: Position(files={"segments/1.seg": 3}), "position.files"),
    (lambda: Position(files={"journal.json": -1}), "position.files"),
    (lambda: Position(bases=("a/b",)), "single path component"),
    (lambda: Error(code="Nope!", message=""), "'code'"),
    (lambda: Error(code="auth", message="x" * 1025), "more than"),
    (lambda: Segment(seg=1, header=b"h" * 63), "64 bytes"),
    (lambda: Offer(req=1, ids=()), "fewer than"),
    (lambda: Offer(req=1, ids=(b"x" * 31,)), "32-byte"),
    (lambda: Offer(req=1, ids=(b"x" * 32,) * 65537), "more than"),
    (lambda: Have(req=1, bits=b"\0" * 8193), "more than"),
    (lambda: Need(seg=1, off=0, ids=()), "fewer than"),
    (lambda: File(file="journal.json", size=0, mode=0, mtime_us=0, kind="file"), "base/NAME/PATH"),
    (lambda: File(file="base/b", size=0, mode=0, mtime_us=0, kind="file"), "base/NAME/PATH"),
    (lambda: File(file="base/b", size=0, mode=0, mtime_us=0, kind="symlink", target="x"), "base/NAME/PATH"),
    (lambda: File(file="base", size=0, mode=0, mtime_us=0, kind="dir"), "base/NAME/PATH"),
    (lambda: File(file="base/..", size=0, mode=0, mtime_us=0, kind="dir"), "normalised"),
    (lambda: File(file="base/b/x", size=0, mode=0o10000, mtime_us=0, kind="file"), "'mode'"),
    (lambda: File(file="base/b/x", size=0, mode=0, mtime_us=0, kind="fifo"), "'kind'"),
    (lambda: File(file="base/b/x", size=0, mode=0, mtime_us=0, kind="symlink"), "'target'"),
    (lambda: File(file="base/b/x", size=0, mode=0, mtime_us=0, kind="symlink", target=""), "'target'"),
    (lambda: File(file="base/b/x", size=0, mode=0, mtime_us=0, kind="file", target="y"), "only a symlink"),
    (lambda: File(file="base/b/x", size=3, mode=0, mtime_us=0, kind="dir"), "size 0"),
    (lambda: File(file="base/b/x", size=0, mode=0, mtime_us=0, kind="symlink", target="a\0b"), "NUL"),
    (lambda: Base(name=".."), "normalised"),
    (lambda: Base(name=""), "normalised"),
    (lambda: Prune(segments=((1, 2, 3), (1, 2, 3)), bases=()), "listed twice"),
    (lambda: Prune(segments=(), bases=("a", "a")), "listed twice"),
    (lambda: Ack(file="audit.log", size=3, last_seq=1), "carries no seq"),
    (lambda: Ack(size=3), "exactly one of"),
    (lambda: Ping(n=-1), "'n'"),
])
def test_invalid_values_are_refused_by_name(make: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", [
    "/etc/passwd", "../x", "base/../../x", "base/b/../../x", "base/b/./x", "base/b//x", "base//x", "base/b/",
    "base/b/x/", "base/b/\0", "segments/0000000000000001.seg", "head", "base/b", "base", "",
    "journal.json/x", "./journal.json", "base/b/" + "x" * 256, "base/b/" + "/".join(["x" * 200] * 21),
])
def test_unsafe_or_foreign_file_paths_are_refused(path: str) -> None:
    with pytest.raises(ProtocolError):
        Data(file=path, off=0, end=0, raw=0, body=b"")
    with pytest.raises(ProtocolError):  # and from the wire, bypassing the dataclass constructor
        decode_one(raw_frame({"t": "ack", "file": path, "size": 0}))


def test_a_path_that_cannot_be_encoded_is_refused_before_sending() -> None:
    with pytest.raises(ProtocolError, match="unencodable"):
        Ack(file="base/b/\ud800", size=0)


def test_non_utf8_paths_survive_byte_for_byte() -> None:
    raw_name = b"\xff\xfe caf\xc3\xa9 \xed\xb2\x80"  # invalid UTF-8, an encoded surrogate, valid UTF-8
    path = "base/b/" + os.fsdecode(raw_name)
    got = decode_one(encode(Ack(file=path, size=1)))
    assert os.fsencode(got.file) == b"base/b/" + raw_name


def test_have_bits_helpers() -> None:
    h = Have.of(1, [True, False, False, True, False, False, False, False, True])
    assert h.bits == b"\x09\x01"
    assert [h.held(i) for i in range(9)] == [True, False, False, True, False, False, False, False, True]


def test_error_about_an_exception_is_one_sane_line() -> None:
    e = Error.about(ProtocolError("bad\nthing\x00", code="limit"))
    assert e.code == "limit" and e.message == "bad?thing?"
    e = Error.about(OSError("x" * 5000))
    assert e.code == "internal" and len(e.message) == F.MAX_MESSAGE
    assert Error.about(OSError(28, "No space"), code="storage").code == "storage"
    assert decode_one(encode(e)) == e


def test_error_frame_accepts_future_codes() -> None:
    assert decode_one(raw_frame({"t": "error", "code": "quota_2", "message": "m"})) == \
        Error(code="quota_2", message="m")


def test_frames_are_immutable_and_normalise_sequences() -> None:
    o = Offer(req=1, ids=[b"a" * 32])
    assert o.ids == (b"a" * 32,)
    with pytest.raises(AttributeError):
        o.req = 2  # type: ignore[misc]
    d = Data(seg=1, off=0, end=1, raw=1, body=bytearray(b"x"))
    assert type(d.body) is bytes


def test_encode_refuses_non_frames() -> None:
    with pytest.raises(TypeError):
        encode(Limits())  # type: ignore[arg-type]


def test_the_protocol_package_does_no_io() -> None:
    """Sans-IO: no trio, sockets, files or processes in protocol/ (docs/protocol.md)."""
    import ast
    from pathlib import Path

    import cdpcore.protocol
    forbidden = {"trio", "socket", "asyncio", "ssl", "select", "os", "io", "subprocess", "threading", "shutil"}
    for path in Path(cdpcore.protocol.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                raise AssertionError(f"{path.name} opens a file")


@given(STRATEGIES["data"], st.sampled_from([0, 1, 255, 256, 65535, 65536, 70000]))
def test_data_wire_size_is_the_encoded_size(frame: Data, body_len: int) -> None:
    import dataclasses
    f = dataclasses.replace(frame, body=b"b" * body_len, raw=body_len)
    assert f.wire_size() == len(encode(f))


def test_the_base_directory_itself_is_a_dir_entry() -> None:
    f = File(file="base/b0", size=0, mode=0o755, mtime_us=7, kind="dir")
    assert decode_one(encode(f)) == f

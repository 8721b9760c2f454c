"""Hypothesis strategies for every replication frame (tests of protocol/).

Values reach the edges of each field's range (0, 2**63 - 1, negative
timestamps, paths that are not UTF-8, empty bodies) because that is where a
codec gets a type or a bound wrong.
"""
from __future__ import annotations

import os

from hypothesis import strategies as st

from cdpcore.protocol.frames import (
    MAX_OFFER_IDS, Ack, Base, Bye, Data, Error, File, Have, Hello, Limits, Need, Offer, Ping, Pong,
    Position, Prune, PruneSeg, Seal, Segment, SegPos, Welcome,
)

U63 = 2**63 - 1
u63 = st.one_of(st.integers(0, 1000), st.integers(0, U63), st.sampled_from([0, 1, 255, 256, 65535, 2**32, U63]))
i64 = st.one_of(st.integers(-(2**63), U63), st.sampled_from([-(2**63), -1, 0, U63]))
u32 = st.integers(0, 2**32 - 1)
ids = st.binary(min_size=32, max_size=32)
# Text fields: anything printable, including non-ASCII.
sane_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40)
names = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True).filter(lambda s: s not in (".", ".."))

# A path component as os.fsdecode gives it from arbitrary bytes (so the
# surrogateescape round trip is exercised), never "/", NUL, "." or "..".
_component_bytes = st.binary(min_size=1, max_size=20).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
component = _component_bytes.map(os.fsdecode)
base_paths = st.builds(lambda n, parts: "/".join(["base", n, *parts]), component,
                       st.lists(component, min_size=1, max_size=4))
file_paths = st.one_of(st.sampled_from(["journal.json", "audit.log"]), base_paths)


@st.composite
def limits(draw: st.DrawFn) -> Limits:
    frame = draw(st.integers(64 << 10, 64 << 20))
    return Limits(frame=frame, body=draw(st.integers(64 << 10, 256 << 20)),
                  window_log=draw(st.integers(10, 31)), inflight=draw(st.integers(frame + 4, U63)),
                  offers=draw(st.integers(1, 64)), offer_ids=draw(st.integers(1, MAX_OFFER_IDS)))


@st.composite
def positions(draw: st.DrawFn) -> Position:
    segs = draw(st.lists(st.tuples(u63, u32, u63, st.booleans()), max_size=5, unique_by=lambda s: s[0]))
    files = draw(st.dictionaries(file_paths, u63, max_size=4))
    bases = draw(st.lists(component, max_size=3))
    return Position(segments=tuple(SegPos(*s) for s in segs), files=files, bases=tuple(bases))


hello = st.builds(lambda lo, span, uuid, enc, dom, agent: Hello(
    versions=(lo, lo + span), uuid=uuid, encrypted=enc, domain=dom, agent=agent),
    st.integers(1, 100), st.integers(0, 5), st.binary(min_size=16, max_size=16), st.booleans(),
    st.none() | names, sane_text)
welcome = st.builds(lambda v, s, k, p, l: Welcome(version=v, source=s, dedupe_key=k, position=p, limits=l),
                    st.integers(1, 100), names, st.none() | ids, positions(), limits())
error = st.builds(lambda c, m: Error(code=c, message=m),
                  st.sampled_from(["version", "auth", "uuid", "protocol", "limit", "storage", "internal"]),
                  sane_text)
segment = st.builds(lambda s, h, r: Segment(seg=s, header=h, replace=r), u63,
                    st.binary(min_size=64, max_size=64), st.booleans())
offer = st.builds(lambda r, i: Offer(req=r, ids=tuple(i)), u63, st.lists(ids, min_size=1, max_size=20))
have = st.builds(lambda r, b: Have(req=r, bits=b), u63, st.binary(max_size=20))


@st.composite
def data(draw: st.DrawFn) -> Data:
    off = draw(u63)
    end = draw(st.integers(off, U63))
    body = draw(st.binary(max_size=300))
    codec = draw(st.sampled_from(["zstd", "lz4", "none"]))
    raw = len(body) if codec == "none" else draw(st.integers(0, 256 << 20))
    common = dict(off=off, end=end, codec=codec, level=draw(st.integers(-(2**31), 2**31 - 1)),
                  reset=draw(st.booleans()), raw=raw, body=body)
    if draw(st.booleans()):
        return Data(file=draw(file_paths), **common)
    if draw(st.booleans()):
        first = draw(u63)
        return Data(seg=draw(u63), first_seq=first, last_seq=draw(st.integers(first, U63)),
                    last_ts=draw(i64), **common)
    return Data(seg=draw(u63), **common)


@st.composite
def need(draw: st.DrawFn) -> Need:
    i = tuple(draw(st.lists(ids, min_size=1, max_size=5)))
    if draw(st.booleans()):
        return Need(seg=draw(u63), off=draw(u63), ids=i)
    return Need(file=draw(file_paths), off=draw(u63), ids=i)


seal = st.builds(lambda s, z: Seal(seg=s, size=z), u63, u63)


@st.composite
def file(draw: st.DrawFn) -> File:
    kind = draw(st.sampled_from(["file", "dir", "symlink"]))
    path = draw(base_paths | component.map(lambda n: "base/" + n)) if kind == "dir" else draw(base_paths)
    return File(file=path, size=draw(u63) if kind == "file" else 0,
                mode=draw(st.integers(0, 0o7777)), mtime_us=draw(i64), kind=kind,
                target=draw(base_paths | st.just("/etc/hosts")) if kind == "symlink" else None)


base = st.builds(lambda n: Base(name=n), component)
prune = st.builds(lambda s, b: Prune(segments=tuple(PruneSeg(*x) for x in s), bases=tuple(b)),
                  st.lists(st.tuples(u63, u32, u63), max_size=5, unique_by=lambda s: s[0]),
                  st.lists(component, max_size=3, unique=True))


@st.composite
def ack(draw: st.DrawFn) -> Ack:
    if draw(st.booleans()):
        return Ack(seg=draw(u63), size=draw(u63), last_seq=draw(st.none() | u63))
    return Ack(file=draw(file_paths), size=draw(u63))


ping = st.builds(lambda n: Ping(n=n), u63)
pong = st.builds(lambda n: Pong(n=n), u63)
bye = st.just(Bye())

STRATEGIES = {
    "hello": hello, "welcome": welcome, "error": error, "segment": segment, "offer": offer,
    "have": have, "data": data(), "need": need(), "seal": seal, "file": file(), "base": base,
    "prune": prune, "ack": ack(), "ping": ping, "pong": pong, "bye": bye,
}
any_frame = st.one_of(*STRATEGIES.values())

"""offers.py: which unknown chunk ids are worth an OFFER, learned per
journal file from the HAVE answers."""
from __future__ import annotations

import os

from cdpcore import packing
from cdpcore.format import encode_record
from cdpcore.offers import MIN_SAMPLES, PROBE_EVERY, OfferPolicy

KEY = bytes(32)


def run(fid: int, pages: list[bytes], seq: int = 1) -> bytes:
    return b"".join(encode_record(1, seq + k, 0, fid, 4096 * k, p) for k, p in enumerate(pages))


def offer_round(pol: OfferPolicy, fid: int, n: int, held_fn=lambda cid: False) -> tuple[int, int]:
    buf = run(fid, [os.urandom(4096) for _ in range(n)])
    p = packing.pack(buf, KEY)
    offered, fids = pol.choose(buf, p)
    held = {c for c in offered if held_fn(c)}
    pol.learn(offered, held, fids, {x.id: x.end - x.start for x in p.pieces if x.id})
    assert set(fids.values()) == {fid}
    return len(offered), len(p.ids)


def test_a_file_whose_chunks_are_never_held_stops_being_offered_but_is_probed():
    pol = OfferPolicy()
    assert offer_round(pol, 7, MIN_SAMPLES) == (MIN_SAMPLES, MIN_SAMPLES)  # learning
    offered, total = offer_round(pol, 7, PROBE_EVERY * 4)
    assert offered == 4 and total == PROBE_EVERY * 4  # only the probes
    # another file starts with a clean slate
    assert offer_round(pol, 8, 10) == (10, 10)


def test_a_file_whose_chunks_are_held_keeps_being_offered():
    pol = OfferPolicy()
    offer_round(pol, 3, MIN_SAMPLES, held_fn=lambda c: c[0] < 64)  # about a quarter held
    offered, total = offer_round(pol, 3, 100, held_fn=lambda c: c[0] < 64)
    assert offered == total == 100


def test_plain_file_bytes_are_always_offered():
    pol = OfferPolicy()
    data = os.urandom(200_000)
    p = packing.pack(data, KEY, records=False)
    offered, fids = pol.choose(b"", p)
    assert offered == p.ids and set(fids.values()) == {-1}

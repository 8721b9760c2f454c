"""offers.py: which unknown chunk ids are worth an OFFER, learned per
journal file from the HAVE answers."""
from __future__ import annotations

import os

from cdpcore import packing
from cdpcore.format import encode_record
from cdpcore.offers import MIN_SAMPLES, PROBE_EVERY, OfferPolicy

KEY = bytes(32)


def run(fid: int, pages: list[bytes], seq: int = 1, name: bytes | None = None) -> bytes:
    create = encode_record(4, seq - 1, 0, fid, 0o644, name) if name else b""
    return create + b"".join(encode_record(1, seq + k, 0, fid, 4096 * k, p) for k, p in enumerate(pages))


def offer_round(pol: OfferPolicy, fid: int, n: int, held_fn=lambda cid: False,
                size: int = 4096) -> tuple[int, int]:
    buf = run(fid, [os.urandom(size) for _ in range(n)])
    p = packing.pack(buf, KEY)
    offered, keys = pol.choose(buf, p)
    held = {c for c in offered if held_fn(c)}
    pol.learn(offered, held, keys, {x.id: x.end - x.start for x in p.pieces if x.id})
    return len(offered), len(p.ids)


def test_a_file_whose_chunks_are_never_held_stops_being_offered_but_is_probed():
    pol = OfferPolicy()
    assert offer_round(pol, 7, MIN_SAMPLES) == (MIN_SAMPLES, MIN_SAMPLES)  # learning
    offered, total = offer_round(pol, 7, PROBE_EVERY * 4)
    assert offered == 4 and total == PROBE_EVERY * 4  # only the probes
    # another file starts with a clean slate
    assert offer_round(pol, 8, 10) == (10, 10)


def test_a_file_recreated_under_its_name_keeps_what_was_learned():
    """SQLite's rollback journal: a new file (new file id, same name) every
    transaction, whose page copies the vault holds; the database file's
    page writes are never held."""
    pol = OfferPolicy()
    offered_db = offered_journal = 0
    for tx in range(100):
        jbuf = run(1000 + tx, [os.urandom(4096) for _ in range(2)], seq=10, name=b"his.db-journal")
        dbuf = run(7, [os.urandom(4096) for _ in range(2)], seq=20, name=b"his.db" if tx == 0 else None)
        for buf, is_journal in ((jbuf, True), (dbuf, False)):
            p = packing.pack(buf, KEY)
            offered, keys = pol.choose(buf, p)
            held = set(offered) if is_journal else set()
            pol.learn(offered, held, keys, {x.id: x.end - x.start for x in p.pieces if x.id})
            if tx >= 50:
                if is_journal:
                    offered_journal += len(offered)
                else:
                    offered_db += len(offered)
    assert offered_journal == 100 and offered_db <= 100 // PROBE_EVERY + 1


def test_plain_file_bytes_are_always_offered():
    pol = OfferPolicy()
    data = os.urandom(200_000)
    p = packing.pack(data, KEY, records=False)
    offered, keys = pol.choose(b"", p)
    assert offered == p.ids and set(keys.values()) == {-1}

"""Chunker benchmark (issue 5, item 9): cdpcore's FastCDC (native/chunker.c)
against pyfastcdc (Cython FastCDC 2020) on the same buffers with the same
sizes (min 4 KiB, average 16 KiB, max 128 KiB), alternating ABAB; the
figure is the median per-pair ratio of throughputs, and the absolute
GB/s for the >= 1 GB/s target. Both chunk a bytes object already in
memory; pyfastcdc's chunks are iterated (it yields them), ours come back
as a list of end offsets. Needs `pip install -e '.[bench]'` (pyfastcdc).
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable

import _bench
from _bench import median

from cdpcore.chunking import cuts

AVG, MIN, MAX = 16384, 4096, 131072
TARGET_GBPS = 1.0


def _data(kind: str, mib: int) -> bytes:
    if kind == "random":
        rnd = random.Random(11)
        return b"".join(rnd.randbytes(1 << 20) for _ in range(mib))
    pages = _bench.text_pages(256, 4096)  # text-like, compressible ~2-3x
    rnd = random.Random(12)
    return b"".join(pages[rnd.randrange(256)] for _ in range((mib << 20) // 4096))


def chunk_suite(rounds: int = 7, mib: int = 256, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    try:
        from pyfastcdc import FastCDC
    except ImportError:
        raise SystemExit("the chunk suite compares with pyfastcdc: pip install -e '.[bench]'") from None
    rows = []
    for kind in ("random", "text"):
        data = _data(kind, mib)
        theirs = FastCDC(avg_size=AVG, min_size=MIN, max_size=MAX)
        pairs = []
        for r in range(rounds):
            t: dict[str, float] = {}
            for side in (("ours", "pyfastcdc") if r % 2 == 0 else ("pyfastcdc", "ours")):
                t0 = time.perf_counter()
                if side == "ours":
                    n_ours = len(cuts(data, AVG, MIN, MAX))
                else:
                    n_theirs = sum(1 for _ in theirs.cut_buf(data))
                t[side] = time.perf_counter() - t0
            pairs.append(t)
            log(f"chunk {kind}: round {r + 1}/{rounds}: ours {len(data) / t['ours'] / 1e9:.2f} GB/s, "
                f"pyfastcdc {len(data) / t['pyfastcdc'] / 1e9:.2f} GB/s")
        ours = median([p["ours"] for p in pairs])
        them = median([p["pyfastcdc"] for p in pairs])
        ratio = median([p["pyfastcdc"] / p["ours"] for p in pairs])
        gbps = len(data) / ours / 1e9
        rows.append({"data": kind, "bytes": len(data), "ours_gbps": gbps, "pyfastcdc_gbps": len(data) / them / 1e9,
                     "speedup": ratio, "chunks_ours": n_ours, "chunks_pyfastcdc": n_theirs,
                     "pass": gbps >= TARGET_GBPS and ratio >= 1.0})
    return {"rounds": rounds, "rows": rows, "sizes": [MIN, AVG, MAX]}


def render(r: dict[str, Any]) -> list[str]:
    out = [f"## Chunker (target: >= {TARGET_GBPS:.0f} GB/s and at least as fast as pyfastcdc)\n",
           (f"FastCDC cut points of a {r['rows'][0]['bytes'] >> 20} MiB buffer in memory, min/avg/max "
            f"{r['sizes'][0] >> 10}/{r['sizes'][1] >> 10}/{r['sizes'][2] >> 10} KiB for both; "
            f"{r['rounds']} ABAB pairs, speedup = median per-pair pyfastcdc time / ours.\n"),
           "| data | cdpcore GB/s | pyfastcdc GB/s | speedup | chunks (ours / theirs) | target |",
           "|---|---:|---:|---:|---:|---|"]
    for x in r["rows"]:
        out.append(f"| {x['data']} | {x['ours_gbps']:.2f} | {x['pyfastcdc_gbps']:.2f} | **{x['speedup']:.2f}** | "
                   f"{x['chunks_ours']:,} / {x['chunks_pyfastcdc']:,} | {'PASS' if x['pass'] else 'FAIL'} |")
    return out + [""]

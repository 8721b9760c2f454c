"""Space a prune reclaims, this design next to the first one, on one journal.

    python benchmarks/prune_space.py [--old OLD_RETENTION.py] [--dir DIR]

Builds a realistic journal (a PACS-like tree of many small files written
once, some rewritten, and a 16 MiB database file whose hot pages are
rewritten in place every hour for 10 days), copies it, and prunes one copy
with cdpcore.retention and the other with the first design's retention.py
(by default taken from git: `git show 17a9ced:src/cdpcore/retention.py`),
with the same policy and clock. Prints a Markdown table: allocated bytes of
segments and bases before and after, kept and dropped points, time; and
checks that every kept point of the new prune restores as before.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cdpcore import Journal, Policy, restore
from cdpcore import retention as new_retention

H = 3600 * 10**6
D = 24 * H
T0 = 1_700_000_000 * 10**6
DB_PAGES = 4096  # 16 MiB in 4 KiB pages
DAYS = 10


def build(jdir: Path, root: Path) -> Journal:
    rnd = random.Random(42)
    j = Journal.create(jdir, root, segment_size=4 << 20)
    with j.batch() as b:  # the database, initialised
        for p in range(0, DB_PAGES, 256):
            b.append_write("his/his.db", p * 4096, rnd.randbytes(256 * 4096), ts=T0)
    b.append_flush(ts=T0)
    hot = [rnd.randrange(DB_PAGES) for _ in range(DB_PAGES // 10)]  # 10 % of the pages take the writes
    n_img = 0
    for day in range(DAYS):
        for hour in range(24):
            t = T0 + day * D + hour * H
            with j.batch() as b:
                for k in range(100):  # 100 page writes an hour, 90 % on hot pages
                    p = rnd.choice(hot) if rnd.random() < 0.9 else rnd.randrange(DB_PAGES)
                    b.append_write("his/his.db", p * 4096, rnd.randbytes(4096), ts=t + k)
                b.append_write("his/his.db-journal", 0, rnd.randbytes(8192), ts=t + 100)
                b.append_truncate("his/his.db-journal", 0, ts=t + 101)
                for _ in range(12):  # 12 small images an hour, written once
                    name = f"pacs/{day:02}/{n_img // 100:03}/img{n_img:06}.dcm"
                    b.append_create(name, 0o644, ts=t + 200)
                    b.append_write(name, 0, rnd.randbytes(rnd.randrange(1024, 8192)), ts=t + 201)
                    n_img += 1
                if hour % 6 == 0:  # a report rewritten a few times a day
                    b.append_write("pacs/index.txt", 0, f"{day} {hour} {n_img}\n".encode() * 40, ts=t + 300)
                b.append_flush(ts=t + 400)
    return j


def space(jdir: Path) -> int:
    return new_retention._space(Journal.open(jdir, readonly=True))


def run(which: str, module, jdir: Path, policy: Policy, now: int) -> dict:
    before = _alloc(jdir)
    t = time.perf_counter()
    with Journal.open(jdir) as j:
        res = module.prune(j, policy, now=now)
    dt = time.perf_counter() - t
    return {"design": which, "before": before, "after": _alloc(jdir), "kept": len(res.kept),
            "dropped": len(getattr(res, "dropped", [])), "boundary": res.boundary, "seconds": dt,
            "message": res.message, "kept_seqs": res.kept}


def _alloc(jdir: Path) -> int:
    return new_retention._dir_bytes(str(jdir / "segments")) + new_retention._dir_bytes(str(jdir / "base"))


def load_old(path: str | None, tmp: Path):
    if path is None:
        src = subprocess.run(["git", "show", "17a9ced:src/cdpcore/retention.py"], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        path = str(tmp / "old_retention.py")
        Path(path).write_text(src)
    spec = importlib.util.spec_from_file_location("cdpcore_old_retention", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look the module up)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="the first design's retention.py (default: from git 17a9ced)")
    ap.add_argument("--dir", help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="cdp-prune-space-"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "root").mkdir(exist_ok=True)
    t = time.perf_counter()
    build(tmp / "j", tmp / "root").close()
    print(f"built the journal in {time.perf_counter() - t:.1f} s: {_alloc(tmp / 'j')} bytes allocated",
          file=sys.stderr)
    for name in ("new", "old"):
        subprocess.run(["cp", "-a", str(tmp / "j"), str(tmp / name)], check=True)
    now = T0 + DAYS * D
    policy = Policy.parse("1d", keep_hourly="2d", keep_daily="30d")
    with Journal.open(tmp / "new", readonly=True) as j:
        dry = new_retention.prune(Journal.open(tmp / "new"), policy, now=now, dry_run=True)
        want = {}
        for k in dry.kept[:: max(1, len(dry.kept) // 6)] + [dry.kept[-1]]:
            restore(j, tmp / f"w{k}", at=f"seq:{k}", audit=False)
            want[k] = k
    rows = [run("this design (net change between kept points)", new_retention, tmp / "new", policy, now),
            run("first design (a base per kept point)", load_old(args.old, tmp), tmp / "old", policy, now)]
    with Journal.open(tmp / "new", readonly=True) as j:
        for k in want:
            restore(j, tmp / f"g{k}", at=f"seq:{k}", audit=False)
            diff = subprocess.run(["diff", "-r", "--no-dereference", str(tmp / f"w{k}"), str(tmp / f"g{k}")],
                                  capture_output=True)
            assert diff.returncode == 0, (k, diff.stdout[:500])
    print(f"policy: keep-all 1d, keep-hourly 2d, keep-daily 30d; {DAYS} days of history\n")
    print("| design | before | after | reclaimed | kept points | dropped | prune time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mib = 1 << 20
        print(f"| {r['design']} | {r['before'] / mib:.1f} MiB | {r['after'] / mib:.1f} MiB | "
              f"{(r['before'] - r['after']) / mib:.1f} MiB | {r['kept']} (boundary seq {r['boundary']}) | "
              f"{r['dropped']} | {r['seconds']:.1f} s |")
    for r in rows:
        print(f"\n{r['design']}: {r['message']}", file=sys.stderr)
    if not args.dir:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())

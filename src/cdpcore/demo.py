"""The README's main job: a HIS-like database journaled through the Python
API, a mistaken mass update, and a point-in-time restore that undoes it.

    python -m cdpcore.demo [--dir DIR] [--transactions N]

The "database" is a file of 4 KiB pages, each holding fixed-width patient
rows; every transaction rewrites a few pages in place (as a real database
does) and ends with a flush (a crash-consistent point). The program writes
the live file itself and journals each write, the way vendor code with its
own capture uses the API.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
import time

from cdpcore import Journal, restore
from cdpcore.point import format_us

PAGE = 4096
ROW = 64
ROWS_PER_PAGE = PAGE // ROW
WARDS = ["ICU", "ER", "CARD", "ONC", "PED", "NEURO", "ORTHO", "OBST"]


def row(pid: int, ward: str, note: str) -> bytes:
    text = f"{pid:08d}|{ward:<6}|{note}"
    return text.encode()[:ROW - 1].ljust(ROW - 1) + b"\n"


def read_row(db: str, pid: int) -> str:
    with open(db, "rb") as f:
        f.seek(pid * ROW)
        return f.read(ROW).decode(errors="replace").rstrip()


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdpcore.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="work directory (default: a new temporary directory)")
    ap.add_argument("--transactions", type=int, default=2000)
    ap.add_argument("--patients", type=int, default=8192)
    args = ap.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="cdpcore-demo-")
    if os.path.exists(work) and os.listdir(work):
        print(f"demo: {work} is not empty", file=sys.stderr)
        return 2
    root = os.path.join(work, "his")
    jpath = os.path.join(work, "journal")
    os.makedirs(root, exist_ok=True)
    db = os.path.join(root, "patients.db")
    rng = random.Random(7)
    pages = args.patients // ROWS_PER_PAGE

    print(f"== cdpcore demo in {work}")
    j = Journal.create(jpath, root=root, segment_size=8 << 20)
    fd = os.open(db, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # Admission of every patient: the initial load, one batch per page.
        t0 = time.perf_counter()
        with j.batch() as b:
            for p in range(pages):
                page = b"".join(row(p * ROWS_PER_PAGE + i, rng.choice(WARDS), "admitted")
                                for i in range(ROWS_PER_PAGE))
                os.pwrite(fd, page, p * PAGE)
                b.append_write("patients.db", p * PAGE, page)
            b.append_flush()
        # A day of updates: each transaction rewrites 1-4 pages, then flushes.
        for t in range(args.transactions):
            with j.batch() as b:
                for _ in range(rng.randint(1, 4)):
                    p = rng.randrange(pages)
                    buf = bytearray(os.pread(fd, PAGE, p * PAGE))
                    i = rng.randrange(ROWS_PER_PAGE)
                    pid = p * ROWS_PER_PAGE + i
                    buf[i * ROW:(i + 1) * ROW] = row(pid, rng.choice(WARDS), f"vitals rev {t}")
                    os.pwrite(fd, bytes(buf), p * PAGE)
                    b.append_write("patients.db", p * PAGE, bytes(buf))
                b.append_flush()
        os.fsync(fd)
        j.sync()
        elapsed = time.perf_counter() - t0
        good_seq = j.last_seq
        good_digest = digest(db)
        print(f"journaled {good_seq} records ({args.transactions} transactions) in {elapsed:.2f}s")
        print(f"patient 42 now:      {read_row(db, 42)}")
        time.sleep(0.002)
        good_time = j.records(since=f"seq:{good_seq - 1}").__next__().ts

        # 10:41:07 - someone runs an UPDATE without WHERE: every page is overwritten.
        time.sleep(0.002)
        with j.batch() as b:
            for p in range(pages):
                page = b"".join(row(p * ROWS_PER_PAGE + i, "XXXX", "ward closed")
                                for i in range(ROWS_PER_PAGE))
                os.pwrite(fd, page, p * PAGE)
                b.append_write("patients.db", p * PAGE, page)
            b.append_flush()
        j.sync()
        print(f"-- mistaken mass update at seq {good_seq + 1}..{j.last_seq}")
        print(f"patient 42 damaged:  {read_row(db, 42)}")
    finally:
        os.close(fd)

    # The operator looks at the journal and picks the last flush before the damage.
    points = [p for p in j.points() if p.kind == "FLUSH"]
    before = [p for p in points if p.ts <= good_time]
    chosen = before[-1]
    print(f"journal: {len(points)} flush points; last one before the damage: "
          f"seq {chosen.seq} at {format_us(chosen.ts)}")
    j.close()

    dest = os.path.join(work, "restored")
    t0 = time.perf_counter()
    res = restore(jpath, dest, at=format_us(chosen.ts))
    took = time.perf_counter() - t0
    restored_db = os.path.join(dest, "patients.db")
    print(f"restored {res.files} file(s), {res.records} records replayed, to {dest} "
          f"in {took:.2f}s (point {format_us(chosen.ts)} -> seq {res.seq})")
    print(f"patient 42 restored: {read_row(restored_db, 42)}")
    same = digest(restored_db) == good_digest
    print(f"restored database identical to the state before the damage: {'yes' if same else 'NO'}")
    kinds: dict[str, int] = {}
    with Journal.open(jpath, readonly=True) as jr:
        for r in jr.records():
            kinds[r.kind.name] = kinds.get(r.kind.name, 0) + 1
        info = jr.info()
    print(f"journal {jpath}: {info['records']} records in {info['segments']} segment(s), "
          f"{info['bytes'] / 1e6:.1f} MB; kinds {kinds}")
    print("try:  cdpctl log", jpath, "--kind flush --limit 5 ;  cdpctl points", jpath)
    if not args.dir:
        print(f"(work directory kept: {work}; remove it with: rm -r {work})")
    return 0 if same and res.seq == chosen.seq else 1


if __name__ == "__main__":
    sys.exit(main())

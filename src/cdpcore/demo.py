"""The README's main job: a hospital's HIS database and PACS archive are
journaled through the Python API; ransomware strikes; the operator finds it
on the timeline and rolls the live tree back to the point it suggests.

    python -m cdpcore.demo [--dir DIR] [--transactions N] [--images N]

The "database" is a file of 4 KiB pages holding fixed-width patient rows;
every transaction rewrites a few pages in place, as a real database does,
and ends with a flush (a crash-consistent point). PACS images are files of
16-bit pixels. The program writes the live files itself and journals each
write, the way vendor code with its own capture uses the API.

A simulated clock stamps the records so that a working morning fits in a
few seconds: the day starts two hours ago, the attack comes at the end. The
operator's part runs the real `cdpctl` commands.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile

from cdpcore import Journal
from cdpcore._native import now_us
from cdpcore.point import format_us

PAGE = 4096
ROW = 64
ROWS_PER_PAGE = PAGE // ROW
WARDS = ["ICU", "ER", "CARD", "ONC", "PED", "NEURO", "ORTHO", "OBST"]
MINUTE = 60_000_000


def row(pid: int, ward: str, note: str) -> bytes:
    text = f"{pid:08d}|{ward:<6}|{note}"
    return text.encode()[: ROW - 1].ljust(ROW - 1) + b"\n"


def read_row(db: str, pid: int) -> str:
    with open(db, "rb") as f:
        f.seek(pid * ROW)
        return f.read(ROW).decode(errors="replace").rstrip()


def image(rng: random.Random, size: int) -> bytes:
    """16-bit pixels: a smooth gradient with sensor noise (compressible, as
    real images are, but far from text)."""
    base = rng.randrange(2000)
    return b"".join((base + (i % 512) * 3 + rng.randrange(64)).to_bytes(2, "little")
                    for i in range(size // 2))


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for top, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(top, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def cdpctl(*args: str, show: int | None = 40) -> str:
    """Run a cdpctl command as an operator would, echoing it and (at most
    `show` lines of) its output; show=None runs it silently."""
    if show is not None:
        print(f"\n$ cdpctl {' '.join(shlex.quote(a) for a in args)}")
    r = subprocess.run([sys.executable, "-m", "cdpcore.cli.main", *args],
                       capture_output=True, text=True)
    lines = r.stdout.rstrip().splitlines()
    if show is not None:
        more = [f"  ... ({len(lines) - show} more lines)"] if len(lines) > show else []
        print("\n".join(lines[:show] + more))
    if r.returncode:
        print(r.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"demo: cdpctl {args[0]} failed with exit code {r.returncode}")
    return r.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdpcore.demo",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--dir", help="work directory (default: a new temporary directory)")
    ap.add_argument("--transactions", type=int, default=1500)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--patients", type=int, default=4096)
    args = ap.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="cdpcore-demo-")
    if os.path.exists(work) and os.listdir(work):
        print(f"demo: {work} is not empty", file=sys.stderr)
        return 2
    root, jpath = os.path.join(work, "hospital"), os.path.join(work, "journal")
    os.makedirs(os.path.join(root, "his"))
    db = os.path.join(root, "his", "patients.db")
    rng = random.Random(7)
    pages = args.patients // ROWS_PER_PAGE
    clock = now_us() - 120 * MINUTE  # the simulated working morning

    def tick(us: int) -> int:
        nonlocal clock
        clock += us
        return clock

    print(f"== cdpcore demo in {work}")
    # The tree is empty but for his/, journaled below: no base copy needed.
    j = Journal.create(jpath, root=root, segment_size=16 << 20, base=False)
    fd = os.open(db, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        j.append_mkdir("his", ts=tick(0))
        # Admissions: the initial load of the patient table.
        with j.batch() as b:
            ts = tick(MINUTE)
            for p in range(pages):
                page = b"".join(row(p * ROWS_PER_PAGE + i, rng.choice(WARDS), "admitted")
                                for i in range(ROWS_PER_PAGE))
                os.pwrite(fd, page, p * PAGE)
                b.append_write("his/patients.db", p * PAGE, page, ts=ts)
            b.append_flush(ts=ts)
        # The morning: transactions on the database, studies arriving in PACS.
        step = 100 * MINUTE // max(1, args.transactions)
        for t in range(args.transactions):
            with j.batch() as b:
                ts = tick(step)
                for _ in range(rng.randint(1, 4)):
                    p = rng.randrange(pages)
                    buf = bytearray(os.pread(fd, PAGE, p * PAGE))
                    i = rng.randrange(ROWS_PER_PAGE)
                    buf[i * ROW:(i + 1) * ROW] = row(p * ROWS_PER_PAGE + i, rng.choice(WARDS),
                                                     f"vitals rev {t}")
                    os.pwrite(fd, bytes(buf), p * PAGE)
                    b.append_write("his/patients.db", p * PAGE, buf, ts=ts)
                if t % max(1, args.transactions // args.images) == 0:
                    n = t // max(1, args.transactions // args.images)
                    rel = f"pacs/study-{n // 10:03d}/img-{n % 10:02d}.dcm"
                    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
                    data = image(rng, 32768)
                    with open(os.path.join(root, rel), "wb") as f:
                        f.write(data)
                    b.append_create(rel, ts=ts)
                    b.append_write(rel, 0, data, ts=ts)
                b.append_flush(ts=ts)
        os.fsync(fd)
        j.sync()
    finally:
        os.close(fd)
    before = tree_digest(root)
    print(f"journaled a morning: {j.last_seq} records, {len(before)} files; "
          f"patient 42: {read_row(db, 42)}")

    # Ransomware: every file overwritten with ciphertext and renamed *.locked.
    attack = tick(15 * MINUTE)
    with j.batch() as b:
        for rel in sorted(before):
            path = os.path.join(root, rel)
            size = os.path.getsize(path)
            junk = os.urandom(size)
            with open(path, "r+b") as f:
                f.write(junk)
            os.rename(path, path + ".locked")
            b.append_write(rel, 0, junk, ts=attack)
            b.append_rename(rel, rel + ".locked", ts=attack)
    j.sync()
    j.close()
    print(f"-- {format_us(attack)}: ransomware encrypted and renamed {len(before)} files; "
          f"{db} is gone")

    # The operator's side.
    cdpctl("timeline", jpath, "--bucket", "10m")
    point = json.loads(cdpctl("timeline", jpath, "--bucket", "10m", "--json", show=None)
                       )["suggestion"]["point"]
    cdpctl("diff", jpath, "--from", point, show=8)
    cdpctl("rollback", jpath, "--to", point, show=8)
    after = tree_digest(root)
    same = after == before
    print(f"\npatient 42 after rollback: {read_row(db, 42)}")
    print(f"live tree identical to the moment before the attack: {'yes' if same else 'NO'} "
          f"({len(after)} files)")
    cdpctl("audit", jpath)
    if not args.dir:
        print(f"\n(work directory kept: {work}; remove it with: rm -r {work})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

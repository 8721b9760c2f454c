"""The programs the WAN benchmarks capture with `cdpctl protect`, and the
"changed data" the zstd baseline compresses.

Each program is an ordinary, unmodified Python program (run as
`python scenarios.py KIND ROOT ...`): the capture sees its libc writes,
as it would a real HIS or PACS writer's.

- `his-init ROOT --mib M`: a SQLite database `ROOT/his/his.db` of about M MiB
  (patients, visits), written before capture starts (the initial state
  that both the vault and rsync's DR copy hold before the change).
- `his-run ROOT --tx N`: N HIS-like transactions in rollback-journal mode
  (a visit inserted, a patient's notes and a bed updated, sometimes a
  discharge deleting rows), each committed (so each fsyncs).
- `pacs-init ROOT --files N` / `pacs-run ROOT --files N --dup F`: PACS-like
  studies of 16-bit images (a 512-byte header + 12-bit pixels stored in
  16 bits, so zstd -3 gets ~1.25x, as on uncompressed DICOM); in the run
  a fraction F of the new files are byte copies of earlier ones (the same
  image sent twice by a modality, a re-sent study).
- `writer ROOT --rate BYTES_PER_S --seconds S`: a steady writer of
  2x-compressible 4 KiB blocks (2 KiB random + 2 KiB of a repeated line)
  appended to files in ROOT/stream/, paced on the monotonic clock, with an
  fdatasync every 100 ms (a database's group commit).

All randomness is seeded: the same arguments give the same bytes.
"""
from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import time

WORDS = ("patient admitted ward bed blood pressure normal elevated fever cough chest pain ct scan mri "
         "x-ray prescribed amoxicillin ibuprofen insulin discharged follow-up outpatient referral "
         "cardiology oncology pediatrics emergency surgery icu nurse doctor allergy penicillin none "
         "history diabetes hypertension asthma stable improving critical observation lab result "
         "glucose hemoglobin creatinine sodium potassium within range repeat tomorrow").split()


def _text(rnd: random.Random, n_words: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n_words))


# ---- HIS -------------------------------------------------------------------------


def his_path(root: str) -> str:
    return os.path.join(root, "his", "his.db")


def his_init(root: str, mib: int, seed: int = 1) -> None:
    os.makedirs(os.path.dirname(his_path(root)), exist_ok=True)
    rnd = random.Random(seed)
    db = sqlite3.connect(his_path(root))
    db.executescript("""
        PRAGMA journal_mode=DELETE;
        CREATE TABLE patients(id INTEGER PRIMARY KEY, name TEXT, born TEXT, ward TEXT, bed INTEGER, notes TEXT);
        CREATE TABLE visits(id INTEGER PRIMARY KEY, patient INTEGER, ts REAL, code TEXT, notes TEXT);
        CREATE INDEX visits_patient ON visits(patient);
    """)
    target = mib << 20
    pid = 0
    while os.path.getsize(his_path(root)) < target:
        with db:
            for _ in range(500):
                pid += 1
                db.execute("INSERT INTO patients VALUES(?,?,?,?,?,?)",
                           (pid, f"patient-{pid:07d}", f"19{rnd.randrange(30, 99)}-{rnd.randrange(1, 13):02d}",
                            rnd.choice("ABCDEFGH"), rnd.randrange(1, 40), _text(rnd, 30)))
                db.execute("INSERT INTO visits(patient, ts, code, notes) VALUES(?,?,?,?)",
                           (pid, 1.7e9 + pid, f"Z{rnd.randrange(1000):03d}", _text(rnd, 20)))
    db.close()


def his_run(root: str, tx: int, seed: int = 2) -> None:
    rnd = random.Random(seed)
    db = sqlite3.connect(his_path(root), isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    (n,) = db.execute("SELECT max(id) FROM patients").fetchone()
    for i in range(tx):
        db.execute("BEGIN")
        p = rnd.randrange(1, n + 1)
        db.execute("INSERT INTO visits(patient, ts, code, notes) VALUES(?,?,?,?)",
                   (p, 1.8e9 + i, f"Z{rnd.randrange(1000):03d}", _text(rnd, rnd.randrange(10, 60))))
        db.execute("UPDATE patients SET notes = ?, bed = ? WHERE id = ?",
                   (_text(rnd, rnd.randrange(10, 50)), rnd.randrange(1, 40), rnd.randrange(1, n + 1)))
        if rnd.random() < 0.05:  # a discharge: the patient's oldest visit is archived away
            db.execute("DELETE FROM visits WHERE id = (SELECT min(id) FROM visits WHERE patient = ?)", (p,))
        db.execute("COMMIT")
    db.close()


# ---- PACS ------------------------------------------------------------------------


def _image(rnd: random.Random, n: int) -> bytes:
    """A 512-byte header and n 16-bit pixels of 12-bit data: the low byte
    noisy, the high nibble a smooth field (~1.5x compressible)."""
    side = 64
    header = (f"DICM study={n} rows={side} cols={n // side} bits=12 " + _text(rnd, 40)).encode()[:512]
    header = header.ljust(512, b"\0")
    px = bytearray(2 * n)
    px[0::2] = rnd.randbytes(n)
    level = rnd.randrange(16)
    hi = bytearray()
    while len(hi) < n:  # a random walk of the high nibble, in runs of 64 pixels
        level = min(15, max(0, level + rnd.choice((-1, 0, 0, 1))))
        hi += bytes((level,)) * 64
    px[1::2] = bytes(hi[:n])
    return header + bytes(px)


def pacs_write(root: str, files: int, dup: float, seed: int, first: int = 0) -> None:
    rnd = random.Random(seed)
    written: list[str] = []
    for k in range(first, first + files):
        study = os.path.join(root, "pacs", f"study-{k // 50:05d}")
        os.makedirs(study, exist_ok=True)
        path = os.path.join(study, f"img-{k % 50:02d}.dcm")
        if written and rnd.random() < dup:
            with open(rnd.choice(written), "rb") as f:
                data = f.read()
        else:
            data = _image(rnd, rnd.randrange(4096, 32768))  # 8-64 KiB of pixels
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)
    if files:
        fd = os.open(os.path.join(root, "pacs"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def pacs_init(root: str, files: int) -> None:
    pacs_write(root, files, dup=0.0, seed=3)


def pacs_run(root: str, files: int, dup: float) -> None:
    existing = sum(len(fs) for _d, _s, fs in os.walk(os.path.join(root, "pacs")))
    pacs_write(root, files, dup=dup, seed=4, first=existing)


# ---- steady writer ------------------------------------------------------------------


def writer(root: str, rate: int, seconds: float, block: int = 4096, seed: int = 5) -> None:
    rnd = random.Random(seed)
    d = os.path.join(root, "stream")
    os.makedirs(d, exist_ok=True)
    half = block // 2
    filler = (b"visit recorded; vitals within range; next check at 06:00\n" * (half // 58 + 1))[:half]
    per_file = 64 << 20
    written, n_file, fd, off = 0, 0, -1, per_file
    t0 = last_sync = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            due = int(rate * (now - t0))
            while written < due:
                if off >= per_file:
                    if fd >= 0:
                        os.close(fd)
                    fd = os.open(os.path.join(d, f"part-{n_file:04d}.dat"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    n_file, off = n_file + 1, 0
                os.pwrite(fd, rnd.randbytes(half) + filler, off)
                off += block
                written += block
            if now - last_sync >= 0.1:
                os.fdatasync(fd)
                last_sync = now
            time.sleep(0.005)
    finally:
        if fd >= 0:
            os.fdatasync(fd)
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("his-init", "his-run", "pacs-init", "pacs-run", "writer"))
    ap.add_argument("root")
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--tx", type=int, default=3000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--dup", type=float, default=0.1)
    ap.add_argument("--rate", type=int, default=500 << 10)
    ap.add_argument("--seconds", type=float, default=60.0)
    a = ap.parse_args(argv)
    if not os.path.isdir(a.root):
        print(f"scenarios: {a.root}: not a directory", file=sys.stderr)
        return 2
    if a.kind == "his-init":
        his_init(a.root, a.mib)
    elif a.kind == "his-run":
        his_run(a.root, a.tx)
    elif a.kind == "pacs-init":
        pacs_init(a.root, a.files)
    elif a.kind == "pacs-run":
        pacs_run(a.root, a.files, a.dup)
    else:
        writer(a.root, a.rate, a.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

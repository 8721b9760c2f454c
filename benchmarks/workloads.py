"""Hospital-like workloads journaled the way real programs are: through
`cdpctl protect` (the LD_PRELOAD capture, docs/capture.md).

    from workloads import his_sqlite, pacs_tree, start_sustained

* his_sqlite: a HIS-like SQLite database (default 16 MiB of patient-visit
  rows, rollback-journal mode, synchronous=FULL), then N small transactions
  (inserts and updates, each committed with its fsyncs) run by a Python
  program under capture.
* pacs_tree: a PACS-like archive written under capture: thousands of new
  image files (a DICOM-like text header, then 16-bit pixels: a smooth
  field plus sensor noise in the low bits), ~10 % of them byte-identical
  copies of earlier images under new names (a study sent twice).
* start_sustained: a captured writer appending at a given rate (bytes/s)
  of data that compresses about 2x, for lag measurements; returns the
  running process.

his_sqlite and pacs_tree return a Workload: the journal, the protected
root, a copy of the root before the workload ("before") and the net change
(files and 4 KiB blocks that differ), which baselines like rsync or zstd
of the changed data are measured against. Everything is seeded (fixed
seed); sizes scale with environment variables (CDP_WL_DB_MB,
CDP_WL_TRANSACTIONS, CDP_WL_IMAGES, CDP_WL_IMAGE_SIDE) or arguments.

The generator programs are this file's own subcommands (run by the
captured Python), so the benchmark and what it runs cannot drift apart:
    python workloads.py his-init DB MB SEED
    python workloads.py his-tx DB N SEED
    python workloads.py pacs-write DIR N SIDE SEED
    python workloads.py sustain PATH RATE SECONDS SEED
"""
from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK = 4096
SEED = 20261122


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def cdpctl() -> list[str]:
    """The cdpctl of the running interpreter's environment."""
    exe = Path(sys.executable).with_name("cdpctl")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cdpcore.cli.main"]


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p


# ---- the net change -----------------------------------------------------------------


@dataclass
class Change:
    """What differs between two trees: new or changed files, and per file
    the 4 KiB blocks that differ (a new file: all of them)."""

    new_files: list[str] = field(default_factory=list)
    changed_files: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    file_bytes: int = 0  # sizes of new and changed files, whole
    block_bytes: int = 0  # bytes of the differing blocks

    def blocks(self, before: Path, after: Path) -> bytes:
        """The differing blocks' bytes, in path and offset order (what
        `zstd -3 of the net change` compresses)."""
        out = bytearray()
        for rel in sorted(self.new_files + self.changed_files):
            new = (after / rel).read_bytes()
            old = (before / rel).read_bytes() if rel in self.changed_files else b""
            for off in range(0, len(new), BLOCK):
                if new[off:off + BLOCK] != old[off:off + BLOCK]:
                    out += new[off:off + BLOCK]
        return bytes(out)


def net_change(before: Path, after: Path) -> Change:
    ch = Change()

    def files(top: Path) -> dict[str, Path]:
        return {str(p.relative_to(top)): p for p in top.rglob("*") if p.is_file() and not p.is_symlink()}

    a, b = files(before), files(after)
    for rel, p in sorted(b.items()):
        new = p.read_bytes()
        if rel not in a:
            ch.new_files.append(rel)
            ch.file_bytes += len(new)
            ch.block_bytes += len(new)
            continue
        old = a[rel].read_bytes()
        if old != new:
            ch.changed_files.append(rel)
            ch.file_bytes += len(new)
            ch.block_bytes += sum(len(new[o:o + BLOCK]) for o in range(0, len(new), BLOCK)
                                  if new[o:o + BLOCK] != old[o:o + BLOCK])
    ch.removed = sorted(set(a) - set(b))
    return ch


@dataclass
class Workload:
    name: str
    journal: Path
    root: Path
    before: Path  # a copy of the root before the workload ran
    change: Change
    seconds: float  # wall time of the captured run
    params: dict[str, int]


def _prepare(workdir: Path, name: str) -> tuple[Path, Path, Path]:
    top = workdir / name
    if top.exists():
        shutil.rmtree(top)
    root, journal, before = top / "root", top / "journal", top / "before"
    root.mkdir(parents=True)
    return root, journal, before


# ---- (a) HIS-like SQLite --------------------------------------------------------------

DEPTS = ("cardiology", "oncology", "pediatrics", "radiology", "emergency", "orthopedics",
         "neurology", "internal medicine", "surgery", "obstetrics")
WORDS = ("patient", "reports", "pain", "fever", "stable", "follow-up", "prescribed", "mg", "daily",
         "blood", "pressure", "normal", "elevated", "scan", "scheduled", "referred", "allergy",
         "history", "of", "no", "acute", "distress", "chronic", "review", "in", "two", "weeks")


def _visit(rnd: random.Random, vid: int) -> tuple[object, ...]:
    pid = rnd.randrange(1, 200_000)
    notes = " ".join(rnd.choice(WORDS) for _ in range(rnd.randrange(12, 40)))
    return (vid, pid, 1_700_000_000 + vid * 37 + rnd.randrange(30), rnd.choice(DEPTS),
            f"Dr. {rnd.choice('ABCDEFGHJKLMNPRSTW')}{rnd.randrange(100, 999)}",
            f"ICD10-{rnd.choice('ABCDEIJKMNRS')}{rnd.randrange(10, 99)}.{rnd.randrange(10)}",
            notes, round(rnd.uniform(10, 2500), 2), rnd.randrange(4))


def _his_init(db: str, mb: int, seed: int) -> None:
    rnd = random.Random(seed)
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("PRAGMA page_size=4096")
    con.execute("CREATE TABLE visit (id INTEGER PRIMARY KEY, patient INTEGER, ts INTEGER, dept TEXT, "
                "doctor TEXT, diagnosis TEXT, notes TEXT, amount REAL, status INTEGER)")
    con.execute("CREATE INDEX visit_patient ON visit(patient)")
    con.execute("CREATE INDEX visit_ts ON visit(ts)")
    vid = 1
    while os.path.getsize(db) < mb << 20:
        con.executemany("INSERT INTO visit VALUES (?,?,?,?,?,?,?,?,?)",
                        [_visit(rnd, vid + k) for k in range(2000)])
        vid += 2000
        con.commit()
    con.close()


def _his_tx(db: str, n: int, seed: int) -> None:
    rnd = random.Random(seed + 1)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("PRAGMA synchronous=FULL")
    top = con.execute("SELECT max(id) FROM visit").fetchone()[0]
    for _ in range(n):
        con.execute("BEGIN")
        for _ in range(rnd.randrange(1, 3)):
            top += 1
            con.execute("INSERT INTO visit VALUES (?,?,?,?,?,?,?,?,?)", _visit(rnd, top))
        for _ in range(rnd.randrange(0, 3)):
            # recent visits are updated most (status, amount); old ones sometimes
            vid = top - int(rnd.expovariate(1 / 500)) if rnd.random() < 0.8 else rnd.randrange(1, top)
            con.execute("UPDATE visit SET status=?, amount=amount+? WHERE id=?",
                        (rnd.randrange(4), round(rnd.uniform(0, 50), 2), max(vid, 1)))
        con.execute("COMMIT")
    con.close()


def his_sqlite(workdir: Path, db_mb: int | None = None, transactions: int | None = None,
               seed: int = SEED) -> Workload:
    """(a): the database is created before protection (it is in the base);
    the transactions run under `cdpctl protect`."""
    db_mb = db_mb or _env_int("CDP_WL_DB_MB", 16)
    transactions = transactions or _env_int("CDP_WL_TRANSACTIONS", 3000)
    root, journal, before = _prepare(Path(workdir), "his")
    db = root / "his.db"
    _run([sys.executable, __file__, "his-init", str(db), str(db_mb), str(seed)])
    _run(cdpctl() + ["init", str(journal), "--root", str(root)])
    shutil.copytree(root, before)
    t = time.perf_counter()
    _run(cdpctl() + ["protect", str(journal), "--", sys.executable, __file__, "his-tx", str(db),
                     str(transactions), str(seed)])
    secs = time.perf_counter() - t
    return Workload("his", journal, root, before, net_change(before, root), secs,
                    {"db_mb": db_mb, "transactions": transactions, "seed": seed})


# ---- (b) PACS-like tree -------------------------------------------------------------------


def _profile(rnd: random.Random, n: int, lo: int, hi: int) -> list[int]:
    """A smooth random curve of n points in [lo, hi): a few random bumps."""
    out = [0.0] * n
    for _ in range(4):
        c, w, h = rnd.uniform(0, n), rnd.uniform(n / 10, n / 2), rnd.uniform(-1, 1)
        for x in range(n):
            d = (x - c) / w
            out[x] += h / (1 + d * d)
    mn, mx = min(out), max(out)
    span = (mx - mn) or 1.0
    return [int(lo + (v - mn) / span * (hi - lo - 1)) for v in out]


_NOISE = bytes(b & 0x1F for b in range(256))  # 5 bits of sensor noise


def _image(rnd: random.Random, side: int, study: int, number: int) -> bytes:
    """A DICOM-like header (text tags) then side x side 16-bit pixels of a
    12-bit detector: a smooth separable field plus noise in the low bits."""
    header = (f"DICM\nPatientID=P{rnd.randrange(10**6):07d}\nStudyInstanceUID=1.2.840.{study}\n"
              f"SeriesNumber={number // 50}\nInstanceNumber={number}\nModality=CT\n"
              f"Rows={side}\nColumns={side}\nBitsStored=12\nKVP={rnd.choice((100, 120, 140))}\n"
              f"SliceLocation={number * 1.25:.2f}\n").encode().ljust(1024, b"\0")
    rows = _profile(rnd, side, 0, 2048)
    cols = _profile(rnd, side, 0, 2048)
    px = array("H", [r + c for r in rows for c in cols])
    raw = bytearray(px.tobytes())
    noise = rnd.randbytes(len(raw) // 2).translate(_NOISE)
    low = int.from_bytes(raw[0::2], "little") ^ int.from_bytes(noise, "little")
    raw[0::2] = low.to_bytes(len(raw) // 2, "little")
    return header + bytes(raw)


def _pacs_write(top: str, n: int, side: int, seed: int) -> None:
    rnd = random.Random(seed + 2)
    written: list[bytes] = []
    for i in range(n):
        study = i // 100
        d = os.path.join(top, f"study{study:05d}")
        os.makedirs(d, exist_ok=True)
        if written and rnd.random() < 0.10:
            data = rnd.choice(written)  # the same image stored again (a resend, a copy)
        else:
            data = _image(rnd, side, study, i)
            written.append(data)
            if len(written) > 200:
                written.pop(rnd.randrange(len(written)))
        with open(os.path.join(d, f"img{i:06d}.dcm"), "wb") as f:
            f.write(data)


def pacs_tree(workdir: Path, images: int | None = None, side: int | None = None,
              seed: int = SEED) -> Workload:
    """(b): an empty archive root (with one existing study in the base),
    then `images` new files written under capture."""
    images = images or _env_int("CDP_WL_IMAGES", 1500)
    side = side or _env_int("CDP_WL_IMAGE_SIDE", 256)
    root, journal, before = _prepare(Path(workdir), "pacs")
    (root / "README").write_text("PACS archive\n")
    _run(cdpctl() + ["init", str(journal), "--root", str(root)])
    shutil.copytree(root, before)
    t = time.perf_counter()
    _run(cdpctl() + ["protect", str(journal), "--", sys.executable, __file__, "pacs-write", str(root),
                     str(images), str(side), str(seed)])
    secs = time.perf_counter() - t
    return Workload("pacs", journal, root, before, net_change(before, root), secs,
                    {"images": images, "side": side, "seed": seed})


# ---- (c) a sustained writer ------------------------------------------------------------------


def _sustain(path: str, rate: int, seconds: float, seed: int) -> None:
    """Append `rate` bytes/s in 64 KiB writes, data that compresses ~2x
    (half random, half repeated text), fsync every second."""
    rnd = random.Random(seed + 3)
    step = 64 * 1024
    text = (b"visit record " * 5000)[: step // 2]
    t0 = time.monotonic()
    sent = 0
    last_sync = t0
    with open(path, "ab") as f:
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            due = rate * (now - t0)
            if sent >= due:
                time.sleep(min(0.01, (sent - due) / rate + 0.001))
                continue
            f.write(rnd.randbytes(step // 2) + text)
            f.flush()
            sent += step
            if now - last_sync >= 1.0:
                os.fsync(f.fileno())
                last_sync = now
        os.fsync(f.fileno())


def start_sustained(journal: Path, rate: int = 500 * 1024, seconds: float = 60.0,
                    name: str = "stream.bin", seed: int = SEED) -> subprocess.Popen[bytes]:
    """(c): start a captured writer of `rate` bytes/s for `seconds` into
    ROOT/name (journal must exist: `cdpctl init`); the caller waits for it."""
    from cdpcore import Journal

    with Journal.open(journal, readonly=True) as j:
        root = j.root
    return subprocess.Popen(cdpctl() + ["protect", str(journal), "--", sys.executable, __file__, "sustain",
                                        os.path.join(root, name), str(rate), str(seconds), str(seed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "his-init":
        _his_init(args[0], int(args[1]), int(args[2]))
    elif cmd == "his-tx":
        _his_tx(args[0], int(args[1]), int(args[2]))
    elif cmd == "pacs-write":
        _pacs_write(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "sustain":
        _sustain(args[0], int(args[1]), float(args[2]), int(args[3]))
    else:
        print(f"unknown subcommand {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

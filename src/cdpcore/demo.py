"""The README's main job: a hospital's HIS database (a real SQLite program)
and PACS archive are captured by `cdpctl protect`; ransomware strikes; the
operator finds it on the timeline and rolls the live tree back to the point
it suggests. Then the journal is replicated to a DR site over an emulated
10 Mbit/s WAN (`cdpctl pki`, `serve`, `ship --follow` through the link
emulator), the hospital keeps working while the sender follows, and the DR
site restores the same point byte for byte.

    python -m cdpcore.demo [--dir DIR] [--transactions N] [--images N]

The HIS application is an unmodified Python program using sqlite3 (rollback
journal mode: each commit ends with fsync, which the capture library turns
into a crash-consistent point); it also stores PACS studies (files of
16-bit pixels, fsync'd). It runs under `cdpctl protect`, which preloads the
capture library: the program does not know it is journaled. The ransomware
is another unmodified program under capture. The operator's part runs the
real `cdpctl` commands.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import re
import tempfile
import threading
import time

from cdpcore.point import format_us

WARDS = ["ICU", "ER", "CARD", "ONC", "PED", "NEURO", "ORTHO", "OBST"]

HIS_APP = r"""
import os, random, sqlite3, sys
root, phase, transactions, images, patients = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
wards = %(wards)r
rng = random.Random(7 if phase == "yesterday" else 8)
os.makedirs(os.path.join(root, "his"), exist_ok=True)
db = sqlite3.connect(os.path.join(root, "his", "patients.db"))
db.execute("pragma journal_mode=delete")
if phase == "yesterday":
    db.execute("create table patients(id integer primary key, ward text, note text)")
    with db:
        db.executemany("insert into patients values (?, ?, 'admitted')",
                       [(p, rng.choice(wards)) for p in range(patients)])
first = 0 if phase == "yesterday" else images
every = max(1, transactions // max(1, images))
for t in range(transactions):
    with db:
        for _ in range(rng.randint(1, 4)):
            db.execute("update patients set ward = ?, note = ? where id = ?",
                       (rng.choice(wards), f"{phase} vitals rev {t}", rng.randrange(patients)))
    if t %% every == 0 and t // every < images:
        n = first + t // every
        path = os.path.join(root, "pacs", f"study-{n // 10:03d}", f"img-{n %% 10:02d}.dcm")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        base = rng.randrange(2000)
        data = b"".join((base + (i %% 512) * 3 + rng.randrange(64)).to_bytes(2, "little")
                        for i in range(16384))
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
db.close()
os.sync()  # end of shift: everything on disk (and a consistent point in the journal)
""" % {"wards": WARDS}

RANSOMWARE = r"""
import os, sys
for top, _dirs, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(top, name)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.write(os.urandom(size))
        os.rename(path, path + ".locked")
"""


def read_row(db: str, pid: int) -> str:
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = c.execute("select id, ward, note from patients where id = ?", (pid,)).fetchone()
        finally:
            c.close()
    except sqlite3.Error as e:
        return f"(unreadable: {e})"
    return "|".join(str(x) for x in row) if row else "(missing)"


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
    os.makedirs(root)
    db = os.path.join(root, "his", "patients.db")
    app, ransomware = os.path.join(work, "his_app.py"), os.path.join(work, "ransomware.py")
    with open(app, "w") as f:
        f.write(HIS_APP)
    with open(ransomware, "w") as f:
        f.write(RANSOMWARE)

    print(f"== cdpcore demo in {work}")
    cdpctl("init", jpath, "--root", root, "--no-base", show=None)
    half = max(8, args.images // 2)
    # Yesterday: the unmodified HIS program admits patients and stores
    # studies, captured; the night's base copy follows (it is what makes
    # these files "old" to the timeline's ransomware test).
    cdpctl("protect", jpath, "--", sys.executable, app, root, "yesterday",
           str(max(1, args.transactions // 4)), str(half), str(args.patients), show=2)
    cdpctl("baseline", jpath)
    # This morning: the same program, captured again.
    cdpctl("protect", jpath, "--", sys.executable, app, root, "morning", str(args.transactions),
           str(max(0, args.images - half)), str(args.patients))
    before = tree_digest(root)
    print(f"patient 42: {read_row(db, 42)}")
    # a quiet spell, so that the attack stands apart on the timeline
    time.sleep(2.5)

    # Ransomware: every file overwritten with ciphertext and renamed *.locked.
    attack = time.time_ns() // 1000
    cdpctl("protect", jpath, "--", sys.executable, ransomware, root, show=3)
    print(f"-- {format_us(attack)}: ransomware encrypted and renamed {len(before)} files; "
          f"{db} is gone")

    # The operator's side.
    cdpctl("timeline", jpath, "--bucket", "1s")
    point = json.loads(cdpctl("timeline", jpath, "--bucket", "1s", "--json", show=None)
                       )["suggestion"]["point"]
    cdpctl("diff", jpath, "--from", point, show=8)
    cdpctl("rollback", jpath, "--to", point, show=8)
    after = tree_digest(root)
    same = after == before
    print(f"\npatient 42 after rollback: {read_row(db, 42)}")
    print(f"live tree identical to the moment before the attack: {'yes' if same else 'NO'} "
          f"({len(after)} files)")
    cdpctl("audit", jpath)
    dr_same = replicate(work, jpath, root, app, point, args)
    if not args.dir:
        print(f"\n(work directory kept: {work}; remove it with: rm -r {work})")
    return 0 if same and dr_same else 1


WAN = "10mbit,50ms"  # the link to the DR site: a common hospital WAN


def _state(jpath: str) -> dict:
    try:
        with open(os.path.join(jpath, "replication.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _journal_end(jpath: str) -> int:
    return int(json.loads(cdpctl("info", jpath, "--json", show=None))["last_seq"])


class _Proxy:
    """The WAN emulator (cdpcore.testing.LinkProxy) in a thread of its own."""

    def __init__(self, target_port: int) -> None:
        import trio

        from cdpcore.testing import Link, LinkProxy

        self.proxy = LinkProxy("127.0.0.1", target_port, Link.parse(WAN))
        self.port = 0
        self._ready = threading.Event()
        self._token: object = None
        self._scope: object = None

        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as n:
                    self.port = await n.start(self.proxy.run)
                    self._ready.set()
        self._thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def close(self) -> None:
        import trio

        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)  # type: ignore[attr-defined]
        self._thread.join(10)


def replicate(work: str, jpath: str, root: str, app: str, point: str, args: argparse.Namespace) -> bool:
    """The DR act: certificates, a receiver, the sender following the
    journal through a 10 Mbit/s WAN, the hospital working meanwhile, and a
    restore at the DR site compared with the local one."""
    print(f"\n== disaster recovery site, over an emulated {WAN} WAN")
    pki, vault = os.path.join(work, "pki"), os.path.join(work, "dr-vault")
    cdpctl("pki", "init", pki, "--source", "hospital", show=3)
    ca, crt, key = (os.path.join(pki, n) for n in ("ca.pem", "hospital.pem", "hospital.key"))
    serve = subprocess.Popen([sys.executable, "-m", "cdpcore.cli.main", "serve", "--vault", vault, "--listen",
                              "127.0.0.1:0", "--cert", os.path.join(pki, "server.pem"), "--key",
                              os.path.join(pki, "server.key"), "--ca", ca],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert serve.stderr is not None
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", serve.stderr.readline())
    if m is None:
        serve.kill()
        raise SystemExit("demo: cdpctl serve did not start")
    print(f"$ cdpctl serve --vault {vault} --listen 127.0.0.1:{m.group(1)} ...   (the DR site)")
    proxy = _Proxy(int(m.group(1)))
    ship_cmd = ["ship", jpath, "--to", f"127.0.0.1:{proxy.port}", "--cert", crt, "--key", key, "--ca", ca,
                "--follow", "--quiet"]
    print(f"$ cdpctl {' '.join(shlex.quote(a) for a in ship_cmd)}   (through the {WAN} emulator)")
    ship = subprocess.Popen([sys.executable, "-m", "cdpcore.cli.main", *ship_cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        end = _journal_end(jpath)
        while int(_state(jpath).get("acked_seq") or 0) < end:
            if ship.poll() is not None:
                raise SystemExit(f"demo: cdpctl ship exited: {ship.stderr.read() if ship.stderr else ''}")
            time.sleep(0.1)
        st = _state(jpath)
        print(f"initial sync: journal up to seq {end} acknowledged by the DR site in "
              f"{time.monotonic() - start:.1f} s: {st.get('raw_bytes', 0) / 1e6:.1f} MB of journal as "
              f"{st.get('wire_bytes', 0) / 1e6:.1f} MB on the wire")
        # The hospital keeps working while the sender follows the journal.
        worst = 0.0
        his = subprocess.Popen([sys.executable, "-m", "cdpcore.cli.main", "protect", jpath, "--",
                                sys.executable, app, root, "afternoon", str(max(50, args.transactions // 10)),
                                "0", str(args.patients)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while his.poll() is None:
            worst = max(worst, float(_state(jpath).get("lag_seconds") or 0))
            time.sleep(0.1)
        end = _journal_end(jpath)
        while int(_state(jpath).get("acked_seq") or 0) < end:
            worst = max(worst, float(_state(jpath).get("lag_seconds") or 0))
            time.sleep(0.1)
        print(f"afternoon shift under capture while shipping: replication lag (RPO) at most {worst:.1f} s, "
              f"now 0 (all of seq ..{end} acknowledged)")
        cdpctl("status", jpath, show=12)
    finally:
        ship.terminate()
        ship.wait(30)
        proxy.close()
        serve.terminate()
        serve.wait(30)
    # The DR site restores the suggested point from its replica.
    local, remote = os.path.join(work, "restore-local"), os.path.join(work, "restore-dr")
    cdpctl("restore", jpath, local, "--at", point, show=None)
    cdpctl("restore", os.path.join(vault, "hospital"), remote, "--at", point, show=3)
    same = tree_digest(local) == tree_digest(remote)
    print(f"DR restore identical to the local restore of {point}: {'yes' if same else 'NO'} "
          f"({len(tree_digest(remote))} files)")
    return same


if __name__ == "__main__":
    sys.exit(main())

"""Restore benchmarks (issue 3, item 9): a 1 GiB protected file with a
million random 4 KiB write records, restored at a point near the end, next
to `cp --sparse=never` of a 1 GiB file on the same disk; and restore time
against the number of records before the point.

The journal is _bench.build_write_journal's (shared with the timeline
suite): random 4 KiB text-like writes over a 1 GiB file, a FLUSH of all
files every 64 writes, 64 MiB segments. Built once, deleted at the end.
Like every suite here, baseline and candidate run alternately (ABAB, order
flipped every other pair) and the figure is the median per-pair ratio.
Nothing asserts on a time.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import _bench
from _bench import MB, median, timed

from cdpcore import Journal, checkpoint, restore
from cdpcore.rollback import rollback

RESTORE_RECORDS = int(os.environ.get("CDP_BENCH_RESTORE_RECORDS", "1000000"))
RESTORE_TARGET = 1.5  # restore / cp --sparse=never
ROLLBACK_TARGET = 0.05  # rollback after 1 % changed / full restore


def _fresh(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def restore_once(journal: str, dest: str, at: str, method: str = "plan", sync: bool = False) -> tuple[float, float]:
    """(wall, CPU) of one restore into a fresh directory, journal opened
    inside the timing (as cdpctl does); with sync, `cdpctl restore --sync`
    (everything written is on disk when it returns)."""
    _fresh(dest)

    def run() -> None:
        with Journal.open(journal, readonly=True) as j:
            restore(j, dest, at=at, method=method, sync=sync)  # type: ignore[arg-type]

    try:
        return timed(run)
    finally:
        _fresh(dest)


def cp_once(src: str, dst: str) -> tuple[float, float]:
    """(wall, CPU of this process: ~0, cp is a child) of cp --sparse=never."""
    try:
        return timed(lambda: subprocess.run(["cp", "--sparse=never", src, dst], check=True))
    finally:
        if os.path.exists(dst):
            os.unlink(dst)


def restore_measure(path: str, writes: int, rounds: int = 5, fractions: tuple[float, ...] = (0.25, 0.5, 1.0),
                    log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    work = os.path.dirname(path)
    dest = os.path.join(work, "restored")
    with Journal.open(path, readonly=True) as j:
        last = j.last_seq
    at = f"seq:{last - 100}"  # near the end
    # The baseline's source: the restored 1 GiB file itself, on the same disk.
    with Journal.open(path, readonly=True) as j:
        restore(j, dest, at=at)
    src = os.path.join(work, "cp-source.bin")
    os.rename(os.path.join(dest, "his.db"), src)
    _fresh(dest)
    size = os.path.getsize(src)
    pairs: list[dict[str, float]] = []
    try:
        for r in range(rounds):
            pair: dict[str, tuple[float, float]] = {}
            for side in (("cp", "restore") if r % 2 == 0 else ("restore", "cp")):
                pair[side] = cp_once(src, os.path.join(work, "cp-dest.bin")) if side == "cp" \
                    else restore_once(path, dest, at)
            pairs.append({"cp_s": pair["cp"][0], "restore_s": pair["restore"][0],
                          "restore_cpu_s": pair["restore"][1]})
            log(f"restore vs cp: round {r + 1}/{rounds}: {pair['restore'][0]:.2f} s / {pair['cp'][0]:.2f} s")
    finally:
        os.unlink(src)
    ratios = [p["restore_s"] / p["cp_s"] for p in pairs]
    main = {"at": at, "file_bytes": size, "rounds": rounds,
            "cp_s": median([p["cp_s"] for p in pairs]), "restore_s": median([p["restore_s"] for p in pairs]),
            "restore_cpu_s": median([p["restore_cpu_s"] for p in pairs]),
            "ratio": median(ratios), "ratios": [round(x, 3) for x in ratios],
            "target": RESTORE_TARGET, "pass": median(ratios) <= RESTORE_TARGET}
    # Restore time against the records before the point (the same journal,
    # cut at a quarter, half and all of its writes: a restore reads nothing
    # past its point).
    series = []
    per_write = (last - 1) / writes  # records per write (flushes included)
    for f in fractions:
        seq = max(1, int(writes * f * per_write)) if f < 1 else last - 100
        times = [restore_once(path, dest, f"seq:{seq}")[0] for _ in range(3)]
        series.append({"records": seq, "restore_s": median(times), "all_s": [round(x, 3) for x in times]})
        log(f"restore at seq {seq}: {median(times):.2f} s")
    # Context: the reference replay on the smallest point (it writes every
    # record's bytes; too slow to run on the whole journal every time).
    seq = series[0]["records"]
    replay = restore_once(path, dest, f"seq:{seq}", method="replay")[0]
    return {"main": main, "series": series, "replay": {"records": seq, "replay_s": replay,
                                                       "plan_s": series[0]["restore_s"]}}


def _names(d: str) -> set[str]:
    try:
        return set(os.listdir(d))
    except FileNotFoundError:
        return set()


class Snapshot:
    """The journal's files that a rollback and its roll forward change, kept
    aside to put back: every other file is only ever added to."""

    SMALL = ("head", "journal.json", "audit.log")

    def __init__(self, path: str, keep: str):
        self.path, self.keep = path, keep
        os.makedirs(keep)
        self.segments = _names(os.path.join(path, "segments"))
        self.checkpoints = _names(os.path.join(path, "checkpoints"))  # none until a checkpoint is made
        self.last = max(s for s in self.segments if s.endswith(".seg"))
        for name in self.SMALL:
            shutil.copy2(os.path.join(path, name), keep)
        shutil.copy2(os.path.join(path, "segments", self.last), keep)

    def restore(self) -> None:
        for sub, known in (("segments", self.segments), ("checkpoints", self.checkpoints)):
            for name in _names(os.path.join(self.path, sub)) - known:
                os.unlink(os.path.join(self.path, sub, name))
        shutil.copyfile(os.path.join(self.keep, self.last), os.path.join(self.path, "segments", self.last))
        for name in self.SMALL:
            shutil.copyfile(os.path.join(self.keep, name), os.path.join(self.path, name))
        if os.path.exists(os.path.join(self.path, "rollback.json")):
            raise SystemExit("a rollback left its intent: see its error above")


def rollback_measure(path: str, rounds: int = 3, changed: float = 0.01,
                     log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Rollback of the live 1 GiB file to a point after which `changed` of
    it was rewritten, next to a full restore of the latest point: (a) a
    durable one (`restore --sync`: the restored file fsynced, as an operator
    needs before starting a database on it; a rollback is durable when it
    returns) and (b) the plain one (the result in the page cache). The
    root is made live by restoring the latest point into it and syncing;
    each round runs the three in a rotated order, each after the one
    before was synced (none runs under another's writeback); the
    rollback (timed)
    is followed by a roll forward to where it was (untimed, then synced),
    both journaled, so every round starts from the same live tree on disk;
    then the journal's files are put back as they were (Snapshot), so
    every round's rollback sees the journal the target describes: 1 %
    changed after the point. (Until session 6 they were not: round k had
    2 x k % more records after the point, each round's rollback and roll
    forward, and its rollback read and checked them all.)"""
    with Journal.open(path) as j:
        root, last = j.root, j.last_seq
        shutil.rmtree(root)
        restore(j, root)
        os.sync()  # a live root is on disk; the rollback's fsyncs cover only its own writes
        file_size = os.path.getsize(os.path.join(root, "his.db"))
        # a 4 KiB write per record (65 records per 64 writes, with the flushes)
        back = int(file_size * changed / 4096 * 65 / 64)
        to = f"seq:{last - back}"
    dest = os.path.join(os.path.dirname(path), "restored")
    snap = Snapshot(path, os.path.join(os.path.dirname(path), "snapshot"))
    rows = []
    sides = ["restore", "durable", "rollback"]
    for r in range(rounds):
        pair: dict[str, float] = {}
        for side in sides[r % 3:] + sides[: r % 3]:
            if side == "restore":
                pair["restore"] = restore_once(path, dest, "latest")[0]
                # (untimed) its 1 GiB left dirty would otherwise be written
                # back under whatever runs next: until session 7, the
                # rollback of every third round
                os.sync()
            elif side == "durable":
                pair["durable"] = restore_once(path, dest, "latest", sync=True)[0]
                os.sync()  # (nothing of it is left to write back: the next run starts alike)
            else:
                with Journal.open(path) as j:
                    forward = f"seq:{j.last_seq}"
                    t0 = time.perf_counter()
                    res = rollback(j, to)
                    pair["rollback"] = time.perf_counter() - t0
                    rollback(j, forward)  # back to the damaged state for the next round
                    os.sync()
                snap.restore()
                pair["bytes"] = res.bytes_written
        rows.append(pair)
        log(f"rollback vs restore: round {r + 1}/{rounds}: {pair['rollback']:.3f} s / durable "
            f"{pair['durable']:.2f} s / plain {pair['restore']:.2f} s")
    ratios = [p["rollback"] / p["restore"] for p in rows]
    durable = [p["rollback"] / p["durable"] for p in rows]
    return {"to": to, "records_after": back, "bytes_written": rows[-1]["bytes"], "rounds": rounds,
            "rollback_s": median([p["rollback"] for p in rows]),
            "restore_s": median([p["restore"] for p in rows]),
            "durable_s": median([p["durable"] for p in rows]),
            "ratio": median(ratios), "ratios": [round(x, 3) for x in ratios],
            "durable_ratio": median(durable), "durable_ratios": [round(x, 3) for x in durable],
            "all_s": [{k: round(v, 4) for k, v in p.items()} for p in rows],
            "target": ROLLBACK_TARGET, "pass": median(ratios) <= ROLLBACK_TARGET,
            "durable_pass": median(durable) <= ROLLBACK_TARGET}


def plot(res: dict[str, Any], out_png: str) -> str | None:
    """Restore time against records, as a PNG, when matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [p["records"] for p in res["series"]]
    ys = [p["restore_s"] for p in res["series"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "o-", label="cdpcore restore (plan + copy)")
    ax.axhline(res["main"]["cp_s"], color="gray", ls="--", label="cp --sparse=never, 1 GiB")
    ax.axhline(res["main"]["cp_s"] * RESTORE_TARGET, color="red", ls=":", label="target: 1.5 x cp")
    ax.set_xlabel("records before the point")
    ax.set_ylabel("seconds (median of 3)")
    ax.set_title("Restore of a 1 GiB file of random 4 KiB writes")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def make_checkpoints(path: str) -> dict[str, Any]:
    """`cdpctl checkpoint` on the built journal, as its maintenance would
    (capture runs it when it stops; an operator from cron): timed, sized."""
    with Journal.open(path) as j:
        t0 = time.perf_counter()
        res = checkpoint.update(j)
        return {"checkpoint_s": time.perf_counter() - t0, "checkpoints": len(res.kept),
                "checkpoint_bytes": res.bytes}


def without_checkpoints(path: str, at: str, rounds: int = 3) -> float:
    """Median restore time with the checkpoints moved aside (a journal that
    no maintenance ran on: every record is read)."""
    d = os.path.join(path, checkpoint.DIR)
    os.rename(d, d + ".aside")
    try:
        return median([restore_once(path, os.path.join(os.path.dirname(path), "restored"), at)[0]
                       for _ in range(rounds)])
    finally:
        os.rename(d + ".aside", d)


def restore_suite(records: int = RESTORE_RECORDS, rounds: int = 5,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    work = _bench.scratch("restore")
    try:
        built = _bench.build_write_journal(work, records, log=log)
        log(f"restore: journal of {built['records']:,} records, {built['bytes'] / MB:.0f} MB")
        built.update(make_checkpoints(built["path"]))
        log(f"restore: {built['checkpoints']} checkpoints, {built['checkpoint_bytes'] / MB:.0f} MB, "
            f"{built['checkpoint_s']:.1f} s")
        res = restore_measure(built["path"], built["writes"], rounds, log=log)
        res["cold_s"] = without_checkpoints(built["path"], res["main"]["at"])
        log(f"restore without checkpoints: {res['cold_s']:.2f} s")
        res["rollback"] = rollback_measure(built["path"], rounds=7, log=log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    built.pop("path")
    return {**built, **res}


def render(r: dict[str, Any], png: str | None) -> list[str]:
    m = r["main"]
    out = [f"## Restore of a 1 GiB file from {r['writes']:,} random 4 KiB writes "
           f"(target: <= {m['target']} x cp --sparse=never)\n",
           (f"Journal: {r['records']:,} records ({r['writes']:,} writes, a FLUSH every 64), "
            f"{r['bytes'] / MB:.0f} MB of 64 MiB segments, built in {r['build_s']:.0f} s, in the page "
            f"cache; `cdpctl checkpoint` then saved {r['checkpoints']} checkpoints "
            f"({r['checkpoint_bytes'] / MB:.0f} MB, {r['checkpoint_bytes'] / r['bytes']:.1%} of the journal) "
            f"in {r['checkpoint_s']:.1f} s. "
            f"Restore at {m['at']} (near the end) into a fresh directory, journal opened "
            f"inside the timing; baseline: `cp --sparse=never` of a {m['file_bytes'] / MB:.0f} MB "
            f"file on the same disk. {m['rounds']} ABAB pairs, ratio = median of per-pair "
            "restore / cp.\n"),
           "| what | cp s | restore s | restore CPU s | ratio | target |", "|---|---:|---:|---:|---:|---|",
           (f"| restore near the end | {m['cp_s']:.2f} | {m['restore_s']:.2f} | {m['restore_cpu_s']:.2f} | "
            f"**{m['ratio']:.2f}** | <= {m['target']} {'PASS' if m['pass'] else 'FAIL'} |"), "",
           f"Per-pair ratios: {', '.join(f'{x:.2f}' for x in m['ratios'])}. The same restore "
           f"with the checkpoints moved aside (every record read): {r['cold_s']:.2f} s "
           f"({r['cold_s'] / m['cp_s']:.2f} x the median cp).\n",
           "Restore time against the records before the point (median of 3):\n",
           "| records | restore s |", "|---:|---:|"]
    out += [f"| {p['records']:,} | {p['restore_s']:.2f} |" for p in r["series"]]
    rp = r["replay"]
    out += ["", (f"Context: the reference replay (`method=\"replay\"`, every record's bytes "
                 f"written in order) at {rp['records']:,} records took {rp['replay_s']:.1f} s, "
                 f"the planned restore {rp['plan_s']:.2f} s."), ""]
    if png:
        out += [f"![restore time against records]({os.path.basename(png)})", ""]
    rb = r["rollback"]
    out += [f"## Rollback after {rb['records_after']:,} writes (1 % of the file) "
            f"(target: <= {rb['target']:.0%} of a full restore)\n",
            (f"The live root holds the latest state (1 GiB); rollback to {rb['to']} rewrites "
             f"{rb['bytes_written'] / MB:.1f} MB and returns with it on disk (the root's file and "
             "the journal fsynced). Each of {rb['rounds']} rounds runs, in a rotated order, the "
             "rollback, a full restore of the latest point made durable (`restore --sync`: "
             "the restored 1 GiB fsynced) and a plain one (left in the page cache), each after the "
             "one before was synced (untimed); each round rolls forward again, untimed.\n")
            .replace("{rb['rounds']}", str(rb["rounds"])),
            "| compared with | rollback s | restore s | ratio (median of rounds) | target |",
            "|---|---:|---:|---:|---|",
            (f"| (a) durable restore (`--sync`) | {rb['rollback_s']:.3f} | {rb['durable_s']:.2f} | "
             f"**{rb['durable_ratio']:.3f}** | <= {rb['target']} {'PASS' if rb['durable_pass'] else 'FAIL'} |"),
            (f"| (b) plain restore | {rb['rollback_s']:.3f} | {rb['restore_s']:.2f} | "
             f"**{rb['ratio']:.3f}** | <= {rb['target']} {'PASS' if rb['pass'] else 'FAIL'} |"), "",
            (f"Per-round ratios: (a) {', '.join(f'{x:.3f}' for x in rb['durable_ratios'])}; "
             f"(b) {', '.join(f'{x:.3f}' for x in rb['ratios'])}."), ""]
    return out

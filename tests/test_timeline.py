"""Timeline: the ransomware-like burst is flagged and nothing else is; the
suggested point restores the content from before the attack; honest
workloads that look partly like an attack (one incompressible file, many
new compressed files, a folder reorganisation) are not flagged."""
from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import ENV, MODULE, Run, assert_error, cli, finish

from cdpcore import Journal, restore, timeline
from cdpcore.timeline import DefaultFreshUs, DefaultMinFiles

MIN = 60_000_000
VICTIMS_BASE, VICTIMS_NEW = 12, 6  # files in the base; files created through the journal


def now_minute() -> int:
    """The next whole minute: records stamped after the BASE record, which
    the writer stamps with the real clock."""
    return (time.time_ns() // 1000 // MIN + 1) * MIN


class Text:
    """Text-like, compressible bytes (zstd gets them to ~0.5)."""

    def __init__(self, seed: int):
        self.rnd = random.Random(seed)
        self.words = [bytes(self.rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(
            self.rnd.randint(2, 9))) for _ in range(400)]

    def __call__(self, n: int) -> bytes:
        out = b" ".join(self.rnd.choice(self.words) for _ in range(n // 3))
        return out[:n]


def normal_workload(j: Journal, t0: int, text: Text, minutes: int = 6) -> None:
    """A few files edited with text, a flush of all files every 10 writes."""
    for k in range(minutes * 10):
        ts = t0 + k * MIN // 10
        j.append_write(f"db/part{k % 3}.txt", (k // 3) * 4096, text(4096), ts=ts)
        if k % 10 == 9:
            j.append_flush(ts=ts + 1)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    top = tmp_path_factory.mktemp("attacked")
    root = top / "root"
    (root / "docs").mkdir(parents=True)
    text = Text(1)
    before: dict[str, bytes] = {}
    for i in range(VICTIMS_BASE):
        before[f"docs/report{i}.txt"] = text(9000)
        (root / f"docs/report{i}.txt").write_bytes(before[f"docs/report{i}.txt"])
    jpath = top / "journal"
    t0 = now_minute()
    with Journal.create(jpath, root) as j:
        for i in range(VICTIMS_NEW):  # created through the journal, long before the attack
            p = f"docs/note{i}.txt"
            before[p] = text(5000)
            j.append_create(p, ts=t0)
            j.append_write(p, 0, before[p], ts=t0)
        normal_workload(j, t0 + MIN, text)
        t_attack = t0 + 12 * MIN + MIN // 4
        assert t_attack - t0 > DefaultFreshUs
        # the ransomware: overwrite each file with ciphertext and rename it,
        # or write an encrypted copy and unlink the original
        for i, p in enumerate(sorted(before)):
            ts = t_attack + i * 1000
            size = len(before[p])
            if i % 3:
                j.append_write(p, 0, os.urandom(size), ts=ts)
                j.append_rename(p, p + ".locked", ts=ts + 1)
            else:
                j.append_create(p + ".locked", ts=ts)
                j.append_write(p + ".locked", 0, os.urandom(size), ts=ts + 1)
                j.append_unlink(p, ts=ts + 2)
        j.sync()
        attack_seq = j.resolve(t_attack - 1)
        parts = {f"db/part{k}.txt" for k in range(3)}
    return {"path": jpath, "before": before, "t_attack": t_attack, "attack_seq": attack_seq,
            "parts": parts, "top": top}


def test_burst_is_flagged_and_nothing_before(attacked: dict) -> None:
    t = timeline(attacked["path"], bucket="1m")
    flagged = t.flagged
    assert len(flagged) == 1
    b = flagged[0]
    assert b.start <= attacked["t_attack"] < b.start + MIN
    assert len(b.entropy_files) == len(b.damaged_files) == VICTIMS_BASE + VICTIMS_NEW
    assert b.renames + b.unlinks == VICTIMS_BASE + VICTIMS_NEW
    assert all(not x.flagged for x in t.buckets if x.start < b.start)
    assert sum(x.records for x in t.buckets) == t.until_seq
    # every bucket of the normal workload saw its writes judged compressible
    normal = [x for x in t.buckets if x.writes and not x.flagged]
    assert normal and all(x.sampled and x.incompressible == 0 for x in normal)


def test_suggested_point_restores_the_content_before_the_attack(attacked: dict,
                                                                 tmp_path: Path) -> None:
    t = timeline(attacked["path"], bucket="10s")
    s = t.suggestion
    assert s is not None and s.kind == "FLUSH"
    assert t.latest_before is not None and s.seq <= t.latest_before.seq == attacked["attack_seq"]
    with Journal.open(attacked["path"], readonly=True) as j:
        assert j.record(s.seq).kind.name == "FLUSH"
    restore(attacked["path"], tmp_path / "r", at=f"seq:{s.seq}")
    got = {str(p.relative_to(tmp_path / "r")): p.read_bytes()
           for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert {k: got.get(k) for k in attacked["before"]} == attacked["before"]
    assert not [k for k in got if k.endswith(".locked")]
    assert set(got) == set(attacked["before"]) | attacked["parts"]


def test_cli_matches_api(attacked: dict) -> None:
    api = timeline(attacked["path"], bucket="1m").to_json()
    r = cli("timeline", attacked["path"], "--json")  # 1m is the default
    assert r.code == 0 and r.doc == api
    human = cli("timeline", attacked["path"], "--bucket", "1m")
    assert human.code == 0 and human.err == ""
    s = api["suggestion"]
    assert f"suggested restore point: seq {s['seq']} ({s['time']})" in human.out
    flagged_lines = [ln for ln in human.out.splitlines() if "RANSOMWARE?" in ln]
    assert len(flagged_lines) == 1 and flagged_lines[0].startswith(api["flagged"][0])


def test_since_until(attacked: dict) -> None:
    t_attack = attacked["t_attack"]
    quiet = timeline(attacked["path"], bucket="1m", until=t_attack - 1)
    assert not quiet.flagged and quiet.until_seq == attacked["attack_seq"]
    after = timeline(attacked["path"], bucket="1m", since=f"seq:{attacked['attack_seq']}")
    assert len(after.flagged) == 1 and after.since_seq == attacked["attack_seq"]
    # the file model still knows, from the records before `since`, which files are old
    assert len(after.flagged[0].damaged_files) == VICTIMS_BASE + VICTIMS_NEW
    r = cli("timeline", attacked["path"], "--until", str(t_attack - 1), "--json")
    assert r.code == 0 and r.doc["flagged"] == [] and r.doc["suggestion"] is None
    assert "no interval looks like ransomware" in cli("timeline", attacked["path"], "--until",
                                                      str(t_attack - 1)).out


def build_honest(jpath: Path, root: Path, kind: str) -> None:
    text = Text(2)
    for i in range(DefaultMinFiles * 3):
        (root / f"old{i}.txt").write_bytes(text(6000))
    (root / "backup.zst").write_bytes(text(6000))
    t0 = now_minute()
    with Journal.create(jpath, root) as j:
        normal_workload(j, t0, text, minutes=2)
        t = t0 + 20 * MIN
        if kind == "one-file":
            # a compressed backup overwriting an old file: 2 MiB of incompressible data
            with j.batch() as b:
                for k in range(512):
                    b.append_write("backup.zst", k * 4096, os.urandom(4096), ts=t + k)
        elif kind == "new-files":
            # a PACS writer: many new compressed images, each written to a
            # temporary name and renamed into place
            for i in range(DefaultMinFiles * 3):
                j.append_create(f"tmp/img{i}", ts=t + 10 * i)
                j.append_write(f"tmp/img{i}", 0, os.urandom(20000), ts=t + 10 * i + 1)
                j.append_rename(f"tmp/img{i}", f"pacs/img{i}.dcm", ts=t + 10 * i + 2)
        elif kind == "reorganise":
            # many old files renamed, and one incompressible file written
            for i in range(DefaultMinFiles * 3):
                j.append_rename(f"old{i}.txt", f"archive/old{i}.txt", ts=t + i)
            j.append_write("backup.zst", 0, os.urandom(65536), ts=t + 100)


@pytest.mark.parametrize("kind", ["one-file", "new-files", "reorganise"])
def test_honest_workloads_are_not_flagged(journal_dirs, kind: str) -> None:
    jpath, root = journal_dirs
    build_honest(jpath, root, kind)
    t = timeline(jpath, bucket="1m")
    busiest = max(t.buckets, key=lambda b: b.bytes_written)
    assert busiest.start >= t.buckets[-1].start  # the honest burst is the newest interval
    if kind != "reorganise":
        assert busiest.incompressible > 0  # it did see incompressible data
    assert t.flagged == [] and t.suggestion is None
    r = cli("timeline", jpath, "--json")
    assert r.code == 0 and r.doc["flagged"] == []


@pytest.mark.parametrize("bucket,width", [("1s", 10**6), ("10s", 10**7), ("1m", 6 * 10**7),
                                          ("1h", 36 * 10**8), ("2d", 2 * 864 * 10**8)])
def test_bucket_widths(attacked: dict, bucket: str, width: int) -> None:
    r = cli("timeline", attacked["path"], "--bucket", bucket, "--json")
    assert r.code == 0 and r.doc["bucket_us"] == width
    assert all(b["start"] % width == 0 for b in r.doc["buckets"])


@pytest.mark.parametrize("bad", ["", "0s", "1", "1.5m", "10 s", "1w", "m", "-1s", "1000000s"])
def test_bad_bucket_is_a_usage_error(attacked: dict, bad: str) -> None:
    assert_error(("timeline", attacked["path"], "--bucket", bad), 2, "UsageError", "bucket")
    with pytest.raises(ValueError, match="invalid bucket"):
        timeline(attacked["path"], bucket=bad)


def test_other_errors(attacked: dict, tmp_path: Path) -> None:
    assert_error(("timeline", tmp_path / "nope"), 3, "JournalNotFound")
    assert_error(("timeline", attacked["path"], "--since", "yesterday"), 6, "PointError")


def test_png(attacked: dict, tmp_path: Path) -> None:
    import matplotlib.image

    png = tmp_path / "t.png"
    r = cli("timeline", attacked["path"], "--png", png, "--json")
    assert r.code == 0 and r.doc["png"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    pixels = matplotlib.image.imread(png)  # parses the whole file
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100


def cli_env(env: dict[str, str], *args: object) -> Run:
    return finish(subprocess.Popen([*MODULE, *map(str, args)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**ENV, **env}))


def test_png_without_matplotlib(attacked: dict, tmp_path: Path) -> None:
    """An environment where importing matplotlib fails, as without the extra."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {"PYTHONPATH": str(tmp_path / "shadow") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for extra in ([], ["--json"]):
        r = cli_env(env, "timeline", attacked["path"], "--png", tmp_path / "t.png", *extra)
        assert r.code == 12
        assert r.err.strip().splitlines() == [
            "cdpctl: error: --png needs matplotlib: pip install 'cdpcore[plot]'"]
        if extra:
            assert r.doc["error"]["type"] == "PlotUnavailable"
        else:
            assert r.out == ""
    assert not (tmp_path / "t.png").exists()

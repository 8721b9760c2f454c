"""The README's main job keeps working: ransomware is found on the timeline
and rolled back, and the journal replicated to a DR site that restores the
same point, through the real cdpctl commands."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_rolls_back_the_attack(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "cdpcore.demo", "--dir", str(tmp_path / "demo"),
                        "--transactions", "300", "--images", "20"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RANSOMWARE?" in r.stdout
    assert "live tree identical to the moment before the attack: yes" in r.stdout
    assert "DR restore identical to the local restore of" in r.stdout and ": yes (" in r.stdout.split("DR restore")[1]
    assert "replication lag (RPO) at most" in r.stdout
    assert "Traceback" not in r.stderr


def test_demo_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    r = subprocess.run([sys.executable, "-m", "cdpcore.demo", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not empty" in r.stderr

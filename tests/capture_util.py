"""Helpers shared by the capture tests: run a program under protect, restore
and compare trees byte for byte."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import cdpcore
from cdpcore import Journal

HERE = Path(__file__).resolve().parent


def make_journal(base: Path, base_copy: bool = False) -> tuple[Path, Path]:
    root, jpath = base / "root", base / "journal"
    root.mkdir(exist_ok=True)
    Journal.create(jpath, root, base=base_copy).close()
    return jpath, root


def run(jpath: Path, argv: list[str], cwd: Path, resync: bool = True, baseline: bool = True,
        check: bool = True, **kw: object) -> cdpcore.ProtectResult:
    res = cdpcore.protect(jpath, argv, cwd=cwd, resync=resync, baseline=baseline, **kw).wait()
    if check:
        assert res.returncode == 0, f"{argv} exited {res.returncode}"
    return res


def tree(top: Path, skip: frozenset[str] = frozenset()) -> dict[str, tuple[object, ...]]:
    """path -> (type, content or target, mode) for everything under top."""
    out: dict[str, tuple[object, ...]] = {}
    for d, dirs, files in os.walk(top):
        for name in dirs + files:
            full = os.path.join(d, name)
            rel = os.path.relpath(full, top)
            if rel in skip:
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", st.st_size, f.read(), stat.S_IMODE(st.st_mode))
    return out


def assert_same_tree(a: Path, b: Path, skip: frozenset[str] = frozenset()) -> None:
    ta, tb = tree(a, skip), tree(b, skip)
    assert sorted(ta) == sorted(tb), f"names differ: only live {sorted(set(ta) - set(tb))}, " \
                                     f"only restored {sorted(set(tb) - set(ta))}"
    for rel in ta:
        assert ta[rel] == tb[rel], f"{rel} differs"


def restore_to(jpath: Path, dest: Path, at: str = "latest") -> cdpcore.RestoreResult:
    return cdpcore.restore(jpath, dest, at=at, audit=False)


def cc(src: str, out: Path, *flags: str) -> Path:
    subprocess.run(["gcc", "-O1", "-Wall", "-o", str(out), str(HERE / "c" / src), *flags, "-lpthread"],
                   check=True)
    return out

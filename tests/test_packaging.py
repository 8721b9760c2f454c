"""Packaging: the sdist and the wheel build, the wheel carries the extension
and the preload library, installs into a fresh virtual environment and
works there; and a wheel builds from the sdist alone.

Slow (a build and a venv with dependencies from the package index): it runs
in the thorough profile (CI) and is skipped in the fast one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import THOROUGH

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not THOROUGH, reason="packaging builds run in the thorough profile (CI)"),
]

SMOKE = r"""
import ctypes, os, sys, tempfile
import cdpcore
from cdpcore import Journal, Kind
here = os.path.dirname(cdpcore.__file__)
assert here.startswith(sys.prefix), (here, sys.prefix)
lib = ctypes.CDLL(os.path.join(here, "libcdpcapture.so"))
assert lib.cdp_preload_abi_version() == 1
with tempfile.TemporaryDirectory() as d:
    root = os.path.join(d, "root"); os.mkdir(root)
    with Journal.create(os.path.join(d, "j"), root, segment_size=4096) as j:
        seq = j.append_write("f", 0, b"packaged")
        j.sync()
    with Journal.open(os.path.join(d, "j"), readonly=True) as j:
        r = j.record(seq)
        assert r.kind == Kind.WRITE and r.data == b"packaged" and r.path == "f"
        assert j.verify().ok
print("SMOKE OK", cdpcore.__version__)
"""


def run(*cmd: str | Path, cwd: Path | None = None, env: dict | None = None) -> str:
    p = subprocess.run([str(c) for c in cmd], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_TARGET", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> Path:
    """A python with `build` (not a test dependency of the project), in a
    virtual environment of its own."""
    venv = tmp_path_factory.mktemp("tools") / "venv"
    run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    run(py, "-m", "pip", "install", "-q", "build", env=clean_env())
    return py


@pytest.fixture(scope="module")
def dists(tmp_path_factory, tools):
    out = tmp_path_factory.mktemp("dist")
    run(tools, "-m", "build", "--sdist", "--wheel", "--outdir", out, REPO, cwd=out, env=clean_env())
    wheels = list(out.glob("cdpcore-*.whl"))
    sdists = list(out.glob("cdpcore-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    return wheels[0], sdists[0], tmp_path_factory.mktemp("work")


def wheel_names(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as z:
        return set(z.namelist())


def test_wheel_contents(dists):
    whl, sdist, _ = dists
    names = wheel_names(whl)
    assert "cdpcore/libcdpcapture.so" in names
    assert any(n.startswith("cdpcore/_cdp") and n.endswith(".so") for n in names)
    assert {"cdpcore/__init__.py", "cdpcore/journal.py", "cdpcore/py.typed"} <= names
    assert not any(n.endswith((".c", ".h")) for n in names)
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    for need in ("native/cdp.h", "native/writer.c", "native/record.c", "native/crc32c.c",
                 "native/build_cdp.py", "native/preload/preload.c", "setup.py", "pyproject.toml"):
        assert need in members, need


def test_wheel_installs_into_a_fresh_venv(dists):
    whl, _sdist, work = dists
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    run(py, "-m", "pip", "install", "-q", whl, env=clean_env())
    out = run(py, "-c", SMOKE, cwd=work, env=clean_env())
    assert "SMOKE OK" in out
    assert (venv / "bin" / "cdpctl").exists()


def test_sdist_builds_a_wheel(dists, tools):
    _whl, sdist, work = dists
    out = work / "from-sdist"
    run(tools, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, sdist, cwd=work, env=clean_env())
    built = list(out.glob("cdpcore-*.whl"))
    assert len(built) == 1
    names = wheel_names(built[0])
    assert "cdpcore/libcdpcapture.so" in names
    assert any(n.startswith("cdpcore/_cdp") and n.endswith(".so") for n in names)

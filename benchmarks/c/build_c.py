"""Build the C benchmark programs into a directory (a temp dir at run time;
binaries are never committed).

    python benchmarks/c/build_c.py OUTDIR

compiles each benchmarks/c/*.c with the writer sources, as
gcc -O2 -std=gnu11 -Inative native/*.c benchmarks/c/NAME.c -o OUTDIR/NAME -lpthread
and prints the command lines used.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
NATIVE = REPO / "native"
PROGRAMS = ("bench_append", "fill_journal")
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra"]


def command(name: str, outdir: str) -> list[str]:
    cc = os.environ.get("CC", "gcc")
    sources = sorted(str(p) for p in NATIVE.glob("*.c"))
    return [cc, *CFLAGS, f"-I{NATIVE}", *sources, str(HERE / f"{name}.c"),
            "-o", os.path.join(outdir, name), "-lpthread"]


def build(outdir: str) -> dict[str, str]:
    """Compile every program into outdir; returns {name: path}. Raises
    CalledProcessError with the compiler's output on failure."""
    os.makedirs(outdir, exist_ok=True)
    out = {}
    for name in PROGRAMS:
        cmd = command(name, outdir)
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[name] = os.path.join(outdir, name)
    return out


def describe(outdir: str = "OUT") -> list[str]:
    """The command lines, with paths relative to the repository."""
    lines = []
    for name in PROGRAMS:
        cmd = command(name, outdir)
        lines.append(shlex.join(c.replace(str(REPO) + os.sep, "") for c in cmd))
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_c.py OUTDIR")
    for line in describe(sys.argv[1]):
        print(line)
    build(sys.argv[1])

"""cffi builder for cdpcore._cdp (API mode, out of line).

It only globs: declarations come from native/cdp.h (preprocessor lines are
dropped for cdef), sources are every native/*.c. Policy stays in Python.
"""
from __future__ import annotations

import pathlib

from cffi import FFI

NATIVE = pathlib.Path(__file__).resolve().parent
HEADER = NATIVE / "cdp.h"
SOURCES = sorted(str(p.relative_to(NATIVE.parent)) for p in NATIVE.glob("*.c"))
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"]


def cdef_text() -> str:
    return "\n".join(
        line for line in HEADER.read_text().splitlines() if not line.lstrip().startswith("#")
    )


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "cdpcore._cdp",
    '#include "cdp.h"',
    sources=SOURCES,
    include_dirs=[str(NATIVE.relative_to(NATIVE.parent))],
    extra_compile_args=CFLAGS,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

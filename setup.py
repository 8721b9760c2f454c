"""Build glue: the cffi extension cdpcore._cdp, plus the plain shared library
libcdpcapture.so (not a Python extension) that capture preloads into programs.
Metadata lives in pyproject.toml."""
from __future__ import annotations

import os
import pathlib

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = pathlib.Path(__file__).resolve().parent
NATIVE = "native"


class BuildWithPreload(build_ext):
    """build_ext that also links native/preload/*.c with the writer sources
    into cdpcore/libcdpcapture.so."""

    def run(self) -> None:
        super().run()
        self.build_preload()

    def build_preload(self) -> None:
        sources = sorted(str(p.relative_to(HERE)) for p in (HERE / NATIVE).glob("*.c"))
        sources += sorted(str(p.relative_to(HERE)) for p in (HERE / NATIVE / "preload").glob("*.c"))
        objects = self.compiler.compile(
            sources,
            output_dir=self.build_temp,
            include_dirs=[NATIVE],
            extra_postargs=["-O2", "-std=gnu11", "-fPIC", "-fvisibility=hidden", "-Wall"],
        )
        out_dir = pathlib.Path(self.build_lib) / "cdpcore"
        if self.inplace:
            out_dir = HERE / "src" / "cdpcore"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.compiler.link_shared_object(
            objects,
            str(out_dir / "libcdpcapture.so"),
            libraries=["pthread"],
            extra_postargs=["-Wl,--no-undefined"],
        )

    def get_outputs(self) -> list[str]:
        outs = super().get_outputs()
        outs.append(os.path.join(self.build_lib, "cdpcore", "libcdpcapture.so"))
        return outs


setup(
    cffi_modules=["native/build_cdp.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithPreload},
)

"""Shared test settings.

Hypothesis profiles are chosen by the environment variable CDP_TEST_PROFILE:
"fast" (the default on a developer's machine: few examples, no deadline) or
"thorough" (the default when CI=true: many more examples, bigger parameters).
Tests marked `slow` run in both profiles; they read `scale(fast, thorough)`
to pick their size, so the default run stays quick and CI digs deeper.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PROFILE = os.environ.get("CDP_TEST_PROFILE") or ("thorough" if _ci else "fast")
if PROFILE not in ("fast", "thorough"):
    raise pytest.UsageError(f"CDP_TEST_PROFILE must be 'fast' or 'thorough', not {PROFILE!r}")
THOROUGH = PROFILE == "thorough"

_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("fast", max_examples=12, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(PROFILE)

# Let test modules `from conftest import scale, THOROUGH` whatever the import mode.
sys.modules.setdefault("conftest", sys.modules[__name__])


def scale(fast: int, thorough: int) -> int:
    """A size for a test: small in the fast profile, large in the thorough one."""
    return thorough if THOROUGH else fast


def pytest_report_header(config: pytest.Config) -> str:
    return f"cdpcore test profile: {PROFILE} (CDP_TEST_PROFILE=fast|thorough)"


# fsync costs milliseconds on these machines' disks and microseconds on tmpfs;
# tests that create hundreds of journals put them in memory where they can.
_SHM = "/dev/shm"
SCRATCH = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None


def scratch() -> tempfile.TemporaryDirectory:
    """A temporary directory, on tmpfs when there is one (for hypothesis
    tests, which cannot use the function-scoped tmp_path fixture)."""
    return tempfile.TemporaryDirectory(prefix="cdptest-", dir=SCRATCH)


@pytest.fixture
def fast_tmp():
    with scratch() as d:
        yield Path(d)


@pytest.fixture
def journal_dirs(fast_tmp):
    """(journal path, protected root): an empty root and a path for the journal."""
    root = fast_tmp / "root"
    root.mkdir()
    return fast_tmp / "journal", root

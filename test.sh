#!/usr/bin/env bash
# The whole test suite: set up (a private virtualenv with cdpcore and its test
# dependencies built from this checkout) and run pytest. Extra arguments go
# to pytest. CDP_TEST_PROFILE=thorough (the default when CI=true) runs the
# slow tests with full parameters.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
exec "$VENV/bin/python" -m pytest "$@"

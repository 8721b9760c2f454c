#!/usr/bin/env bash
# The main job: set up (a private virtualenv with cdpcore built from this
# checkout) and run the demo. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
exec "$VENV/bin/python" -m cdpcore.demo "$@"

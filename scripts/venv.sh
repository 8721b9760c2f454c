# Sourced by demo.sh and test.sh: make .venv (Python >= 3.11) and install
# cdpcore with its test extra into it, rebuilding the C layer when sources
# changed. Needs python3, gcc and the Python headers; nothing else.
VENV="${CDP_VENV:-$PWD/.venv}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "cdpcore needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
log="$VENV.install.log"
quiet() { "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "set-up failed: $*" >&2; exit 1; }; }
if [ ! -x "$VENV/bin/python" ]; then
    quiet "$PY" -m venv "$VENV"
    quiet "$VENV/bin/python" -m pip install --upgrade pip
fi
stamp="$VENV/.cdpcore-installed"
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py native src -newer "$stamp" \( -name '*.c' -o -name '*.h' -o -name '*.toml' -o -name 'setup.py' -o -name 'build_cdp.py' \) 2>/dev/null | head -1)" ]; then
    echo "setting up $VENV (pip install -e '.[test]') ..." >&2
    quiet "$VENV/bin/python" -m pip install -e '.[test]'
    touch "$stamp"
fi

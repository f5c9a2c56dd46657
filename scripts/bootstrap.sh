#!/usr/bin/env bash
# Makes the private virtualenv .venv and installs Tessera into it (editable, with both daemons' extras and the
# test extra: '.[all,test]'), as scripts/test.sh and scripts/demo.sh need it. Quick when nothing changed: the
# install is skipped while the venv was made from the same pyproject.toml (a stamp in it records its hash).
# --force reinstalls. PYTHON picks the interpreter and VENV the directory (scripts/test-pythons.sh makes one
# per CPython version with them).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bootstrap: Tessera needs Python 3.11 or newer as $PYTHON (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian and Ubuntu ship venv separately.
        rm -rf "$VENV"
        version="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
            echo "bootstrap: installing python${version}-venv"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${version}-venv" >/dev/null \
                || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${version}-venv" >/dev/null; }
            "$PYTHON" -m venv "$VENV"
        else
            echo "bootstrap: '$PYTHON -m venv' failed; install the venv module (Debian: apt-get install python${version}-venv)" >&2
            exit 1
        fi
    fi
fi

stamp="$VENV/.tessera-installed"
want="$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), sys.version)')"
if [ "${1:-}" = "--force" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing Tessera and its dependencies into $VENV (log: $VENV/bootstrap.log)"
    # Build warnings would bury the demo's first lines: the log keeps them, and is shown when pip fails.
    if ! { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip \
           && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[all,test]'; } \
           >"$VENV/bootstrap.log" 2>&1; then
        cat "$VENV/bootstrap.log" >&2
        echo "bootstrap: pip install failed (see above)" >&2
        exit 1
    fi
    printf '%s\n' "$want" > "$stamp"
fi

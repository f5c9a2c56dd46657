#!/usr/bin/env bash
# The one command that sets everything up on a fresh machine and runs the whole test suite:
# a private virtualenv in .venv, the package with its test extra, then ruff, mypy and pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k spiffeid -x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/system-deps.sh

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy -p tessera
echo "== pytest"
exec .venv/bin/python -m pytest "$@"

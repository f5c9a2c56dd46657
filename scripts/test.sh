#!/usr/bin/env bash
# The one command that sets everything up on a fresh machine and runs the whole test suite:
# a private virtualenv in .venv, the package with its test extra, then ruff, mypy and pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k spiffeid -x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/system-deps.sh

scripts/bootstrap.sh

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy -p tessera
echo "== pytest"
exec .venv/bin/python -m pytest "$@"

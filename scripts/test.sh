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
# Most end-to-end tests wait on real rotations rather than burn CPU, so three workers finish the suite in
# about half the time even on two cores; a test file stays on one worker (its module fixtures are shared).
# TESSERA_TEST_WORKERS=0 runs everything in one process.
exec .venv/bin/python -m pytest -n "${TESSERA_TEST_WORKERS:-3}" --dist loadfile "$@"

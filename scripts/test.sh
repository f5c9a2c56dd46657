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
status=0
.venv/bin/python -m pytest -n "${TESSERA_TEST_WORKERS:-3}" --dist loadfile "$@" || status=$?

# A whole run (no pytest arguments) also runs the SDK's tests and the end-to-end smoke run on CPython 3.12 and
# 3.13 (scripts/test-pythons.sh: a couple of minutes each, plus a minute per venv the first time; a version not
# installed is skipped with a line saying so). TESSERA_TEST_PYTHONS=0 leaves them out, =1 runs them anyway.
if [ "${TESSERA_TEST_PYTHONS:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = "1" ]; then
    echo "== other CPythons"
    scripts/test-pythons.sh || status=1
fi
exit "$status"

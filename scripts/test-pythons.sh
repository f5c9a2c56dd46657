#!/usr/bin/env bash
# The SDK's tests (tests/sdk_core, sdk_config, sdk_runtime, which hold the end-to-end smoke run: a server, an agent
# and an X509Source doing mutual TLS, test_sdk_rt_smoke.py) on the other CPythons Tessera supports: 3.12 and 3.13
# by default, or TESSERA_PYTHONS="3.12 3.13". Each gets its own venv, .venv-3.12 ..., made by scripts/bootstrap.sh
# on first use (about a minute) and reused while pyproject.toml is unchanged; the tests take a minute or two per
# version on two cores. A version that is not installed (pyenv's ~/.pyenv/versions/X.Y.*, else pythonX.Y on PATH)
# is skipped with a line saying so. Extra arguments go to pytest. Exits non-zero if any version failed.
set -euo pipefail
cd "$(dirname "$0")/.."

versions="${TESSERA_PYTHONS:-3.12 3.13}"
limit="${TESSERA_PYTHONS_TIMEOUT:-900}"  # seconds per version, a bound on a hung run (tests have their own)
tests=(tests/sdk_core tests/sdk_config tests/sdk_runtime)

find_python() {  # the newest installed X.Y.Z of version X.Y, or nothing
    local v="$1" found
    found="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$v".*/bin/"python$v" 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$found" ]; then found="$(command -v "python$v" || true)"; fi
    if [ -n "$found" ] && "$found" -c 'import sys' 2>/dev/null; then echo "$found"; fi
}

failed=()
for v in $versions; do
    py="$(find_python "$v")"
    if [ -z "$py" ]; then
        echo "== CPython $v: not installed here, skipped (pyenv install $v, or put python$v on PATH)"
        continue
    fi
    echo "== CPython $v ($py): ${tests[*]}"
    if ! PYTHON="$py" VENV=".venv-$v" scripts/bootstrap.sh; then
        failed+=("$v (install)")
        continue
    fi
    if ! timeout --kill-after=30 "$limit" ".venv-$v/bin/python" -m pytest -q -p no:cacheprovider \
        -n "${TESSERA_TEST_WORKERS:-2}" --dist loadfile "${tests[@]}" "$@"; then
        failed+=("$v")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "test-pythons: failed on CPython ${failed[*]}" >&2
    exit 1
fi

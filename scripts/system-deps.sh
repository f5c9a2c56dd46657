#!/usr/bin/env bash
# Installs the non-Python tools the test suite and demo drive for real (openssl, curl, nginx, Apache,
# PostgreSQL), from Debian's packages, only when they are missing. Needs root (or sudo) when it installs.
set -euo pipefail

need=()
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "system-deps: missing ${need[*]} and not root; install them and re-run" >&2
        exit 1
    fi
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

#!/usr/bin/env bash
# Installs the non-Python tools the test suite and demo drive for real (openssl, curl, nginx, Apache,
# PostgreSQL server binaries), from Debian's packages, only when they are missing. Needs root (or sudo)
# only when something is missing.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have_pg() { command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

need=()
have openssl || need+=(openssl)
have curl || need+=(curl)
have nginx || need+=(nginx-light)
have apache2 || need+=(apache2)
have_pg || need+=(postgresql)
have softhsm2-util || need+=(softhsm2)  # the PKCS#11 key manager's tests run against SoftHSM2
have faketime || need+=(faketime)  # clock-skew fault tests run the agent under libfaketime

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "system-deps: missing ${need[*]} and not root; install them (Debian: apt-get install ${need[*]}) and re-run" >&2
        exit 1
    fi
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian starts freshly installed services; the tests run their own private instances instead.
printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
$SUDO chmod +x /usr/sbin/policy-rc.d
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
$SUDO rm -f /usr/sbin/policy-rc.d

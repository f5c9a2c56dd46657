#!/usr/bin/env bash
# Tessera in one command: sets up .venv on a fresh machine (scripts/bootstrap.sh), then runs a server, an
# agent and two workloads calling each other over mutual TLS through a certificate rotation, narrating each
# step (examples/demo.py; about a minute). Run as root to see workloads told apart by user; as another user
# it still works, with both workloads running as you. Arguments go to examples/demo.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python examples/demo.py "$@"

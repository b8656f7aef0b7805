#!/usr/bin/env bash
# Installs what crates/tollgate/tests/secret_scanning.rs needs beyond cargo:
# detect-secrets (PyPI), in a venv at .venv/secret-scanning of the repository
# (or $TOLLGATE_SECRET_SCAN_VENV), so the system Python stays untouched. That
# test fails, never skips, when it is missing. gitleaks is not packaged in
# Debian: the test checks the gitleaks regex with Python's `re` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TOLLGATE_SECRET_SCAN_VENV:-.venv/secret-scanning}"
if "$VENV/bin/detect-secrets" --version >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet 'detect-secrets==1.5.0'
"$VENV/bin/detect-secrets" --version >/dev/null

#!/usr/bin/env bash
# Installs what tollgate-media's tests need beyond cargo: pylibsrtp (PyPI; its
# wheels bundle libsrtp 2.x), the independent SRTP implementation that
# tests/srtp_libsrtp.rs checks us against. That test fails, never skips, when
# it is missing. Set TOLLGATE_PYTHON to test with another interpreter.
set -euo pipefail
PY="${TOLLGATE_PYTHON:-python3}"
if "$PY" -c 'import pylibsrtp' 2>/dev/null; then
    exit 0
fi
command -v "$PY" >/dev/null 2>&1 || {
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-pip >/dev/null
}
"$PY" -m pip install --quiet 'pylibsrtp>=1.0,<2' 2>/dev/null \
    || "$PY" -m pip install --quiet --break-system-packages 'pylibsrtp>=1.0,<2'
"$PY" -c 'import pylibsrtp'

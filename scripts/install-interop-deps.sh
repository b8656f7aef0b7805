#!/usr/bin/env bash
# Installs what crates/tollgate/tests/interop.rs needs from PyPI: pjsua2 (the
# Python binding of PJSIP, the stack Asterisk's chan_pjsip is built on) in a
# venv at .venv/interop of the repository (or $TOLLGATE_INTEROP_VENV). PyPI's
# `pjsua2` has no Linux wheel; `pjsua2-python` ships one (pjproject 2.15.1)
# that loads on Debian 12's Python 3.11. The Debian packages of the matrix
# (baresip-core, kamailio, linphone-cli) come from scripts/test.sh. The
# pjsua2 case fails, never skips, when the venv is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TOLLGATE_INTEROP_VENV:-.venv/interop}"
if "$VENV/bin/python" -c 'import pjsua2' >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! /usr/bin/python3 -m venv --help >/dev/null 2>&1 || ! /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
fi
rm -rf "$VENV"
/usr/bin/python3 -m venv "$VENV"
# A third-party repackaging (auditwheel manylinux2014 build of pjproject
# 2.15.1, bundling its own old libssl): test-only, loopback-only, and pinned
# by hash so that what CI runs as root cannot change under us.
req="$(mktemp)"
trap 'rm -f "$req"' EXIT
cat > "$req" <<'REQ'
pjsua2-python==2.15.1.post1 \
    --hash=sha256:4eb5c3afca5ef589f94493ae14c86dbaf3584a9abc7964e89864ed85020c3d16
REQ
"$VENV/bin/pip" install --quiet --only-binary :all: --no-deps --require-hashes -r "$req"
"$VENV/bin/python" -c 'import pjsua2'

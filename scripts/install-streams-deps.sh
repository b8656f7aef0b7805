#!/usr/bin/env bash
# Installs what crates/tollgate/tests/e2e_streams.rs needs beyond cargo: the
# independent implementation of the Twilio Media Streams message set that the
# stream bridge is checked against, Pipecat's `TwilioFrameSerializer`
# (PyPI pipecat-ai), and the plain `websockets` server the test backend is
# built on, in a venv at .venv/streams of the repository (or
# $TOLLGATE_STREAMS_VENV). The test fails, never skips, under CI=true when the
# venv is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TOLLGATE_STREAMS_VENV:-.venv/streams}"
check() {
    "$VENV/bin/python" -c 'import websockets; from pipecat.serializers.twilio import TwilioFrameSerializer' >/dev/null 2>&1
}
if check; then
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
"$VENV/bin/pip" install --quiet 'pipecat-ai==1.14.0' 'websockets==15.0.1'
check || { echo "install-streams-deps.sh: pipecat's TwilioFrameSerializer does not import" >&2; exit 1; }

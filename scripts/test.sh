#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first
# (SIPp from Debian's sip-tester). Tests that need SIPp fail, never skip,
# when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v sipp >/dev/null 2>&1 || need_pkgs+=(sip-tester)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
command -v sipp >/dev/null || { echo "test.sh: sipp is still missing" >&2; exit 1; }
# pylibsrtp: the independent SRTP implementation the media tests compare with.
crates/media/scripts/install-test-deps.sh

cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=4

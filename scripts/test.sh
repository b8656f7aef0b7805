#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first
# (SIPp from Debian's sip-tester; promtool and prometheus from Debian's
# prometheus; PyYAML from python3-yaml for the deploy-kit checks; redis-server
# for the fleet tests, which start their own on a free port; the interop
# matrix's user agents and proxies: baresip-core, kamailio, linphone-cli; the
# linphonec case runs in a network namespace: unshare from util-linux, ip from
# iproute2; dnsmasq-base for the DNS destinations). Tests that
# need one of them fail, never skip, when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

has_yaml() {
    python3 -c 'import yaml' >/dev/null 2>&1 || /usr/bin/python3 -c 'import yaml' >/dev/null 2>&1
}

need_pkgs=()
command -v sipp >/dev/null 2>&1 || need_pkgs+=(sip-tester)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
has_yaml || need_pkgs+=(python3-yaml)
had_redis=1
command -v redis-server >/dev/null 2>&1 || { need_pkgs+=(redis-server); had_redis=0; }
# tests/interop.rs: real user agents and proxies (issue 11).
command -v baresip >/dev/null 2>&1 || need_pkgs+=(baresip-core)
command -v kamailio >/dev/null 2>&1 || [ -x /usr/sbin/kamailio ] || need_pkgs+=(kamailio)
command -v linphonec >/dev/null 2>&1 || need_pkgs+=(linphone-cli)
# tests/e2e_destinations.rs: a DNS server on loopback (NAPTR/SRV/A records,
# RFC 3263); dnsmasq-base is the binary alone, without a service on :53.
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need_pkgs+=(dnsmasq-base)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /usr/bin/ip ] || need_pkgs+=(iproute2)
had_prometheus=1
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    need_pkgs+=(prometheus)
    had_prometheus=0
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # --no-install-recommends: prometheus would pull in node-exporter & co.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${need_pkgs[@]}" >/dev/null
    # The package starts a Prometheus service on :9090, Tollgate's default
    # metrics port; the tests run their own server on a free port.
    if [ "$had_prometheus" -eq 0 ] && command -v systemctl >/dev/null 2>&1 \
        && systemctl is-active --quiet prometheus 2>/dev/null; then
        echo "test.sh: stopping and disabling the prometheus service the package started"
        $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    # Likewise redis-server's service on :6379: the fleet tests never use it.
    if [ "$had_redis" -eq 0 ] && command -v systemctl >/dev/null 2>&1 \
        && systemctl is-active --quiet redis-server 2>/dev/null; then
        echo "test.sh: stopping and disabling the redis-server service the package started"
        $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
    # Same for kamailio's service on :5060: the interop tests run their own.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet kamailio 2>/dev/null; then
        echo "test.sh: stopping and disabling the kamailio service the package started"
        $SUDO systemctl disable --now kamailio >/dev/null 2>&1 || true
    fi
fi
command -v sipp >/dev/null || { echo "test.sh: sipp is still missing" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "test.sh: redis-server is still missing" >&2; exit 1; }
command -v promtool >/dev/null || { echo "test.sh: promtool is still missing" >&2; exit 1; }
command -v prometheus >/dev/null || { echo "test.sh: prometheus is still missing" >&2; exit 1; }
has_yaml || { echo "test.sh: python3 cannot import yaml (python3-yaml)" >&2; exit 1; }
command -v baresip >/dev/null || { echo "test.sh: baresip is still missing (baresip-core)" >&2; exit 1; }
[ -x /usr/sbin/kamailio ] || command -v kamailio >/dev/null || { echo "test.sh: kamailio is still missing" >&2; exit 1; }
command -v linphonec >/dev/null || { echo "test.sh: linphonec is still missing (linphone-cli)" >&2; exit 1; }
[ -x /usr/sbin/dnsmasq ] || command -v dnsmasq >/dev/null || { echo "test.sh: dnsmasq is still missing (dnsmasq-base)" >&2; exit 1; }
# pylibsrtp: the independent SRTP implementation the media tests compare with.
crates/media/scripts/install-test-deps.sh
# detect-secrets in a venv: the secret-scanning rule's test runs it.
scripts/install-secret-scan-deps.sh
# pjsua2 (PJSIP's Python binding) in a venv: the interop matrix's PJSIP case.
scripts/install-interop-deps.sh
# pipecat-ai and websockets in a venv: the stream tests' backend (e2e_streams).
scripts/install-streams-deps.sh

cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=4

#!/usr/bin/env bash
# The project's test command (README.md). Installs what the tests need, then runs
# formatting, lints and every test. Safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs Debian packages that are missing (CI and developers run as root).
need_apt() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

# System packages the tests use: curl fetches the friendly page over HTTP/2 and 1.1;
# systemd provides systemd-analyze, which verifies generated units; python3 runs scripts;
# tinyproxy is the real HTTP CONNECT proxy of the proxy tests; nginx with its stream module
# is the TCP pass-through and SNI router of the WebSocket and SNI tests; iproute2 and
# iptables build the network namespaces (NAT, dead paths) of crates/octopus/tests/nat.rs;
# chromium and chromium-driver are the real browser of the portal's tests
# (crates/octo-portal/tests/browser_flows.rs), headless, over WebDriver.
need_apt curl systemd python3 tinyproxy iproute2 iptables nginx libnginx-mod-stream \
    chromium chromium-driver

# PyPI tools, in a venv under target/ (python3-venv from apt): grpcio, grpcio-reflection and
# protobuf are the standard gRPC client of crates/tentacle/tests/grpc_clients.rs.
need_apt python3-venv
if [ ! -x target/py-venv/bin/python ]; then
    python3 -m venv target/py-venv
fi
target/py-venv/bin/python -c 'import grpc, grpc_reflection, google.protobuf' 2>/dev/null ||
    target/py-venv/bin/pip install -q grpcio grpcio-reflection protobuf

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast

#!/usr/bin/env bash
# The project's test command (README.md). Installs what the tests need, then runs
# formatting, lints and every test. Safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use. None yet; later issues add e.g. nginx, tinyproxy:
#   need_apt nginx tinyproxy
need_apt() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

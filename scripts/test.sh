#!/usr/bin/env bash
# The project's test command (README.md). Installs what the tests need, then runs
# formatting, lints and every test. Safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Free disk, printed at the start and after the build, so that a full disk shows as
# itself rather than as failing tests. A fresh build of everything below takes 5 GiB under
# target/ without incremental caches (CI's .ci/run turns them off) and 8.6 GiB with them;
# the tests and packages bring the peak to about 7 GiB without (2026-12-07).
# disk_free WHEN GIB: prints what is free where target/ and the tests' temporary folders
# are, and warns below GIB (what the rest of this script needs there).
disk_free() {
    local where seen=""
    for where in . "${TMPDIR:-/tmp}"; do
        # Once per file system.
        case " $seen " in *" $(stat -c %d "$where") "*) continue ;; esac
        seen="$seen $(stat -c %d "$where")"
        df -Pk "$where" | awk -v w="$where" -v at="$1" -v need="$2" 'NR==2 {
            printf "disk %s: %.1f GiB free on %s (%s)\n", at, $4/1048576, $6, w
            if ($4 < need * 1048576) printf "WARNING: under %s GiB free on %s: what follows may fail with \"No space left on device\"; free some space first\n", need, $6
        }'
    done
}
disk_free "at the start" 8

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
# (crates/octo-portal/tests/browser_flows.rs), headless, over WebDriver; postgresql is the
# server's second store engine: tests start a throwaway cluster from /usr/lib/postgresql/*/bin
# (octo_testkit::postgres), so the packaged service itself is never used.
need_apt curl systemd python3 tinyproxy iproute2 iptables nginx libnginx-mod-stream \
    chromium chromium-driver postgresql

# PyPI tools, pinned, in a venv under target/ (reinstalled when the pin changes):
# schemathesis fuzzes the live server's API from its OpenAPI document
# (crates/octo-server-core/tests/schemathesis.rs).
need_venv() {
    local venv="target/$1-venv" spec="$2"
    if [ "$(cat "$venv/.spec" 2>/dev/null)" != "$spec" ]; then
        echo "installing $spec into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check "$spec"
        echo "$spec" >"$venv/.spec"
    fi
}
need_apt python3-venv
need_venv schemathesis 'schemathesis==4.32.5'

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
cargo test --workspace --locked --no-run
disk_free "after the build" 3
cargo test --workspace --locked --no-fail-fast
# The packages: the tentacle's Debian package built, installed, a documented script run
# with /opt/octopus/tentacle/Tentacle, removed and purged; the server's installed, checked,
# removed and purged; the RPMs read with Debian's rpm (about 2.5 minutes, after the
# first install of cargo-deb and cargo-generate-rpm under target/tools).
./scripts/test-package.sh

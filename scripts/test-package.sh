#!/usr/bin/env bash
# Part of scripts/test.sh: builds the tentacle's Debian package (debug build,
# scripts/package.sh --profile dev), installs it with dpkg, runs the original's
# documented listening script verbatim with /opt/octopus/tentacle/Tentacle
# against a real server, then checks that `dpkg -r` removes the binaries and
# the unit but keeps configuration, and `dpkg --purge` removes that too.
# Needs root. On a machine with tentacle instances in /etc/octopus/tentacle it
# stops before touching them.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package test failed: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i); run scripts/test.sh as root"
if [ -e /etc/octopus/tentacle ]; then
    echo "package test SKIPPED: /etc/octopus/tentacle exists (tentacle instances of this machine); purging the package would remove them" >&2
    exit 0
fi

./scripts/package.sh --profile dev --only tentacle
deb=$(ls -t target/package/octopus-tentacle_*.deb | head -1)
dpkg --purge octopus-tentacle >/dev/null 2>&1 || true
dpkg -i "$deb"

[ -x /opt/octopus/tentacle/Tentacle ] || fail "/opt/octopus/tentacle/Tentacle not installed"
[ "$(readlink /usr/bin/tentacle)" = /opt/octopus/tentacle/Tentacle ] || fail "tentacle is not on the PATH"
tentacle version >/dev/null || fail "tentacle version"
for f in /usr/share/man/man1/tentacle.1.gz /usr/share/man/man1/tentacle-register-with.1.gz \
    /usr/share/bash-completion/completions/tentacle /usr/share/zsh/vendor-completions/_tentacle \
    /usr/share/fish/vendor_completions.d/tentacle.fish /lib/systemd/system/tentacle@.service; do
    [ -f "$f" ] || fail "$f not installed"
done

# The documented script, verbatim (its registry in a temporary folder).
cargo test -p octo-tentacle --test documented_scripts --locked -- --ignored --exact \
    installed_package_runs_the_documented_listening_script

# Configuration in the default (root) place survives `dpkg -r`, not `--purge`.
/opt/octopus/tentacle/Tentacle create-instance --instance PackageCheck >/dev/null
config=/etc/octopus/tentacle/PackageCheck/tentacle.toml
[ -f "$config" ] || fail "create-instance did not write $config"
dpkg -r octopus-tentacle
for f in /opt/octopus/tentacle/Tentacle /usr/bin/tentacle /lib/systemd/system/tentacle@.service \
    /usr/share/man/man1/tentacle.1.gz; do
    [ ! -e "$f" ] && [ ! -L "$f" ] || fail "dpkg -r left $f"
done
[ -f "$config" ] || fail "dpkg -r removed the configuration $config"
dpkg --purge octopus-tentacle
[ ! -e /etc/octopus/tentacle ] || fail "dpkg --purge left /etc/octopus/tentacle"
rm -rf /var/lib/octopus/tentacle/PackageCheck
rmdir /var/lib/octopus/tentacle /var/lib/octopus 2>/dev/null || true
echo "package test: ok (install, documented script, remove keeps configuration, purge removes it)"

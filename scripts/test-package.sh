#!/usr/bin/env bash
# Part of scripts/test.sh: builds the packages (debug build, scripts/package.sh
# --profile dev) and checks them on this machine:
# - the tentacle's Debian package: installed with dpkg, the original's
#   documented listening script run verbatim with /opt/octopus/tentacle/Tentacle
#   against a real server, then `dpkg -r` removes the binaries and the unit but
#   keeps configuration, and `dpkg --purge` removes that too;
# - the server's Debian package: installed, `octopus` runs from
#   /opt/octopus/server and the PATH, man pages, completions and the unit are in
#   place (`systemd-analyze verify` when there), `dpkg -r` keeps the server's
#   data (/var/lib/octopus/server), `dpkg --purge` removes it;
# - the RPMs: their file lists and metadata read with Debian's `rpm` tool
#   (`rpm -qpl`, `rpm -qpi`, the scriptlets). Installing an RPM on Debian is
#   not meaningful (rpm's database here is not the system's: dpkg owns it), so
#   the RPMs are checked, not installed.
# Needs root. On a machine with tentacle instances in /etc/octopus/tentacle, or
# a server's data in /var/lib/octopus/server, it stops before touching them.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package test failed: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i); run scripts/test.sh as root"
if [ -e /etc/octopus/tentacle ]; then
    echo "package test SKIPPED: /etc/octopus/tentacle exists (tentacle instances of this machine); purging the package would remove them" >&2
    exit 0
fi
if [ -e /var/lib/octopus/server ]; then
    echo "package test SKIPPED: /var/lib/octopus/server exists (a server's data on this machine); purging the package would remove it" >&2
    exit 0
fi
# Debian's rpm tool reads the RPMs (the need_apt of scripts/test.sh).
if ! dpkg -s rpm >/dev/null 2>&1; then
    echo "installing: rpm"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm
fi

./scripts/package.sh --profile dev
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
echo "package test: tentacle ok (install, documented script, remove keeps configuration, purge removes it)"

# The server's package.
deb=$(ls -t target/package/octopus-server_*.deb | head -1)
dpkg --purge octopus-server >/dev/null 2>&1 || true
dpkg -i "$deb"
for f in /opt/octopus/server/octopus /opt/octopus/server/octopus-server /opt/octopus/server/calamari /opt/octopus/server/tentacle; do
    [ -x "$f" ] || fail "$f not installed"
done
[ "$(readlink /usr/bin/octopus)" = /opt/octopus/server/octopus ] || fail "octopus is not on the PATH"
grep -q '^octopus ' <<<"$(/opt/octopus/server/octopus --version)" || fail "/opt/octopus/server/octopus --version"
grep -q '^octopus ' <<<"$(octopus --version)" || fail "octopus --version (on the PATH)"
# Through the link on the PATH, `octopus` hands server commands to the octopus-server beside it.
grep -q 'show-thumbprint' <<<"$(octopus server --help)" || fail "octopus server --help (handed to octopus-server)"
unit=/lib/systemd/system/octopus.service
socket_unit=/lib/systemd/system/octopus.socket
for f in /usr/share/man/man1/octopus.1.gz /usr/share/man/man1/octopus-server-run.1.gz \
    /usr/share/man/man1/octopus-policy.1.gz \
    /usr/share/bash-completion/completions/octopus /usr/share/zsh/vendor-completions/_octopus \
    /usr/share/fish/vendor_completions.d/octopus.fish "$unit" "$socket_unit"; do
    [ -f "$f" ] || fail "$f not installed"
done
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$unit" "$socket_unit" || fail "systemd-analyze verify $unit $socket_unit"
else
    echo "systemd-analyze not installed: the server's unit is not verified" >&2
fi
data=/var/lib/octopus/server
[ "$(stat -c %a "$data")" = 700 ] || fail "$data is not 0700"
echo kept >"$data/package-check"
dpkg -r octopus-server
for f in /opt/octopus/server/octopus /opt/octopus/server/octopus-server /usr/bin/octopus "$unit" "$socket_unit" /usr/share/man/man1/octopus.1.gz; do
    [ ! -e "$f" ] && [ ! -L "$f" ] || fail "dpkg -r left $f"
done
[ -f "$data/package-check" ] || fail "dpkg -r removed the server's data in $data"
dpkg --purge octopus-server
[ ! -e "$data" ] || fail "dpkg --purge left $data"
echo "package test: server ok (install, octopus on the PATH, man pages, unit verified, remove keeps the data, purge removes it)"

# The RPMs, read with Debian's rpm tool (not installed: see the top). Each
# holds the Debian package's files, with their sizes and modes, at the same
# paths but for the unit folder and zsh's (the RPM distributions' places).
version=$(dpkg-deb -f "$deb" Version | sed 's/-.*//')
for pkg in octopus-tentacle octopus-server; do
    rpmfile=$(ls -t target/package/"$pkg-$version"-*.rpm | head -1)
    debfile=$(ls -t target/package/"${pkg}_$version"-*.deb | head -1)
    info=$(rpm -qpi "$rpmfile")
    for want in "Name *: $pkg\$" "Version *: $version\$" "License *: Apache-2.0" "Architecture *: $(uname -m)"; do
        grep -q "^$want" <<<"$info" || fail "$rpmfile: rpm -qpi has no '$want': $info"
    done
    expected=$(dpkg-deb -c "$debfile" | awk '/^-/ {print $1, $3, substr($6, 2)}' |
        sed -e 's| /lib/systemd/system/| /usr/lib/systemd/system/|' \
            -e 's| /usr/share/zsh/vendor-completions/| /usr/share/zsh/site-functions/|' | sort)
    actual=$(rpm -qp --qf '[%{FILEMODES:perms} %{FILESIZES} %{FILENAMES}\n]' "$rpmfile" | sort)
    [ "$expected" = "$actual" ] ||
        fail "$rpmfile does not hold the files of $debfile: $(diff <(echo "$expected") <(echo "$actual"))"
    grep -q '^/usr/share/man/man1/' <<<"$(rpm -qpl "$rpmfile")" || fail "$rpmfile: no man pages"
done
tentacle_rpm=$(ls -t target/package/octopus-tentacle-"$version"-*.rpm | head -1)
# Read whole before matching: `grep -q` on a pipe exits at its first match, and the
# writer then dies of SIGPIPE, which `pipefail` reports as a failure.
tentacle_files=$(rpm -qpl "$tentacle_rpm")
grep -qx /opt/octopus/tentacle/Tentacle <<<"$tentacle_files" || fail "$tentacle_rpm: no /opt/octopus/tentacle/Tentacle"
grep -qx '/usr/lib/systemd/system/tentacle@.service' <<<"$tentacle_files" || fail "$tentacle_rpm: no unit"
grep -q 'ln -sfn /opt/octopus/tentacle/Tentacle /usr/bin/tentacle' <<<"$(rpm -qp --scripts "$tentacle_rpm")" ||
    fail "$tentacle_rpm: its %post does not put tentacle on the PATH"
server_rpm=$(ls -t target/package/octopus-server-"$version"-*.rpm | head -1)
grep -q 'ln -sfn /opt/octopus/server/octopus /usr/bin/octopus' <<<"$(rpm -qp --scripts "$server_rpm")" ||
    fail "$server_rpm: its %post does not put octopus on the PATH"
echo "package test: RPMs ok (metadata, the Debian packages' files and modes, scriptlets)"

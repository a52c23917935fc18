#!/usr/bin/env bash
# Builds the packages into target/package/:
#   octopus-tentacle_VERSION_ARCH.deb  /opt/octopus/tentacle/Tentacle, `tentacle`
#                                      on the PATH, man pages, completions
#                                      (bash, zsh, fish), tentacle@.service
#   octopus-server_VERSION_ARCH.deb    /opt/octopus/server/{octopus,octopus-server,calamari,tentacle},
#                                      `octopus` on the PATH, octopus.service,
#                                      man pages, completions
#   octopus-tentacle-VERSION-linux-ARCH.tar.gz, octopus-server-...tar.gz
#                                      the same files, for other distributions
#   octopus-tentacle-VERSION-1.ARCH.rpm, octopus-server-VERSION-1.ARCH.rpm
#                                      the same files as the Debian packages
#                                      (units in /usr/lib/systemd/system, zsh
#                                      completions in site-functions), the
#                                      PATH link made by their %post script
# Debian packages are made by cargo-deb, RPMs by cargo-generate-rpm (both
# installed under target/tools when missing), from the Debian package's files.
# Usage: scripts/package.sh [--profile release|dev] [--only tentacle]
#   --profile dev  packages the debug build (fast; what scripts/test.sh checks)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        *) echo "usage: scripts/package.sh [--profile release|dev] [--only tentacle|server]" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) dir=release ;;
    dev) dir=debug ;;
    *) echo "--profile: release or dev, not '$profile'" >&2; exit 2 ;;
esac

target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
out="$target/package"
deb="$target/tools/bin/cargo-deb"
if [ ! -x "$deb" ]; then
    echo "installing cargo-deb into $target/tools" >&2
    cargo install cargo-deb --locked --root "$target/tools"
fi
rpm="$target/tools/bin/cargo-generate-rpm"
if [ ! -x "$rpm" ]; then
    echo "installing cargo-generate-rpm into $target/tools" >&2
    cargo install cargo-generate-rpm --locked --root "$target/tools"
fi

bins=(-p octo-tentacle --bin tentacle)
if [ "$only" != tentacle ]; then
    bins+=(-p octo-server --bin octopus --bin octopus-server -p octo-calamari --bin calamari)
fi
cargo build --profile "$profile" "${bins[@]}"

version=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print([p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="octo-tentacle"][0])')
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
rm -rf "$out/staging"
mkdir -p "$out"

# Man pages and completions, from the command lines themselves.
"$target/$dir/tentacle" generate-docs --out "$out/staging/tentacle"
if [ "$only" != tentacle ]; then
    "$target/$dir/octopus" generate-docs --out "$out/staging/server"
fi

# cargo-deb names binaries target/release/...; with another profile it reads
# them from that profile's folder.
debopts=(--no-build --quiet --output "$out")
if [ "$profile" != release ]; then
    debopts+=(--profile "$profile" --strip --fast)
fi
"$deb" -p octo-tentacle "${debopts[@]}"
if [ "$only" != tentacle ]; then
    "$deb" -p octo-server "${debopts[@]}"
fi

# The tar.gz: the Debian package's files, as they would be installed.
for pkg in octopus-tentacle octopus-server; do
    [ "$only" = tentacle ] && [ "$pkg" = octopus-server ] && continue
    file=$(ls -t "$out/${pkg}_${version}"*"_$arch.deb" | head -1)
    root="$out/staging/$pkg-root"
    rm -rf "$root"
    mkdir -p "$root"
    dpkg-deb -x "$file" "$root"
    # What the Debian package's postinst links.
    mkdir -p "$root/usr/bin"
    case "$pkg" in
        octopus-tentacle) ln -s /opt/octopus/tentacle/Tentacle "$root/usr/bin/tentacle" ;;
        octopus-server) ln -s /opt/octopus/server/octopus "$root/usr/bin/octopus" ;;
    esac
    tar -C "$root" -czf "$out/$pkg-$version-linux-$arch.tar.gz" .
done

# The RPMs: the files of the Debian package as extracted above (the assets
# in each crate's [package.metadata.generate-rpm] name them), so both carry
# the same binaries, man pages and completions.
# The debug build's RPMs are compressed fast (gzip, not zstd at level 19).
rpm_arch=$(uname -m)
rpmopts=(--arch "$rpm_arch" --output "$out/")
if [ "$profile" != release ]; then
    rpmopts+=(--payload-compress gzip)
fi
for crate in tentacle octopus; do
    [ "$only" = tentacle ] && [ "$crate" = octopus ] && continue
    "$rpm" -p "crates/$crate" "${rpmopts[@]}"
done
ls -la "$out"/*.deb "$out"/*.tar.gz "$out"/*.rpm

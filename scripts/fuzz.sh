#!/usr/bin/env bash
# Runs one fuzz target for a while: scripts/fuzz.sh TARGET MINUTES (docs/fuzzing.md).
#
# With a nightly toolchain (`rustup toolchain list`): cargo-fuzz and libFuzzer, with
# coverage feedback (cargo-fuzz is installed from crates.io when missing). Without one,
# or with FUZZ_ENGINE=stable: the blind mutational driver in fuzz/src/bin, on stable.
# A failing input is left in fuzz/artifacts/TARGET/; new inputs grow fuzz/corpus/TARGET/.
# FUZZ_SANITIZER=address builds with AddressSanitizer (slower; default none: the code
# under test has no unsafe code of its own).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

targets="archive_extract service_message tentacle_config certificate_import package_name"
if [ $# -ne 2 ] || ! [[ " $targets " == *" $1 "* ]] || ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh TARGET MINUTES" >&2
    echo "targets: $targets" >&2
    exit 2
fi
target=$1
seconds=$(( $2 * 60 ))
mkdir -p "corpus/$target"

engine=${FUZZ_ENGINE:-}
if [ -z "$engine" ]; then
    if rustup run nightly rustc --version >/dev/null 2>&1; then
        engine=libfuzzer
    else
        echo "no nightly toolchain here (rustup toolchain list): using the stable driver, which has no coverage feedback" >&2
        engine=stable
    fi
fi

case "$engine" in
libfuzzer)
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "installing cargo-fuzz from crates.io" >&2
        cargo install cargo-fuzz --locked
    fi
    # Built first, so the time reported below is fuzzing only.
    cargo +nightly fuzz build -s "${FUZZ_SANITIZER:-none}" -a --features libfuzzer "$target"
    start=$(date +%s)
    # -a: debug assertions (overflow checks) on; each input may take at most 10 s.
    cargo +nightly fuzz run -s "${FUZZ_SANITIZER:-none}" -a --features libfuzzer "$target" \
        "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
    ;;
stable)
    cargo build --release --locked --features stable-driver --bin stable-driver
    start=$(date +%s)
    cargo run --release --locked --features stable-driver --bin stable-driver -- "$target" "$seconds" \
        "seeds/$target" "corpus/$target"
    ;;
*)
    echo "FUZZ_ENGINE must be libfuzzer or stable, not '$engine'" >&2
    exit 2
    ;;
esac
echo "fuzz: $target fuzzed $(( $(date +%s) - start )) s with $engine, no failure"

#!/usr/bin/env bash
# How long a tentacle takes to stop (SIGTERM until the process is gone), against the
# quickstart's real server and tentacles: the polling one idle, the polling one with a
# script running (its log followed by the server), the listening one idle.
#
#   scripts/bench-tentacle-stops.sh [BINDIR] [RUNS]
#
# BINDIR holds octopus, octopus-server, tentacle and calamari (default: target/release,
# built first). Prints one line per run, then one JSON object on its last line (seconds).
set -euo pipefail

bin=${1:-}
runs=${2:-3}
if [ -z "$bin" ]; then
    cargo build --release -q -p octo-server -p octo-tentacle -p octo-calamari
    bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
fi
work=$(mktemp -d)
qs=
trap '[ -n "$qs" ] && kill -INT "$qs" 2>/dev/null; wait 2>/dev/null; pkill -f "sleep 2998" 2>/dev/null; rm -rf "$work"' EXIT

# SIGTERM to PID; prints the seconds until it is gone (or a zombie).
stop() {
    local pid=$1 start end
    start=$(date +%s.%N)
    kill -TERM "$pid"
    while [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; do
        sleep 0.005
    done
    end=$(date +%s.%N)
    python3 -c "print(round($end - $start, 3))"
}

# Waits (bounded) until FILE contains TEXT.
await() {
    for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "timed out waiting for '$2' in $1" >&2
    exit 1
}

idle=() busy=() listening=()
for i in $(seq "$runs"); do
    dir=$work/run-$i
    "$bin/octopus-server" quickstart --dir "$dir" --keep >"$dir.log" 2>&1 &
    qs=$!
    await "$dir.log" "Ctrl-C"
    eval "$(grep 'export OCTOPUS_URL' "$dir.log" | sed 's/^ *//')"
    polling=$(pgrep -P "$qs" -f 'tentacle run --instance Polling')
    listener=$(pgrep -P "$qs" -f 'tentacle run --instance Listening')
    idle+=("$(stop "$polling")")
    # Again, from this script, until the server reaches it; then stopped mid-script.
    TENTACLE_CONFIG_DIR=$dir/tentacles "$bin/tentacle" run --instance Polling >"$dir.again" 2>&1 &
    polling=$!
    for _ in $(seq 100); do
        "$bin/octopus" run-script --machine quickstart-polling --script true >/dev/null 2>&1 && break
        sleep 0.2
    done
    "$bin/octopus" run-script --machine quickstart-polling --script 'exec sleep 2998' >"$dir.cli" 2>&1 &
    await "$dir.cli" "starting the script"
    sleep 0.3 # the script's first moments: its log stream is open
    busy+=("$(stop "$polling")")
    listening+=("$(stop "$listener")")
    echo "run $i: polling idle ${idle[-1]} s, polling with a script running ${busy[-1]} s, listening idle ${listening[-1]} s"
    kill -INT "$qs"
    wait "$qs" || true
    qs=
    pkill -f "sleep 2998" || true
done
join() { local IFS=,; echo "[$*]"; }
echo "{\"bench\":\"tentacle-stops\",\"runs\":$runs,\"polling_idle_s\":$(join "${idle[@]}"),\"polling_script_running_s\":$(join "${busy[@]}"),\"listening_idle_s\":$(join "${listening[@]}")}"

#!/bin/bash
# What an idle stage costs with many integrations: the CPU a matcher spends
# with N integrations (default 10,000) and nothing to do, over 30 s, most of
# it in reload checks (every reload_interval_ms, 2 s by default). Run with
# one matcher binary or two (say, before and after a change): they are run
# in turn, ROUNDS times each, and the CPU seconds of every run printed.
# Usage: cargo build --profile dist --bins -p swallow-matcher &&
#        bash tests/bench/idle.sh target/dist/swallow-matcher [OTHER-MATCHER]
# Environment: N (integrations), SECONDS_IDLE (30), ROUNDS (3), AMQP_URL.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 MATCHER [OTHER-MATCHER]"; exit 2; }
n=${N:-10000}
seconds=${SECONDS_IDLE:-30}
rounds=${ROUNDS:-3}
url=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
prefix="idle-$$"
source "$(dirname "$0")/stages.sh"
python3 "$(dirname "$0")/many-integrations.py" "$dir/swallow.toml" "$n" "$url" "$prefix"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for round in $(seq "$rounds"); do
  for bin in "$@"; do
    start_stage "$bin" "$dir/swallow.toml"
    sleep 3 # past the start's own work
    before=$(cpu "$pid")
    sleep "$seconds"
    after=$(cpu "$pid")
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    kill -TERM "$pid"; wait "$pid" || true
    echo "round $round $bin: $(( after - before )) CPU ticks (1/100 s) in ${seconds} s idle with $n integrations; peak RSS $(( rss / 1024 )) MiB"
  done
done
delete_prefix "$prefix"

#!/bin/bash
# A stage's memory with many integrations, at start and across reloads:
# each binary given is started with N integrations (default 10,000, the
# configuration of idle.sh), read 5 s after it is ready, then its file is
# changed RELOADS times (each waited for until it is reloaded, then 5 s),
# and read again. Prints the peak RSS (VmHWM) and the RSS (VmRSS) at
# both reads.
# Usage: cargo build --profile dist --bins &&
#        bash tests/bench/config-memory.sh target/dist/swallow-matcher [OTHER-BINARY…]
# Environment: N (integrations), RELOADS (3), AMQP_URL.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BINARY [OTHER-BINARY…]"; exit 2; }
n=${N:-10000}
reloads=${RELOADS:-3}
url=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
dir=$(mktemp -d)
prefix="cfgmem-$$"
source "$(dirname "$0")/stages.sh"
cleanup() {
  delete_prefix "$prefix"
  rm -rf "$dir"
}
trap cleanup EXIT
python3 "$(dirname "$0")/many-integrations.py" "$dir/base.toml" "$n" "$url" "$prefix"
mib() { awk -v f="$1" '$1 == f":" {printf "%.1f", $2 / 1024}' "/proc/$2/status"; }
reloaded() {
  curl -sf "http://127.0.0.1:$1/metrics" | awk '/^swallow_config_reloads_total\{result="ok"\}/ {print $2}'
}
for bin in "$@"; do
  cp "$dir/base.toml" "$dir/swallow.toml"
  start_stage "$bin" "$dir/swallow.toml"
  sleep 5
  start="peak $(mib VmHWM "$pid") MiB, RSS $(mib VmRSS "$pid") MiB"
  for k in $(seq "$reloads"); do
    echo "# change $k" >> "$dir/swallow.toml"
    for _ in $(seq 300); do [ "$(reloaded "$port")" = "$k" ] && break; sleep 0.1; done
    [ "$(reloaded "$port")" = "$k" ] || { echo "$bin: change $k was not reloaded within 30 s" >&2; exit 1; }
    sleep 5 # what the reload freed is returned (or not) meanwhile
  done
  after="peak $(mib VmHWM "$pid") MiB, RSS $(mib VmRSS "$pid") MiB"
  kill -TERM "$pid"; wait "$pid" || true
  echo "$bin, $n integrations: 5 s after ready: $start; after $reloads changes: $after"
done

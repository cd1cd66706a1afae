#!/bin/bash
# Instructions per delivery of one or two deliverer binaries (say, before
# and after a change), counted by callgrind, which counts the same on a
# busy machine as on a quiet one. Each binary in turn, ROUNDS times: the
# three stages as `swallow-load --latency-only` starts them, the deliverer
# under valgrind; its counters are zeroed once it is ready and dumped once
# every event's POST is counted (swallow_deliveries_total), so start-up and
# shut-down are left out. Prints each run's instructions per delivery.
# Usage: cargo build --release --workspace --bins &&
#        bash tests/bench/deliverer-instructions.sh target/release/swallow-deliverer [OTHER-DELIVERER]
# Environment: RATE (events/s, 100), SECONDS_LOAD (10), ROUNDS (2), AMQP_URL.
# Needs valgrind (callgrind_control, callgrind_annotate) and curl.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DELIVERER [OTHER-DELIVERER]"; exit 2; }
rate=${RATE:-100}
seconds=${SECONDS_LOAD:-10}
rounds=${ROUNDS:-2}
root=$(cd "$(dirname "$0")/../.." && pwd)
load="$root/target/release/swallow-load"
for tool in valgrind callgrind_control callgrind_annotate curl; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is not installed"; exit 1; }
done
[ -x "$load" ] || { echo "$0: build first: cargo build --release --workspace --bins"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
want=$((rate * seconds))

# A bin dir per deliverer: the release matcher and responder, and a
# deliverer that is valgrind running the binary given.
for i in $(seq $#); do
  bin=$(realpath "${!i}")
  mkdir -p "$work/bins$i"
  ln -s "$root/target/release/swallow-matcher" "$root/target/release/swallow-responder" "$work/bins$i/"
  cat > "$work/bins$i/swallow-deliverer" <<EOF
#!/bin/sh
echo "\$SWALLOW_HTTP_ADDR" > "$work/addr"
exec valgrind --tool=callgrind --callgrind-out-file="$work/cg$i.%p.out" "$bin" "\$@"
EOF
  chmod +x "$work/bins$i/swallow-deliverer"
done

deliveries() {
  curl -sf "http://$(cat "$work/addr")/metrics" | awk '/^swallow_deliveries_total/ {s += $2} END {print s + 0}'
}

for round in $(seq "$rounds"); do
  for i in $(seq $#); do
    rm -f "$work/addr" "$work"/cg"$i".*
    "$load" --latency-only --latency-rate "$rate" --latency-rounds 1 --latency-seconds "$seconds" \
      --bin-dir "$work/bins$i" > "$work/load.log" 2>&1 &
    driver=$!
    for _ in $(seq 240); do
      [ -s "$work/addr" ] && curl -sf "http://$(cat "$work/addr")/readyz" >/dev/null && break
      sleep 0.5
    done
    vg=$(pgrep -f -- "--callgrind-out-file=$work/cg$i" | head -1)
    [ -n "$vg" ] || { cat "$work/load.log"; echo "$0: the deliverer did not start"; exit 1; }
    callgrind_control -z "$vg" >/dev/null 2>&1
    from=$(deliveries)
    last=-1
    for _ in $(seq 300); do
      now=$(deliveries)
      [ "$now" -ge "$want" ] && [ "$now" = "$last" ] && break
      last=$now
      sleep 1
    done
    callgrind_control -d "$vg" >/dev/null 2>&1
    n=$(( $(deliveries) - from ))
    wait "$driver" || { cat "$work/load.log"; echo "$0: swallow-load failed"; exit 1; }
    total=$(callgrind_annotate "$work"/cg"$i".*.out.1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "round $round, ${!i}: $total instructions over $n deliveries, $((total / n)) per delivery"
  done
done

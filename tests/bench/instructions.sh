#!/bin/bash
# Instructions per message of one stage, for one or two binaries of it
# (say, before and after a change), counted by callgrind, which counts the
# same on a busy machine as on a quiet one. Each binary in turn, ROUNDS
# times: the three stages as `swallow-load --latency-only` starts them, the
# one measured under valgrind; its counters are zeroed once it is ready and
# dumped once every event's message through it is counted (the matcher's
# swallow_events_received_total, the deliverer's swallow_deliveries_total,
# the responder's swallow_replies_total), so start-up and shut-down are left
# out. Prints each run's instructions per message, and keeps the profiles
# in KEEP (a directory) when set, for callgrind_annotate.
# Usage: cargo build --profile dist --bins -p swallow-matcher -p swallow-deliverer -p swallow-responder -p swallow-tools -p swallow-load &&
#        bash tests/bench/instructions.sh STAGE target/dist/swallow-STAGE [OTHER-BINARY]
# STAGE is matcher, deliverer or responder.
# Environment: RATE (events/s, 100), SECONDS_LOAD (10), ROUNDS (2), AMQP_URL.
# Needs valgrind (callgrind_control, callgrind_annotate) and curl.
set -euo pipefail
usage="usage: $0 matcher|deliverer|responder BINARY [OTHER-BINARY]"
[ $# -ge 2 ] || { echo "$usage"; exit 2; }
stage=$1
shift
case $stage in
  matcher) counter=swallow_events_received_total ;;
  deliverer) counter=swallow_deliveries_total ;;
  responder) counter=swallow_replies_total ;;
  *) echo "$usage"; exit 2 ;;
esac
stages="swallow-matcher swallow-deliverer swallow-responder"
rate=${RATE:-100}
seconds=${SECONDS_LOAD:-10}
rounds=${ROUNDS:-2}
root=$(cd "$(dirname "$0")/../.." && pwd)
load="$root/target/dist/swallow-load"
for tool in valgrind callgrind_control callgrind_annotate curl; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is not installed"; exit 1; }
done
[ -x "$load" ] || { echo "$0: build first: cargo build --profile dist --bins -p swallow-matcher -p swallow-deliverer -p swallow-responder -p swallow-tools -p swallow-load"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
want=$((rate * seconds))

# A bin dir per binary: the other two stages' dist builds, and the
# stage measured as valgrind running the binary given.
for i in $(seq $#); do
  bin=$(realpath "${!i}")
  mkdir -p "$work/bins$i"
  for other in $stages; do
    [ "$other" = "swallow-$stage" ] || ln -s "$root/target/dist/$other" "$work/bins$i/"
  done
  cat > "$work/bins$i/swallow-$stage" <<EOF
#!/bin/sh
echo "\$SWALLOW_HTTP_ADDR" > "$work/addr"
exec valgrind --tool=callgrind --callgrind-out-file="$work/cg$i.%p.out" "$bin" "\$@"
EOF
  chmod +x "$work/bins$i/swallow-$stage"
done

counted() {
  curl -sf "http://$(cat "$work/addr")/metrics" | awk -v c="$counter" '$1 ~ "^" c "({|$)" {s += $2} END {print s + 0}'
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
    [ -n "$vg" ] || { cat "$work/load.log"; echo "$0: the $stage did not start"; exit 1; }
    callgrind_control -z "$vg" >/dev/null 2>&1
    from=$(counted)
    last=-1
    for _ in $(seq 300); do
      now=$(counted)
      [ "$now" -ge "$want" ] && [ "$now" = "$last" ] && break
      last=$now
      sleep 1
    done
    callgrind_control -d "$vg" >/dev/null 2>&1
    n=$(( $(counted) - from ))
    wait "$driver" || { cat "$work/load.log"; echo "$0: swallow-load failed"; exit 1; }
    total=$(callgrind_annotate "$work"/cg"$i".*.out.1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "round $round, ${!i}: $total instructions over $n messages, $((total / n)) per message"
    if [ -n "${KEEP:-}" ]; then
      mkdir -p "$KEEP"
      cp "$work"/cg"$i".*.out.1 "$KEEP/$stage.$i.round$round.out"
    fi
  done
done

#!/bin/bash
# Where the deliverer's heap goes with ~10,000 HTTP requests under way at
# once (swallow-load's memory step: "all at once" over HTTP/1.1, and over
# HTTP/2 with TLS), by allocation site.
#
# Builds a deliverer with glibc's malloc (its `system-allocator` feature,
# into target/heap: heaptrack hooks malloc, which jemalloc, the releases'
# allocator, does not call), runs `swallow-load --memory-only` with that
# deliverer under heaptrack (Debian's `heaptrack` package), then sums the
# peak heap of each all-at-once deliverer by the innermost frames that are
# not the allocator.
# Usage: cargo build --profile dist --bins -p swallow-matcher -p swallow-deliverer -p swallow-responder -p swallow-tools -p swallow-load &&
#        bash tests/bench/heap.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/stages.sh
command -v heaptrack >/dev/null || { echo "heaptrack is not installed (apt-get install heaptrack)"; exit 1; }
cargo build --profile dist -p swallow-deliverer --features system-allocator --target-dir target/heap
dir=$(mktemp -d)
cp target/dist/swallow-{load,matcher,responder} "$dir/"
cp target/heap/dist/swallow-deliverer "$dir/swallow-deliverer.real"
# Each deliverer's profile is named after its stack's directory (`--config /tmp/swallow-load-<step>-<pid>-<random>/…`).
printf '#!/bin/bash\nstack=$(basename "$(dirname "$2")")\nexec heaptrack -o %s/heap.$stack %s/swallow-deliverer.real "$@" > %s/heaptrack.$stack.log 2>&1\n' \
  "$dir" "$dir" "$dir" > "$dir/swallow-deliverer"
chmod +x "$dir/swallow-deliverer"
# (Into a file: the deliverers under heaptrack outlive swallow-load, holding its stdout.)
"$dir/swallow-load" --memory-only --out "$dir/load.json" --plot "$dir/load.png" > "$dir/load.log" &
load=$!
wait $load
grep -A4 all_at_once "$dir/load.log"
# swallow-load stops the wrappers; the deliverers under heaptrack stop on
# SIGTERM. Until then they may declare their queues again after swallow-load
# deleted them: delete them once they are gone.
pkill -TERM -f "$dir/swallow-deliverer.real" || true
while pgrep -f "$dir/swallow-deliverer.real" >/dev/null; do sleep 1; done
for stack in default all h2; do delete_prefix "load-mem-$stack-$load"; done
sleep 2
for case in all:all_at_once h2:all_at_once_http2; do
  stack=${case%%:*} label=${case#*:}
  profile=$(ls "$dir"/heap.swallow-load-mem-"$stack"-*.zst | head -1)
  echo "== $label: $profile"
  heaptrack_print -f "$profile" --flamegraph-cost-type peak -F "$dir/stacks.$stack.txt" >/dev/null
  python3 - "$dir/stacks.$stack.txt" "$(python3 -c "import json,sys; print(json.load(open('$dir/load.json'))['in_flight_max_$label'])")" <<'PY'
import collections, re, sys
allocator = ("alloc::", "5alloc", "std3sys5alloc", "__rdl_alloc", "aligned_malloc", "box_new", "raw_vec", "realloc")
by, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, cost = line.rstrip().rpartition(" ")
    total += int(cost)
    frames = [f for f in stack.split(";") if f and not any(a in f for a in allocator)]
    name = lambda f: re.sub(r"::h[0-9a-f]{16}", "", re.sub(r" \(.*\)", "", f))[:90]
    # The innermost frame, and the innermost one of the crate that asked.
    owner = next((f for f in reversed(frames) if re.match(r"(_\$LT\$)?(hyper|h2|rustls|reqwest|lapin|swallow|tokio::runtime)", f)), "")
    by[" <- ".join(dict.fromkeys(name(f) for f in (frames[-1], owner) if f))] += int(cost)
n = float(sys.argv[2])
print(f"peak heap {total / 2**20:.1f} MiB with at most {n:.0f} requests under way ({total / n / 1024:.1f} KiB each); largest sites:")
for site, cost in by.most_common(14):
    print(f"  {cost / 2**20:6.1f} MiB  {cost / n / 1024:5.1f} KiB/request  {site}")
PY
done
rm -f "$dir"/swallow-*
echo "heaptrack data: $dir/heap.*.zst (heaptrack_gui or heaptrack_print reads them)"

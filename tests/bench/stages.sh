# Sourced by the benchmark scripts that start stages themselves.

# start_stage BINARY CONFIG starts a stage on a free loopback port and
# waits (up to 30 s) until it is ready; sets `pid` and `port`.
start_stage() {
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  SWALLOW_HTTP_ADDR=127.0.0.1:$port RUST_LOG=error "$1" --config "$2" &
  pid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
}

# delete_prefix PREFIX deletes every queue and exchange named PREFIX.…
# (what the stages declared), so a run leaves nothing on the broker.
delete_prefix() {
  local prefix=$1 name
  for name in $(rabbitmqctl -q list_queues name | grep "^$prefix\." || true); do
    rabbitmqctl -q delete_queue "$name" >/dev/null
  done
  for name in $(rabbitmqctl -q list_exchanges name | grep "^$prefix\." || true); do
    rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$name\">>), false, <<\"swallow-bench\">>)." >/dev/null
  done
}

# Sourced by the benchmark scripts that start stages themselves:
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

#!/usr/bin/env bash
# swallow's quick start: build the three stages and run them end to end on
# this machine against RabbitMQ on 127.0.0.1:5672 (guest/guest), with the
# example handler. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "No Rust toolchain here; with Docker, run: docker compose -f deploy/compose.yaml up --build" >&2
  exit 1
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && command -v rabbitmq-server >/dev/null 2>&1; then
  echo "Starting RabbitMQ…" >&2
  rabbitmq-server -detached
  for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
fi
cargo build --release --workspace --bins
exec target/release/swallow-quickstart --config deploy/example.toml "$@"

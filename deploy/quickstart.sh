#!/usr/bin/env bash
# swallow's quick start: build the three stages and run them end to end on
# this machine against RabbitMQ on 127.0.0.1:5672 (guest/guest), with the
# example handler. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  if command -v docker >/dev/null 2>&1; then
    # A laptop with only Docker: the same stack in containers (see deploy/compose.yaml).
    exec docker compose -f deploy/compose.yaml up --build
  fi
  echo "quickstart: needs a Rust toolchain and RabbitMQ on 127.0.0.1:5672, or Docker" >&2
  exit 1
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && command -v rabbitmq-server >/dev/null 2>&1; then
  echo "Starting RabbitMQ…" >&2
  rabbitmq-server -detached
  for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
fi
# Only what runs: the stages and swallow-tools (chat tool, example handler,
# quick start), not the test harness or the load generator. The release
# profile builds quickly (Cargo.toml); the packages ask the same features
# of their dependencies as `cargo build --release --workspace` does, so
# alternating with it rebuilds nothing.
cargo build --release --bins -p swallow-matcher -p swallow-deliverer -p swallow-responder -p swallow-tools
exec target/release/swallow-quickstart --config deploy/example.toml "$@"

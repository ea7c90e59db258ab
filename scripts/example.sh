#!/usr/bin/env bash
# Runs the example build: starts a coordinator and a worker on loopback ports
# in a temporary directory, builds examples/hello-c (compile, link, run),
# downloads the linked program and runs it, then stops both servers.
# Usage: scripts/example.sh [path/to/distbuild]
set -euo pipefail
cd "$(dirname "$0")/.."
. ./scripts/env.sh
bin="${1:-$CARGO_TARGET_DIR/release/distbuild}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Starts a server in the background (not in a subshell, so its pid is kept
# and no command substitution waits on its output).
start() {
  local log="$1"; shift
  "$bin" "$@" >/dev/null 2>"$log" &
  pids+=($!)
}

# Prints the address a server logged that it listens on.
address_in() {
  local log="$1"
  for _ in $(seq 1 300); do
    addr="$(sed -n 's/.* listening on //p' "$log" | head -1)"
    if [ -n "$addr" ]; then echo "$addr"; return; fi
    sleep 0.1
  done
  echo "example: the server did not start:" >&2; cat "$log" >&2; exit 1
}

start "$work/coordinator.log" coordinator --listen 127.0.0.1:0 --data-dir "$work/coordinator"
coordinator="$(address_in "$work/coordinator.log")"
start "$work/worker.log" worker --coordinator "$coordinator" --listen 127.0.0.1:0 --cache-dir "$work/worker"
address_in "$work/worker.log" >/dev/null

"$bin" build --coordinator "$coordinator" --graph examples/hello-c/graph.json \
  --source-dir examples/hello-c --output-dir "$work/out"
hello="$(find "$work/out" -name hello -type f)"
echo "example: running the downloaded $(basename "$hello"): $("$hello" "example")"

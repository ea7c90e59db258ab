#!/usr/bin/env bash
# Runs the example build on this machine with nothing set up: `distbuild
# build` starts the workspace's local server (one coordinator and one worker
# in one background process), builds examples/hello-c (two compiles, a link,
# a run of the linked program), downloads the program and runs it; then the
# server is shut down. The server's state goes to a temporary output base.
# Usage: scripts/example.sh [path/to/distbuild]
set -euo pipefail
cd "$(dirname "$0")/.."
. ./scripts/env.sh
bin="${1:-$CARGO_TARGET_DIR/release/distbuild}"
work="$(mktemp -d)"
cleanup() {
  "$bin" shutdown --source-dir examples/hello-c --output-base "$work/base" || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" build --graph examples/hello-c/graph.json --source-dir examples/hello-c \
  --output-base "$work/base" --output-dir "$work/out"
hello="$(find "$work/out" -name hello -type f)"
echo "example: running the downloaded $(basename "$hello"): $("$hello" "example")"

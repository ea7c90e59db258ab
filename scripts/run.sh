#!/usr/bin/env bash
# Sets up a fresh Debian machine (see setup.sh), builds distbuild and runs
# the example: a local build of examples/hello-c on the workspace's local
# server (scripts/example.sh). The benchmarks are scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. ./scripts/env.sh
cargo build --release --locked --bin distbuild
./scripts/example.sh "$CARGO_TARGET_DIR/release/distbuild"

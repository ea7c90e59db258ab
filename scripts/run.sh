#!/usr/bin/env bash
# Sets up a fresh Debian machine (see setup.sh), builds distbuild, runs the
# example build (scripts/example.sh), then the benchmarks: build throughput
# against ninja (one coordinator and three), replication and failover
# (commands per second, the stall a leader kill causes), and raft-store
# appends against the disk's fsync rate.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. ./scripts/env.sh
cargo build --release --locked --bin distbuild
./scripts/example.sh "$CARGO_TARGET_DIR/release/distbuild"
cargo bench --locked --bench build
cargo bench --locked --bench failover
cargo bench --locked -p distbuild-raft-store --bench append

#!/usr/bin/env bash
# Sets up a fresh Debian machine (see setup.sh), builds distbuild and runs it.
# Until the end-to-end issue lands, "running" is the raft-store append
# benchmark, which prints appends per second and latency beside the disk's
# raw fdatasync rate.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. ./scripts/env.sh
cargo build --release --locked --bin distbuild
cargo bench --locked -p distbuild-raft-store --bench append

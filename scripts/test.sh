#!/usr/bin/env bash
# Sets up a fresh Debian machine (see setup.sh) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. ./scripts/env.sh
cargo test --workspace --all-targets --locked

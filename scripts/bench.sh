#!/usr/bin/env bash
# Runs the benchmarks the README's performance section quotes: build
# throughput against ninja (one coordinator and three), locality,
# replication and failover (commands per second, the stall a leader kill
# causes), raft-store appends against the disk's fsync rate, and the soak
# (coordinator disk and memory over 200 builds with garbage collection),
# what TLS and the job sandbox cost per job, Bazel building zlib
# locally against remotely, a C project (zlib, bzip2 and lz4) on
# distbuild against ninja, and 20,000 sources with nothing or one file
# changed against ninja.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. ./scripts/env.sh
cargo bench --locked --bench build
cargo bench --locked --bench locality
cargo bench --locked --bench failover
cargo bench --locked --bench soak
cargo bench --locked --bench security
cargo bench --locked --bench bazel
cargo bench --locked --bench cproject
cargo bench --locked --bench sources
cargo bench --locked -p distbuild-raft-store --bench append

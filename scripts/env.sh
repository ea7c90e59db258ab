# Sourced by the scripts: one target directory shared by every build here, so
# RocksDB (about 12 minutes on two cores) is compiled once per machine.
# Never vary RUSTFLAGS between builds: it rebuilds everything.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/distbuild-target}"

#!/usr/bin/env bash
# Installs what building distbuild needs on a fresh Debian machine that has
# the Rust toolchain: libclang (RocksDB's bindgen) and a C++ compiler.
# protoc is not needed: the build uses a vendored one. ninja is what the build
# benchmark compares against; iproute2 (`ip`) builds the network namespaces of
# the partition test (tests/partition.rs); bubblewrap (`bwrap`) is the
# workers' job sandbox. Bazel (Debian's bazel-bootstrap, 4.2.3, with the
# C++ and Java rules it would otherwise download) is the Remote Execution
# API client of tests/bazel.rs. Chromium is the browser tests/status_page.rs
# loads the coordinators' status page in (headless); curl speaks HTTPS to the
# metrics port in tests/security.rs.
set -euo pipefail

packages=(libclang-dev clang g++ make pkg-config ninja-build iproute2 bubblewrap curl
  bazel-bootstrap bazel-rules-cc bazel-rules-java chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

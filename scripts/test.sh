#!/usr/bin/env bash
# The test command: formatting, then every test of the workspace. Always the same cargo
# selection (--workspace --all-targets): another one rebuilds RocksDB's C++ from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo fmt --all -- --check
cargo nextest run --workspace --all-targets --no-fail-fast

#!/usr/bin/env bash
# The test command: formatting, clippy and rustdoc without warnings, then every test of the
# workspace (the fuzz targets' corpora included). Always the same cargo
# selection (--workspace --all-targets): another one rebuilds RocksDB's C++ from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-kafka.sh
source scripts/setup-temporal.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo nextest run --workspace --all-targets --no-fail-fast

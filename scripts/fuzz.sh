#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a fixed time and prints how many
# inputs each one executed.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     default 60; CI runs 15
#
# Exits non-zero when any target crashes, times out or leaks; the input that
# did it is saved under fuzz/artifacts/TARGET/ and named in the output.
# Environment: TARGETS (space-separated, default: all), FUZZ_LOGS (keep
# libFuzzer's logs in this directory instead of a temporary one),
# FUZZ_CODEGEN_UNITS (default 1, cargo-fuzz's own default and the fastest
# fuzzing; CI uses 16, which builds much faster on two cores).
#
# The toolchain is stable; cargo-fuzz needs nightly-only flags
# (-Zsanitizer), so RUSTC_BOOTSTRAP=1 unlocks them on stable.
set -euo pipefail

SECONDS_PER_TARGET=${1:-60}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

cd "$ROOT/fuzz"
TARGETS=${TARGETS:-$(cargo fuzz list | tr '\n' ' ')}
LOGS=${FUZZ_LOGS:-$(mktemp -d)}
# Build and run must agree on flags, or `run` rebuilds everything.
BUILD=(--codegen-units "${FUZZ_CODEGEN_UNITS:-1}")
mkdir -p "$LOGS"

# One build for all targets, so the time below is spent fuzzing.
cargo fuzz build "${BUILD[@]}" 2>&1 | tail -n 3

rows=()
status=0
for target in $TARGETS; do
  # New inputs go to the first directory (ignored by git); seeds are
  # read-only starting points that are committed.
  corpus="corpus/$target"
  mkdir -p "$corpus"
  seeds=()
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  log="$LOGS/$target.log"
  echo "fuzz: $target for ${SECONDS_PER_TARGET}s"
  result=ok
  if ! cargo fuzz run "${BUILD[@]}" "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 \
    >"$log" 2>&1; then
    result=FAILED
    status=1
    echo "fuzz: $target FAILED; last lines of $log:" >&2
    tail -n 40 "$log" >&2
  fi
  # libFuzzer's final stats; fall back to the last `#N ...` status line.
  execs=$(awk '/stat::number_of_executed_units:/ {n = $2} END {print n}' "$log")
  if [ -z "$execs" ]; then
    execs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
  fi
  rate=$(awk '/stat::average_exec_per_sec:/ {n = $2} END {print n}' "$log")
  units=$(find "$corpus" -type f | wc -l)
  rows+=("| $target | ${SECONDS_PER_TARGET}s | ${execs:-?} | ${rate:-?} | $units | $result |")
done

echo
echo "| target | time | executions | exec/s | corpus | result |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
[ "$status" = 0 ] && echo "fuzz: PASS" || echo "fuzz: FAIL (crashing inputs under fuzz/artifacts/)" >&2
exit "$status"

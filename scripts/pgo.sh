#!/usr/bin/env bash
# Profile-guided build of umbra. An instrumented build serves a short run of
# bench/run.sh's umbra scenarios (plain proxying, 100% mirror, mirror with
# analysis, a blackholed shadow, HTTP/2), and the profile it writes steers
# the optimised build: which code is hot, how it is laid out, what is
# inlined. Measured with the same bench: ~25% less user CPU per request.
#
#   scripts/pgo.sh                              -> target/pgo/umbra (~9 min on two cores)
#   UMBRA_BIN=target/pgo/umbra bench/run.sh     the README's numbers
#
# Needs llvm-profdata from the LLVM that rustc uses: rustup's llvm-tools
# component, added if missing. The training run installs what bench/run.sh
# needs (nginx, wrk, h2load) with apt, as the bench does.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${CARGO_TARGET_DIR:-$ROOT/target}/pgo
log() { echo "[pgo] $*" >&2; }

host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
if [[ ! -x $profdata ]]; then
  log "adding rustup component llvm-tools (for llvm-profdata)"
  rustup component add llvm-tools
fi

rm -rf "$OUT/profiles"
mkdir -p "$OUT/profiles"
cd "$ROOT"

# With an explicit --target, RUSTFLAGS reach umbra's code only, not build
# scripts and proc macros (which would write profiles of their own).
log "instrumented build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$OUT/profiles" \
  cargo build --release --quiet --target "$host" --target-dir "$OUT/instrumented"

log "training: bench/run.sh's umbra scenarios, short rounds"
# Each umbra process writes its profile when it exits (the bench stops them
# with SIGTERM, and umbra shuts down gracefully).
UMBRA_BIN=$OUT/instrumented/$host/release/umbra SCENARIOS='umbra-*' SKIP_ENVOY=1 \
  DURATION=3 ROUNDS=1 C1_DURATION=1 WARMUP=0 RSS_SECONDS=0 \
  RESULTS_MD=$OUT/training.md bench/run.sh >"$OUT/training.log" 2>&1 ||
  { tail -n 30 "$OUT/training.log" >&2; exit 1; }
"$profdata" merge -o "$OUT/umbra.profdata" "$OUT/profiles"

log "optimised build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$OUT/umbra.profdata" \
  cargo build --release --quiet --target "$host" --target-dir "$OUT/optimised"
cp "$OUT/optimised/$host/release/umbra" "$OUT/umbra"
log "done: $OUT/umbra"

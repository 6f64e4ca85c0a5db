#!/usr/bin/env bash
# Profile-guided build of umbra. An instrumented build serves a short run of
# bench/run.sh's umbra scenarios (plain proxying, 100% mirror, mirror with
# analysis, a blackholed shadow, HTTP/2), and the profile it writes steers
# the optimised build: which code is hot, how it is laid out, what is
# inlined. Measured with the same bench: ~25% less user CPU per request.
#
#   scripts/pgo.sh                              -> target/pgo/umbra (~7.5 min on two cores)
#   UMBRA_BIN=target/pgo/umbra bench/run.sh     the README's numbers
#
# Needs llvm-profdata from the LLVM that rustc uses: rustup's llvm-tools
# component, added if missing. The training run installs what bench/run.sh
# needs (nginx, wrk, h2load) with apt, as the bench does.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Absolute: it is baked into the instrumented binary, which runs elsewhere.
OUT=$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")/pgo
log() { echo "[pgo] $*" >&2; }
if [[ -n ${CARGO_ENCODED_RUSTFLAGS:-} ]]; then
  log "CARGO_ENCODED_RUSTFLAGS is set and would override the profile flags; unset it"
  exit 1
fi

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
# Each umbra process writes its profile when it exits: the bench stops
# them with SIGTERM and waits 3 s before SIGKILL, so the drain (shadows to
# the blackhole still in flight) must end sooner.
UMBRA_BIN=$OUT/instrumented/$host/release/umbra UMBRA_ARGS='--drain-timeout 1' \
  SCENARIOS='umbra-*' SKIP_ENVOY=1 DURATION=3 ROUNDS=1 C1_DURATION=1 WARMUP=0 RSS_SECONDS=0 \
  RESULTS_MD=$OUT/training.md bench/run.sh >"$OUT/training.log" 2>&1 ||
  { tail -n 30 "$OUT/training.log" >&2; exit 1; }
"$profdata" merge -o "$OUT/merged.profdata" "$OUT/profiles"
# Named by content: the name is in RUSTFLAGS, so a new profile rebuilds
# every crate (cargo would keep dependencies built with the old one).
profile=$OUT/umbra-$(sha256sum "$OUT/merged.profdata" | cut -c1-16).profdata
rm -f "$OUT"/umbra-*.profdata
mv "$OUT/merged.profdata" "$profile"

log "optimised build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profile" \
  cargo build --release --quiet --target "$host" --target-dir "$OUT/optimised"
cp "$OUT/optimised/$host/release/umbra" "$OUT/umbra"
log "done: $OUT/umbra"

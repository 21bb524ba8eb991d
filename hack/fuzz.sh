#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 10), starting from its
# committed corpus (fuzz/corpus/<target>). New inputs go to a scratch directory, so the
# committed corpus only changes when you copy finds into it on purpose.
#
#   hack/fuzz.sh            # CI: 10 s per target
#   hack/fuzz.sh 3600 twin_payload   # a long run of one target, by hand
#   KEDGE_FUZZ_WORK=/var/tmp/kedge-fuzz hack/fuzz.sh 600   # keeps the finds for the next run
#
# cargo-fuzz passes nightly-only flags (-Z) to rustc; this machine has one stable toolchain,
# so RUSTC_BOOTSTRAP=1 lets them through. No sanitizer (`-s none`): Rust code is memory safe
# without one, and libFuzzer still catches every panic, abort, timeout and blow-up.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
only=${2:-}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo ">> installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
cd fuzz
echo ">> building the fuzz targets"
cargo fuzz build -s none -O
# KEDGE_FUZZ_WORK: keep what the fuzzer finds across runs (long runs by hand).
if [ -n "${KEDGE_FUZZ_WORK:-}" ]; then
  scratch=$KEDGE_FUZZ_WORK
  mkdir -p "$scratch"
else
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
fi
for target in $(cargo fuzz list); do
  [ -n "$only" ] && [ "$target" != "$only" ] && continue
  mkdir -p "$scratch/$target" "corpus/$target"
  echo ">> fuzzing $target for ${seconds}s"
  # -rss_limit_mb: a run that needs more memory than this for one input is a finding too.
  if ! cargo fuzz run -s none -O "$target" "$scratch/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      > "$scratch/$target.log" 2>&1; then
    tail -n 60 "$scratch/$target.log" >&2
    echo "error: fuzz target $target failed (the crashing input is under fuzz/artifacts/$target)" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" \
    "$scratch/$target.log" | tr '\n' ' '
  echo
done

#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of the parsers that read
# untrusted input: `/verify` bodies (fuzz target verify_json) and Envoy
# CheckRequests through the shipped route map (check_request). Each target
# runs for a bounded time from the committed seeds (fuzz/seeds/<target>) plus
# whatever an earlier run kept (fuzz/corpus/<target>, not committed); any
# crash, broken invariant, leak, timeout or out-of-memory fails the script,
# with the input in fuzz/artifacts/<target>/. One summary line per target.
#
# Usage: scripts/fuzz.sh [SECONDS]   seconds per target, default 60
#
# Works on the stable toolchain: cargo-fuzz passes nightly-only -Z flags, so
# RUSTC_BOOTSTRAP=1 is set here. AddressSanitizer links on stable Linux x86_64
# (CASF_FUZZ_SANITIZER=none turns it off where it does not). The fuzz crate is
# its own workspace with its own target dir (fuzz/target): the main build and
# its target/ are untouched. See docs/testing.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-60}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS]  (seconds per target, a positive integer)" >&2
  exit 2
fi
targets=(verify_json check_request)
sanitizer=${CASF_FUZZ_SANITIZER:-address}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

cd fuzz
# One build for both targets; 16 codegen units build several times faster
# than cargo-fuzz's default of 1, for somewhat slower execution. `run` below
# passes the same flags, so it reuses this build.
build_flags=(--sanitizer "$sanitizer" --codegen-units 16)
cargo fuzz build "${build_flags[@]}"

summaries=()
status=0
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  log="target/fuzz-$target.log"
  echo "fuzz: $target for ${seconds}s"
  set +e
  # -timeout: an input that takes 10 s is a hang, reported as a failure.
  cargo fuzz run "${build_flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -dict="dict/$target.dict" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  # The last status line, e.g. "#123456 DONE cov: 2345 ft: 6789 corp: 321/45Kb ...".
  last=$(grep -E '^#[0-9]+[[:space:]]+[A-Z]+[[:space:]]+cov:' "$log" | tail -n 1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$last")
  runs=$(sed -nE 's/^stat::number_of_executed_units:[[:space:]]+([0-9]+)/\1/p' "$log" | tail -n 1)
  speed=$(sed -nE 's/^stat::average_exec_per_sec:[[:space:]]+([0-9]+)/\1/p' "$log" | tail -n 1)
  if [[ $rc -eq 0 ]]; then
    result=ok
  else
    result="FAILED (exit $rc)"
    status=1
    echo "fuzz: $target failed; the end of its log ($log):" >&2
    tail -n 40 "$log" >&2
  fi
  summaries+=("fuzz $target: $result, ${seconds}s, ${runs:-?} runs, ${speed:-?} exec/s, cov: ${cov:-?} ft: ${ft:-?}, corpus ${corp:-?} (sanitizer $sanitizer)")
done

printf '%s\n' "${summaries[@]}"
exit "$status"

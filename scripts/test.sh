#!/usr/bin/env bash
# The one test command: on a fresh machine with only the Rust toolchain it
# installs and starts the test services (PostgreSQL, Redis, OPA-compatible
# server, and Envoy for the tests to run; see scripts/services.sh), then runs
# fmt, clippy, the observability and deployment checks, the container image
# smoke test (scripts/image.sh), a bounded fuzz run (scripts/fuzz.sh) and
# all tests.
# Extra arguments go to `cargo test`, e.g. scripts/test.sh -- --nocapture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Free disk first: a full run writes about 12 GB (target/, fuzz/target and
# the image build's layers), and running out shows up later as an unrelated
# step failing with "no space left on device".
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
echo "test.sh: $((free_kib / 1024 / 1024)) GiB free on $(df -P . | awk 'NR == 2 { print $6 }')" >&2
if ((free_kib < 12 * 1024 * 1024)); then
  echo "test.sh: warning: less than 12 GiB free; the run may fail for lack of disk" >&2
fi

scripts/services.sh start
# Captured first so a failing `env` stops the script (a failed command
# substitution inside `eval "$(...)"` would be silently ignored).
service_env=$(scripts/services.sh env)
eval "$service_env"
export CASF_TEST_PG_DSN CASF_TEST_REDIS_URL CASF_TEST_OPA_URL \
  CASF_TEST_PG_BIN CASF_TEST_REDIS_SERVER CASF_TEST_PYTHON CASF_TEST_ENVOY

cargo fmt --check
cargo clippy --all-targets -- -D warnings
# Shipped alerts and dashboard: promtool, and every metric they use present
# in a live scrape of the release binary (bench.sh reuses this build).
cargo build --release --locked --bin casf-verifier
scripts/check_observability.sh
# The HTTP door's OpenAPI contract: valid, and schemathesis against the live binary.
scripts/check_openapi.sh
# Deployment files, each checked by the tool that consumes it (compose schema,
# kubectl kustomize, Kubernetes schemas), then the image built from the
# Dockerfile and smoke-tested from outside the running container.
scripts/check_deploy.sh
scripts/image.sh smoke
# Benchmarks in smoke mode: every row must run and produce numbers; no timing is asserted.
scripts/bench.sh --smoke
# Coverage-guided fuzzing of the /verify and CheckRequest parsers, bounded:
# the build (own target dir, fuzz/target) plus 45 s per target.
scripts/fuzz.sh 45

# The test suite last, with one closing count over all test binaries.
mkdir -p target
set +e
cargo test --all-targets "$@" 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' target/test-output.log
exit "$status"

#!/usr/bin/env bash
# Reproducible benchmark matrix; rewrites BENCHMARKS.md.
#
#   scripts/bench.sh          full run (about 10 minutes on 2 cores)
#   scripts/bench.sh --smoke  a few seconds per row, for CI: proves every row
#                             runs and yields numbers; timings mean nothing
#
# It starts the same services as the tests (scripts/services.sh), runs the
# verifier from target/release on loopback ports of its own, and drives it
# with examples/loadgen.rs, which shares the machine's cores with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

SMOKE=0
[[ ${1:-} == --smoke ]] && SMOKE=1
if ((SMOKE)); then DURATION=1; WARMUP=0.3; AUDIT_EVENTS=2000; OUT=${BENCH_OUT:-target/bench/BENCHMARKS.smoke.md}
else DURATION=10; WARMUP=2; AUDIT_EVENTS=60000; OUT=BENCHMARKS.md; fi

WORK=$REPO/target/bench
RESULTS=$WORK/results.jsonl
HTTP_PORT=18080
mkdir -p "$WORK"
: >"$RESULTS"

log() { echo "bench: $*" >&2; }

cargo build --release --quiet --bin casf-verifier --example loadgen --example auditbench
BIN=$REPO/target/release/casf-verifier
LOADGEN=$REPO/target/release/examples/loadgen
AUDITBENCH=$REPO/target/release/examples/auditbench

scripts/services.sh start
service_env=$(scripts/services.sh env)
eval "$service_env"
PG_ROOT_DSN=${CASF_TEST_PG_DSN%/*}

# A fresh, migrated database per backend row, so rows do not share a chain.
fresh_pg() {
  local name="casf_bench_$1"
  psql "$CASF_TEST_PG_DSN" -qc "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
  PG_DSN="$PG_ROOT_DSN/$name" "$BIN" migrate >/dev/null
  echo "$PG_ROOT_DSN/$name"
}

VERIFIER_PID=
stop_verifier() {
  if [[ -n $VERIFIER_PID ]]; then
    kill "$VERIFIER_PID" 2>/dev/null || true
    wait "$VERIFIER_PID" 2>/dev/null || true
    VERIFIER_PID=
  fi
}
trap stop_verifier EXIT

# start_verifier NAME VAR=VALUE...: runs the verifier with exactly these
# backend variables and records how long it took until /health answered.
start_verifier() {
  local name=$1
  shift
  rm -f "$WORK/$name.db"*
  local started
  started=$(date +%s%N)
  env -i PATH="$PATH" RUST_LOG=warn CASF_HTTP_ADDR=127.0.0.1:$HTTP_PORT \
    CASF_AUDIT_SQLITE="$WORK/$name.db" "$@" "$BIN" 2>"$WORK/$name.log" &
  VERIFIER_PID=$!
  local deadline=$((SECONDS + 30))
  until curl -fs "http://127.0.0.1:$HTTP_PORT/health" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { cat "$WORK/$name.log" >&2; log "$name did not start"; exit 1; }
    kill -0 "$VERIFIER_PID" 2>/dev/null || { cat "$WORK/$name.log" >&2; log "$name exited"; exit 1; }
    sleep 0.01
  done
  local ready_ms=$(( ($(date +%s%N) - started) / 1000000 ))
  echo "{\"row\":\"startup\",\"backends\":\"$name\",\"ready_ms\":$ready_ms}" >>"$RESULTS"
}

# load BACKENDS DOOR LOADGEN-ARGS...: one loadgen run, appended to the results.
load() {
  local backends=$1 door=$2
  shift 2
  log "$backends / $door: $*"
  "$LOADGEN" --door "$door" --url "http://127.0.0.1:$HTTP_PORT" --duration "$DURATION" --warmup "$WARMUP" \
    --pid "$VERIFIER_PID" --json "$@" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["row"]="load"; r["backends"]=sys.argv[1]; r["args"]=sys.argv[2]; print(json.dumps(r))' \
      "$backends" "$*" >>"$RESULTS"
}

# The load matrix for one backend profile on the HTTP door.
matrix() {
  local backends=$1
  load "$backends" http --scenario mix --connections 256
  load "$backends" http --scenario write-allow --connections 256
  load "$backends" http --scenario read-allow --connections 64
  load "$backends" http --scenario mix --rate 1000 --connections 64
}

start_verifier embedded
matrix embedded
stop_verifier

start_verifier pg-redis-regorus PG_DSN="$(fresh_pg regorus)" REDIS_URL="$CASF_TEST_REDIS_URL"
matrix pg-redis-regorus
stop_verifier

start_verifier pg-redis-opa PG_DSN="$(fresh_pg opa)" REDIS_URL="$CASF_TEST_REDIS_URL" OPA_URL="$CASF_TEST_OPA_URL"
matrix pg-redis-opa
stop_verifier

# The audit writer alone, one process and then two on one database.
audit_dsn=$(fresh_pg auditbench)
PG_DSN=$audit_dsn "$AUDITBENCH" --events "$AUDIT_EVENTS" |
  python3 -c 'import json,sys; r=json.load(sys.stdin); r["row"]="audit"; r["writers"]=1; print(json.dumps(r))' >>"$RESULTS"
for _ in 1 2; do PG_DSN=$audit_dsn "$AUDITBENCH" --events "$AUDIT_EVENTS" >"$WORK/audit-$_.json" & done
wait
for f in "$WORK"/audit-1.json "$WORK"/audit-2.json; do
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["row"]="audit"; r["writers"]=2; print(json.dumps(r))' "$f" >>"$RESULTS"
done
chain=$(PG_DSN=$audit_dsn "$BIN" audit verify)
echo "{\"row\":\"audit-verify\",\"result\":$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$chain")}" >>"$RESULTS"

python3 scripts/bench_report.py "$RESULTS" "$OUT" "$SMOKE"
log "wrote $OUT"

#!/usr/bin/env bash
# Reproducible benchmark matrix; rewrites BENCHMARKS.md.
#
#   scripts/bench.sh          full run (about 12 minutes on 2 cores)
#   scripts/bench.sh --smoke  a second or so per row, for CI: proves every row
#                             runs and yields numbers; timings mean nothing
#                             (including one short interleaved round)
#   scripts/bench.sh --interleave [ROUNDS]
#                             only the Envoy rows, with and without ext_authz
#                             alternated for ROUNDS rounds (default 5), for the
#                             full pipeline in both audit spool modes and for
#                             embedded backends; rewrites benches/interleave.md
#                             and its section of BENCHMARKS.md (about 7 minutes);
#                             the full-pipeline rows use a private PostgreSQL
#                             cluster, so that they can issue CHECKPOINT
#
# It starts the same services as the tests (scripts/services.sh), runs the
# verifier from target/release on loopback ports it picks, and drives it
# with examples/loadgen.rs, which shares the machine's cores with it. The
# Envoy rows run a real Envoy (CASF_TEST_ENVOY, --concurrency 1) rendered
# from benches/envoy.yaml.in, in front of examples/upstream.rs: one listener
# with ext_authz to the verifier, one without, in the same run.
#
# With CASF_TEST_PG_DSN already in the environment (services started from
# another checkout, `eval "$(scripts/services.sh env)"`), those services are
# used as they are and nothing is started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

SMOKE=0 INTERLEAVE=0 ROUNDS=5
case ${1:-} in
  --smoke) SMOKE=1 ;;
  --interleave)
    INTERLEAVE=1
    ROUNDS=${2:-5}
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "bench: --interleave takes a number of rounds, got '$ROUNDS'" >&2; exit 2; }
    ;;
  "") ;;
  *) echo "usage: scripts/bench.sh [--smoke | --interleave [ROUNDS]]" >&2; exit 2 ;;
esac
# VERIFY_EVENTS: the chain `audit verify` reads back (1M in a full run).
# The smoke's warm-up is a whole second: a closed-loop row whose first
# requests all outlast warm-up plus duration records nothing.
if ((SMOKE)); then DURATION=1; WARMUP=1; AUDIT_EVENTS=2000; VERIFY_EVENTS=20000; OUT=${BENCH_OUT:-target/bench/BENCHMARKS.smoke.md}
else DURATION=10; WARMUP=2; AUDIT_EVENTS=60000; VERIFY_EVENTS=1000000; OUT=BENCHMARKS.md; fi
# Interleaved rows: 8 s each (8,000 requests, so the p99.9 rests on 8).
((INTERLEAVE)) && { DURATION=${BENCH_ROW_SECONDS:-8}; WARMUP=1; }

WORK=$REPO/target/bench
RESULTS=$WORK/results.jsonl
# Rows through Envoy without ext_authz; bench_report.py looks for this name.
NO_EXT_AUTHZ="none (Envoy → upstream, no ext_authz)"
mkdir -p "$WORK"
: >"$RESULTS"

log() { echo "bench: $*" >&2; }

# One build of everything, so that cargo's feature set does not change
# between the binary and the examples (which would rebuild both).
cargo build --release --quiet --bin casf-verifier --example loadgen --example auditbench --example auditgen --example upstream --example hiccup
BIN=$REPO/target/release/casf-verifier
LOADGEN=$REPO/target/release/examples/loadgen
AUDITBENCH=$REPO/target/release/examples/auditbench
AUDITGEN=$REPO/target/release/examples/auditgen
UPSTREAM=$REPO/target/release/examples/upstream
HICCUP=$REPO/target/release/examples/hiccup

if [[ -n ${CASF_TEST_PG_DSN:-} ]]; then
  log "using the services already in the environment (CASF_TEST_*)"
else
  scripts/services.sh start
  eval "$(scripts/services.sh env)"
fi
for var in CASF_TEST_PG_DSN CASF_TEST_REDIS_URL CASF_TEST_OPA_URL CASF_TEST_ENVOY; do
  [[ -n ${!var:-} ]] || { log "$var is not set: eval \"\$(scripts/services.sh env)\" or unset CASF_TEST_PG_DSN"; exit 1; }
done
PG_ROOT_DSN=${CASF_TEST_PG_DSN%/*}

# A loopback port nothing listens on right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The shipped route map with the identity headers trusted: the loadgen's
# gRPC and Envoy doors name the caller's role and tenant in x-casf-* headers.
ROUTES=$WORK/routes.yaml
sed 's/^\(    trusted: \)false$/\1true/' envoy/routes.yaml >"$ROUTES"
grep -q '^    trusted: true$' "$ROUTES" || { log "could not trust the identity headers in $ROUTES"; exit 1; }

VERIFIER_PID= ENVOY_PID= UPSTREAM_PID=
BENCH_DBS=()
stop() { # stop PID: ours only, by pid
  [[ -n $1 ]] || return 0
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
stop_verifier() { stop "$VERIFIER_PID"; VERIFIER_PID=; }
cleanup() {
  stop_verifier
  if declare -F stop_private_pg >/dev/null; then stop_private_pg; fi
  stop "$ENVOY_PID"
  stop "$UPSTREAM_PID"
  local db
  for db in "${BENCH_DBS[@]}"; do
    psql "$CASF_TEST_PG_DSN" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A fresh, migrated database per backend row, so rows do not share a chain;
# named after this run, so that concurrent runs do not collide, and dropped
# on exit.
fresh_pg() {
  local name="casf_bench_$1_$$"
  PGOPTIONS="-c client_min_messages=warning" psql "$CASF_TEST_PG_DSN" -qc "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
  BENCH_DBS+=("$name")
  PG_DSN="$PG_ROOT_DSN/$name" "$BIN" migrate >/dev/null
  FRESH_DSN=$PG_ROOT_DSN/$name
}

# start_verifier NAME VAR=VALUE...: runs the verifier with exactly these
# backend variables and records how long it took until /health answered;
# then waits for /healthz to be ready (every backend answering), so that a
# row does not start while a backend is still being reached.
start_verifier() {
  local name=$1
  shift
  rm -f "$WORK/$name.db"*
  HTTP_PORT=$(free_port)
  GRPC_PORT=$(free_port)
  local started
  started=$(date +%s%N)
  env -i PATH="$PATH" RUST_LOG=warn MIMALLOC_PURGE_DELAY=100 MIMALLOC_ARENA_EAGER_COMMIT=0 CASF_HTTP_ADDR=127.0.0.1:$HTTP_PORT CASF_GRPC_ADDR=127.0.0.1:$GRPC_PORT \
    CASF_ROUTES="$ROUTES" CASF_AUDIT_SQLITE="$WORK/$name.db" "$@" "$BIN" 2>"$WORK/$name.log" &
  VERIFIER_PID=$!
  local deadline=$((SECONDS + 30))
  # HEALTH_CURL: how to reach /health (the TLS rows set it to https with the test CA).
  until curl -fs ${HEALTH_CURL:-} "${HEALTH_SCHEME:-http}://127.0.0.1:$HTTP_PORT/health" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { cat "$WORK/$name.log" >&2; log "$name did not start"; exit 1; }
    kill -0 "$VERIFIER_PID" 2>/dev/null || { cat "$WORK/$name.log" >&2; log "$name exited"; exit 1; }
    sleep 0.01
  done
  local ready_ms=$(( ($(date +%s%N) - started) / 1000000 ))
  echo "{\"row\":\"startup\",\"backends\":\"$name\",\"ready_ms\":$ready_ms}" >>"$RESULTS"
  until curl -fs ${HEALTH_CURL:-} "${HEALTH_SCHEME:-http}://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { curl -s ${HEALTH_CURL:-} "${HEALTH_SCHEME:-http}://127.0.0.1:$HTTP_PORT/healthz" >&2; log "$name is not ready"; exit 1; }
    sleep 0.05
  done
}

# The upstream and the Envoy in front of it, for the Envoy rows of one
# verifier (its gRPC port is in the rendered config).
start_envoy() {
  "$UPSTREAM" --addr 127.0.0.1:0 >"$WORK/upstream.out" 2>"$WORK/upstream.log" &
  UPSTREAM_PID=$!
  local deadline=$((SECONDS + 30))
  until grep -q '^LISTENING ' "$WORK/upstream.out" 2>/dev/null; do
    ((SECONDS < deadline)) && kill -0 "$UPSTREAM_PID" 2>/dev/null || { cat "$WORK/upstream.log" >&2; log "upstream did not start"; exit 1; }
    sleep 0.01
  done
  UPSTREAM_PORT=$(awk '/^LISTENING /{print $2; exit}' "$WORK/upstream.out")
  AUTHZ_PORT=$(free_port)
  PLAIN_PORT=$(free_port)
  local admin_port
  admin_port=$(free_port)
  sed -e "s/@AUTHZ_PORT@/$AUTHZ_PORT/g" -e "s/@PLAIN_PORT@/$PLAIN_PORT/g" -e "s/@ADMIN_PORT@/$admin_port/g" \
    -e "s/@GRPC_PORT@/$GRPC_PORT/g" -e "s/@UPSTREAM_PORT@/$UPSTREAM_PORT/g" benches/envoy.yaml.in >"$WORK/envoy.yaml"
  if grep -v '^ *#' "$WORK/envoy.yaml" | grep -q '@[A-Z_]*@'; then log "unrendered placeholder in $WORK/envoy.yaml"; exit 1; fi
  # One worker thread: the two cores are shared with the verifier and loadgen.
  "$CASF_TEST_ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning \
    >/dev/null 2>"$WORK/envoy.log" &
  ENVOY_PID=$!
  deadline=$((SECONDS + 30))
  until curl -fs "http://127.0.0.1:$admin_port/ready" >/dev/null 2>&1 &&
    curl -fs "http://127.0.0.1:$PLAIN_PORT/" >/dev/null 2>&1; do
    ((SECONDS < deadline)) && kill -0 "$ENVOY_PID" 2>/dev/null || { cat "$WORK/envoy.log" >&2; log "envoy did not start"; exit 1; }
    sleep 0.05
  done
}

stop_envoy() {
  stop "$ENVOY_PID"; ENVOY_PID=
  stop "$UPSTREAM_PID"; UPSTREAM_PID=
}

# load BACKENDS DOOR URL LOADGEN-ARGS...: one loadgen run, appended to the results.
load() {
  local backends=$1 door=$2 url=$3
  shift 3
  log "$backends / $door: $*"
  local tag='{}'
  [[ -z ${INTERLEAVE_TAG:-} ]] || tag=$INTERLEAVE_TAG
  "$LOADGEN" --door "$door" --url "$url" --duration "$DURATION" --warmup "$WARMUP" \
    --pid "$VERIFIER_PID" --json "$@" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["row"]="load"; r["backends"]=sys.argv[1]; r["args"]=sys.argv[2]; r.update(json.loads(sys.argv[3])); print(json.dumps(r))' \
      "$backends" "$*" "$tag" >>"$RESULTS"
}

# The load matrix for one backend profile on the HTTP door.
matrix() {
  local backends=$1 url=http://127.0.0.1:$HTTP_PORT
  load "$backends" http "$url" --scenario mix --connections 256
  load "$backends" http "$url" --scenario write-allow --connections 256
  load "$backends" http "$url" --scenario read-allow --connections 64
  load "$backends" http "$url" --scenario mix --rate 1000 --connections 64
}

# envoy_rows BACKENDS: plain Envoy → upstream, then the same calls through
# ext_authz to the running verifier; both at 1,000/s in one Envoy.
envoy_rows() {
  start_envoy
  load "$NO_EXT_AUTHZ" envoy "http://127.0.0.1:$PLAIN_PORT" --scenario mix --rate 1000 --connections 16
  load "$1" envoy "http://127.0.0.1:$AUTHZ_PORT" --scenario mix --rate 1000 --connections 16
  stop_envoy
}

# A private PostgreSQL cluster (CASF_TEST_PG_BIN) on a free loopback port,
# trusted on loopback and torn down on exit: the interleaved rows issue
# CHECKPOINT, which the shared test server does not allow its user.
PRIVATE_PG=
as_postgres() {
  if (($(id -u) == 0)); then runuser -u postgres -- "$@"; else "$@"; fi
}
private_pg() {
  [[ -n ${CASF_TEST_PG_BIN:-} ]] || { log "CASF_TEST_PG_BIN is not set: eval \"\$(scripts/services.sh env)\""; exit 1; }
  PRIVATE_PG=$(mktemp -d /tmp/casf-bench-pg-XXXXXX)
  (($(id -u) == 0)) && chown postgres:postgres "$PRIVATE_PG"
  as_postgres "$CASF_TEST_PG_BIN/initdb" -D "$PRIVATE_PG/data" -U postgres --encoding=UTF8 --no-locale --auth=trust >/dev/null
  local port
  port=$(free_port)
  as_postgres "$CASF_TEST_PG_BIN/pg_ctl" -D "$PRIVATE_PG/data" -l "$PRIVATE_PG/log" -w \
    -o "-p $port -k $PRIVATE_PG -c listen_addresses=127.0.0.1" start >/dev/null
  PRIVATE_DSN=postgres://postgres@127.0.0.1:$port/postgres
  PG_DSN=$PRIVATE_DSN "$BIN" migrate >/dev/null
}
stop_private_pg() {
  [[ -n $PRIVATE_PG ]] || return 0
  as_postgres "$CASF_TEST_PG_BIN/pg_ctl" -D "$PRIVATE_PG/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PRIVATE_PG"
  PRIVATE_PG=
}

# interleave ROUNDS RESULTS: the Envoy rows of each profile, the listener
# without ext_authz and the one with it alternated (their order swapped every
# round, so a drift of the shared machine weighs on both alike), ROUNDS
# times, into RESULTS. The full-pipeline profiles run in both audit spool
# modes; in their rows a PostgreSQL CHECKPOINT is issued halfway through,
# so the p99.9 is measured while one runs.
interleave() {
  local rounds=$1 results=$2 saved=$RESULTS
  RESULTS=$results
  : >"$RESULTS"
  # The machine's own floor, in the same run: how long each CPU stops
  # running a ready thread while nothing of ours runs (examples/hiccup.rs).
  local hiccup_seconds=10
  ((SMOKE)) && hiccup_seconds=1
  log "machine stalls: ${hiccup_seconds} s, one spinning thread per CPU, idle otherwise"
  "$HICCUP" --seconds "$hiccup_seconds" --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["row"]="hiccup"; print(json.dumps(r))' >>"$RESULTS"
  local profile
  for profile in embedded outage always; do
    local env=() checkpoint=0
    case $profile in
      embedded) ;;
      *)
        stop_private_pg
        private_pg
        rm -rf "$WORK/spool-$profile"
        env=(PG_DSN="$PRIVATE_DSN" REDIS_URL="$CASF_TEST_REDIS_URL" CASF_AUDIT_SPOOL="$WORK/spool-$profile" CASF_AUDIT_SPOOL_MODE="$profile")
        checkpoint=1
        ;;
    esac
    start_verifier "il-$profile" "${env[@]}"
    start_envoy
    local round
    for ((round = 1; round <= rounds; round++)); do
      local order=(plain authz)
      ((round % 2)) || order=(authz plain)
      local which
      for which in "${order[@]}"; do
        local url=http://127.0.0.1:$PLAIN_PORT
        [[ $which == authz ]] && url=http://127.0.0.1:$AUTHZ_PORT
        local cp_pid=
        if ((checkpoint)); then
          # Halfway through the measured window (a bench pacing, not a test's
          # synchronisation): the checkpoint writes what the row dirtied.
          (sleep "$(python3 -c "print($WARMUP + $DURATION / 2)")" && psql "$PRIVATE_DSN" -qc CHECKPOINT >/dev/null) &
          cp_pid=$!
        fi
        INTERLEAVE_TAG="{\"profile\":\"$profile\",\"round\":$round,\"listener\":\"$which\"}" \
          load "il-$profile" envoy "$url" --scenario mix --rate 1000 --connections 16
        [[ -z $cp_pid ]] || wait "$cp_pid" || true
      done
    done
    stop_envoy
    stop_verifier
    stop_private_pg
  done
  RESULTS=$saved
}

if ((INTERLEAVE)); then
  interleave "$ROUNDS" "$WORK/interleave.jsonl"
  python3 scripts/bench_interleave.py "$WORK/interleave.jsonl" benches/interleave.md BENCHMARKS.md "$ROUNDS" "$DURATION"
  log "wrote benches/interleave.md and its section of BENCHMARKS.md"
  exit 0
fi

start_verifier embedded
matrix embedded
load embedded grpc "http://127.0.0.1:$GRPC_PORT" --scenario mix --connections 256
envoy_rows embedded
stop_verifier

# /verify over TLS against plaintext, back to back in this run: the same
# embedded verifier, plaintext, then HTTPS (CASF_TLS_CERT), then HTTPS with
# client certificates (CASF_TLS_CLIENT_CA); the same closed-loop load on
# kept-alive connections (so handshakes are amortised, as with real clients).
# The certificates are made here with openssl, as in the tests.
PKI=$WORK/pki
rm -rf "$PKI" && mkdir -p "$PKI"
(
  cd "$PKI"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=casf bench ca" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -keyout ca.key -out ca.pem
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
  printf 'subjectAltName=URI:spiffe://bench/loadgen\nextendedKeyUsage=clientAuth\n' >client.ext
  for name in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$name" -keyout $name.key -out $name.csr
    openssl x509 -req -in $name.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile $name.ext -out $name.pem
  done
) >/dev/null 2>&1 || { log "could not make the bench certificates with openssl"; exit 1; }
TLS_VARS=(CASF_TLS_CERT="$PKI/server.pem" CASF_TLS_KEY="$PKI/server.key")
start_verifier "embedded, plaintext"
load "embedded, plaintext" http "http://127.0.0.1:$HTTP_PORT" --scenario mix --connections 256
stop_verifier
HEALTH_SCHEME=https HEALTH_CURL="--cacert $PKI/ca.pem"
start_verifier "embedded, HTTPS" "${TLS_VARS[@]}"
load "embedded, HTTPS" http "https://127.0.0.1:$HTTP_PORT" --scenario mix --connections 256 --ca "$PKI/ca.pem"
stop_verifier
HEALTH_CURL="--cacert $PKI/ca.pem --cert $PKI/client.pem --key $PKI/client.key"
start_verifier "embedded, HTTPS + mTLS" "${TLS_VARS[@]}" CASF_TLS_CLIENT_CA="$PKI/ca.pem"
load "embedded, HTTPS + mTLS" http "https://127.0.0.1:$HTTP_PORT" --scenario mix --connections 256 \
  --ca "$PKI/ca.pem" --client-cert "$PKI/client.pem" --client-key "$PKI/client.key"
stop_verifier
HEALTH_SCHEME= HEALTH_CURL=

fresh_pg regorus
start_verifier pg-redis-regorus PG_DSN="$FRESH_DSN" REDIS_URL="$CASF_TEST_REDIS_URL"
matrix pg-redis-regorus
load pg-redis-regorus grpc "http://127.0.0.1:$GRPC_PORT" --scenario mix --connections 256
load pg-redis-regorus grpc "http://127.0.0.1:$GRPC_PORT" --scenario mix --rate 1000 --connections 64
envoy_rows pg-redis-regorus
stop_verifier

fresh_pg opa
start_verifier pg-redis-opa PG_DSN="$FRESH_DSN" REDIS_URL="$CASF_TEST_REDIS_URL" OPA_URL="$CASF_TEST_OPA_URL"
matrix pg-redis-opa
stop_verifier

# The audit writer alone, one process and then two on one database.
fresh_pg auditbench
audit_dsn=$FRESH_DSN
PG_DSN=$audit_dsn "$AUDITBENCH" --events "$AUDIT_EVENTS" |
  python3 -c 'import json,sys; r=json.load(sys.stdin); r["row"]="audit"; r["writers"]=1; print(json.dumps(r))' >>"$RESULTS"
for writer in 1 2; do PG_DSN=$audit_dsn "$AUDITBENCH" --events "$AUDIT_EVENTS" >"$WORK/audit-$writer.json" & done
wait
for f in "$WORK"/audit-1.json "$WORK"/audit-2.json; do
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["row"]="audit"; r["writers"]=2; print(json.dumps(r))' "$f" >>"$RESULTS"
done
chain=$(PG_DSN=$audit_dsn "$BIN" audit verify)
echo "{\"row\":\"audit-verify\",\"result\":$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$chain")}" >>"$RESULTS"

# `audit verify` on a long chain, written straight through the store by
# auditgen (about a minute per backend for 1M events), then read back by the
# CLI alone. Wall time and the verifier's CPU (its rusage; PostgreSQL's own
# work is not in it), with the load average just before, since the machine
# is shared.
verify_row() { # verify_row BACKEND VAR=VALUE
  local backend=$1
  log "audit verify / $backend: $VERIFY_EVENTS events"
  env -u PG_DSN "$2" "$AUDITGEN" --events "$VERIFY_EVENTS" >/dev/null
  python3 - "$backend" "$VERIFY_EVENTS" env -i "$2" "$BIN" audit verify >>"$RESULTS" <<'PY'
import json, os, resource, subprocess, sys, time
backend, events, command = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
load = os.getloadavg()[0]
started = time.monotonic()
done = subprocess.run(command, capture_output=True, text=True)
seconds = time.monotonic() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"row": "verify", "backend": backend, "events": events, "seconds": round(seconds, 3),
                  "events_per_s": round(events / seconds), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
                  "load": round(load, 2), "exit": done.returncode, "result": done.stdout.strip()[:60]}))
PY
}
rm -f "$WORK"/verify.db*
verify_row sqlite "CASF_AUDIT_SQLITE=$WORK/verify.db"
rm -f "$WORK"/verify.db*
fresh_pg verify
verify_row postgres "PG_DSN=$FRESH_DSN"

# The verifiers' own logs (RUST_LOG=warn) say what a failed row met.
show_logs() {
  local f
  for f in "$WORK"/*.log; do
    [[ -s $f ]] || continue
    echo "--- last lines of $f ($(wc -l <"$f") in all)" >&2
    tail -n 5 "$f" >&2
  done
}
python3 scripts/bench_report.py "$RESULTS" "$OUT" "$SMOKE" || { show_logs; exit 1; }
log "wrote $OUT"
if ((SMOKE)); then
  # One short interleaved round: proves the mode runs and yields numbers.
  interleave 1 "$WORK/interleave.jsonl"
  python3 scripts/bench_interleave.py "$WORK/interleave.jsonl" "$WORK/interleave.smoke.md" "" 1 "$DURATION" --check || { show_logs; exit 1; }
fi

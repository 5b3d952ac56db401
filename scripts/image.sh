#!/usr/bin/env bash
# Build, run and smoke-test the container image from the repository's own
# Dockerfile, on a machine with no Docker engine and no image registry.
#
#   scripts/image.sh base    make the builder's base image locally, if missing
#   scripts/image.sh build   base, then `buildah bud` the Dockerfile as shipped
#   scripts/image.sh run     build, then start the image with embedded backends
#                            in the foreground (Ctrl-C stops it)
#   scripts/image.sh smoke   build, start, check from outside, stop; again with
#                            mTLS on both doors (certificates made by openssl)
#
# Why buildah: as root, `buildah bud --isolation chroot` builds Dockerfiles
# (RUN steps included) and `buildah run --isolation chroot` runs the result,
# where podman cannot (setrlimit is refused in this sandbox) and no Docker
# engine runs.
#
# Why a local base image: no registry is reachable here, so the Dockerfile's
# builder image (the official `rust:<version>-slim-bookworm`) is stood in for
# by one made from the same parts: a Debian bookworm root filesystem from the
# configured apt sources (mmdebstrap, with gcc, libc6-dev and ca-certificates
# as in the official slim image) plus this machine's Rust toolchain of the
# pinned version under /usr/local, with the official image's CARGO_HOME,
# RUSTUP_HOME and PATH. The runtime stage is `FROM scratch` and needs no base.
# The Dockerfile itself is built exactly as users build it.
#
# Environment: CASF_IMAGE (default casf-verifier:latest), CASF_IMAGE_HTTP_PORT
# and CASF_IMAGE_GRPC_PORT (defaults 18000 and 19191, loopback only, for `run`
# and `smoke`), CASF_IMAGE_MAX_BYTES (default 40 MiB).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${CASF_IMAGE:-casf-verifier:latest}
HTTP_PORT=${CASF_IMAGE_HTTP_PORT:-18000}
GRPC_PORT=${CASF_IMAGE_GRPC_PORT:-19191}
MAX_BYTES=${CASF_IMAGE_MAX_BYTES:-$((40 * 1024 * 1024))}
STATE=$REPO/target/image
# Logs and reports go here whichever step runs first (the base image may
# already exist, so no step can count on another to have made it).
mkdir -p "$STATE"
CONTAINER=casf-verifier-smoke

log() { echo "image: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The builder image the Dockerfile names (its RUST_IMAGE default).
rust_image() {
  sed -n 's/^ARG RUST_IMAGE=//p' "$REPO/Dockerfile" | head -n 1
}

install_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v curl >/dev/null || missing+=(curl)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v openssl >/dev/null || missing+=(openssl)
  ((${#missing[@]} == 0)) && return
  [[ $EUID -eq 0 ]] || die "need root to apt-get install ${missing[*]}"
  log "installing ${missing[*]} (apt-get)"
  local apt=(apt-get -q -y -o DPkg::Lock::Timeout=300)
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$STATE"
  "${apt[@]}" update >>"$STATE/install.log" 2>&1 || { tail -n 20 "$STATE/install.log" >&2; die "apt-get update failed"; }
  "${apt[@]}" install --no-install-recommends "${missing[@]}" >>"$STATE/install.log" 2>&1 \
    || { tail -n 20 "$STATE/install.log" >&2; die "apt-get install failed"; }
}

bud() { buildah --storage-driver vfs "$@"; }

image_exists() { bud inspect --type image "$1" >/dev/null 2>&1; }

# ------------------------------------------------------------------- base

cmd_base() {
  install_tools
  local name version sysroot host_version ctr mnt rootfs
  name=$(rust_image)
  [[ -n $name ]] || die "no ARG RUST_IMAGE in the Dockerfile"
  if image_exists "$name"; then log "$name present"; return; fi
  version=${name##*:}
  version=${version%%-*}
  sysroot=$(rustc --print sysroot)
  host_version=$(rustc --version | awk '{print $2}')
  [[ $host_version == "$version" || $host_version == "$version".* ]] \
    || die "the Dockerfile pins Rust $version but this machine has $host_version"

  log "making $name locally: bookworm (mmdebstrap) + Rust $host_version from $sysroot"
  mkdir -p "$STATE"
  rootfs=$STATE/bookworm-rust-rootfs.tar
  # The host's own apt sources, so the root filesystem comes from the
  # configured Debian mirror, whatever it is.
  local sources
  sources=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [[ -n $sources ]] || sources=$(cat /etc/apt/sources.list)
  mmdebstrap --quiet --variant=minbase --include=gcc,libc6-dev,ca-certificates \
    bookworm "$rootfs" - <<<"$sources" >>"$STATE/install.log" 2>&1 \
    || { tail -n 30 "$STATE/install.log" >&2; die "mmdebstrap failed"; }

  ctr=$(bud from scratch)
  mnt=$(bud mount "$ctr")
  tar -C "$mnt" -xf "$rootfs"
  local toolchain=$mnt/usr/local/rustup/toolchains/$host_version-x86_64-unknown-linux-gnu
  mkdir -p "$toolchain" "$mnt/usr/local/cargo/bin"
  # Compilers and the standard library; the documentation (share/) is not needed.
  cp -a "$sysroot"/bin "$sysroot"/lib "$toolchain"/
  [[ -d $sysroot/libexec ]] && cp -a "$sysroot"/libexec "$toolchain"/
  local tool
  for tool in cargo rustc rustdoc; do
    ln -s "../../rustup/toolchains/$host_version-x86_64-unknown-linux-gnu/bin/$tool" \
      "$mnt/usr/local/cargo/bin/$tool"
  done
  # This machine reaches the registries through a proxy whose CA the host
  # trusts; a builder made here must trust what the host trusts, or cargo
  # cannot fetch crates. (An official image on a normal network needs nothing.)
  cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/ca-certificates.crt"
  bud umount "$ctr" >/dev/null
  bud config \
    --env RUSTUP_HOME=/usr/local/rustup \
    --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$host_version" \
    --label org.opencontainers.image.description="local stand-in for $name (scripts/image.sh base)" \
    "$ctr"
  bud commit --quiet --rm "$ctr" "$name" >/dev/null
  rm -f "$rootfs"
  log "$name ready"
}

# ------------------------------------------------------------------ build

cmd_build() {
  cmd_base
  log "building $IMAGE from $REPO/Dockerfile"
  local started=$SECONDS
  # --format docker keeps HEALTHCHECK (OCI image configs have no such field).
  local commit
  commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  bud bud --quiet --isolation chroot --pull-never --format docker \
    --build-arg CASF_BUILD_COMMIT="$commit" \
    -f "$REPO/Dockerfile" -t "$IMAGE" "$REPO" >"$STATE/build.log" 2>&1 \
    || { tail -n 40 "$STATE/build.log" >&2; df -h /var/lib/containers /var/tmp >&2; die "buildah bud failed"; }
  # Each rebuild leaves the previous image untagged; drop those so that
  # repeated runs do not fill the disk (the base image stays).
  bud rmi --prune >/dev/null 2>&1 || true
  log "built $IMAGE in $((SECONDS - started)) s"
}

# -------------------------------------------------------------------- run

# Runs the image's own ENTRYPOINT + CMD, as its own USER and WORKDIR, in a
# fresh container, on the loopback ports given. Extra arguments are
# `--env NAME=VALUE` settings on top of the image's.
start_container() {
  local entrypoint cmd
  bud rm "$CONTAINER" >/dev/null 2>&1 || true
  bud from --quiet --pull-never --name "$CONTAINER" "$IMAGE" >/dev/null
  # TLS_DIR: certificates for the doors, copied in as the runtime user's.
  if [[ -n ${TLS_DIR:-} ]]; then
    bud copy --chown 65532:65532 "$CONTAINER" "$TLS_DIR" /app/tls >/dev/null
  fi
  bud config --env CASF_HTTP_ADDR="127.0.0.1:$HTTP_PORT" \
    --env CASF_GRPC_ADDR="127.0.0.1:$GRPC_PORT" "$@" "$CONTAINER"
  entrypoint=$(bud inspect --type container --format '{{range .Docker.Config.Entrypoint}}{{.}} {{end}}' "$CONTAINER")
  cmd=$(bud inspect --type container --format '{{range .Docker.Config.Cmd}}{{.}} {{end}}' "$CONTAINER")
  [[ -n $entrypoint ]] || die "the image has no ENTRYPOINT"
  # shellcheck disable=SC2086 # word-splitting the image's argv is intended
  exec_container $entrypoint $cmd
}

exec_container() {
  bud run --isolation chroot --network host "$CONTAINER" -- "$@"
}

cmd_run() {
  cmd_build
  log "serving on http://127.0.0.1:$HTTP_PORT and grpc 127.0.0.1:$GRPC_PORT (Ctrl-C stops)"
  trap 'bud rm "$CONTAINER" >/dev/null 2>&1 || true' EXIT
  start_container
}

# ------------------------------------------------------------------ smoke

listener_pid() {
  ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2
}

cmd_smoke() {
  cmd_build
  local failures=0 report=$STATE/smoke.txt
  check() { # check DESCRIPTION COMMAND...
    local what=$1; shift
    if "$@"; then log "ok: $what"; else log "FAILED: $what"; failures=$((failures + 1)); fi
  }
  ! ss -Hltn "sport = :$HTTP_PORT or sport = :$GRPC_PORT" | grep -q . \
    || die "port $HTTP_PORT or $GRPC_PORT is in use"

  # Size: the unpacked image, every layer, as a runtime would hold it.
  local ctr mnt size
  ctr=$(bud from --quiet --pull-never "$IMAGE")
  mnt=$(bud mount "$ctr")
  size=$(du -sb "$mnt" | cut -f1)
  bud umount "$ctr" >/dev/null
  bud rm "$ctr" >/dev/null
  check "image size $size bytes ($((size / 1024 / 1024)) MiB) <= $MAX_BYTES" test "$size" -le "$MAX_BYTES"

  local healthcheck
  healthcheck=$(bud inspect --type image --format '{{range .Docker.Config.Healthcheck.Test}}{{.}} {{end}}' "$IMAGE")
  check "HEALTHCHECK runs the binary's own probe ($healthcheck)" grep -q "casf-verifier healthcheck" <<<"$healthcheck"

  local started_ns ready_ms="" pid="" deadline=$((SECONDS + 30))
  started_ns=$(date +%s%N)
  start_container >"$STATE/container.log" 2>&1 &
  local runner=$!
  trap 'kill_container' EXIT
  until curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/health" 2>/dev/null; do
    kill -0 "$runner" 2>/dev/null || { cat "$STATE/container.log" >&2; die "the container exited"; }
    ((SECONDS < deadline)) || { cat "$STATE/container.log" >&2; die "no /health after 30 s"; }
    sleep 0.02
  done
  ready_ms=$((($(date +%s%N) - started_ns) / 1000000))
  log "/health answered ${ready_ms} ms after the container was started"

  pid=$(listener_pid "$HTTP_PORT")
  local uid
  uid=$(stat -c %u "/proc/$pid" 2>/dev/null || echo unknown)
  check "the server (pid $pid) runs as a non-root uid ($uid)" test "$uid" != 0 -a "$uid" != unknown

  local body
  body=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/health")
  check "/health is ok ($body)" grep -q '"status":"ok"' <<<"$body"
  body=$(curl -sS "http://127.0.0.1:$HTTP_PORT/verify" -H 'content-type: application/json' -d '{
    "request_id": "image-smoke-'"$started_ns"'", "tool": "cliniccloud.create_appointment",
    "mode": "ALLOW", "role": "receptionist", "subject": {"patient_id": "pat-001"},
    "args": {"slot": "2026-12-01T09:00"}, "context": {"tenant_id": "clinic-a"}}')
  check "/verify allows a receptionist's booking ($body)" grep -q '"decision":"ALLOW"' <<<"$body"
  body=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics")
  check "casf_build_info names the commit built ($(grep -o 'casf_build_info{[^}]*}' <<<"$body"))" \
    grep -q "casf_build_info{.*commit=\"$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)\"" <<<"$body"
  body=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/healthz")
  check "/healthz is ready ($body)" grep -q '"status":"ok"' <<<"$body"
  # gRPC health from outside, with the host's own build of the probe.
  local probe=$REPO/target/release/casf-verifier
  [[ -x $probe ]] || cargo build --quiet --release --locked --bin casf-verifier --manifest-path "$REPO/Cargo.toml"
  check "gRPC health answers SERVING" env CASF_GRPC_ADDR="127.0.0.1:$GRPC_PORT" \
    "$probe" healthcheck --grpc
  check "the image's HEALTHCHECK passes inside the container" \
    bud run --isolation chroot --network host "$CONTAINER" -- casf-verifier healthcheck

  {
    echo "date: $(date -u +%FT%TZ)"
    echo "nproc: $(nproc)"
    echo "image: $IMAGE"
    echo "size_bytes: $size"
    echo "health_ready_ms: $ready_ms"
    echo "uid: $uid"
  } >"$report"
  kill_container

  # The same image with TLS and client certificates on both doors: its
  # HEALTHCHECK must still pass (the probe pins the served certificate and
  # presents it as its client certificate).
  local pki=$STATE/pki
  make_pki "$pki"
  TLS_DIR=$pki start_container --env CASF_TLS_CERT=/app/tls/server.pem \
    --env CASF_TLS_KEY=/app/tls/server.key --env CASF_TLS_CLIENT_CA=/app/tls/ca.pem \
    >"$STATE/container-tls.log" 2>&1 &
  runner=$!
  deadline=$((SECONDS + 30))
  local https=(curl -fsS -o /dev/null --cacert "$pki/ca.pem" --cert "$pki/client.pem" --key "$pki/client.key"
    --resolve "casf-verifier:$HTTP_PORT:127.0.0.1" "https://casf-verifier:$HTTP_PORT/health")
  until "${https[@]}" 2>/dev/null; do
    kill -0 "$runner" 2>/dev/null || { cat "$STATE/container-tls.log" >&2; die "the TLS container exited"; }
    ((SECONDS < deadline)) || { cat "$STATE/container-tls.log" >&2; die "no HTTPS /health after 30 s"; }
    sleep 0.05
  done
  check "over mTLS, /health answers a client with a certificate" "${https[@]}"
  check "over mTLS, a client without a certificate gets no answer" \
    bash -c '! curl -fsS -o /dev/null --cacert "$1/ca.pem" --resolve "casf-verifier:$2:127.0.0.1" "https://casf-verifier:$2/health" 2>/dev/null' _ "$pki" "$HTTP_PORT"
  check "the image's HEALTHCHECK passes inside the container with mTLS on the doors" \
    bud run --isolation chroot --network host "$CONTAINER" -- casf-verifier healthcheck
  check "its gRPC probe passes over mTLS too" \
    bud run --isolation chroot --network host "$CONTAINER" -- casf-verifier healthcheck --grpc
  log "report in $report"
  kill_container
  trap - EXIT
  ((failures == 0)) || die "$failures check(s) failed"
  log "smoke passed: ${size} bytes, /health after ${ready_ms} ms, uid $uid"
}

# make_pki DIR: a CA, a server certificate for the doors (also allowed for
# client authentication, so that the probe can present it) and a client's.
make_pki() {
  local dir=$1
  rm -rf "$dir" && mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj "/CN=casf image smoke ca" -addext basicConstraints=critical,CA:TRUE \
      -addext keyUsage=critical,keyCertSign,cRLSign -keyout ca.key -out ca.pem
    printf 'subjectAltName=DNS:casf-verifier\nextendedKeyUsage=serverAuth,clientAuth\n' >server.ext
    printf 'subjectAltName=URI:spiffe://smoke/client\nextendedKeyUsage=clientAuth\n' >client.ext
    local name
    for name in server client; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$name" \
        -keyout "$name.key" -out "$name.csr"
      openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile "$name.ext" -out "$name.pem"
    done
    rm -f ca.key ./*.csr ./*.ext ca.srl
  ) >"$STATE/pki.log" 2>&1 || { cat "$STATE/pki.log" >&2; die "openssl could not make the smoke certificates"; }
}

kill_container() {
  local pid
  pid=$(listener_pid "$HTTP_PORT")
  [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  bud rm "$CONTAINER" >/dev/null 2>&1 || true
}

case ${1:-} in
  base) cmd_base ;;
  build) cmd_build ;;
  run) cmd_run ;;
  smoke) cmd_smoke ;;
  *) echo "usage: $0 base|build|run|smoke" >&2; exit 2 ;;
esac

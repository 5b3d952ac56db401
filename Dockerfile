# syntax=docker/dockerfile:1
# casf-verifier: the policy enforcement point as one small image.
#
#   docker build --build-arg CASF_BUILD_COMMIT=$(git rev-parse --short HEAD) -t casf-verifier .
#   docker run --rm -p 8000:8000 -p 9191:9191 casf-verifier
#
# Two stages. The builder compiles the release binary with the pinned
# toolchain (Cargo.lock is honoured: --locked). The runtime is `scratch`
# plus the stripped binary, the four shared libraries it links (glibc,
# libm, libgcc_s and the loader, copied from the builder so they match what
# it was linked against), the CA bundle, and the files it reads: policies/,
# envoy/routes.yaml and sql/. No shell, no package manager, no curl: the
# HEALTHCHECK is the binary's own `healthcheck` subcommand.

# The MSRV-compatible toolchain this crate is built and tested with (edition 2024).
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm

FROM ${RUST_IMAGE} AS builder
# The commit in casf_build_info: .git is not in the build context, so pass it,
# e.g. --build-arg CASF_BUILD_COMMIT=$(git rev-parse --short HEAD).
ARG CASF_BUILD_COMMIT=unknown
WORKDIR /src
COPY . .
# The cache mounts only speed up rebuilds; the result is the same without them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin casf-verifier \
 && mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/tmp /writable/data \
 && cp target/release/casf-verifier /rootfs/usr/local/bin/ \
 && strip /rootfs/usr/local/bin/casf-verifier
# Exactly the libraries the binary links, from the system it was linked on.
RUN for lib in $(ldd /rootfs/usr/local/bin/casf-verifier | grep -o '/[^ ]*'); do \
      cp --parents -L "$lib" /rootfs; \
    done \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
 && mkdir -p /rootfs/app/envoy \
 && cp -r policies sql /rootfs/app/ \
 && cp envoy/routes.yaml /rootfs/app/envoy/ \
 && chmod 1777 /rootfs/tmp

FROM scratch AS runtime
COPY --from=builder /rootfs/ /
# The audit database's default directory (CASF_AUDIT_SQLITE=data/casf-audit.db),
# the one place the runtime user may write; mount a volume here to keep the
# trail. (Copied as the content of a parent, so that --chown reaches it.)
COPY --from=builder --chown=65532:65532 /writable/ /app/
WORKDIR /app
# Non-root, numeric so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 65532:65532
# The gRPC door binds the container's loopback: JWT claims and identity
# headers are honoured only from an authenticated peer, so a sidecar Envoy
# (same network namespace) may use it as is. To reach it from another
# container, set CASF_GRPC_ADDR=0.0.0.0:9191 with CASF_TLS_CERT, CASF_TLS_KEY
# and CASF_TLS_CLIENT_CA (mTLS), or CASF_GRPC_INSECURE_PEERS=true on a
# network only Envoy reaches (as deploy/compose does).
ENV CASF_HTTP_ADDR=0.0.0.0:8000 \
    CASF_GRPC_ADDR=127.0.0.1:9191 \
    CASF_POLICY_DIR=/app/policies \
    CASF_ROUTES=/app/envoy/routes.yaml \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    MIMALLOC_PURGE_DELAY=100 \
    MIMALLOC_ARENA_EAGER_COMMIT=0
EXPOSE 8000 9191
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["casf-verifier", "healthcheck"]
ENTRYPOINT ["casf-verifier"]
CMD ["serve"]

# One build, two small runtime images:
#   docker build --target gateway  -t shop/gateway .
#   docker build --target services -t shop/services .
# Needs BuildKit (Compose v2 and `docker build` with buildx use it). The cargo registry and
# target directory are cache mounts, so a source change rebuilds only the workspace's crates.
#
# Build arguments (defaults are public images; the tests pass local ones, see tests/compose):
#   RUST_IMAGE     the image that compiles the binaries
#   RUNTIME_IMAGE  the image the binaries run in: glibc, uid 65532 free for the runtime user
#   BINARIES       `build` compiles here; `prebuilt` copies `gateway` and `services` from the
#                  context's `.prebuilt/` folder instead (binaries built on the host)
# Both paths give the same layout: /usr/local/bin/{gateway,services}, /etc/gateway/certs,
# /var/lib/gateway/acme.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY gateway gateway
COPY services services
COPY bench/backend bench/backend
COPY bench/bare-pingora bench/bare-pingora
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gateway -p services \
 && mkdir -p /out/certs /out/acme \
 && cp target/release/gateway target/release/services /out/

FROM scratch AS prebuilt
# `.prebuilt/` holds `gateway`, `services`, and empty `certs/` and `acme/`.
COPY .prebuilt/ /out/

FROM ${BINARIES} AS binaries

# The runtime user is 65532 (distroless's `nonroot`), by number so that any base image serves.
FROM ${RUNTIME_IMAGE} AS gateway
COPY --from=binaries /out/gateway /usr/local/bin/gateway
COPY gateway.yaml /etc/gateway/gateway.yaml
# Owned by the runtime user, so a volume mounted here can be written by `gateway certs`.
COPY --from=binaries --chown=65532:65532 /out/certs /etc/gateway/certs
# ACME storage (`tls.acme.storage`): a named volume mounted here starts owned by the runtime
# user, and is what replicas share.
COPY --from=binaries --chown=65532:65532 /out/acme /var/lib/gateway/acme
USER 65532:65532
EXPOSE 8080 8443 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/gateway", "healthcheck", "http://127.0.0.1:9901/ready"]
ENTRYPOINT ["/usr/local/bin/gateway"]
CMD ["run", "-c", "/etc/gateway/gateway.yaml"]

FROM ${RUNTIME_IMAGE} AS services
COPY --from=binaries /out/services /usr/local/bin/services
USER 65532:65532
WORKDIR /home/nonroot
ENTRYPOINT ["/usr/local/bin/services"]

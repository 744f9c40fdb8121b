# syntax=docker/dockerfile:1.7
# One build, two small runtime images:
#   docker build --target gateway  -t shop/gateway .
#   docker build --target services -t shop/services .
# The cargo registry and target directory are BuildKit cache mounts, so a source change
# rebuilds only the workspace's own crates, not the dependencies.

FROM rust:1-bookworm AS build
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
 && mkdir -p /out/certs \
 && cp target/release/gateway target/release/services /out/

# distroless: glibc and CA certificates, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
COPY --from=build /out/gateway /usr/local/bin/gateway
COPY gateway.yaml /etc/gateway/gateway.yaml
# Owned by the runtime user, so a volume mounted here can be written by `gateway certs`.
COPY --from=build --chown=nonroot:nonroot /out/certs /etc/gateway/certs
USER nonroot
EXPOSE 8080 8443 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/gateway", "healthcheck", "http://127.0.0.1:9901/ready"]
ENTRYPOINT ["/usr/local/bin/gateway"]
CMD ["run", "-c", "/etc/gateway/gateway.yaml"]

FROM gcr.io/distroless/cc-debian12:nonroot AS services
COPY --from=build /out/services /usr/local/bin/services
USER nonroot
WORKDIR /home/nonroot
ENTRYPOINT ["/usr/local/bin/services"]

# syntax=docker/dockerfile:1
#
# Sluice proxy image.
#
#   docker build -t <registry>/sluice:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/sluice:0.1.0 --push .
#
# Stage 1 builds the release binary with the workspace's pinned toolchain and
# lock file. The eBPF object of the fast path is committed to the repository,
# so no clang or bpf-linker is needed here.
#
# Stage 2 is distroless (glibc, libgcc, CA certificates, no shell), running as
# the unprivileged "nonroot" user (65532). That is all the proxy needs with the
# fast path off. The fast path needs root with CAP_BPF, CAP_NET_ADMIN and
# CAP_SYS_ADMIN; the Helm chart (charts/sluice, fastPath.mode) grants exactly
# those through the pod's securityContext rather than baking them in here.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io index, downloaded crates and incremental
# build output between builds; the binary is copied out of the cached target
# directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p sluice \
 && install -D -m 0755 target/release/sluice /out/usr/bin/sluice

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Pure-Rust L7 proxy for Cilium-style sidecarless service meshes, configured by CiliumEnvoyConfig" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/usr/bin/sluice /usr/bin/sluice
USER 65532:65532
# metrics (0.0.0.0), health and admin (loopback by default); with the
# chart's hostNetwork these are node ports.
EXPOSE 9964 9878 9901
ENTRYPOINT ["/usr/bin/sluice"]
CMD ["run", "--kubernetes"]

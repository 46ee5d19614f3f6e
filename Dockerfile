# syntax=docker/dockerfile:1
# The three cloudpass images from one file, one target each:
#   docker buildx build --target operator -t <registry>/cloudpass-operator:0.1.0 .
#   docker buildx build --target webhook  -t <registry>/cloudpass-webhook:0.1.0 .
#   docker buildx build --target agent    -t <registry>/cloudpass-agent:0.1.0 .
# Built with the toolchain the workspace is tested with; run on distroless (glibc, CA
# certificates, tzdata; no shell, no package manager) as user 65532, the user the chart
# and the injected agent run as. Each binary sits at /usr/local/bin/<name>: the webhook
# runs `/usr/local/bin/cloudpass-agent probe` as the agent's startup probe.

FROM rust:1.95-bookworm AS source
WORKDIR /src
COPY . .

# One build stage per binary, so that BuildKit builds only what the target needs. The
# registry and target caches are shared; `sharing=locked` serializes parallel builds
# instead of letting them corrupt one target folder.
FROM source AS build-operator
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p cloudpass-operator --bin cloudpass-operator \
    && install -D -m 0755 target/release/cloudpass-operator /out/cloudpass-operator

FROM source AS build-webhook
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p cloudpass-webhook --bin cloudpass-webhook \
    && install -D -m 0755 target/release/cloudpass-webhook /out/cloudpass-webhook

FROM source AS build-agent
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p cloudpass-agent --bin cloudpass-agent \
    && install -D -m 0755 target/release/cloudpass-agent /out/cloudpass-agent

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cloudpass-operator" \
      org.opencontainers.image.description="cloudpass operator: controllers, credential broker and OIDC issuer" \
      org.opencontainers.image.source="https://github.com/cloudpass-dev/cloudpass" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build-operator /out/cloudpass-operator /usr/local/bin/cloudpass-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cloudpass-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS webhook
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cloudpass-webhook" \
      org.opencontainers.image.description="cloudpass mutating admission webhook: injects the credential agent into selected pods" \
      org.opencontainers.image.source="https://github.com/cloudpass-dev/cloudpass" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build-webhook /out/cloudpass-webhook /usr/local/bin/cloudpass-webhook
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cloudpass-webhook"]

FROM gcr.io/distroless/cc-debian12:nonroot AS agent
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cloudpass-agent" \
      org.opencontainers.image.description="cloudpass agent: serves broker credentials to unchanged cloud SDKs on loopback" \
      org.opencontainers.image.source="https://github.com/cloudpass-dev/cloudpass" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build-agent /out/cloudpass-agent /usr/local/bin/cloudpass-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cloudpass-agent"]

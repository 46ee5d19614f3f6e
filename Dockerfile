# syntax=docker/dockerfile:1
# The three cloudpass images from one file, one target each:
#   docker buildx build --target operator -t <registry>/cloudpass-operator:0.1.0 .
#   docker buildx build --target webhook  -t <registry>/cloudpass-webhook:0.1.0 .
#   docker buildx build --target agent    -t <registry>/cloudpass-agent:0.1.0 .
# with, to label the images with their commit and make them reproducible:
#   --build-arg REVISION=$(git rev-parse HEAD) \
#   --build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) \
#   --build-arg CREATED=$(date -u -d @$(git log -1 --format=%ct) +%Y-%m-%dT%H:%M:%SZ) \
#   --output type=image,rewrite-timestamp=true
# `make images` builds the same images without a container engine: it runs the build
# stage's script on the host and interprets the final stages below (e2e/src/images/),
# so everything an image contains is written here. See docs/images.md.
#
# The binaries are fully static (musl), so the images are FROM scratch: the binary at
# /usr/local/bin/<name>, /etc/passwd and /etc/group naming the user 65532 (nonroot) that
# the chart and the injected agent run as, and Debian's CA certificates. No shell, no
# package manager, no libc. The webhook runs `/usr/local/bin/cloudpass-agent probe` as
# the agent's startup probe.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# The one build step, shared with `make images`: a static, optimized build of the three
# binaries (cargo build --locked --target x86_64-unknown-linux-musl; the agent for size),
# staged into /out. The registry and target caches persist between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    images/build-binaries.sh /out

FROM scratch AS operator
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="cloudpass-operator" \
      org.opencontainers.image.description="cloudpass operator: controllers, credential broker and OIDC issuer" \
      org.opencontainers.image.source="https://github.com/cloudpass-dev/cloudpass" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY images/rootfs/ /
COPY --from=build /out/cloudpass-operator /usr/local/bin/cloudpass-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cloudpass-operator"]

FROM scratch AS webhook
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="cloudpass-webhook" \
      org.opencontainers.image.description="cloudpass mutating admission webhook: injects the credential agent into selected pods" \
      org.opencontainers.image.source="https://github.com/cloudpass-dev/cloudpass" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY images/rootfs/ /
COPY --from=build /out/cloudpass-webhook /usr/local/bin/cloudpass-webhook
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cloudpass-webhook"]

FROM scratch AS agent
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="cloudpass-agent" \
      org.opencontainers.image.description="cloudpass agent: serves broker credentials to unchanged cloud SDKs on loopback" \
      org.opencontainers.image.source="https://github.com/cloudpass-dev/cloudpass" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY images/rootfs/ /
COPY --from=build /out/cloudpass-agent /usr/local/bin/cloudpass-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cloudpass-agent"]

#!/usr/bin/env bash
# Builds the three binaries of the cloudpass images, fully static (musl) and optimized
# (the agent for size, see profile_of), and stages them into one folder. The Dockerfile's build stage and the local image
# assembler (`make images`, e2e/src/images/) both run this script, so both build the
# binaries the same way.
#
#   images/build-binaries.sh <out dir>    -> <out dir>/cloudpass-{operator,webhook,agent}
#
# Needs rustup's x86_64-unknown-linux-musl target (added here when rustup is present)
# and musl-gcc (Debian's musl-tools) for the C code of aws-lc-rs. The cargo target
# directory is $CARGO_TARGET_DIR, else <repo>/target: cargo makes a second run a no-op.
set -euo pipefail
out=${1:?usage: images/build-binaries.sh <out dir>}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
triple=x86_64-unknown-linux-musl
binaries=(cloudpass-operator cloudpass-webhook cloudpass-agent)

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
  rustup target add "$triple" >&2
fi
command -v musl-gcc >/dev/null || {
  echo "build-binaries: musl-gcc is missing: install Debian's musl-tools (e2e/tools/node-packages.sh)" >&2
  exit 1
}

# Paths of this machine must not end up in the binaries (panic locations, C asserts): the
# checkout becomes /cloudpass and the cargo home /cargo, for Rust and for C alike. Only
# the musl target's own crates get these flags, not build scripts, so a host build of the
# workspace is not invalidated.
cargo_home=${CARGO_HOME:-$HOME/.cargo}
remap="--remap-path-prefix=$root=/cloudpass --remap-path-prefix=$cargo_home=/cargo"
prefix_map="-ffile-prefix-map=$root=/cloudpass -ffile-prefix-map=$cargo_home=/cargo"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="$remap"
export CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc}
export CFLAGS_x86_64_unknown_linux_musl="$prefix_map"

# The cargo profile of each binary: the agent, in every injected pod, is built for size
# (`agent-image` in Cargo.toml); the operator and the webhook for speed.
profile_of() {
  case $1 in
    cloudpass-agent) echo agent-image ;;
    *) echo release ;;
  esac
}
cargo build --release --locked --target "$triple" -p cloudpass-operator -p cloudpass-webhook --bins
cargo build --profile agent-image --locked --target "$triple" -p cloudpass-agent --bins

target_dir=${CARGO_TARGET_DIR:-target}
for binary in "${binaries[@]}"; do
  built="$target_dir/$triple/$(profile_of "$binary")/$binary"
  # Copy only when the content changed, so that the staged file keeps its identity.
  cmp -s "$built" "$out/$binary" 2>/dev/null || install -m 0755 "$built" "$out/$binary"
done

#!/usr/bin/env bash
# Installs cargo-deny (pinned) from crates.io into a cache outside the repository, and
# reuses it when it is there; `make lint` runs it.
#
#   e2e/tools/cargo-deny.sh            install if needed, print the binary's path last
#   e2e/tools/cargo-deny.sh --print    only print the binary's path
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/cargo-deny/<version>
set -euo pipefail
version=0.20.2
root=${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/cargo-deny/$version
bin="$root/bin/cargo-deny"
if [ "${1:-}" = "--print" ]; then echo "$bin"; exit 0; fi
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
start=$(date +%s)
echo "cargo-deny: building $version into $root (a few minutes, once)" >&2
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
CARGO_TARGET_DIR="$build" cargo install --quiet --locked "cargo-deny@$version" --root "$root" >&2
echo "cargo-deny: ready in $(( $(date +%s) - start ))s" >&2
echo "$bin"

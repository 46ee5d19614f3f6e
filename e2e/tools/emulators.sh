#!/usr/bin/env bash
# Installs the cloud emulators of the scenarios into a cache outside the repository, and
# reuses them when they are there:
#   Azurite (Azure Blob) from npm, with `npm install --prefix`;
#   fake-gcs-server (GCS) from the Go module proxy, with `go install`.
#
#   e2e/tools/emulators.sh            install what is missing, print the bin directory last
#   e2e/tools/emulators.sh --print    only print the bin directory
#
# The bin directory holds `azurite-blob` and `fake-gcs-server`.
# Cache: $CLOUDPASS_EMULATORS_DIR, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/emulators/<first 16 hex of sha256(emulators.env)>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=emulators.env
source "$here/emulators.env"
stamp_want=$(sha256sum "$here/emulators.env" | cut -c1-16)
root=${CLOUDPASS_EMULATORS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/emulators/$stamp_want}
bin="$root/bin"
if [ "${1:-}" = "--print" ]; then echo "$bin"; exit 0; fi

mkdir -p "$bin"
start=$(date +%s)

if [ ! -x "$bin/azurite-blob" ]; then
  command -v npm >/dev/null || { echo "emulators: npm (Node.js 18 or newer) is required for Azurite; none on PATH" >&2; exit 1; }
  echo "emulators: installing Azurite ${AZURITE_VERSION} from npm into $root/node (about a minute, once)" >&2
  npm install --prefix "$root/node" --no-audit --no-fund --loglevel=error "azurite@${AZURITE_VERSION}" >"$root/npm.log" 2>&1 \
    || { cat "$root/npm.log" >&2; echo "emulators: npm install failed (log above)" >&2; exit 1; }
  ln -sf "$root/node/node_modules/.bin/azurite-blob" "$bin/azurite-blob"
fi

if [ ! -x "$bin/fake-gcs-server" ]; then
  command -v go >/dev/null || { echo "emulators: Go is required for fake-gcs-server; none on PATH" >&2; exit 1; }
  echo "emulators: building fake-gcs-server ${FAKE_GCS_SERVER_VERSION} from the Go module proxy (a minute or two, once)" >&2
  CGO_ENABLED=0 GOBIN="$bin" go install -trimpath -ldflags "-s -w" \
    "github.com/fsouza/fake-gcs-server@v${FAKE_GCS_SERVER_VERSION}" >"$root/go.log" 2>&1 \
    || { cat "$root/go.log" >&2; echo "emulators: fake-gcs-server build failed (log above)" >&2; exit 1; }
fi

elapsed=$(( $(date +%s) - start ))
if [ "$elapsed" -gt 1 ]; then echo "emulators: ready in ${elapsed}s in $bin" >&2; else echo "emulators: reusing $bin" >&2; fi
echo "$bin"

#!/usr/bin/env bash
# Builds kube-apiserver, etcd, kubectl and helm from the Go module proxy into a cache
# outside the repository, and reuses them when they are already there.
#
#   e2e/tools/build.sh            build what is missing, print the bin directory last
#   e2e/tools/build.sh --print    only print the bin directory
#
# Cache: $CLOUDPASS_TOOLS_DIR, default ${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/tools/<k8s>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
root=${CLOUDPASS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/tools/v${KUBERNETES_VERSION}}
bin="$root/bin"
if [ "${1:-}" = "--print" ]; then echo "$bin"; exit 0; fi

# The stamp ties the cached binaries to the exact pins that produced them.
stamp_want=$(cat "$here/versions.env" "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
stamp_file="$bin/.stamp"
have() { [ -x "$bin/kube-apiserver" ] && [ -x "$bin/etcd" ] && [ -x "$bin/kubectl" ] && [ -x "$bin/helm" ]; }
if have && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp_want" ]; then
  echo "tools: reusing v${KUBERNETES_VERSION} binaries in $bin" >&2
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "tools: Go is required (https://go.dev/dl); none on PATH" >&2; exit 1; }
mkdir -p "$bin"
log="$root/build.log"
start=$(date +%s)
# A heartbeat, because a cold build prints nothing for minutes.
heartbeat() {
  while sleep 30; do echo "tools: ... still building ($(( $(date +%s) - start ))s, log: $log)" >&2; done
}
heartbeat & hb=$!
trap 'kill $hb 2>/dev/null || true' EXIT

export CGO_ENABLED=0 GOFLAGS=-mod=mod
minor=${KUBERNETES_VERSION#*.}; minor=${minor%%.*}
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=v${KUBERNETES_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor} -X $pkg.gitTreeState=clean"
done

echo "tools: building kube-apiserver, kubectl and etcd v${KUBERNETES_VERSION} from the Go module proxy into $bin" >&2
echo "tools: a cold build downloads ~1 GB of modules and takes several minutes on 2 cores; later runs reuse it" >&2
( cd "$here" && go build -trimpath -ldflags "-s -w $k8s_ldflags" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3 ) >"$log" 2>&1 \
  || { cat "$log" >&2; echo "tools: build failed (log above)" >&2; exit 1; }
mv -f "$bin/server" "$bin/etcd"  # go names the binary after go.etcd.io/etcd/server
echo "tools: kube-apiserver, kubectl, etcd done in $(( $(date +%s) - start ))s" >&2

echo "tools: building helm v${HELM_VERSION}" >&2
GOBIN="$bin" go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v${HELM_VERSION}" \
  "helm.sh/helm/v4/cmd/helm@v${HELM_VERSION}" >>"$log" 2>&1 \
  || { cat "$log" >&2; echo "tools: helm build failed (log above)" >&2; exit 1; }

echo "$stamp_want" > "$stamp_file"
echo "tools: all built in $(( $(date +%s) - start ))s:" >&2
( cd "$bin" && ls -l kube-apiserver etcd kubectl helm | awk '{printf "tools:   %-15s %6.1f MB\n", $9, $5/1048576}' ) >&2
echo "$bin"

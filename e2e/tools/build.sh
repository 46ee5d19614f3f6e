#!/usr/bin/env bash
# Builds the test bed's Go tools from the Go module proxy into a cache outside the
# repository, and reuses them when they are already there: kube-apiserver, etcd, kubectl
# and helm (every suite), and for the real node kube-controller-manager, kube-scheduler,
# kubelet, kube-proxy, containerd (with ctr and its runc shim) and CoreDNS.
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
binaries="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy etcd kubectl helm
  containerd containerd-shim-runc-v2 ctr coredns"
have() { for b in $binaries; do [ -x "$bin/$b" ] || return 1; done; }
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
# A build cache of its own, removed once everything is built: it grows to over 5 GB for
# Kubernetes alone, and the binaries are what is kept. CLOUDPASS_KEEP_GO_CACHE=1 keeps it.
export GOCACHE="$root/go-build"
minor=${KUBERNETES_VERSION#*.}; minor=${minor%%.*}
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=v${KUBERNETES_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor} -X $pkg.gitTreeState=clean"
done

echo "tools: building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl and etcd v${KUBERNETES_VERSION} from the Go module proxy into $bin" >&2
echo "tools: a cold build downloads ~1 GB of modules and takes several minutes on 2 cores; later runs reuse it" >&2
( cd "$here" && go build -trimpath -ldflags "-s -w $k8s_ldflags" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3 ) >"$log" 2>&1 \
  || { cat "$log" >&2; echo "tools: build failed (log above)" >&2; exit 1; }
mv -f "$bin/server" "$bin/etcd"  # go names the binary after go.etcd.io/etcd/server
echo "tools: Kubernetes binaries and etcd done in $(( $(date +%s) - start ))s" >&2

echo "tools: building helm v${HELM_VERSION}" >&2
GOBIN="$bin" go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v${HELM_VERSION}" \
  "helm.sh/helm/v4/cmd/helm@v${HELM_VERSION}" >>"$log" 2>&1 \
  || { cat "$log" >&2; echo "tools: helm build failed (log above)" >&2; exit 1; }

echo "tools: building containerd v${CONTAINERD_VERSION} (with ctr and containerd-shim-runc-v2)" >&2
# The tags leave out the snapshotters that need C libraries; overlayfs stays.
GOBIN="$bin" go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
  -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=v${CONTAINERD_VERSION}" \
  "github.com/containerd/containerd/v2/cmd/containerd@v${CONTAINERD_VERSION}" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@v${CONTAINERD_VERSION}" \
  "github.com/containerd/containerd/v2/cmd/ctr@v${CONTAINERD_VERSION}" >>"$log" 2>&1 \
  || { cat "$log" >&2; echo "tools: containerd build failed (log above)" >&2; exit 1; }

echo "tools: building CoreDNS v${COREDNS_VERSION}" >&2
GOBIN="$bin" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@v${COREDNS_VERSION}" >>"$log" 2>&1 \
  || { cat "$log" >&2; echo "tools: CoreDNS build failed (log above)" >&2; exit 1; }

echo "$stamp_want" > "$stamp_file"
[ "${CLOUDPASS_KEEP_GO_CACHE:-}" = 1 ] || rm -rf "$GOCACHE"
echo "tools: all built in $(( $(date +%s) - start ))s:" >&2
( cd "$bin" && ls -l $binaries | awk '{printf "tools:   %-15s %6.1f MB\n", $9, $5/1048576}' ) >&2
echo "$bin"

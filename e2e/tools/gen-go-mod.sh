#!/usr/bin/env bash
# Regenerates e2e/tools/go.mod and go.sum for the pinned Kubernetes release.
#
# k8s.io/kubernetes cannot be built with `go install pkg@version`: its go.mod replaces
# every staging module (k8s.io/api, k8s.io/client-go, ...) with a local path. A wrapper
# module must replace each of them with the published v0.X.Y tag instead. The list is
# read from that release's own go.mod (served by the Go module proxy), never typed by
# hand, so a version bump is one edit in versions.env plus this script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
k8s="v${KUBERNETES_VERSION}"
staging="v0.${KUBERNETES_VERSION#*.}"
export GOFLAGS=-mod=mod

cd "$here"
gomod_file=$(go mod download -json "k8s.io/kubernetes@${k8s}" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
[ -s "$gomod_file" ] || { echo "could not fetch go.mod of k8s.io/kubernetes@${k8s}" >&2; exit 1; }
go_directive=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod_file")

rm -f go.mod go.sum
go mod init cloudpass.dev/e2e/tools >/dev/null 2>&1
go mod edit -go="$go_directive"
modules=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod_file")
for m in $modules; do
  go mod edit -replace="${m}=${m}@${staging}"
done
echo "replaced $(echo "$modules" | wc -w) staging modules with ${staging}"
go get "k8s.io/kubernetes@${k8s}"
go get -tool k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kubectl
# etcd: the version k8s.io/kubernetes itself was tested with (its go.mod requires it).
etcd_version=$(sed -n 's#^[[:space:]]*go.etcd.io/etcd/server/v3 \(v[0-9.]*\).*#\1#p' "$gomod_file" | head -n1)
go get -tool "go.etcd.io/etcd/server/v3@${etcd_version}"
go mod tidy
echo "go.mod regenerated for Kubernetes ${k8s}, etcd ${etcd_version}"

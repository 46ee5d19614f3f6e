#!/usr/bin/env bash
# Installs the Debian packages a real node of the test bed needs, when they are missing:
# runc, the CNI plugins, iptables and conntrack (kube-proxy), mmdebstrap (the test apps'
# Debian root filesystem) and musl-tools (the static cloudpass binaries of the images).
# containerd is built from the Go module proxy by build.sh, not installed from Debian.
#
#   e2e/tools/node-packages.sh           install what is missing (as root), check versions
#   e2e/tools/node-packages.sh --check   only check; exit 1 with what is missing
#
# The accepted upstream versions are pinned in versions.env (RUNC_SERIES,
# CNI_PLUGINS_SERIES): Debian's security updates change the package revision, never the
# upstream series, so a fresh machine gets the same runc and CNI plugins as CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

# command -> package providing it
declare -A wanted=(
  [runc]=runc
  [/usr/lib/cni/bridge]=containernetworking-plugins
  [iptables]=iptables
  [conntrack]=conntrack
  [mmdebstrap]=mmdebstrap
  [musl-gcc]=musl-tools
)
present() { case "$1" in /*) [ -x "$1" ] ;; *) command -v "$1" >/dev/null ;; esac; }

missing=()
for cmd in "${!wanted[@]}"; do present "$cmd" || missing+=("${wanted[$cmd]}"); done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "${1:-}" = "--check" ]; then
    echo "node: missing Debian packages: ${missing[*]} (install them with e2e/tools/node-packages.sh as root)" >&2
    exit 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "node: the Debian packages ${missing[*]} are missing and installing them needs root:" >&2
    echo "node:   sudo e2e/tools/node-packages.sh   (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "node: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # An apt index older than a day may name package revisions the mirror no longer has.
  log=$(mktemp)
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -n1)" ]; then
    apt-get update -qq >"$log" 2>&1 || { cat "$log" >&2; echo "node: apt-get update failed" >&2; exit 1; }
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1 \
    || { cat "$log" >&2; echo "node: apt-get install failed (log above)" >&2; exit 1; }
  rm -f "$log"
fi

# The upstream series (major.minor) must be the pinned one.
series_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null | sed -E 's/^[0-9]+://; s/^([0-9]+\.[0-9]+).*/\1/'; }
check_series() {
  local pkg=$1 want=$2 have
  have=$(series_of "$pkg")
  if [ "$have" != "$want" ]; then
    echo "node: $pkg $have is installed, the test bed is pinned to $want.x (versions.env)" >&2
    exit 1
  fi
}
check_series runc "$RUNC_SERIES"
check_series containernetworking-plugins "$CNI_PLUGINS_SERIES"

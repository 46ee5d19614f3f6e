#!/usr/bin/env bash
# Removes everything a test-bed node (e2e/src/cluster.rs) leaves on this machine, and
# restores the kernel settings it changed. Idempotent: safe after a clean stop, after a
# killed run (stale processes, mounts, cgroups, bridge, iptables rules, containerd
# state), and when nothing ever ran.
#
#   e2e/node/cleanup.sh --start   clean up, then record the kernel settings the node changes
#   e2e/node/cleanup.sh --stop    clean up and restore the recorded kernel settings
#   e2e/node/cleanup.sh           the same as --stop (by hand, after a crash)
#
# Everything the node owns is found by name, never by guessing: the state directories
# ($CLOUDPASS_NODE_DIR, $CLOUDPASS_NODE_RUN_DIR), the kubelet's cgroup root
# `cloudpass-node` in every cgroup v1 hierarchy, the bridge `cloudpass0`, the iptables
# chain CLOUDPASS-NODE and kube-proxy's own chains (removed by `kube-proxy --cleanup`).
set -u
node_dir=${CLOUDPASS_NODE_DIR:-/var/lib/cloudpass-node}
run_dir=${CLOUDPASS_NODE_RUN_DIR:-/run/cloudpass-node}
tools_bin=${CLOUDPASS_TOOLS_BIN:-}
cgroup_name=cloudpass-node
bridge=cloudpass0
chain=CLOUDPASS-NODE
saved=${run_dir}.sysctl
# What the kubelet, the CNI bridge plugin and kube-proxy may change.
sysctls="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
kernel.keys.root_maxbytes net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables
net.bridge.bridge-nf-call-ip6tables net.ipv4.conf.all.route_localnet net.netfilter.nf_conntrack_max
net.netfilter.nf_conntrack_tcp_timeout_established net.netfilter.nf_conntrack_tcp_timeout_close_wait"

mode=${1:---stop}
case "$mode" in --start|--stop) ;; *) echo "usage: $0 [--start|--stop]" >&2; exit 2 ;; esac
if [ "$(id -u)" != 0 ]; then echo "cleanup: a test-bed node needs root; nothing to clean as $(id -un)" >&2; exit 0; fi

# Processes whose command line names the node's directories: kubelet, containerd and its
# shims, kube-proxy, CoreDNS, the control plane of the node cluster, their wrappers.
# This script's own command line does not name them (they come from the environment).
node_pids() {
  pgrep -f -- "${node_dir}(/| |$)|${run_dir}(/| |$)" | grep -vx -e "$$" -e "$PPID" || true
}
# Processes of the pods: everything in the kubelet's cgroup root.
pod_pids() {
  find /sys/fs/cgroup/*/"$cgroup_name" -name cgroup.procs -exec cat {} + 2>/dev/null
}
for round in $(seq 1 50); do
  pids=$( { node_pids; pod_pids; } | sort -u)
  [ -z "$pids" ] && break
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null
  sleep 0.1
done
[ -n "$( { node_pids; pod_pids; } | sort -u)" ] && echo "cleanup: some node processes would not die" >&2
# Empty cgroups, deepest first (kubepods/burstable/pod<uid>/<container> ...).
for root in /sys/fs/cgroup/*/"$cgroup_name"; do
  [ -d "$root" ] && find "$root" -depth -type d -exec rmdir {} + 2>/dev/null
done

# Mounts under the state directories (pod volumes, overlay root filesystems, network
# namespaces, shm), deepest first; a busy one is detached lazily.
for round in 1 2 3; do
  mounts=$(awk -v a="$node_dir" -v b="$run_dir" '
    { m = $5; gsub(/\\040/, " ", m) }
    index(m, a "/") == 1 || m == a || index(m, b "/") == 1 || m == b { print m }' /proc/self/mountinfo | sort -r)
  [ -z "$mounts" ] && break
  while IFS= read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done <<<"$mounts"
done
rm -rf "$node_dir" "$run_dir"
# libcni caches each attachment's result outside containerd's directories.
rm -f /var/lib/cni/results/cloudpass-node-* 2>/dev/null

# Network: the bridge (its veths went with the pods' namespaces), the forwarding guard,
# and the service rules kube-proxy wrote.
ip link show "$bridge" >/dev/null 2>&1 && ip link delete "$bridge"
if command -v iptables >/dev/null; then
  while iptables -w -t mangle -D FORWARD -j "$chain" 2>/dev/null; do :; done
  iptables -w -t mangle -F "$chain" 2>/dev/null && iptables -w -t mangle -X "$chain" 2>/dev/null
  if [ -n "$tools_bin" ] && [ -x "$tools_bin/kube-proxy" ]; then
    "$tools_bin/kube-proxy" --cleanup >/dev/null 2>&1 || echo "cleanup: kube-proxy --cleanup failed" >&2
  fi
  # The kubelet's guard of 127.0.0.0/8 against other hosts, then the empty canary chains
  # the kubelet and kube-proxy create to notice a flush.
  for hook in INPUT OUTPUT; do
    while iptables -w -D "$hook" -j KUBE-FIREWALL 2>/dev/null; do :; done
  done
  iptables -w -F KUBE-FIREWALL 2>/dev/null && iptables -w -X KUBE-FIREWALL 2>/dev/null
  for table in filter nat mangle; do
    for canary in KUBE-KUBELET-CANARY KUBE-PROXY-CANARY KUBE-IPTABLES-HINT; do
      iptables -w -t "$table" -F "$canary" 2>/dev/null && iptables -w -t "$table" -X "$canary" 2>/dev/null
    done
  done
fi

write_sysctl() { echo "$2" > "/proc/sys/${1//.//}" 2>/dev/null; }
case "$mode" in
  --start)
    # A killed run left its record: the values before that run are the real originals.
    if [ ! -f "$saved" ]; then
      for key in $sysctls; do
        value=$(cat "/proc/sys/${key//.//}" 2>/dev/null) && printf '%s=%s\n' "$key" "$value"
      done > "$saved"
    fi
    ;;
  --stop)
    if [ -f "$saved" ]; then
      while IFS='=' read -r key value; do write_sysctl "$key" "$value"; done < "$saved"
      rm -f "$saved"
    fi
    ;;
esac
exit 0

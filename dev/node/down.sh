#!/usr/bin/env bash
# Stops the node dev/node/up.sh started and puts the host back as it was before: no kubelet,
# kube-proxy, containerd, shims or containers, no pod mounts, network namespaces, bridge or veths,
# no netfilter rules of kube-proxy or the CNI plugins, the sysctls and cgroups as they were.
#   dev/node/down.sh CLUSTER_DIR
# Safe to run twice, and after a crash.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=$1
node="$dir/node"
bin="$root/target/tools/bin"
sock="$node/containerd/containerd.sock"
[ -d "$node" ] || exit 0

stop_pid() { # pidfile: TERM, then KILL after 10s
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

crictl() { timeout 60 "$bin/crictl" --runtime-endpoint "unix://$sock" --timeout 20s "$@"; }

# kubelet first, so nothing restarts the pods; then every sandbox stopped and removed through the
# CRI, which runs the CNI DEL that removes each pod's veth, IP and netfilter rules.
stop_pid "$node/kubelet.pid"
stop_pid "$node/kube-proxy.pid"
if [ -f "$node/containerd.pid" ] && kill -0 "$(cat "$node/containerd.pid")" 2>/dev/null; then
  crictl stopp $(crictl pods -q 2>/dev/null) >/dev/null 2>&1
  crictl rmp --all --force >/dev/null 2>&1
fi
stop_pid "$node/containerd.pid"

# What survived a crash: shims and the containers under them, found by their binaries and state
# paths, which are this cluster's own.
for pid in $(ps -eo pid=); do
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
  args=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || continue
  case "$exe $args" in
    "$bin/containerd-shim-runc-v2"*|*"$node/containerd/"*) kill -KILL "$pid" 2>/dev/null ;;
  esac
done
# Processes of the node's containers: those in its cgroups.
for cg in /sys/fs/cgroup/*/kubepods; do
  [ -d "$cg" ] || continue
  find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null
done
sleep 0.5

# Mounts under the cluster directory (pod volumes, overlay rootfs, shm), deepest first.
for _ in 1 2 3; do
  mounts=$(awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r)
  [ -n "$mounts" ] || break
  for m in $mounts; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done
# Pod network namespaces (containerd names them cni-*), bind-mounted under /run/netns.
for ns in /run/netns/cni-*; do
  [ -e "$ns" ] || continue
  umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null
  rm -f "$ns"
done
ip link delete rolemesh0 2>/dev/null || true

# Netfilter: kube-proxy's tables; kubelet's chains (KUBE-FIREWALL, canaries) and the CNI plugins'
# (CNI-*, if a pod's CNI DEL never ran): jumps to them removed, then they are flushed and deleted.
nft delete table ip kube-proxy 2>/dev/null || true
nft delete table ip6 kube-proxy 2>/dev/null || true
for ipt in iptables ip6tables; do
  for table in nat filter mangle; do
    chains=$($ipt-save -t "$table" 2>/dev/null | grep -oE '^:(CNI|KUBE)-[A-Za-z0-9_-]+' | tr -d :)
    [ -n "$chains" ] || continue
    for chain in $chains; do
      $ipt -t "$table" -S 2>/dev/null | grep -E -- "-j $chain( |\$)" | sed 's/^-A /-D /' |
        while read -r rule; do eval "$ipt -t $table $rule" 2>/dev/null; done
    done
    for chain in $chains; do $ipt -t "$table" -F "$chain" 2>/dev/null; done
    for chain in $chains; do $ipt -t "$table" -X "$chain" 2>/dev/null; done
  done
done
# iptables-nft leaves its tables behind once it has touched them; drop those that were not there
# before the node and are empty now.
for family in ip ip6; do
  for table in nat filter mangle; do
    nft list table "$family" "$table" >/dev/null 2>&1 || continue
    [ -f "$node/nft.before" ] && ! grep -q "^table $family $table {" "$node/nft.before" || continue
    nft list table "$family" "$table" 2>/dev/null | grep -vqE '^\s*(table|chain|type|policy|\}|$)' ||
      nft delete table "$family" "$table" 2>/dev/null
  done
done

# The node's cgroups (cgroupfs driver: kubepods in every hierarchy), innermost first.
for cg in /sys/fs/cgroup/*/kubepods; do
  [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
done

if [ -f "$node/sysctl.saved" ]; then
  while IFS='=' read -r key value; do
    sysctl -qw "$key=$value" 2>/dev/null
  done < "$node/sysctl.saved"
  rm -f "$node/sysctl.saved"
fi
if [ -f "$node/created-paths" ]; then
  while read -r path; do
    [ -n "$path" ] && rm -rf "$path"
  done < "$node/created-paths"
  rm -f "$node/created-paths"
fi
[ "$(cat /run/rolemesh-node.owner 2>/dev/null)" = "$dir" ] && rm -f /run/rolemesh-node.owner
exit 0

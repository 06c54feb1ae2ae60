#!/usr/bin/env bash
# Prints the memory the local cluster uses now: the proportional set size (PSS, so shared pages
# such as the one localkube binary behind five roles count once) of the control plane, the node's
# daemons (containerd, shims, kubelet, kube-proxy), every container of every pod (the processes in
# the kubepods cgroups) and the local AWS endpoint, each group and in all.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir="$root/target/cluster"
bin="$root/target/tools/bin"

pss_kib() { awk '/^Pss:/ {print $2; exit}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }

declare -A group_kib=()
add() { group_kib[$1]=$(( ${group_kib[$1]:-0} + $2 )); }

pod_pids=" "
for cg in /sys/fs/cgroup/memory/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/kubepods.slice; do
  [ -d "$cg" ] || continue
  pod_pids+="$(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -un | tr '\n' ' ')"
  break
done
moto_pid=$(cat "$dir/moto.pid" 2>/dev/null || true)
for pid in $(ps -eo pid=); do
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
  kib=$(pss_kib "$pid")
  if [[ "$pod_pids" == *" $pid "* ]]; then
    add pods "$kib"
  elif [ "$pid" = "$moto_pid" ]; then
    add aws-endpoint "$kib"
  else
    case "$exe" in
      "$bin/localkube")
        case "$(tr '\0' ' ' < "/proc/$pid/cmdline")" in
          *" kubelet "*|*" proxy "*) add node "$kib" ;;
          *) add control-plane "$kib" ;;
        esac ;;
      "$bin/containerd"|"$bin/containerd-shim-runc-v2") add node "$kib" ;;
    esac
  fi
done
total=0
for group in control-plane node pods aws-endpoint; do
  kib=${group_kib[$group]:-0}
  total=$((total + kib))
  printf '%-14s %6d MiB\n' "$group" $((kib / 1024))
done
printf '%-14s %6d MiB (PSS)\n' total $((total / 1024))

#!/usr/bin/env bash
# Imports target/images/*.tar into the running node's containerd (namespace k8s.io, where kubelet
# looks), so a rebuilt image is what the next pod runs. Does nothing when no node runs: dev/node/up.sh
# imports every image when it starts one.
#   dev/node/import.sh [NAME...]     all images, or the named ones (dev/images/NAME.image)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
node="$root/target/cluster/node"
sock="$node/containerd/containerd.sock"
if ! { [ -f "$node/containerd.pid" ] && kill -0 "$(cat "$node/containerd.pid")" 2>/dev/null; }; then
  exit 0
fi
images=()
if [ $# -gt 0 ]; then
  for name in "$@"; do images+=("$root/target/images/$name.tar"); done
else
  images=("$root"/target/images/*.tar)
fi
for image in "${images[@]}"; do
  # ctr warns on every call that cgroups v1 are deprecated: shown only when the import fails.
  if ! out=$("$root/target/tools/bin/ctr" --address "$sock" --namespace k8s.io images import "$image" 2>&1); then
    echo "$out" >&2
    exit 1
  fi
  printf '[images] imported %s into the node\n' "$(cat "${image%.tar}.ref")" >&2
done

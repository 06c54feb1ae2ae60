#!/usr/bin/env bash
# Stops what dev/cluster/up.sh started: the node first (dev/node/down.sh puts the host back as it
# was), then the control plane and the local AWS endpoint.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir="$root/target/cluster"
"$root/dev/node/down.sh" "$dir"
for name in localkube moto; do
  pidfile="$dir/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done
rm -f "$dir/env" "$dir/ready" "$dir/values.yaml"
echo "local cluster stopped"

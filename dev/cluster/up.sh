#!/usr/bin/env bash
# Starts the local control plane and the local AWS endpoint in the background and writes
# target/cluster/env to source. Reuses a running one. `dev/cluster/down.sh` stops both.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir="$root/target/cluster"
bin="$root/target/tools/bin"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$dir/localkube.pid" && alive "$dir/moto.pid" && [ -f "$dir/ready" ] && [ -f "$dir/env" ]; then
  echo "local control plane already running ($(cat "$dir/ready")); KUBECONFIG=$dir/kubeconfig"
  exit 0
fi
"$(dirname "$0")/down.sh" >/dev/null 2>&1 || true
rm -rf "$dir"
mkdir -p "$dir/logs"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start=$(date +%s)
setsid nohup "$bin/localkube" up --dir "$dir" >"$dir/logs/localkube.out" 2>&1 < /dev/null &
echo $! > "$dir/localkube.pid"

moto_port=$(free_port)
# moto, with STS's AssumeRoleWithWebIdentity checking tokens and trust policies as AWS does.
ROLEMESH_IRSA_SIGNING_KEY="$dir/pki/sa.pub" setsid nohup "$root/target/venv/bin/python" \
  "$root/dev/tools/aws_endpoint.py" -H 127.0.0.1 -p "$moto_port" >"$dir/logs/moto.log" 2>&1 < /dev/null &
echo $! > "$dir/moto.pid"

for _ in $(seq 1 360); do
  if [ -f "$dir/ready" ] && curl -fsS -o /dev/null "http://127.0.0.1:$moto_port/moto-api/"; then
    break
  fi
  if ! alive "$dir/localkube.pid"; then
    echo "the local control plane exited while starting; its log:" >&2
    tail -n 40 "$dir/logs/localkube.out" "$dir"/logs/kube-apiserver.log >&2 || true
    exit 1
  fi
  if ! alive "$dir/moto.pid"; then
    echo "the local AWS endpoint (moto) exited while starting:" >&2
    tail -n 40 "$dir/logs/moto.log" >&2
    exit 1
  fi
  sleep 0.5
done
if [ ! -f "$dir/ready" ]; then
  echo "the local control plane did not become ready in 180s; see $dir/logs" >&2
  exit 1
fi

cat > "$dir/env" <<ENV
export KUBECONFIG='$dir/kubeconfig'
export AWS_ENDPOINT_URL='http://127.0.0.1:$moto_port'
export AWS_REGION='us-east-1'
export AWS_DEFAULT_REGION='us-east-1'
export AWS_ACCESS_KEY_ID='testing'
export AWS_SECRET_ACCESS_KEY='testing'
export ROLEMESH_TOOLS_BIN='$bin'
ENV
version=$("$bin/kubectl" --kubeconfig "$dir/kubeconfig" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
echo "local control plane: Kubernetes $version at $(cat "$dir/ready") ready in $(( $(date +%s) - start ))s; AWS endpoint http://127.0.0.1:$moto_port"
echo "use it with: source target/cluster/env"

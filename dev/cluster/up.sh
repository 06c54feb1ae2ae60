#!/usr/bin/env bash
# Starts the local cluster -- the control plane, a node that runs pods (dev/node/up.sh) with CoreDNS --
# and the local AWS endpoint in the background, and writes target/cluster/env to source. Reuses a
# running one. `dev/cluster/down.sh` stops all of it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir="$root/target/cluster"
bin="$root/target/tools/bin"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$dir/localkube.pid" && alive "$dir/moto.pid" && alive "$dir/node/kubelet.pid" && [ -f "$dir/ready" ] && [ -f "$dir/env" ]; then
  echo "local control plane already running ($(cat "$dir/ready")); KUBECONFIG=$dir/kubeconfig"
  exit 0
fi
"$(dirname "$0")/down.sh" >/dev/null 2>&1 || true
if awk -v d="$dir/" 'index($2, d) == 1 {found=1} END {exit !found}' /proc/self/mounts; then
  echo "mounts under $dir survived dev/cluster/down.sh; not removing it:" >&2
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts >&2
  exit 1
fi
rm -rf "$dir"
mkdir -p "$dir/logs"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The node's IP: the apiserver backs the kubernetes Service with it and dials the kubelet there.
node_ip=$(ip -4 route get 1.1.1.1 | awk '{for (i = 1; i < NF; i++) if ($i == "src") print $(i + 1)}')
[ -n "$node_ip" ] || { echo "no IPv4 default route: the node needs an address the pods can reach the apiserver at" >&2; exit 1; }

start=$(date +%s)
setsid nohup "$bin/localkube" up --dir "$dir" --advertise-address "$node_ip" >"$dir/logs/localkube.out" 2>&1 < /dev/null &
echo $! > "$dir/localkube.pid"

moto_port=$(free_port)
# moto, with STS's AssumeRoleWithWebIdentity checking tokens and trust policies as AWS does. On the
# node's IP, so that the chart's controller pod reaches it as it reaches AWS's endpoints.
ROLEMESH_IRSA_SIGNING_KEY="$dir/pki/sa.pub" setsid nohup "$root/target/venv/bin/python" \
  "$root/dev/tools/aws_endpoint.py" -H "$node_ip" -p "$moto_port" >"$dir/logs/moto.log" 2>&1 < /dev/null &
echo $! > "$dir/moto.pid"

for _ in $(seq 1 360); do
  if [ -f "$dir/ready" ] && curl -fsS -o /dev/null "http://$node_ip:$moto_port/moto-api/"; then
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

control_plane_ready=$(( $(date +%s) - start ))
if ! "$root/dev/node/up.sh" "$dir" "$node_ip"; then
  echo "the node did not start; logs in $dir/logs; stopping the cluster" >&2
  "$(dirname "$0")/down.sh" >&2
  exit 1
fi

cat > "$dir/env" <<ENV
export KUBECONFIG='$dir/kubeconfig'
export AWS_ENDPOINT_URL='http://$node_ip:$moto_port'
export AWS_REGION='us-east-1'
export AWS_DEFAULT_REGION='us-east-1'
export AWS_ACCESS_KEY_ID='testing'
export AWS_SECRET_ACCESS_KEY='testing'
export ROLEMESH_TOOLS_BIN='$bin'
export CRI_CONFIG_FILE='$dir/node/crictl.yaml'
ENV
# The chart's values for this cluster (docs/development.md): the images dev/images describes, which
# the node has imported, and the local AWS endpoint in place of AWS's for the controller.
image_ref() { awk '$1 == "ref" {print $2}' "$root/dev/images/$1.image"; }
controller_ref=$(image_ref controller) proxy_ref=$(image_ref proxy)
cat > "$dir/values.yaml" <<YAML
# Written by dev/cluster/up.sh for this local cluster; see docs/development.md.
image: {repository: ${controller_ref%:*}, tag: ${controller_ref##*:}}
proxyImage: {repository: ${proxy_ref%:*}, tag: ${proxy_ref##*:}}
controller:
  extraEnv:
    - {name: AWS_ENDPOINT_URL, value: "http://$node_ip:$moto_port"}
    - {name: AWS_REGION, value: us-east-1}
    - {name: AWS_ACCESS_KEY_ID, value: testing}
    - {name: AWS_SECRET_ACCESS_KEY, value: testing}
# The development signer: a CA key in a Secret (the chart's default is kms).
authority:
  signer: {type: local}
YAML

version=$("$bin/kubectl" --kubeconfig "$dir/kubeconfig" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
echo "local cluster: Kubernetes $version at $(cat "$dir/ready"), control plane ready in ${control_plane_ready}s, node rolemesh-node ($node_ip) and CoreDNS ready in $(( $(date +%s) - start ))s; AWS endpoint http://$node_ip:$moto_port"
echo "use it with: source target/cluster/env; the chart's values for it: target/cluster/values.yaml"

#!/usr/bin/env bash
# Starts the node next to a running local control plane: containerd (with Debian's runc and the
# CNI plugins), kubelet and kube-proxy, imports the images of target/images into containerd and
# runs CoreDNS as kube-dns. Called by dev/cluster/up.sh once the apiserver is ready:
#   dev/node/up.sh CLUSTER_DIR NODE_IP
# Everything it creates on the host is recorded under CLUSTER_DIR/node so dev/node/down.sh can
# put the machine back as it found it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=$1
node_ip=$2
bin="$root/target/tools/bin"
node="$dir/node"
logs="$dir/logs"

# One node per machine: the kubelet port, the bridge and the netfilter tables are the host's.
owner_file=/run/rolemesh-node.owner
if [ -f "$owner_file" ] && [ "$(cat "$owner_file")" != "$dir" ]; then
  other=$(cat "$owner_file")
  if [ -d "$other" ] && [ -f "$other/node/kubelet.pid" ] && kill -0 "$(cat "$other/node/kubelet.pid")" 2>/dev/null; then
    echo "another local cluster's node is running on this machine ($other); stop it with its dev/cluster/down.sh" >&2
    exit 1
  fi
fi

mkdir -p "$node"/{containerd,kubelet,cni/net.d,cni/ipam} "$logs/pods"
echo "$dir" > "$owner_file"

# What the node changes on the host, recorded before it changes it.
# Sysctls: the bridge plugin turns on forwarding; kubelet sets the kernel's panic and overcommit
# policy and key quotas.
sysctls="net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet"
if [ ! -f "$node/sysctl.saved" ]; then
  for key in $sysctls; do
    value=$(sysctl -n "$key" 2>/dev/null) && echo "$key=$value"
  done > "$node/sysctl.saved"
fi
# Host paths that containerd, the CNI plugins and kubelet use whatever their configuration says.
host_paths="/run/containerd /run/netns /var/lib/cni /var/log/containers /var/log/pods /run/nri"
if [ ! -f "$node/created-paths" ]; then
  for path in $host_paths; do [ -e "$path" ] || echo "$path"; done > "$node/created-paths"
fi
[ -f "$node/nft.before" ] || nft list ruleset > "$node/nft.before"
# bridge-nf-call-iptables: bridged pod-to-pod replies must pass conntrack to be un-DNATed after a
# Service hop.
modprobe br_netfilter 2>/dev/null || true
sysctl -qw net.bridge.bridge-nf-call-iptables=1

sock="$node/containerd/containerd.sock"
cat > "$node/containerd/config.toml" <<TOML
version = 3
root = "$node/containerd/root"
state = "$node/containerd/state"
# NRI would listen on /var/run/nri; nothing here uses it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "$sock"

[plugins.'io.containerd.internal.v1.opt']
  path = "$node/containerd/opt"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$(cat "$root/target/images/pause.ref")"

[plugins.'io.containerd.cri.v1.runtime']
  # This machine refuses to lower oom_score_adj, even for root.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      snapshotter = "overlayfs"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$root/target/tools/cni"]
    conf_dir = "$node/cni/net.d"
    max_conf_num = 1
TOML

cat > "$node/cni/net.d/10-rolemesh.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "rolemesh",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "rolemesh0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.0.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$node/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON

# kubelet: the settings this machine needs (cgroups v1 with cgroupfs, swap present, no node
# allocatable enforcement or local storage isolation), serving on the node IP the apiserver dials
# for logs/exec, and the clients it accepts are the cluster CA's (the apiserver's kubelet client).
cat > "$node/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$sock
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
enforceNodeAllocatable: []
localStorageCapacityIsolation: false
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $dir/pki/ca.crt
authorization:
  mode: Webhook
clusterDomain: cluster.local
clusterDNS: [10.96.0.10]
resolvConf: /etc/resolv.conf
podLogsDir: $logs/pods
# A developer's disk is shared with everything else: never evict or collect images for space.
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
serializeImagePulls: false
YAML

cat > "$node/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $dir/kubeconfig
hostnameOverride: rolemesh-node
mode: nftables
clusterCIDR: 10.244.0.0/24
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
# Leave the host's conntrack limits and timeouts as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
YAML

# crictl (CRI_CONFIG_FILE in target/cluster/env) looks at this node's containerd.
cat > "$node/crictl.yaml" <<YAML
runtime-endpoint: unix://$sock
image-endpoint: unix://$sock
timeout: 10
YAML

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() { # name logfile command...
  local name=$1 log=$2
  shift 2
  setsid nohup "$@" >"$log" 2>&1 </dev/null &
  echo $! > "$node/$name.pid"
}

wait_for() { # what seconds pidfile command...
  local what=$1 seconds=$2 pidfile=$3
  shift 3
  for _ in $(seq 1 $((seconds * 4))); do
    "$@" >/dev/null 2>&1 && return 0
    if [ -n "$pidfile" ] && ! alive "$pidfile"; then
      echo "$what exited while starting" >&2
      return 1
    fi
    sleep 0.25
  done
  echo "$what not ready after ${seconds}s" >&2
  return 1
}

ctr() { "$bin/ctr" --address "$sock" --namespace k8s.io "$@"; }
kubectl() { "$bin/kubectl" --kubeconfig "$dir/kubeconfig" "$@"; }

start containerd "$logs/containerd.log" "$bin/containerd" --config "$node/containerd/config.toml"
wait_for containerd 30 "$node/containerd.pid" ctr version || { tail -n 30 "$logs/containerd.log" >&2; exit 1; }
for image in "$root"/target/images/*.tar; do
  ctr images import "$image" >"$logs/ctr-import.log" 2>&1 || { cat "$logs/ctr-import.log" >&2; exit 1; }
done

start kubelet "$logs/kubelet.log" "$bin/localkube" kubelet \
  --config="$node/kubelet/config.yaml" \
  --kubeconfig="$dir/kubeconfig" \
  --root-dir="$node/kubelet" \
  --cert-dir="$node/kubelet/pki" \
  --hostname-override=rolemesh-node \
  --node-ip="$node_ip"
start kube-proxy "$logs/kube-proxy.log" "$bin/localkube" proxy --config="$node/kube-proxy.yaml"

node_ready() {
  [ "$(kubectl get node rolemesh-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
wait_for "the node (kubelet)" 120 "$node/kubelet.pid" node_ready || { tail -n 30 "$logs/kubelet.log" >&2; exit 1; }
alive "$node/kube-proxy.pid" || { echo "kube-proxy exited:" >&2; tail -n 30 "$logs/kube-proxy.log" >&2; exit 1; }

kubectl apply -f "$root/dev/node/coredns.yaml" >/dev/null
if ! kubectl -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null; then
  echo "CoreDNS did not become ready:" >&2
  kubectl -n kube-system get pods -o wide >&2
  kubectl -n kube-system describe pods -l k8s-app=kube-dns | tail -n 20 >&2
  exit 1
fi

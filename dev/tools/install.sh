#!/usr/bin/env bash
# Installs what the tests and the demo need into target/, building only what is missing or whose
# inputs changed (each build is keyed on the hash of its inputs):
#   target/tools/bin/localkube  the cluster: etcd, kube-apiserver, kube-controller-manager,
#                               kube-scheduler, kubelet and kube-proxy in one binary
#   target/tools/bin/kubectl    the real kubectl, built from the same Kubernetes release
#   target/tools/bin/containerd containerd, ctr and containerd-shim-runc-v2 (dev/node/containerd)
#   target/tools/cni/           CNI plugins bridge, host-local, loopback, portmap (dev/node/cni)
#   target/tools/bin/crictl     crictl, to look into the node's containers (dev/node/crictl)
#   target/tools/bin/coredns    CoreDNS (dev/node/coredns)
#   target/tools/bin/crane      go-containerregistry's crane, to build images (dev/images/crane)
#   target/tools/bin/pause      the pod sandbox's pause, compiled from the Kubernetes module's pause.c
#   target/images/*.tar         the node's images (dev/images/build.sh)
#   target/tools/bin/helm       the real helm, built from its Go module
#   target/tools/bin/promlint   promtool's metric-name linter (client_golang promlint), dev/tools/promlint
#   target/venv                 moto, the local AWS endpoint
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/tools/bin"
mkdir -p "$bin" "$root/target/tools/stamps"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

# The Kubernetes release of the control plane; must match dev/cluster/go.mod.
K8S_VERSION=v1.34.4

# The script itself is part of every key: a change to how a thing is built rebuilds it.
stamp_of() { cat "$0" "$@" | sha256sum | cut -c1-16; }

up_to_date() { # name hash
  [ -f "$root/target/tools/stamps/$1" ] && [ "$(cat "$root/target/tools/stamps/$1")" = "$2" ]
}

log() { printf '[tools] %s\n' "$*" >&2; }

need_go() {
  command -v go >/dev/null || { echo "go is required to build the local control plane (install Go >= 1.24)" >&2; exit 1; }
}

# Debian packages: runc (with seccomp, as containerd's default profile needs), the netfilter userland
# kube-proxy and CNI drive, and busybox-static for the test image; openssl and curl are peers the
# tests drive.
missing=()
for pair in runc:runc iptables:iptables nft:nftables conntrack:conntrack busybox:busybox-static openssl:openssl curl:curl; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[ -x /bin/busybox ] || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# go_tools NAME MODULE_DIR OUT_DIR [ENV=VALUE...] -- PACKAGES...: builds upstream commands pinned by
# a small module of their own under dev/, so their dependency graphs never meet the Kubernetes one.
# $ldflags_extra (e.g. version variables) is added to the link.
go_tools() {
  local name=$1 dir=$2 out=$3 envs=() pkgs=()
  shift 3
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  pkgs=("$@")
  local hash
  hash=$(stamp_of "$dir/go.mod" "$dir/go.sum")
  local missing=0
  for pkg in "${pkgs[@]}"; do [ -x "$out/$(basename "$pkg")" ] || missing=1; done
  if [ $missing = 1 ] || ! up_to_date "$name" "$hash"; then
    need_go
    log "building $name"
    local started=$SECONDS
    mkdir -p "$out.new"
    (cd "$dir" && env "${envs[@]}" go build -trimpath -ldflags "-s -w ${ldflags_extra:-}" -o "$out.new/" "${pkgs[@]}")
    mkdir -p "$out"
    for pkg in "${pkgs[@]}"; do mv "$out.new/$(basename "$pkg")" "$out/"; done
    rmdir "$out.new"
    echo "$hash" > "$root/target/tools/stamps/$name"
    log "built $name in $((SECONDS - started))s"
  fi
}

# localkube and kubectl: one binary, kubectl is a link to it.
hash=$(stamp_of "$root"/dev/cluster/go.mod "$root"/dev/cluster/go.sum "$root"/dev/cluster/*.go)
if ! up_to_date localkube "$hash" || [ ! -x "$bin/localkube" ]; then
  need_go
  log "building the Kubernetes $K8S_VERSION control plane and node (cold: many minutes on 2 cores; cached afterwards)"
  started=$SECONDS
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ldflags="$ldflags -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ldflags="$ldflags -X k8s.io/component-base/version.gitTreeState=clean"
  (cd "$root/dev/cluster" && go build -trimpath -ldflags "$ldflags" -o "$bin/localkube.new" .)
  mv "$bin/localkube.new" "$bin/localkube"
  echo "$hash" > "$root/target/tools/stamps/localkube"
  log "built localkube in $((SECONDS - started))s"
fi
ln -sf localkube "$bin/kubectl"

hash=$(stamp_of "$root"/dev/tools/helm/go.mod "$root"/dev/tools/helm/go.sum)
if ! up_to_date helm "$hash" || [ ! -x "$bin/helm" ]; then
  need_go
  log "building helm"
  (cd "$root/dev/tools/helm" && go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v3.21.4" -o "$bin/helm.new" helm.sh/helm/v3/cmd/helm)
  mv "$bin/helm.new" "$bin/helm"
  echo "$hash" > "$root/target/tools/stamps/helm"
fi

hash=$(stamp_of "$root"/dev/tools/promlint/go.mod "$root"/dev/tools/promlint/go.sum "$root"/dev/tools/promlint/*.go)
if ! up_to_date promlint "$hash" || [ ! -x "$bin/promlint" ]; then
  need_go
  log "building promlint"
  (cd "$root/dev/tools/promlint" && go build -trimpath -ldflags "-s -w" -o "$bin/promlint.new" .)
  mv "$bin/promlint.new" "$bin/promlint"
  echo "$hash" > "$root/target/tools/stamps/promlint"
fi

hash=$(stamp_of "$root"/dev/tools/requirements.txt)
if ! up_to_date venv "$hash" || [ ! -x "$root/target/venv/bin/moto_server" ]; then
  log "installing moto into target/venv"
  rm -rf "$root/target/venv"
  python3 -m venv "$root/target/venv"
  "$root/target/venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/dev/tools/requirements.txt"
  echo "$hash" > "$root/target/tools/stamps/venv"
fi

# The version a small module pins for an upstream module: go_version DIR MODULE (under github.com).
go_version() {
  local version
  version=$(awk -v m="github.com/$2" '$1 == m || $2 == m {print ($1 == m ? $2 : $3)}' "$root/dev/node/$1/go.mod" | head -n1)
  [ -n "$version" ] || { echo "github.com/$2 is not required by dev/node/$1/go.mod" >&2; exit 1; }
  echo "$version"
}

# The node. containerd without the btrfs snapshotter (it needs cgo and btrfs headers; the node
# uses overlayfs); CoreDNS static, as upstream releases it.
ldflags_extra="-X github.com/containerd/containerd/v2/version.Version=$(go_version containerd containerd/containerd/v2)" \
  go_tools containerd "$root/dev/node/containerd" "$bin" GOFLAGS="$GOFLAGS -tags=no_btrfs" -- \
  github.com/containerd/containerd/v2/cmd/containerd \
  github.com/containerd/containerd/v2/cmd/ctr \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
go_tools cni "$root/dev/node/cni" "$root/target/tools/cni" CGO_ENABLED=0 -- \
  github.com/containernetworking/plugins/plugins/main/bridge \
  github.com/containernetworking/plugins/plugins/ipam/host-local \
  github.com/containernetworking/plugins/plugins/main/loopback \
  github.com/containernetworking/plugins/plugins/meta/portmap
go_tools crictl "$root/dev/node/crictl" "$bin" CGO_ENABLED=0 -- sigs.k8s.io/cri-tools/cmd/crictl
go_tools coredns "$root/dev/node/coredns" "$bin" CGO_ENABLED=0 -- github.com/coredns/coredns
go_tools crane "$root/dev/images/crane" "$bin" CGO_ENABLED=0 -- github.com/google/go-containerregistry/cmd/crane

# The pod sandbox's pause, from the same Kubernetes release as the kubelet.
pause_src=$(cd "$root/dev/cluster" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
hash=$(stamp_of "$pause_src")
if ! up_to_date pause "$hash" || [ ! -x "$bin/pause" ]; then
  log "compiling pause"
  gcc -Os -Wall -static -DVERSION=3.10.1-rolemesh -o "$bin/pause.new" "$pause_src"
  strip "$bin/pause.new"
  mv "$bin/pause.new" "$bin/pause"
  echo "$hash" > "$root/target/tools/stamps/pause"
fi

"$root/dev/images/build.sh"

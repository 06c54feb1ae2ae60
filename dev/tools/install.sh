#!/usr/bin/env bash
# Installs what the tests and the demo need into target/, building only what is missing or whose
# inputs changed (each build is keyed on the hash of its inputs):
#   target/tools/bin/localkube  the control plane (etcd + kube-apiserver + kube-controller-manager)
#   target/tools/bin/kubectl    the real kubectl, built from the same Kubernetes release
#   target/tools/bin/helm       the real helm, built from its Go module
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

# localkube and kubectl: one binary, kubectl is a link to it.
hash=$(stamp_of "$root"/dev/cluster/go.mod "$root"/dev/cluster/go.sum "$root"/dev/cluster/*.go)
if ! up_to_date localkube "$hash" || [ ! -x "$bin/localkube" ]; then
  need_go
  log "building the Kubernetes $K8S_VERSION control plane (cold: many minutes on 2 cores; cached afterwards)"
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ldflags="$ldflags -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ldflags="$ldflags -X k8s.io/component-base/version.gitTreeState=clean"
  (cd "$root/dev/cluster" && go build -trimpath -ldflags "$ldflags" -o "$bin/localkube.new" .)
  mv "$bin/localkube.new" "$bin/localkube"
  echo "$hash" > "$root/target/tools/stamps/localkube"
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

hash=$(stamp_of "$root"/dev/tools/requirements.txt)
if ! up_to_date venv "$hash" || [ ! -x "$root/target/venv/bin/moto_server" ]; then
  log "installing moto into target/venv"
  rm -rf "$root/target/venv"
  python3 -m venv "$root/target/venv"
  "$root/target/venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/dev/tools/requirements.txt"
  echo "$hash" > "$root/target/tools/stamps/venv"
fi

# Debian tools the tests drive as real peers.
missing=()
for tool in openssl curl; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

#!/usr/bin/env bash
# `make demo`: the rolemesh story on the local control plane, step by step.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "Starting the local control plane (kube-apiserver + etcd + kube-controller-manager) and the local AWS endpoint"
tests/cluster/up.sh
# shellcheck disable=SC1091
source target/cluster/env
export PATH="$ROLEMESH_TOOLS_BIN:$PATH"

step "Installing rolemesh's CRDs (generated from the Rust types)"
run kubectl apply --server-side --force-conflicts -f deploy/crds.yaml
run kubectl wait --for=condition=Established --timeout=60s crd/mtlspolicies.rolemesh.dev crd/mtlsauthorities.rolemesh.dev

step "Applying the example MTLSAuthority and the shop/billing workloads with their MTLSPolicies"
run kubectl apply -f deploy/examples/authority.yaml
run kubectl apply -f deploy/examples/shop.yaml

step "What the API server now holds"
run kubectl get mtlsauthorities
run kubectl get mtlspolicies -A

step "The API documents itself: kubectl explain"
run kubectl explain mtlspolicy.spec.inbound

step "Bad input is refused by the API server, naming the field"
set +e
kubectl apply -f - <<'YAML' 2>&1 | sed 's/^/  /'
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: broken, namespace: shop}
spec:
  serviceAccounts: {names: [frontend]}
  certificate: {duration: 1h, renewBefore: 2h}
YAML
set -e

step "Summary"
echo "  control plane: $(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') at $(cat target/cluster/ready)"
echo "  policies:      $(kubectl get mtlsp -A --no-headers | wc -l) applied"
echo "  took:          $(( $(date +%s) - start ))s"
echo "  the control plane keeps running: 'source target/cluster/env' to use it, 'make cluster-down' to stop it"

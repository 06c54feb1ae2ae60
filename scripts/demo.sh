#!/usr/bin/env bash
# `make demo`: the rolemesh story on the local cluster, as a mesh of running pods. The chart is
# installed as docs/development.md shows (rolemesh's images built here, the local AWS endpoint in
# place of AWS's); the example workloads run with the proxy injected as a native sidecar.
# Local signer by default; ROLEMESH_SIGNER=kms signs with a KMS key in the local AWS endpoint.
# `make demo` builds and imports the images first (make images).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)
signer=${ROLEMESH_SIGNER:-local}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq 1 $((seconds * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "timed out after ${seconds}s waiting for $what" >&2; return 1
}

step "Starting the local cluster (kube-apiserver + etcd + controller-manager + scheduler, a node: kubelet, containerd, kube-proxy, CoreDNS) and the local AWS endpoint"
dev/cluster/up.sh
# shellcheck disable=SC1091
source target/cluster/env
# kubectl and helm as built here; the plugin from the release build the images hold.
export PATH="$ROLEMESH_TOOLS_BIN:$root/target/release:$PATH"

# Start from a clean slate if an earlier demo ran on this cluster.
kubectl delete namespace shop billing --ignore-not-found --wait=true >/dev/null 2>&1 || true
helm uninstall rolemesh -n rolemesh --wait >/dev/null 2>&1 || true
kubectl delete mtlsauthority default --ignore-not-found >/dev/null 2>&1 || true
kubectl delete namespace rolemesh --ignore-not-found --wait=true >/dev/null 2>&1 || true

step "Installing the Helm chart: controller (two replicas, one leader) and webhook run as pods"
authority_values=(--set authority.create=true --set authority.trustDomain=rolemesh.local)
if [ "$signer" = kms ]; then
  key_arn=$("$root/target/venv/bin/python" - <<'PY'
import boto3, os
kms = boto3.client("kms", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY", Description="rolemesh demo CA")
print(key["KeyMetadata"]["Arn"])
PY
)
  echo "created KMS key $key_arn (ECC_NIST_P256, SIGN_VERIFY) in the local AWS endpoint"
  authority_values+=(--set authority.signer.type=kms --set authority.signer.kms.keyId="$key_arn" --set authority.signer.kms.region=us-east-1)
fi
run helm install rolemesh charts/rolemesh -n rolemesh --create-namespace \
  -f target/cluster/values.yaml "${authority_values[@]}" --wait --timeout 3m
run kubectl -n rolemesh get pods -o wide
leader=$(kubectl -n rolemesh get lease rolemesh-controller -o jsonpath='{.spec.holderIdentity}')
echo "controller leader (Lease rolemesh-controller): $leader"

step "Creating the workloads' IAM roles in the local AWS endpoint, each trusting its ServiceAccount (as IRSA roles do)"
"$root/target/venv/bin/python" - <<'PY'
import boto3, json, os
iam = boto3.client("iam", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
for namespace, name in (("shop", "frontend"), ("billing", "payments")):
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/localkube"},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {"StringEquals": {"localkube:sub": f"system:serviceaccount:{namespace}:{name}",
                                       "localkube:aud": "sts.amazonaws.com"}}}]}
    try:
        iam.delete_role(RoleName=name)
    except Exception:
        pass
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    print(f"  {arn} trusts system:serviceaccount:{namespace}:{name}")
PY

step "Applying the example: frontend (shop) may call payments (billing); payments may not call frontend"
run kubectl apply -f deploy/examples/shop.yaml -f deploy/examples/shop-apps.yaml
run kubectl -n billing rollout status deployment/payments --timeout=180s
run kubectl -n shop rollout status deployment/frontend --timeout=180s

step "Verified identities and their certificates"
run kubectl rolemesh status -A
run kubectl get mtlsp -A
run kubectl rolemesh inspect -n billing payments-rolemesh-tls

step "The injected pods: the proxy is a native sidecar (an init container with restartPolicy Always)"
payments_pod=$(kubectl -n billing get pods -l app=payments -o jsonpath='{.items[0].metadata.name}')
frontend_pod=$(kubectl -n shop get pods -l app=frontend -o jsonpath='{.items[0].metadata.name}')
kubectl -n billing get pod "$payments_pod" -o jsonpath='{range .spec.initContainers[*]}  {.name}: image {.image}, restartPolicy {.restartPolicy}, readOnlyRootFilesystem {.securityContext.readOnlyRootFilesystem}{"\n"}{end}'
kubectl -n billing get pod "$payments_pod" -o jsonpath='{range .status.initContainerStatuses[*]}  {.name}: ready {.ready}, started {.state.running.startedAt}{"\n"}{end}{range .status.containerStatuses[*]}  {.name}: ready {.ready}, started {.state.running.startedAt}{"\n"}{end}'

step "frontend -> payments through the mesh: frontend's app calls 127.0.0.1:9001, its proxy dials payments.billing.svc:8443 over mTLS"
# kube-proxy routes the Service only once payments' pod is Ready and its endpoint published; a call
# in the second before that is refused (the frontend proxy logs upstream_unreachable).
call_payments() { kubectl -n shop exec "$frontend_pod" -c app -- wget -qO- http://127.0.0.1:9001/; }
wait_for 30 "kube-proxy to route Service payments" call_payments || true
if a_to_b=$(kubectl -n shop exec "$frontend_pod" -c app -- wget -qO- http://127.0.0.1:9001/ 2>&1); then
  echo "  ALLOWED: $a_to_b"; a_result=allowed
else
  echo "  failed: $a_to_b"; a_result=failed
fi

step "payments -> frontend through the mesh (payments' outbound 127.0.0.1:9002): frontend allows nobody"
if b_to_a=$(kubectl -n billing exec "$payments_pod" -c app -- wget -qO- http://127.0.0.1:9002/ 2>&1); then
  echo "  unexpectedly allowed: $b_to_a"; b_result=allowed
else
  echo "  REFUSED: $b_to_a"
  kubectl -n shop logs "$frontend_pod" -c rolemesh-proxy | grep -i "refus\|denied\|not allowed" | tail -n 1 | sed 's/^/  frontend proxy: /' || true
  b_result=refused
fi

# The node reaches pod IPs directly, as any pod outside the mesh does.
payments_ip=$(kubectl -n billing get pod "$payments_pod" -o jsonpath='{.status.podIP}')

step "Around the mesh: payments' app listens on 0.0.0.0:8080, but the pod's rolemesh-init rules (nftables) let only its own proxy in"
if plain=$(curl -sS -m 5 "http://$payments_ip:8080/" 2>&1); then
  echo "  unexpectedly reached in plain text: $plain"; plain_result=open
else
  echo "  REFUSED: curl http://$payments_ip:8080/ -> $plain"; plain_result=closed
fi
echo "  kubelet's readiness probe of the app goes through the proxy's admin port: $(kubectl -n billing get pod "$payments_pod" -o jsonpath='{.spec.containers[0].readinessProbe.httpGet.port}{.spec.containers[0].readinessProbe.httpGet.path}, app ready {.status.containerStatuses[0].ready}')"

# The serial the payments proxy serves, as a TLS peer sees it in the handshake.
served_serial() {
  openssl s_client -connect "$payments_ip:8443" </dev/null 2>/dev/null | openssl x509 -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f'
}

step "payments' certificate names Service payments: a client outside the mesh verifies the proxy by hostname"
# The first certificate was issued before the pod ran; once it ran, Service payments selected it
# and the controller re-issued the certificate with the Service's names (reason service-names).
has_names() { openssl s_client -connect "$payments_ip:8443" </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName | grep -q 'DNS:payments.billing.svc.cluster.local'; }
if wait_for 150 "the running payments proxy to serve the certificate that names its Service" has_names; then
  # s_client exits non-zero here (the proxy closes a client without a certificate after the
  # handshake), which pipefail would make fatal.
  openssl s_client -connect "$payments_ip:8443" </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName | sed 's/^/  /' || true
  client=$(mktemp -d)
  kubectl -n shop get secret frontend-rolemesh-tls -o jsonpath='{.data.tls\.crt}' | base64 -d > "$client/tls.crt"
  kubectl -n shop get secret frontend-rolemesh-tls -o jsonpath='{.data.tls\.key}' | base64 -d > "$client/tls.key"
  kubectl -n billing get configmap rolemesh-trust-bundle -o jsonpath='{.data.ca\.crt}' > "$client/ca.crt"
  echo '$ curl --cacert ca.crt --cert frontend/tls.crt --key frontend/tls.key --resolve payments.billing.svc.cluster.local:8443:'"$payments_ip"' https://payments.billing.svc.cluster.local:8443/'
  if by_name=$(curl -sS -m 10 --cacert "$client/ca.crt" --cert "$client/tls.crt" --key "$client/tls.key" \
      --resolve "payments.billing.svc.cluster.local:8443:$payments_ip" https://payments.billing.svc.cluster.local:8443/ 2>&1); then
    echo "  VERIFIED by hostname, with frontend's certificate: $by_name"; dns_result="verified by hostname"
  else
    echo "  curl by hostname failed: $by_name"; dns_result=failed
  fi
  rm -rf "$client"
else
  dns_result="names not served"
fi

step "Rotating payments' certificate from kubectl; kubelet then updates the Secret mounted in the running proxy"
old_serial=$(kubectl -n billing get mtlsp payments -o jsonpath='{.status.workloads[0].serial}')
echo "payments' proxy at $payments_ip:8443 serves serial $(served_serial)"
rotated=$(date +%s)
run kubectl rolemesh rotate payments -n billing
wait_for 60 "a new serial in the policy status" bash -c "[ \"\$(kubectl -n billing get mtlsp payments -o jsonpath='{.status.workloads[0].serial}')\" != '$old_serial' ]"
new_serial=$(kubectl -n billing get mtlsp payments -o jsonpath='{.status.workloads[0].serial}')
echo "the controller issued serial $new_serial after $(( $(date +%s) - rotated ))s"
normalized=$(echo "$new_serial" | tr -d ':' | tr 'A-F' 'a-f' | sed 's/^0*//')
served_new() { [ "$(served_serial | sed 's/^0*//')" = "$normalized" ]; }
if wait_for 150 "the running payments proxy to serve the new serial" served_new; then
  reload_seconds=$(( $(date +%s) - rotated ))
  echo "the running payments proxy serves serial $(served_serial), ${reload_seconds}s after the rotate (kubelet's Secret sync; the pod did not restart: restarts $(kubectl -n billing get pod "$payments_pod" -o jsonpath='{.status.initContainerStatuses[0].restartCount}'))"
  rotation_result="served after ${reload_seconds}s"
else
  rotation_result="not served"
fi
if after=$(kubectl -n shop exec "$frontend_pod" -c app -- wget -qO- http://127.0.0.1:9001/ 2>&1); then
  echo "  frontend -> payments after the rotation: ALLOWED: $after"
else
  echo "  frontend -> payments after the rotation failed: $after"; a_result=failed
fi

step "Everything in the cluster"
run kubectl get pods -A -o wide
not_running=$(kubectl get pods -A --no-headers | awk '$4 != "Running" {print $1 "/" $2 " " $4}')
echo "memory of the cluster now (dev/cluster/memory.sh):"
dev/cluster/memory.sh | sed 's/^/  /'

step "Summary"
echo "  cluster:        $(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') at $(cat target/cluster/ready), node $(kubectl get nodes --no-headers | awk '{print $1 " " $2}')"
echo "  signer:         $signer"
echo "  identities:     $(( $(kubectl get secrets -n shop -l rolemesh.dev/policy --no-headers | wc -l) + $(kubectl get secrets -n billing -l rolemesh.dev/policy --no-headers | wc -l) )) certificate Secrets, roles verified with STS"
echo "  A->B (frontend -> payments): $a_result"
echo "  B->A (payments -> frontend): $b_result"
echo "  plain app port: $plain_result (payments' 8080 from outside the pod)"
echo "  DNS names:      $dns_result (curl https://payments.billing.svc.cluster.local:8443 from outside the mesh)"
echo "  rotation:       payments serial $old_serial -> $new_serial, $rotation_result"
echo "  pods:           $(kubectl get pods -A --no-headers | wc -l) pods, ${not_running:-all Running}"
echo "  memory:         $(dev/cluster/memory.sh | awk '$1 == "total" {print $2 " " $3 " " $4}') for control plane, node, pods and AWS endpoint"
echo "  took:           $(( $(date +%s) - start ))s"
echo "  the cluster keeps running: 'source target/cluster/env' to use it, 'make cluster-down' to stop it and put the host back as it was"
[ "$a_result" = allowed ] && [ "$b_result" = refused ] && [ "$plain_result" = closed ] && [ "$rotation_result" != "not served" ] && [ -z "$not_running" ]

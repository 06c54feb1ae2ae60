#!/usr/bin/env bash
# `make demo`: the rolemesh story on the local control plane, step by step. Local signer by
# default; ROLEMESH_SIGNER=kms signs with a KMS key in the local AWS endpoint instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)
signer=${ROLEMESH_SIGNER:-local}
work="$root/target/demo"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq 1 $((seconds * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "timed out after ${seconds}s waiting for $what" >&2; return 1
}

step "Building rolemesh (controller, webhook, proxy, kubectl plugin)"
cargo build --quiet --bin rolemesh-controller --bin rolemesh-webhook --bin rolemesh-proxy --bin kubectl-rolemesh
export PATH="$root/target/debug:$PATH"

step "Starting the local cluster (kube-apiserver + etcd + controller-manager + scheduler, a node: kubelet, containerd, kube-proxy, CoreDNS) and the local AWS endpoint"
dev/cluster/up.sh
# shellcheck disable=SC1091
source target/cluster/env
export PATH="$ROLEMESH_TOOLS_BIN:$PATH"
rm -rf "$work" && mkdir -p "$work"

# Start from a clean slate if an earlier demo ran on this control plane.
helm uninstall rolemesh -n rolemesh --wait >/dev/null 2>&1 || true
kubectl delete mtlsauthority default --ignore-not-found >/dev/null 2>&1 || true
kubectl delete namespace shop billing rolemesh --ignore-not-found --wait=true >/dev/null 2>&1 || true

webhook_port=$(free_port)
step "Installing the Helm chart (development mode: controller and webhook run here as processes, the API server calls the webhook at https://127.0.0.1:$webhook_port)"
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
  --set controller.replicas=0 --set webhook.replicas=0 \
  --set webhook.url="https://127.0.0.1:$webhook_port/mutate-pod" "${authority_values[@]}"
run kubectl get mtlsauthority default

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

step "Starting the controller and the webhook"
metrics_port=$(free_port)
admin_port=$(free_port)
rolemesh-controller --namespace rolemesh --metrics-listen "127.0.0.1:$metrics_port" \
  --webhook-ip 127.0.0.1 >"$work/controller.log" 2>&1 &
pids+=($!)
echo "rolemesh-controller: metrics on http://127.0.0.1:$metrics_port/metrics, log $work/controller.log"
wait_for 60 "the webhook serving certificate" kubectl -n rolemesh get secret rolemesh-webhook-tls
rolemesh-webhook --namespace rolemesh --listen "127.0.0.1:$webhook_port" --admin-listen "127.0.0.1:$admin_port" \
  --proxy-image ghcr.io/rolemesh/rolemesh-proxy:0.1.0 >"$work/webhook.log" 2>&1 &
pids+=($!)
echo "rolemesh-webhook: https://127.0.0.1:$webhook_port/mutate-pod, log $work/webhook.log"
wait_for 60 "the webhook to be ready" curl -fsS --max-time 1 "http://127.0.0.1:$admin_port/readyz"

step "Applying the example workloads: frontend (shop) may call payments (billing); payments may not call frontend"
run kubectl apply -f deploy/examples/shop.yaml
wait_for 60 "the certificate Secrets" kubectl -n billing get secret payments-rolemesh-tls
wait_for 60 "the certificate Secrets" kubectl -n shop get secret frontend-rolemesh-tls
wait_for 60 "the policies to be Ready" kubectl -n billing wait --for=condition=Ready mtlsp/payments --timeout=1s
wait_for 60 "the policies to be Ready" kubectl -n shop wait --for=condition=Ready mtlsp/frontend --timeout=1s

step "Verified identities and their certificates"
run kubectl rolemesh status -A
run kubectl get mtlsp -A
run kubectl rolemesh inspect -n billing payments-rolemesh-tls

step "Creating the workloads' pods (namespaces are labelled rolemesh.dev/inject=enabled): the webhook injects the proxy"
for pair in shop:frontend billing:payments; do
  ns=${pair%%:*} sa=${pair##*:}
  kubectl apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $sa, namespace: $ns, labels: {app: $sa}}
spec:
  serviceAccountName: $sa
  containers:
    - name: app
      image: ghcr.io/rolemesh/demo-echo:latest
      ports: [{containerPort: 8080}]
YAML
done
echo "init containers of billing/payments (native sidecar, restartPolicy Always):"
kubectl -n billing get pod payments -o jsonpath='{range .spec.initContainers[*]}  {.name}: image {.image}, restartPolicy {.restartPolicy}, readOnlyRootFilesystem {.securityContext.readOnlyRootFilesystem}{"\n"}{end}'
echo "volumes:"
kubectl -n billing get pod payments -o jsonpath='{range .spec.volumes[*]}  {.name}{"\n"}{end}'

step "Rotating payments' certificate from kubectl"
old_serial=$(kubectl -n billing get mtlsp payments -o jsonpath='{.status.workloads[0].serial}')
run kubectl rolemesh rotate payments -n billing
wait_for 60 "a new serial" bash -c "[ \"\$(kubectl -n billing get mtlsp payments -o jsonpath='{.status.workloads[0].serial}')\" != '$old_serial' ]"
new_serial=$(kubectl -n billing get mtlsp payments -o jsonpath='{.status.workloads[0].serial}')
echo "serial $old_serial -> $new_serial"
kubectl -n billing get mtlsp payments -o jsonpath='lastRotation: {.status.lastRotation}{"\n"}'

step "Running the two proxies with the issued certificates and the configuration the webhook injected"
# Files as kubelet would mount them; ports moved so both pods fit on one host.
python3 - "$work" <<'PY'
import base64, json, subprocess, sys, pathlib
work = pathlib.Path(sys.argv[1])
def get(*args):
    return json.loads(subprocess.check_output(["kubectl", *args, "-o", "json"]))
ports = {"frontend": {"inbound": 18443, "admin": 15121, "app": 18080},
         "payments": {"inbound": 28443, "admin": 15221, "app": 28080}}
for ns, sa in (("shop", "frontend"), ("billing", "payments")):
    pod = get("-n", ns, "get", "pod", sa)
    proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == "rolemesh-proxy")
    config = json.loads(next(e["value"] for e in proxy["env"] if e["name"] == "ROLEMESH_PROXY_CONFIG"))
    secret = get("-n", ns, "get", "secret", f"{sa}-rolemesh-tls")
    identity = work / sa / "identity"; identity.mkdir(parents=True)
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (identity / key).write_bytes(base64.b64decode(secret["data"][key]))
    config["identityDir"] = str(identity)
    config["trustBundle"] = str(identity / "ca.crt")
    config["adminPort"] = ports[sa]["admin"]
    config["adminAddress"] = "127.0.0.1"
    for listener in config["inbound"]:
        listener["port"] = ports[sa]["inbound"]
        listener["appPort"] = ports[sa]["app"]
    for listener in config["outbound"]:
        target = listener["upstream"].split(".")[0]
        listener["upstream"] = f"localhost:{ports[target]['inbound']}"
    (work / sa / "config.json").write_text(json.dumps(config, indent=2))
    print(f"  {sa}: inbound :{ports[sa]['inbound']} -> app :{ports[sa]['app']}; outbound "
          + ", ".join(f"127.0.0.1:{l['localPort']} -> {l['upstream']}" for l in config["outbound"]))
PY
for sa in frontend payments; do
  port=$([ $sa = frontend ] && echo 18080 || echo 28080)
  python3 -c "
import http.server, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'hello from $sa\n'
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', $port), Echo).serve_forever()" &
  pids+=($!)
  rolemesh-proxy --config-file "$work/$sa/config.json" >"$work/$sa/proxy.log" 2>&1 &
  pids+=($!)
done
wait_for 30 "frontend's app" curl -fsS --max-time 1 http://127.0.0.1:18080/
wait_for 30 "payments' app" curl -fsS --max-time 1 http://127.0.0.1:28080/
wait_for 30 "frontend's proxy" curl -fsS --max-time 1 http://127.0.0.1:15121/ready
wait_for 30 "payments' proxy" curl -fsS --max-time 1 http://127.0.0.1:15221/ready

step "frontend -> payments through the mesh (frontend's outbound 127.0.0.1:9001, mTLS to payments' proxy)"
if a_to_b=$(curl -sS --max-time 5 http://127.0.0.1:9001/ 2>&1); then
  echo "  ALLOWED: $a_to_b"
  a_result=allowed
else
  echo "  failed: $a_to_b"; a_result=failed
fi
step "payments -> frontend through the mesh (payments' outbound 127.0.0.1:9002): frontend allows nobody"
if b_to_a=$(curl -sS --max-time 5 http://127.0.0.1:9002/ 2>&1); then
  echo "  unexpectedly allowed: $b_to_a"; b_result=allowed
else
  echo "  REFUSED: $b_to_a"
  grep -h -i "refus\|denied\|not allowed" "$work/frontend/proxy.log" | tail -n 1 | sed 's/^/  frontend proxy: /' || true
  b_result=refused
fi

step "Summary"
echo "  control plane:  $(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') at $(cat target/cluster/ready)"
echo "  signer:         $signer"
echo "  identities:     $(( $(kubectl get secrets -n shop -l rolemesh.dev/policy --no-headers | wc -l) + $(kubectl get secrets -n billing -l rolemesh.dev/policy --no-headers | wc -l) )) certificate Secrets, roles verified with STS"
echo "  rotation:       payments serial $old_serial -> $new_serial"
echo "  A->B (frontend -> payments): $a_result"
echo "  B->A (payments -> frontend): $b_result"
echo "  took:           $(( $(date +%s) - start ))s"
echo "  the cluster keeps running: 'source target/cluster/env' to use it, 'make cluster-down' to stop it and put the host back as it was"
[ "$a_result" = allowed ] && [ "$b_result" = refused ]

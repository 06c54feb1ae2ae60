#!/usr/bin/env bash
# Webhook benchmark (driver bench/src/bin/webhook.rs): ~10 KiB Pod AdmissionReviews from 64
# concurrent TLS clients for 30 s per phase against one rolemesh-webhook process pinned to CPU 0,
# the load generator on CPU 1.
# Four phases: keep-alive connections with the clients offering BENCH_RATE reviews/s together
# (latency targets), keep-alive closed loop (capacity), a new TLS connection with a full handshake
# per review at BENCH_NEW_CONNECTION_RATE reviews/s (p99 target), and new connections closed loop.
# The webhook serves policy lookups from its caches of the local control plane (started here if
# needed). Prints p50, p99, reviews/s, errors, CPU use and the ratio of each figure to its target.
# Knobs: BENCH_DURATION (s, default 30), BENCH_CONCURRENCY (default 64), BENCH_RATE (2000),
# BENCH_NEW_CONNECTION_RATE (1000), WEBHOOK_CPU (0), CLIENT_CPU (1).
set -euo pipefail
cd "$(dirname "$0")/.."

make --no-print-directory cluster >/dev/null
# shellcheck disable=SC1091
source target/cluster/env
kubectl="${ROLEMESH_TOOLS_BIN:-target/tools/bin}/kubectl"
"$kubectl" apply --server-side --force-conflicts -f deploy/crds.yaml >/dev/null
"$kubectl" wait --for=condition=Established --timeout=60s \
  crd/mtlspolicies.rolemesh.dev crd/mtlsauthorities.rolemesh.dev >/dev/null

cargo build --release --quiet -p rolemesh-webhook --bin rolemesh-webhook
cargo build --release --quiet -p rolemesh-bench --bin bench-webhook

cpus=$(nproc)
webhook_cpu=${WEBHOOK_CPU:-0}
client_cpu=${CLIENT_CPU:-$(( cpus > 1 ? 1 : 0 ))}
if [ "$cpus" -lt 2 ]; then
  echo "note: only $cpus CPU; the load generator shares the webhook's core" >&2
fi

exec taskset -c "$client_cpu" target/release/bench-webhook \
  --webhook-bin target/release/rolemesh-webhook \
  --webhook-cpu "$webhook_cpu" \
  --duration "${BENCH_DURATION:-30}" \
  --concurrency "${BENCH_CONCURRENCY:-64}" \
  --rate "${BENCH_RATE:-2000}" \
  --new-connection-rate "${BENCH_NEW_CONNECTION_RATE:-1000}"

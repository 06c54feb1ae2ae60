#!/usr/bin/env bash
# Proxy benchmark (driver bench/src/bin/proxy.rs): the same echo workload direct, through one and
# two rolemesh hops and through stunnel4 in the two-hop shape, all in one run; prints figures and
# ratios to targets.
# Paths alternate within each of BENCH_ROUNDS rounds (default 3); figures are medians over rounds.
# Knobs: BENCH_SECONDS (bulk and handshake phases, default 3), BENCH_LATENCY_SECONDS (default 4),
# BENCH_ROUNDS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v stunnel4 >/dev/null 2>&1; then
  if ! apt-get install -y stunnel4 >/dev/null 2>&1; then
    apt-get update >/dev/null
    apt-get install -y stunnel4 >/dev/null
  fi
fi

cargo build --release --quiet -p rolemesh-proxy --bin rolemesh-proxy
cargo build --release --quiet -p rolemesh-bench --bin bench-proxy

# The proxy image's glibc tuning (deploy/Dockerfile.proxy), for every process of the run alike.
GLIBC_TUNABLES=$(sed -n 's/^ENV GLIBC_TUNABLES=//p' deploy/Dockerfile.proxy)
if [ -z "$GLIBC_TUNABLES" ]; then
  echo "deploy/Dockerfile.proxy sets no GLIBC_TUNABLES; the benchmark would not run as the image does" >&2
  exit 1
fi
export GLIBC_TUNABLES

exec target/release/bench-proxy run \
  --proxy target/release/rolemesh-proxy \
  --stunnel "$(command -v stunnel4)"

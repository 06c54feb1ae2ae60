#!/usr/bin/env bash
# The injection part of `make bench` (driver bench/src/bin/injection.rs): pod create -> Running on
# the local node, the same busybox pod alternately with and without rolemesh's injection, one pod
# at a time (--pods N of each kind, default 100, after --warmup of each).
# Starts (or reuses) the local cluster, builds and imports rolemesh's images into the node
# (`make images`, which rebuilds only what changed), installs the chart as docs/development.md
# shows and uninstalls it at the end, also when a step fails.
# Prints p50/p99 of both kinds and what injection adds against its target (<= 10 ms p50); exits
# non-zero only when the benchmark could not run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo=${CARGO:-cargo}

make --no-print-directory cluster
make --no-print-directory images CARGO="$cargo"
$cargo build --release --quiet -p rolemesh-bench --bin bench-injection
exec target/release/bench-injection "$@"

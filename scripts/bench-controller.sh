#!/usr/bin/env bash
# The controller part of `make bench`: starts (or reuses) the local control plane, builds the
# release controller and the benchmark driver, and runs bench/src/bin/controller.rs.
# Arguments go to the driver (e.g. `--scenarios issue,kms --rounds 5`; `--help` lists them).
# Prints figures and ratios against their targets; exits non-zero only if a scenario could not run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo=${CARGO:-cargo}

make --no-print-directory cluster
$cargo build --release --quiet -p rolemesh-controller --bin rolemesh-controller
$cargo build --release --quiet -p rolemesh-bench --bin bench-controller
exec target/release/bench-controller --controller target/release/rolemesh-controller "$@"

#!/usr/bin/env bash
# `make bench`: every benchmark section that exists (controller, injection, webhook, proxy), each
# printing its figures and ratios against their targets. Exits non-zero only when a benchmark could
# not run, never because a target was missed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

status=0
failed=()
for part in controller injection webhook proxy; do
  script="scripts/bench-$part.sh"
  if [ ! -f "$script" ]; then
    if [ "$part" = controller ]; then
      echo "$script is missing" >&2
      status=1
      failed+=("$part")
    else
      echo "=== $part: $script not present, skipped"
    fi
    continue
  fi
  echo "=== $part benchmark ($script) ==="
  if bash "$script"; then
    echo "=== $part benchmark done ==="
  else
    echo "=== $part benchmark could not run (exit $?) ===" >&2
    status=1
    failed+=("$part")
  fi
  echo
done
if [ "$status" -ne 0 ]; then
  echo "benchmarks that could not run: ${failed[*]}" >&2
fi
exit "$status"

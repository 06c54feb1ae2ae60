#!/usr/bin/env bash
# Release archives of the kubectl plugin, as krew installs them: target/dist/
#   kubectl-rolemesh-<os>-<arch>.tar.gz (the binary and README.md), its .sha256, and rolemesh.yaml,
#   the krew manifest (deploy/krew/rolemesh.yaml) with each archive's sha256 filled in.
# Targets: $PLUGIN_TARGETS, default linux amd64 and arm64. darwin needs Apple's SDK and linker,
# which this machine does not have: the script says so and builds the others.
# Cargo's incremental release build keeps a second run fast.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
targets=${PLUGIN_TARGETS:-"x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu"}
dist=target/dist
mkdir -p "$dist"
version=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="kubectl-rolemesh"))')
log() { printf '[dist] %s\n' "$*" >&2; }

declare -A platform
for target in $targets; do
  case $target in
    x86_64-unknown-linux-gnu) os=linux arch=amd64 ;;
    aarch64-unknown-linux-gnu) os=linux arch=arm64 ;;
    x86_64-apple-darwin) os=darwin arch=amd64 ;;
    aarch64-apple-darwin) os=darwin arch=arm64 ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  if [ "$os" = darwin ]; then
    log "skipping $target: linking for macOS needs Apple's SDK and ld64 (osxcross), not available here"
    continue
  fi
  envs=() target_args=() out=target/release
  if [ "$target" != "$(rustc -vV | sed -n 's/^host: //p')" ]; then
    target_args=(--target "$target") out=target/$target/release
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
    if [ "$target" = aarch64-unknown-linux-gnu ]; then
      if ! command -v aarch64-linux-gnu-gcc >/dev/null; then
        log "installing the arm64 cross compiler (gcc-aarch64-linux-gnu)"
        { apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross; } >&2 ||
          { echo "need aarch64-linux-gnu-gcc: apt-get install gcc-aarch64-linux-gnu" >&2; exit 1; }
      fi
      envs=(CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar)
    fi
  fi
  log "building kubectl-rolemesh $version for $target"
  # The host's build shares target/release with `make images`.
  env "${envs[@]}" cargo build --release --locked -p kubectl-rolemesh "${target_args[@]}"
  archive="$dist/kubectl-rolemesh-$os-$arch.tar.gz"
  staging=$(mktemp -d)
  cp "$out/kubectl-rolemesh" README.md "$staging/"
  # Reproducible archives: fixed owner, order and times.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$staging" -czf "$archive" kubectl-rolemesh README.md
  rm -rf "$staging"
  sha=$(sha256sum "$archive" | cut -d' ' -f1)
  echo "$sha  $(basename "$archive")" > "$archive.sha256"
  platform[$os-$arch]=$sha
  log "$archive sha256 $sha"
done

python3 - "$version" "$dist/rolemesh.yaml" "${!platform[@]}" -- "${platform[@]}" <<'PY'
import sys
args = sys.argv[1:]
version, out = args[0], args[1]
split = args.index("--")
keys, shas = args[2:split], args[split + 1:]
text = open("deploy/krew/rolemesh.yaml").read().replace("VERSION", version)
for key, sha in zip(keys, shas):
    text = text.replace(f"SHA256_{key.replace('-', '_').upper()}", sha)
# Platforms not built here keep no placeholder: krew would refuse the manifest.
blocks = [b for b in text.split("\n  - selector:") if "SHA256_" not in b]
open(out, "w").write("\n  - selector:".join(blocks).rstrip("\n") + "\n")
print(f"[dist] {out}: krew manifest for {', '.join(sorted(keys))}", file=sys.stderr)
PY

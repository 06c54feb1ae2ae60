#!/usr/bin/env bash
# Builds the node's OCI images without a container engine, one per description dev/images/*.image,
# into target/images/NAME.tar (a tarball `ctr images import` takes). Each image is a single layer
# made of the files its description lists, on an empty base, with its entrypoint, user and
# platform set by go-containerregistry's crane. An image is rebuilt only when its description,
# its files or this script change.
#
#   dev/images/build.sh              the images the node needs (those made of tools, not of @release@)
#   dev/images/build.sh NAME...      the named images, e.g. `controller proxy` after
#                                    `cargo build --release` (CARGO_TARGET_DIR's release/ must be
#                                    target/release)
#
# A description has one directive per line ('#' starts a comment):
#   ref REFERENCE                the image reference pods use (imagePullPolicy: IfNotPresent)
#   file SOURCE PATH [MODE]      copy SOURCE to PATH in the image (MODE defaults to SOURCE's)
#   libs PATH                    the shared libraries the image's PATH needs, copied from the host
#                                by ldd (nothing for a static binary)
#   link TARGET PATH             a symlink PATH -> TARGET
#   dir PATH [MODE]              an empty directory
#   entrypoint ARG...            the entrypoint
#   user UID:GID                 the user it runs as
#   env KEY=VALUE                an environment variable
# SOURCE may start with @tools@ (target/tools) or @release@ (target/release, cargo --release).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tools="$root/target/tools"
crane="$tools/bin/crane"
out="$root/target/images"
mkdir -p "$out" "$tools/stamps"

log() { printf '[images] %s\n' "$*" >&2; }

resolve() { local p=${1//@tools@/$tools}; echo "${p//@release@/$root/target/release}"; }

# The inputs of an image: this script, its description and every file it copies.
image_hash() {
  local desc=$1
  {
    sha256sum "$0" "$desc"
    while read -r verb a _; do
      case "$verb" in
        file) sha256sum "$(resolve "$a")" ;;
        libs) for lib in $(libs_of "$(resolve "$a")"); do sha256sum "$lib"; done ;;
      esac
    done < <(sed 's/#.*//' "$desc")
  } | sha256sum | cut -c1-16
}

libs_of() { # the absolute paths of a dynamic binary's libraries, its loader included
  ldd "$1" 2>/dev/null | grep -oE '/[^ ]+' | sort -u || true
}

registry_pid=
stop_registry() { [ -z "$registry_pid" ] || kill "$registry_pid" 2>/dev/null || true; }
trap stop_registry EXIT

# crane mutates images in a registry: a throwaway one on loopback for the length of the build.
start_registry() {
  [ -z "$registry_pid" ] || return 0
  registry_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$crane" registry serve --address "127.0.0.1:$registry_port" >/dev/null 2>&1 &
  registry_pid=$!
  for _ in $(seq 1 50); do
    curl -fsS -o /dev/null "http://127.0.0.1:$registry_port/v2/" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "crane registry did not start" >&2
  exit 1
}

build() {
  local desc=$1 name ref="" entrypoint="" user="" stage envs=()
  name=$(basename "$desc" .image)
  local hash
  hash=$(image_hash "$desc")
  if [ -f "$out/$name.tar" ] && [ "$(cat "$tools/stamps/image-$name" 2>/dev/null)" = "$hash" ]; then
    return 0
  fi
  local started=$SECONDS
  stage=$(mktemp -d)
  # The layer's "./" entry carries the stage's mode, and mktemp's 0700 would make the image's /
  # closed to every user but root.
  chmod 0755 "$stage"
  while read -r verb a b c; do
    case "$verb" in
      "") ;;
      ref) ref=$a ;;
      file)
        mkdir -p "$stage$(dirname "$b")"
        cp -L "$(resolve "$a")" "$stage$b"
        [ -z "$c" ] || chmod "$c" "$stage$b" ;;
      libs)
        for lib in $(libs_of "$(resolve "$a")"); do
          mkdir -p "$stage$(dirname "$lib")"
          cp -L "$lib" "$stage$lib"
        done ;;
      link) mkdir -p "$stage$(dirname "$b")"; ln -sfn "$a" "$stage$b" ;;
      dir) mkdir -p "$stage$a"; [ -z "$b" ] || chmod "$b" "$stage$a" ;;
      entrypoint) entrypoint=$(echo "$a $b $c" | xargs | tr ' ' ',') ;;
      user) user=$a ;;
      env) envs+=(--env "$a") ;;
      *) echo "$desc: unknown directive $verb" >&2; exit 1 ;;
    esac
  done < <(sed 's/#.*//' "$desc")
  [ -n "$ref" ] && [ -n "$entrypoint" ] || { echo "$desc: needs ref and entrypoint" >&2; exit 1; }
  # A reproducible layer: sorted, owned by root, fixed times.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -cf "$stage.tar" .
  start_registry
  local scratch="127.0.0.1:$registry_port/$name:build"
  if ! { "$crane" append --oci-empty-base -f "$stage.tar" -t "$scratch" &&
    "$crane" mutate "$scratch" --set-platform linux/amd64 --entrypoint "$entrypoint" \
      ${user:+--user "$user"} "${envs[@]}" -t "$ref" -o "$out/$name.tar.new"; } >"$stage.log" 2>&1; then
    cat "$stage.log" >&2
    exit 1
  fi
  mv "$out/$name.tar.new" "$out/$name.tar"
  echo "$ref" > "$out/$name.ref"
  rm -rf "$stage" "$stage.tar" "$stage.log"
  echo "$hash" > "$tools/stamps/image-$name"
  log "built $ref in $((SECONDS - started))s"
}

if [ $# -gt 0 ]; then
  for name in "$@"; do
    [ -f "$root/dev/images/$name.image" ] || { echo "no image description dev/images/$name.image" >&2; exit 1; }
    build "$root/dev/images/$name.image"
  done
else
  for desc in "$root"/dev/images/*.image; do
    grep -q '@release@' "$desc" || build "$desc"
  done
fi

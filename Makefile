# rolemesh — the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
PYTHON ?= python3
export GOFLAGS ?= -buildvcs=false

.PHONY: help tools images cluster cluster-down crds check-crds check-images docs check-docs build test test-unit test-e2e lint demo bench clean plugin-dist

help:
	@echo "make demo          start the local control plane and walk through rolemesh"
	@echo "make test          unit tests, CRD and docs drift checks, integration tests on the local control plane"
	@echo "make test-e2e      the integration tests in e2e/ against a running control plane"
	@echo "make bench         benchmarks (prints figures and ratios)"
	@echo "make images        release builds of rolemesh's binaries -> images (no engine) -> the node's containerd"
	@echo "make cluster       start the local cluster (control plane, node, CoreDNS) + local AWS endpoint (target/cluster/env)"
	@echo "make cluster-down  stop them and put the host back as it was"
	@echo "make crds          regenerate the CRD YAML from crds/src/lib.rs"
	@echo "make docs          regenerate docs/reference.md (CRD YAML) and the chart README values table"
	@echo "make lint          rustfmt and clippy"
	@echo "make plugin-dist   kubectl-rolemesh archives (linux amd64, arm64) and their krew manifest"

## Installs kubectl, helm, the control plane, the node (containerd, CNI, CoreDNS), the images and moto
## into target/ (cached by input hash).
tools:
	@dev/tools/install.sh

## The images the chart runs (controller and webhook, the proxy it injects, the kubectl plugin) and
## the node tests' proxy-protocol-echo app, from release builds, made without a container engine
## (dev/images/*.image) and imported into the node if it runs (dev/node/up.sh imports them when it starts). Cargo and build.sh rebuild only what changed.
RELEASE_PACKAGES := -p rolemesh-controller -p rolemesh-webhook -p rolemesh-proxy -p kubectl-rolemesh \
	-p rolemesh-proxy-protocol-echo
IMAGES := controller proxy plugin proxy-protocol-echo
images: tools
	$(CARGO) build --release --locked $(RELEASE_PACKAGES)
	@dev/images/build.sh $(IMAGES)
	@dev/node/import.sh $(IMAGES)

## kubectl-rolemesh release archives for linux amd64 and arm64 and their krew manifest, in
## target/dist/ (darwin needs Apple's SDK, which is not here; the script says so).
plugin-dist:
	@dev/dist/plugin.sh

cluster: tools
	@dev/cluster/up.sh

cluster-down:
	@dev/cluster/down.sh

# crdgen from the workspace build: `cargo run -p rolemesh-crds` would build the dependencies again
# with that one crate's features.
CRDGEN := $(CARGO) build --quiet --workspace --bins && target/debug/crdgen
crds:
	$(CRDGEN)

check-crds:
	$(CRDGEN) --check

## Fails when a Dockerfile in deploy/ and its description in dev/images/ describe different images.
check-images:
	@$(PYTHON) dev/images/check_dockerfiles.py

docs:
	$(PYTHON) dev/gen_reference.py > docs/reference.md
	$(PYTHON) dev/gen_chart_values.py --write

## Fails when docs/reference.md is not what `make docs` would write from the CRD YAML.
check-docs:
	@$(PYTHON) dev/gen_reference.py | diff -u docs/reference.md - \
	  || { echo "docs/reference.md is stale: run make docs" >&2; exit 1; }
	@$(PYTHON) dev/gen_chart_values.py | diff -u <(sed -n '/^<!-- values table/,/^<!-- end of values table/p' charts/rolemesh/README.md | sed '1d;$$d') - \
	  || { echo "the values table of charts/rolemesh/README.md is stale: run make docs" >&2; exit 1; }

build:
	$(CARGO) build --workspace --bins

## Everything: builds first so the control plane is not left idle while Rust compiles (the
## integration tests in e2e/ start the workspace's binaries from the target directory), checks
## that the generated CRDs and docs are current, then starts a fresh control plane, runs every
## test against it, and stops it whatever the outcome.
## The user's first command, on a cluster that has never seen rolemesh: run before anything else
## applies the CRDs (e2e/tests/install.rs).
FIRST_ON_A_FRESH_CLUSTER := documented_helm_install_works_on_a_cluster_without_rolemesh_crds
test: tools
	$(CARGO) test --workspace --no-run
	$(CARGO) build --workspace --bins
	@$(MAKE) --no-print-directory images
	@$(MAKE) --no-print-directory check-crds check-docs check-images
	@dev/cluster/down.sh >/dev/null 2>&1; dev/cluster/up.sh
	@status=0; \
	  $(CARGO) test --workspace --test install || status=$$?; \
	  $(CARGO) test --workspace --no-fail-fast -- --test-threads=4 --skip $(FIRST_ON_A_FRESH_CLUSTER) || status=$$?; \
	  dev/cluster/down.sh; exit $$status

## Tests that need no control plane: every crate's unit tests.
test-unit:
	$(CARGO) test --workspace --lib --bins

## The integration tests in e2e/ against an already running control plane (`make cluster`).
test-e2e:
	$(CARGO) build --workspace --bins
	$(CARGO) test -p rolemesh-e2e --no-fail-fast -- --test-threads=4

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

demo: tools images
	@scripts/demo.sh

bench: tools
	@scripts/bench.sh

clean: cluster-down
	rm -rf target

# rolemesh — the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
export GOFLAGS ?= -buildvcs=false

.PHONY: help tools cluster cluster-down crds check-crds build test test-unit test-integration lint demo bench clean

help:
	@echo "make demo          start the local control plane and walk through rolemesh"
	@echo "make test          unit tests, CRD drift check, integration tests on the local control plane"
	@echo "make bench         benchmarks (prints figures and ratios)"
	@echo "make cluster       start the local cluster (control plane, node, CoreDNS) + local AWS endpoint (target/cluster/env)"
	@echo "make cluster-down  stop them and put the host back as it was"
	@echo "make crds          regenerate the CRD YAML from crds/src/lib.rs"
	@echo "make lint          rustfmt and clippy"

## Installs kubectl, helm, the control plane, the node (containerd, CNI, CoreDNS), the images and moto
## into target/ (cached by input hash).
tools:
	@dev/tools/install.sh

cluster: tools
	@dev/cluster/up.sh

cluster-down:
	@dev/cluster/down.sh

crds:
	$(CARGO) run --quiet -p rolemesh-crds --bin crdgen

check-crds:
	$(CARGO) run --quiet -p rolemesh-crds --bin crdgen -- --check

build:
	$(CARGO) build --workspace --bins

## Everything: builds first so the control plane is not left idle while Rust compiles, then starts
## a fresh control plane, runs every test against it, and stops it whatever the outcome.
test: tools
	$(CARGO) test --workspace --no-run
	$(CARGO) build --workspace --bins
	@dev/cluster/down.sh >/dev/null 2>&1; dev/cluster/up.sh
	@status=0; $(CARGO) test --workspace --no-fail-fast -- --test-threads=4 || status=$$?; \
	  dev/cluster/down.sh; exit $$status

test-unit:
	$(CARGO) test --workspace --lib --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

demo: tools
	@scripts/demo.sh

bench: tools
	@scripts/bench.sh

clean: cluster-down
	rm -rf target

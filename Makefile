# cloudpass: the documented entry points. `make` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
# Go-built Kubernetes tools (kube-apiserver, etcd, kubectl, helm) live in a cache outside
# the repository; override with CLOUDPASS_TOOLS_DIR.
TOOLS_BIN = $(shell e2e/tools/build.sh --print)
# The Python venv (moto and the cloud SDKs) lives in a cache too; override with CLOUDPASS_PYTHON_DIR.
PYTHON_VENV = $(shell e2e/tools/python.sh --print)

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: tools
tools: ## Install the node's Debian packages if missing, build the Kubernetes binaries, containerd, CoreDNS, helm, the Python venv and the emulators into the cache (minutes the first time, instant after)
	@e2e/tools/node-packages.sh
	@e2e/tools/build.sh >/dev/null
	@e2e/tools/python.sh >/dev/null
	@e2e/tools/emulators.sh >/dev/null

.PHONY: demo
demo: tools images ## Run cloudpass on a real one-node cluster here and narrate it: helm install, cloud emulators, Deployments reading S3 and Azure Blob (needs root; Ctrl-C stops)
	$(CARGO) build -q --locked -p cloudpass-e2e --bin cloudpass-demo
	@CLOUDPASS_TOOLS_BIN="$(TOOLS_BIN)" CLOUDPASS_PYTHON_VENV="$(PYTHON_VENV)" $(CARGO) run -q -p cloudpass-e2e --bin cloudpass-demo

.PHONY: crds
crds: ## Regenerate crds/ (and the chart's copy) from the Rust types in api/
	$(CARGO) run -q -p cloudpass-api --example crdgen -- crds
	cp crds/*.yaml charts/cloudpass/crds/

.PHONY: lint
lint: ## cargo fmt --check, clippy with warnings as errors (the fuzz targets included), cargo deny (licenses, bans, sources)
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml --locked --target-dir target -- -D warnings
	"$$(e2e/tools/cargo-deny.sh)" check bans licenses sources

.PHONY: unit
unit: ## The fast tier: every unit test (no Kubernetes binaries, emulators or images needed); about a minute warm
	$(CARGO) test --workspace --locked --lib --bins

.PHONY: test
test: tools images ## Build the tools and images if needed, then run every unit and end-to-end test (the real-node suites included)
	CLOUDPASS_TOOLS_BIN="$(TOOLS_BIN)" CLOUDPASS_PYTHON_VENV="$(PYTHON_VENV)" $(CARGO) test --workspace --locked --no-fail-fast

.PHONY: bench
bench: tools images ## Run the benchmarks against the real local apiserver and node and print their figures
	CLOUDPASS_TOOLS_BIN="$(TOOLS_BIN)" CLOUDPASS_PYTHON_VENV="$(PYTHON_VENV)" $(CARGO) bench --locked -p cloudpass-operator --bench converge
	CLOUDPASS_TOOLS_BIN="$(TOOLS_BIN)" CLOUDPASS_PYTHON_VENV="$(PYTHON_VENV)" $(CARGO) bench --locked -p cloudpass-operator --bench broker
	CLOUDPASS_TOOLS_BIN="$(TOOLS_BIN)" CLOUDPASS_PYTHON_VENV="$(PYTHON_VENV)" $(CARGO) bench --locked -p cloudpass-agent --bench agent
	CLOUDPASS_TOOLS_BIN="$(TOOLS_BIN)" CLOUDPASS_PYTHON_VENV="$(PYTHON_VENV)" $(CARGO) bench --locked -p cloudpass-webhook --bench admission
	$(CARGO) build --release --locked -p cloudpass-operator -p cloudpass-webhook -p cloudpass-agent
	CLOUDPASS_TOOLS_BIN="$(TOOLS_BIN)" CLOUDPASS_PYTHON_VENV="$(PYTHON_VENV)" $(CARGO) bench --locked -p cloudpass-e2e --bench scenario
	CLOUDPASS_TOOLS_BIN="$(TOOLS_BIN)" CLOUDPASS_PYTHON_VENV="$(PYTHON_VENV)" $(CARGO) bench --locked -p cloudpass-e2e --bench node

.PHONY: images
images: ## Build the operator, webhook and agent images (as the Dockerfile says), the pause and test-apps images, without a container engine, into target/images
	$(CARGO) run -q --locked -p cloudpass-e2e --bin cloudpass-images

MUSL_TARGET = x86_64-unknown-linux-musl

.PHONY: agent-static
agent-static: ## Build the static (musl) operator, webhook and agent with images/build-binaries.sh, as the images have them, into target/images/binaries
	images/build-binaries.sh target/images/binaries
	@file target/images/binaries/cloudpass-agent; ls -l target/images/binaries/cloudpass-agent

FUZZ_SECONDS ?= 60
FUZZ_TARGETS = sts_xml broker_request agent_config namespace_config admission_pod hosts_and_formats durations_and_windows \
  oauth2_token entra_token google_token secret_values

.PHONY: fuzz
fuzz: ## Run every fuzz target for FUZZ_SECONDS (default 60) each; needs nightly Rust, installs cargo-fuzz
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	cd fuzz && for target in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$target && \
	  cargo +nightly fuzz run $$target corpus/$$target seeds/$$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

.PHONY: tools-go-mod
tools-go-mod: ## Regenerate e2e/tools/go.mod after changing e2e/tools/versions.env
	e2e/tools/gen-go-mod.sh

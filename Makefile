# ecom-settings-exporter: build, test, lint and deploy.
# `make test` is self-contained: it creates .venv with moto and starts moto for the tests.

SHELL := bash
VENV := .venv
PYTHON ?= python3
MOTO_VERSION := 5.2.5
CFN_LINT_VERSION := 1.58.0
SAM_CLI_VERSION := 1.170.0
# The translator SAM_CLI_VERSION uses.
SAM_TRANSLATOR_VERSION := 1.115.0
# Build tools, pinned: an unpinned install would build what is deployed with whatever is newest.
CARGO_LAMBDA_VERSION := 1.9.2
ZIGLANG_VERSION := 0.17.1
AWSCLI_VERSION := 1.46.3
# samconfig.toml section: dev or prod.
ENV ?= dev
# Wherever cargo builds (CARGO_TARGET_DIR or a shared target directory included).
TARGET_DIR = $(shell cargo metadata --format-version 1 --no-deps | $(PYTHON) -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

.PHONY: all pause resume paused migrate prerequisites edge deploy-check artifact-check bins bench propagation scale demo build sam-build test unit-test lint fmt fuzz venv tools sam-cli local deploy clean simulate

all: lint test

## What the machine needs beside the project's files: one line for each missing, with how to get it.
prerequisites:
	@PYTHON=$(PYTHON) scripts/prerequisites.sh $(if $(filter test,$(MAKECMDGOALS)),test)

## Python tools in a local venv: moto for the tests, cfn-lint for the template, SAM's translator
## for the deploy check.
$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		'moto[server]==$(MOTO_VERSION)' 'cfn-lint==$(CFN_LINT_VERSION)' \
		'aws-sam-translator==$(SAM_TRANSLATOR_VERSION)'
	touch $@

## The edge Worker's runtime (Miniflare with workerd, esbuild, zod), pinned by proxy/package-lock.json.
proxy/node_modules/.installed: proxy/package.json proxy/package-lock.json
	npm ci --prefix proxy --no-audit --no-fund --loglevel=error
	touch $@

edge: proxy/node_modules/.installed

venv: $(VENV)/.installed

## cargo-lambda (and zig, for arm64 builds) and the AWS CLI (v1) from PyPI into the venv.
$(VENV)/.tools: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		'cargo-lambda==$(CARGO_LAMBDA_VERSION)' 'ziglang==$(ZIGLANG_VERSION)' 'awscli==$(AWSCLI_VERSION)'
	touch $@

tools: $(VENV)/.tools

## The SAM CLI from PyPI into the venv (for lint, sam-build and deploy).
$(VENV)/.sam: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'aws-sam-cli==$(SAM_CLI_VERSION)'
	touch $@

sam-cli: $(VENV)/.sam

# cargo-lambda and zig are found on the venv's PATH; SAM needs a region even to validate.
SAM = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" SAM_CLI_TELEMETRY=0 \
	AWS_DEFAULT_REGION="$${AWS_REGION:-$${AWS_DEFAULT_REGION:-eu-west-1}}" $(VENV)/bin/sam

## Every binary of the workspace (the function, the stand-ins, the CLI) in one debug build: the
## demo, the local stack and the CLI share it, so the AWS SDK compiles once.
bins:
	cargo build --locked --workspace --bins

## The function's peers on this machine (moto, KV emulator, API-keys stand-in); see the README.
local: prerequisites venv bins
	scripts/local-stack.sh

## The whole flow on this machine: table, stream, function, KV (see the README).
demo: prerequisites venv bins $(if $(shell command -v npm),edge)
	$(TARGET_DIR)/debug/ecom-emulators demo --function $(TARGET_DIR)/debug/ecom-settings-exporter

## The release binary as deployed (ledger on, CPU held to 512 MB's share where the machine
## allows), its DynamoDB answered from a recording of moto's at +0, +5, +10 ms, at 100, 1,000 and
## 5,000 records: CPU, wall, requests and the cost of a million changes, beside the seed's design
## and the Python reference (docs/performance.md).
# The stand-ins are a release build too: in a debug build, reading a 2,000-pair bulk body and
# answering from the recording took longer than the function itself.
bench: venv
	cargo build --quiet --locked --release -p ecom-settings-exporter
	cargo build --quiet --locked --release -p ecom-emulators
	scripts/with-moto.sh $(TARGET_DIR)/release/ecom-emulators bench \
		--function $(TARGET_DIR)/release/ecom-settings-exporter --python $(VENV)/bin/python

## Time from a table write to its KV value under a steady stream (5 new indexes a second for
## 60 s) through the local stack, with the batching window as deployed (10 s) and at 2 s.
propagation: prerequisites venv bins
	for window in 10 2; do \
		$(TARGET_DIR)/debug/ecom-emulators demo --function $(TARGET_DIR)/debug/ecom-settings-exporter \
			--propagation 60 --rate 5 --batching-window $$window || exit 1; \
	done

## What each path costs at 1,000, 5,000 and 20,000 indexes, against moto (minutes; docs/scale.md).
scale: venv
	cargo build --quiet --locked --release -p ecom-settings-exporter
	cargo build --quiet --locked -p ecom-emulators
	$(VENV)/bin/python scripts/scale.py --function $(TARGET_DIR)/release/ecom-settings-exporter \
		--emulators $(TARGET_DIR)/debug/ecom-emulators $(if $(SIZES),--sizes $(SIZES)) \
		$(if $(SKIP),--skip "$(SKIP)") $(if $(FLEET),--fleet $(FLEET))

## moto's patches held equal to moto's own; check-permissions' own tests; unit and integration tests (moto on a free port, KV emulator and API-keys stand-in in-process,
## the edge Worker in workerd), then every AWS call the function made in them checked against the
## role the template gives it, then the template deployed to moto (deploy-check).
test: prerequisites venv edge
	$(VENV)/bin/python scripts/moto_patches.py --check
	$(VENV)/bin/python -m unittest --quiet scripts/test_check_permissions.py scripts/test_deploy_check.py scripts/test_scale.py
	AWS_CALLS_RECORDING=$(CURDIR)/target/aws-calls.jsonl \
		scripts/with-moto.sh cargo test --workspace --all-targets --locked
	$(VENV)/bin/python scripts/check-permissions.py target/aws-calls.jsonl template.yaml
	$(MAKE) --no-print-directory deploy-check

## template.yaml translated, checked, created in moto's CloudFormation, and the function run as the
## stack configures it (scripts/deploy-check.py, about 10 s), with the debug binaries the tests (or
## make bins) built.
FUNCTION ?= $(TARGET_DIR)/debug/ecom-settings-exporter
deploy-check: venv
	AWS_CALLS_RECORDING=$(CURDIR)/target/deploy-check-calls.jsonl \
		scripts/with-moto.sh $(VENV)/bin/python scripts/deploy-check.py \
		--function $(FUNCTION) --emulators $(TARGET_DIR)/debug/ecom-emulators
	$(VENV)/bin/python scripts/check-permissions.py --calls-only \
		--ledger ci-EcomIndexSettingsTable=ci-EcomSettingsExporterLedger target/deploy-check-calls.jsonl template.yaml

## The simulation (src/simulation/): SEEDS seeded runs of every writer over the in-memory world
## from FIRST (default 0) on SHARDS stream shards (2, or 3), on the plain workload (VARIETY=0),
## the varied one (1), the wide one (2), the eventual one (3), the hostile one (4) or the
## contended one (5), checked against the reference model; prints seeds a second and the first
## seed that fails with its trace (`make test` runs 2,000 plain on two shards, 500 plain on
## three and 500 hostile on two). NET_OFF=<protection> takes one protection out (the net).
SEEDS ?= 20000
FIRST ?= 0
SHARDS ?= 2
VARIETY ?= 0
simulate:
	SIMULATION_SEEDS=$(SEEDS) SIMULATION_FIRST_SEED=$(FIRST) SIMULATION_SHARDS=$(SHARDS) \
	SIMULATION_VARIETY=$(VARIETY) $(if $(NET_OFF),SIMULATION_NET_OFF=$(NET_OFF)) \
		cargo test --locked --lib simulation::every_seed_ends_with_kv_as_the_table_implies -- --exact

## Unit tests only: no moto, no network.
unit-test:
	cargo test --workspace --lib --locked

## Bounded fuzzing of decoding and planning (nightly + cargo-fuzz; FUZZ_SECONDS per target).
fuzz: venv
	scripts/fuzz.sh

## Lambda artifact for arm64 (cargo-lambda, installed into the venv from PyPI with zig), as
## `sam build` builds it: $(TARGET_DIR)/lambda/ecom-settings-exporter/bootstrap.
build: tools
	rustup target add aarch64-unknown-linux-gnu
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo lambda build --release --arm64 --bin ecom-settings-exporter

## The artifact Lambda runs, checked: `make build`, an aarch64 ELF, then deploy-check with it as the
## function (under qemu-user on another machine; Debian: qemu-user-static, libc6-arm64-cross,
## libgcc-s1-arm64-cross). .ci/run runs it after the tests, whose build gives deploy-check its
## debug stand-ins (alone: `make bins` first).
artifact-check: build
	scripts/artifact.sh check $(TARGET_DIR)/lambda/ecom-settings-exporter/bootstrap
	$(MAKE) --no-print-directory deploy-check FUNCTION=$(TARGET_DIR)/lambda/bootstrap-here

## fmt, clippy, the template. The fuzz targets are their own workspace (nightly for `make fuzz`)
## but compile on stable: checked here so they never fall behind the library's API again.
lint: venv sam-cli
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo check --quiet --manifest-path fuzz/Cargo.toml --bins --locked
	$(VENV)/bin/cfn-lint template.yaml
	$(SAM) validate --lint --config-env $(ENV)

fmt:
	cargo fmt --all

## The SAM artifact: the arm64 bootstrap under .aws-sam/build/ExporterFunction/.
sam-build: tools sam-cli
	rustup target add aarch64-unknown-linux-gnu
	$(SAM) build --config-env $(ENV)

## sam build, then sam deploy with samconfig.toml's ENV section (confirms the change set in prod),
## the release (crate version + commit) naming the version it publishes (scripts/release.py).
deploy: sam-build
	mapfile -t overrides < <($(VENV)/bin/python scripts/release.py overrides $(ENV)) && \
		$(SAM) deploy --config-env $(ENV) --parameter-overrides "$${overrides[@]}"

## Pause or resume the deployed exporter of ENV as a whole: the stream's mapping, the schedule,
## and the alarms a pause sets off (docs/operations.md, "Pausing and resuming"); `paused` shows it.
pause resume: venv
	$(VENV)/bin/python scripts/pause.py $@ --env $(ENV)

paused: venv
	$(VENV)/bin/python scripts/pause.py status --env $(ENV)

## The migration before the stream runs (docs/operations.md, "Migrating a table that holds
## indexes"): paused, a full backfill, a reconcile pass with repair, resumed. Exit 1 of the CLI
## (rejected records, drift repaired) goes on; the stream waits while the references are not
## complete, so a migration stopped short is safe and `make migrate` again resumes it.
CTL = $(TARGET_DIR)/debug/ecom-settings-ctl --function-name $(ENV)-EcomSettingsExporterLambda
migrate: venv bins
	$(VENV)/bin/python scripts/pause.py pause --env $(ENV)
	$(CTL) backfill || [ $$? -eq 1 ]
	$(CTL) reconcile --repair || [ $$? -eq 1 ]
	$(VENV)/bin/python scripts/pause.py resume --env $(ENV)

clean:
	cargo clean
	rm -rf $(VENV) .aws-sam

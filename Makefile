# ecom-settings-exporter: build, test, lint and deploy.
# `make test` is self-contained: it creates .venv with moto and starts moto for the tests.

SHELL := bash
VENV := .venv
PYTHON ?= python3
MOTO_VERSION := 5.2.5
CFN_LINT_VERSION := 1.58.0
STACK ?= ecom-settings-exporter-dev
# Wherever cargo builds (CARGO_TARGET_DIR or a shared target directory included).
TARGET_DIR = $(shell cargo metadata --format-version 1 --no-deps | $(PYTHON) -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

.PHONY: all demo build test unit-test lint fmt fuzz venv tools local deploy clean

all: lint test

## Python tools in a local venv: moto for the tests, cfn-lint for the template.
$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		'moto[server]==$(MOTO_VERSION)' 'cfn-lint==$(CFN_LINT_VERSION)'
	touch $@

venv: $(VENV)/.installed

## cargo-lambda (and zig, for arm64 builds) from PyPI into the venv.
$(VENV)/.tools: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check cargo-lambda ziglang
	touch $@

tools: $(VENV)/.tools

## The function's peers on this machine (moto, KV emulator, API-keys stand-in); see the README.
local: venv
	scripts/local-stack.sh

## The whole flow on this machine: table, stream, function, KV (see the README).
demo: venv
	cargo build --quiet --locked -p ecom-settings-exporter -p ecom-emulators
	$(TARGET_DIR)/debug/ecom-emulators demo --function $(TARGET_DIR)/debug/ecom-settings-exporter

## Unit and integration tests (moto on a free port, KV emulator and API-keys stand-in in-process).
test: venv
	scripts/with-moto.sh cargo test --workspace --all-targets --locked

## Unit tests only: no moto, no network.
unit-test:
	cargo test --workspace --lib --locked

## Bounded fuzzing of decoding and planning (nightly + cargo-fuzz; FUZZ_SECONDS per target).
fuzz: venv
	scripts/fuzz.sh

## Lambda artifact for arm64 (cargo-lambda, installed into the venv from PyPI with zig).
build: tools
	rustup target add aarch64-unknown-linux-gnu
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo lambda build --release --arm64 --bin ecom-settings-exporter

lint: venv
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	$(VENV)/bin/cfn-lint template.yaml

fmt:
	cargo fmt --all

## sam build && sam deploy, with the template's parameters from samconfig or PARAMS="Key=Value ...".
deploy:
	sam build
	sam deploy --stack-name $(STACK) --capabilities CAPABILITY_IAM --resolve-s3 \
		$(if $(PARAMS),--parameter-overrides $(PARAMS),)

clean:
	cargo clean
	rm -rf $(VENV) .aws-sam

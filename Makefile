# rdmig: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: demo test deps lint unit fuzz

# Installs what a fresh Debian machine lacks (build tools for the crates in this workspace).
deps:
	@command -v cargo >/dev/null || { echo "cargo (rustup) is required"; exit 1; }
	@if ! command -v cc >/dev/null || ! command -v pkg-config >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential pkg-config; \
	fi

# A complete live migration with a report.
demo: deps
	$(CARGO) run --release -q -p rdmig-model --example demo

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: deps
	$(CARGO) test --workspace

# Everything: formatting, lints, and every test suite.
test: lint unit

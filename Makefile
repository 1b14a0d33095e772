# rdmig: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

FUZZ_TARGETS := wire_decode wire_roundtrip destination_session source_session handshake_auth \
	listener_session data_hello tcp_data_frame tls_data_frame verbs_bootstrap qmp_reply save_file
# Seconds each fuzz target runs inside `make test`.
FUZZ_SMOKE_SECONDS ?= 16
TARGET ?= wire_decode
SECONDS ?= 60
# libFuzzer worker processes per target in `make fuzz-campaign`.
JOBS ?= 1
# A target's dictionary option, relative to fuzz/, if it has one (fuzz/dict/, `make fuzz-dicts`).
fuzz_dict = $(if $(wildcard fuzz/dict/$(1).dict),-dict=dict/$(1).dict)

.PHONY: demo test deps fuzz-deps lint unit loom netns fuzz fuzz-smoke fuzz-seeds fuzz-dicts fuzz-campaign fuzz-coverage bench rxe qemu qemu-bench qemu-save-bench

# Debian packages the build needs: a C toolchain, and for the verbs transport (ibverbs-sys
# builds rdma-core's headers with cmake and generates bindings with libclang) the rest.
DEB_DEPS := build-essential pkg-config cmake libclang-dev libnl-3-dev libnl-route-3-dev libibverbs-dev

# Installs what a fresh Debian machine lacks (build tools for the crates in this workspace).
deps:
	@command -v cargo >/dev/null || { echo "cargo (rustup) is required"; exit 1; }
	@missing=""; for p in $(DEB_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

fuzz-deps: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked

# A complete live migration with a report: a writing workload, a destination and a source as
# separate processes on loopback, verified end to end.
demo: deps
	$(CARGO) build --release -q -p rdmig
	./target/release/rdmig demo

# rdmig's data path next to iperf3 -l 1M (installed here if missing) for 1 stream and 2 pairs,
# rdmig with 1 and 2 channels, memory overhead, dirty-scan rate: medians of 3 runs.
bench: deps
	@command -v iperf3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3; }
	$(CARGO) build --release -q -p rdmig
	./target/release/rdmig bench

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

# All unit, property, snapshot and integration tests, plus fuzz corpus and crash replay.
unit: deps
	$(CARGO) test --workspace --all-features

# Structures shared between threads, under the loom model checker.
loom: deps
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom $(CARGO) test --release -p rdmig --test loom_sync --test loom_bitmap

# Every wait ends, on real networks (impl/tests/netns.rs, needs root): a veth link between two
# network namespaces cut for 1 s, 10 s and for good, during pre-copy, after the pause and while
# a large device state streams; a destination that never acknowledges, a trickling data frame,
# 200 stray connections, SIGTERM and kill -9 to the source after the pause. About 90 seconds.
netns: deps
	$(CARGO) test -p rdmig --test netns -- --ignored --test-threads=1

# One fuzz target: make fuzz TARGET=destination_session SECONDS=600
fuzz: fuzz-deps
	cd fuzz && $(CARGO) fuzz run -s none $(TARGET) -- -max_total_time=$(SECONDS) -print_final_stats=1 \
		$(call fuzz_dict,$(TARGET))

# Every target for a short time, new inputs kept out of the checked-in corpus.
fuzz-smoke: fuzz-deps
	cd fuzz && $(CARGO) fuzz build -s none
	@set -e; for t in $(FUZZ_TARGETS); do \
		tmp=$$(mktemp -d); \
		echo "fuzz $$t for $(FUZZ_SMOKE_SECONDS)s"; \
		dict=""; [ -f fuzz/dict/$$t.dict ] && dict="-dict=dict/$$t.dict"; \
		(cd fuzz && $(CARGO) fuzz run -s none $$t $$tmp corpus/$$t -- \
			-max_total_time=$(FUZZ_SMOKE_SECONDS) -print_final_stats=1 $$dict 2>&1 | \
			grep -E 'stat::(number_of_executed_units|average_exec_per_sec)|DONE|panicked|SUMMARY|crash-'; \
			exit $${PIPESTATUS[0]}); \
		rm -rf $$tmp; \
	done

# Regenerates the seed corpora from the sample frames and a recorded migration, and those of the
# QMP and RDMA bootstrap targets.
fuzz-seeds:
	$(CARGO) run -q -p rdmig-check --example fuzz_seeds
	$(CARGO) run -q -p rdmig --example parser_seeds

# Regenerates fuzz/dict/<target>.dict from the parsers' constants (a test checks they are current).
fuzz-dicts:
	$(CARGO) run -q -p rdmig --example fuzz_dicts

# Every target at once for SECONDS (default 600) with JOBS worker processes each; new coverage
# merged into fuzz/corpus/<target>/, crash inputs copied to fuzz/artifacts/<target>/ with a
# reproduction command, and a table (fuzz/campaign.py).
fuzz-campaign: fuzz-deps
	python3 fuzz/campaign.py --seconds $(if $(filter command line environment,$(origin SECONDS)),$(SECONDS),600) \
		--jobs $(JOBS) $(FUZZ_TARGETS)

# Line coverage of what the corpora reach in model/src and the parsers of impl/: HTML in
# target/fuzz-coverage/html/, one line per file in target/fuzz-coverage/summary.txt.
fuzz-coverage: deps
	fuzz/coverage.sh

# The verbs transport over soft-RoCE in a QEMU/TCG VM with a Debian kernel (tests/rxe/run.sh):
# migrations with --transport rdma (dynamic, pin-all with 2 channels, soft-dirty), a wrong key,
# a killed destination, and ib_write_bw vs rdmig throughput. Downloads are cached in
# target/rxe-cache.
rxe: deps
	$(CARGO) build --release -q -p rdmig
	RDMIG_BIN=$${CARGO_TARGET_DIR:-target}/release/rdmig tests/rxe/run.sh

# A real QEMU guest (TCG, RAM in a shared file) migrated live by rdmig at dirty rates 0, 50 and
# 200 MB/s, next to QEMU's own precopy and multifd migration of the same guest, plus a killed
# destination, a destination QEMU that cannot load the state and a guest without shared RAM
# (tests/qemu/run.sh; QEMU 10, the kernel and the guest are cached in target/qemu-cache).
qemu: deps
	tests/qemu/run.sh

# A 1 GiB QEMU guest (768 MiB filled) migrated by rdmig 2 channels (with and without --verify)
# next to QEMU's own multifd with 2 channels, at 0, 50 and 200 MB/s, 3 runs each: the medians,
# the ratios, and every run in target/qemu-cache/results.jsonl. About 15 minutes; not in `make test`.
qemu-bench: deps
	tests/qemu/bench.sh

# rdmig save / restore of the same 1 GiB guest next to QEMU's mapped-ram (multifd, 2 channels)
# and its sequential file: stream, and dd O_DIRECT; page cache dropped before every restore
# (root). Table of medians and ratios; every run in target/qemu-cache/save-results.jsonl.
# About 5 minutes; not in `make test`.
qemu-save-bench: deps
	tests/qemu/save-bench.sh

# Everything: formatting, lints, every test suite, loom, the network-namespace liveness tests, a short run of every fuzz target, the
# real-verbs migrations over soft-RoCE in a VM, and the live QEMU guest migrations.
test: lint unit loom netns fuzz-smoke rxe qemu

#!/bin/bash
# Live migration of a real QEMU guest: prepares QEMU 10, the kernel and the guest
# (tests/qemu/prepare.sh), then runs impl/tests/qemu_guest.rs one test at a time: rdmig at
# dirty rates 0, 50 and 200 MB/s (1 and 2 channels, and once with --verify), QEMU's own precopy and multifd migration of the same guest
# for comparison, and the failure cases. Prints the comparison table at the end.
#
# Environment: QEMU_CACHE (default target/qemu-cache), QEMU_TESTS (a test name filter).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QEMU_CACHE:-$ROOT/target/qemu-cache}
start=$(date +%s)
QEMU_CACHE=$CACHE "$ROOT/tests/qemu/prepare.sh"
export RDMIG_QEMU_ENV=$CACHE/env
export RDMIG_QEMU_RESULTS=$CACHE/results.jsonl
rm -f "$RDMIG_QEMU_RESULTS"
cd "$ROOT"
# The benchmarks (bench_*) are `make qemu-bench`'s.
cargo test --release -q -p rdmig --test qemu_guest -- --ignored --test-threads=1 --skip bench_ ${QEMU_TESTS:-}
python3 - "$RDMIG_QEMU_RESULTS" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
if rows:
    print("| dirty rate (set / measured MB/s) | migration | total time (ms) | downtime (ms) | transferred (MB) | guest survived |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["rate_mb_s"], not r["tool"].startswith("rdmig"), r["tool"])):
        print(f'| {r["rate_mb_s"]} / {r["measured_dirty_mb_s"]} | {r["tool"]} | {r["total_ms"]} | {r["downtime_ms"]} | {r["transferred_mb"]} | {"yes" if r["survived"] else "NO: " + r["detail"]} |')
PY
echo "qemu: all passed in $(($(date +%s) - start)) s"

#!/bin/bash
# `make qemu-save-bench`: a QEMU guest (1 GiB, 768 MiB filled by memcheck; RDMIG_QEMU_GUEST_MB
# and RDMIG_QEMU_FILL_MB to change) saved to a file and restored, in turn, by `rdmig save` /
# `rdmig restore` (1 and 2 channels, with and without --direct-io), by QEMU's mapped-ram with
# multifd on 2 channels (with and without its direct-io) and by QEMU's sequential `file:`
# stream, RDMIG_QEMU_BENCH_RUNS times (default 3); `dd` with O_DIRECT on the same file system is
# the ceiling. The page cache is dropped before every restore (needs root). The save file lives
# in the temporary directory (TMPDIR), the guest's RAM in /dev/shm. Every run is a JSON line in
# target/qemu-cache/save-results.jsonl; the table shows medians and ratios against QEMU's
# mapped-ram.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QEMU_CACHE:-$ROOT/target/qemu-cache}
QEMU_CACHE=$CACHE "$ROOT/tests/qemu/prepare.sh"
export RDMIG_QEMU_ENV=$CACHE/env
export RDMIG_QEMU_RESULTS=$CACHE/save-results.jsonl
export RDMIG_QEMU_GUEST_MB=${RDMIG_QEMU_GUEST_MB:-1024}
export RDMIG_QEMU_FILL_MB=${RDMIG_QEMU_FILL_MB:-768}
rm -f "$RDMIG_QEMU_RESULTS"
cd "$ROOT"
cargo test --release -q -p rdmig --test qemu_guest -- --ignored --test-threads=1 --nocapture \
	bench_save_restore_against_qemu_mapped_ram 2>&1 | grep -E '^(ROW|PHASES|test |thread)' || true
echo "file system of the save file: $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2 {print $2}')"
python3 - "$RDMIG_QEMU_RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tools = list(dict.fromkeys(r["tool"] for r in rows))
def med(tool, key):
    v = [r[key] for r in rows if r["tool"] == tool]
    return statistics.median(v) if v else None
base = "qemu mapped-ram 2ch"
bs, bd, br = med(base, "save_ms"), med(base, "save_durable_ms"), med(base, "restore_ms")
runs = len([r for r in rows if r["tool"] == base])
print(f"guest {rows[0]['guest_mb']} MiB, {rows[0]['fill_mb']} MiB filled; medians of {runs} runs")
print("| tool | save (ms) | save until on disk (ms) | restore to running (ms) | file MB logical / allocated | save ratio | restore ratio | guest verified |")
print("|---|---|---|---|---|---|---|---|")
for t in tools:
    s, d, r = med(t, "save_ms"), med(t, "save_durable_ms"), med(t, "restore_ms")
    lg, al = med(t, "logical_mb"), med(t, "allocated_mb")
    ok = all(x["survived"] for x in rows if x["tool"] == t)
    print(f"| {t} | {s:.0f} | {d:.0f} | {r:.0f} | {lg:.0f} / {al:.0f} | {d / bd:.2f} | {r / br:.2f} | {'yes' if ok else 'NO'} |")
print(f"ratios: against {base}'s save until on disk and its restore")
bad = [r for r in rows if not r["survived"]]
for r in bad:
    print("GUEST FAILED:", r)
sys.exit(1 if bad else 0)
PY

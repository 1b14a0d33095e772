#!/bin/bash
# `make qemu-bench`: a QEMU guest (1 GiB, 768 MiB filled by memcheck; RDMIG_QEMU_GUEST_MB and
# RDMIG_QEMU_FILL_MB to change) migrated by rdmig with 2 channels, with and without --verify,
# next to QEMU's own multifd migration with 2 channels, at 0, 50 and 200 MB/s, three runs each
# (RDMIG_QEMU_BENCH_RUNS), interleaved; then both inside TLS (rdmig --tls-creds, QEMU multifd
# with tls-creds-x509 on the same credentials) at 0 and 200 MB/s (RDMIG_QEMU_BENCH_TLS=0 to
# skip); then a guest with 256 MiB of private RAM beside the shared file
# (RDMIG_QEMU_PRIVATE_MB), rdmig against QEMU multifd at 0 and 50 MB/s
# (RDMIG_QEMU_BENCH_PRIVATE=0 to skip). Every run is a JSON line in target/qemu-cache/results.jsonl; the tables show medians
# and the ratios rdmig / QEMU.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QEMU_CACHE:-$ROOT/target/qemu-cache}
QEMU_CACHE=$CACHE "$ROOT/tests/qemu/prepare.sh"
export RDMIG_QEMU_ENV=$CACHE/env
export RDMIG_QEMU_RESULTS=$CACHE/results.jsonl
export RDMIG_QEMU_GUEST_MB=${RDMIG_QEMU_GUEST_MB:-1024}
export RDMIG_QEMU_FILL_MB=${RDMIG_QEMU_FILL_MB:-768}
rm -f "$RDMIG_QEMU_RESULTS"
cd "$ROOT"
cargo test --release -q -p rdmig --test qemu_guest -- --ignored --test-threads=1 --nocapture \
	bench_rdmig_2ch_against_qemu_multifd_2ch 2>&1 | grep -E '^(ROW|DIFF|test |thread)' || true
if [ "${RDMIG_QEMU_BENCH_PRIVATE:-1}" != 0 ]; then
	cargo test --release -q -p rdmig --test qemu_guest -- --ignored --test-threads=1 --nocapture \
		bench_private_ram_rdmig_2ch_against_qemu_multifd_2ch 2>&1 | grep -E '^(ROW|DIFF|test |thread)' || true
fi
if [ "${RDMIG_QEMU_BENCH_TLS:-1}" != 0 ]; then
	cargo test --release -q -p rdmig --test qemu_guest -- --ignored --test-threads=1 --nocapture \
		bench_tls_rdmig_2ch_against_qemu_multifd_tls_2ch 2>&1 | grep -E '^(ROW|DIFF|test |thread)' || true
fi
python3 - "$RDMIG_QEMU_RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(tool, rate, key):
    v = [r[key] for r in rows if r["tool"] == tool and r["rate_mb_s"] == rate]
    return statistics.median(v) if v else None
bad = [r for r in rows if not r["survived"]]
print(f"guest {rows[0]['guest_mb']} MiB, {rows[0]['fill_mb']} MiB filled; medians of "
      f"{len([r for r in rows if r['tool'] == 'qemu multifd 2ch' and r['rate_mb_s'] == 0])} runs")
print("| dirty MB/s | rdmig 2ch total / downtime (ms) | rdmig 2ch --verify total / downtime (ms) | QEMU multifd 2ch total / downtime (ms) | ratio total | ratio downtime | --verify adds to downtime |")
print("|---|---|---|---|---|---|---|")
for rate in sorted({r["rate_mb_s"] for r in rows if r["tool"] == "rdmig 2ch"}):
    rt, rd = med("rdmig 2ch", rate, "total_ms"), med("rdmig 2ch", rate, "downtime_ms")
    vt, vd = med("rdmig 2ch --verify", rate, "total_ms"), med("rdmig 2ch --verify", rate, "downtime_ms")
    qt, qd = med("qemu multifd 2ch", rate, "total_ms"), med("qemu multifd 2ch", rate, "downtime_ms")
    if None in (rt, rd, vt, vd, qt, qd):
        print(f"| {rate} | (missing runs) |")
        continue
    print(f"| {rate} | {rt:.0f} / {rd:.0f} | {vt:.0f} / {vd:.0f} | {qt:.0f} / {qd:.0f} | "
          f"{rt / qt:.2f} | {rd / qd:.2f} | {100 * (vd - rd) / rd:+.0f} % |")
def versus(rtool, qtool, rhead, qhead, extra=None):
    """rdmig's runs of `rtool` against QEMU's of `qtool`, rate by rate: medians and ratios;
    `extra` adds a column (its header, and its cell from rate, rdmig's total)."""
    rates = sorted({r["rate_mb_s"] for r in rows if r["tool"] == rtool})
    if not rates:
        return
    print()
    more = f" {extra[0]} |" if extra else ""
    print(f"| dirty MB/s | {rhead} total / downtime (ms) | {qhead} total / downtime (ms) | ratio total | ratio downtime |{more}")
    print("|---|---|---|---|---|" + ("---|" if extra else ""))
    for rate in rates:
        rt, rd = med(rtool, rate, "total_ms"), med(rtool, rate, "downtime_ms")
        qt, qd = med(qtool, rate, "total_ms"), med(qtool, rate, "downtime_ms")
        if None in (rt, rd, qt, qd):
            print(f"| {rate} | (missing runs) |")
            continue
        cell = f" {extra[1](rate, rt)} |" if extra else ""
        print(f"| {rate} | {rt:.0f} / {rd:.0f} | {qt:.0f} / {qd:.0f} | {rt / qt:.2f} | {rd / qd:.2f} |{cell}")
def against_clear(rate, rt):
    ct = med("rdmig 2ch", rate, "total_ms")
    return f"{rt / ct:.2f}" if ct else "-"
versus("rdmig 2ch tls", "qemu multifd 2ch tls", "rdmig 2ch TLS", "QEMU multifd 2ch TLS",
       ("rdmig TLS / rdmig clear, total", against_clear))
versus("rdmig 2ch, private RAM", "qemu multifd 2ch, private RAM", "rdmig 2ch, private RAM",
       "QEMU multifd 2ch, same guest")
for r in bad:
    print("GUEST FAILED:", r)
sys.exit(1 if bad else 0)
PY

#!/usr/bin/env bash
# Line coverage of what the checked-in fuzz corpora reach (`make fuzz-coverage`): every
# corpus input is run through its target's body by a coverage-instrumented program
# (impl/examples/fuzz_corpus.rs), and llvm-cov reports on model/src and the transports'
# parsing code. Output: target/fuzz-coverage/html/index.html, and target/fuzz-coverage/summary.txt
# (one line per file, then the protocol modules), which is also printed.
#
# llvm-profdata and llvm-cov must read the profile format of rustc's own LLVM. They are taken
# from rustup's llvm-tools component (installed if missing), or else from Debian's llvm-N
# package for the same LLVM major version (installed if missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${COVERAGE_OUT:-$ROOT/target/fuzz-coverage}
BUILD=${COVERAGE_TARGET_DIR:-$ROOT/target/coverage}
HOST=$(rustc -vV | sed -n 's/^host: //p')
LLVM_MAJOR=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')

find_tools() {
    local rustup_bin
    rustup_bin="$(rustc --print sysroot)/lib/rustlib/$HOST/bin"
    for dir in "$rustup_bin" "/usr/lib/llvm-$LLVM_MAJOR/bin"; do
        if [ -x "$dir/llvm-profdata" ] && [ -x "$dir/llvm-cov" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

if ! TOOLS=$(find_tools); then
    echo "llvm-profdata/llvm-cov for LLVM $LLVM_MAJOR not found: trying rustup's llvm-tools" >&2
    rustup component add llvm-tools >&2 || true
    if ! TOOLS=$(find_tools); then
        echo "trying Debian's llvm-$LLVM_MAJOR" >&2
        if command -v apt-get >/dev/null; then
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$LLVM_MAJOR"; } >&2 || true
        fi
        TOOLS=$(find_tools) || {
            echo "no llvm-profdata/llvm-cov matching rustc's LLVM $LLVM_MAJOR (rustup component" \
                "llvm-tools, or Debian package llvm-$LLVM_MAJOR)" >&2
            exit 1
        }
    fi
fi
echo "llvm tools: $TOOLS"

# Instrumented for coverage; `--target` keeps the flags off build scripts and proc macros.
RUSTFLAGS="-C instrument-coverage" CARGO_TARGET_DIR="$BUILD" \
    cargo build -q --manifest-path "$ROOT/Cargo.toml" -p rdmig --example fuzz_corpus --target "$HOST"
RUNNER="$BUILD/$HOST/debug/examples/fuzz_corpus"

rm -rf "$OUT"
mkdir -p "$OUT/profraw"
LLVM_PROFILE_FILE="$OUT/profraw/%p-%m.profraw" "$RUNNER" "$ROOT/fuzz" "$@"
"$TOOLS/llvm-profdata" merge -sparse "$OUT"/profraw/*.profraw -o "$OUT/corpus.profdata"

# The protocol model, and the code in the binary that parses bytes from another process.
SOURCES=(
    "$ROOT/model/src"
    "$ROOT/impl/src/transport/tcp/frames.rs"
    "$ROOT/impl/src/transport/tcp/destination.rs"
    "$ROOT/impl/src/transport/tcp/stream.rs"
    "$ROOT/impl/src/transport/regtable.rs"
    "$ROOT/impl/src/transport/verbs/mod.rs"
    "$ROOT/impl/src/vmm/qmp.rs"
    "$ROOT/impl/src/savefile/format.rs"
)
COV_ARGS=(-instr-profile="$OUT/corpus.profdata" "$RUNNER")
"$TOOLS/llvm-cov" show -format=html -output-dir="$OUT/html" -show-line-counts-or-regions \
    "${COV_ARGS[@]}" "${SOURCES[@]}"
"$TOOLS/llvm-cov" export -summary-only "${COV_ARGS[@]}" "${SOURCES[@]}" >"$OUT/summary.json"

# Per function, for the parsers of impl/ whose files hold much else (the transports themselves).
for f in impl/src/transport/tcp/frames.rs impl/src/transport/verbs/mod.rs impl/src/vmm/qmp.rs; do
    "$TOOLS/llvm-cov" report -show-functions "${COV_ARGS[@]}" "$ROOT/$f"
done >"$OUT/functions.txt"

python3 - "$OUT/summary.json" "$ROOT" "$OUT/functions.txt" >"$OUT/summary.txt" <<'EOF'
import json, re, sys
data = json.load(open(sys.argv[1]))
root = sys.argv[2].rstrip("/") + "/"
# "File '<path>':" then rows "<mangled name> regions miss cover% lines miss cover% ...".
functions = {}
current = None
for line in open(sys.argv[3]):
    m = re.match(r"File '(.*)':", line)
    if m:
        current = m.group(1).removeprefix(root)
        continue
    cols = line.split()
    if current and len(cols) >= 7 and cols[1].isdigit() and cols[4].isdigit():
        functions.setdefault(current, []).append((cols[0], int(cols[4]), int(cols[5])))
files = []
for f in data["data"][0]["files"]:
    name = f["filename"].removeprefix(root)
    lines = f["summary"]["lines"]
    files.append((name, lines["covered"], lines["count"]))
files.sort()
pct = lambda c, n: 100.0 * c / n if n else 100.0
width = max(len(n) for n, _, _ in files)
print("line coverage of the fuzz corpora (file: executed/total lines)")
for name, c, n in files:
    print(f"{name:<{width}}  {c:>5}/{n:<5} {pct(c, n):5.1f}%")
# The modules the protocol's security rests on: whole directories for the machines.
groups = [
    ("wire", ("model/src/wire.rs",)),
    ("source", ("model/src/source/",)),
    ("destination", ("model/src/destination/",)),
    ("auth", ("model/src/auth.rs",)),
    ("TCP frame parser", ("impl/src/transport/tcp/frames.rs",)),
    ("RDMA bootstrap", ("impl/src/transport/verbs/mod.rs",)),
    ("QMP client", ("impl/src/vmm/qmp.rs",)),
    ("save file layout", ("impl/src/savefile/format.rs",)),
]
print()
for label, prefixes in groups:
    sel = [(c, n) for name, c, n in files if name.startswith(prefixes)]
    c, n = sum(x for x, _ in sel), sum(y for _, y in sel)
    print(f"{label + ':':<18} {pct(c, n):5.1f}% of {n} lines (whole files)")
# The parsing functions alone (closures inside them included): symbol names carry each
# identifier as <length><name>.
parsers = [
    ("TCP frame parser", "impl/src/transport/tcp/frames.rs",
     ["parse_data_header", "encode_data_header", "check_data_frame", "apply_data_frame"]),
    ("RDMA bootstrap", "impl/src/transport/verbs/mod.rs",
     ["encode_endpoint", "decode_endpoint", "connect_msg", "decode_connect", "join_msg", "split_join"]),
    ("QMP client", "impl/src/vmm/qmp.rs",
     ["from_stream", "execute", "encode", "reply", "read_message"]),
]
for label, path, names in parsers:
    tags = [f"{len(n)}{n}" for n in names]
    rows = [r for r in functions.get(path, []) if any(t in r[0] for t in tags)]
    n, miss = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{label + ':':<18} {pct(n - miss, n):5.1f}% of {n} lines (parsing functions: {', '.join(names)})")
EOF
cat "$OUT/summary.txt"
echo "HTML report: $OUT/html/index.html"

#!/bin/bash -eu
# OSS-Fuzz-style build of every rdmig fuzz target: binaries, seed corpora as
# <target>_seed_corpus.zip and dictionaries as <target>.dict, all in $OUT.
#
# Environment (as a campaign service sets it; only OUT is required):
#   OUT                where everything goes
#   SRC                unused for paths (the tree is found from this script's location)
#   SANITIZER          address (default), memory, thread, leak, none; undefined and coverage
#                      build without a Rust sanitizer (coverage with -C instrument-coverage)
#   RUSTFLAGS          appended to cargo-fuzz's own flags
#   CC, CXX, CFLAGS, CXXFLAGS
#                      used by the C parts of dependencies (ring, rdma-core) as set
#   LIB_FUZZING_ENGINE a libFuzzer-compatible archive to link instead of libfuzzer-sys's own
#                      (when it names a file; a flag such as -fsanitize=fuzzer keeps the own)
#   CARGO_TARGET_DIR   build directory (default: fuzz/target, or fuzz/target/oss-fuzz-SANITIZER)
#   FUZZ_TARGETS       space-separated subset of targets (default: every target)
: "${OUT:?set OUT to the output directory}"

FUZZ=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SANITIZER=${SANITIZER:-address}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')

case "$SANITIZER" in
    address | memory | thread | leak) CARGO_SANITIZER=$SANITIZER ;;
    none | undefined | coverage) CARGO_SANITIZER=none ;;
    *)
        echo "unknown SANITIZER=$SANITIZER" >&2
        exit 1
        ;;
esac
if [ "$SANITIZER" = coverage ]; then
    export RUSTFLAGS="${RUSTFLAGS:-} -C instrument-coverage"
fi
# The Rust sanitizers are nightly-only (-Zsanitizer).
TOOLCHAIN=()
if [ "$CARGO_SANITIZER" != none ] && [ -z "${RUSTUP_TOOLCHAIN:-}" ]; then
    TOOLCHAIN=(+nightly)
fi
if [ -n "${LIB_FUZZING_ENGINE:-}" ] && [ -f "$LIB_FUZZING_ENGINE" ]; then
    export CUSTOM_LIBFUZZER_PATH=$LIB_FUZZING_ENGINE
fi
if [ "$CARGO_SANITIZER" = none ] && [ -z "${RUSTFLAGS:-}" ]; then
    TARGET_DIR=${CARGO_TARGET_DIR:-$FUZZ/target}
else
    TARGET_DIR=${CARGO_TARGET_DIR:-$FUZZ/target/oss-fuzz-$SANITIZER}
fi

cd "$FUZZ"
TARGETS=${FUZZ_TARGETS:-$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | while read -r t; do
    if [ -f "fuzz_targets/$t.rs" ]; then echo "$t"; fi
done)}

mkdir -p "$OUT"
# Release builds with debug assertions and overflow checks (cargo-fuzz's default).
# shellcheck disable=SC2086 # TARGETS is a word list
for t in $TARGETS; do
    cargo "${TOOLCHAIN[@]}" fuzz build -s "$CARGO_SANITIZER" --target-dir "$TARGET_DIR" "$t"
done

for t in $TARGETS; do
    cp "$TARGET_DIR/$TRIPLE/release/$t" "$OUT/$t"
    rm -f "$OUT/${t}_seed_corpus.zip"
    if [ -d "corpus/$t" ] && [ -n "$(ls -A "corpus/$t")" ]; then
        # Flat archive of the corpus files (-j), as the service unpacks it.
        (cd "corpus/$t" && python3 -c '
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for n in sorted(os.listdir(".")):
        if os.path.isfile(n):
            z.write(n)
' "$OUT/${t}_seed_corpus.zip")
    fi
    if [ -f "dict/$t.dict" ]; then
        cp "dict/$t.dict" "$OUT/$t.dict"
    fi
done
echo "built into $OUT:"
ls -1 "$OUT"

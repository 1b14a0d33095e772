#!/bin/bash
# Prepares the guest of the QEMU live-migration tests: QEMU 10 (tests/common/qemu10.sh), the
# stock Debian kernel as an uncompressed vmlinux (tests/common/kernel.sh) and an initramfs with
# busybox, tests/qemu/guest/init and tests/qemu/guest/memcheck.rs built as a static binary.
# Everything is cached under target/qemu-cache (QEMU_CACHE overrides), which also receives
# the file `env` with the absolute paths QEMU_BIN, QEMU_DATA (for -L), KERNEL and INITRD.
#
# The guest boots with, for example:
#   $QEMU_BIN -L $QEMU_DATA -accel tcg -m 512 -smp 1 -nographic -no-reboot -nic none -vga none \
#     -machine q35 -kernel $KERNEL -initrd $INITRD \
#     -append "console=ttyS0 panic=-1 quiet memcheck.size=256 memcheck.rate=50" ...
# and prints one `MEMCHECK tick=... VERIFY OK|BAD` line per second on the serial console.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QEMU_CACHE:-$ROOT/target/qemu-cache}
start=$(date +%s)
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

need=""
for p in busybox-static cpio gzip xz-utils kmod file python3 debian-archive-keyring; do
	dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
command -v rustc >/dev/null || { echo "qemu: rustc is required" >&2; exit 1; }

. "$ROOT/tests/common/kernel.sh"
. "$ROOT/tests/common/qemu10.sh"
debian_kernel "$CACHE" qemu
qemu10 "$CACHE/qemu10"

# Initramfs: busybox (applet links made by init), init and memcheck.
IR=$CACHE/initrd-root
rm -rf "$IR" && mkdir -p "$IR"/{bin,proc,sys,dev}
cp /bin/busybox "$IR/bin/busybox"
rustc --edition 2021 -O -C target-feature=+crt-static -o "$IR/bin/memcheck" "$ROOT/tests/qemu/guest/memcheck.rs"
if ! file -L "$IR/bin/memcheck" | grep -q 'static'; then
	echo "qemu: memcheck is not statically linked: $(file -L "$IR/bin/memcheck")" >&2
	exit 1
fi
cp "$ROOT/tests/qemu/guest/init" "$IR/init"
chmod +x "$IR/init" "$IR/bin/memcheck"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 >"$CACHE/initrd.cpio.gz")

cat >"$CACHE/env" <<EOT
QEMU_BIN=$QEMU_BIN
QEMU_DATA=$QEMU_DATA
KERNEL=$KROOT/vmlinux
INITRD=$CACHE/initrd.cpio.gz
EOT
echo "qemu: prepared in $(($(date +%s) - start)) s: $("$QEMU_BIN" --version | sed -n 1p | cut -d' ' -f1-4), $KPKG, env in $CACHE/env"

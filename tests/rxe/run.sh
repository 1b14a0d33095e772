#!/bin/bash
# Soft-RoCE (rdma_rxe) end-to-end test of `rdmig --transport rdma` inside a QEMU/TCG VM
# running a stock Debian kernel.
#
# Host side: installs the Debian packages it needs, downloads and unpacks the kernel package
# (cached under target/rxe-cache), builds an initramfs with busybox, the rxe modules, libibverbs
# + the rxe provider, perftest's ib_write_bw and the release rdmig binary with their shared
# libraries, boots it with 2 vCPUs and checks the guest's result lines (tests/rxe/guest.sh).
#
# Environment: RDMIG_BIN (default: build target/release/rdmig), RXE_CACHE, RXE_TIMEOUT (s).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${RXE_CACHE:-$ROOT/target/rxe-cache}
TIMEOUT=${RXE_TIMEOUT:-420}
CASES="dynamic-1ch pinall-2ch wrong-key killed-destination soft-dirty state-area state-area-path throughput"
start=$(date +%s)
mkdir -p "$CACHE"

need=""
for p in qemu-system-x86 busybox-static rdma-core ibverbs-providers libibverbs1 ibverbs-utils \
	iproute2 cpio kmod perftest xz-utils python3; do
	dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi

if [ -z "${RDMIG_BIN:-}" ]; then
	(cd "$ROOT" && cargo build --release -q -p rdmig)
	RDMIG_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/rdmig
fi

# Kernel: the package linux-image-amd64 depends on, unpacked, with modules.dep (sets KPKG,
# KVER, KROOT).
. "$ROOT/tests/common/kernel.sh"
debian_kernel "$CACHE" rxe

# Initramfs.
IR=$CACHE/initrd-root
rm -rf "$IR" && mkdir -p "$IR"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc/libibverbs.d,proc,sys,dev,tmp,mods}
ln -s usr/bin "$IR/bin"; ln -s usr/sbin "$IR/sbin"; ln -s usr/lib "$IR/lib"; ln -s usr/lib64 "$IR/lib64"
copy_file() { # copy a host file (following links) to the same path under /usr
	local p=$1 q
	q=$(echo "$p" | sed -E 's#^/(lib|lib64|bin|sbin)/#/usr/\1/#')
	mkdir -p "$IR$(dirname "$q")"
	cp -L "$p" "$IR$q"
}
copy_with_libs() {
	copy_file "$1"
	ldd "$1" 2>/dev/null | grep -oE '/[^ ]+' | while read -r l; do copy_file "$l"; done
}
cp /bin/busybox "$IR/usr/bin/busybox"
copy_with_libs "$RDMIG_BIN"; cp "$RDMIG_BIN" "$IR/usr/bin/rdmig"
copy_with_libs "$(command -v rdma)"
copy_with_libs "$(command -v ib_write_bw)"
for p in /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so; do copy_with_libs "$p"; done
cp /etc/libibverbs.d/rxe.driver "$IR/etc/libibverbs.d/"
: >"$IR/mods/order"
for m in crc32_generic virtio_pci virtio_net rdma_rxe; do
	modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
	base=$(basename "$ko")
	case "$ko" in
	*.xz) xz -dc "$ko" >"$IR/mods/${base%.xz}"; base=${base%.xz} ;;
	*.zst) zstd -qdc "$ko" >"$IR/mods/${base%.zst}"; base=${base%.zst} ;;
	*) cp "$ko" "$IR/mods/$base" ;;
	esac
	echo "$base" >>"$IR/mods/order"
done
cp "$ROOT/tests/rxe/init" "$IR/init"; cp "$ROOT/tests/rxe/guest.sh" "$IR/guest.sh"
chmod +x "$IR/init" "$IR/guest.sh"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 >"$CACHE/initrd.cpio.gz")
prep=$(date +%s)

LOG=$CACHE/console.log
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -m 1024 -smp 2 -nographic -no-reboot \
	-kernel "$KROOT/vmlinux" -initrd "$CACHE/initrd.cpio.gz" \
	-append "console=ttyS0 panic=-1 quiet" \
	-netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= </dev/null >"$LOG" 2>&1
qrc=$?
set -e
end=$(date +%s)
tr -d '\r' <"$LOG" | grep -E '^RXE-' || true
fail=0
for c in $CASES; do
	line=$(tr -d '\r' <"$LOG" | grep -E "^RXE-RESULT case=$c " | tail -1 || true)
	if [ -z "$line" ]; then
		echo "rxe: case $c: no result"; fail=1
	elif ! echo "$line" | grep -q ' ok=1'; then
		echo "rxe: case $c failed: $line"; fail=1
	fi
done
tr -d '\r' <"$LOG" | grep -q '^RXE-DONE' || { echo "rxe: guest did not finish (qemu exit $qrc); console: $LOG"; fail=1; }
echo "rxe: preparation $((prep - start)) s, VM $((end - prep)) s, total $((end - start)) s"
if [ $fail -ne 0 ]; then
	echo "rxe: FAILED; last console lines:"; tr -d '\r' <"$LOG" | tail -40
	exit 1
fi
echo "rxe: all cases passed"

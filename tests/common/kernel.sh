# Sourced by the VM tests (bash). Provides debian_kernel.
#
# debian_kernel CACHE [TAG]: fetches the kernel package that Debian's linux-image-amd64
# depends on into CACHE, unpacks it to CACHE/<package> with modules.dep, and extracts the
# uncompressed ELF vmlinux from the xz bzImage (it boots through PVH, faster under TCG).
# Work is skipped when CACHE/<package>/.done exists. TAG prefixes error messages.
# Sets KPKG (package name), KVER (kernel release) and KROOT (unpacked tree; the kernel is
# $KROOT/vmlinux).
debian_kernel() {
	local cache=$1 tag=${2:-kernel}
	# Kernel: the package linux-image-amd64 depends on, unpacked, with modules.dep.
	kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !k {k = $2} END {print k}'; }
	KPKG=$(kpkg)
	if [ -z "$KPKG" ]; then
		apt-get update -qq && KPKG=$(kpkg)
	fi
	[ -n "$KPKG" ] || { echo "$tag: cannot find the Debian kernel package" >&2; return 1; }
	KVER=${KPKG#linux-image-}
	KROOT=$cache/$KPKG
	if [ ! -f "$KROOT/.done" ]; then
		mkdir -p "$cache"
		rm -rf "$KROOT" && mkdir -p "$KROOT"
		(cd "$cache" && ls "$KPKG"_*.deb >/dev/null 2>&1 || apt-get download "$KPKG" >/dev/null)
		dpkg-deb -x "$(ls "$cache/$KPKG"_*.deb | sed -n 1p)" "$KROOT"
		depmod -b "$KROOT" "$KVER"
		# The uncompressed ELF boots through PVH, faster under TCG than the xz bzImage.
		python3 -c 'import sys; d = open(sys.argv[1], "rb").read(); open(sys.argv[2], "wb").write(d[d.find(b"\xfd7zXZ\x00"):])' \
			"$KROOT/boot/vmlinuz-$KVER" "$KROOT/vmlinux.xz"
		xz -dc --single-stream "$KROOT/vmlinux.xz" >"$KROOT/vmlinux"
		rm "$KROOT/vmlinux.xz"
		touch "$KROOT/.done"
	fi
}

# Sourced by the VM tests (bash). Provides qemu10.
#
# qemu10 CACHE: provides QEMU 10 for x86_64 without touching the system's apt configuration
# or installed qemu. Debian 12's own qemu 7.2 corrupts TCG guests during migration, so the
# migration tests need 10.x: a private apt configuration under CACHE/apt reads the
# bookworm-backports lists, `apt-get download` fetches qemu-system-x86, qemu-system-common,
# qemu-system-data and seabios, and `dpkg-deb -x` unpacks them into CACHE/root. The shared
# libraries they need that the machine lacks are installed with the system apt-get.
#
# The binary looks for its modules, data and firmware under absolute /usr paths, where a
# system qemu of another version may have installed its own: loading a module of another
# build aborts QEMU (the default audio probing does load modules). The link
# CACHE/root/usr/bin/qemu-bundle -> CACHE/root makes it use the unpacked tree instead (QEMU
# prefixes those paths with <directory of the binary>/qemu-bundle when that exists).
# CACHE/data also gathers the data files and the seabios firmware (bios-256k.bin, ..., which
# are not in the qemu data dir but in /usr/share/seabios) as links into the unpacked tree, for
# -L. Work is skipped when CACHE/.done exists.
# Sets and exports QEMU_BIN (the qemu-system-x86_64 binary) and QEMU_DATA (the -L directory).
qemu10() {
	local cache=$1
	local pkgs="qemu-system-x86 qemu-system-common qemu-system-data seabios"
	local root=$cache/root
	QEMU_BIN=$root/usr/bin/qemu-system-x86_64
	QEMU_DATA=$cache/data
	export QEMU_BIN QEMU_DATA
	if [ ! -f "$cache/.done" ]; then
		local apt=$cache/apt
		mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$cache/debs"
		echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main' \
			>"$apt/sources.list"
		local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
			-o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Dir::State::status=/dev/null -o APT::Sandbox::User=root)
		[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || {
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debian-archive-keyring >/dev/null
		}
		apt-get "${opts[@]}" update -qq
		rm -f "$cache"/debs/*.deb
		(cd "$cache/debs" && apt-get "${opts[@]}" download $pkgs >/dev/null)
		rm -rf "$root" && mkdir -p "$root"
		local d deps=""
		for d in "$cache"/debs/*.deb; do
			dpkg-deb -x "$d" "$root"
			deps="$deps,$(dpkg-deb -f "$d" Depends)"
		done
		ln -sfn ../.. "$root/usr/bin/qemu-bundle"
		# Library dependencies (of the binary, and of the modules in qemu-system-common): the
		# first alternative of each, minus the packages unpacked here, the firmware ones and
		# those already installed.
		local need="" p
		for p in $(echo "$deps" | tr ',' '\n' | sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/[[:space:]]//g' | sort -u); do
			case "$p" in
			"" | qemu-* | seabios | ipxe-* | ovmf* | debconf*) continue ;;
			esac
			dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
		done
		if [ -n "$need" ]; then
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
		fi
		if LD_LIBRARY_PATH= ldd "$QEMU_BIN" | grep -q 'not found'; then
			echo "qemu10: libraries still missing:" >&2
			ldd "$QEMU_BIN" | grep 'not found' >&2
			return 1
		fi
		# -L directory: the qemu data files and the unpacked seabios firmware (bios-256k.bin
		# etc.), as links; links with absolute targets (/usr/share/seabios/...) point into the
		# unpacked tree instead, so nothing is read from the system's qemu or seabios.
		rm -rf "$QEMU_DATA" && mkdir -p "$QEMU_DATA"
		local f t
		for f in "$root"/usr/share/seabios/* "$root"/usr/share/qemu/*; do
			t=$f
			if [ -L "$f" ]; then
				t=$(readlink "$f")
				case "$t" in
				/*) t=$root$t ;;
				*) t=$(dirname "$f")/$t ;;
				esac
			fi
			if [ -e "$t" ]; then ln -sfn "$t" "$QEMU_DATA/$(basename "$f")"; fi
		done
		[ -e "$QEMU_DATA/bios-256k.bin" ] || { echo "qemu10: no bios-256k.bin in $QEMU_DATA" >&2; return 1; }
		"$QEMU_BIN" --version | grep -q 'version 10\.' || {
			echo "qemu10: $QEMU_BIN is not QEMU 10: $("$QEMU_BIN" --version | sed -n 1p)" >&2
			return 1
		}
		touch "$cache/.done"
	fi
}

#!/usr/bin/env bash
# vdpakit real-kernel harness: runs Go test packages inside a Debian 6.12
# kernel booted with QEMU (TCG) with the vhost/vDPA modules loaded, as root.
# See vmtest/README.md for the design and the environment contract.
#
#   vmtest/run.sh [-timeout SECONDS] [-run REGEX] [-v] [-race] [-strict] [-env N=V] [-log FILE] PKG... [-- TESTARGS...]
#   vmtest/run.sh --prepare         # only download and build the kernel cache
#   vmtest/run.sh --shell [PKG...]  # run the packages, then an interactive shell
#   vmtest/run.sh --print-headers   # print the 6.12 kernel headers include dir
set -euo pipefail
# The whole script is one compound command, parsed before it runs: editing
# this file while a run is in progress cannot change what that run does.
{

die() { echo "vmtest: error: $*" >&2; exit 2; }
say() { echo "vmtest: $*" >&2; }

usage() {
	cat >&2 <<'EOF'
usage: vmtest/run.sh [options] PKG... [-- TESTARGS...]
       vmtest/run.sh --prepare | --print-headers
options:
  -timeout SECONDS  whole VM run, boot included (default 900)
  -run REGEX        passed to every test binary as -test.run
  -race             build the test binaries with the race detector (cgo; slow under TCG)
  -strict           fail the run if any test plainly skips inside the VM (CI uses it;
                    leave tests that do not belong in the VM out with -- -test.skip REGEX)
  -v                verbose: kernel info messages and a traced guest init
  -log FILE         console log (default: $CACHE/last-console.log)
  -env NAME=VALUE   set an environment variable for the test binaries (repeatable)
  --shell           after the tests, an interactive shell on the console
  --prepare         populate the cache (kernel, modules, tools) and exit
  --refresh         look for a newer 6.12 kernel even if one is cached
  --print-headers   prepare, then print the kernel headers' include dirs
TESTARGS are passed to every test binary (e.g. -test.bench=. -test.benchtime=1x).
environment:
  VDPAKIT_CACHE            cache dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/vdpakit-vmtest)
  VDPAKIT_VMTEST_KERNEL    pin a kernel ABI name, e.g. 6.12.95+deb12
  VDPAKIT_VMTEST_MIRROR    Debian mirror URL (default: taken from the host's apt sources; none there is an error)
  VDPAKIT_VMTEST_MEM       guest memory (default 1G)
  VDPAKIT_VMTEST_SMP       guest CPUs (default 2)
  VDPAKIT_VMTEST_TCG_THREAD  QEMU TCG threading: single (default) or multi
  VDPAKIT_VMTEST_SELFTEST_EARLY_PANIC  test-only (selftest.sh): crash the first N boots before the tests
EOF
	exit 2
}

# ---------------------------------------------------------------- arguments
TIMEOUT=900
RUN=""
VERBOSE=0
RACE=0
STRICT=0
SHELL_MODE=0
PREPARE_ONLY=0
PRINT_HEADERS=0
REFRESH=0
LOG=""
PKGS=()
TESTARGS=()
TESTENV=()
while [ $# -gt 0 ]; do
	case "$1" in
	-timeout | --timeout) [ $# -ge 2 ] || usage; TIMEOUT=$2; shift 2 ;;
	-run | --run) [ $# -ge 2 ] || usage; RUN=$2; shift 2 ;;
	-log | --log) [ $# -ge 2 ] || usage; LOG=$2; shift 2 ;;
	-env | --env)
		[ $# -ge 2 ] || usage
		[[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "-env wants NAME=VALUE, got '$2'"
		TESTENV+=("$2"); shift 2 ;;
	-v | --v | -verbose) VERBOSE=1; shift ;;
	-race | --race) RACE=1; shift ;;
	-strict | --strict) STRICT=1; shift ;;
	--shell | -shell) SHELL_MODE=1; shift ;;
	--prepare | -prepare) PREPARE_ONLY=1; shift ;;
	--refresh | -refresh) REFRESH=1; shift ;;
	--print-headers) PRINT_HEADERS=1; shift ;;
	-h | -help | --help) usage ;;
	--) shift; TESTARGS=("$@"); break ;;
	-*) say "unknown option $1"; usage ;;
	*) PKGS+=("$1"); shift ;;
	esac
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] && [ "$TIMEOUT" -ge 30 ] || die "-timeout wants whole seconds >= 30, got '$TIMEOUT'"
TCG_THREAD=${VDPAKIT_VMTEST_TCG_THREAD:-single}
case "$TCG_THREAD" in single | multi) ;; *) die "VDPAKIT_VMTEST_TCG_THREAD wants single or multi, got '$TCG_THREAD'" ;; esac
EARLY_PANIC=${VDPAKIT_VMTEST_SELFTEST_EARLY_PANIC:-0}
[[ "$EARLY_PANIC" =~ ^[0-9]+$ ]] || die "VDPAKIT_VMTEST_SELFTEST_EARLY_PANIC wants a number of boots, got '$EARLY_PANIC'"
if [ "$PREPARE_ONLY" = 0 ] && [ "$PRINT_HEADERS" = 0 ] && [ "$SHELL_MODE" = 0 ] && [ ${#PKGS[@]} -eq 0 ]; then
	usage
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${VDPAKIT_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/vdpakit-vmtest}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

# Modules loaded in the guest, in this order (each after its dependencies).
# vhost_vdpa is registered on the vdpa bus before virtio_vdpa, so a new vDPA
# device binds to vhost_vdpa; tests move it with testenv.BindVDPA.
WANT_MODULES=(vdpa vhost_iotlb vhost vringh vhost_vdpa virtio_vdpa vduse vhost_net tun tap veth virtio_net
	vdpa_sim vdpa_sim_net vdpa_sim_blk)

# ---------------------------------------------------------------- host tools
ensure_host_tools() {
	local missing=() cmd pkg
	local -A need=(
		[qemu-system-x86_64]=qemu-system-x86 [/bin/busybox]=busybox-static [depmod]=kmod [modprobe]=kmod
		[gcc-12]=gcc-12 [gcc]=gcc [make]=make [xz]=xz-utils [bc]=bc [vdpa]=iproute2 [apt-get]=apt
		[dpkg-deb]=dpkg [flock]=util-linux [strip]=binutils [timeout]=coreutils [ldd]=libc-bin
	)
	for cmd in "${!need[@]}"; do
		if [[ $cmd == /* ]]; then [ -x "$cmd" ] && continue; else command -v "$cmd" >/dev/null 2>&1 && continue; fi
		PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1 && continue
		missing+=("${need[$cmd]}")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	say "installing host packages: ${missing[*]}"
	[ "$(id -u)" = 0 ] || die "missing host packages (${missing[*]}) and not root to install them"
	DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}
export PATH=$PATH:/usr/sbin:/sbin

# ---------------------------------------------------------------- private apt
APTDIR=$CACHE/apt
APT_OPTS=()
setup_apt() {
	local mirror=${VDPAKIT_VMTEST_MIRROR:-}
	if [ -z "$mirror" ]; then
		# Reuse the host's Debian mirror (deb822 .sources or one-line format).
		mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' || true)
		[ -n "$mirror" ] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) {print $i; exit}}' || true)
		# No built-in fallback: the repository names no mirror of its own.
		[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list{,.d}; set VDPAKIT_VMTEST_MIRROR to one"
	fi
	local keyring=/usr/share/keyrings/debian-archive-keyring.gpg signed=""
	[ -r "$keyring" ] && signed="[signed-by=$keyring] "
	mkdir -p "$APTDIR"/{etc/sources.list.d,etc/preferences.d,etc/apt.conf.d,lists/partial,cache/archives/partial,state}
	echo "deb ${signed}${mirror%/} bookworm-backports main" >"$APTDIR/etc/sources.list"
	: >"$APTDIR/state/status"
	APT_OPTS=(
		-o "Dir::Etc::SourceList=$APTDIR/etc/sources.list"
		-o "Dir::Etc::SourceParts=$APTDIR/etc/sources.list.d"
		-o "Dir::Etc::Preferences=$APTDIR/etc/preferences"
		-o "Dir::Etc::PreferencesParts=$APTDIR/etc/preferences.d"
		-o "Dir::State=$APTDIR/state"
		-o "Dir::State::Lists=$APTDIR/lists"
		-o "Dir::State::status=$APTDIR/state/status"
		-o "Dir::Cache=$APTDIR/cache"
		-o "APT::Architecture=amd64"
		-o "APT::Sandbox::User=root"
		-o "Debug::NoLocking=1"
		-o "Acquire::Retries=3"
	)
	say "apt: bookworm-backports from ${mirror%/}"
	apt-get "${APT_OPTS[@]}" -q update >&2
}

# versions PKG: every version of PKG in the private index.
versions() { apt-cache "${APT_OPTS[@]}" madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}'; }

# resolve_kernel prints "ABI VERSION" of the newest linux-image-6.12.*+deb12-amd64
# whose headers, kbuild and linux-source-6.12 exist at the same version.
resolve_kernel() {
	local abi ver srcvers
	srcvers=$(versions linux-source-6.12)
	[ -n "$srcvers" ] || die "linux-source-6.12 not found in bookworm-backports"
	local images
	if [ -n "${VDPAKIT_VMTEST_KERNEL:-}" ]; then
		images=$VDPAKIT_VMTEST_KERNEL
	else
		images=$(apt-cache "${APT_OPTS[@]}" search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' |
			sed -E 's/^linux-image-([^ ]+)-amd64 .*/\1/' | sort -V -r)
	fi
	for abi in $images; do
		for ver in $(versions "linux-image-$abi-amd64"); do
			grep -qxF "$ver" <<<"$srcvers" || continue
			grep -qxF "$ver" <<<"$(versions "linux-headers-$abi-amd64")" || continue
			grep -qxF "$ver" <<<"$(versions "linux-headers-$abi-common")" || continue
			grep -qxF "$ver" <<<"$(versions "linux-kbuild-$abi")" || continue
			echo "$abi $ver"
			return 0
		done
	done
	die "no linux-image-6.12.*+deb12-amd64 with matching linux-source-6.12 ($srcvers), headers and kbuild${VDPAKIT_VMTEST_KERNEL:+ (pinned $VDPAKIT_VMTEST_KERNEL)}"
}

# ---------------------------------------------------------------- kernel cache
# $CACHE/kernel-<ABI>/ holds: vmlinuz, modules/ (decompressed .ko),
# modules.list (load order), usr/ (headers + kbuild of that kernel), VERSION.
build_kernel() {
	local abi=$1 ver=$2 kv=$1-amd64
	# The work dir's name does not match kernel-*, so nothing globbing for a
	# finished cache (e.g. the header checks) picks up a half-built one.
	local dst=$CACHE/kernel-$1 tmp=$CACHE/.build-kernel-$1
	rm -rf "$tmp"
	mkdir -p "$tmp"/{debs,root,src,build,modules}
	local t0=$SECONDS
	say "downloading kernel $kv ($ver)"
	(cd "$tmp/debs" && apt-get "${APT_OPTS[@]}" -q download \
		"linux-image-$kv=$ver" "linux-headers-$kv=$ver" "linux-headers-$abi-common=$ver" \
		"linux-kbuild-$abi=$ver" "linux-source-6.12=$ver" >&2)

	say "unpacking"
	# Only vdpa_sim and vringh are needed from the (large) source tarball;
	# decompressing it is the slowest step, so it runs beside the other unpacking.
	dpkg-deb --fsys-tarfile "$tmp"/debs/linux-source-6.12_*.deb |
		tar -xO ./usr/src/linux-source-6.12.tar.xz | xz -dc |
		tar -x -C "$tmp/src" --wildcards 'linux-source-6.12/drivers/vdpa/vdpa_sim/*' linux-source-6.12/drivers/vhost/vringh.c &
	local srcpid=$!
	local d
	for d in "$tmp"/debs/linux-headers-*.deb "$tmp"/debs/linux-kbuild-*.deb "$tmp"/debs/linux-image-*.deb; do
		dpkg-deb -x "$d" "$tmp/root"
	done
	wait "$srcpid" || die "extracting vdpa_sim and vringh from linux-source-6.12 failed"

	say "building vringh, vdpa_sim, vdpa_sim_net, vdpa_sim_blk out of tree"
	local hdr=$tmp/root/usr/src/linux-headers-$kv
	[ -f "$hdr/Makefile" ] || die "unexpected headers layout: no $hdr/Makefile"
	# The headers' Makefile includes the -common tree by absolute path under
	# /usr/src; point it at the unpacked copy.
	echo "include $tmp/root/usr/src/linux-headers-$abi-common/Makefile" >"$hdr/Makefile"
	cp "$tmp"/src/linux-source-6.12/drivers/vdpa/vdpa_sim/*.[ch] "$tmp/src/linux-source-6.12/drivers/vhost/vringh.c" "$tmp/build/"
	cat >"$tmp/build/Kbuild" <<'KBUILD'
# The Debian kernel has CONFIG_VDPA_SIM and CONFIG_VHOST_RING off; build them here.
obj-m := vringh.o vdpa_sim.o vdpa_sim_net.o vdpa_sim_blk.o
KBUILD
	# CONFIG_DEBUG_INFO_BTF_MODULES= : no BTF for these modules (needs pahole).
	make -s -C "$hdr" M="$tmp/build" -j"$(nproc)" CONFIG_DEBUG_INFO_BTF_MODULES= modules >&2
	local mdir=$tmp/root/lib/modules/$kv
	mkdir -p "$mdir/extra"
	local m
	for m in vringh vdpa_sim vdpa_sim_net vdpa_sim_blk; do
		strip --strip-debug -o "$mdir/extra/$m.ko" "$tmp/build/$m.ko"
	done
	depmod -b "$tmp/root" "$kv"

	say "resolving module load order"
	local order=() seen=" " line path name
	for m in "${WANT_MODULES[@]}"; do
		while read -r line; do
			case "$line" in
			insmod\ *) path=${line#insmod }; path=${path%% *} ;;
			builtin\ *) continue ;;
			*) die "modprobe --show-depends $m: unexpected '$line'" ;;
			esac
			name=$(basename "$path"); name=${name%.xz}; name=${name%.ko}
			case "$seen" in *" $name "*) continue ;; esac
			seen="$seen$name "
			order+=("$path")
		done < <(modprobe -d "$tmp/root" -S "$kv" --show-depends "$m")
	done
	local i=0 file
	: >"$tmp/modules.list"
	for path in "${order[@]}"; do
		i=$((i + 1))
		name=$(basename "$path"); name=${name%.xz}
		file=$(printf '%02d-%s' "$i" "$name")
		case "$path" in
		*.xz) xz -dc "$path" >"$tmp/modules/$file" ;;
		*) cp "$path" "$tmp/modules/$file" ;;
		esac
		echo "$file" >>"$tmp/modules.list"
	done
	say "modules: $(tr '\n' ' ' <"$tmp/modules.list")"

	cp "$tmp/root/boot/vmlinuz-$kv" "$tmp/vmlinuz"
	# Keep the headers (the 6.12 uapi headers are useful for code generation).
	mv "$tmp/root/usr" "$tmp/usr"
	echo "$kv" "$ver" >"$tmp/VERSION"
	rm -rf "$tmp/root" "$tmp/debs" "$tmp/src" "$tmp/build"
	rm -rf "$dst"
	mv "$tmp" "$dst"
	echo "include $dst/usr/src/linux-headers-$abi-common/Makefile" >"$dst/usr/src/linux-headers-$kv/Makefile"
	echo "$abi" >"$CACHE/current"
	say "kernel $kv prepared in $((SECONDS - t0)) s"
}

prepare() {
	exec 9>"$CACHE/.lock"
	flock 9
	local abi=""
	if [ -n "${VDPAKIT_VMTEST_KERNEL:-}" ] && [ -f "$CACHE/kernel-$VDPAKIT_VMTEST_KERNEL/VERSION" ]; then
		abi=$VDPAKIT_VMTEST_KERNEL
	elif [ -z "${VDPAKIT_VMTEST_KERNEL:-}" ] && [ "$REFRESH" = 0 ] && [ -f "$CACHE/current" ]; then
		abi=$(cat "$CACHE/current")
		[ -f "$CACHE/kernel-$abi/VERSION" ] || abi=""
	fi
	if [ -z "$abi" ]; then
		setup_apt
		local resolved ver
		resolved=$(resolve_kernel)
		abi=${resolved% *}
		ver=${resolved#* }
		if [ -f "$CACHE/kernel-$abi/VERSION" ]; then
			echo "$abi" >"$CACHE/current"
		else
			build_kernel "$abi" "$ver"
		fi
	fi
	flock -u 9
	KDIR=$CACHE/kernel-$abi
	read -r KV KVER <"$KDIR/VERSION"
}

# ---------------------------------------------------------------- initramfs
# copy_bin SRC DST_ROOT: copy a dynamically linked program and everything ldd
# says it needs, at the same paths, into the initramfs tree.
copy_bin() {
	local src=$1 root=$2
	mkdir -p "$root$(dirname "$src")"
	cp -L "$src" "$root$src"
	copy_libs "$src" "$root"
}

# copy_libs BIN DST_ROOT: copy the shared libraries and the loader BIN needs.
copy_libs() {
	local bin=$1 root=$2 lib
	while read -r lib; do
		[ -n "$lib" ] || continue
		mkdir -p "$root$(dirname "$lib")"
		[ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
	done < <(ldd "$bin" 2>/dev/null | awk '/=> \// {print $3} /^[ \t]*\// {print $1}')
}

build_tests() {
	local root=$1
	: >"$root/vmtest/packages"
	BUILD_FAILED=()
	local listing
	listing=$(cd "$REPO" && go list -e -f '{{.ImportPath}}|{{.Dir}}|{{len .TestGoFiles}}|{{len .XTestGoFiles}}|{{if .Error}}{{.Error}}{{end}}' "${PKGS[@]}") ||
		die "go list ${PKGS[*]} failed"
	local build=(env CGO_ENABLED=0 go test -c)
	[ "$RACE" = 1 ] && build=(env CGO_ENABLED=1 go test -race -c)
	# Build the test binaries nproc at a time (linking dominates); the go build
	# cache shares the compiled dependencies between them.
	local ip dir nt nx err idx=0 running=0
	local -a ips=() dirs=()
	while IFS='|' read -r ip dir nt nx err; do
		[ -n "$ip" ] || continue
		if [ -n "$err" ]; then
			say "go list: $ip: $err"
			BUILD_FAILED+=("$ip")
			continue
		fi
		if [ "$nt" = 0 ] && [ "$nx" = 0 ]; then
			say "$ip: no test files, not run"
			continue
		fi
		idx=$((idx + 1))
		ips[idx]=$ip
		dirs[idx]=$dir
		mkdir -p "$root/vmtest/pkg/$idx/src"
		if [ "$running" -ge "$(nproc)" ]; then
			wait -n || true
			running=$((running - 1))
		fi
		(
			if (cd "$REPO" && "${build[@]}" -o "$root/vmtest/pkg/$idx/test" "$ip") >&2; then
				echo ok >"$root/vmtest/pkg/$idx/built"
			fi
		) &
		running=$((running + 1))
	done <<<"$listing"
	wait
	local i pdir
	for ((i = 1; i <= idx; i++)); do
		pdir=$root/vmtest/pkg/$i
		if [ ! -f "$pdir/built" ] || [ ! -x "$pdir/test" ]; then
			say "${ips[i]}: test binary failed to build"
			BUILD_FAILED+=("${ips[i]}")
			rm -rf "$pdir"
			continue
		fi
		rm -f "$pdir/built"
		[ "$RACE" = 1 ] && copy_libs "$pdir/test" "$root"
		[ -d "${dirs[i]}/testdata" ] && cp -a "${dirs[i]}/testdata" "$pdir/src/"
		echo "$i ${ips[i]}" >>"$root/vmtest/packages"
	done
	return 0
}

make_initramfs() {
	local work=$1
	local root=$work/root
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules/vmtest,vmtest,etc,root}
	cp /bin/busybox "$root/bin/busybox"
	ln -s busybox "$root/bin/sh"
	cp "$HERE/init.sh" "$root/init"
	chmod 755 "$root/init"
	cp "$KDIR"/modules/*.ko "$root/lib/modules/vmtest/"
	cp "$KDIR/modules.list" "$root/vmtest/modules.list"
	copy_bin "$(command -v vdpa)" "$root"
	copy_bin "$(command -v ip)" "$root"
	echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
	echo "root:x:0:" >"$root/etc/group"
	{
		echo "VMTEST_NONCE=$NONCE"
		echo "VMTEST_VERBOSE=$VERBOSE"
		echo "VMTEST_SHELL=$SHELL_MODE"
		echo "VMTEST_TIMEOUT=$TIMEOUT"
	} >"$root/vmtest/config"
	{
		[ -n "$RUN" ] && echo "-test.run=$RUN"
		[ ${#TESTARGS[@]} -gt 0 ] && printf '%s\n' "${TESTARGS[@]}"
	} >"$root/vmtest/args"
	: >"$root/vmtest/env"
	[ ${#TESTENV[@]} -gt 0 ] && printf '%s\n' "${TESTENV[@]}" >"$root/vmtest/env"
	build_tests "$root"
	(cd "$root" && find . | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -1 >"$work/initramfs.gz")
}

# ---------------------------------------------------------------- main
ensure_host_tools
if [ "$PREPARE_ONLY" = 0 ] && [ "$PRINT_HEADERS" = 0 ]; then
	command -v go >/dev/null 2>&1 || die "go not found in PATH (needed to build the test binaries)"
fi
prepare
if [ "$PRINT_HEADERS" = 1 ]; then
	echo "$KDIR/usr/src/linux-headers-$KV/include"
	echo "$KDIR/usr/src/linux-headers-${KV%-amd64}-common/include"
	echo "$KDIR/usr/src/linux-headers-${KV%-amd64}-common/include/uapi"
	echo "$KDIR/usr/src/linux-headers-${KV%-amd64}-common/arch/x86/include/uapi"
	exit 0
fi
if [ "$PREPARE_ONLY" = 1 ]; then
	say "cache ready: $KDIR (kernel $KV, $KVER)"
	exit 0
fi

T_START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vdpakit-vmtest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
NONCE=$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')
make_initramfs "$WORK"
say "initramfs $(du -h "$WORK/initramfs.gz" | cut -f1) built in $((SECONDS - T_START)) s; booting $KV under QEMU/TCG (timeout ${TIMEOUT}s)"

LOG=${LOG:-$CACHE/last-console.log}
mkdir -p "$(dirname "$LOG")"
APPEND="console=ttyS0 panic=-1 oops=panic ipv6.disable=1 loglevel=$([ "$VERBOSE" = 1 ] && echo 7 || echo 5)"
# thread=single: one host thread runs both vCPUs in turn. With multi-threaded
# TCG the 6.12 guest sometimes oopses at boot on an int3 left by a static-key
# text poke (sched_clock_tick+0x5) that the other vCPU still executes from a
# stale translation; with the vCPUs interleaved that cannot happen. The guest
# still has VDPAKIT_VMTEST_SMP CPUs.
QEMU=(qemu-system-x86_64 -accel "tcg,thread=$TCG_THREAD" -cpu max -M q35 -smp "${VDPAKIT_VMTEST_SMP:-2}" -m "${VDPAKIT_VMTEST_MEM:-1G}"
	-kernel "$KDIR/vmlinuz" -initrd "$WORK/initramfs.gz"
	-nographic -no-reboot -nic none)

# A kernel oops before init's TESTS-START marker happened before any test
# binary ran: that is the boot itself failing (the TCG static-key race above,
# should it still occur), not a test. Such a boot is retried, up to
# MAX_BOOTS boots in all, and said so on stdout. An oops after TESTS-START is
# never retried: it is a failure of the run.
MAX_BOOTS=3
OOPS_RE='Kernel panic|BUG: |Oops: |general protection fault'
: >"$LOG"
T_BOOT=$SECONDS
BOOT=0
EARLY_OOPSES=0
while :; do
	BOOT=$((BOOT + 1))
	append=$APPEND
	# Test-only: make init crash before the tests on the first N boots.
	[ "$BOOT" -le "$EARLY_PANIC" ] && append="$append vmtest.selftest_early_panic=1"
	: >"$WORK/console.raw"
	set +e
	if [ "$SHELL_MODE" = 1 ]; then
		timeout -k 10 "$TIMEOUT" "${QEMU[@]}" -append "$append" 2>&1 | tee -a "$WORK/console.raw" "$LOG"
		QEMU_RC=${PIPESTATUS[0]}
	else
		# sed -u: stream line by line; drop carriage returns and the firmware's
		# terminal control sequences.
		timeout -k 10 "$TIMEOUT" "${QEMU[@]}" -append "$append" </dev/null 2>&1 |
			sed -u -E 's/\x1b(\[[0-9;?]*[A-Za-z]|c)//g; s/\r//g' | tee -a "$WORK/console.raw" "$LOG"
		QEMU_RC=${PIPESTATUS[0]}
	fi
	set -e
	# The verdict reads this run's own copy: another run may share $LOG.
	tr -d '\r' <"$WORK/console.raw" >"$WORK/console.txt"
	if grep -a -q -E "$OOPS_RE" "$WORK/console.txt" && ! grep -a -q -E "^VMTEST-$NONCE TESTS-START" "$WORK/console.txt"; then
		EARLY_OOPSES=$((EARLY_OOPSES + 1))
		if [ "$BOOT" -lt "$MAX_BOOTS" ]; then
			echo
			echo "vmtest: kernel oops before any test ran (known TCG boot race); retrying boot $((BOOT + 1))/$MAX_BOOTS"
			printf '\n==== vmtest: boot %d/%d (the previous boot oopsed before any test ran) ====\n' "$((BOOT + 1))" "$MAX_BOOTS" >>"$LOG"
			continue
		fi
	fi
	break
done
T_VM=$((SECONDS - T_BOOT))

# ---------------------------------------------------------------- verdict
echo
echo "vmtest: ---- summary (kernel $KV, VM ${T_VM}s, total $((SECONDS - T_START))s, log $LOG)"
FAILED=0
PASSED=0
BAD=""
while read -r idx ip; do
	line=$(grep -a -E "^VMTEST-$NONCE RESULT $ip (PASS|FAIL) " "$WORK/console.txt" | tail -1 || true)
	if [ -z "$line" ]; then
		echo "FAIL	$ip	(no result: the VM crashed, hung or timed out while it ran)"
		FAILED=$((FAILED + 1))
		continue
	fi
	read -r _ _ _ verdict ex secs <<<"$line"
	if [ "$verdict" = PASS ]; then
		echo "ok  	$ip	${secs#seconds=}s (in VM)"
		PASSED=$((PASSED + 1))
	else
		echo "FAIL	$ip	${secs#seconds=}s (in VM, $ex)"
		FAILED=$((FAILED + 1))
	fi
done <"$WORK/root/vmtest/packages"
for ip in "${BUILD_FAILED[@]}"; do
	echo "FAIL	$ip	[build failed]"
	FAILED=$((FAILED + 1))
done
skips=$(grep -a -c -E '^\s*--- SKIP' "$WORK/console.txt" || true)
if [ "$skips" -gt 0 ]; then
	echo "vmtest: note: $skips test(s) skipped inside the VM (not through testenv):"
	grep -a -E '^\s*--- SKIP' "$WORK/console.txt" | sed 's/^/vmtest:   /'
	if [ "$STRICT" = 1 ]; then
		BAD="$BAD $skips plain skip(s) inside the VM with -strict (leave such tests out with -- -test.skip REGEX);"
	fi
fi
if grep -a -q -E "^VMTEST-$NONCE MODULE-FAIL" "$WORK/console.txt"; then
	BAD="$BAD module load failed:$(grep -a -E "^VMTEST-$NONCE MODULE-FAIL" "$WORK/console.txt" | cut -d' ' -f3 | tr '\n' ' ');"
fi
if [ "$EARLY_OOPSES" -ge "$MAX_BOOTS" ]; then
	BAD="$BAD kernel oops before any test ran on all $MAX_BOOTS boots (see log);"
elif grep -a -q -E "$OOPS_RE" "$WORK/console.txt"; then
	BAD="$BAD kernel panic/oops (see log);"
fi
grep -a -q -E 'WARNING: CPU: ' "$WORK/console.txt" && echo "vmtest: note: the kernel printed a WARNING (see log)"
if [ "$EARLY_OOPSES" -gt 0 ] && [ "$EARLY_OOPSES" -lt "$BOOT" ]; then
	echo "vmtest: note: $EARLY_OOPSES boot(s) oopsed before any test ran and were retried; boot $BOOT/$MAX_BOOTS ran the tests (consoles of all boots in $LOG)"
fi
if [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
	BAD="$BAD timed out after ${TIMEOUT}s;"
elif [ "$QEMU_RC" != 0 ]; then
	BAD="$BAD qemu exited with $QEMU_RC;"
fi
grep -a -q -E "^VMTEST-$NONCE DONE" "$WORK/console.txt" || BAD="$BAD guest did not finish (no DONE marker);"
if [ -n "$BAD" ]; then
	echo "vmtest: FAIL:$BAD"
	FAILED=$((FAILED > 0 ? FAILED : 1))
fi
echo "vmtest: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
exit
}

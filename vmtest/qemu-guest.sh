#!/usr/bin/env bash
# vmtest/qemu-guest.sh: the harness's cached Debian 6.12 kernel for tests that
# boot QEMU themselves (e.g. with a vhost-user NIC served by the test). It
# fills the cache with `vmtest/run.sh --prepare` (idempotent) and then
#
#   vmtest/qemu-guest.sh paths
#       prints KERNEL=<vmlinuz>, MODULES=<dir of .ko files>, KV=<kernel release>
#   vmtest/qemu-guest.sh initramfs -o OUT.gz -script FILE [-modules 'M...'] [-env NAME=VALUE]... [-bin PATH]...
#       builds a gzip'ed newc initramfs: busybox, each -bin PATH (a static
#       executable) as /bin/<its name>, the named modules (default:
#       failover net_failover virtio_net, the virtio-net driver and its
#       dependencies; virtio_pci is built into the kernel) loaded in the
#       harness's load order, FILE as /guest.sh, vmtest/pingn as /bin/pingn
#       (pings that wait for every reply) and vmtest/qemu-init.sh as /init.
#       The init mounts proc/sys/dev, loads the modules, exports the -env
#       variables, runs /guest.sh and powers off. Markers on the console,
#       with GUEST_NONCE from -env (so guest output cannot forge them):
#         QEMUGUEST-<nonce> BOOTED
#         QEMUGUEST-<nonce> MODULE-FAIL <module>
#         QEMUGUEST-<nonce> EXIT <status of /guest.sh>
#
# Everything goes to stderr except the output of `paths`. See vmtest/README.md
# ("Booting QEMU yourself").
set -euo pipefail

die() { echo "qemu-guest: error: $*" >&2; exit 2; }
usage() {
	sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 1 ] || usage
MODE=$1
shift
OUT=""
SCRIPT=""
MODULES="failover net_failover virtio_net"
ENVS=()
BINS=()
case "$MODE" in
paths) [ $# -eq 0 ] || usage ;;
initramfs)
	while [ $# -gt 0 ]; do
		case "$1" in
		-o) [ $# -ge 2 ] || usage; OUT=$2; shift 2 ;;
		-script) [ $# -ge 2 ] || usage; SCRIPT=$2; shift 2 ;;
		-modules) [ $# -ge 2 ] || usage; MODULES=$2; shift 2 ;;
		-env)
			[ $# -ge 2 ] || usage
			[[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.:/,+=-]*$ ]] ||
				die "-env wants NAME=VALUE (value of [A-Za-z0-9_.:/,+=-]), got '$2'"
			ENVS+=("$2"); shift 2 ;;
		-bin)
			[ $# -ge 2 ] || usage
			[ -f "$2" ] && [ -x "$2" ] || die "-bin $2 is not an executable file"
			case "$(basename "$2")" in
			sh | busybox | init | pingn) die "-bin $2 would replace the guest's own /bin/$(basename "$2")" ;;
			esac
			for b in ${BINS[@]+"${BINS[@]}"}; do
				[ "$(basename "$b")" != "$(basename "$2")" ] || die "-bin $2 and $b have the same name"
			done
			BINS+=("$2"); shift 2 ;;
		*) usage ;;
		esac
	done
	[ -n "$OUT" ] && [ -n "$SCRIPT" ] || usage
	[ -r "$SCRIPT" ] || die "guest script $SCRIPT not readable"
	;;
*) usage ;;
esac

# The cache: the same directory and kernel choice as run.sh.
"$HERE/run.sh" --prepare >&2 || die "vmtest/run.sh --prepare failed"
CACHE=${VDPAKIT_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/vdpakit-vmtest}
ABI=${VDPAKIT_VMTEST_KERNEL:-}
[ -n "$ABI" ] || ABI=$(cat "$CACHE/current")
KDIR=$CACHE/kernel-$ABI
[ -f "$KDIR/VERSION" ] && [ -f "$KDIR/vmlinuz" ] || die "no prepared kernel in $KDIR"
read -r KV _ <"$KDIR/VERSION"

if [ "$MODE" = paths ]; then
	echo "KERNEL=$KDIR/vmlinuz"
	echo "MODULES=$KDIR/modules"
	echo "KV=$KV"
	exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vdpakit-qemu-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,lib/modules/guest,etc,root}
cp /bin/busybox "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
for b in ${BINS[@]+"${BINS[@]}"}; do
	cp "$b" "$ROOT/bin/$(basename "$b")"
done
cp "$HERE/qemu-init.sh" "$ROOT/init"
cp "$HERE/pingn" "$ROOT/bin/pingn"
cp "$SCRIPT" "$ROOT/guest.sh"
chmod 755 "$ROOT/init" "$ROOT/bin/pingn" "$ROOT/guest.sh"
# The wanted modules, in modules.list order (dependencies first).
: >"$ROOT/modules.list"
for m in $MODULES; do
	grep -q -E "^[0-9]+-$m\.ko$" "$KDIR/modules.list" || die "module $m is not in $KDIR/modules.list"
done
while read -r f; do
	name=${f#*-}
	name=${name%.ko}
	for m in $MODULES; do
		if [ "$m" = "$name" ]; then
			cp "$KDIR/modules/$f" "$ROOT/lib/modules/guest/"
			echo "$f" >>"$ROOT/modules.list"
		fi
	done
done <"$KDIR/modules.list"
: >"$ROOT/guest.env"
[ ${#ENVS[@]} -gt 0 ] && printf '%s\n' "${ENVS[@]}" >"$ROOT/guest.env"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
(cd "$ROOT" && find . | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -1 >"$WORK/initramfs.gz")
mv "$WORK/initramfs.gz" "$OUT"
echo "qemu-guest: $OUT: kernel $KV, modules: $(tr '\n' ' ' <"$ROOT/modules.list")" >&2

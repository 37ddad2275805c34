#!/bin/sh
# Guest init of the vdpakit real-kernel harness (vmtest/run.sh packs it as
# /init). It runs as PID 1 inside the QEMU guest: mounts the pseudo file
# systems, loads the modules listed in /vmtest/modules.list in that order, runs
# every test binary listed in /vmtest/packages with VDPAKIT_VMTEST=1 and prints
# one marker line per package, then powers the machine off.
#
# Marker lines (the host parses them; NONCE is fresh for every run so test
# output cannot forge them):
#   VMTEST-<nonce> BOOTED                      (userspace reached: init runs)
#   VMTEST-<nonce> MODULE-FAIL <module> exit=<code>
#   VMTEST-<nonce> TESTS-START                 (just before the first test binary)
#   VMTEST-<nonce> RESULT <import path> PASS|FAIL exit=<code> seconds=<n>
#   VMTEST-<nonce> DONE

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname vmtest
ip link set lo up

# shellcheck disable=SC1091
. /vmtest/config
mark() { printf '\nVMTEST-%s %s\n' "$VMTEST_NONCE" "$*"; }
mark BOOTED

[ "$VMTEST_VERBOSE" = 1 ] && set -x

echo "vmtest: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
# IPv6 is disabled on the kernel command line (ipv6.disable=1) so that
# autoconfiguration frames never enter a ring; say so if it is not.
[ -e /proc/sys/net/ipv6 ] && echo "vmtest: warning: IPv6 is enabled"

while read -r mod; do
	[ -n "$mod" ] || continue
	if ! insmod "/lib/modules/vmtest/$mod"; then
		mark MODULE-FAIL "$mod" "exit=$?"
	fi
done </vmtest/modules.list
echo "vmtest: modules loaded: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"

# Environment for the test binaries (run.sh -env), one NAME=VALUE a line.
while IFS= read -r kv; do
	[ -n "$kv" ] && export "$kv"
done </vmtest/env
export VDPAKIT_VMTEST=1

# Extra arguments for every test binary, one per line.
set --
while IFS= read -r arg; do
	set -- "$@" "$arg"
done </vmtest/args

# Test-only (vmtest/selftest.sh): run.sh puts vmtest.selftest_early_panic=1
# on the kernel command line of the boots that should crash here, after the
# modules and before TESTS-START, to prove that an oops before any test ran
# makes run.sh boot again. The kernel keeps "vmtest.*" parameters to itself
# (unknown module parameters), so they show only in /proc/cmdline.
if grep -q -w -F 'vmtest.selftest_early_panic=1' /proc/cmdline; then
	echo "vmtest: selftest: crashing the kernel before any test runs (vmtest.selftest_early_panic=1)"
	echo c >/proc/sysrq-trigger
	sleep 3600
fi

# Everything before this marker is boot; an oops before it is retried by
# run.sh (known TCG boot race), one after it fails the run.
mark TESTS-START
while read -r idx pkg; do
	[ -n "$idx" ] || continue
	dir=/vmtest/pkg/$idx
	echo "vmtest: === package $pkg"
	start=$(date +%s)
	# The guest clock runs in step with the host's under TCG, so the uptime
	# tells how much of run.sh's -timeout is left. Each binary gets that
	# less a margin as -test.timeout: a hung test then panics with every
	# goroutine's stack before QEMU is killed. A -test.timeout among the
	# extra arguments comes later and wins.
	up=$(cut -d. -f1 /proc/uptime)
	left=$((VMTEST_TIMEOUT - up - 20))
	[ "$left" -ge 10 ] || left=10
	(cd "$dir/src" && "$dir/test" -test.v "-test.timeout=${left}s" "$@")
	rc=$?
	secs=$(($(date +%s) - start))
	if [ "$rc" = 0 ]; then
		mark RESULT "$pkg" PASS "exit=$rc" "seconds=$secs"
	else
		mark RESULT "$pkg" FAIL "exit=$rc" "seconds=$secs"
	fi
done </vmtest/packages
mark DONE

if [ "$VMTEST_SHELL" = 1 ]; then
	echo "vmtest: debug shell (exit or Ctrl-D powers off; VDPAKIT_VMTEST=1 is set)"
	setsid cttyhack sh -l
fi
sync
poweroff -f
# Not reached unless poweroff failed; exiting PID 1 panics the kernel, which
# with panic=-1 and -no-reboot ends QEMU.
echo o >/proc/sysrq-trigger

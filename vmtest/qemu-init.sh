#!/bin/sh
# Guest /init of the initramfs vmtest/qemu-guest.sh builds: mounts the pseudo
# file systems, loads /lib/modules/guest/* in /modules.list order, exports
# /guest.env, runs /guest.sh and powers off. Markers (GUEST_NONCE from
# guest.env): QEMUGUEST-<nonce> BOOTED | MODULE-FAIL <module> | EXIT <status>.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ip link set lo up

while IFS= read -r kv; do
	[ -n "$kv" ] && export "$kv"
done </guest.env
mark() { printf '\nQEMUGUEST-%s %s\n' "$GUEST_NONCE" "$*"; }
mark BOOTED

while read -r mod; do
	[ -n "$mod" ] || continue
	insmod "/lib/modules/guest/$mod" || mark MODULE-FAIL "$mod"
done </modules.list

sh /guest.sh
mark EXIT $?
sync
poweroff -f
echo o >/proc/sysrq-trigger

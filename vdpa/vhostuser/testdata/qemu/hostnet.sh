#!/bin/sh
# Guest side of TestQEMUHostTap (vdpa/vhostuser/qemu_hostnet_test.go), run as
# /guest.sh by the init of vmtest/qemu-guest.sh. Environment: GUEST_NONCE,
# GUEST_MAC, GUEST_ADDR (a.b.c.d/len), PEER_IP, PING_COUNT, BULK_MB,
# UP_PORT, DOWN_PORT. It pings PEER_IP, sends BULK_MB MiB of random bytes to
# PEER_IP:UP_PORT (printing their SHA-256 first), reads what PEER_IP:DOWN_PORT
# sends and prints its SHA-256, with the interface's counters around the
# upload. Prints QEMUGUEST-<nonce> markers the test parses.
mark() { printf '\nQEMUGUEST-%s %s\n' "$GUEST_NONCE" "$*"; }
stats() {
	s=/sys/class/net/$dev/statistics
	mark "$1" "tx_packets=$(cat $s/tx_packets)" "tx_bytes=$(cat $s/tx_bytes)" "rx_packets=$(cat $s/rx_packets)" \
		"rx_bytes=$(cat $s/rx_bytes)" "rx_dropped=$(cat $s/rx_dropped)" "tx_dropped=$(cat $s/tx_dropped)" \
		"rx_errors=$(cat $s/rx_errors)" "tx_errors=$(cat $s/tx_errors)"
}

dev=""
for d in /sys/class/net/*; do
	[ "$(cat "$d/address")" = "$GUEST_MAC" ] && dev=${d##*/}
done
if [ -z "$dev" ]; then
	mark NO-IFACE "$(ls /sys/class/net)"
	exit 1
fi
vdev=$(readlink /sys/class/net/"$dev"/device)
vdev=${vdev##*/}
drv=$(readlink /sys/bus/virtio/devices/"$vdev"/driver)
mark IFACE "$dev" "$vdev" "driver=${drv##*/}" "features=$(cat /sys/bus/virtio/devices/"$vdev"/features)"
ip addr add "$GUEST_ADDR" dev "$dev" || exit 1
ip link set "$dev" up || exit 1
i=0
while [ "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do
	sleep 0.1
	i=$((i + 1))
done
mark CARRIER "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)"

out=$(pingn "$PING_COUNT" 0.2 "$PEER_IP")
rc=$?
tx=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
rx=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
mark PING "rc=$rc" "transmitted=${tx:-0}" "received=${rx:-0}"

dd if=/dev/urandom of=/tmp/up bs=1048576 count="$BULK_MB" 2>/dev/null
mark UPSUM "$(sha256sum /tmp/up | cut -d' ' -f1)"
stats BEFORE
nc "$PEER_IP" "$UP_PORT" </tmp/up >/dev/null
mark UP "rc=$?"
stats AFTER
mark DOWNSUM "$(nc "$PEER_IP" "$DOWN_PORT" </dev/null | sha256sum | cut -d' ' -f1)"
stats STATS
mark EXIT 0

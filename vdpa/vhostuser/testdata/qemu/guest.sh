#!/bin/sh
# Guest side of TestQEMU (vdpa/vhostuser/qemu_test.go), run as /guest.sh by
# the init of vmtest/qemu-guest.sh. Environment (from the test): GUEST_NONCE,
# GUEST_MAC, GUEST_ADDR (a.b.c.d/len), PEER_IP, PING_COUNT, GUEST_MODE
# (ping: PING_COUNT pings, then counters; stream: pings every 100 ms until
# the VM is stopped). Prints QEMUGUEST-<nonce> markers the test parses.
mark() { printf '\nQEMUGUEST-%s %s\n' "$GUEST_NONCE" "$*"; }

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
# The carrier follows the back-end's connection (VIRTIO_NET_S_LINK_UP).
i=0
while [ "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do
	sleep 0.1
	i=$((i + 1))
done
mark CARRIER "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)"

if [ "$GUEST_MODE" = stream ]; then
	mark STREAMING
	ping -i 0.1 -w 60 "$PEER_IP" >/dev/null
	exit 0
fi

out=$(ping -c "$PING_COUNT" -i 0.2 -W 5 -w 30 "$PEER_IP")
rc=$?
echo "$out"
sum=$(echo "$out" | grep 'packets transmitted')
tx=$(echo "$sum" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
rx=$(echo "$sum" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
mark PING "rc=$rc" "transmitted=${tx:-0}" "received=${rx:-0}"
s=/sys/class/net/$dev/statistics
mark STATS "rx_packets=$(cat $s/rx_packets)" "tx_packets=$(cat $s/tx_packets)" \
	"rx_bytes=$(cat $s/rx_bytes)" "tx_bytes=$(cat $s/tx_bytes)" \
	"rx_dropped=$(cat $s/rx_dropped)" "tx_dropped=$(cat $s/tx_dropped)" \
	"rx_errors=$(cat $s/rx_errors)" "tx_errors=$(cat $s/tx_errors)"

#!/bin/sh
# Guest side of the vfio-user QEMU tests (mdev/vfiouser/qemu_test.go), run as
# /guest.sh by vmtest/qemu-guest.sh's init. Environment: GUEST_NONCE,
# GUEST_MAC, GUEST_ADDR (a.b.c.d/len), PEER_IP, PING_COUNT, GUEST_MODE
# (ping: pings of mixed sizes, then counters; link: also wait for the host
# to take the link down and up; rebind: unbind and rebind virtio-pci, then
# ping again; restart: ping again while the host restarts the vhost-user
# back-end behind the device; reset: ping, then wait for the host to reset the machine;
# channels: set the combined channels to 1 with /bin/setchannels, ping from
# each CPU, then to 2 and ping from each CPU again).
# Prints QEMUGUEST-<nonce> markers the test parses.
mark() { printf '\nQEMUGUEST-%s %s\n' "$GUEST_NONCE" "$*"; }

findif() {
	dev=""
	for d in /sys/class/net/*; do
		[ "$(cat "$d/address" 2>/dev/null)" = "$GUEST_MAC" ] && dev=${d##*/}
	done
}
findif
if [ -z "$dev" ]; then
	mark NO-IFACE "$(ls /sys/class/net)" "$(ls /sys/bus/pci/devices)"
	exit 1
fi
vdev=$(readlink /sys/class/net/"$dev"/device)
vdev=${vdev##*/}
pdev=$(readlink /sys/bus/virtio/devices/"$vdev"/..)
pdev=$(basename "$(readlink -f /sys/bus/virtio/devices/"$vdev"/..)")
drv=$(readlink /sys/bus/virtio/devices/"$vdev"/driver)
mark IFACE "$dev" "$vdev" "pci=$pdev" "driver=${drv##*/}" "mtu=$(cat /sys/class/net/"$dev"/mtu)" \
	"features=$(cat /sys/bus/virtio/devices/"$vdev"/features)"
# The configuration space as the guest reads it (lspci -xxx).
mark CONFIG "$(od -An -v -tx1 /sys/bus/pci/devices/"$pdev"/config | tr -d '\n' | tr -s ' ')"
mark IRQ "$(cat /sys/bus/pci/devices/"$pdev"/irq)" "msix=$(ls /sys/bus/pci/devices/"$pdev"/msi_irqs 2>/dev/null | wc -l)"

up() {
	ip addr add "$GUEST_ADDR" dev "$dev" 2>/dev/null
	ip link set "$dev" up || exit 1
	i=0
	while [ "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	mark CARRIER "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)"
}

pings() {
	tx=0
	rx=0
	for size in 56 1 200 1000 1372 64; do
		out=$(pingn "$PING_COUNT" 0.05 -s $size "$PEER_IP")
		t=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
		r=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
		tx=$((tx + ${t:-0}))
		rx=$((rx + ${r:-0}))
	done
	mark PING "$1" "transmitted=$tx" "received=$rx"
}

stats() {
	s=/sys/class/net/$dev/statistics
	mark STATS "$1" "rx_packets=$(cat $s/rx_packets)" "tx_packets=$(cat $s/tx_packets)" \
		"rx_bytes=$(cat $s/rx_bytes)" "tx_bytes=$(cat $s/tx_bytes)" \
		"rx_dropped=$(cat $s/rx_dropped)" "tx_dropped=$(cat $s/tx_dropped)" \
		"rx_errors=$(cat $s/rx_errors)" "tx_errors=$(cat $s/tx_errors)"
}

up
pings first
stats first

case "$GUEST_MODE" in
link)
	mark WAIT-LINK
	i=0
	while [ "$(cat /sys/class/net/"$dev"/carrier)" = 1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
	mark CARRIER-DOWN "$(cat /sys/class/net/"$dev"/carrier)"
	i=0
	while [ "$(cat /sys/class/net/"$dev"/carrier)" != 1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
	mark CARRIER-UP "$(cat /sys/class/net/"$dev"/carrier)"
	pings again
	stats again
	;;
channels)
	# ethtool -L: virtio_net sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the
	# control queue. A ping pinned to CPU k transmits on transmitq k while
	# more than k pairs are active (XPS), else on the first pair.
	ncpu=$(grep -c '^processor' /proc/cpuinfo)
	for n in 1 2; do
		/bin/setchannels "$dev" $n
		rc=$?
		mark CHANNELS $n "rc=$rc" "txqueues=$(ls -d /sys/class/net/"$dev"/queues/tx-* | wc -l)" \
			"rxqueues=$(ls -d /sys/class/net/"$dev"/queues/rx-* | wc -l)"
		tx=0
		rx=0
		k=0
		while [ $k -lt "$ncpu" ]; do
			out=$(ping_cmd="taskset -c $k ping" pingn "$PING_COUNT" 0.05 "$PEER_IP")
			t=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
			r=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
			tx=$((tx + ${t:-0}))
			rx=$((rx + ${r:-0}))
			k=$((k + 1))
		done
		mark PING ch$n "cpus=$ncpu" "transmitted=$tx" "received=$rx"
		stats ch$n
	done
	;;
restart)
	# The host restarts the device's vhost-user back-end once it sees
	# WAIT-RESTART; these pings run through the restart.
	mark WAIT-RESTART
	pings again
	stats again
	;;
rebind)
	echo "$pdev" > /sys/bus/pci/drivers/virtio-pci/unbind
	mark UNBOUND "$(ls /sys/class/net)"
	echo "$pdev" > /sys/bus/pci/drivers/virtio-pci/bind
	sleep 0.5
	findif
	mark REBOUND "$dev"
	up
	pings again
	stats again
	;;
esac
mark DONE
# reset: stay up for the host's system_reset (the rebooted guest runs this
# script again, and the test ends QEMU after its DONE).
if [ "$GUEST_MODE" = reset ]; then
	sleep 150
fi

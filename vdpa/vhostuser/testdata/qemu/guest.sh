#!/bin/sh
# Guest side of TestQEMU (vdpa/vhostuser/qemu_test.go), run as /guest.sh by
# the init of vmtest/qemu-guest.sh. Environment (from the test): GUEST_NONCE,
# GUEST_MAC, GUEST_ADDR (a.b.c.d/len), PEER_IP, PING_COUNT, GUEST_MODE
# (ping: PING_COUNT pings, then counters; stream: pings every 100 ms until
# the VM is stopped; serve: paced pingers driven by commands the test writes
# to the console, see below), PING_INTERVAL (serve). Prints
# QEMUGUEST-<nonce> markers the test parses.
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

# serve: the test writes commands to the serial console (QEMU's stdin; after
# a migration, the destination QEMU's), one a line:
#   start N   N pingers (busybox ping -i PING_INTERVAL), pinger k pinned to
#             CPU k mod ncpu (virtio_net's XPS maps CPU k to transmitq k)
#   stop ID   SIGINT every pinger; per pinger RESULT ID pinger=k tx= rx=
#             dup= lost= inflight= echoed= dupseq= (dup: replies received
#             twice, dupseq their sequence numbers; echoed: the last reply
#             line busybox wrote twice as it stopped, not a reply; lost:
#             sequence numbers below the last one sent never answered;
#             inflight: the last one, possibly cut off by the SIGINT), then
#             SNMP ID (the kernel's IP/ICMP error counters: a corrupt frame
#             fails a checksum there), STATS ID and STOPPED ID
#   channels N  set the interface's combined channels (queue pairs) to N
#             with /bin/setchannels (the initramfs's -bin; ethtool -L):
#             CHANNELS N rc= txqueues= rxqueues= (the kernel's real queue
#             counts afterwards)
#   quit      leave
if [ "$GUEST_MODE" = serve ]; then
	ncpu=$(grep -c '^processor' /proc/cpuinfo)
	mark READY "ncpu=$ncpu" "queues=$(ls -d /sys/class/net/"$dev"/queues/tx-* | wc -l)"
	pids=""
	n=0
	while read -r cmd arg; do
		case "$cmd" in
		start)
			n=${arg:-1}
			pids=""
			k=0
			while [ $k -lt "$n" ]; do
				taskset -c $((k % ncpu)) ping -i "$PING_INTERVAL" "$PEER_IP" >/tmp/ping.$k 2>&1 &
				pids="$pids $!"
				k=$((k + 1))
			done
			mark STARTED "$n"
			;;
		stop)
			# shellcheck disable=SC2086
			kill -INT $pids
			wait
			k=0
			while [ $k -lt "$n" ]; do
				awk -v m="QEMUGUEST-$GUEST_NONCE" -v id="$arg" -v k=$k '
					function dupof(s, line) {
						dup++; dups = dups (dups == "" ? "" : ",") s
						printf "\n%s DUPLICATE %s pinger=%d first: %s; again: %s\n", m, id, k, first[s], line
					}
					/ bytes from .*seq=/ {
						for (f = 1; f <= NF; f++) if ($f ~ /^seq=/) s = substr($f, 5) + 0
						if (pend) { dupof(pseq, pline); pend = 0 }
						if ($0 == last) {
							# The line before again, to the microsecond of
							# its round trip. If the summary follows, it is
							# busybox writing its stdio buffer twice (its
							# SIGINT handler prints the summary with stdio
							# and can catch the last line half written),
							# not a second reply; anywhere else it counts.
							pend = 1; pseq = s; pline = $0
							next
						}
						last = $0
						if ((s in seen) || $0 ~ /DUP!/) dupof(s, $0)
						else { seen[s] = 1; first[s] = $0; rx++ }
					}
					/ ping statistics / { if (pend) echoed++; pend = 0; next }
					# Anything else between the repeated line and the
					# summary (an error message) makes it a duplicate.
					NF && pend && !/packets transmitted/ { dupof(pseq, pline); pend = 0 }
					/packets transmitted/ {
						tx = $1 + 0
						# busybox counts duplicates itself: "N duplicates,".
						for (f = 1; f < NF; f++) if ($f ~ /^[+]?[0-9]+$/ && $(f + 1) ~ /^duplicates/) {
							v = $f; sub(/^[+]/, "", v); sumdup = v + 0
						}
					}
					END {
						if (pend) dupof(pseq, pline)
						lost = 0
						for (s = 0; s < tx - 1; s++) if (!(s in seen)) lost++
						inflight = (tx > 0 && !((tx - 1) in seen)) ? 1 : 0
						if (sumdup > dup) dup = sumdup
						printf "\n%s RESULT %s pinger=%d tx=%d rx=%d dup=%d lost=%d inflight=%d echoed=%d dupseq=%s\n", m, id, k, tx, rx, dup, lost, inflight, echoed, dups
					}' /tmp/ping.$k
				k=$((k + 1))
			done
			mark SNMP "$arg" $(awk 'NR % 2 == 1 { split($0, h) } NR % 2 == 0 && ($1 == "Ip:" || $1 == "Icmp:") {
				p = tolower(substr($1, 1, length($1) - 1))
				for (i = 2; i <= NF; i++) printf "%s_%s=%s ", p, h[i], $i }' /proc/net/snmp)
			s=/sys/class/net/$dev/statistics
			mark STATS "$arg" "rx_packets=$(cat $s/rx_packets)" "tx_packets=$(cat $s/tx_packets)" \
				"rx_dropped=$(cat $s/rx_dropped)" "tx_dropped=$(cat $s/tx_dropped)" \
				"rx_errors=$(cat $s/rx_errors)" "tx_errors=$(cat $s/tx_errors)" \
				"rx_length_errors=$(cat $s/rx_length_errors)" "rx_crc_errors=$(cat $s/rx_crc_errors)" \
				"rx_frame_errors=$(cat $s/rx_frame_errors)"
			mark STOPPED "$arg"
			;;
		channels)
			/bin/setchannels "$dev" "$arg"
			rc=$?
			mark CHANNELS "$arg" "rc=$rc" "txqueues=$(ls -d /sys/class/net/"$dev"/queues/tx-* | wc -l)" \
				"rxqueues=$(ls -d /sys/class/net/"$dev"/queues/rx-* | wc -l)"
			;;
		quit) break ;;
		esac
	done
	exit 0
fi

if [ "$GUEST_MODE" = stream ]; then
	mark STREAMING
	ping -i 0.1 -w 60 "$PEER_IP" >/dev/null
	exit 0
fi

out=$(pingn "$PING_COUNT" 0.2 "$PEER_IP")
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

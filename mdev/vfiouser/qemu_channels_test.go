package vfiouser_test

import (
	"context"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
)

// channelPeriod is a stretch of time in which the device had one number of
// active queue pairs, with the second pair's frame counters at its start
// and end.
type channelPeriod struct {
	pairs      int
	start, end [2]uint64 // receiveq 1, transmitq 1
}

// TestQEMUChannels has the guest's virtio_net on the mediated device change
// its queue pairs at run time, as "ethtool -L eth0 combined N" does: the
// command goes through the device's control queue
// (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, §5.1.6.5.5) to the software device
// behind mdev. Two vCPUs and two pairs: the guest sets one channel and
// pings from each CPU, then two and pings from each CPU again. The device
// must follow (2, then 1, then 2 active pairs), carry nothing on the second
// pair while one is active, carry frames both ways on it once two are, and
// answer every ping; the guest's packet counters must equal the device's.
func TestQEMUChannels(t *testing.T) {
	qemu, helper := requireQEMU11(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin := testenv.BuildGuestTool(t, dir, testenv.SetChannelsPkg)

	sock := filepath.Join(dir, "vfu.sock")
	r := startServer(t, ctx, sock, 2)
	// Watch the device's active pairs and the second pair's counters.
	watch, stopWatch := context.WithCancel(ctx)
	periods := make(chan []channelPeriod, 1)
	go func() {
		var ps []channelPeriod
		for watch.Err() == nil {
			st := r.sn.Stats()
			c := [2]uint64{st.Queues[2].Frames, st.Queues[3].Frames}
			if n := r.sn.ActivePairs(); len(ps) == 0 || ps[len(ps)-1].pairs != n {
				ps = append(ps, channelPeriod{pairs: n, start: c})
			}
			ps[len(ps)-1].end = c
			time.Sleep(5 * time.Millisecond)
		}
		periods <- ps
	}()
	v := bootQEMUWith(t, ctx, qemu, helper, sock, "channels", bootOpts{smp: 2, bins: []string{bin}})
	_, err := v.wait(ctx, "STATS", 3) // first, ch1, ch2: the guest is done
	stopWatch()
	ps := <-periods
	require.NoError(t, err)
	_, err = v.wait(ctx, "DONE", 1)
	require.NoError(t, err)
	t.Logf("active pairs and the second pair's frames (receiveq 1, transmitq 1) over time: %+v", ps)

	for n := 1; n <= 2; n++ {
		ch, err := v.wait(ctx, "CHANNELS", n)
		require.NoError(t, err)
		require.Equal(t, strconv.Itoa(n), ch[0], "CHANNELS marker #%d", n)
		m := kvs(ch)
		require.Zero(t, m["rc"], "the guest's ETHTOOL_SCHANNELS combined %d failed", n)
		assert.EqualValues(t, n, m["txqueues"], "the guest kernel's transmit queues with %d channels", n)
		assert.EqualValues(t, n, m["rxqueues"], "the guest kernel's receive queues with %d channels", n)
		ping, err := v.wait(ctx, "PING", n+1) // after "first"
		require.NoError(t, err)
		require.Equal(t, "ch"+strconv.Itoa(n), ping[0], "PING marker #%d", n+1)
		p := kvs(ping)
		assert.Equal(t, uint64(2*qPings), p["transmitted"], "combined %d: pings sent from the two CPUs", n)
		assert.Equal(t, p["transmitted"], p["received"], "combined %d: every echo answered", n)
	}

	var seq []int
	for _, p := range ps {
		seq = append(seq, p.pairs)
	}
	require.GreaterOrEqual(t, len(ps), 3, "active pairs over time: %v", seq)
	last := ps[len(ps)-3:]
	require.Equal(t, []int{2, 1, 2}, []int{last[0].pairs, last[1].pairs, last[2].pairs},
		"active pairs over time (the driver enables 2 at probe, then ethtool sets 1 and 2): %v", seq)
	one, two := last[1], last[2]
	assert.Equal(t, one.start, one.end, "the second pair carried frames while one pair was active")
	assert.Greater(t, two.end[0], two.start[0], "receiveq 1 carried no frame once two pairs were active again")
	assert.Greater(t, two.end[1], two.start[1], "transmitq 1 carried no frame once two pairs were active again")

	stats, err := v.wait(ctx, "STATS", 3) // first, ch1, ch2
	require.NoError(t, err)
	require.Equal(t, "ch2", stats[0])
	s := kvs(stats)
	tx, rx := softnetCounts(r.sn)
	assert.Equal(t, s["tx_packets"], tx, "guest tx = frames the device took")
	assert.Equal(t, s["rx_packets"], rx, "guest rx = frames the device delivered")
	assert.Zero(t, s["rx_errors"]+s["tx_errors"]+s["rx_dropped"]+s["tx_dropped"])
	assert.NotZero(t, r.sn.Stats().CtrlOK, "control commands acknowledged")
}

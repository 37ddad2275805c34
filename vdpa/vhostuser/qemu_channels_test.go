package vhostuser

// The guest changes its number of queue pairs at run time (ethtool -L).

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
)

// TestQEMUChannels has the guest change its queue pairs at run time, as
// "ethtool -L eth0 combined N" does: the guest's virtio_net sends
// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET to QEMU, which runs the control queue and
// disables (SET_VRING_ENABLE 0) or enables (SET_VRING_ENABLE 1) the rings of
// the pairs dropped or added; no new addresses, no new bases, no new kick.
// (QEMU also enables the pairs it keeps again: for the first pair's running
// rings that must change nothing, and no ring event of theirs may appear.) A guest with two vCPUs and two pairs, a pinger
// pinned to each vCPU:
//
//  1. both pairs carry frames both ways;
//  2. with one channel, the second pair's two rings stop, and both pingers'
//     traffic flows on the first pair alone, nothing on the second;
//  3. with two channels again, the second pair's rings start where they
//     stopped (the guest's receive buffers posted before are still there)
//     and both pairs carry frames both ways again;
//  4. the same two changes with both pingers running through them.
//
// Every round checks that nothing was lost, duplicated or corrupt, on the
// guest kernel's counters.
// Split rings on QEMU 7.2, packed ones on QEMU 11.
func TestQEMUChannels(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q qemuPeer, helper string) {
		bin := testenv.BuildGuestTool(t, t.TempDir(), testenv.SetChannelsPkg)
		t.Run("event", func(t *testing.T) { testQEMUChannels(t, q, helper, bin, q.msix, nil) })
		t.Run("pollgroup", func(t *testing.T) {
			group := softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 1})
			testQEMUChannels(t, q, helper, bin, q.msix, group)
		})
	})
}

// testQEMUChannels runs TestQEMUChannels on one QEMU; with group set, the
// device busy-polls its transmit queues on it (each disabled ring leaves
// the group's worker, each enabled one joins it again).
func testQEMUChannels(t *testing.T, q qemuPeer, helper, bin string, packed bool, group *softnet.PollGroup) {
	const pairs = 2
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	dir := t.TempDir()
	g := buildGuestBins(t, ctx, helper, dir, "serve", []string{bin})
	rig := startRig(t, ctx, dir, rigOptions{name: "a", pairs: pairs, pollGroup: group})
	vm := bootServe(t, ctx, q, g, rig, qemuConfig{name: q.name + "-channels", smp: pairs, pairs: pairs, packed: packed}, pairs)
	require.NoError(t, waitPairsBusy(ctx, rig, pairs, nil), "both pairs before any change")
	p := stopPingers(t, ctx, vm, g.nonce, "two")
	checkPingRound(t, q.name+" channels: two pairs", p, false, rig)

	// startPingers starts pingers on both vCPUs (bootServe started the
	// first ones: STARTED markers count from there).
	started := 1
	startPingers := func() {
		t.Helper()
		require.NoError(t, vm.send("start "+strconv.Itoa(pairs)))
		started++
		_, err := waitMarkerN(ctx, vm, g.nonce, "STARTED", started)
		require.NoError(t, err)
	}
	// channels sets the guest's combined channels to n and returns the
	// ring events it caused, once every ring of the pairs above n stopped
	// (n < pairs) or started (n == pairs). QEMU touches no ring of the
	// first pair.
	changes := 0
	channels := func(n int) []ringEvent {
		t.Helper()
		mark := len(rig.ring.snapshot())
		require.NoError(t, vm.send("channels "+strconv.Itoa(n)))
		changes++
		f, err := waitMarkerN(ctx, vm, g.nonce, "CHANNELS", changes)
		require.NoError(t, err)
		require.Equal(t, strconv.Itoa(n), f[0])
		m := kv(t, f[1:])
		require.Zero(t, m["rc"], "the guest's ETHTOOL_SCHANNELS combined %d failed (console: %s)", n, vm.out.String())
		assert.EqualValues(t, n, m["txqueues"], "the guest kernel's transmit queues")
		assert.EqualValues(t, n, m["rxqueues"], "the guest kernel's receive queues")
		deadline := time.Now().Add(10 * time.Second)
		for {
			ev := rig.ring.snapshot()[mark:]
			last := lastRing(ev)
			done := true
			for k := 2; k < 2*pairs; k++ {
				e, ok := last[k]
				done = done && ok && e.start == (n == pairs)
			}
			if done || time.Now().After(deadline) {
				t.Logf("combined %d: ring events %v", n, ev)
				for _, e := range ev {
					assert.GreaterOrEqual(t, e.q, 2, "combined %d touched a ring of the first pair: %v", n, ev)
				}
				for k := 2; k < 2*pairs; k++ {
					if e, ok := last[k]; assert.True(t, ok, "combined %d: no event on queue %d: %v", n, k, ev) {
						assert.Equal(t, n == pairs, e.start, "combined %d: queue %d's last event: %v", n, k, ev)
					}
				}
				return ev
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	// One pair: the second pair's rings stop, and carry nothing.
	stopped := lastRing(channels(1))
	base := rig.dev.Stats()
	startPingers()
	_, err := waitEchoes(ctx, echoes(rig)+uint64(20*pairs), 60*time.Second, rig)
	require.NoError(t, err, "traffic with one channel")
	p = stopPingers(t, ctx, vm, g.nonce, "one")
	st := rig.dev.Stats()
	assert.GreaterOrEqual(t, st.Queues[0].Frames-base.Queues[0].Frames, uint64(20*pairs), "receiveq 0 with one channel")
	assert.GreaterOrEqual(t, st.Queues[1].Frames-base.Queues[1].Frames, uint64(20*pairs), "transmitq 0 with one channel")
	for i, m := range p.perPinger {
		assert.Positive(t, m["rx"], "pinger %d (on vCPU %d) got no reply with one channel", i, i)
	}
	for k := 2; k < 2*pairs; k++ {
		assert.Equal(t, base.Queues[k].Frames, st.Queues[k].Frames, "queue %d (a disabled pair) carried frames", k)
	}
	if group != nil {
		assert.Equal(t, []int{1}, group.Queues(), "one transmit queue on the worker with one channel")
	}
	checkPingRound(t, q.name+" channels: one pair", p, false, rig)

	// Two pairs again: the second pair's rings start where they stopped.
	ev := channels(pairs)
	checkRingContinuity(t, "combined 1 then 2", append(lastStops(stopped), ev...))
	base = rig.dev.Stats()
	startPingers()
	require.NoError(t, waitPairsBusy(ctx, rig, pairs, &base), "both pairs after combined %d", pairs)
	if group != nil {
		assert.Equal(t, []int{pairs}, group.Queues(), "both transmit queues on the worker again")
	}
	p = stopPingers(t, ctx, vm, g.nonce, "again")
	checkPingRound(t, q.name+" channels: two pairs again", p, false, rig)

	// The same under traffic: both pingers run through both changes.
	// Whatever the second pair's rings held when they stopped is served
	// when they start again; nothing is lost or duplicated.
	base = rig.dev.Stats()
	startPingers()
	require.NoError(t, waitPairsBusy(ctx, rig, pairs, &base), "both pairs before the changes under traffic")
	stopped = lastRing(channels(1))
	_, err = waitEchoes(ctx, echoes(rig)+uint64(20*pairs), 60*time.Second, rig)
	require.NoError(t, err, "traffic with one channel, under traffic")
	ev = channels(pairs)
	checkRingContinuity(t, "combined 1 then 2 under traffic", append(lastStops(stopped), ev...))
	base = rig.dev.Stats()
	require.NoError(t, waitPairsBusy(ctx, rig, pairs, &base), "both pairs after the changes under traffic")
	p = stopPingers(t, ctx, vm, g.nonce, "final")
	noWarnings(t, rig)
	checkPingRound(t, q.name+" channels: changes under traffic", p, false, rig)
	t.Logf("RESULT %s channels (%s, %s): %d pairs, then 1, then %d, quiet and under traffic; run time %v", q.name,
		map[bool]string{false: "split", true: "packed"}[packed], map[bool]string{false: "event", true: "poll group"}[group != nil],
		pairs, pairs, time.Since(start).Round(time.Millisecond))
}

// lastStops returns the stop events of m (each queue's last event) in
// queue order, for checkRingContinuity.
func lastStops(m map[int]ringEvent) []ringEvent {
	var ev []ringEvent
	for k := 0; k < 64; k++ {
		if e, ok := m[k]; ok && !e.start {
			ev = append(ev, e)
		}
	}
	return ev
}

package vhostuser

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestFrontendStopsReceiveFirstLosesNoReply stops a looping device the way
// QEMU's vhost_dev_stop does (monitor stop, every migration's
// stop-and-copy): ring by ring in index order, receiveq 0 (SET_VRING_ENABLE
// 0, GET_VRING_BASE) before transmitq 0, while the driver keeps
// transmitting. The frames transmitted after receiveq 0 was disabled stay
// in transmitq 0: its base is its used index (nothing consumed, nothing in
// flight), no reply is dropped, and after the restart (SET_VRING_BASE,
// SET_VRING_KICK, SET_VRING_ENABLE 1 in index order, as QEMU's cont does)
// every frame is answered exactly once.
func TestFrontendStopsReceiveFirstLosesNoReply(t *testing.T) {
	sn, err := softnet.New(&softnet.Options{MaxQueueSize: 1024})
	require.NoError(t, err)
	_, uc, _ := startBackend(t, sn, nil)
	d := newTestDriver(t, uc, virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC, virtio.FEventIdx))
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))

	frame := func(i int) []byte {
		f := make([]byte, 60)
		copy(f, []byte{2, 0, 0, 0, 0, 1})
		f[14], f[15] = byte(i), byte(i>>8)
		return f
	}
	sent, answered := 0, 0
	const rounds, perHalf = 12, 6
	for round := 0; round < rounds; round++ {
		d.postRx(2 * perHalf)
		for i := 0; i < perHalf; i++ {
			d.send(frame(sent))
			sent++
		}
		// vhost_dev_stop: receiveq 0 first.
		require.NoError(t, d.fe.EnableQueue(0, false))
		// The guest is still running between the two rings' stops.
		for i := 0; i < perHalf; i++ {
			d.send(frame(sent))
			sent++
		}
		rxBase, err := d.fe.QueueBase(0)
		require.NoError(t, err)
		require.NoError(t, d.fe.EnableQueue(1, false))
		txBase, err := d.fe.QueueBase(1)
		require.NoError(t, err)
		assert.Equal(t, txBase.NextUsed, txBase.NextAvail, "round %d: transmitq base is its used index: nothing consumed in flight", round)
		assert.Less(t, int(txBase.NextAvail), sent, "round %d: frames sent after receiveq 0 stopped are not consumed", round)
		require.Zero(t, sn.Stats().Drop(softnet.DropRxNotReady), "round %d: a reply was dropped between the two rings' stops", round)

		// cont: every ring again, index order, from its base.
		for q, st := range []vdpa.QueueState{rxBase, txBase} {
			require.NoError(t, d.fe.SetQueueBase(q, st))
			require.NoError(t, d.fe.SetQueueKick(q, d.kicks[q]))
			require.NoError(t, d.fe.EnableQueue(q, true))
		}
		d.reclaim(1, sent-answered)
		answered += len(d.reclaim(0, sent-answered))
	}
	st := sn.Stats()
	assert.Zero(t, st.Drop(softnet.DropRxNotReady))
	assert.Equal(t, uint64(sent), st.Queues[1].Frames, "every frame transmitted once")
	assert.Equal(t, uint64(sent), st.Queues[0].Frames, "every frame answered once")
	assert.Equal(t, sent, answered)
}

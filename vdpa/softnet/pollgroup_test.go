package softnet_test

import (
	"encoding/binary"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// modeCase is a processing setup that the mode-parametrised tests run
// under: event-driven, busy-poll with a goroutine per queue, and busy-poll
// on a PollGroup of one worker (every queue of the device on one
// goroutine).
type modeCase struct {
	name    string
	mode    softnet.Mode
	grouped bool
}

func (m modeCase) group() *softnet.PollGroup {
	if !m.grouped {
		return nil
	}
	return softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 1})
}

func modeCases() []modeCase {
	return []modeCase{
		{"event", softnet.ModeEvent, false},
		{"poll", softnet.ModePoll, false},
		{"poll-group", softnet.ModePoll, true},
	}
}

// waitFor polls cond until it holds; the deadline only guards against a
// hang.
func waitFor(t *testing.T, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		require.True(t, time.Now().Before(deadline), append([]any{msg}, args...)...)
		time.Sleep(time.Millisecond)
	}
}

// echoBurst sends n frames on every active pair of s and checks that each
// comes back byte for byte, in order, on its pair's receive queue.
func echoBurst(t *testing.T, s *stack, pairs, n int, seq *uint32) {
	t.Helper()
	mac := s.dev.MAC()
	sent := make([][][]byte, pairs)
	for p := range pairs {
		for range n {
			*seq++
			f := frame(mac, *seq, 60+int(*seq%200))
			sent[p] = append(sent[p], f)
			s.send(2*p+1, f)
		}
	}
	for p := range pairs {
		for i := range n {
			_, got := s.recvFrame(2 * p)
			require.Equal(t, sent[p][i], got, "pair %d frame %d", p, i)
		}
		for range n {
			s.wait(2*p + 1)
		}
	}
}

// TestPollGroupSharedByDevices: three devices of two queue pairs each run
// every transmit and control queue on one worker goroutine. Frames loop
// back byte for byte on every pair of every device while they all run; a
// device that is closed leaves the group and the others go on; when the
// last one is closed the worker goroutine ends.
func TestPollGroupSharedByDevices(t *testing.T) {
	before := runtime.NumGoroutine()
	g := softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 1})
	assert.Equal(t, 0, g.Running(), "no goroutine before a queue joins")
	f := base.With(virtio.NetFCtrlVQ, virtio.NetFMQ, virtio.FEventIdx)
	var stacks []*stack
	for range 3 {
		s := newStack(t, stackOptions{dev: softnet.Options{MaxQueuePairs: 2, Mode: softnet.ModePoll, PollGroup: g}, features: f, size: 64})
		require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(4, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 2, 0)))
		for p := range 2 {
			s.postRx(2*p, 64, 2048)
		}
		stacks = append(stacks, s)
	}
	// Two transmit queues and the control queue per device.
	assert.Equal(t, []int{9}, g.Queues())
	assert.Equal(t, 1, g.Running())

	var seq uint32
	for range 20 {
		for _, s := range stacks {
			echoBurst(t, s, 2, 3, &seq)
			for p := range 2 {
				s.postRx(2*p, 3, 2048)
			}
		}
	}
	for _, s := range stacks {
		st := s.dev.Stats()
		for q := range 4 {
			assert.Equal(t, uint64(60), st.Queues[q].Frames, "queue %d", q)
		}
	}

	require.NoError(t, stacks[0].local.Close())
	assert.Equal(t, []int{6}, g.Queues(), "the closed device's queues left the group")
	for _, s := range stacks[1:] {
		echoBurst(t, s, 2, 5, &seq)
	}
	for _, s := range stacks[1:] {
		require.NoError(t, s.local.Close())
	}
	assert.Equal(t, []int{0}, g.Queues())
	assert.Equal(t, 0, g.Running(), "the worker ends with its last queue")
	waitFor(t, func() bool { return runtime.NumGoroutine() <= before }, "goroutines: %d, %d before", runtime.NumGoroutine(), before)
}

// TestPollGroupSpreadsQueues: a queue joins the worker serving the fewest,
// a reset takes every queue off, and the next start joins again.
func TestPollGroupSpreadsQueues(t *testing.T) {
	g := softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 2})
	f := base.With(virtio.NetFCtrlVQ, virtio.NetFMQ)
	s := newStack(t, stackOptions{dev: softnet.Options{MaxQueuePairs: 4, Mode: softnet.ModePoll, PollGroup: g}, features: f, size: 32})
	// Four transmit queues and the control queue.
	n := g.Queues()
	slices.Sort(n)
	assert.Equal(t, []int{2, 3}, n)
	assert.Equal(t, 2, g.Running())
	require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(8, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 4, 0)))
	for p := range 4 {
		s.postRx(2*p, 16, 2048)
	}
	var seq uint32
	echoBurst(t, s, 4, 8, &seq)

	require.NoError(t, s.local.SetStatus(0))
	assert.Equal(t, []int{0, 0}, g.Queues(), "a reset stops every queue")
	assert.Equal(t, 0, g.Running())
}

// TestPollGroupFaultBreaksOneQueue: two devices share one worker; the
// memory behind one device's transmit buffers goes away. That queue
// breaks with vring.ErrMemoryFault and leaves the group; the other
// device's traffic goes on on the same worker.
func TestPollGroupFaultBreaksOneQueue(t *testing.T) {
	g := softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 1})
	opts := stackOptions{dev: softnet.Options{Mode: softnet.ModePoll, PollGroup: g}, features: base, peerFiles: true}
	// The healthy device joins first: the broken queue is not the
	// worker's first, so the fault must be pinned on the right entry.
	b := newStack(t, opts)
	a := newStack(t, opts)
	assert.Equal(t, []int{2}, g.Queues())
	a.postRx(0, 8, 2048)
	b.postRx(0, 64, 2048)
	var seq uint32
	echoBurst(t, a, 1, 2, &seq)
	echoBurst(t, b, 1, 2, &seq)

	mac := a.dev.MAC()
	for i := range 4 {
		_, err := a.drv[1].Add([][]byte{a.hdr(), frame(mac, uint32(100+i), 100)}, nil)
		require.NoError(t, err)
	}
	a.lose(1)
	a.drv[1].Queue.Publish()
	a.waitNeedsReset()
	require.ErrorIs(t, a.local.QueueErr(1), vring.ErrMemoryFault)
	waitFor(t, func() bool { return slices.Equal(g.Queues(), []int{1}) }, "the broken queue leaves the group: %v", g.Queues())

	for range 10 {
		echoBurst(t, b, 1, 4, &seq)
		b.postRx(0, 4, 2048)
	}
	assert.NoError(t, b.dev.QueueErr(1))
	assert.Equal(t, 1, g.Running())
	require.NoError(t, a.local.SetStatus(0), "the broken device resets")
	assert.Equal(t, []int{1}, g.Queues())
}

// TestPollGroupNeedsPollMode: a group serves busy-poll devices only.
func TestPollGroupNeedsPollMode(t *testing.T) {
	_, err := softnet.New(&softnet.Options{Mode: softnet.ModeEvent, PollGroup: softnet.NewPollGroup(nil)})
	require.ErrorIs(t, err, softnet.ErrPollGroup)
	d, err := softnet.New(&softnet.Options{Mode: softnet.ModePoll, PollGroup: softnet.NewPollGroup(nil)})
	require.NoError(t, err)
	assert.NotNil(t, d)
	assert.Len(t, softnet.NewPollGroup(nil).Queues(), runtime.GOMAXPROCS(0), "zero workers means GOMAXPROCS")
}

// TestPollGroupHostileRingBreaksOneQueue: the second device on a worker
// gets an avail.idx far beyond its ring (a broken ring rule, not a fault):
// that queue alone breaks with vring.ErrAvailIdxJump and leaves the group.
func TestPollGroupHostileRingBreaksOneQueue(t *testing.T) {
	g := softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 1})
	opts := stackOptions{dev: softnet.Options{Mode: softnet.ModePoll, PollGroup: g}, features: base}
	good := newStack(t, opts)
	bad := newStack(t, opts)
	good.postRx(0, 64, 2048)
	var idx [2]byte
	binary.LittleEndian.PutUint16(idx[:], 1000)
	require.NoError(t, bad.mem.Write(bad.layouts[1].Avail+2, idx[:]))
	bad.waitNeedsReset()
	assert.ErrorIs(t, bad.dev.QueueErr(1), vring.ErrAvailIdxJump)
	waitFor(t, func() bool { return slices.Equal(g.Queues(), []int{1}) }, "the broken queue leaves the group: %v", g.Queues())
	var seq uint32
	for range 5 {
		echoBurst(t, good, 1, 4, &seq)
		good.postRx(0, 4, 2048)
	}
	assert.NoError(t, good.dev.QueueErr(1))
}

// TestPollGroupForwardsBetweenDevices: two linked devices on one worker
// forward frames to each other (a transmit batch of one writes into the
// other's receive queue); then the sender's frame memory goes away while
// it forwards, and only the sender's transmit queue breaks.
func TestPollGroupForwardsBetweenDevices(t *testing.T) {
	g := softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 1})
	a := newStack(t, stackOptions{dev: softnet.Options{Mode: softnet.ModePoll, PollGroup: g}, features: base, peerFiles: true})
	b := newStack(t, stackOptions{dev: softnet.Options{Mode: softnet.ModePoll, PollGroup: g, MAC: [6]byte{0x02, 0, 0, 0, 0, 2}},
		features: base, peerFiles: true})
	softnet.Link(a.dev, b.dev)
	assert.Equal(t, []int{2}, g.Queues())
	a.postRx(0, 32, 2048)
	b.postRx(0, 32, 2048)
	for i := range 10 {
		fa := frame(b.dev.MAC(), uint32(2*i), 200)
		a.send(1, fa)
		_, got := b.recvFrame(0)
		require.Equal(t, fa, got)
		fb := frame(a.dev.MAC(), uint32(2*i+1), 300)
		b.send(1, fb)
		_, got = a.recvFrame(0)
		require.Equal(t, fb, got)
	}

	// b's transmit queue joined second: the sender that breaks is the
	// worker's second entry.
	_, err := b.drv[1].Add([][]byte{b.hdr(), frame(a.dev.MAC(), 99, 100)}, nil)
	require.NoError(t, err)
	b.lose(1)
	b.drv[1].Queue.Publish()
	b.waitNeedsReset()
	assert.ErrorIs(t, b.local.QueueErr(1), vring.ErrMemoryFault)
	assert.NoError(t, a.dev.QueueErr(0), "the receiver is not broken")
	st, err := a.local.Status()
	require.NoError(t, err)
	assert.Zero(t, st&virtio.StatusDeviceNeedsReset)
	waitFor(t, func() bool { return slices.Equal(g.Queues(), []int{1}) }, "the broken sender leaves the group: %v", g.Queues())
	// a still forwards to b's receive queue, on the same worker.
	fa := frame(b.dev.MAC(), 1000, 64)
	a.send(1, fa)
	_, got := b.recvFrame(0)
	assert.Equal(t, fa, got)
}

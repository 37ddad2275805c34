package softnet_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// waitNeedsReset waits until the device reports DEVICE_NEEDS_RESET. The
// deadline only guards against a hang.
func (s *stack) waitNeedsReset() {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := s.local.Status()
		require.NoError(s.t, err)
		if st&virtio.StatusDeviceNeedsReset != 0 {
			return
		}
		require.True(s.t, time.Now().Before(deadline), "status %v", st)
		time.Sleep(time.Millisecond)
	}
}

// lose truncates queue q's guest memory file to its rings: the pages of
// its buffers are gone, as when a peer shrinks its memory file.
func (s *stack) lose(q int) {
	s.t.Helper()
	require.NoError(s.t, unix.Ftruncate(s.fds[q], int64(s.ringSize)))
}

// TestTruncatedTxMemoryBreaksQueue: the peer truncates the file behind the
// transmit buffers while traffic runs. The transmit worker faults reading
// a frame; the fault is an error matching vring.ErrMemoryFault, the queue
// is reported broken and the device sets DEVICE_NEEDS_RESET (virtio 1.2
// §2.1.2); the process, the receive queue and a device reset still work.
func TestTruncatedTxMemoryBreaksQueue(t *testing.T) {
	for _, mc := range modeCases() {
		t.Run(mc.name, func(t *testing.T) {
			s := newStack(t, stackOptions{dev: softnet.Options{Mode: mc.mode, PollGroup: mc.group()}, features: base, peerFiles: true})
			mac := s.dev.MAC()
			s.postRx(0, 8, 2048)
			f := frame(mac, 1, 100)
			s.send(1, f)
			_, got := s.recvFrame(0)
			require.Equal(t, f, got, "traffic flows before the truncation")
			select {
			case <-s.dev.QueueErrNotify():
				t.Fatal("a queue error announced while every queue is healthy")
			default:
			}

			// The frames are written into the buffers, then the buffers go
			// away, then the driver publishes them.
			for i := range 4 {
				_, err := s.drv[1].Add([][]byte{s.hdr(), frame(mac, uint32(2+i), 100)}, nil)
				require.NoError(t, err)
			}
			s.lose(1)
			s.drv[1].Queue.Publish()
			require.NoError(t, s.kick[1].Signal())

			select {
			case <-s.dev.QueueErrNotify():
			case <-time.After(10 * time.Second):
				t.Fatal("the queue error was not announced (QueueErrNotify)")
			}
			s.waitNeedsReset()
			err := s.local.QueueErr(1)
			require.ErrorIs(t, err, vring.ErrMemoryFault)
			var fe *vring.FaultError
			require.ErrorAs(t, err, &fe)
			assert.NoError(t, s.dev.QueueErr(0), "the receive queue is not affected")
			assert.NoError(t, s.dev.Deliver(0, frame(mac, 9, 10)), "and still delivers")

			require.NoError(t, s.local.SetStatus(0), "a reset stops the broken queue")
			st, err := s.local.Status()
			require.NoError(t, err)
			assert.Zero(t, st)
		})
	}
}

// TestTruncatedRxMemoryBreaksQueue: the receive buffers' pages go away.
// A frame delivered into them, from Deliver's caller or from the transmit
// worker's loopback reply, faults; the receive queue (not the caller, not
// the transmit queue) breaks with vring.ErrMemoryFault, and the device sets
// DEVICE_NEEDS_RESET.
func TestTruncatedRxMemoryBreaksQueue(t *testing.T) {
	t.Run("Deliver from another goroutine", func(t *testing.T) {
		s := newStack(t, stackOptions{features: base, peerFiles: true})
		mac := s.dev.MAC()
		s.postRx(0, 8, 2048)
		s.lose(0)
		err := s.dev.Deliver(0, frame(mac, 1, 100))
		require.ErrorIs(t, err, vring.ErrMemoryFault)
		assert.ErrorIs(t, s.dev.QueueErr(0), vring.ErrMemoryFault)
		assert.ErrorIs(t, s.dev.Deliver(0, frame(mac, 2, 100)), softnet.ErrRxNotReady, "a broken queue takes nothing more")
		s.waitNeedsReset()
	})
	t.Run("loopback reply from the transmit worker", func(t *testing.T) {
		s := newStack(t, stackOptions{features: base.With(virtio.NetFMrgRxbuf), peerFiles: true})
		mac := s.dev.MAC()
		s.postRx(0, 8, 2048)
		s.lose(0)
		s.send(1, frame(mac, 1, 100))
		c := s.wait(1)
		assert.Zero(t, c.Len, "the transmit chain still completes")
		s.waitNeedsReset()
		assert.ErrorIs(t, s.local.QueueErr(0), vring.ErrMemoryFault)
		assert.NoError(t, s.dev.QueueErr(1), "the transmit queue keeps running")
		assert.Equal(t, uint64(1), s.dev.Stats().Queues[1].Frames)
	})
}

// TestTruncatedForwardedFrameBreaksSender: a device forwarding to another
// reads its frames from its own guest memory; when that memory is gone,
// the sender's transmit queue breaks and the receiver is unaffected.
func TestTruncatedForwardedFrameBreaksSender(t *testing.T) {
	a := newStack(t, stackOptions{features: base, peerFiles: true})
	b := newStack(t, stackOptions{features: base, peerFiles: true})
	a.dev.SetHandler(softnet.ForwardTo(b.dev))
	b.postRx(0, 8, 2048)
	_, err := a.drv[1].Add([][]byte{a.hdr(), frame(b.dev.MAC(), 1, 100)}, nil)
	require.NoError(t, err)
	a.lose(1)
	a.drv[1].Queue.Publish()
	require.NoError(t, a.kick[1].Signal())
	a.waitNeedsReset()
	assert.ErrorIs(t, a.local.QueueErr(1), vring.ErrMemoryFault)
	assert.NoError(t, b.dev.QueueErr(0))
	st, err := b.local.Status()
	require.NoError(t, err)
	assert.Zero(t, st&virtio.StatusDeviceNeedsReset)
	f := frame(b.dev.MAC(), 2, 10)
	require.NoError(t, b.dev.Deliver(0, f), "the receiver's held chain takes the next frame")
	_, got := b.recvFrame(0)
	assert.Equal(t, f, got)
}

// TestLoopbackFaultsMidBatch: memory faults in the middle of one transmit
// batch of loopback replies, after the batch's first replies went through
// (those after the first take Loopback's held-queue path, loopReply). A
// receive buffer that faults breaks the receive queue only: the rest of
// the batch's frames are dropped as DropRxNotReady and every transmit
// chain completes. A transmit frame that faults breaks the transmit queue
// only, with the receive queue (held by the batch when the fault came)
// unlocked and still delivering.
func TestLoopbackFaultsMidBatch(t *testing.T) {
	for _, mrg := range []bool{true, false} {
		t.Run(fmt.Sprintf("MRG_RXBUF %v", mrg), func(t *testing.T) { loopbackFaultsMidBatch(t, mrg) })
	}
}

func loopbackFaultsMidBatch(t *testing.T, mrg bool) {
	const slot = 2048
	feat := base
	if mrg {
		feat = feat.With(virtio.NetFMrgRxbuf)
	}
	t.Run("receive buffer", func(t *testing.T) {
		s := newStack(t, stackOptions{features: feat, peerFiles: true, slot: slot})
		mac := s.dev.MAC()
		// A new driver hands out its buffer slots in ascending address
		// order: the receive buffers from the third on (slot 2) are gone.
		s.postRx(0, 8, slot)
		require.NoError(t, unix.Ftruncate(s.fds[0], int64(s.ringSize+2*slot)))
		drops := s.dev.Stats().Drop(softnet.DropRxNotReady)
		s.send(1, frame(mac, 1, 100), frame(mac, 2, 100), frame(mac, 3, 100), frame(mac, 4, 100), frame(mac, 5, 100))
		for _, c := range s.waitN(1, 5) {
			assert.Zero(t, c.Len, "every transmit chain completes")
		}
		s.waitNeedsReset()
		assert.ErrorIs(t, s.local.QueueErr(0), vring.ErrMemoryFault)
		assert.NoError(t, s.dev.QueueErr(1), "the transmit queue keeps running")
		assert.Equal(t, drops+3, s.dev.Stats().Drop(softnet.DropRxNotReady), "the faulting frame and the two after it")
		assert.Equal(t, uint64(5), s.dev.Stats().Queues[1].Frames)
	})
	t.Run("transmit frame", func(t *testing.T) {
		s := newStack(t, stackOptions{features: feat, peerFiles: true, slot: slot})
		mac := s.dev.MAC()
		s.postRx(0, 16, slot)
		// Written into slots 0, 1, ... (a new driver's ascending order);
		// from the third on (slot 2) the frames are gone by the time the
		// device reads them.
		for i := range 5 {
			_, err := s.drv[1].Add([][]byte{s.hdr(), frame(mac, uint32(1+i), 100)}, nil)
			require.NoError(t, err)
		}
		require.NoError(t, unix.Ftruncate(s.fds[1], int64(s.ringSize+2*slot)))
		s.drv[1].Queue.Publish()
		require.NoError(t, s.kick[1].Signal())
		s.waitNeedsReset()
		assert.ErrorIs(t, s.local.QueueErr(1), vring.ErrMemoryFault)
		assert.NoError(t, s.dev.QueueErr(0), "the receive queue is not affected")
		// The replies written before the fault wait for the receive
		// queue's next publication (the batch ended without one).
		f := frame(mac, 9, 10)
		require.NoError(t, s.dev.Deliver(0, f), "the receive queue was released and still delivers")
		for _, want := range []uint32{1, 2} {
			_, got := s.recvFrame(0)
			assert.Equal(t, want, seqOf(got), "the replies before the fault")
		}
		_, got := s.recvFrame(0)
		assert.Equal(t, f, got)
	})
}

package softnet_test

import (
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

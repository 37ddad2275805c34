package vhostuser

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// newShrinkableDriver is newTestDriver with guest memory in a memfd made
// without MFD_ALLOW_SEALING (as some front-ends make them): nobody can seal
// it, and the returned fd lets the test truncate it after SET_MEM_TABLE.
func newShrinkableDriver(t *testing.T, uc *net.UnixConn, want virtio.Features) (*testDriver, int) {
	t.Helper()
	fd, err := unix.MemfdCreate("front-end", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, 4<<20))
	reg, err := vring.NewFdRegion(0x100000, 4<<20, fd, 0, nil)
	require.NoError(t, err)
	require.False(t, reg.Sealed())
	return newTestDriverOn(t, uc, want, reg), fd
}

// A front-end truncates its guest memory file after SET_MEM_TABLE, while
// the back-end's device runs. The device's next access faults; instead of
// the back-end process dying of SIGBUS, the queue is reported broken: the
// SET_VRING_ERR eventfd is signalled and GET_STATUS shows
// DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2), and the back-end keeps serving.
func TestBackendSurvivesTruncatedMemory(t *testing.T) {
	handlers := []struct {
		name string
		h    func(t *testing.T) vdpa.Handler
	}{
		{"softnet", func(t *testing.T) vdpa.Handler {
			dev, err := softnet.New(&softnet.Options{MaxQueueSize: 1024})
			require.NoError(t, err)
			return dev
		}},
		{"vhostusertest", func(*testing.T) vdpa.Handler {
			return vhostusertest.New(vhostusertest.Loopback, [6]byte{2, 0, 0, 0, 0, 1})
		}},
	}
	for _, tc := range handlers {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.h(t)
			_, uc, _ := startBackend(t, h, nil)
			d, fd := newShrinkableDriver(t, uc, virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC))
			errFd, err := vdpa.NewEventFD()
			require.NoError(t, err)
			defer errFd.Close()
			require.NoError(t, d.fe.SetQueueErr(1, errFd))
			d.startQueue(0)
			d.startQueue(1)
			require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
			d.postRx(4)
			frame := make([]byte, 60)
			copy(frame, []byte{2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x88, 0xb5})
			d.send(frame)
			d.reclaim(1, 1)
			d.reclaim(0, 1)

			// The whole file goes; the driver kicks the transmit queue.
			require.NoError(t, unix.Ftruncate(fd, 0))
			require.NoError(t, d.kicks[1].Signal())

			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err = errFd.Wait(ctx)
			require.NoError(t, err, "SET_VRING_ERR eventfd not signalled")
			st, err := d.fe.Status()
			require.NoError(t, err)
			assert.NotZero(t, st&virtio.StatusDeviceNeedsReset, "status %v", st)
			r, ok := h.(vdpa.QueueErrReporter)
			require.True(t, ok)
			assert.ErrorIs(t, r.QueueErr(1), vring.ErrMemoryFault)
			// The session is alive: a reset is answered.
			require.NoError(t, d.fe.SetStatus(0))
		})
	}
}

// A front-end that truncates its memory before the rings start: starting
// the ring reads used.idx (and then writes the ring) on the back-end's
// session goroutine, which faults; vring's guarded Memory.Read and
// NewDeviceQueue turn that into an error. The back-end answers the message with a failure instead of
// dying, and goes on serving the session.
func TestBackendSurvivesMemoryTruncatedBeforeStart(t *testing.T) {
	dev, err := softnet.New(&softnet.Options{MaxQueueSize: 1024})
	require.NoError(t, err)
	be, uc, _ := startBackend(t, dev, nil)
	d, fd := newShrinkableDriver(t, uc, virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC))
	require.NoError(t, unix.Ftruncate(fd, 0))
	l := d.layouts[1]
	require.NoError(t, d.fe.SetQueueNum(1, l.Size))
	require.NoError(t, d.fe.SetQueueAddr(1, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used}))
	require.NoError(t, d.fe.SetQueueBase(1, vdpa.QueueState{}))
	require.NoError(t, d.fe.SetQueueCall(1, d.calls[1]))
	require.NoError(t, d.fe.SetQueueKick(1, d.kicks[1]))
	assert.Error(t, d.fe.EnableQueue(1, true), "the ring cannot start")
	assert.Zero(t, be.Info().RunningQueues)
	_, err = d.fe.Features()
	assert.NoError(t, err, "the session goes on")
}

// A queue that breaks before the front-end has sent its SET_VRING_ERR
// eventfd: the eventfd is signalled when it arrives. With a handler that
// announces its errors (softnet), the watcher is not polling; it looks
// again when the session's set of eventfds changes.
func TestBackendSignalsErrFdSentAfterTheError(t *testing.T) {
	h, err := softnet.New(&softnet.Options{MaxQueueSize: 1024})
	require.NoError(t, err)
	_, uc, _ := startBackend(t, h, nil)
	d, fd := newShrinkableDriver(t, uc, virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC))
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	require.NoError(t, unix.Ftruncate(fd, 0))
	require.NoError(t, d.kicks[1].Signal())
	require.Eventually(t, func() bool { return h.QueueErr(1) != nil }, 10*time.Second, time.Millisecond, "the transmit queue breaks")

	errFd, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer errFd.Close()
	require.NoError(t, d.fe.SetQueueErr(1, errFd))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = errFd.Wait(ctx)
	require.NoError(t, err, "SET_VRING_ERR eventfd sent after the error not signalled")
}

// A queue restarted with the same SET_VRING_ERR eventfd (here by a new
// SET_VRING_CALL, which restarts the running ring) is a new run: when it
// breaks again, the eventfd is signalled again. (The watcher used to
// re-arm only when it saw the queue stopped, which a restart inside one
// message never shows it.)
func TestBackendSignalsErrFdForEachRun(t *testing.T) {
	h, d, errFd := runningWithErrFd(t, virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC))
	d.jumpAvail(1, 0x4000) // the transmit ring's avail.idx jumps past the ring
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := errFd.Wait(ctx)
	require.NoError(t, err, "first run: SET_VRING_ERR eventfd not signalled")
	require.ErrorIs(t, h.QueueErr(1), vring.ErrAvailIdxJump)

	// Restart the ring (its error is cleared) with the index put back.
	require.NoError(t, d.mem.Write(d.layouts[1].Avail+2, []byte{0, 0}))
	call, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer call.Close()
	require.NoError(t, d.fe.SetQueueCall(1, call))
	require.NoError(t, h.QueueErr(1), "the restarted ring runs")
	_, err = errFd.TryWait() // stopping the broken ring signalled it once more
	require.NoError(t, err)
	d.jumpAvail(1, 0x4000) // and breaks again
	_, err = errFd.Wait(ctx)
	require.NoError(t, err, "second run: SET_VRING_ERR eventfd not signalled")
}

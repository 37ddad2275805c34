package vhostuser

import (
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// A hostile front-end sends a dirty log in a memfd made without
// MFD_ALLOW_SEALING (the back-end cannot seal it against shrinking) and
// truncates the file while a ring holds dirty-log marks the back-end has
// yet to apply. The back-end applies them on its session goroutine when
// the ring stops (GET_VRING_BASE, SET_STATUS 0, RESET_DEVICE, the end of
// the connection), where the write faults: the process must not die of
// SIGBUS. A request being served fails with ErrBadRegion (and
// vring.ErrMemoryFault) and the session ends; a disconnect ends the
// session as usual. No descriptor leaks.
func TestBackendSurvivesTruncatedLog(t *testing.T) {
	tests := []struct {
		name string
		stop func(t *testing.T, d *testDriver, uc *net.UnixConn) // stops ring 0 after the truncation
		req  Request                                             // the request that fails; 0: the front-end hung up
	}{
		{"GET_VRING_BASE", func(t *testing.T, d *testDriver, uc *net.UnixConn) {
			_, err := d.fe.QueueBase(0)
			assert.Error(t, err, "the back-end ends the session instead of answering")
		}, ReqGetVringBase},
		{"SET_STATUS 0", func(t *testing.T, d *testDriver, uc *net.UnixConn) {
			assert.ErrorIs(t, d.fe.SetStatus(0), ErrReplyFailed, "REPLY_ACK reports the failure")
		}, ReqSetStatus},
		{"RESET_DEVICE", func(t *testing.T, d *testDriver, uc *net.UnixConn) {
			sendRaw(t, uc, rawMsg(ReqResetDevice, Version, 0, nil), nil)
		}, ReqResetDevice},
		{"disconnect", func(t *testing.T, d *testDriver, uc *net.UnixConn) {
			require.NoError(t, d.fe.Close())
		}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := openFdSet(t)
			// Registered first, so it runs after every other cleanup
			// (the back-end's end, the driver's descriptors).
			t.Cleanup(func() { assert.Empty(t, leakedSince(t, before), "descriptors leaked") })
			h := &handDriven{
				features: vhostusertest.New(vhostusertest.Loopback, [6]byte{}).Features(),
				started:  make(chan *vring.DeviceQueue, 1),
				done:     make(chan struct{}),
				dqs:      map[int]*vring.DeviceQueue{},
			}
			_, uc, served := startBackend(t, h, nil)
			var once sync.Once
			release := func() { once.Do(func() { close(h.done) }) }
			t.Cleanup(release)
			d := newTestDriver(t, uc, h.features.With(virtio.FLogAll)&^virtio.FRingPacked.Bit())
			require.True(t, d.features.Has(virtio.FLogAll))

			const logSize = 4096                                         // covers 128 MiB of guest memory
			fd, err := unix.MemfdCreate("hostile-log", unix.MFD_CLOEXEC) // no MFD_ALLOW_SEALING
			require.NoError(t, err)
			defer unix.Close(fd)
			require.NoError(t, unix.Ftruncate(fd, logSize))
			bm, err := dirty.AttachFd(fd, 0, logSize, nil)
			require.NoError(t, err)
			defer bm.Close()
			require.NoError(t, d.fe.SetLog(bm))
			d.startQueue(0)
			var dq *vring.DeviceQueue
			select {
			case dq = <-h.started:
			case <-time.After(10 * time.Second):
				t.Fatal("queue 0 never started")
			}
			d.postRx(1)
			// The "device" writes a buffer and logs it without pushing:
			// the mark waits in the ring's cache until the ring stops.
			var c vring.Chain
			ok, err := dq.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			copy(c.Segs[0].Buf, "written by the device")
			require.NoError(t, dq.LogChain(&c, 21))
			release()

			require.NoError(t, unix.Ftruncate(fd, 0)) // the log's only page goes
			tc.stop(t, d, uc)
			select {
			case err = <-served:
			case <-time.After(10 * time.Second):
				t.Fatal("the session did not end")
			}
			if tc.req == 0 {
				assert.NoError(t, err, "a hang-up ends the session without error")
				return
			}
			require.ErrorIs(t, err, ErrBadRegion)
			assert.ErrorIs(t, err, vring.ErrMemoryFault)
			var me *MessageError
			require.ErrorAs(t, err, &me)
			assert.Equal(t, tc.req, me.Request)
		})
	}
}

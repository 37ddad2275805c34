package vdpa_test

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// logOnlyHandler is a device whose data path the test drives by hand: it
// keeps the queues StartQueue hands it, and StopQueue reports their state
// (or failStop).
type logOnlyHandler struct {
	dqs      map[int]*vring.DeviceQueue
	failStop error
}

func (h *logOnlyHandler) DeviceID() virtio.DeviceID         { return virtio.DeviceNet }
func (h *logOnlyHandler) Features() virtio.Features         { return feat }
func (h *logOnlyHandler) SetFeatures(virtio.Features) error { return nil }
func (h *logOnlyHandler) ConfigSize() int                   { return 0 }
func (h *logOnlyHandler) ReadConfig(int, []byte)            {}
func (h *logOnlyHandler) WriteConfig(int, []byte) error     { return nil }
func (h *logOnlyHandler) NumQueues() int                    { return 2 }
func (h *logOnlyHandler) MaxQueueSize() uint16              { return 64 }
func (h *logOnlyHandler) Reset()                            { clear(h.dqs) }
func (h *logOnlyHandler) StartQueue(q int, dq *vring.DeviceQueue, _, _ *vdpa.EventFD) error {
	h.dqs[q] = dq
	return nil
}

func (h *logOnlyHandler) StopQueue(q int) (vring.QueueState, error) {
	if h.failStop != nil {
		return vring.QueueState{}, h.failStop
	}
	dq := h.dqs[q]
	delete(h.dqs, q)
	return dq.State(), nil
}

// TestLocalFlushesCachedLogAtStop: Local gives each queue a caching dirty
// logger, so marks the handler made for a chain it had not pushed yet wait
// in the cache. A log harvested after Suspend (or after Close, when the
// handler failed to stop the queue, also when the queue was started again
// in between) must still hold that write: the page a device wrote is in
// the log once the device has stopped.
func TestLocalFlushesCachedLogAtStop(t *testing.T) {
	for _, tc := range []struct {
		name              string
		failStop, restart bool
	}{
		{name: "suspend"},
		{name: "stop fails, then close", failStop: true},
		{name: "stop fails, queue restarted, then close", failStop: true, restart: true},
	} {
		failStop := tc.failStop
		t.Run(tc.name, func(t *testing.T) {
			h := &logOnlyHandler{dqs: map[int]*vring.DeviceQueue{}}
			l := vdpa.NewLocal(h, nil)
			r, err := vring.NewMemfdRegion(0x10000, 1<<20, nil)
			require.NoError(t, err)
			mem, err := vring.NewMemory(r)
			require.NoError(t, err)
			defer mem.Close()
			defer l.Close()
			log, err := dirty.New(0x10000+1<<20, nil)
			require.NoError(t, err)
			require.NoError(t, l.SetLog(log))
			require.NoError(t, setup(t, l, mem, [2]vdpa.QueueAddr{ringAt(0x20000), ringAt(0x30000)}))

			// The driver offers a writable buffer on queue 0.
			lay := vring.ContiguousLayout(0x20000, 64)
			drvq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: lay})
			require.NoError(t, err)
			const buf = 0x80000
			_, err = drvq.Add([]vring.Buffer{{Addr: buf, Len: 512, Writable: true}})
			require.NoError(t, err)
			drvq.Publish()
			_, err = log.Harvest(mustNewLog(t, log.Span())) // forget the rings' setup
			require.NoError(t, err)

			// The "device" writes the buffer and logs it, without pushing.
			dq := h.dqs[0]
			require.NotNil(t, dq)
			var c vring.Chain
			ok, err := dq.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			copy(c.Segs[0].Buf, "written by the device")
			require.NoError(t, dq.LogChain(&c, 21))
			assert.False(t, log.PageDirty(log.PageOf(buf)), "the mark was expected to wait in the queue's cache")

			if failStop {
				h.failStop = errors.New("handler cannot stop")
				if tc.restart {
					require.ErrorIs(t, l.EnableQueue(0, false), h.failStop)
					h.failStop = nil
					require.NoError(t, l.EnableQueue(0, true))
					require.NotSame(t, dq, h.dqs[0], "a new queue was started")
				} else {
					require.ErrorIs(t, l.Suspend(), h.failStop)
					h.failStop = nil
				}
				assert.False(t, log.PageDirty(log.PageOf(buf)), "flushed while the handler may still drive the queue")
				require.NoError(t, l.Close())
			} else {
				require.NoError(t, l.Suspend())
			}
			assert.True(t, log.PageDirty(log.PageOf(buf)), "a page the device wrote is missing from the log after it stopped")
		})
	}
}

func mustNewLog(t *testing.T, span uint64) *dirty.Bitmap {
	b, err := dirty.New(span, nil)
	require.NoError(t, err)
	return b
}

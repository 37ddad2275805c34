package vhostuser

import (
	"context"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// handDriven is a handler whose data path the test drives: StartQueue
// hands each queue to the test through started; StopQueue reports the
// queue's state once the test has given it back through done.
type handDriven struct {
	features virtio.Features
	started  chan *vring.DeviceQueue
	done     chan struct{}
	stopping chan struct{} // if not nil, told (without blocking) when StopQueue(0) starts waiting
	dqs      map[int]*vring.DeviceQueue
}

func (h *handDriven) DeviceID() virtio.DeviceID         { return virtio.DeviceNet }
func (h *handDriven) Features() virtio.Features         { return h.features }
func (h *handDriven) SetFeatures(virtio.Features) error { return nil }
func (h *handDriven) ConfigSize() int                   { return 0 }
func (h *handDriven) ReadConfig(int, []byte)            {}
func (h *handDriven) WriteConfig(int, []byte) error     { return nil }
func (h *handDriven) NumQueues() int                    { return 2 }
func (h *handDriven) MaxQueueSize() uint16              { return 256 }
func (h *handDriven) Reset()                            { clear(h.dqs) }
func (h *handDriven) StartQueue(q int, dq *vring.DeviceQueue, _, _ *vdpa.EventFD) error {
	h.dqs[q] = dq
	if q == 0 {
		h.started <- dq
	}
	return nil
}

func (h *handDriven) StopQueue(q int) (vring.QueueState, error) {
	dq := h.dqs[q]
	delete(h.dqs, q)
	if q == 0 {
		select {
		case h.stopping <- struct{}{}:
		default:
		}
		<-h.done
	}
	return dq.State(), nil
}

// TestBackendFlushesCachedLogAtStop: the back-end gives each ring a
// caching dirty logger (dirty.Cache), so marks for a chain the handler
// wrote but has not pushed wait in the cache. GET_VRING_BASE (the stop of
// a migration's last phase) must leave them in the front-end's log: every
// page the device wrote is in the log once the ring has stopped.
func TestBackendFlushesCachedLogAtStop(t *testing.T) {
	h := &handDriven{
		features: vhostusertest.New(vhostusertest.Loopback, [6]byte{}).Features(),
		started:  make(chan *vring.DeviceQueue, 1),
		done:     make(chan struct{}),
		dqs:      map[int]*vring.DeviceQueue{},
	}
	_, uc, _ := startBackend(t, h, nil)
	// StopQueue(0) waits for done: release it however the test ends, or
	// the back-end's teardown would wait for ever (cleanups run last
	// registered first, so this one runs before the back-end's).
	var once sync.Once
	release := func() { once.Do(func() { close(h.done) }) }
	t.Cleanup(release)
	d := newTestDriver(t, uc, h.features.With(virtio.FLogAll)&^virtio.FRingPacked.Bit())
	require.True(t, d.features.Has(virtio.FLogAll))
	bm, err := dirty.New(8<<20, &dirty.Options{Shared: true})
	require.NoError(t, err)
	t.Cleanup(func() { bm.Close() })
	require.NoError(t, d.fe.SetLog(bm))
	d.startQueue(0)
	var dq *vring.DeviceQueue
	select {
	case dq = <-h.started:
	case <-time.After(10 * time.Second):
		t.Fatal("queue 0 never started")
	}
	rx := d.postRx(1)

	// The "device" writes the buffer and logs it, without pushing. The
	// test owns dq until it closes done.
	var c vring.Chain
	ok, err := dq.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	copy(c.Segs[0].Buf, "written by the device")
	require.NoError(t, dq.LogChain(&c, 21))
	page := uint64(rx[0]) / dirty.DefaultPageSize
	assert.False(t, bm.PageDirty(page), "the mark was expected to wait in the ring's cache")
	release()

	_, err = d.fe.QueueBase(0) // GET_VRING_BASE: the back-end stops the ring
	require.NoError(t, err)
	assert.True(t, bm.PageDirty(page), "a page the device wrote is missing from the log after GET_VRING_BASE")
}

// TestBackendStopsQueuesBeforeClosingOnCancel: when ServeConn's context
// ends, the front-end must not see the connection end while a ring still
// runs. QEMU then takes the rings' positions from guest memory and hands
// them to the next back-end; a ring that moved after that would have its
// chains processed twice (duplicated frames after a reconnect). The
// handler's StopQueue is held by the test: the socket must stay open
// until it is released, then close.
func TestBackendStopsQueuesBeforeClosingOnCancel(t *testing.T) {
	h := &handDriven{
		features: vhostusertest.New(vhostusertest.Loopback, [6]byte{}).Features(),
		started:  make(chan *vring.DeviceQueue, 1),
		done:     make(chan struct{}),
		stopping: make(chan struct{}, 1),
		dqs:      map[int]*vring.DeviceQueue{},
	}
	fe, be := socketpair(t)
	backend := NewBackend(h, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served, finished := make(chan error, 1), make(chan struct{})
	go func() { served <- backend.ServeConn(ctx, be); close(finished) }()
	var once sync.Once
	release := func() { once.Do(func() { close(h.done) }) }
	t.Cleanup(func() {
		release()
		cancel()
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Error("ServeConn did not return")
		}
	})
	d := newTestDriver(t, fe, h.features&^virtio.FRingPacked.Bit())
	d.startQueue(0)
	select {
	case <-h.started:
	case <-time.After(10 * time.Second):
		t.Fatal("queue 0 never started")
	}

	cancel()
	select { // the session's teardown has reached StopQueue(0), which waits for the test
	case <-h.stopping:
	case <-time.After(10 * time.Second):
		t.Fatal("the back-end did not stop queue 0 after its context ended")
	}
	buf := make([]byte, 64)
	require.NoError(t, fe.SetReadDeadline(time.Now().Add(300*time.Millisecond)))
	_, err := fe.Read(buf)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded, "the connection ended while queue 0 was still being stopped")
	select {
	case err := <-served:
		t.Fatalf("ServeConn returned before its queues stopped: %v", err)
	default:
	}

	release()
	require.NoError(t, fe.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, err = fe.Read(buf)
	require.ErrorIs(t, err, io.EOF, "the connection closes once the queues have stopped")
	select {
	case err := <-served:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConn did not return")
	}
}

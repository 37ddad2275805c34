package vhostuser

import (
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// orderHandler is a softnet device that records every StartQueue and
// StopQueue and flags the two orders that lose looped-back frames: a
// receive queue (2k) stopping while its transmit queue (2k+1) still runs
// (the transmit worker completes chains whose replies the stopped receive
// queue drops), and a transmit queue starting while its receive queue,
// started before, is still stopped.
type orderHandler struct {
	*softnet.Device

	mu         sync.Mutex
	running    map[int]bool
	everRx     map[int]bool
	events     []string
	violations []string
}

func newOrderHandler(t *testing.T) *orderHandler {
	sn, err := softnet.New(&softnet.Options{MaxQueueSize: 1024})
	require.NoError(t, err)
	return &orderHandler{Device: sn, running: map[int]bool{}, everRx: map[int]bool{}}
}

func (h *orderHandler) StartQueue(q int, dq *vring.DeviceQueue, kick, call *vdpa.EventFD) error {
	if err := h.Device.StartQueue(q, dq, kick, call); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if q%2 == 1 && h.everRx[q-1] && !h.running[q-1] {
		h.violations = append(h.violations, fmt.Sprintf("transmitq %d started before receiveq %d", q, q-1))
	}
	if q%2 == 0 {
		h.everRx[q] = true
	}
	h.running[q] = true
	h.events = append(h.events, fmt.Sprint("start ", q))
	return nil
}

func (h *orderHandler) StopQueue(q int) (vring.QueueState, error) {
	h.mu.Lock()
	if q%2 == 0 && h.running[q+1] {
		h.violations = append(h.violations, fmt.Sprintf("receiveq %d stopped while transmitq %d runs", q, q+1))
	}
	h.running[q] = false
	h.events = append(h.events, fmt.Sprint("stop ", q))
	h.mu.Unlock()
	return h.Device.StopQueue(q)
}

func (h *orderHandler) Reset() {
	h.mu.Lock()
	for q, r := range h.running {
		if r && q%2 == 0 && h.running[q+1] {
			h.violations = append(h.violations, fmt.Sprintf("reset with receiveq %d and transmitq %d running", q, q+1))
		}
		h.running[q] = false
	}
	h.mu.Unlock()
	h.Device.Reset()
}

// take returns and clears the recorded events and violations.
func (h *orderHandler) take() (events, violations []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	events, violations = h.events, h.violations
	h.events, h.violations = nil, nil
	return events, violations
}

// Whenever the back-end stops a running receive/transmit pair on its own
// account (to apply a message that changes a running ring), or the
// front-end suspends or resets the device, the transmit queue stops before
// its receive queue and starts after it, so a frame the transmit queue
// completes is never looped into a stopped receive queue. These are the
// orders that lost frames in mdev's migration over vhost-user
// (SET_LOG_BASE, then SET_VRING_ADDR with the log flag, stopped receiveq 0
// first; Frontend.Suspend stopped ring 0 first).
func TestStopOrderTransmitBeforeReceive(t *testing.T) {
	type driver = testDriver
	tests := []struct {
		name    string
		do      func(t *testing.T, d *driver)
		restart bool // the pair runs again afterwards
	}{
		{"SET_LOG_BASE restarts tx first out, rx first in", func(t *testing.T, d *driver) {
			bm, err := dirty.New(8<<20, &dirty.Options{Shared: true})
			require.NoError(t, err)
			t.Cleanup(func() { bm.Close() })
			require.NoError(t, d.fe.SetLog(bm))
		}, true},
		{"SET_FEATURES with LOG_ALL restarts tx first out, rx first in", func(t *testing.T, d *driver) {
			require.NoError(t, d.fe.SetFeatures(d.features.With(virtio.FLogAll)))
		}, true},
		{"SET_MEM_TABLE restarts tx first out, rx first in", func(t *testing.T, d *driver) {
			require.NoError(t, d.fe.SetMemory(d.mem))
		}, true},
		{"SET_VRING_ADDR of the receive queue stops its transmit queue first", func(t *testing.T, d *driver) {
			l := d.layouts[0]
			require.NoError(t, d.fe.SetQueueAddr(0, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used}))
		}, true},
		{"SET_VRING_CALL of the receive queue stops its transmit queue first", func(t *testing.T, d *driver) {
			require.NoError(t, d.fe.SetQueueCall(0, d.calls[0]))
		}, true},
		{"SET_VRING_KICK of the receive queue stops its transmit queue first", func(t *testing.T, d *driver) {
			require.NoError(t, d.fe.SetQueueKick(0, d.kicks[0]))
		}, true},
		{"Suspend stops the transmit queue first, Resume starts it last", func(t *testing.T, d *driver) {
			require.NoError(t, d.fe.Suspend())
			require.NoError(t, d.fe.Resume())
		}, true},
		{"reset stops the transmit queue first", func(t *testing.T, d *driver) {
			require.NoError(t, d.fe.SetStatus(0))
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newOrderHandler(t)
			be, uc, _ := startBackend(t, h, nil)
			d := newTestDriver(t, uc, virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC))
			d.startQueue(0)
			d.startQueue(1)
			require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
			require.Equal(t, 2, be.Info().RunningQueues)
			h.take()

			tc.do(t, d)
			// GET_STATUS is answered after every message before it.
			_, err := d.fe.Status()
			require.NoError(t, err)

			events, violations := h.take()
			assert.Empty(t, violations, "events %v", events)
			require.NotEmpty(t, events, "the message did not stop the pair")
			assert.Equal(t, "stop 1", events[0], "events %v", events)
			if tc.restart {
				assert.Equal(t, 2, be.Info().RunningQueues)
				assert.Equal(t, "start 1", events[len(events)-1], "events %v", events)
			}
		})
	}
}

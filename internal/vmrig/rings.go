package vmrig

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Queue indices of a one-pair virtio-net device (virtio 1.2 §5.1.2).
const (
	RxQueue = 0
	TxQueue = 1
)

// reclaimLimit bounds how long Reclaim waits for the device; it only
// guards against a hang.
const reclaimLimit = 30 * time.Second

// RingLayout places the receive and transmit rings and their buffers in
// guest memory. Index 0 is the receive queue, 1 the transmit queue. Each
// queue has QueueSize buffers of BufSize bytes from its Buf address on.
type RingLayout struct {
	Ring      [2]vring.GuestAddr // split-ring areas, contiguous (vring.ContiguousLayout)
	Buf       [2]vring.GuestAddr
	BufSize   uint32
	QueueSize uint16
}

// QueueSetter is a device whose queues are set up in one call, as
// kernel.Device and vhostnet.Device are.
type QueueSetter interface {
	SetupQueue(q int, l vring.Layout, st vdpa.QueueState, kick, call *vdpa.EventFD) error
}

// Rings is the driver side of a virtio-net device's receive and transmit
// queues: driver rings in guest memory, their kick and call eventfds, and
// the buffers in flight. Receive buffers are device-writable, transmit
// buffers carry a zero virtio-net header before each frame.
type Rings struct {
	t    testing.TB
	Mem  *vring.Memory
	Q    [2]*vring.DriverQueue
	Kick [2]*vdpa.EventFD
	Call [2]*vdpa.EventFD
	lay  RingLayout
	bufs [2]map[uint16]vring.GuestAddr // head -> buffer
	free [2][]int                      // free buffer slots
}

// NewRings makes the eventfds of both queues (closed when the test ends).
// Setup then creates the rings.
func NewRings(t testing.TB, mem *vring.Memory, lay RingLayout) *Rings {
	t.Helper()
	r := &Rings{t: t, Mem: mem, lay: lay}
	for q := range 2 {
		r.Kick[q], r.Call[q] = NewEventFD(t), NewEventFD(t)
	}
	return r
}

// Layout is queue q's split-ring layout.
func (r *Rings) Layout(q int) vring.Layout {
	return vring.ContiguousLayout(r.lay.Ring[q], r.lay.QueueSize)
}

// Setup (re)creates both driver rings for the negotiated features,
// forgetting every buffer in flight, and programs dev's queues with them,
// starting from rx and tx.
func (r *Rings) Setup(dev QueueSetter, features virtio.Features, rx, tx vdpa.QueueState) {
	r.t.Helper()
	for q, st := range []vdpa.QueueState{rx, tx} {
		l := r.Layout(q)
		dq, err := vring.NewDriverQueue(r.Mem, vring.DriverQueueOptions{Index: q, Layout: l, Features: features})
		require.NoError(r.t, err)
		r.Q[q] = dq
		r.bufs[q] = map[uint16]vring.GuestAddr{}
		r.free[q] = r.free[q][:0]
		for s := range int(r.lay.QueueSize) {
			r.free[q] = append(r.free[q], s)
		}
		require.NoError(r.t, dev.SetupQueue(q, l, st, r.Kick[q], r.Call[q]))
	}
}

// slot takes a free buffer of queue q.
func (r *Rings) slot(q int) vring.GuestAddr {
	r.t.Helper()
	n := len(r.free[q])
	require.Positive(r.t, n, "queue %d has no free buffer slot", q)
	s := r.free[q][n-1]
	r.free[q] = r.free[q][:n-1]
	return r.lay.Buf[q] + vring.GuestAddr(s)*vring.GuestAddr(r.lay.BufSize)
}

func (r *Rings) publish(q int) {
	r.t.Helper()
	r.Q[q].Publish()
	if r.Q[q].NeedsKick() {
		require.NoError(r.t, r.Kick[q].Signal())
	}
}

// PostRx adds n device-writable receive buffers, kicks when the device
// asks for it, and returns the buffers' addresses.
func (r *Rings) PostRx(n int) []vring.GuestAddr {
	r.t.Helper()
	var addrs []vring.GuestAddr
	for range n {
		addr := r.slot(RxQueue)
		head, err := r.Q[RxQueue].Add([]vring.Buffer{{Addr: addr, Len: r.lay.BufSize, Writable: true}})
		require.NoError(r.t, err)
		r.bufs[RxQueue][head] = addr
		addrs = append(addrs, addr)
	}
	r.publish(RxQueue)
	return addrs
}

// Send writes each frame behind a zero virtio-net header into a transmit
// buffer, publishes them and kicks when the device asks for it. It
// returns the bytes the device reads.
func (r *Rings) Send(frames ...[]byte) [][]byte {
	r.t.Helper()
	var out [][]byte
	for _, f := range frames {
		pkt := append(make([]byte, virtio.NetHdrSize), f...)
		addr := r.slot(TxQueue)
		require.NoError(r.t, r.Mem.Write(addr, pkt))
		head, err := r.Q[TxQueue].Add([]vring.Buffer{{Addr: addr, Len: uint32(len(pkt))}})
		require.NoError(r.t, err)
		r.bufs[TxQueue][head] = addr
		out = append(out, pkt)
	}
	r.publish(TxQueue)
	return out
}

// Used is a buffer the device returned: where it was and, on the receive
// queue, the bytes the device wrote into it (empty on the transmit queue).
type Used struct {
	Addr vring.GuestAddr
	Data []byte
}

// Reclaim waits for n used entries on queue q, in order, and frees their
// buffers. A head the driver never added, a receive length larger than
// the buffer or no interrupt in time fails the test.
func (r *Rings) Reclaim(q, n int) []Used {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), reclaimLimit)
	defer cancel()
	var out []Used
	for len(out) < n {
		head, length, ok, err := r.Q[q].Reclaim()
		require.NoError(r.t, err)
		if !ok {
			_, err := r.Call[q].Wait(ctx)
			require.NoError(r.t, err, "waiting for %d used entries on queue %d, have %d", n, q, len(out))
			continue
		}
		addr, known := r.bufs[q][head]
		require.True(r.t, known, "queue %d: used head %d was never added", q, head)
		delete(r.bufs[q], head)
		r.free[q] = append(r.free[q], int((addr-r.lay.Buf[q])/vring.GuestAddr(r.lay.BufSize)))
		u := Used{Addr: addr, Data: make([]byte, length)}
		if q == RxQueue {
			require.LessOrEqual(r.t, length, r.lay.BufSize)
			require.NoError(r.t, r.Mem.Read(addr, u.Data))
		}
		out = append(out, u)
	}
	return out
}

// UsedIdx reads queue q's used.idx from guest memory.
func (r *Rings) UsedIdx(q int) uint16 {
	r.t.Helper()
	var b [2]byte
	require.NoError(r.t, r.Mem.Read(r.Layout(q).Used+2, b[:]))
	return uint16(b[0]) | uint16(b[1])<<8
}

package softnet_test

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

// stack is a softnet device behind vdpa.Local with vringtest drivers on
// every queue, all in one memfd of guest memory: the whole virtio stack in
// one process.
type stack struct {
	t        testing.TB
	dev      *softnet.Device
	local    *vdpa.Local
	mem      *vring.Memory
	features virtio.Features
	hdrLen   int
	drv      []*vringtest.Driver
	layouts  []vring.Layout
	kick     []*vdpa.EventFD
	call     []*vdpa.EventFD
	fds      []int // peerFiles: the file behind each queue's region
	ringSize uint64
}

type stackOptions struct {
	dev      softnet.Options
	features virtio.Features // negotiated; zero means everything offered
	size     uint16
	slot     uint32
	indirect bool
	base     vring.GuestAddr
	// peerFiles gives each queue (rings, then data) its own memfd region
	// mapped with NewFdRegion and left unsealed, like memory from a peer
	// that may truncate it: stack.fds holds the files.
	peerFiles bool
}

func newStack(t testing.TB, so stackOptions) *stack {
	t.Helper()
	dev, err := softnet.New(&so.dev)
	require.NoError(t, err)
	l := vdpa.NewLocal(dev, nil)
	offered, err := l.Features()
	require.NoError(t, err)
	f := so.features
	if f == 0 {
		f = offered
	}
	if so.size == 0 {
		so.size = 64
	}
	if so.slot == 0 {
		so.slot = 2048
	}
	nq, err := l.NumQueues()
	require.NoError(t, err)
	// Queues that exist under the negotiated features.
	if !f.Has(virtio.NetFMQ) {
		nq = 2
		if f.Has(virtio.NetFCtrlVQ) {
			nq = 3
		}
	} else if !f.Has(virtio.NetFCtrlVQ) && nq%2 == 1 {
		nq-- // the front-end runs the control queue (FrontendCtrl)
	}
	s := &stack{t: t, dev: dev, local: l, features: f, hdrLen: virtio.NetHdrLen(f)}
	ringBytes := (vring.LayoutBytesFor(so.size, f) + 4095) &^ 4095
	dopts := vringtest.DriverOptions{Layout: vring.Layout{Size: so.size}, SlotSize: so.slot}
	per := ringBytes + (dopts.DataBytes()+4095)&^4095
	s.ringSize = ringBytes
	if so.peerFiles {
		var regions []*vring.Region
		for i := 0; i < nq; i++ {
			fd, err := unix.MemfdCreate("softnet-peer", unix.MFD_CLOEXEC)
			require.NoError(t, err)
			t.Cleanup(func() { unix.Close(fd) })
			require.NoError(t, unix.Ftruncate(fd, int64(per)))
			r, err := vring.NewFdRegion(so.base+vring.GuestAddr(uint64(i)*per), per, fd, 0, &vring.RegionOptions{NoSeal: true})
			require.NoError(t, err)
			regions = append(regions, r)
			s.fds = append(s.fds, fd)
		}
		s.mem, err = vring.NewMemory(regions...)
		require.NoError(t, err)
	} else {
		region, err := vring.NewMemfdRegion(so.base, uint64(nq)*per, &vring.RegionOptions{Name: "softnet-test"})
		require.NoError(t, err)
		s.mem, err = vring.NewMemory(region)
		require.NoError(t, err)
	}
	t.Cleanup(func() { s.mem.Close() })

	require.NoError(t, l.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver))
	require.NoError(t, l.SetFeatures(f))
	require.NoError(t, l.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK))
	st, err := l.Status()
	require.NoError(t, err)
	require.NotZero(t, st&virtio.StatusFeaturesOK, "device refused features %s", f.Format(virtio.DeviceNet))
	require.NoError(t, l.SetMemory(s.mem))
	for i := 0; i < nq; i++ {
		base := so.base + vring.GuestAddr(uint64(i)*per)
		layout := vring.LayoutFor(base, so.size, f)
		d, err := vringtest.NewDriver(s.mem, vringtest.DriverOptions{Index: i, Layout: layout, Features: f,
			Data: base + vring.GuestAddr(ringBytes), SlotSize: so.slot, Indirect: so.indirect})
		require.NoError(t, err)
		kick, err := vdpa.NewEventFD()
		require.NoError(t, err)
		call, err := vdpa.NewEventFD()
		require.NoError(t, err)
		t.Cleanup(func() { kick.Close(); call.Close() })
		s.drv = append(s.drv, d)
		s.layouts = append(s.layouts, layout)
		s.kick = append(s.kick, kick)
		s.call = append(s.call, call)
		require.NoError(t, l.SetQueueNum(i, so.size))
		require.NoError(t, l.SetQueueAddr(i, vdpa.QueueAddr{Desc: layout.Desc, Avail: layout.Avail, Used: layout.Used}))
		require.NoError(t, l.SetQueueKick(i, kick))
		require.NoError(t, l.SetQueueCall(i, call))
		require.NoError(t, l.EnableQueue(i, true))
	}
	require.NoError(t, l.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	t.Cleanup(func() { _ = l.Close() })
	return s
}

// hdr returns a zero virtio-net header of the negotiated size.
func (s *stack) hdr() []byte { return make([]byte, s.hdrLen) }

// postRx makes n receive buffers of size bytes available on queue q.
func (s *stack) postRx(q, n int, size uint32) {
	s.t.Helper()
	for i := 0; i < n; i++ {
		_, err := s.drv[q].Add(nil, []uint32{size})
		require.NoError(s.t, err)
	}
	s.drv[q].Queue.Publish()
	if s.drv[q].Queue.NeedsKick() {
		require.NoError(s.t, s.kick[q].Signal())
	}
}

// send transmits frames on queue q, each as header + frame in separate
// descriptors (how Linux does it without any_layout tricks).
func (s *stack) send(q int, frames ...[]byte) {
	s.t.Helper()
	for _, f := range frames {
		_, err := s.drv[q].Add([][]byte{s.hdr(), f}, nil)
		require.NoError(s.t, err)
	}
	s.drv[q].Queue.Publish()
	if s.drv[q].Queue.NeedsKick() {
		require.NoError(s.t, s.kick[q].Signal())
	}
}

// sendCtrl sends one control command and returns the ack.
func (s *stack) sendCtrl(q int, cmd []byte) byte {
	s.t.Helper()
	_, err := s.drv[q].Add([][]byte{cmd[:2], cmd[2:]}, []uint32{1})
	require.NoError(s.t, err)
	s.drv[q].Queue.Publish()
	if s.drv[q].Queue.NeedsKick() {
		require.NoError(s.t, s.kick[q].Signal())
	}
	c := s.wait(q)
	require.Equal(s.t, uint32(1), c.Len, "ack length")
	return c.Data[0]
}

// wait returns the next completion of queue q. The deadline only guards
// against a hang; nothing here measures time.
func (s *stack) wait(q int) vringtest.Completion {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, ok, err := s.drv[q].Receive()
		require.NoError(s.t, err)
		if ok {
			return c
		}
		if time.Now().After(deadline) {
			// What the device saw and where every goroutine is, so that a
			// rare miss can be told apart: a frame dropped (and why), never
			// transmitted (a worker waiting, or polling other queues), or
			// written but not published.
			buf := make([]byte, 1<<20)
			os.Stderr.Write(buf[:runtime.Stack(buf, true)])
			s.t.Fatalf("queue %d: no completion in 10s; device stats %+v; queue error %v",
				q, s.dev.Stats(), s.dev.QueueErr(q))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
		_, err = s.call[q].Wait(ctx)
		cancel()
		// EventFD.Wait can report the read deadline (set from ctx) before
		// ctx itself expires: both mean "timed out".
		if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, os.ErrDeadlineExceeded) {
			require.NoError(s.t, err)
		}
	}
}

// waitN collects n completions of queue q.
func (s *stack) waitN(q, n int) []vringtest.Completion {
	out := make([]vringtest.Completion, 0, n)
	for len(out) < n {
		out = append(out, s.wait(q))
	}
	return out
}

// recvFrame reassembles one received frame (several completions with
// MRG_RXBUF) and returns its header and frame bytes.
func (s *stack) recvFrame(q int) (virtio.NetHdr, []byte) {
	s.t.Helper()
	c := s.wait(q)
	h, err := virtio.DecodeNetHdr(c.Data, s.hdrLen)
	require.NoError(s.t, err)
	data := append([]byte(nil), c.Data[s.hdrLen:]...)
	if s.features.Has(virtio.NetFMrgRxbuf) {
		for i := 1; i < int(h.NumBuffers); i++ {
			data = append(data, s.wait(q).Data...)
		}
	}
	return h, data
}

// frame builds an Ethernet frame to dst with a sequence number and n bytes
// of payload.
func frame(dst [6]byte, seq uint32, n int) []byte {
	f := make([]byte, 14+4+n)
	copy(f, dst[:])
	copy(f[6:], []byte{0x02, 0xaa, 0, 0, 0, 1})
	binary.BigEndian.PutUint16(f[12:], 0x88b5) // local experimental ethertype
	binary.BigEndian.PutUint32(f[14:], seq)
	for i := range n {
		f[18+i] = byte(int(seq) + i)
	}
	return f
}

func seqOf(f []byte) uint32 { return binary.BigEndian.Uint32(f[14:]) }

var bcast = [6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// TestStopWithPeerDrainingKick stops a transmit queue whose worker sleeps
// on a kick eventfd that the driver's side keeps reading, as QEMU does
// with a vhost-user ring's kick eventfd when it takes the ring back: the
// kick that stop sends to wake the worker can be swallowed, and StopQueue
// must still return.
func TestStopWithPeerDrainingKick(t *testing.T) {
	for round := 0; round < 20; round++ {
		s := newStack(t, stackOptions{})
		fd, err := unix.Dup(s.kick[1].Fd())
		require.NoError(t, err)
		stop := make(chan struct{})
		drained := make(chan struct{})
		go func() {
			defer close(drained)
			var b [8]byte
			for {
				select {
				case <-stop:
					return
				default:
				}
				// Blocking or not (Fd above may have made the shared
				// description blocking), this swallows kicks.
				_, _ = unix.Read(fd, b[:])
				time.Sleep(50 * time.Microsecond)
			}
		}()
		time.Sleep(2 * time.Millisecond) // the worker is asleep in its kick's Wait
		done := make(chan error, 1)
		go func() { _, err := s.dev.StopQueue(1); done <- err }()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: StopQueue did not return with the peer draining the kick eventfd", round)
		}
		close(stop)
		require.NoError(t, s.kick[1].Signal()) // unblocks the peer's read
		<-drained
		unix.Close(fd)
	}
}

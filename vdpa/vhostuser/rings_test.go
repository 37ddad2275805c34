package vhostuser

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// rawSession drives a back-end with hand-made messages, the way a
// front-end that is not this package's Frontend would.
type rawSession struct {
	t   *testing.T
	c   *conn
	be  *Backend
	h   *vhostusertest.Handler
	mem *vring.Memory // the same memory, mapped here for a driver side
}

func newRawSession(t *testing.T) *rawSession {
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
	be, uc, _ := startBackend(t, h, nil)
	return &rawSession{t: t, c: newConn(uc), be: be, h: h}
}

func (s *rawSession) send(r Request, p []byte, fds ...int) {
	require.NoError(s.t, s.c.write(Header{Request: r, Flags: Version}, p, fds))
}

// sync waits until the back-end processed everything sent so far (it
// serves messages in order, so the reply to GET_FEATURES comes after).
func (s *rawSession) sync() {
	s.send(ReqGetFeatures, nil)
	m, err := s.c.read()
	require.NoError(s.t, err)
	require.Equal(s.t, ReqGetFeatures, m.Request)
}

const rawUA = 0x7f0000000000

// setup sends features, a 1 MiB memory table and queue 1's size and
// addresses (inside the table).
func (s *rawSession) setup(f virtio.Features) {
	s.send(ReqSetOwner, nil)
	s.send(ReqSetFeatures, putU64(uint64(f)))
	fd, err := unix.MemfdCreate("raw", unix.MFD_CLOEXEC)
	require.NoError(s.t, err)
	require.NoError(s.t, unix.Ftruncate(fd, 1<<20))
	s.send(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: rawUA}}), fd)
	reg, err := vring.NewFdRegion(0, 1<<20, fd, 0, nil)
	require.NoError(s.t, err)
	require.NoError(s.t, unix.Close(fd))
	s.mem, err = vring.NewMemory(reg)
	require.NoError(s.t, err)
	s.t.Cleanup(func() { s.mem.Close() })
	s.send(ReqSetVringNum, VringState{Index: 1, Num: 64}.Encode())
	s.send(ReqSetVringAddr, VringAddr{Index: 1, Desc: rawUA, Avail: rawUA + 0x1000, Used: rawUA + 0x2000}.Encode())
}

func (s *rawSession) kick(q int) *vdpa.EventFD {
	e, err := vdpa.NewEventFD()
	require.NoError(s.t, err)
	s.t.Cleanup(func() { e.Close() })
	s.send(ReqSetVringKick, putU64(uint64(q)), e.Fd())
	return e
}

func (s *rawSession) running() int {
	s.sync()
	return s.be.Info().RunningQueues
}

// Spec, "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES the ring
// starts directly in the enabled state, on the kick.
func TestRingStartsEnabledWithoutProtocolFeatures(t *testing.T) {
	s := newRawSession(t)
	s.setup(virtio.Features(0).With(virtio.FVersion1))
	assert.Equal(t, 0, s.running(), "no kick yet: stopped")
	s.kick(1)
	assert.Equal(t, 1, s.running())
}

// Spec: with PROTOCOL_FEATURES the ring is initialized disabled and enabled
// by SET_VRING_ENABLE 1; it starts once kicked and enabled, in either order.
func TestRingNeedsEnableWithProtocolFeatures(t *testing.T) {
	s := newRawSession(t)
	s.setup(virtio.Features(0).With(virtio.FVersion1, virtio.FProtocolFeat))
	s.kick(1)
	assert.Equal(t, 0, s.running(), "kicked but disabled")
	s.send(ReqSetVringEnable, VringState{Index: 1, Num: 1}.Encode())
	assert.Equal(t, 1, s.running())
	s.send(ReqSetVringEnable, VringState{Index: 1, Num: 0}.Encode())
	assert.Equal(t, 0, s.running(), "disabled again")
	s.send(ReqSetVringEnable, VringState{Index: 1, Num: 1}.Encode())
	assert.Equal(t, 1, s.running(), "re-enabled without a new kick")
}

// Spec: the back-end stops the ring upon GET_VRING_BASE, replying with the
// next available index; only a new kick starts it again.
func TestRingStopsOnGetVringBase(t *testing.T) {
	s := newRawSession(t)
	s.setup(virtio.Features(0).With(virtio.FVersion1))
	s.send(ReqSetVringBase, VringState{Index: 1, Num: 0}.Encode())
	dq, err := vring.NewDriverQueue(s.mem, vring.DriverQueueOptions{Index: 1,
		Layout: vring.Layout{Size: 64, Desc: 0, Avail: 0x1000, Used: 0x2000}})
	require.NoError(t, err)
	for i := 0; i < 3; i++ {
		_, err := dq.Add([]vring.Buffer{{Addr: vring.GuestAddr(0x10000 + i*0x1000), Len: 100}})
		require.NoError(t, err)
	}
	dq.Publish()
	k := s.kick(1)
	require.NoError(t, k.Signal())
	assert.Equal(t, 1, s.running())
	for n := 0; n < 3; {
		_, _, ok, err := dq.Reclaim()
		require.NoError(t, err)
		if ok {
			n++
		} else {
			runtime.Gosched() // the handler's goroutine consumes them
		}
	}
	s.send(ReqGetVringBase, VringState{Index: 1}.Encode())
	m, err := s.c.read()
	require.NoError(t, err)
	require.True(t, m.IsReply())
	st, err := DecodeVringState(m.Payload)
	require.NoError(t, err)
	assert.Equal(t, VringState{Index: 1, Num: 3}, st, "next avail index after three chains")
	assert.Equal(t, 0, s.running())
	s.kick(1)
	assert.Equal(t, 1, s.running())
}

// A SET_VRING_CALL on a running ring replaces the descriptor: the ring is
// restarted with the new one and keeps running.
func TestRingCallChangeWhileRunning(t *testing.T) {
	s := newRawSession(t)
	s.setup(virtio.Features(0).With(virtio.FVersion1))
	s.kick(1)
	require.Equal(t, 1, s.running())
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	s.send(ReqSetVringCall, putU64(1), e.Fd())
	assert.Equal(t, 1, s.running())
	s.send(ReqSetVringCall, putU64(1|VringNoFd))
	assert.Equal(t, 1, s.running())
}

// SET_VRING_NUM on a running ring is a protocol violation.
func TestRingResizeWhileRunningRejected(t *testing.T) {
	s := newRawSession(t)
	s.setup(virtio.Features(0).With(virtio.FVersion1))
	s.kick(1)
	require.Equal(t, 1, s.running())
	s.send(ReqSetVringNum, VringState{Index: 1, Num: 128}.Encode())
	_, err := s.c.read()
	assert.Error(t, err, "the back-end closes the session")
}

// A new memory table while rings run: they are stopped, remapped and
// restarted at the same position.
func TestRingSurvivesNewMemTable(t *testing.T) {
	s := newRawSession(t)
	s.setup(virtio.Features(0).With(virtio.FVersion1))
	s.kick(1)
	require.Equal(t, 1, s.running())
	fd, err := unix.MemfdCreate("raw2", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	require.NoError(t, unix.Ftruncate(fd, 2<<20))
	s.send(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 2 << 20, UserspaceAddr: rawUA}}), fd)
	require.NoError(t, unix.Close(fd))
	assert.Equal(t, 1, s.running())
	// A table that no longer holds the ring ends the session.
	fd, err = unix.MemfdCreate("raw3", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	require.NoError(t, unix.Ftruncate(fd, 1<<20))
	s.send(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: rawUA + 1<<30}}), fd)
	require.NoError(t, unix.Close(fd))
	_, err = s.c.read()
	assert.Error(t, err)
}

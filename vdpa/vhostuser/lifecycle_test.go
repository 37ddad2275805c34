package vhostuser

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Tests of the session state machine as real front-ends drive it (the
// "Session life cycle" section of the package doc): which messages stop,
// suspend, reset or restart a ring, and what GET_VRING_BASE answers after
// each.

// logRecorder is a slog.Handler that keeps every record as one line
// ("message key=value ..."), for assertions on what the back-end logged
// and for recording message sequences.
type logRecorder struct {
	mu    sync.Mutex
	lines []string
	level slog.Level
}

func (r *logRecorder) Enabled(_ context.Context, l slog.Level) bool { return l >= r.level }
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler           { return r }
func (r *logRecorder) WithGroup(string) slog.Handler                { return r }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s %s", rec.Level, rec.Message)
	rec.Attrs(func(a slog.Attr) bool { fmt.Fprintf(&sb, " %s=%v", a.Key, a.Value); return true })
	r.mu.Lock()
	r.lines = append(r.lines, sb.String())
	r.mu.Unlock()
	return nil
}

func (r *logRecorder) find(s string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, l := range r.lines {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

// lcGuest is a guest's side that outlives back-end sessions: 1 MiB of
// memory and the driver side of queue 1 (64 entries; descriptors at guest
// address 0, avail ring at 0x1000, used ring at 0x2000; buffers from
// 0x10000), as QEMU or DPDK keep them across stop, migration and
// reconnect.
type lcGuest struct {
	t     *testing.T
	memfd int
	mem   *vring.Memory
	dq    *vring.DriverQueue
	kick  *vdpa.EventFD
	sent  int
}

const lcQueue, lcSize = 1, 64

func newLCGuest(t *testing.T) *lcGuest { return newLCGuestWith(t, 0) }

// runningLC connects a fresh guest to a fresh device, negotiates, starts the
// ring and has n chains used on it: the opening of most lifecycle tests.
func runningLC(t *testing.T, n int) (*lcGuest, *lcConn) {
	t.Helper()
	g := newLCGuest(t)
	c := g.connect(lcDevice(t))
	c.negotiate()
	c.startRing(0)
	g.traffic(n)
	return g, c
}

// newLCGuestWith is newLCGuest with the ring format of features f (a
// packed ring with RING_PACKED: descriptor ring at 0, driver area at
// 0x1000, device area at 0x2000).
func newLCGuestWith(t *testing.T, f virtio.Features) *lcGuest {
	fd, err := unix.MemfdCreate("lifecycle", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, 1<<20))
	reg, err := vring.NewFdRegion(0, 1<<20, fd, 0, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	dq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: lcQueue, Features: f,
		Layout: vring.Layout{Size: lcSize, Desc: 0, Avail: 0x1000, Used: 0x2000}})
	require.NoError(t, err)
	require.Equal(t, f.Has(virtio.FRingPacked), dq.Packed(), "ring format")
	kick, err := vdpa.NewEventFD()
	require.NoError(t, err)
	t.Cleanup(func() { kick.Close() })
	return &lcGuest{t: t, memfd: fd, mem: mem, dq: dq, kick: kick}
}

// traffic transmits n chains and waits until the device completed them.
func (g *lcGuest) traffic(n int) {
	g.t.Helper()
	for i := 0; i < n; i++ {
		_, err := g.dq.Add([]vring.Buffer{{Addr: vring.GuestAddr(0x10000 + (g.sent%32)*0x1000), Len: 100}})
		require.NoError(g.t, err)
		g.sent++
	}
	g.dq.Publish()
	require.NoError(g.t, g.kick.Signal())
	deadline := time.Now().Add(10 * time.Second)
	for got := 0; got < n; {
		_, _, ok, err := g.dq.Reclaim()
		require.NoError(g.t, err)
		if ok {
			got++
			continue
		}
		require.True(g.t, time.Now().Before(deadline), "device completed %d of %d chains", got, n)
		time.Sleep(time.Millisecond)
	}
}

// usedIdx reads used.idx from guest memory.
func (g *lcGuest) usedIdx() uint16 {
	var b [2]byte
	require.NoError(g.t, g.mem.Read(0x2002, b[:]))
	return binary.LittleEndian.Uint16(b[:])
}

// availIdx reads avail.idx from guest memory.
func (g *lcGuest) availIdx() uint16 {
	var b [2]byte
	require.NoError(g.t, g.mem.Read(0x1002, b[:]))
	return binary.LittleEndian.Uint16(b[:])
}

// lcConn is one front-end connection to a fresh Backend.
type lcConn struct {
	t    *testing.T
	g    *lcGuest
	c    *conn
	be   *Backend
	done <-chan error
	log  *logRecorder
	// proto is what the front-end sent in SET_PROTOCOL_FEATURES (replay).
	proto ProtocolFeatures
	// kicked lists the queues given a kick in this session (replay).
	kicked map[int]bool
}

func (g *lcGuest) connect(h vdpa.Handler) *lcConn {
	rec := &logRecorder{level: slog.LevelInfo}
	be, uc, done := startBackend(g.t, h, &BackendOptions{Logger: slog.New(rec)})
	return &lcConn{t: g.t, g: g, c: newConn(uc), be: be, done: done, log: rec}
}

// hangUp closes the front-end's end and waits until the back-end ended
// the session (stopped its rings): a back-end that went away.
func (c *lcConn) hangUp() {
	c.t.Helper()
	require.NoError(c.t, c.c.close())
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		c.t.Fatal("session did not end")
	}
}

// endsWith waits until the back-end ends the session with an error
// wrapping want; what names the request that must end it.
func (c *lcConn) endsWith(want error, what string) {
	c.t.Helper()
	select {
	case err := <-c.done:
		require.ErrorIs(c.t, err, want, what)
	case <-time.After(10 * time.Second):
		c.t.Fatalf("the session went on after %s", what)
	}
}

func (c *lcConn) send(r Request, p []byte, fds ...int) {
	c.t.Helper()
	require.NoError(c.t, c.c.write(Header{Request: r, Flags: Version}, p, fds))
}

// call sends a request that has a reply and returns the reply payload.
func (c *lcConn) call(r Request, p []byte) []byte {
	c.t.Helper()
	c.send(r, p)
	m, err := c.c.read()
	require.NoError(c.t, err, "reply to %v", r)
	require.Equal(c.t, r, m.Request)
	require.True(c.t, m.IsReply())
	return m.Payload
}

// base sends GET_VRING_BASE for the guest's queue.
func (c *lcConn) base() uint16 {
	c.t.Helper()
	st, err := DecodeVringState(c.call(ReqGetVringBase, VringState{Index: lcQueue}.Encode()))
	require.NoError(c.t, err)
	return uint16(st.Num)
}

func (c *lcConn) status() virtio.Status {
	return virtio.Status(binary.NativeEndian.Uint64(c.call(ReqGetStatus, nil)))
}

func (c *lcConn) running() int {
	c.call(ReqGetFeatures, nil) // the back-end serves in order
	return c.be.Info().RunningQueues
}

const lcProto = ProtocolFeatures(0) | 1<<PFStatus | 1<<PFResetDevice | 1<<PFReplyAck

var lcFeatures = virtio.Features(0).With(virtio.FVersion1, virtio.FProtocolFeat)

// owner, features, memory table: what QEMU and DPDK send before the rings.
func (c *lcConn) negotiate() {
	c.handshake(lcProto)
	c.send(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: rawUA}}), c.g.memfd)
}

// handshake is negotiate's opening: owner, features and the protocol
// features proto.
func (c *lcConn) handshake(proto ProtocolFeatures) {
	c.send(ReqSetOwner, nil)
	c.call(ReqGetFeatures, nil)
	c.call(ReqGetProtocolFeatures, nil)
	c.send(ReqSetProtocolFeatures, putU64(uint64(proto)))
	c.send(ReqSetFeatures, putU64(uint64(lcFeatures)))
}

// startRing configures the guest's queue with base and starts it (kick,
// enable, DRIVER_OK), in QEMU's order.
func (c *lcConn) startRing(base uint16) {
	c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: lcSize}.Encode())
	c.send(ReqSetVringBase, VringState{Index: lcQueue, Num: uint32(base)}.Encode())
	c.send(ReqSetVringAddr, VringAddr{Index: lcQueue, Desc: rawUA, Avail: rawUA + 0x1000, Used: rawUA + 0x2000}.Encode())
	c.send(ReqSetVringKick, putU64(lcQueue), c.g.kick.Fd())
	c.send(ReqSetVringCall, putU64(lcQueue|VringNoFd))
	c.send(ReqSetVringEnable, VringState{Index: lcQueue, Num: 1}.Encode())
	c.send(ReqSetStatus, putU64(uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK)))
	require.Equal(c.t, 1, c.running(), "ring started")
}

func lcDevice(t *testing.T) *softnet.Device {
	d, err := softnet.New(&softnet.Options{Handler: softnet.Discard})
	require.NoError(t, err)
	return d
}

// TestLifecycleGetVringBaseAfter: what GET_VRING_BASE answers after each
// message that stops a ring. SET_STATUS 0 (QEMU's stop) and
// SET_VRING_ENABLE 0 suspend the ring and keep its position; RESET_DEVICE
// and RESET_OWNER reset the device, and the position with it.
func TestLifecycleGetVringBaseAfter(t *testing.T) {
	const chains = 5
	tests := []struct {
		name   string
		stop   func(c *lcConn)
		want   uint16
		status virtio.Status // GET_STATUS after the stop
	}{
		{"SET_STATUS 0", func(c *lcConn) { c.send(ReqSetStatus, putU64(0)) }, chains, 0},
		{"SET_VRING_ENABLE 0", func(c *lcConn) { c.send(ReqSetVringEnable, VringState{Index: lcQueue}.Encode()) }, chains,
			virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK},
		{"RESET_DEVICE", func(c *lcConn) { c.send(ReqResetDevice, nil) }, 0, 0},
		{"RESET_OWNER", func(c *lcConn) { c.send(ReqResetOwner, nil); c.send(ReqSetOwner, nil) }, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g, c := runningLC(t, chains)
			tc.stop(c)
			assert.Equal(t, 0, c.running(), "ring stopped")
			assert.Equal(t, tc.status, c.status())
			assert.Equal(t, tc.want, c.base(), "GET_VRING_BASE")
			assert.Equal(t, uint16(chains), g.usedIdx(), "used.idx untouched")
		})
	}
}

// TestLifecycleStopCont: QEMU's monitor stop and cont as QEMU 7.2 sends
// them (SET_STATUS 0, GET_VRING_BASE per ring; then the ring set up again
// with the base it got back and SET_STATUS DRIVER_OK): the position
// survives and traffic flows after, in the same session.
func TestLifecycleStopCont(t *testing.T) {
	g, c := runningLC(t, 7)
	for round := 1; round <= 3; round++ {
		c.send(ReqSetStatus, putU64(0))
		got := c.base()
		require.Equal(t, g.availIdx(), got, "round %d: GET_VRING_BASE is the next avail index", round)
		require.Equal(t, g.usedIdx(), got)
		c.send(ReqSetFeatures, putU64(uint64(lcFeatures)))
		c.startRing(got)
		g.traffic(5)
		assert.Equal(t, got+5, g.usedIdx(), "round %d: traffic continues from the saved position", round)
	}
	assert.Empty(t, c.log.find("resynchronised"), "no resync needed")
	assert.Equal(t, 7+3*5, int(g.usedIdx()))
}

// TestLifecycleMigration: the source stops (SET_STATUS 0, GET_VRING_BASE);
// a fresh back-end, on the same guest memory, is configured with the saved
// base (QEMU's destination) and serves on from there.
func TestLifecycleMigration(t *testing.T) {
	g, src := runningLC(t, 9)
	src.send(ReqSetStatus, putU64(0))
	saved := src.base()
	require.Equal(t, uint16(9), saved)
	src.hangUp()

	dst := g.connect(lcDevice(t))
	dst.negotiate()
	dst.startRing(saved)
	g.traffic(4)
	assert.Equal(t, uint16(13), g.usedIdx())
	assert.Empty(t, dst.log.find("resynchronised"))
}

// TestLifecycleBaseDisagreesWithUsed: a SET_VRING_BASE that disagrees
// with used.idx in guest memory, on a fresh back-end (reconnect). The
// back-end resynchronises from used.idx, logs it and keeps serving: the
// session is not ended, and the driver's next chains are served.
func TestLifecycleBaseDisagreesWithUsed(t *testing.T) {
	const used = 11
	tests := []struct {
		name   string
		base   uint16
		resync bool
	}{
		{"agrees", used, false},
		{"fresh base 0 (DPDK virtio-user server=1 reconnect)", 0, true},
		{"ahead of used.idx (chains a dead back-end took)", used + 3, true},
		{"behind used.idx", used - 4, true},
		{"impossibly far ahead", used + 1000, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g, first := runningLC(t, used)
			first.hangUp() // the front-end or back-end went away

			c := g.connect(lcDevice(t))
			c.negotiate()
			c.startRing(tc.base)
			logged := c.log.find("resynchronised")
			if tc.resync {
				require.Len(t, logged, 1, "one warning")
				assert.Contains(t, logged[0], fmt.Sprintf("base=%d used_idx=%d", tc.base, used))
			} else {
				assert.Empty(t, logged)
			}
			g.traffic(6)
			assert.Equal(t, uint16(used+6), g.usedIdx())
			c.send(ReqSetStatus, putU64(0))
			assert.Equal(t, uint16(used+6), c.base())
			select {
			case err := <-c.done:
				t.Fatalf("session ended: %v", err)
			default:
			}
		})
	}
}

// TestLifecycleOwner: SET_OWNER marks a session's start but gates
// nothing (the spec does not have the back-end refuse requests before it).
// Sequences real front-ends send must be served: DPDK 22.11's virtio-user
// (server=1) reconnecting never sends SET_OWNER and starts with
// SET_VRING_ENABLE 0 and GET_VRING_BASE; QEMU sends one SET_OWNER per queue
// pair on one connection, after negotiating features.
func TestLifecycleOwner(t *testing.T) {
	tests := []struct {
		name  string
		open  func(c *lcConn)
		noted bool // "without SET_OWNER" logged
	}{
		{"DPDK reconnect: no SET_OWNER", func(c *lcConn) {
			c.send(ReqSetVringEnable, VringState{Index: 0}.Encode())
			c.send(ReqSetVringEnable, VringState{Index: lcQueue}.Encode())
			assert.Zero(t, c.base(), "GET_VRING_BASE of a ring never started")
			c.call(ReqGetFeatures, nil)
			c.call(ReqGetProtocolFeatures, nil)
			c.send(ReqSetProtocolFeatures, putU64(uint64(lcProto)))
			c.send(ReqSetFeatures, putU64(uint64(lcFeatures)))
			c.send(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: rawUA}}), c.g.memfd)
		}, true},
		{"QEMU: negotiation, then one SET_OWNER per queue pair", func(c *lcConn) {
			c.call(ReqGetFeatures, nil)
			c.call(ReqGetProtocolFeatures, nil)
			c.send(ReqSetProtocolFeatures, putU64(uint64(lcProto|1<<PFMQ)))
			c.call(ReqGetQueueNum, nil)
			c.negotiate()
			c.send(ReqSetOwner, nil)
		}, false},
		{"RESET_OWNER, then SET_OWNER again", func(c *lcConn) {
			c.negotiate()
			c.send(ReqResetOwner, nil)
			c.negotiate()
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g := newLCGuest(t)
			c := g.connect(lcDevice(t))
			tc.open(c)
			c.startRing(0)
			g.traffic(3)
			assert.Equal(t, uint16(3), g.usedIdx())
			if tc.noted {
				assert.Len(t, c.log.find("without SET_OWNER"), 1, "noted once")
			} else {
				assert.Empty(t, c.log.find("without SET_OWNER"))
			}
			select {
			case err := <-c.done:
				t.Fatalf("session ended: %v", err)
			default:
			}
		})
	}
}

// failStop is a softnet device whose StopQueue fails once, for queue 1,
// without stopping it: the handler keeps using the DeviceQueue.
type failStop struct {
	*softnet.Device
	mu   sync.Mutex
	fail bool
	dq   *vring.DeviceQueue // of the last StartQueue of lcQueue
}

func (f *failStop) StartQueue(q int, dq *vring.DeviceQueue, kick, call *vdpa.EventFD) error {
	if q == lcQueue {
		f.mu.Lock()
		f.dq = dq
		f.mu.Unlock()
	}
	return f.Device.StartQueue(q, dq, kick, call)
}

func (f *failStop) started() *vring.DeviceQueue {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dq
}

func (f *failStop) StopQueue(q int) (vring.QueueState, error) {
	f.mu.Lock()
	fail := f.fail && q == lcQueue
	f.fail = false
	f.mu.Unlock()
	if fail {
		return vring.QueueState{}, errors.New("stuck")
	}
	return f.Device.StopQueue(q)
}

// failingStopAfterTraffic connects a guest to a handler whose next
// StopQueue of the guest's queue fails, and runs 4 chains through it.
func failingStopAfterTraffic(t *testing.T) (*lcGuest, *failStop, *lcConn) {
	t.Helper()
	g := newLCGuest(t)
	h := &failStop{Device: lcDevice(t), fail: true}
	c := g.connect(h)
	c.negotiate()
	c.startRing(0)
	g.traffic(4)
	return g, h, c
}

// mappingsOf counts this process's mappings of the file open as fd.
func mappingsOf(t *testing.T, fd int) int {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Fstat(fd, &st))
	b, err := os.ReadFile("/proc/self/maps")
	require.NoError(t, err)
	// address perms offset dev(major:minor, hex) inode path
	dev := fmt.Sprintf("%02x:%02x", unix.Major(st.Dev), unix.Minor(st.Dev))
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 5 && f[3] == dev && f[4] == strconv.FormatUint(st.Ino, 10) {
			n++
		}
	}
	return n
}

// A handler whose StopQueue failed may still drive the queue, in the
// guest memory it was started on. A new memory table (or log) replaces the
// back-end's mapping, but the old one stays mapped, and usable by the
// handler, until a reset stops the handler; then it goes. (Unmapped at
// once, a worker still writing would land in whatever mapping reuses the
// addresses.)
func TestLifecycleStopQueueFailsKeepsMemoryUntilReset(t *testing.T) {
	g, h, c := failingStopAfterTraffic(t)
	ours := mappingsOf(t, g.memfd) // the test's mapping and the back-end's
	c.base()                       // StopQueue fails: the queue is an orphan
	require.NotEmpty(t, c.log.find("queue broken until reset"))
	orphan := h.started()
	require.NotNil(t, orphan)

	table := EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: rawUA}})
	c.send(ReqSetMemTable, table, g.memfd)
	c.call(ReqGetFeatures, nil) // the back-end serves in order
	assert.Equal(t, ours+1, mappingsOf(t, g.memfd), "the orphan's memory stays mapped beside the new table")
	require.NoError(t, vring.Guard(func() error { _ = orphan.Snapshot(); return nil }),
		"the handler can still reach its queue's memory")
	// Tables the orphan never used go at once: what is held back stays
	// bounded however often the front-end sends a table.
	for range 3 {
		c.send(ReqSetMemTable, table, g.memfd)
	}
	c.call(ReqGetFeatures, nil)
	assert.Equal(t, ours+1, mappingsOf(t, g.memfd), "only the orphan's table is held back")

	c.send(ReqResetDevice, nil)
	c.call(ReqGetFeatures, nil)
	assert.Equal(t, ours, mappingsOf(t, g.memfd), "after the reset the old mapping is gone")
	c.send(ReqSetFeatures, putU64(uint64(lcFeatures)))
	c.startRing(4)
	g.traffic(2)
	assert.Equal(t, uint16(6), g.usedIdx())
}

// TestLifecycleStopQueueFails: a handler whose StopQueue fails may still
// own the queue. The back-end must not read the queue's state (a data race
// under -race), must report the device's published position (used.idx) as
// the base, must not start the ring again on the next kick (the handler
// still runs it), and reports DEVICE_NEEDS_RESET until RESET_DEVICE; the
// session lives on.
func TestLifecycleStopQueueFails(t *testing.T) {
	g, _, c := failingStopAfterTraffic(t)
	assert.Equal(t, uint16(4), c.base(), "used.idx")
	require.NotEmpty(t, c.log.find("queue broken until reset"))
	c.send(ReqSetVringKick, putU64(lcQueue), g.kick.Fd())
	assert.Equal(t, 0, c.running(), "a broken ring does not start")
	assert.NotZero(t, c.status()&virtio.StatusDeviceNeedsReset, "DEVICE_NEEDS_RESET")
	c.send(ReqResetDevice, nil)
	assert.Zero(t, c.status())
	c.send(ReqSetFeatures, putU64(uint64(lcFeatures)))
	c.startRing(4)
	g.traffic(2)
	assert.Equal(t, uint16(6), g.usedIdx())
	select {
	case err := <-c.done:
		t.Fatalf("session ended: %v", err)
	default:
	}
}

// TestLifecycleMemTableOverStoppedRing: a front-end that moves guest
// memory (QEMU after a memory hot-unplug or remap, DPDK after it frees the
// hugepages of a reconfigured queue) sends the new SET_MEM_TABLE before the
// new SET_VRING_ADDR. A ring stopped by GET_VRING_BASE keeps its old
// addresses until then; they are no reason to refuse the table (Linux
// vhost checks only the rings it runs), and the ring starts on its new
// addresses. A running ring whose rings the new table leaves out still
// ends the session: it cannot go on.
func TestLifecycleMemTableOverStoppedRing(t *testing.T) {
	const movedUA = rawUA + 1<<30 // the same guest memory, mapped elsewhere
	moved := EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: movedUA}})

	t.Run("stopped ring", func(t *testing.T) {
		g, c := runningLC(t, 3)
		c.send(ReqSetStatus, putU64(0))
		got := c.base()
		require.Equal(t, uint16(3), got)
		c.send(ReqSetMemTable, moved, c.g.memfd)
		require.Equal(t, 0, c.running(), "the session goes on") // running() makes a round trip
		c.send(ReqSetFeatures, putU64(uint64(lcFeatures)))
		c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: lcSize}.Encode())
		c.send(ReqSetVringBase, VringState{Index: lcQueue, Num: uint32(got)}.Encode())
		c.send(ReqSetVringAddr, VringAddr{Index: lcQueue, Desc: movedUA, Avail: movedUA + 0x1000, Used: movedUA + 0x2000}.Encode())
		c.send(ReqSetVringKick, putU64(lcQueue), c.g.kick.Fd())
		c.send(ReqSetVringEnable, VringState{Index: lcQueue, Num: 1}.Encode())
		c.send(ReqSetStatus, putU64(uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK)))
		require.Equal(t, 1, c.running(), "ring started on its new addresses")
		g.traffic(4)
		assert.Equal(t, uint16(7), g.usedIdx())
	})

	t.Run("running ring", func(t *testing.T) {
		_, c := runningLC(t, 3)
		c.send(ReqSetMemTable, moved, c.g.memfd)
		c.endsWith(ErrAddrNotMapped, "a running ring outside guest memory")
	})
}

// TestAccessPlatformNotOffered: a handler that offers
// VIRTIO_F_ACCESS_PLATFORM (softnet with AccessPlatform, as for VDUSE) is
// served without it. The back-end has no IOTLB (PROTOCOL_F_IOMMU), so
// with the feature it would read I/O virtual addresses as guest-physical
// ones; a front-end that sets it anyway is refused.
func TestAccessPlatformNotOffered(t *testing.T) {
	d, err := softnet.New(&softnet.Options{Handler: softnet.Discard, AccessPlatform: true})
	require.NoError(t, err)
	require.True(t, d.Features().Has(virtio.FAccessPlatform), "the handler offers it")
	g := newLCGuest(t)
	c := g.connect(d)
	f := virtio.Features(binary.NativeEndian.Uint64(c.call(ReqGetFeatures, nil)))
	assert.False(t, f.Has(virtio.FAccessPlatform), "GET_FEATURES %v", f)
	assert.True(t, f.Has(virtio.FVersion1))
	c.send(ReqSetFeatures, putU64(uint64(lcFeatures.With(virtio.FAccessPlatform))))
	c.endsWith(ErrProtocol, "SET_FEATURES with ACCESS_PLATFORM")
}

// TestGetConfigFailureIsEmpty: a GET_CONFIG the back-end cannot answer
// (beyond the configuration space) gets "a zero length of payload to
// indicate an error" (vhost-user.rst): a reply whose header says 0 bytes,
// not a config header. The session goes on and answers the next read.
func TestGetConfigFailureIsEmpty(t *testing.T) {
	mac := [6]byte{2, 0, 0, 0, 0, 0x2b}
	d, err := softnet.New(&softnet.Options{Handler: softnet.Discard, MAC: mac})
	require.NoError(t, err)
	c := newLCGuest(t).connect(d)
	c.send(ReqSetProtocolFeatures, putU64(uint64(lcProto|1<<PFConfig)))
	for _, tc := range []struct {
		off, n int
		want   []byte // nil: the read fails
	}{
		{0, 6, mac[:]},
		{d.ConfigSize(), 1, nil},
		{d.ConfigSize() - 2, 4, nil},
		{1, 2, mac[1:3]},
	} {
		p := c.call(ReqGetConfig, Config{Offset: uint32(tc.off), Data: make([]byte, tc.n)}.Encode())
		if tc.want == nil {
			assert.Empty(t, p, "read %d+%d beyond %d bytes", tc.off, tc.n, d.ConfigSize())
			continue
		}
		cfg, err := DecodeConfig(p)
		require.NoError(t, err)
		assert.Equal(t, tc.want, cfg.Data, "read %d+%d", tc.off, tc.n)
	}
}

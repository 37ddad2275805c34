package vhostuser

import (
	"bufio"
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/vhostcore"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Replays of the message sequences under testdata/lifecycle (see its
// README) against the Backend, with a driver on real shared memory: the
// sequences real front-ends send for start, stop, cont, migration and
// reconnect must keep ring positions (GET_VRING_BASE answers the driver's
// avail.idx; used.idx continues after resume) and traffic must flow after.

// fixtureLine is one request of a fixture.
type fixtureLine struct {
	req   Request
	args  []string          // positional arguments
	kv    map[string]string // key=value arguments
	nofd  bool
	reply bool // need_reply
	line  int
}

func parseFixture(t *testing.T, name string) []fixtureLine {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", "lifecycle", name))
	require.NoError(t, err)
	defer f.Close()
	byName := map[string]Request{}
	for r := ReqGetFeatures; r <= reqMax; r++ {
		byName[r.String()] = r
	}
	var out []fixtureLine
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		text, _, _ := strings.Cut(sc.Text(), "#")
		fs := strings.Fields(text)
		if len(fs) == 0 {
			continue
		}
		r, ok := byName[fs[0]]
		require.True(t, ok, "%s:%d: unknown request %q", name, n, fs[0])
		l := fixtureLine{req: r, kv: map[string]string{}, line: n}
		for _, a := range fs[1:] {
			switch {
			case a == "nofd":
				l.nofd = true
			case a == "need_reply":
				l.reply = true
			case strings.Contains(a, "="):
				k, v, _ := strings.Cut(a, "=")
				l.kv[k] = v
			default:
				l.args = append(l.args, a)
			}
		}
		out = append(out, l)
	}
	require.NoError(t, sc.Err())
	return out
}

func (l fixtureLine) num(t *testing.T, i int) uint64 {
	t.Helper()
	require.Greater(t, len(l.args), i, "line %d: %v needs argument %d", l.line, l.req, i)
	v, err := strconv.ParseUint(l.args[i], 0, 64)
	require.NoError(t, err, "line %d", l.line)
	return v
}

// rpGuest is the guest side of a replay: 1 MiB of memory holding up to
// rpQueues split rings of rpSize entries (queue q at q*0x4000: descriptors,
// avail ring +0x1000, used ring +0x2000), a driver for each, and the
// eventfds a front-end would pass. It outlives back-end sessions.
type rpGuest struct {
	t      *testing.T
	memfd  int
	mem    *vring.Memory
	dqs    [rpQueues]*vring.DriverQueue
	kicks  [rpQueues]*vdpa.EventFD
	calls  [rpQueues]*vdpa.EventFD
	log    *dirty.Bitmap
	saved  [rpQueues]uint32 // the last GET_VRING_BASE answer per queue
	sent   [rpQueues]int
	nextTx int
	// features decide the rings' format: packed rings with RING_PACKED
	// (the fixtures of a packed=on QEMU negotiate it).
	features virtio.Features
}

const rpQueues, rpSize = 4, 64

func rpLayout(q int) vring.Layout {
	b := vring.GuestAddr(q * 0x4000)
	return vring.Layout{Size: rpSize, Desc: b, Avail: b + 0x1000, Used: b + 0x2000}
}

func newRPGuest(t *testing.T) *rpGuest { return newRPGuestWith(t, 0) }

func newRPGuestWith(t *testing.T, f virtio.Features) *rpGuest {
	fd, err := unix.MemfdCreate("replay", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, 1<<20))
	reg, err := vring.NewFdRegion(0, 1<<20, fd, 0, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	g := &rpGuest{t: t, memfd: fd, mem: mem, features: f}
	for q := 0; q < rpQueues; q++ {
		g.dqs[q], err = vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: q, Layout: rpLayout(q), Features: f})
		require.NoError(t, err)
		g.kicks[q], err = vdpa.NewEventFD()
		require.NoError(t, err)
		g.calls[q], err = vdpa.NewEventFD()
		require.NoError(t, err)
		k, c := g.kicks[q], g.calls[q]
		t.Cleanup(func() { k.Close(); c.Close() })
	}
	g.log, err = dirty.New(1<<20, &dirty.Options{Shared: true})
	require.NoError(t, err)
	t.Cleanup(func() { g.log.Close() })
	return g
}

func (g *rpGuest) idx(q int, off vring.GuestAddr) uint16 {
	var b [2]byte
	require.NoError(g.t, g.mem.Read(off+2, b[:]))
	return binary.LittleEndian.Uint16(b[:])
}

func (g *rpGuest) availIdx(q int) uint16 { return g.idx(q, rpLayout(q).Avail) }
func (g *rpGuest) usedIdx(q int) uint16  { return g.idx(q, rpLayout(q).Used) }

func (g *rpGuest) packed() bool { return g.features.Has(virtio.FRingPacked) }

// base is the GET_VRING_BASE answer queue q must get, every chain having
// been completed: the driver's avail.idx for a split ring; for a packed
// ring the word with avail and used at the same position, index sent mod
// rpSize with the wrap counter that started at 1 and flips every lap.
func (g *rpGuest) base(q int) uint32 {
	if !g.packed() {
		return uint32(g.availIdx(q))
	}
	n := g.sent[q]
	pos := uint32(vring.PackedIndex(uint16(n%rpSize), (n/rpSize)%2 == 0))
	return pos | pos<<16
}

// traffic transmits n chains on transmit queue q and waits until the
// device completed all of them; used.idx must advance by exactly n.
func (g *rpGuest) traffic(q, n int) {
	g.t.Helper()
	before := g.usedIdx(q)
	for i := 0; i < n; i++ {
		_, err := g.dqs[q].Add([]vring.Buffer{{Addr: vring.GuestAddr(0x40000 + (g.nextTx%64)*0x1000), Len: 100}})
		require.NoError(g.t, err)
		g.nextTx++
	}
	g.dqs[q].Publish()
	require.NoError(g.t, g.kicks[q].Signal())
	deadline := time.Now().Add(10 * time.Second)
	for got := 0; got < n; {
		_, _, ok, err := g.dqs[q].Reclaim()
		require.NoError(g.t, err)
		if ok {
			got++
			continue
		}
		require.True(g.t, time.Now().Before(deadline), "queue %d: device completed %d of %d chains", q, got, n)
		time.Sleep(time.Millisecond)
	}
	g.sent[q] += n
	if !g.packed() { // a packed ring has no used.idx
		assert.Equal(g.t, before+uint16(n), g.usedIdx(q), "queue %d: used.idx advanced by the chains sent", q)
	}
}

// replay sends a fixture's requests over c, substituting the guest's own
// memory table, ring sizes and addresses, log and eventfds, and bases: 0
// stays 0; any other value (or "saved") becomes the guest's last
// GET_VRING_BASE answer for that queue, as QEMU sends back what it got.
// Every GET_VRING_BASE must answer the driver's avail.idx: all chains were
// completed, so the next avail index is the one the driver published.
func (g *rpGuest) replay(c *lcConn, name string) {
	t := g.t
	t.Helper()
	for _, l := range parseFixture(t, name) {
		flags := Version
		if l.reply {
			flags |= FlagNeedReply
		}
		var p []byte
		var fds []int
		hasReply := false
		q := func() int {
			v := int(l.num(t, 0) & VringIndexMask)
			require.Less(t, v, rpQueues, "%s:%d", name, l.line)
			return v
		}
		switch l.req {
		case ReqSetFeatures, ReqSetStatus:
			p = putU64(l.num(t, 0))
		case ReqSetProtocolFeatures:
			p = putU64(l.num(t, 0))
			c.proto = ProtocolFeatures(l.num(t, 0))
		case ReqGetFeatures, ReqGetProtocolFeatures, ReqGetQueueNum, ReqGetStatus:
			hasReply = true
		case ReqSetMemTable:
			p = EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: rawUA}})
			fds = []int{g.memfd}
		case ReqSetLogBase:
			p = Log{MmapSize: uint64(g.log.Size()), MmapOffset: g.log.FdOffset()}.Encode()
			fds = []int{g.log.Fd()}
			hasReply = true
		case ReqSetVringNum:
			p = VringState{Index: uint32(q()), Num: rpSize}.Encode()
		case ReqSetVringBase:
			i := q()
			base := uint32(0)
			fresh := vhostcore.VringBase(vring.InitialState(g.features), g.features)
			switch {
			case g.packed() && l.num(t, 1) == uint64(fresh):
				base = fresh // a packed=on QEMU starts a fresh ring with both wrap counters set
			case len(l.args) > 1 && l.args[1] != "0":
				base = g.saved[i]
			}
			p = VringState{Index: uint32(i), Num: base}.Encode()
		case ReqSetVringEnable:
			p = VringState{Index: uint32(q()), Num: uint32(l.num(t, 1))}.Encode()
		case ReqGetVringBase:
			p = VringState{Index: uint32(q())}.Encode()
			hasReply = true
		case ReqSetVringAddr:
			i := q()
			lay := rpLayout(i)
			fl, err := strconv.ParseUint(l.kv["flags"], 0, 32)
			require.NoError(t, err, "%s:%d flags", name, l.line)
			p = VringAddr{Index: uint32(i), Flags: uint32(fl), Desc: rawUA + uint64(lay.Desc), Avail: rawUA + uint64(lay.Avail),
				Used: rawUA + uint64(lay.Used), Log: uint64(lay.Used)}.Encode()
		case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
			i := q()
			v := uint64(i)
			if l.req == ReqSetVringKick {
				c.kicked[i] = true
			}
			if l.nofd {
				v |= VringNoFd
			} else if l.req == ReqSetVringKick {
				fds = []int{g.kicks[i].Fd()}
			} else {
				fds = []int{g.calls[i].Fd()}
			}
			p = putU64(v)
		case ReqSetOwner, ReqResetOwner, ReqResetDevice:
		default:
			t.Fatalf("%s:%d: replay does not know how to send %v", name, l.line, l.req)
		}
		require.NoError(t, c.c.write(Header{Request: l.req, Flags: flags}, p, fds), "%s:%d", name, l.line)
		if hasReply || (l.reply && c.proto.Has(PFReplyAck)) {
			m, err := c.c.read()
			require.NoError(t, err, "%s:%d: reply to %v", name, l.line, l.req)
			require.Equal(t, l.req, m.Request, "%s:%d", name, l.line)
			if l.req == ReqGetVringBase {
				st, err := DecodeVringState(m.Payload)
				require.NoError(t, err)
				i := int(st.Index)
				if c.kicked[i] {
					assert.Equal(t, g.base(i), st.Num, "%s:%d: GET_VRING_BASE %d answers the next avail position", name, l.line, i)
					g.saved[i] = st.Num
				} else {
					// DPDK's reconnect asks a fresh back-end, which has
					// no position for a ring it never ran.
					assert.Zero(t, st.Num, "%s:%d: GET_VRING_BASE %d of a ring not run in this session", name, l.line, i)
				}
			} else if l.reply && !hasReply {
				assert.Zero(t, binary.NativeEndian.Uint64(m.Payload), "%s:%d: %v acknowledged with failure", name, l.line, l.req)
			}
		}
	}
	select {
	case err := <-c.done:
		t.Fatalf("%s: session ended: %v", name, err)
	default:
	}
}

// rpDevice is what examples/vhost-user-net serves: softnet with the
// front-end running the control queue, two pairs, frames discarded.
func rpDevice(t *testing.T) *softnet.Device {
	d, err := softnet.New(&softnet.Options{MaxQueuePairs: 2, FrontendCtrl: true, Handler: softnet.Discard})
	require.NoError(t, err)
	return d
}

func (g *rpGuest) connect() *lcConn {
	rec := &logRecorder{level: slog.LevelInfo}
	be, uc, done := startBackend(g.t, rpDevice(g.t), &BackendOptions{Logger: slog.New(rec)})
	return &lcConn{t: g.t, c: newConn(uc), be: be, done: done, log: rec, kicked: map[int]bool{}}
}

// TestReplayFixtures replays, per scenario, the recorded (DPDK 22.11) and
// source-derived (QEMU 7.2) sequences with traffic between them.
func TestReplayFixtures(t *testing.T) {
	type step struct {
		file    string // a fixture to replay on the current session
		traffic int    // or: chains to send on transmit queue txq
		txq     int
		hangUp  bool // or: the current back-end goes away; a new one is connected
	}
	fx := func(f string) step { return step{file: f} }
	tx := func(q, n int) step { return step{traffic: n, txq: q} }
	tests := []struct {
		name   string
		steps  []step
		resync int // "resynchronised" warnings expected over the whole run
		packed bool
	}{
		{"DPDK 22.11 start, quit", []step{fx("dpdk-start.vu"), tx(1, 40), fx("dpdk-quit.vu")}, 0, false},
		{"DPDK 22.11 server=1, back-end restarted under traffic", []step{
			fx("dpdk-start.vu"), tx(1, 50), {hangUp: true}, fx("dpdk-reconnect.vu"), tx(1, 30), fx("dpdk-quit.vu")}, 1, false},
		{"DPDK 22.11 queues=2", []step{fx("dpdk-mq-start.vu"), tx(1, 20), tx(3, 25), fx("dpdk-mq-quit.vu")}, 0, false},
		{"QEMU 7.2 stop, cont", []step{
			fx("qemu72-start.vu"), tx(1, 33), fx("qemu72-stop.vu"), fx("qemu72-cont.vu"), tx(1, 20),
			fx("qemu72-stop.vu"), fx("qemu72-cont.vu"), tx(1, 7)}, 0, false},
		{"QEMU 7.2 migration source to destination", []step{
			fx("qemu72-start.vu"), tx(1, 45), fx("qemu72-migrate-src.vu"), {hangUp: true}, fx("qemu72-migrate-dst.vu"), tx(1, 12)}, 0, false},
		{"QEMU 7.2 migration, twice (A to B to A)", []step{
			fx("qemu72-start.vu"), tx(1, 45), fx("qemu72-migrate-src.vu"), {hangUp: true}, fx("qemu72-migrate-dst.vu"), tx(1, 12),
			fx("qemu72-migrate-src.vu"), {hangUp: true}, fx("qemu72-migrate-dst.vu"), tx(1, 9)}, 0, false},
		{"QEMU 11 stop and cont, twice", []step{
			fx("qemu11-start.vu"), tx(1, 33), fx("qemu11-stop.vu"), fx("qemu11-cont.vu"), tx(1, 20),
			fx("qemu11-stop.vu"), fx("qemu11-cont.vu"), tx(1, 7)}, 0, false},
		{"QEMU 11 migration source to destination", []step{
			fx("qemu11-start.vu"), tx(1, 45), fx("qemu11-migrate-src.vu"), {hangUp: true}, fx("qemu11-migrate-dst.vu"), tx(1, 12)}, 0, false},
		{"QEMU 11 migration, three times (A to B to A to B)", []step{
			fx("qemu11-start.vu"), tx(1, 45), fx("qemu11-migrate-src.vu"), {hangUp: true}, fx("qemu11-migrate-dst.vu"), tx(1, 12),
			fx("qemu11-migrate-src.vu"), {hangUp: true}, fx("qemu11-migrate-dst.vu"), tx(1, 9),
			fx("qemu11-migrate-src.vu"), {hangUp: true}, fx("qemu11-migrate-dst.vu"), tx(1, 5)}, 0, false},
		// packed=on: the base words carry both positions with their wrap
		// counters; 40 + 30 + 40 + 30 chains wrap the 64-entry ring twice.
		{"QEMU 11 packed rings, migration, twice (A to B to A)", []step{
			fx("qemu11-packed-start.vu"), tx(1, 40), tx(1, 30), fx("qemu11-packed-migrate-src.vu"), {hangUp: true}, fx("qemu11-packed-migrate-dst.vu"), tx(1, 40),
			fx("qemu11-packed-migrate-src.vu"), {hangUp: true}, fx("qemu11-packed-migrate-dst.vu"), tx(1, 30)}, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g := newRPGuest(t)
			if tc.packed {
				g = newRPGuestWith(t, virtio.Features(0).With(virtio.FVersion1, virtio.FRingPacked))
			}
			c := g.connect()
			resync := 0
			for _, s := range tc.steps {
				switch {
				case s.file != "":
					g.replay(c, s.file)
				case s.traffic > 0:
					g.traffic(s.txq, s.traffic)
				case s.hangUp:
					resync += len(c.log.find("resynchronised"))
					c.hangUp()
					c = g.connect()
				}
			}
			resync += len(c.log.find("resynchronised"))
			// Nothing lost or repeated: used.idx is the number of chains
			// sent, whatever stopped, resumed or reconnected in between.
			// (A packed ring has no used.idx: there every chain came
			// back to traffic's Reclaim, and every GET_VRING_BASE
			// answered the position after the chains sent.)
			for q := 1; q < rpQueues && !g.packed(); q += 2 {
				assert.Equal(t, uint16(g.sent[q]), g.usedIdx(q), "transmit queue %d", q)
			}
			// A reconnect that resends base 0 is resynchronised (logged),
			// every other sequence resumes from the base it sends.
			assert.Equal(t, tc.resync, resync, "resynchronisations")
		})
	}
}

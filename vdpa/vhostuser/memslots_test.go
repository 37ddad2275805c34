package vhostuser

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// Memory tables built region by region (PROTOCOL_F_CONFIGURE_MEM_SLOTS):
// GET_MAX_MEM_SLOTS, ADD_MEM_REG and REM_MEM_REG, as QEMU sends them when
// the protocol feature is negotiated (at start, one ADD per region; at a
// memory change, the removals and then the additions).

const lcSlotsProto = lcProto | 1<<PFConfigureMemSlots

// slotRegion is the lcGuest's memory as one ADD_MEM_REG region at user
// address ua.
func slotRegion(ua uint64) MemoryRegion {
	return MemoryRegion{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: ua}
}

// negotiateSlots is negotiate with CONFIGURE_MEM_SLOTS and the guest's
// memory added with ADD_MEM_REG instead of SET_MEM_TABLE.
func (c *lcConn) negotiateSlots() {
	c.handshake(lcSlotsProto)
	c.send(ReqAddMemReg, EncodeSingleRegion(slotRegion(rawUA)), c.g.memfd)
}

// noLeaks checks, after everything else the test set up is cleaned up
// (cleanups run last-registered first), that no descriptor was left open.
func noLeaks(t *testing.T) {
	before := openFdSet(t)
	t.Cleanup(func() { assert.Empty(t, leakedSince(t, before), "descriptors left open") })
}

// extraRegion is a second memfd of size bytes, for regions beside the
// guest's own.
func extraRegion(t *testing.T, size int64) int {
	fd, err := unix.MemfdCreate("slot", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, size))
	return fd
}

// TestMemSlotsLifecycle: the rings run on a table built with ADD_MEM_REG;
// adding and removing another region keeps them running where they were;
// removing the region their rings lie in stops them without ending the
// session, and adding it back starts them again where they stopped.
func TestMemSlotsLifecycle(t *testing.T) {
	noLeaks(t)
	g := newLCGuest(t)
	c := g.connect(lcDevice(t))
	c.negotiateSlots()
	assert.EqualValues(t, MaxMemSlots, binary.NativeEndian.Uint64(c.call(ReqGetMaxMemSlots, nil)))
	c.startRing(0)
	g.traffic(5)

	other := MemoryRegion{GuestPhysAddr: 1 << 30, MemorySize: 1 << 21, UserspaceAddr: rawUA + 1<<32}
	c.send(ReqAddMemReg, EncodeSingleRegion(other), extraRegion(t, 1<<21))
	assert.Equal(t, 1, c.running(), "a region more: the ring runs on")
	g.traffic(5)
	c.send(ReqRemMemReg, EncodeSingleRegion(other))
	assert.Equal(t, 1, c.running(), "that region gone: the ring runs on")
	g.traffic(5)

	c.send(ReqRemMemReg, EncodeSingleRegion(slotRegion(rawUA)))
	assert.Equal(t, 0, c.running(), "the ring's memory gone: the ring waits, the session goes on")
	c.send(ReqAddMemReg, EncodeSingleRegion(slotRegion(rawUA)), c.g.memfd)
	assert.Equal(t, 1, c.running(), "its memory back: the ring runs again")
	g.traffic(5)
	assert.Equal(t, uint16(20), g.usedIdx(), "every chain served once, in order")
	assert.Equal(t, uint16(20), c.base(), "GET_VRING_BASE")
	assert.Empty(t, c.log.find("WARN"))
	c.hangUp()
}

// TestMemSlotsRepeated: QEMU before 8.0 has a vhost device per queue pair
// of a vhost-user-net on one connection, and each sends every region
// update in turn: the same ADD_MEM_REG twice, later the same REM_MEM_REG
// twice, and for a replacement each device's REM of the old region and
// ADD of the new one. Updates are idempotent: a region added again is not
// mapped again, a region removed again is gone already, and a replacement
// that overlaps the region it replaces is taken at the first device's
// pair. The rings run on throughout.
func TestMemSlotsRepeated(t *testing.T) {
	noLeaks(t)
	g := newLCGuest(t)
	c := g.connect(lcDevice(t))
	c.negotiateSlots()
	c.send(ReqAddMemReg, EncodeSingleRegion(slotRegion(rawUA)), c.g.memfd) // the second device's
	c.startRing(0)
	g.traffic(3)
	fd := extraRegion(t, 1<<22)
	old := MemoryRegion{GuestPhysAddr: 1 << 30, MemorySize: 1 << 21, UserspaceAddr: rawUA + 1<<32}
	for range 2 {
		c.send(ReqAddMemReg, EncodeSingleRegion(old), fd)
	}
	g.traffic(3)
	// A replacement overlapping the old region in both address spaces,
	// as each of two devices sends it.
	grown := MemoryRegion{GuestPhysAddr: 1 << 30, MemorySize: 1 << 22, UserspaceAddr: rawUA + 1<<32}
	for range 2 {
		c.send(ReqRemMemReg, EncodeSingleRegion(old))
		c.send(ReqAddMemReg, EncodeSingleRegion(grown), fd)
		assert.Equal(t, 1, c.running())
	}
	g.traffic(3)
	for range 2 {
		c.send(ReqRemMemReg, EncodeSingleRegion(grown))
		assert.Equal(t, 1, c.running())
	}
	g.traffic(3)
	assert.Equal(t, uint16(12), g.usedIdx())
	assert.Empty(t, c.log.find("WARN"))
}

// TestMemSlotsBadInput: what ADD_MEM_REG and REM_MEM_REG refuse, each
// ending the session with the typed error (after a failure ack, since the
// front-end asked for one), the descriptor closed.
func TestMemSlotsBadInput(t *testing.T) {
	tests := []struct {
		name  string
		proto ProtocolFeatures
		steps func(t *testing.T, c *lcConn)
		want  error
	}{
		{"ADD_MEM_REG without the protocol feature", lcProto, func(t *testing.T, c *lcConn) {
			c.send(ReqAddMemReg, EncodeSingleRegion(slotRegion(rawUA)), c.g.memfd)
		}, ErrUnsupported},
		{"GET_MAX_MEM_SLOTS without the protocol feature", lcProto, func(t *testing.T, c *lcConn) {
			c.send(ReqGetMaxMemSlots, nil)
		}, ErrUnsupported},
		{"ADD_MEM_REG overlapping in user address space", lcSlotsProto, func(t *testing.T, c *lcConn) {
			c.send(ReqAddMemReg, EncodeSingleRegion(slotRegion(rawUA)), c.g.memfd)
			c.send(ReqAddMemReg, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 1 << 30, MemorySize: 1 << 20, UserspaceAddr: rawUA + 1<<19}),
				extraRegion(t, 1<<20))
		}, ErrBadRegion},
		{"ADD_MEM_REG overlapping in guest address space", lcSlotsProto, func(t *testing.T, c *lcConn) {
			c.send(ReqAddMemReg, EncodeSingleRegion(slotRegion(rawUA)), c.g.memfd)
			c.send(ReqAddMemReg, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 1 << 19, MemorySize: 1 << 20, UserspaceAddr: rawUA + 1<<32}),
				extraRegion(t, 1<<20))
		}, ErrBadRegion},
		{"ADD_MEM_REG larger than its file", lcSlotsProto, func(t *testing.T, c *lcConn) {
			c.send(ReqAddMemReg, EncodeSingleRegion(MemoryRegion{MemorySize: 1 << 21, UserspaceAddr: rawUA}), extraRegion(t, 1<<20))
		}, ErrBadRegion},
		{"ADD_MEM_REG without its descriptor", lcSlotsProto, func(t *testing.T, c *lcConn) {
			c.send(ReqAddMemReg, EncodeSingleRegion(slotRegion(rawUA)))
		}, ErrFdCount},
		{"one region more than MaxMemSlots", lcSlotsProto, func(t *testing.T, c *lcConn) {
			fd := extraRegion(t, (MaxMemSlots+1)*4096)
			for i := uint64(0); i <= MaxMemSlots; i++ {
				c.send(ReqAddMemReg, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: i << 20, MemorySize: 4096,
					UserspaceAddr: rawUA + i<<20, MmapOffset: i * 4096}), fd)
			}
		}, ErrTooManyRegions},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			noLeaks(t)
			g := newLCGuest(t)
			c := g.connect(lcDevice(t))
			c.send(ReqSetOwner, nil)
			c.send(ReqSetProtocolFeatures, putU64(uint64(tc.proto)))
			tc.steps(t, c)
			c.endsWith(tc.want, tc.name)
		})
	}
}

// TestMemSlotsMaxGuestMemory: the bytes of a table built region by region
// are bounded by MaxGuestMemory as a whole table's are.
func TestMemSlotsMaxGuestMemory(t *testing.T) {
	g := newLCGuest(t)
	_, uc, done := startBackend(t, lcDevice(t), &BackendOptions{MaxGuestMemory: 3 << 20})
	c := &lcConn{t: t, g: g, c: newConn(uc), done: done, log: &logRecorder{}}
	c.send(ReqSetProtocolFeatures, putU64(uint64(lcSlotsProto)))
	c.send(ReqAddMemReg, EncodeSingleRegion(slotRegion(rawUA)), g.memfd)
	c.send(ReqAddMemReg, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 1 << 30, MemorySize: 2 << 20, UserspaceAddr: rawUA + 1<<32}),
		extraRegion(t, 2<<20))
	c.call(ReqGetFeatures, nil) // 3 MiB: within the bound
	c.send(ReqAddMemReg, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 2 << 30, MemorySize: 4096, UserspaceAddr: rawUA + 2<<32}),
		extraRegion(t, 4096))
	c.endsWith(ErrBadRegion, "a region beyond MaxGuestMemory")
}

// TestPeerMappingsShared: tables built from one another share their
// regions' mappings, and a mapping is unmapped exactly when the last table
// holding it is closed, whatever the order.
func TestPeerMappingsShared(t *testing.T) {
	fdA, fdB := extraRegion(t, 1<<20), extraRegion(t, 1<<20)
	dup := func(fd int) int {
		d, err := unix.Dup(fd)
		require.NoError(t, err)
		return d
	}
	ra := MemoryRegion{MemorySize: 1 << 20, UserspaceAddr: rawUA}
	rb := MemoryRegion{GuestPhysAddr: 1 << 30, MemorySize: 1 << 20, UserspaceAddr: rawUA + 1<<32}
	t1, err := mapMemTable([]MemoryRegion{ra}, []int{dup(fdA)}, 1<<30)
	require.NoError(t, err)
	t2, changed, err := addRegion(t1, rb, dup(fdB), 1<<30)
	require.NoError(t, err)
	require.True(t, changed)
	t3, changed, err := removeRegion(t2, ra)
	require.NoError(t, err)
	require.True(t, changed)
	a, b := t2.regions[0].mapping, t2.regions[1].mapping
	require.Same(t, a, t1.regions[0].mapping, "t2 shares t1's mapping of A")
	require.Same(t, b, t3.regions[0].mapping, "t3 shares t2's mapping of B")
	assert.EqualValues(t, 2, a.refs.Load(), "A: t1, t2")
	assert.EqualValues(t, 2, b.refs.Load(), "B: t2, t3")

	require.NoError(t, t3.mem.Write(1<<30, []byte("b")), "B mapped through t3")
	t1.close()
	assert.NotNil(t, a.m, "A still t2's")
	t2.close()
	assert.Nil(t, a.m, "A unmapped with its last table")
	assert.NotNil(t, b.m, "B still t3's")
	var got [1]byte
	require.NoError(t, t3.mem.Read(1<<30, got[:]))
	assert.Equal(t, byte('b'), got[0])
	t3.close()
	assert.Nil(t, b.m, "B unmapped with its last table")
	empty, changed, err := removeRegion(oneRegionTable(t, fdA, ra), ra)
	require.NoError(t, err)
	assert.True(t, changed)
	assert.Nil(t, empty, "a table left without regions is no table")
}

// oneRegionTable maps a one-region table of fd (duplicated).
func oneRegionTable(t *testing.T, fd int, r MemoryRegion) *peerMemory {
	d, err := unix.Dup(fd)
	require.NoError(t, err)
	pm, err := mapMemTable([]MemoryRegion{r}, []int{d}, 1<<30)
	require.NoError(t, err)
	t.Cleanup(pm.close)
	return pm
}

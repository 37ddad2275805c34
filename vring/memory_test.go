package vring

import (
	"math"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
	"golang.org/x/sys/unix"
)

func TestMemoryTranslation(t *testing.T) {
	a, err := NewRegion(0x1000, make([]byte, 0x1000), nil)
	require.NoError(t, err)
	b, err := NewRegion(0x2000, make([]byte, 0x1000), &RegionOptions{UserAddr: 0x7f0000000000})
	require.NoError(t, err)
	c, err := NewRegion(0x10000, make([]byte, 0x1000), nil)
	require.NoError(t, err)
	mem, err := NewMemory(c, a, b)
	require.NoError(t, err)

	tests := []struct {
		name string
		addr GuestAddr
		n    uint64
		want error
	}{
		{"inside one region", 0x1800, 0x100, nil},
		{"whole region", 0x2000, 0x1000, nil},
		{"ends at the region's last byte", 0x1fff, 1, nil},
		{"before all memory", 0x0, 0x10, ErrOutOfRange},
		{"starts in a hole", 0x3000, 1, ErrOutOfRange},
		{"runs from a region into a hole", 0x2ff0, 0x20, ErrOutOfRange},
		{"crosses into an adjacent region", 0x1ff0, 0x20, ErrSpansRegions},
		{"address plus length overflows", ^GuestAddr(0) - 4, 16, ErrOverflow},
		{"length overflows from a valid address", 0x1000, ^uint64(0), ErrOverflow},
	}
	for _, tc := range tests {
		t.Run("Slice "+tc.name, func(t *testing.T) {
			s, err := mem.Slice(tc.addr, tc.n)
			if tc.want != nil {
				assert.ErrorIs(t, err, tc.want)
				assert.Nil(t, s)
				return
			}
			require.NoError(t, err)
			assert.Len(t, s, int(tc.n))
			assert.Equal(t, int(tc.n), cap(s), "slice capacity must not extend past the range")
		})
	}

	t.Run("Read and Write span adjacent regions", func(t *testing.T) {
		msg := []byte("spanning two regions")
		require.NoError(t, mem.Write(0x1ff8, msg))
		got := make([]byte, len(msg))
		require.NoError(t, mem.Read(0x1ff8, got))
		assert.Equal(t, msg, got)
		assert.Equal(t, msg[:8], a.Bytes()[0xff8:])
		assert.Equal(t, msg[8:], b.Bytes()[:len(msg)-8])
	})
	t.Run("Write into a hole writes nothing", func(t *testing.T) {
		before := append([]byte(nil), b.Bytes()[0xff0:]...)
		err := mem.Write(0x2ff0, make([]byte, 0x20))
		assert.ErrorIs(t, err, ErrOutOfRange)
		assert.Equal(t, before, b.Bytes()[0xff0:])
	})
	t.Run("ReadAt and WriteAt use guest addresses", func(t *testing.T) {
		n, err := mem.WriteAt([]byte{1, 2, 3}, 0x10010)
		require.NoError(t, err)
		assert.Equal(t, 3, n)
		assert.Equal(t, []byte{1, 2, 3}, c.Bytes()[0x10:0x13])
		p := make([]byte, 3)
		n, err = mem.ReadAt(p, 0x10010)
		require.NoError(t, err)
		assert.Equal(t, 3, n)
		_, err = mem.ReadAt(p, -1)
		assert.ErrorIs(t, err, ErrOutOfRange)
		_, err = mem.ReadAt(p, 0x10ffe)
		assert.ErrorIs(t, err, ErrOutOfRange)
	})
	t.Run("UserToGuest and GuestToHost", func(t *testing.T) {
		g, err := mem.UserToGuest(0x7f0000000010)
		require.NoError(t, err)
		assert.Equal(t, GuestAddr(0x2010), g)
		_, err = mem.UserToGuest(0x7f0000001000)
		assert.ErrorIs(t, err, ErrOutOfRange)
		h, err := mem.GuestToHost(0x1010)
		require.NoError(t, err)
		assert.Equal(t, a.HostAddr()+0x10, h)
		_, err = mem.GuestToHost(0x5000)
		assert.ErrorIs(t, err, ErrOutOfRange)
	})
	assert.True(t, mem.Contains(0x1ff0, 0x20))
	assert.False(t, mem.Contains(0x2ff0, 0x20))
}

func TestMemoryRejectsBadRegions(t *testing.T) {
	a, err := NewRegion(0x1000, make([]byte, 0x1000), nil)
	require.NoError(t, err)
	b, err := NewRegion(0x1fff, make([]byte, 0x10), nil)
	require.NoError(t, err)
	_, err = NewMemory(a, b)
	assert.ErrorIs(t, err, ErrRegionOverlap)
	_, err = NewMemory()
	assert.ErrorIs(t, err, ErrInvalidRegion)
	_, err = NewMemory(a, nil)
	assert.ErrorIs(t, err, ErrInvalidRegion)
	_, err = NewRegion(^GuestAddr(0)-2, make([]byte, 8), nil)
	assert.ErrorIs(t, err, ErrOverflow)
	_, err = NewRegion(0, nil, nil)
	assert.ErrorIs(t, err, ErrInvalidRegion)
	_, err = NewMemfdRegion(0, 0, nil)
	assert.ErrorIs(t, err, ErrInvalidRegion)
	top, err := NewRegion(^GuestAddr(0)-0xfff, make([]byte, 0x1000), nil)
	require.NoError(t, err, "a region may end at the top of the address space")
	mem, err := NewMemory(top)
	require.NoError(t, err)
	s, err := mem.Slice(^GuestAddr(0), 1)
	require.NoError(t, err)
	assert.Len(t, s, 1)
	assert.Equal(t, GuestAddr(0), top.End(), "End wraps at the top")
	assert.Equal(t, ^GuestAddr(0), top.Last(), "Last does not")
	assert.Equal(t, GuestAddr(0x1fff), a.Last())
}

// TestMappedRegionSizeBounds: NewMemfdRegion and NewFdRegion (whose size
// a vhost-user peer's memory table gives) map a size up to 64 TiB that an
// int holds, and refuse a larger one with ErrInvalidRegion: on 32-bit 2
// GiB and more, which truncated to an int would map another length (4 GiB
// and a page: one page). The files are sparse memfds: nothing is written.
func TestMappedRegionSizeBounds(t *testing.T) {
	page := uint64(os.Getpagesize())
	const fileSize = 1<<32 + 1<<16
	fd, err := unix.MemfdCreate("bounds", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, unix.Ftruncate(fd, fileSize))
	fits := func(size uint64) bool { return size <= 1<<46 && size <= uint64(math.MaxInt) }
	for _, tc := range []struct {
		name string
		size uint64
	}{
		{"one page", page},
		{"1 GiB", 1 << 30}, // a 2 GiB hole may not exist in a 32-bit address space
		{"2 GiB", 1 << 31},
		{"4 GiB and a page", 1<<32 + page},
		{"above 64 TiB", 1<<46 + page},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, m := range []struct {
				name string
				new  func() (*Region, error)
			}{
				{"memfd", func() (*Region, error) { return NewMemfdRegion(0, tc.size, nil) }},
				{"fd", func() (*Region, error) { return NewFdRegion(0, tc.size, fd, 0, &RegionOptions{NoSeal: true}) }},
			} {
				r, err := m.new()
				if !fits(tc.size) {
					require.ErrorIs(t, err, ErrInvalidRegion, m.name)
					continue
				}
				require.NoError(t, err, m.name)
				assert.Equal(t, tc.size, r.Size(), m.name)
				assert.Len(t, r.Bytes(), int(tc.size), m.name)
				require.NoError(t, r.Close())
			}
		})
	}
}

func TestMemfdRegionIsSharedThroughItsFd(t *testing.T) {
	r, err := NewMemfdRegion(0x40000000, 1<<20, &RegionOptions{Name: "share-test"})
	require.NoError(t, err)
	defer r.Close()
	assert.GreaterOrEqual(t, r.Fd(), 0)
	assert.Equal(t, uint64(0), r.FdOffset())
	assert.Equal(t, r.HostAddr(), r.UserAddr())
	link, err := os.Readlink("/proc/self/fd/" + itoa(r.Fd()))
	require.NoError(t, err)
	assert.Contains(t, link, "memfd:share-test")

	// A second mapping of the same fd (what a vhost-user peer does) sees
	// the same bytes, at an offset.
	peer, err := NewFdRegion(0, 1<<19, r.Fd(), 1<<19, nil)
	require.NoError(t, err)
	defer peer.Close()
	assert.NotEqual(t, r.Fd(), peer.Fd(), "the fd region owns a duplicate")
	copy(r.Bytes()[1<<19+5:], "shared")
	assert.Equal(t, "shared", string(peer.Bytes()[5:11]))
	require.NoError(t, r.Close())
	require.NoError(t, r.Close(), "Close is idempotent")
	assert.Equal(t, "shared", string(peer.Bytes()[5:11]), "peer mapping outlives the original")
	_, err = NewFdRegion(0, 4096, peer.Fd(), 100, nil)
	assert.ErrorIs(t, err, ErrInvalidRegion, "offset must be page aligned")
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	var b [20]byte
	n := len(b)
	for ; i > 0; i /= 10 {
		n--
		b[n] = byte('0' + i%10)
	}
	return string(b[n:])
}

func TestLayoutValidate(t *testing.T) {
	tests := []struct {
		name string
		l    Layout
		want error
	}{
		{"2.7 queue size must not be zero", Layout{Size: 0, Desc: 0, Avail: 0x1000, Used: 0x2000}, ErrQueueSize},
		{"2.7 queue size must be a power of two", Layout{Size: 6, Desc: 0, Avail: 0x1000, Used: 0x2000}, ErrQueueSize},
		{"2.7 queue size 32768 is the maximum and valid", Layout{Size: 32768, Desc: 0, Avail: 0x80000, Used: 0xa0000}, nil},
		{"2.7 descriptor table must be 16-aligned", Layout{Size: 4, Desc: 8, Avail: 0x1000, Used: 0x2000}, ErrMisaligned},
		{"2.7 available ring must be 2-aligned", Layout{Size: 4, Desc: 0, Avail: 0x1001, Used: 0x2000}, ErrMisaligned},
		{"2.7 available ring may be only 2-aligned", Layout{Size: 4, Desc: 0, Avail: 0x1002, Used: 0x2000}, nil},
		{"2.7 used ring must be 4-aligned", Layout{Size: 4, Desc: 0, Avail: 0x1000, Used: 0x2002}, ErrMisaligned},
		{"areas must not overlap", Layout{Size: 4, Desc: 0, Avail: 0x30, Used: 0x2000}, ErrRingOverlap},
		{"areas must not wrap the address space", Layout{Size: 4, Desc: ^GuestAddr(0) - 15, Avail: 0x1000, Used: 0x2000}, ErrOverflow},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.l.Validate()
			if tc.want == nil {
				assert.NoError(t, err)
			} else {
				assert.ErrorIs(t, err, tc.want)
			}
		})
	}
	d, a, u := SplitSizes(256)
	assert.Equal(t, []uint64{4096, 6 + 512, 6 + 2048}, []uint64{d, a, u})
	l := ContiguousLayout(0x10000, 256)
	require.NoError(t, l.Validate())
	assert.Equal(t, Layout{Size: 256, Desc: 0x10000, Avail: 0x11000, Used: 0x11000 + 576}, l)
	assert.Equal(t, uint64(4096+576+6+2048), ContiguousLayoutBytes(256))
}

func TestQueueRejectsRingOutsideMemory(t *testing.T) {
	r, err := NewMemfdRegion(0, 0x2000, nil)
	require.NoError(t, err)
	r2, err := NewMemfdRegion(0x2000, 0x2000, nil)
	require.NoError(t, err)
	mem, err := NewMemory(r, r2)
	require.NoError(t, err)
	defer mem.Close()
	_, err = NewDeviceQueue(mem, DeviceQueueOptions{Layout: Layout{Size: 8, Desc: 0, Avail: 0x3ffc, Used: 0x1000}})
	assert.ErrorIs(t, err, ErrOutOfRange)
	_, err = NewDeviceQueue(mem, DeviceQueueOptions{Layout: Layout{Size: 8, Desc: 0, Avail: 0x1ffc, Used: 0x1000}})
	assert.ErrorIs(t, err, ErrSpansRegions, "a ring area must be contiguous in the host")
	_, err = NewDriverQueue(mem, DriverQueueOptions{Layout: Layout{Size: 3}})
	assert.ErrorIs(t, err, ErrQueueSize)
	// Host misalignment: a region whose bytes are not aligned like its base.
	buf := make([]byte, 0x3001)
	odd, err := NewRegion(0, buf[1:], nil)
	require.NoError(t, err)
	m2, err := NewMemory(odd)
	require.NoError(t, err)
	_, err = NewDeviceQueue(m2, DeviceQueueOptions{Layout: ContiguousLayout(0x1000, 8)})
	assert.ErrorIs(t, err, ErrMisaligned)
}

// TestRingFieldsStayInsideTheRing places a ring whose available ring is only
// 2-aligned and whose used ring ends at the very end of its region, with
// guard bytes around the region in the same Go allocation, and drives both
// sides through every path that touches the 16-bit fields (avail.idx,
// flags, used_event, avail_event). The guards must be untouched.
func TestRingFieldsStayInsideTheRing(t *testing.T) {
	for _, feat := range []uint64{0, 1 << 29} {
		const size = 4
		_, availBytes, usedBytes := SplitSizes(size)
		// desc at 0 (64 bytes), avail at 66 (2 mod 4), used at end.
		availAt := GuestAddr(66)
		usedAt := (availAt + GuestAddr(availBytes) + 3) &^ 3
		total := int(usedAt) + int(usedBytes)
		backing := make([]byte, 16+total+16)
		for i := range backing {
			backing[i] = 0xa5
		}
		region := backing[16 : 16+total : 16+total]
		clear(region)
		r, err := NewRegion(0, region, nil)
		require.NoError(t, err)
		mem, err := NewMemory(r)
		require.NoError(t, err)
		l := Layout{Size: size, Desc: 0, Avail: availAt, Used: usedAt}
		require.NoError(t, l.Validate())
		// Buffers live in the descriptor table's own bytes: the test only
		// cares about ring field accesses.
		drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: featuresOf(feat)})
		require.NoError(t, err)
		dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: featuresOf(feat)})
		require.NoError(t, err)
		var c Chain
		for i := range 100 {
			_, err := drv.Add([]Buffer{{Addr: 0, Len: 1, Writable: true}})
			require.NoError(t, err)
			drv.Publish()
			drv.NeedsKick()
			if i%3 == 0 {
				dev.DisableNotify()
				drv.DisableInterrupts()
			}
			ok, err := dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			require.NoError(t, dev.Push(c.Head, 1))
			dev.NeedsInterrupt()
			_, _, ok, err = drv.Reclaim()
			require.NoError(t, err)
			require.True(t, ok)
			_, _, ok, err = drv.Reclaim()
			require.NoError(t, err)
			require.False(t, ok)
			_, err = dev.Pop(&c)
			require.NoError(t, err)
			_, err = dev.EnableNotify()
			require.NoError(t, err)
			_, err = drv.EnableInterrupts()
			require.NoError(t, err)
		}
		for i, b := range append(backing[:16:16], backing[16+total:]...) {
			require.Equal(t, byte(0xa5), b, "guard byte %d", i)
		}
	}
}

// The ring areas are as large as the negotiated features make them (virtio
// 1.2 §2.7.6, §2.7.8): used_event ends the available ring and avail_event
// the used ring only with EVENT_IDX. A ring flush against the end of its
// regions is accepted with the features it was sized for (as Linux vhost
// accepts it) and refused, 2 bytes short, with EVENT_IDX when it was sized
// without.
func TestRingFlushAgainstTheEndOfItsRegions(t *testing.T) {
	const size = 8
	eventIdx := virtio.Features(0).With(virtio.FEventIdx)
	for _, tc := range []struct {
		name         string
		sizedFor     virtio.Features // the features the placement is computed for
		feat         virtio.Features // the features the queues are built with
		wantAvailLen uint64
		wantUsedLen  uint64
		want         error
	}{
		{"without EVENT_IDX", 0, 0, 4 + 2*size, 4 + 8*size, nil},
		{"with EVENT_IDX", eventIdx, eventIdx, 6 + 2*size, 6 + 8*size, nil},
		{"placed without EVENT_IDX, built with it", 0, eventIdx, 4 + 2*size, 4 + 8*size, ErrOutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, a, u := RingSizes(size, tc.sizedFor)
			require.Equal(t, []uint64{16 * size, tc.wantAvailLen, tc.wantUsedLen}, []uint64{d, a, u})
			// Region A holds the descriptor table and ends with the
			// available ring; region B ends with the used ring (its size
			// keeps the used ring 4-aligned).
			ra, err := NewRegion(0, heapBytes(0x1000), nil)
			require.NoError(t, err)
			rb, err := NewRegion(0x10000, heapBytes(0x1000+u%4), nil)
			require.NoError(t, err)
			mem, err := NewMemory(ra, rb)
			require.NoError(t, err)
			defer mem.Close()
			l := Layout{Size: size, Desc: 0, Avail: ra.End() - GuestAddr(a), Used: rb.End() - GuestAddr(u)}
			require.NoError(t, l.ValidateFor(tc.sizedFor))

			drv, derr := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: tc.feat})
			dev, verr := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: tc.feat})
			if tc.want != nil {
				assert.ErrorIs(t, derr, tc.want)
				assert.ErrorIs(t, verr, tc.want)
				return
			}
			require.NoError(t, derr)
			require.NoError(t, verr)
			// Every path that touches the ring's last fields: publish,
			// notifications both ways, pop, push, reclaim, a snapshot.
			for i := range 3 * size {
				_, err := drv.Add([]Buffer{{Addr: 0x200, Len: 8}, {Addr: 0x300, Len: 8, Writable: true}})
				require.NoError(t, err)
				drv.Publish()
				drv.NeedsKick()
				var c Chain
				ok, err := dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				ok, err = dev.Pop(&c)
				require.NoError(t, err)
				require.False(t, ok, "round %d", i)
				_, err = dev.EnableNotify()
				require.NoError(t, err)
				require.NoError(t, dev.PushChain(&c, 8))
				dev.NeedsInterrupt()
				_, n, ok, err := drv.Reclaim()
				require.NoError(t, err)
				require.True(t, ok)
				assert.Equal(t, uint32(8), n)
				_, err = drv.EnableInterrupts()
				require.NoError(t, err)
			}
			s := dev.Snapshot()
			assert.Equal(t, uint16(3*size), s.AvailIdx)
			assert.Equal(t, uint16(3*size), s.UsedIdx)
		})
	}
}

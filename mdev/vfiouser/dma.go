package vfiouser

import (
	"fmt"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vring"
)

// Limits of a DMA window with a descriptor. A window holds one RAM block
// of the guest: 32 TiB is the memory of the largest guests in service
// (vring.NewFdRegion allows 64 TiB; Options.DMABudget bounds all the
// windows together). The offset limit is vring.NewFdRegion's.
const (
	maxWindowSize   = 32 << 40
	maxWindowOffset = 1 << 62
)

// mapping is one DMA_MAP window.
type mapping struct {
	addr, size uint64
	flags      uint32
	// mem maps the client's file, shared, readable, and writable only when
	// the client made the window writable; nil for a window without a
	// descriptor (reachable only through DMA_READ/DMA_WRITE).
	mem []byte
	// fd is the server's duplicate of the client's descriptor (-1: none),
	// handed on with the memory (vring.Region.Fd) to backing devices that
	// map guest memory themselves.
	fd       int
	fdOffset uint64
	sealed   bool // the file cannot shrink under mem (vring.SealShrink)
}

func (m *mapping) last() uint64 { return m.addr + m.size - 1 }

// release unmaps the window's memory and closes its descriptor. Nothing may
// be using the memory.
func (m *mapping) release() {
	if m.mem != nil {
		_ = unix.Munmap(m.mem)
		m.mem = nil
	}
	if m.fd >= 0 {
		_ = unix.Close(m.fd)
		m.fd = -1
	}
}

// retire releases what the window holds of the client while a data path
// that cannot be stopped may still be touching its memory: the pages are
// replaced by private anonymous memory (stale users read zeros and their
// writes go nowhere, instead of faulting or reaching a mapping that later
// reuses the addresses) and the descriptor is closed. It returns the
// address range, still reserved, which must be unmapped once the data path
// has stopped.
func (m *mapping) retire() []byte {
	b := m.mem
	m.mem = nil
	if m.fd >= 0 {
		_ = unix.Close(m.fd)
		m.fd = -1
	}
	if len(b) > 0 {
		_, _ = mmapFixedAnon(b)
	}
	return b
}

// dmaTable is the set of DMA windows, sorted by address. Guarded by
// Server.mu.
type dmaTable struct {
	maps []*mapping
	// graveyard holds the address ranges of windows retired while the data
	// path could not be stopped (see mapping.retire); they are unmapped once
	// it has stopped. At most maxRetired.
	graveyard [][]byte
}

// reserved is the address space the table holds: the windows mapped and
// the retired ranges.
func (t *dmaTable) reserved() uint64 {
	var n uint64
	for _, m := range t.maps {
		if m.mem != nil {
			n += uint64(len(m.mem))
		}
	}
	for _, b := range t.graveyard {
		n += uint64(len(b))
	}
	return n
}

// find returns the mapping containing addr, or nil.
func (t *dmaTable) find(addr uint64) *mapping {
	i := sort.Search(len(t.maps), func(i int) bool { return t.maps[i].last() >= addr })
	if i < len(t.maps) && t.maps[i].addr <= addr {
		return t.maps[i]
	}
	return nil
}

// overlaps reports whether [addr, last] intersects a mapping.
func (t *dmaTable) overlaps(addr, last uint64) bool {
	i := sort.Search(len(t.maps), func(i int) bool { return t.maps[i].last() >= addr })
	return i < len(t.maps) && t.maps[i].addr <= last
}

func (t *dmaTable) insert(m *mapping) {
	i := sort.Search(len(t.maps), func(i int) bool { return t.maps[i].addr > m.addr })
	t.maps = append(t.maps, nil)
	copy(t.maps[i+1:], t.maps[i:])
	t.maps[i] = m
}

// exact returns the index of the mapping exactly matching [addr,
// addr+size), or -1.
func (t *dmaTable) exact(addr, size uint64) int {
	for i, m := range t.maps {
		if m.addr == addr && m.size == size {
			return i
		}
	}
	return -1
}

// mapWindow builds the window m describes, mapping fd (the client's
// descriptor; the caller closes it) unless it is negative. The file is
// mapped as vring.NewFdRegion would (a duplicate descriptor, a memfd sealed
// against shrinking, a regular file checked to be long enough), but the
// server owns the mapping and the descriptor, so that it can let go of the
// descriptor while the address range must stay reserved (retire), and the
// mapping has the window's protection: read-only unless the window is
// writable, so a device write into a read-only window faults (the data
// path catches faults: vring.CatchFault) instead of changing the client's
// memory.
func mapWindow(m DMAMap, fd int) (*mapping, error) {
	mp := &mapping{addr: m.Address, size: m.Size, flags: m.Flags, fd: -1}
	if fd < 0 {
		return mp, nil
	}
	if m.Flags&DMAReadable == 0 {
		return nil, perr(CmdDMAMap, ErrFlags, "window %#x+%#x with a descriptor is not readable", m.Address, m.Size)
	}
	fail := func(err error) error {
		return &Error{Cmd: CmdDMAMap, Errno: unix.EINVAL, Err: fmt.Errorf("%w: map %#x+%#x at offset %#x: %w", ErrRange, m.Address, m.Size, m.Offset, err)}
	}
	if m.Size > maxWindowSize || m.Offset > maxWindowOffset || m.Offset%uint64(unix.Getpagesize()) != 0 {
		return nil, fail(fmt.Errorf("%w: size or offset", vring.ErrInvalidRegion))
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return nil, fail(fmt.Errorf("dup: %w", err))
	}
	sealed, err := vring.SealShrink(dup)
	if err != nil {
		_ = unix.Close(dup)
		return nil, fail(err)
	}
	// Checked after sealing: a sealed file cannot shrink below this size
	// afterwards.
	var st unix.Stat_t
	if err := unix.Fstat(dup, &st); err != nil {
		_ = unix.Close(dup)
		return nil, fail(fmt.Errorf("fstat: %w", err))
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && (st.Size < 0 || uint64(st.Size) < m.Offset+m.Size) {
		_ = unix.Close(dup)
		return nil, fail(fmt.Errorf("%w: the file is %d bytes", vring.ErrInvalidRegion, st.Size))
	}
	prot := unix.PROT_READ
	if m.Flags&DMAWritable != 0 {
		prot |= unix.PROT_WRITE
	}
	mem, err := unix.Mmap(dup, int64(m.Offset), int(m.Size), prot, unix.MAP_SHARED)
	if err != nil {
		_ = unix.Close(dup)
		return nil, fail(fmt.Errorf("mmap: %w", err))
	}
	mp.mem, mp.fd, mp.fdOffset, mp.sealed = mem, dup, m.Offset, sealed
	return mp, nil
}

func toGuest(a uint64) vring.GuestAddr { return vring.GuestAddr(a) }

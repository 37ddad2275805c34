package vfiouser

import (
	"fmt"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vring"
)

// mapping is one DMA_MAP window.
type mapping struct {
	addr, size uint64
	flags      uint32
	// region maps the client's file (nil for a window without a
	// descriptor, reachable only through DMA_READ/DMA_WRITE).
	region *vring.Region
}

func (m *mapping) last() uint64 { return m.addr + m.size - 1 }

// dmaTable is the set of DMA windows, sorted by address. Guarded by
// Server.mu.
type dmaTable struct {
	maps []*mapping
	// graveyard holds mappings unmapped while the data path may still
	// touch them: their pages were replaced by anonymous memory (dropping
	// the client's file), and the address range is released once the
	// device is no longer live.
	graveyard []*vring.Region
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

// remove drops the mapping exactly matching [addr, addr+size).
func (t *dmaTable) remove(addr, size uint64) *mapping {
	for i, m := range t.maps {
		if m.addr == addr && m.size == size {
			t.maps = append(t.maps[:i], t.maps[i+1:]...)
			return m
		}
	}
	return nil
}

// mapFd maps the client's descriptor for a DMA window. The descriptor is
// duplicated by vring.NewFdRegion (which also seals a memfd against
// shrinking and checks the file is long enough); the caller closes fd.
func mapFd(m DMAMap, fd int) (*vring.Region, error) {
	if m.Flags&DMAReadable == 0 {
		return nil, perr(CmdDMAMap, ErrFlags, "window %#x+%#x with a descriptor is not readable", m.Address, m.Size)
	}
	r, err := vring.NewFdRegion(vring.GuestAddr(m.Address), m.Size, fd, m.Offset, nil)
	if err != nil {
		return nil, &Error{Cmd: CmdDMAMap, Errno: unix.EINVAL, Err: fmt.Errorf("%w: map %#x+%#x at offset %#x: %w", ErrRange, m.Address, m.Size, m.Offset, err)}
	}
	return r, nil
}

// retire replaces a region's pages with private anonymous memory, so
// stale users read zeros instead of faulting and the client's file is no
// longer mapped; the region (its address range and duplicated descriptor)
// is released later with Close.
func retire(r *vring.Region) {
	b := r.Bytes()
	if len(b) == 0 {
		return
	}
	_, _ = mmapFixedAnon(b)
}

func toGuest(a uint64) vring.GuestAddr { return vring.GuestAddr(a) }

package vhostuser

import (
	"math"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vring"
)

// maxRegionSize bounds one memory-table region (64 TiB), well above any
// real guest and below what could overflow address arithmetic.
const maxRegionSize = 1 << 46

// peerMemory is guest memory mapped from a front-end's memory table.
type peerMemory struct {
	mem      *vring.Memory
	mappings [][]byte
}

func (p *peerMemory) close() {
	if p == nil {
		return
	}
	if p.mem != nil {
		_ = p.mem.Close() // wrapped regions: only marks them closed
	}
	for _, m := range p.mappings {
		_ = unix.Munmap(m)
	}
	p.mappings = nil
}

// mapMemTable maps every region of a SET_MEM_TABLE. It takes ownership of
// fds (closing them all, mapped or not) and returns typed errors for regions
// that are empty, overflow, overlap (in guest or user address space) or
// whose descriptor is not a regular file long enough to back them (mapping
// past the end of a file would fault on access), and for a table whose
// regions add up to more than limit bytes (checked before anything is
// mapped).
func mapMemTable(rs []MemoryRegion, fds []int, limit uint64) (*peerMemory, error) {
	defer closeFds(fds)
	if len(rs) == 0 {
		return nil, msgErr(ReqSetMemTable, ErrBadRegion, "empty memory table")
	}
	var total uint64 // <= limit
	for i, r := range rs {
		if r.MemorySize > limit-total {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion,
				"regions 0-%d add up to more than %#x bytes (BackendOptions.MaxGuestMemory)", i, limit)
		}
		total += r.MemorySize
	}
	pm := &peerMemory{}
	ok := false
	defer func() {
		if !ok {
			pm.close()
		}
	}()
	page := uint64(unix.Getpagesize())
	regions := make([]*vring.Region, 0, len(rs))
	for i, r := range rs {
		if r.MemorySize == 0 || r.MemorySize > maxRegionSize {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: size %#x", i, r.MemorySize)
		}
		if r.GuestPhysAddr+r.MemorySize-1 < r.GuestPhysAddr || r.UserspaceAddr+r.MemorySize-1 < r.UserspaceAddr ||
			r.MmapOffset > 1<<62 {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: address range overflows", i)
		}
		for j := 0; j < i; j++ {
			o := rs[j]
			if r.UserspaceAddr <= o.UserspaceAddr+o.MemorySize-1 && o.UserspaceAddr <= r.UserspaceAddr+r.MemorySize-1 {
				return nil, msgErr(ReqSetMemTable, ErrBadRegion, "regions %d and %d overlap in user address space", j, i)
			}
		}
		// Seal against shrinking before the size check, so the size seen
		// stays true for as long as the mapping lives (a truncated region
		// would fault on access). Files that cannot be sealed are still
		// accepted; accesses to them are fault-guarded (vring.CatchFault).
		sealed, err := vring.SealShrink(fds[i])
		if err != nil {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: seal: %v", i, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fds[i], &st); err != nil {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: fstat: %v", i, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: descriptor is not a regular file (mode %#o)", i, st.Mode)
		}
		end := r.MmapOffset + r.MemorySize
		if st.Size < 0 || uint64(st.Size) < end {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: file is %d bytes, region needs %d", i, st.Size, end)
		}
		// mmap offsets must be page aligned; map from the page holding
		// mmap_offset and slice. hugetlbfs needs its block size.
		align := page
		if bs := uint64(st.Blksize); bs > align && bs&(bs-1) == 0 {
			align = bs
		}
		start := r.MmapOffset &^ (align - 1)
		length := (end - start + align - 1) &^ (align - 1)
		if length > math.MaxInt {
			// On 32-bit: int(length) would map another length.
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: %#x bytes are more than this process can map", i, length)
		}
		m, err := unix.Mmap(fds[i], int64(start), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: mmap %#x bytes at %#x: %v", i, length, start, err)
		}
		pm.mappings = append(pm.mappings, m)
		view := m[r.MmapOffset-start:][:r.MemorySize]
		reg, err := vring.NewRegion(vring.GuestAddr(r.GuestPhysAddr), view,
			&vring.RegionOptions{UserAddr: vring.HostAddr(r.UserspaceAddr), Sealed: sealed})
		if err != nil {
			return nil, msgErr(ReqSetMemTable, ErrBadRegion, "region %d: %v", i, err)
		}
		regions = append(regions, reg)
	}
	mem, err := vring.NewMemory(regions...)
	if err != nil {
		return nil, msgErr(ReqSetMemTable, ErrBadRegion, "%v", err)
	}
	pm.mem = mem
	ok = true
	return pm, nil
}

// userToGuest translates a ring address the front-end sent.
func userToGuest(mem *vring.Memory, what string, q int, a uint64) (vring.GuestAddr, error) {
	g, err := mem.UserToGuest(vring.HostAddr(a))
	if err != nil {
		return 0, msgErr(ReqSetVringAddr, ErrAddrNotMapped, "queue %d %s address %#x", q, what, a)
	}
	return g, nil
}

package vhostuser

import (
	"math"
	"slices"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vring"
)

// maxRegionSize bounds one memory-table region (64 TiB), well above any
// real guest and below what could overflow address arithmetic.
const maxRegionSize = 1 << 46

// MaxMemSlots is GET_MAX_MEM_SLOTS' answer: the most regions a memory
// table may hold when the front-end builds it region by region
// (PROTOCOL_F_CONFIGURE_MEM_SLOTS, ADD_MEM_REG/REM_MEM_REG). SET_MEM_TABLE
// carries at most MaxRegions. Every region is one mapping; the bytes of
// all of them are bounded by BackendOptions.MaxGuestMemory either way.
const MaxMemSlots = 256

// peerMapping is one mapped region of the front-end's memory. The tables
// built from it share it (ADD_MEM_REG and REM_MEM_REG keep the other
// regions' mappings), and it is unmapped when the last of them, and the
// last orphaned ring using one of them, lets it go.
type peerMapping struct {
	m    []byte
	refs atomic.Int32
}

func (m *peerMapping) put() {
	if m.refs.Add(-1) == 0 {
		_ = unix.Munmap(m.m)
		m.m = nil
	}
}

// peerRegion is a region of the memory table with the mapping it lies in.
type peerRegion struct {
	desc    MemoryRegion
	view    []byte
	sealed  bool
	mapping *peerMapping
}

// same reports whether r is p's region by the spec's identity: guest
// address, size and user address (the mmap offset is not part of it).
func (p peerRegion) same(r MemoryRegion) bool {
	return p.desc.GuestPhysAddr == r.GuestPhysAddr && p.desc.MemorySize == r.MemorySize &&
		p.desc.UserspaceAddr == r.UserspaceAddr
}

// peerMemory is guest memory mapped from a front-end's memory table.
type peerMemory struct {
	mem     *vring.Memory
	regions []peerRegion // in the order the front-end gave them
}

func (p *peerMemory) close() {
	if p == nil {
		return
	}
	if p.mem != nil {
		_ = p.mem.Close() // wrapped regions: only marks them closed
	}
	for _, r := range p.regions {
		r.mapping.put()
	}
	p.regions = nil
}

// bytes is the size of all regions.
func (p *peerMemory) bytes() uint64 {
	var n uint64
	if p != nil {
		for _, r := range p.regions {
			n += r.desc.MemorySize
		}
	}
	return n
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
	regions := make([]peerRegion, 0, len(rs))
	defer func() {
		for _, r := range regions {
			r.mapping.put() // the table took its own references
		}
	}()
	for i, r := range rs {
		if err := checkRegion(ReqSetMemTable, i, r, regions); err != nil {
			return nil, err
		}
		pr, err := mapRegion(ReqSetMemTable, i, r, fds[i])
		if err != nil {
			return nil, err
		}
		regions = append(regions, pr)
	}
	return buildMemory(ReqSetMemTable, regions)
}

// addRegion serves ADD_MEM_REG: old's regions and r, mapped from fd (which
// it closes). The limits are those of a whole table: limit bytes and
// MaxMemSlots regions.
//
// Updates are idempotent: a region the table already has (the same guest
// address, size and user address) is not mapped again, and removeRegion
// takes a region the table does not have as already removed; the table
// then stays old (changed is false). A front-end with several vhost
// devices on one connection sends every update once per device: QEMU
// before 8.0 with a multi-queue vhost-user-net (a device per queue pair,
// each sending its removals and additions in turn, and only the devices
// the guest started). Counting the repeats instead would keep a region a
// first device removed alive until the others removed it too, and refuse
// that device's next addition over the same addresses.
func addRegion(old *peerMemory, r MemoryRegion, fd int, limit uint64) (pm *peerMemory, changed bool, err error) {
	defer closeFds([]int{fd})
	var have []peerRegion
	if old != nil {
		have = old.regions
	}
	if slices.ContainsFunc(have, func(p peerRegion) bool { return p.same(r) }) {
		return old, false, nil
	}
	if len(have) >= MaxMemSlots {
		return nil, false, msgErr(ReqAddMemReg, ErrTooManyRegions, "the table has %d regions (MaxMemSlots)", len(have))
	}
	if total := old.bytes(); r.MemorySize > limit-total {
		return nil, false, msgErr(ReqAddMemReg, ErrBadRegion,
			"%#x bytes more than the %#x mapped exceed %#x (BackendOptions.MaxGuestMemory)", r.MemorySize, total, limit)
	}
	if err := checkRegion(ReqAddMemReg, len(have), r, have); err != nil {
		return nil, false, err
	}
	pr, err := mapRegion(ReqAddMemReg, len(have), r, fd)
	if err != nil {
		return nil, false, err
	}
	defer pr.mapping.put()
	pm, err = buildMemory(ReqAddMemReg, append(slices.Clip(have), pr))
	return pm, err == nil, err
}

// removeRegion serves REM_MEM_REG: old's regions less the one with r's
// guest address, size and user address (the spec's identity; the mmap
// offset is ignored). A region the table does not have is taken as
// removed already (see addRegion): the table stays old (changed is
// false). The table left may be nil (no region).
func removeRegion(old *peerMemory, r MemoryRegion) (pm *peerMemory, changed bool, err error) {
	var have []peerRegion
	if old != nil {
		have = old.regions
	}
	i := slices.IndexFunc(have, func(p peerRegion) bool { return p.same(r) })
	if i < 0 {
		return old, false, nil
	}
	rest := slices.Delete(slices.Clone(have), i, i+1)
	if len(rest) == 0 {
		return nil, true, nil
	}
	pm, err = buildMemory(ReqRemMemReg, rest)
	return pm, err == nil, err
}

// checkRegion checks region i of a table before it is mapped: its size and
// address arithmetic, and that it does not overlap the regions before it
// in user address space (guest-address overlaps are refused by
// vring.NewMemory).
func checkRegion(req Request, i int, r MemoryRegion, before []peerRegion) error {
	if r.MemorySize == 0 || r.MemorySize > maxRegionSize {
		return msgErr(req, ErrBadRegion, "region %d: size %#x", i, r.MemorySize)
	}
	if r.GuestPhysAddr+r.MemorySize-1 < r.GuestPhysAddr || r.UserspaceAddr+r.MemorySize-1 < r.UserspaceAddr ||
		r.MmapOffset > 1<<62 {
		return msgErr(req, ErrBadRegion, "region %d: address range overflows", i)
	}
	for j, p := range before {
		o := p.desc
		if r.UserspaceAddr <= o.UserspaceAddr+o.MemorySize-1 && o.UserspaceAddr <= r.UserspaceAddr+r.MemorySize-1 {
			return msgErr(req, ErrBadRegion, "regions %d and %d overlap in user address space", j, i)
		}
	}
	return nil
}

// mapRegion maps region i from fd (which stays the caller's to close). The
// mapping it returns holds one reference, the caller's.
func mapRegion(req Request, i int, r MemoryRegion, fd int) (peerRegion, error) {
	page := uint64(unix.Getpagesize())
	// Seal against shrinking before the size check, so the size seen
	// stays true for as long as the mapping lives (a truncated region
	// would fault on access). Files that cannot be sealed are still
	// accepted; accesses to them are fault-guarded (vring.CatchFault).
	sealed, err := vring.SealShrink(fd)
	if err != nil {
		return peerRegion{}, msgErr(req, ErrBadRegion, "region %d: seal: %v", i, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return peerRegion{}, msgErr(req, ErrBadRegion, "region %d: fstat: %v", i, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return peerRegion{}, msgErr(req, ErrBadRegion, "region %d: descriptor is not a regular file (mode %#o)", i, st.Mode)
	}
	end := r.MmapOffset + r.MemorySize
	if st.Size < 0 || uint64(st.Size) < end {
		return peerRegion{}, msgErr(req, ErrBadRegion, "region %d: file is %d bytes, region needs %d", i, st.Size, end)
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
		return peerRegion{}, msgErr(req, ErrBadRegion, "region %d: %#x bytes are more than this process can map", i, length)
	}
	m, err := unix.Mmap(fd, int64(start), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return peerRegion{}, msgErr(req, ErrBadRegion, "region %d: mmap %#x bytes at %#x: %v", i, length, start, err)
	}
	pm := &peerMapping{m: m}
	pm.refs.Store(1)
	return peerRegion{desc: r, view: m[r.MmapOffset-start:][:r.MemorySize], sealed: sealed, mapping: pm}, nil
}

// buildMemory makes the guest memory of regions, each wrapped afresh (a
// vring.Region belongs to one vring.Memory) and its mapping referenced once
// more by the new table.
func buildMemory(req Request, regions []peerRegion) (*peerMemory, error) {
	vrs := make([]*vring.Region, 0, len(regions))
	for i, r := range regions {
		reg, err := vring.NewRegion(vring.GuestAddr(r.desc.GuestPhysAddr), r.view,
			&vring.RegionOptions{UserAddr: vring.HostAddr(r.desc.UserspaceAddr), Sealed: r.sealed})
		if err != nil {
			return nil, msgErr(req, ErrBadRegion, "region %d: %v", i, err)
		}
		vrs = append(vrs, reg)
	}
	mem, err := vring.NewMemory(vrs...)
	if err != nil {
		return nil, msgErr(req, ErrBadRegion, "%v", err)
	}
	for _, r := range regions {
		r.mapping.refs.Add(1)
	}
	return &peerMemory{mem: mem, regions: slices.Clone(regions)}, nil
}

// userToGuest translates a ring address the front-end sent.
func userToGuest(mem *vring.Memory, what string, q int, a uint64) (vring.GuestAddr, error) {
	g, err := mem.UserToGuest(vring.HostAddr(a))
	if err != nil {
		return 0, msgErr(ReqSetVringAddr, ErrAddrNotMapped, "queue %d %s address %#x", q, what, a)
	}
	return g, nil
}

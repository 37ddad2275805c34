package vring

import (
	"errors"
	"fmt"
	"io"
	"runtime/debug"
	"sort"
	"sync"
	"sync/atomic"
)

// RegionOptions are optional parameters of a Region. A nil *RegionOptions
// means all defaults.
type RegionOptions struct {
	// Name labels the memfd (visible in /proc/PID/fd); NewMemfdRegion only.
	Name string
	// Fd is the file descriptor the wrapped memory was mapped from, recorded
	// so it can be passed on (vhost-user memory tables, VDUSE). NewRegion
	// only; values <= 0 mean "none" (fd 0 is never guest memory). The region
	// does not own it.
	Fd int
	// FdOffset is the offset of the region's first byte within Fd.
	FdOffset uint64
	// UserAddr is the address of this region in the peer's process (the
	// vhost-user memory table's userspace_addr). Zero means the local address.
	UserAddr HostAddr
	// Sealed records, for NewRegion, that the wrapped memory is protected
	// against its file shrinking (the caller checked or added the seal with
	// SealShrink, or the memory is not file-backed); Region.Sealed reports
	// it. NewMemfdRegion and NewFdRegion find this out themselves.
	Sealed bool
	// NoSeal stops NewFdRegion from adding F_SEAL_SHRINK to the file of
	// an unsealed memfd it maps (see NewFdRegion); Region.Sealed then
	// reports only a seal the file already had.
	NoSeal bool
	// ReadOnly records, for NewRegion, that the wrapped memory is mapped
	// without write permission (a DMA window the VMM made readable only):
	// backing devices that map guest memory themselves map the region
	// read-only (vhost-vdpa would otherwise pin it for writing, which
	// fails). Region.ReadOnly reports it.
	ReadOnly bool
}

// Region is one contiguous range of guest memory backed by host bytes.
// A Region's methods are safe for concurrent use; Close must not race with
// users of the memory.
type Region struct {
	base     GuestAddr
	mem      []byte
	fd       int
	fdOffset uint64
	userAddr HostAddr
	hostAddr HostAddr
	owned    bool // mem is our mapping and fd our descriptor: Close releases them
	sealed   bool // the backing file cannot shrink (F_SEAL_SHRINK)
	readOnly bool // the memory is mapped without write permission
	closed   atomic.Bool
}

// NewRegion wraps existing memory (for example an mmap received from a
// vhost-user peer) as guest memory at base. The caller keeps ownership of
// mem and of opts.Fd; Close does not release them.
func NewRegion(base GuestAddr, mem []byte, opts *RegionOptions) (*Region, error) {
	if len(mem) == 0 {
		return nil, fmt.Errorf("%w: empty memory at %v", ErrInvalidRegion, base)
	}
	if uint64(base)+uint64(len(mem))-1 < uint64(base) {
		return nil, fmt.Errorf("%w: %v+%#x: %w", ErrInvalidRegion, base, len(mem), ErrOverflow)
	}
	r := &Region{base: base, mem: mem, fd: -1, hostAddr: hostAddrOf(mem)}
	if opts != nil {
		if opts.Fd > 0 {
			r.fd = opts.Fd
			r.fdOffset = opts.FdOffset
		}
		r.userAddr = opts.UserAddr
		r.sealed = opts.Sealed
		r.readOnly = opts.ReadOnly
	}
	if r.userAddr == 0 {
		r.userAddr = r.hostAddr
	}
	return r, nil
}

// Base is the guest address of the region's first byte.
func (r *Region) Base() GuestAddr { return r.base }

// Size is the region's length in bytes.
func (r *Region) Size() uint64 { return uint64(len(r.mem)) }

// End is the guest address one past the region's last byte (it is 0
// when the region ends at the top of the address space: see Last).
func (r *Region) End() GuestAddr { return r.base + GuestAddr(len(r.mem)) }

// last is the guest address of the region's last byte (regions are never
// empty, and their constructors refuse ranges past the top of the address
// space).
func (r *Region) last() GuestAddr { return r.base + GuestAddr(len(r.mem)-1) }

// Last is the guest address of the region's last byte. Unlike End, it
// never wraps: use it to compare a region's extent with an address.
func (r *Region) Last() GuestAddr { return r.last() }

// Bytes returns the region's memory. Writes through it are not logged.
func (r *Region) Bytes() []byte { return r.mem }

// Fd is the file descriptor backing the region, or -1.
func (r *Region) Fd() int { return r.fd }

// FdOffset is the offset of the region's first byte within Fd.
func (r *Region) FdOffset() uint64 { return r.fdOffset }

// HostAddr is the address of the region's first byte in this process.
func (r *Region) HostAddr() HostAddr { return r.hostAddr }

// UserAddr is the address of the region's first byte in the peer's process
// (RegionOptions.UserAddr, defaulting to HostAddr).
func (r *Region) UserAddr() HostAddr { return r.userAddr }

// Sealed reports whether the region is protected against its backing file
// shrinking under the mapping: true for NewMemfdRegion, for NewFdRegion when
// the file has (or was given) F_SEAL_SHRINK, and for NewRegion when
// RegionOptions.Sealed said so. An unsealed region's owner may truncate the
// file at any time; accesses to the lost pages then fault (see CatchFault
// and ErrMemoryFault).
func (r *Region) Sealed() bool { return r.sealed }

// ReadOnly reports whether the region's memory is mapped without write
// permission (RegionOptions.ReadOnly): the device may read it but not
// write it.
func (r *Region) ReadOnly() bool { return r.readOnly }

func (r *Region) String() string {
	return fmt.Sprintf("region[%v..%v) size %#x fd %d", r.base, r.base+GuestAddr(len(r.mem)), len(r.mem), r.fd)
}

// Close releases the mapping and fd when the region owns them (memfd and fd
// regions); for wrapped memory it only marks the region closed. Close is
// idempotent.
func (r *Region) Close() error {
	if r.closed.Swap(true) || !r.owned {
		return nil
	}
	return releaseMapping(r.mem, r.fd)
}

// contains reports whether [addr, addr+n) with n >= 1 lies in r, and the offset.
func (r *Region) offset(addr GuestAddr) (uint64, bool) {
	off := uint64(addr - r.base)
	return off, addr >= r.base && off < uint64(len(r.mem))
}

// Memory is guest memory: a set of non-overlapping regions. Its methods are
// safe for concurrent use (the region table is an immutable slice behind an
// atomic pointer, replaced copy-on-write when a fault adds a region; the
// last-hit cache is an atomic index); they must not race with Close or
// RemoveRange. All translations are overflow- and bounds-checked; no guest
// address is ever turned into a host access outside a region.
type Memory struct {
	tab   atomic.Pointer[[]*Region] // sorted by base
	last  atomic.Uint32
	fault func(addr GuestAddr, n uint64) (*Region, error)
	mu    sync.Mutex // serializes table changes
}

// MemoryOptions are optional parameters of a Memory.
type MemoryOptions struct {
	// Fault, when set, is called on a translation miss for [addr, addr+n)
	// (for example VDUSE, whose IOVA mappings appear lazily). It returns a
	// region covering addr, which the Memory then owns and keeps, or an error;
	// the access then fails with ErrOutOfRange wrapping it. Calls are
	// serialized. A returned region that does not cover addr or overlaps an
	// existing one is closed and the access fails.
	Fault func(addr GuestAddr, n uint64) (*Region, error)
}

// NewMemory builds guest memory from regions, which must not overlap. The
// Memory takes ownership: Memory.Close closes them.
func NewMemory(regions ...*Region) (*Memory, error) {
	return NewMemoryWithOptions(nil, regions...)
}

// NewMemoryWithOptions is NewMemory with options. With a Fault function the
// region list may start empty.
func NewMemoryWithOptions(opts *MemoryOptions, regions ...*Region) (*Memory, error) {
	m := &Memory{}
	if opts != nil {
		m.fault = opts.Fault
	}
	if len(regions) == 0 && m.fault == nil {
		return nil, fmt.Errorf("%w: no regions", ErrInvalidRegion)
	}
	rs := make([]*Region, len(regions))
	copy(rs, regions)
	for i, r := range rs {
		if r == nil || len(r.mem) == 0 {
			return nil, fmt.Errorf("%w: region %d is nil or empty", ErrInvalidRegion, i)
		}
		if r.closed.Load() {
			return nil, fmt.Errorf("%w: region %d is closed", ErrInvalidRegion, i)
		}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].base < rs[j].base })
	for i := 1; i < len(rs); i++ {
		if rs[i].base <= rs[i-1].last() {
			return nil, fmt.Errorf("%w: %v and %v", ErrRegionOverlap, rs[i-1], rs[i])
		}
	}
	m.tab.Store(&rs)
	return m, nil
}

// table is the current region table (immutable).
func (m *Memory) table() []*Region { return *m.tab.Load() }

// Regions returns the regions sorted by guest address. The slice is a copy.
func (m *Memory) Regions() []*Region {
	rs := m.table()
	out := make([]*Region, len(rs))
	copy(out, rs)
	return out
}

// Close closes every region.
func (m *Memory) Close() error {
	var errs []error
	for _, r := range m.table() {
		if err := r.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// RemoveRange drops the regions overlapping [start, last] from the table and
// closes them (releasing owned mappings). The caller guarantees that nothing
// uses the Memory meanwhile; queues created before the call hold slices of
// the old regions and must be re-created (from their State) afterwards.
func (m *Memory) RemoveRange(start, last GuestAddr) error {
	if last < start {
		return fmt.Errorf("%w: remove range %v..%v", ErrInvalidRegion, start, last)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.table()
	// The table is sorted and its regions do not overlap: the ones to drop
	// are old[i:j], i the first ending at or after start.
	i := sort.Search(len(old), func(i int) bool { return old[i].last() >= start })
	j := i
	for j < len(old) && old[j].base <= last {
		j++
	}
	gone := old[i:j]
	keep := make([]*Region, 0, len(old)-len(gone))
	keep = append(keep, old[:i]...)
	keep = append(keep, old[j:]...)
	m.tab.Store(&keep)
	m.last.Store(0)
	var errs []error
	for _, r := range gone {
		if err := r.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// find looks addr up in the current table and, on a miss, asks the fault
// function. It returns the table the index refers to, the index (or -1) and
// the fault error, if any.
func (m *Memory) find(addr GuestAddr, n uint64, hint uint32) ([]*Region, int, error) {
	rs := m.table()
	if i := lookupIn(rs, addr, hint); i >= 0 || m.fault == nil {
		return rs, i, nil
	}
	return m.faultIn(addr, n)
}

func (m *Memory) faultIn(addr GuestAddr, n uint64) ([]*Region, int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rs := m.table()
	if i := lookupIn(rs, addr, 0); i >= 0 {
		return rs, i, nil // another goroutine faulted it in
	}
	r, err := m.fault(addr, n)
	if err != nil {
		return rs, -1, err
	}
	if r == nil || len(r.mem) == 0 || r.closed.Load() {
		return rs, -1, fmt.Errorf("%w: fault returned an unusable region", ErrInvalidRegion)
	}
	if _, ok := r.offset(addr); !ok {
		r.Close()
		return rs, -1, fmt.Errorf("%w: fault for %v returned %v", ErrInvalidRegion, addr, r)
	}
	// The table is sorted and its regions do not overlap, so only the
	// neighbours of r's place can overlap it: the region before (the last
	// one starting at or below r) and the one after.
	at := sort.Search(len(rs), func(i int) bool { return rs[i].base > r.base })
	for _, i := range [2]int{at - 1, at} {
		if i < 0 || i >= len(rs) {
			continue
		}
		x := rs[i]
		if x.base <= r.last() && r.base <= x.last() {
			r.Close()
			return rs, -1, fmt.Errorf("%w: faulted %v and %v", ErrRegionOverlap, r, x)
		}
	}
	nt := make([]*Region, 0, len(rs)+1)
	nt = append(nt, rs[:at]...)
	nt = append(nt, r)
	nt = append(nt, rs[at:]...)
	m.tab.Store(&nt)
	return nt, at, nil
}

// missErr is the error for a range whose start is in no region.
func missErr(ferr error) error {
	if ferr != nil {
		return &wrap2{ErrOutOfRange, ferr}
	}
	return ErrOutOfRange
}

// lookupIn finds the region of rs holding addr, trying index hint first.
// It returns the region's index, or -1.
func lookupIn(rs []*Region, addr GuestAddr, hint uint32) int {
	if int(hint) < len(rs) {
		if _, ok := rs[hint].offset(addr); ok {
			return int(hint)
		}
	}
	if len(rs) <= 4 {
		for i, r := range rs {
			if _, ok := r.offset(addr); ok {
				return i
			}
		}
		return -1
	}
	i := sort.Search(len(rs), func(i int) bool { return rs[i].base > addr }) - 1
	if i >= 0 {
		if _, ok := rs[i].offset(addr); ok {
			return i
		}
	}
	return -1
}

// checkEmpty validates a zero-length range at addr: addr must lie in a
// region or be the end of one (addr <= end of memory, as Linux vhost checks
// a zero-length buffer), faulting in as find does. It returns ErrOutOfRange
// (wrapping the fault's error) otherwise.
func (m *Memory) checkEmpty(addr GuestAddr, hint uint32) error {
	_, i, ferr := m.find(addr, 1, hint)
	if i < 0 && addr != 0 {
		_, i, _ = m.find(addr-1, 1, hint)
	}
	if i < 0 {
		return missErr(ferr)
	}
	return nil
}

// checkRange validates [addr, addr+n) for overflow.
func checkRange(addr GuestAddr, n uint64) error {
	if n != 0 && uint64(addr)+n-1 < uint64(addr) {
		return ErrOverflow
	}
	return nil
}

// slice returns the host bytes of [addr, addr+n), which must lie in one
// region, using and updating *hint as the last-hit cache.
func (m *Memory) slice(addr GuestAddr, n uint64, hint *uint32) ([]byte, error) {
	if err := checkRange(addr, n); err != nil {
		return nil, err
	}
	rs, i, ferr := m.find(addr, n, *hint)
	if i < 0 {
		return nil, missErr(ferr)
	}
	*hint = uint32(i)
	r := rs[i]
	off := uint64(addr - r.base)
	if n > uint64(len(r.mem))-off {
		// Tell "not in memory at all" from "crosses into the next region".
		if last := lookupIn(rs, addr+GuestAddr(n-1), *hint); last >= 0 && contiguous(rs, i, last) {
			return nil, ErrSpansRegions
		}
		return nil, ErrOutOfRange
	}
	return r.mem[off : off+n : off+n], nil
}

// contiguous reports whether regions i..j of rs are adjacent in guest
// address space.
func contiguous(rs []*Region, i, j int) bool {
	if j <= i {
		return false
	}
	for k := i + 1; k <= j; k++ {
		if rs[k-1].End() != rs[k].base {
			return false
		}
	}
	return true
}

// Slice returns the host bytes backing [addr, addr+n) without copying. The
// range must lie in a single region (ErrSpansRegions otherwise). n == 0
// returns an empty slice when addr is in memory. Writes through the slice are
// not logged.
func (m *Memory) Slice(addr GuestAddr, n uint64) ([]byte, error) {
	hint := m.last.Load()
	var b []byte
	var err error
	if n == 0 {
		_, i, ferr := m.find(addr, 1, hint)
		if i >= 0 {
			return []byte{}, nil
		}
		err = missErr(ferr)
	} else {
		old := hint
		b, err = m.slice(addr, n, &hint)
		if err == nil && hint != old {
			m.last.Store(hint)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("vring: slice %v+%#x: %w", addr, n, err)
	}
	return b, nil
}

// Contains reports whether [addr, addr+n) is entirely backed by guest memory
// (possibly by several adjacent regions).
func (m *Memory) Contains(addr GuestAddr, n uint64) bool {
	return m.walk(addr, n, func([]byte, uint64) {}) == nil
}

// walk calls fn for each region piece of [addr, addr+n) in order, with the
// piece and its offset within the range. It validates the whole range first,
// so fn is never called for a range that then fails.
func (m *Memory) walk(addr GuestAddr, n uint64, fn func(b []byte, done uint64)) error {
	if err := checkRange(addr, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	// Validate (faulting in missing pieces).
	hint := m.last.Load()
	var rs []*Region
	a, left := addr, n
	for left > 0 {
		var i int
		var ferr error
		rs, i, ferr = m.find(a, left, hint)
		if i < 0 {
			return missErr(ferr)
		}
		hint = uint32(i)
		r := rs[i]
		avail := uint64(len(r.mem)) - uint64(a-r.base)
		if avail >= left {
			break
		}
		left -= avail
		a += GuestAddr(avail)
	}
	// Copy. rs holds every piece (faults only add regions), and adjacent
	// pieces are consecutive in the sorted table.
	a, left = addr, n
	var done uint64
	for i := lookupIn(rs, addr, 0); left > 0; i++ {
		r := rs[i]
		off := uint64(a - r.base)
		k := min(uint64(len(r.mem))-off, left)
		fn(r.mem[off:off+k], done)
		done += k
		left -= k
		a += GuestAddr(k)
	}
	return nil
}

// guardedWalk is walk with memory faults turned into a *FaultError (Guard
// without the closure): a mapping truncated by its owner fails the copy
// instead of ending the process. The copy may then be partly done.
func (m *Memory) guardedWalk(addr GuestAddr, n uint64, fn func(b []byte, done uint64)) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer CatchFault(&err)
	return m.walk(addr, n, fn)
}

// Read copies len(p) bytes of guest memory at addr into p. The range may span
// adjacent regions; nothing is copied when any part is outside memory. A
// memory fault (a peer truncated the file behind a region) returns an error
// matching ErrMemoryFault, with p partly filled.
func (m *Memory) Read(addr GuestAddr, p []byte) error {
	err := m.guardedWalk(addr, uint64(len(p)), func(b []byte, done uint64) { copy(p[done:], b) })
	if err != nil {
		return fmt.Errorf("vring: read %v+%#x: %w", addr, len(p), err)
	}
	return nil
}

// Write copies p into guest memory at addr. The range may span adjacent
// regions; nothing is written when any part is outside memory. Writes are not
// logged. A memory fault returns an error matching ErrMemoryFault, with the
// range partly written.
func (m *Memory) Write(addr GuestAddr, p []byte) error {
	err := m.guardedWalk(addr, uint64(len(p)), func(b []byte, done uint64) { copy(b, p[done:]) })
	if err != nil {
		return fmt.Errorf("vring: write %v+%#x: %w", addr, len(p), err)
	}
	return nil
}

// ReadAt implements io.ReaderAt with off as a guest address. It reads all of
// p or nothing.
func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("vring: read at negative offset %d: %w", off, ErrOutOfRange)
	}
	if err := m.Read(GuestAddr(off), p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt implements io.WriterAt with off as a guest address. It writes all
// of p or nothing.
func (m *Memory) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("vring: write at negative offset %d: %w", off, ErrOutOfRange)
	}
	if err := m.Write(GuestAddr(off), p); err != nil {
		return 0, err
	}
	return len(p), nil
}

var (
	_ io.ReaderAt = (*Memory)(nil)
	_ io.WriterAt = (*Memory)(nil)
)

// UserToGuest translates an address in the peer's process (vhost-user ring
// and memory-table addresses) to a guest address using the regions' UserAddr.
func (m *Memory) UserToGuest(h HostAddr) (GuestAddr, error) {
	for _, r := range m.table() {
		if h >= r.userAddr && uint64(h-r.userAddr) < uint64(len(r.mem)) {
			return r.base + GuestAddr(h-r.userAddr), nil
		}
	}
	return 0, fmt.Errorf("vring: user address %v: %w", h, ErrOutOfRange)
}

// GuestToHost translates a guest address to this process' virtual address
// (for vhost-kernel ring addresses).
func (m *Memory) GuestToHost(g GuestAddr) (HostAddr, error) {
	rs, i, ferr := m.find(g, 1, m.last.Load())
	if i >= 0 {
		r := rs[i]
		return r.hostAddr + HostAddr(g-r.base), nil
	}
	return 0, fmt.Errorf("vring: guest address %v: %w", g, missErr(ferr))
}

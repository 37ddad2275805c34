package vfiouser

import (
	"fmt"
	"math"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vring"
)

// Limits of a DMA window with a descriptor. A window holds one RAM block
// of the guest: 32 TiB is the memory of the largest guests in service
// (vring.NewFdRegion allows 64 TiB; Options.DMABudget bounds all the
// windows together); on 32-bit, what an int (a mapping's length) holds.
// The offset limit is vring.NewFdRegion's.
const (
	maxWindowSize   = min(32<<40, math.MaxInt)
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
	// file is the file mem maps (nil: none), whose descriptor is handed on
	// with the memory (vring.Region.Fd) to backing devices that map guest
	// memory themselves; fdOffset is the window's offset in it.
	file     *dmaFile
	fdOffset uint64
}

func (m *mapping) last() uint64 { return m.addr + m.size - 1 }

// fd is the descriptor of the window's file, -1 for none.
func (m *mapping) fd() int {
	if m.file == nil {
		return -1
	}
	return m.file.fd
}

// fileID identifies an open file as the windows share it: its device and
// inode numbers, and the access mode it was opened with (a window mapped
// from a descriptor opened for writing must not hand on a read-only one).
// Only regular files (memfds, tmpfs, hugetlbfs and disk files) are
// identified by their inode: other kinds may share one inode between
// files (every anonymous-inode file does) or keep state per open file, so
// each of their descriptors is a file of its own (fd, the descriptor the
// table keeps, is unique among the open ones; -1 for a regular file).
type fileID struct {
	dev, ino uint64
	mode     int
	fd       int
}

// dmaFile is a file the client's windows map. The server holds one
// descriptor of it, shared by all of them: QEMU maps every window of a
// memory backend (RAM below and above 4 GiB, each virtio-mem block) from
// the backend's one file, and a descriptor per window would let a client
// fill this process's descriptor table with windows.
type dmaFile struct {
	id   fileID
	fd   int
	refs int // windows mapping it
	// sealed: the file cannot shrink under the windows (vring.SealShrink).
	sealed bool
}

// dmaTable is the set of DMA windows, sorted by address, and the files
// they map. Guarded by Server.mu.
type dmaTable struct {
	maps  []*mapping
	files map[fileID]*dmaFile
	// graveyard holds the address ranges of windows retired while the data
	// path could not be stopped (see retire); they are unmapped once it has
	// stopped. At most maxRetired.
	graveyard [][]byte
	// mapped and buried are the bytes of the windows' mappings and of the
	// graveyard: reserved is asked on every DMA_MAP, and a client may hold
	// DefaultMaxDMAWindows windows.
	mapped, buried uint64
}

// reserved is the address space the table holds: the windows mapped and
// the retired ranges.
func (t *dmaTable) reserved() uint64 { return t.mapped + t.buried }

// find returns the mapping containing addr, or nil.
func (t *dmaTable) find(addr uint64) *mapping {
	i := t.search(addr)
	if i < len(t.maps) && t.maps[i].addr <= addr {
		return t.maps[i]
	}
	return nil
}

// search is the index of the first mapping ending at or after addr.
func (t *dmaTable) search(addr uint64) int {
	return sort.Search(len(t.maps), func(i int) bool { return t.maps[i].last() >= addr })
}

// overlaps reports whether [addr, last] intersects a mapping.
func (t *dmaTable) overlaps(addr, last uint64) bool {
	i := t.search(addr)
	return i < len(t.maps) && t.maps[i].addr <= last
}

// insert adds m, which overlaps no mapping, and the file it maps: fd, a
// descriptor of file id the caller owns, is kept when the table has no
// descriptor of that file yet and closed otherwise (fd < 0: m maps no
// file).
func (t *dmaTable) insert(m *mapping, id fileID, fd int, sealed bool) {
	if fd >= 0 {
		f := t.files[id]
		if f == nil {
			if t.files == nil {
				t.files = map[fileID]*dmaFile{}
			}
			f = &dmaFile{id: id, fd: fd}
			t.files[id] = f
		} else {
			_ = unix.Close(fd)
		}
		f.refs++
		f.sealed = f.sealed || sealed
		m.file = f
	}
	i := t.search(m.addr)
	t.maps = append(t.maps, nil)
	copy(t.maps[i+1:], t.maps[i:])
	t.maps[i] = m
	t.mapped += uint64(len(m.mem))
}

// hasFile reports whether the table holds a descriptor of file id.
func (t *dmaTable) hasFile(id fileID) bool { return t.files[id] != nil }

// windowSel selects the windows a drop removes: all of them, or the one
// that is exactly [addr, addr+size).
type windowSel struct {
	all        bool
	addr, size uint64
}

// selected returns the indexes [i, j) of the windows sel selects.
func (t *dmaTable) selected(sel windowSel) (i, j int) {
	if sel.all {
		return 0, len(t.maps)
	}
	i = t.search(sel.addr)
	if i < len(t.maps) && t.maps[i].addr == sel.addr && t.maps[i].size == sel.size {
		return i, i + 1
	}
	return i, i
}

// remove takes the mappings sel selects out of the table and returns them;
// they still hold their memory and file (release or retire).
func (t *dmaTable) remove(sel windowSel) []*mapping {
	i, j := t.selected(sel)
	gone := make([]*mapping, j-i)
	copy(gone, t.maps[i:j])
	for _, m := range gone {
		t.mapped -= uint64(len(m.mem))
	}
	n := copy(t.maps[i:], t.maps[j:])
	clear(t.maps[i+n:])
	t.maps = t.maps[:i+n]
	return gone
}

// release unmaps a removed window's memory and lets go of its file.
// Nothing may be using the memory.
func (t *dmaTable) release(m *mapping) {
	if m.mem != nil {
		_ = unix.Munmap(m.mem)
		m.mem = nil
	}
	t.putFile(m)
}

// retire releases what a removed window holds of the client while a data
// path that cannot be stopped may still be touching its memory: the pages
// are replaced by private anonymous memory (stale users read zeros and
// their writes go nowhere, instead of faulting or reaching a mapping that
// later reuses the addresses) and the window lets go of its file. The
// address range stays reserved in the graveyard until reap.
func (t *dmaTable) retire(m *mapping) {
	b := m.mem
	m.mem = nil
	t.putFile(m)
	if len(b) > 0 {
		_, _ = mmapFixedAnon(b)
		t.graveyard = append(t.graveyard, b)
		t.buried += uint64(len(b))
	}
}

// reap unmaps the retired ranges; the data path must have stopped since
// they were retired.
func (t *dmaTable) reap() {
	for _, b := range t.graveyard {
		_ = unix.Munmap(b)
	}
	t.graveyard, t.buried = nil, 0
}

// putFile drops m's reference to its file, closing the descriptor with the
// last one.
func (t *dmaTable) putFile(m *mapping) {
	f := m.file
	if f == nil {
		return
	}
	m.file = nil
	if f.refs--; f.refs == 0 {
		_ = unix.Close(f.fd)
		delete(t.files, f.id)
	}
}

// identify validates a DMA_MAP with descriptor fd and tells which file it
// maps. It returns the descriptor to keep: fd, or a duplicate of it above
// the standard streams (fd closed), since vring.RegionOptions takes
// descriptor 0 for none.
func identify(m DMAMap, fd int) (int, fileID, error) {
	if m.Flags&DMAReadable == 0 {
		return fd, fileID{}, perr(CmdDMAMap, ErrFlags, "window %#x+%#x with a descriptor is not readable", m.Address, m.Size)
	}
	if m.Size > maxWindowSize || m.Offset > maxWindowOffset || m.Offset%uint64(unix.Getpagesize()) != 0 {
		return fd, fileID{}, mapErr(m, fmt.Errorf("%w: size or offset", vring.ErrInvalidRegion))
	}
	if fd < 3 {
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
		if err != nil {
			return fd, fileID{}, mapErr(m, fmt.Errorf("dup: %w", err))
		}
		_ = unix.Close(fd)
		fd = dup
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fd, fileID{}, mapErr(m, fmt.Errorf("fstat: %w", err))
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return fd, fileID{}, mapErr(m, fmt.Errorf("fcntl: %w", err))
	}
	id := fileID{dev: uint64(st.Dev), ino: uint64(st.Ino), mode: fl & unix.O_ACCMODE, fd: -1}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		id.fd = fd
	}
	return fd, id, nil
}

// mapErr is the error of a DMA_MAP whose file cannot be mapped.
func mapErr(m DMAMap, err error) error {
	return &Error{Cmd: CmdDMAMap, Errno: unix.EINVAL, Err: fmt.Errorf("%w: map %#x+%#x at offset %#x: %w", ErrRange, m.Address, m.Size, m.Offset, err)}
}

// mapFile maps the window m describes from fd, the client's descriptor, as
// vring.NewFdRegion would (a memfd sealed against shrinking, a regular
// file checked to be long enough), with the window's protection: read-only
// unless the window is writable, so a device write into a read-only window
// faults (the data path catches faults: vring.CatchFault) instead of
// changing the client's memory. It reports whether the file is sealed.
func mapFile(m DMAMap, fd int) (mem []byte, sealed bool, err error) {
	sealed, err = vring.SealShrink(fd)
	if err != nil {
		return nil, false, mapErr(m, err)
	}
	// Checked after sealing: a sealed file cannot shrink below this size
	// afterwards.
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, false, mapErr(m, fmt.Errorf("fstat: %w", err))
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && (st.Size < 0 || uint64(st.Size) < m.Offset+m.Size) {
		return nil, false, mapErr(m, fmt.Errorf("%w: the file is %d bytes", vring.ErrInvalidRegion, st.Size))
	}
	prot := unix.PROT_READ
	if m.Flags&DMAWritable != 0 {
		prot |= unix.PROT_WRITE
	}
	mem, err = unix.Mmap(fd, int64(m.Offset), int(m.Size), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, false, mapErr(m, fmt.Errorf("mmap: %w", err))
	}
	return mem, sealed, nil
}

func toGuest(a uint64) vring.GuestAddr { return vring.GuestAddr(a) }

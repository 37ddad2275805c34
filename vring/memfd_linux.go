package vring

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// NewMemfdRegion creates size bytes of zeroed guest memory at base, backed by
// a memfd mapped MAP_SHARED (what vhost-vdpa and vhost-user peers need: the
// kernel ignores anonymous private memory, and a peer maps the same fd).
// Fd, FdOffset (0) and HostAddr describe it; Close unmaps and closes the fd.
// Only opts.Name and opts.UserAddr are used.
func NewMemfdRegion(base GuestAddr, size uint64, opts *RegionOptions) (*Region, error) {
	if size == 0 || size > 1<<46 {
		return nil, fmt.Errorf("%w: memfd size %#x", ErrInvalidRegion, size)
	}
	if uint64(base)+size-1 < uint64(base) {
		return nil, fmt.Errorf("%w: %v+%#x: %w", ErrInvalidRegion, base, size, ErrOverflow)
	}
	name := "vring-guest-memory"
	var user HostAddr
	if opts != nil {
		if opts.Name != "" {
			name = opts.Name
		}
		user = opts.UserAddr
	}
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("vring: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vring: ftruncate memfd to %#x: %w", size, err)
	}
	return mapFd(base, size, fd, 0, user)
}

// NewFdRegion maps size bytes of fd at offset (MAP_SHARED, read-write) as
// guest memory at base: what a vhost-user back-end does with a memory-table
// entry. The region keeps its own duplicate of fd; the caller may close its
// copy. Close unmaps and closes the duplicate.
func NewFdRegion(base GuestAddr, size uint64, fd int, offset uint64, opts *RegionOptions) (*Region, error) {
	if size == 0 || size > 1<<46 || offset > 1<<62 {
		return nil, fmt.Errorf("%w: fd region size %#x offset %#x", ErrInvalidRegion, size, offset)
	}
	if uint64(base)+size-1 < uint64(base) {
		return nil, fmt.Errorf("%w: %v+%#x: %w", ErrInvalidRegion, base, size, ErrOverflow)
	}
	if offset%uint64(unix.Getpagesize()) != 0 {
		return nil, fmt.Errorf("%w: fd offset %#x not page aligned", ErrInvalidRegion, offset)
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vring: dup fd %d: %w", fd, err)
	}
	var user HostAddr
	if opts != nil {
		user = opts.UserAddr
	}
	return mapFd(base, size, dup, offset, user)
}

// mapFd maps fd and builds an owning region; it closes fd on failure.
func mapFd(base GuestAddr, size uint64, fd int, offset uint64, user HostAddr) (*Region, error) {
	mem, err := unix.Mmap(fd, int64(offset), int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vring: mmap %#x bytes of fd %d at %#x: %w", size, fd, offset, err)
	}
	r := &Region{base: base, mem: mem, fd: fd, fdOffset: offset, hostAddr: hostAddrOf(mem), owned: true}
	r.userAddr = user
	if r.userAddr == 0 {
		r.userAddr = r.hostAddr
	}
	return r, nil
}

func releaseMapping(mem []byte, fd int) error {
	err := unix.Munmap(mem)
	if fd >= 0 {
		if cerr := unix.Close(fd); err == nil {
			err = cerr
		}
	}
	if err != nil {
		return fmt.Errorf("vring: release region: %w", err)
	}
	return nil
}

package vring

import (
	"fmt"
	"math"

	"golang.org/x/sys/unix"
)

// NewMemfdRegion creates size bytes of zeroed guest memory at base, backed by
// a memfd mapped MAP_SHARED (what vhost-vdpa and vhost-user peers need: the
// kernel ignores anonymous private memory, and a peer maps the same fd).
// Fd, FdOffset (0) and HostAddr describe it; Close unmaps and closes the fd.
// Only opts.Name and opts.UserAddr are used. The memfd is sealed against
// shrinking (F_SEAL_SHRINK; it may still grow and more seals may be added),
// so a peer it is passed to cannot take pages away from under this
// process's mapping: Sealed reports true. A size of 0 or above 64 TiB (on
// 32-bit, above math.MaxInt) is refused with ErrInvalidRegion.
func NewMemfdRegion(base GuestAddr, size uint64, opts *RegionOptions) (*Region, error) {
	if size == 0 || size > maxMapping {
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
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("vring: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vring: ftruncate memfd to %#x: %w", size, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vring: seal memfd against shrinking: %w", err)
	}
	return mapFd(base, size, fd, 0, user, true)
}

// NewFdRegion maps size bytes of fd at offset (MAP_SHARED, read-write) as
// guest memory at base: what a vhost-user back-end does with a memory-table
// entry. The region keeps its own duplicate of fd; the caller may close its
// copy. Close unmaps and closes the duplicate.
//
// The file belongs to a peer that may truncate it while it is mapped, after
// which accesses to the lost pages fault. NewFdRegion first protects the
// mapping where it can (SealShrink: a memfd already sealed with
// F_SEAL_SHRINK, as QEMU's memory-backend-memfd creates them, is fine; an
// unsealed memfd whose seals are not locked gets F_SEAL_SHRINK added,
// unless opts.NoSeal), then checks that a regular file is long enough for
// [offset, offset+size) (ErrInvalidRegion otherwise: the mapping would
// fault). Region.Sealed reports the outcome; accesses to an unsealed
// region should be made under CatchFault or Guard. Sizes are bounded as
// for NewMemfdRegion.
func NewFdRegion(base GuestAddr, size uint64, fd int, offset uint64, opts *RegionOptions) (*Region, error) {
	if size == 0 || size > maxMapping || offset > 1<<62 {
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
	noSeal := false
	if opts != nil {
		user, noSeal = opts.UserAddr, opts.NoSeal
	}
	sealed, err := sealShrink(dup, !noSeal)
	if err != nil {
		unix.Close(dup)
		return nil, err
	}
	// Checked after sealing: a sealed file cannot shrink below this size
	// afterwards.
	var st unix.Stat_t
	if err := unix.Fstat(dup, &st); err != nil {
		unix.Close(dup)
		return nil, fmt.Errorf("vring: fstat fd %d: %w", fd, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && (st.Size < 0 || uint64(st.Size) < offset+size) {
		unix.Close(dup)
		return nil, fmt.Errorf("%w: fd %d is %d bytes, region needs %#x at %#x", ErrInvalidRegion, fd, st.Size, size, offset)
	}
	return mapFd(base, size, dup, offset, user, sealed)
}

// SealShrink protects fd's file against shrinking, where that is possible,
// and reports whether it is protected. A file already sealed with
// F_SEAL_SHRINK is; a file that supports sealing and whose seals are not
// locked (F_SEAL_SEAL clear: a memfd created with MFD_ALLOW_SEALING) gets
// F_SEAL_SHRINK added; any other file (sealing locked without
// F_SEAL_SHRINK, a memfd created without MFD_ALLOW_SEALING, a file system
// without seals) is not protected, and false is returned with a nil error.
//
// Adding the seal is permanent and affects the peer that owns the file: it
// can no longer shrink it, even after this process unmaps it. That is the
// one thing the peer must not do while the memory is in use anyway, and it
// may still grow the file, write to it and punch holes into it, so a
// device adds it (NewFdRegion does, unless RegionOptions.NoSeal).
func SealShrink(fd int) (bool, error) { return sealShrink(fd, true) }

func sealShrink(fd int, add bool) (bool, error) {
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err == unix.EINVAL {
		return false, nil // the file system does not support sealing
	}
	if err != nil {
		return false, fmt.Errorf("vring: get seals of fd %d: %w", fd, err)
	}
	if seals&unix.F_SEAL_SHRINK != 0 {
		return true, nil
	}
	if !add || seals&unix.F_SEAL_SEAL != 0 {
		return false, nil
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK); err != nil {
		// EPERM: the owner locked the seals meanwhile (perhaps with
		// F_SEAL_SHRINK among them: look again), or the fd is not open
		// for writing.
		if err == unix.EPERM {
			seals, err = unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
			return err == nil && seals&unix.F_SEAL_SHRINK != 0, nil
		}
		return false, fmt.Errorf("vring: seal fd %d against shrinking: %w", fd, err)
	}
	return true, nil
}

// maxMapping is the largest region NewMemfdRegion and NewFdRegion map: 64
// TiB, and on 32-bit what an int (a slice's length) holds, less than 2 GiB;
// a larger size is refused with ErrInvalidRegion rather than truncated to
// the length of another mapping.
const maxMapping = min(1<<46, math.MaxInt)

// mapFd maps fd and builds an owning region; it closes fd on failure.
func mapFd(base GuestAddr, size uint64, fd int, offset uint64, user HostAddr, sealed bool) (*Region, error) {
	mem, err := unix.Mmap(fd, int64(offset), int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vring: mmap %#x bytes of fd %d at %#x: %w", size, fd, offset, err)
	}
	r := &Region{base: base, mem: mem, fd: fd, fdOffset: offset, hostAddr: hostAddrOf(mem), owned: true, sealed: sealed}
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

package dirty

import (
	"os"

	"golang.org/x/sys/unix"
)

// This file holds every system call of the package: creating and mapping a
// memfd for a shared bitmap, mapping a log fd a peer sent, finding the parts
// of such a file that hold data, and reading the machine's memory size.
// Callers validate sizes; errors are wrapped in *OpError with the call's
// name.

// mapShared creates a memfd named name of exactly size bytes, seals its size
// so no process sharing it can shrink it under our mapping (which would turn
// our next access into SIGBUS), and maps it read-write, MAP_SHARED.
func mapShared(size uint64, name string) (mapping []byte, fd int, err error) {
	fd, err = unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, -1, &OpError{Op: "memfd_create", Err: err}
	}
	fail := func(op string, err error) ([]byte, int, error) {
		unix.Close(fd)
		return nil, -1, &OpError{Op: op, Err: err}
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return fail("ftruncate", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		return fail("fcntl(F_ADD_SEALS)", err)
	}
	mapping, err = unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail("mmap", err)
	}
	return mapping, fd, nil
}

// mapFd maps size bytes of fd starting at offset (any offset: the mapping
// starts at the page boundary below it). It duplicates fd, so the caller
// keeps ownership of the fd it passed. view is the size bytes at offset;
// mapping is what must be unmapped.
func mapFd(fd int, offset, size uint64) (mapping, view []byte, dup int, err error) {
	pg := uint64(os.Getpagesize())
	start := offset &^ (pg - 1)
	lead := offset - start
	if size > MaxSize || offset > 1<<62 {
		return nil, nil, -1, &OpError{Op: "mmap", Err: ErrMemory}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, nil, -1, &OpError{Op: "fstat", Err: err}
	}
	dup, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, nil, -1, &OpError{Op: "fcntl(F_DUPFD_CLOEXEC)", Err: err}
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG {
		// Best effort: forbid the peer to shrink the file under our mapping.
		// This fails harmlessly on files that do not allow sealing (or are
		// sealed already), so the error is deliberately ignored; the size
		// check below is then all the protection there is.
		_, _ = unix.FcntlInt(uintptr(dup), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK)
		if err := unix.Fstat(dup, &st); err != nil {
			unix.Close(dup)
			return nil, nil, -1, &OpError{Op: "fstat", Err: err}
		}
		if st.Size < 0 || uint64(st.Size) < offset+size {
			unix.Close(dup)
			return nil, nil, -1, &OpError{Op: "mmap", Err: ErrMemory}
		}
	}
	mapping, err = unix.Mmap(dup, int64(start), int(lead+size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(dup)
		return nil, nil, -1, &OpError{Op: "mmap", Err: err}
	}
	return mapping, mapping[lead : lead+size : lead+size], dup, nil
}

func unmap(mapping []byte) error {
	if err := unix.Munmap(mapping); err != nil {
		return &OpError{Op: "munmap", Err: err}
	}
	return nil
}

func closeFd(fd int) error {
	if err := unix.Close(fd); err != nil {
		return &OpError{Op: "close", Err: err}
	}
	return nil
}

// physMem returns the machine's physical memory in bytes, or 0 when
// sysinfo(2) fails.
func physMem() uint64 {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0
	}
	return uint64(si.Totalram) * max(uint64(si.Unit), 1)
}

// seekData returns the first range [start, end) of fd's file at or after
// off that holds data (lseek SEEK_DATA, then SEEK_HOLE). ok is false when
// there is no data at or after off (ENXIO). On a file that cannot tell
// (another error) the whole rest of the file is data: end is -1.
//
// A memfd (shmem) reports a page as data once it exists: written by any
// process, or swapped out (a swapped page is data too, so a dirty word on
// it is never skipped). A page that was never touched is a hole. The
// calls move the file offset of the shared file description, which no one
// uses: logs are only ever mapped.
func seekData(fd int, off int64) (start, end int64, ok bool) {
	start, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return 0, 0, false
	}
	if err != nil {
		return off, -1, true
	}
	end, err = unix.Seek(fd, start, unix.SEEK_HOLE)
	if err != nil {
		return start, -1, true
	}
	return start, end, true
}

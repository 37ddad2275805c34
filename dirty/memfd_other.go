//go:build !linux

package dirty

func mapShared(size uint64, name string) ([]byte, int, error) {
	return nil, -1, &OpError{Op: "memfd_create", Err: ErrUnsupported}
}

func mapFd(fd int, offset, size uint64) ([]byte, []byte, int, error) {
	return nil, nil, -1, &OpError{Op: "mmap", Err: ErrUnsupported}
}

func unmap([]byte) error { return nil }

func closeFd(int) error { return nil }

func physMem() uint64 { return 0 }

func seekData(fd int, off int64) (int64, int64, bool) { return off, -1, true }

func registerBarrier() bool { return false }

func processBarrier() error { return nil }

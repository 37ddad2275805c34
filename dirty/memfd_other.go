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

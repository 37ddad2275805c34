package vring_test

import (
	"errors"
	"fmt"
	"runtime/debug"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vring"
)

// A worker touching guest memory that a peer may truncate: SetPanicOnFault
// once for the goroutine, CatchFault once for the loop.
func ExampleCatchFault() {
	// The peer's memory: a memfd it can shrink (no MFD_ALLOW_SEALING, so
	// nobody can seal it).
	fd, _ := unix.MemfdCreate("peer", unix.MFD_CLOEXEC)
	defer unix.Close(fd)
	_ = unix.Ftruncate(fd, 2*4096)
	r, err := vring.NewFdRegion(0, 2*4096, fd, 0, nil)
	if err != nil {
		panic(err)
	}
	mem, _ := vring.NewMemory(r)
	defer mem.Close()
	fmt.Println("sealed:", r.Sealed())

	buf, _ := mem.Slice(4096, 16) // zero-copy, the page the peer will drop
	_ = unix.Ftruncate(fd, 4096)

	done := make(chan error)
	go func() {
		debug.SetPanicOnFault(true) // this goroutine only
		done <- func() (err error) {
			defer vring.CatchFault(&err)
			for i := range buf {
				buf[i] = 1 // faults
			}
			return nil
		}()
	}()
	err = <-done
	fmt.Println(errors.Is(err, vring.ErrMemoryFault))
	// Output:
	// sealed: false
	// true
}

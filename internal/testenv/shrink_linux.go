//go:build linux

package testenv

import (
	"testing"

	"golang.org/x/sys/unix"
)

// ShrinkLoop starts a peer that truncates the file fd to zero bytes and
// regrows it to size, over and over as fast as it can: what a vhost-user
// front-end or a VDUSE client that shares memory with this process may do
// to the file behind a mapping, so that accesses to it fault at any moment.
// It returns a function that stops the peer and waits for it. Defer that
// after the descriptor's Close, so that it runs first: the peer must never
// truncate a closed descriptor number, which may already name another file.
func ShrinkLoop(t testing.TB, fd int, size int64) (stop func()) {
	t.Helper()
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		for {
			select {
			case <-done:
				return
			default:
			}
			if err := unix.Ftruncate(fd, 0); err != nil {
				t.Errorf("shrink loop: truncate to 0: %v", err)
				return
			}
			if err := unix.Ftruncate(fd, size); err != nil {
				t.Errorf("shrink loop: regrow to %d: %v", size, err)
				return
			}
		}
	}()
	return func() {
		close(done)
		<-exited
	}
}

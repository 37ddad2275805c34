// Package litmus runs two-thread memory-ordering litmus tests: each side
// on its own locked OS thread, released together round after round by a
// spin barrier, so that the stores and loads of a round race as closely as
// the hardware lets them. vring's notification tests and dirty's
// skipped-mark test use it.
package litmus

import (
	"errors"
	"runtime"
	"sync/atomic"
)

// ErrAborted is what a side gets from Await once the other side has
// stopped (returned an error), so that it does not spin for ever.
var ErrAborted = errors.New("litmus: the other side stopped")

// Barrier releases its two parties together, round after round. The zero
// Barrier is ready to use.
type Barrier struct {
	n       atomic.Uint64
	aborted atomic.Bool
}

// Await is barrier k (k counts from 1, the same sequence for both
// parties). It returns ErrAborted if the other party stopped.
func (b *Barrier) Await(k uint64) error {
	b.n.Add(1)
	for spins := 0; b.n.Load() < 2*k; spins++ {
		if b.aborted.Load() {
			return ErrAborted
		}
		if spins&1023 == 1023 {
			runtime.Gosched() // a loaded or single-CPU machine
		}
	}
	return nil
}

// Aborted reports whether a party has stopped; a side that waits on
// anything but Await checks it.
func (b *Barrier) Aborted() bool { return b.aborted.Load() }

// Run runs side a on the calling goroutine and side b on another, each
// locked to its thread, and returns both errors once both have returned.
// A side that returns an error aborts the barrier.
func Run(bar *Barrier, a, b func() error) (errA, errB error) {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		err := b()
		if err != nil {
			bar.aborted.Store(true)
		}
		done <- err
	}()
	runtime.LockOSThread()
	errA = a()
	runtime.UnlockOSThread()
	if errA != nil {
		bar.aborted.Store(true)
	}
	return errA, <-done
}

// Package ctxclose closes something (a listener, a connection) when a
// context ends, in a way the caller can wait for.
//
// context.AfterFunc runs its function on a goroutine of its own. Code that
// closes a listener or a connection that way and then returns can return
// while that goroutine is still inside Close: the descriptor, and a Unix
// socket's file, outlive the return for a moment, and a server restarted on
// the same path finds them. OnDone's release waits for such a Close.
package ctxclose

import (
	"context"
	"sync"
)

// OnDone arranges for closeFn (a Close method) to be called when ctx ends.
// The returned release cancels that if it has not started, or waits for it
// to finish if it has, and reports whether closeFn was called because ctx
// ended. release may be called more than once; later calls return the
// first one's result without waiting again.
func OnDone(ctx context.Context, closeFn func() error) (release func() (closed bool)) {
	done := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(done)
		_ = closeFn()
	})
	var once sync.Once
	var closed bool
	return func() bool {
		once.Do(func() {
			if !stop() {
				<-done
				closed = true
			}
		})
		return closed
	}
}

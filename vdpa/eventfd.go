package vdpa

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// EventFD is a Linux eventfd used for virtqueue kicks and interrupts. It is
// registered with the Go runtime poller, so Wait blocks a goroutine rather
// than a thread and Close unblocks a pending Wait.
//
// Signal and Wait are safe for concurrent use. The same descriptor can be
// handed to the kernel (SET_VRING_KICK/CALL) or to a vhost-user peer.
type EventFD struct {
	f *os.File
}

// ErrClosed is returned by operations on a closed EventFD or device.
var ErrClosed = errors.New("vdpa: closed")

// NewEventFD creates a non-blocking, close-on-exec eventfd.
func NewEventFD() (*EventFD, error) {
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	return &EventFD{f: os.NewFile(uintptr(fd), "eventfd")}, nil
}

// EventFDFromFd adopts fd (received from a peer, for example). The EventFD
// takes ownership and sets it non-blocking.
func EventFDFromFd(fd int) (*EventFD, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("eventfd: set nonblock: %w", err)
	}
	return &EventFD{f: os.NewFile(uintptr(fd), "eventfd")}, nil
}

// Fd returns the descriptor number. It stays owned by the EventFD.
func (e *EventFD) Fd() int { return int(e.f.Fd()) }

// Signal adds one to the counter, waking a waiter.
func (e *EventFD) Signal() error {
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], 1)
	if _, err := e.f.Write(b[:]); err != nil {
		if errors.Is(err, os.ErrClosed) {
			return ErrClosed
		}
		// EAGAIN means the counter is saturated: the waiter is already due.
		if errors.Is(err, unix.EAGAIN) {
			return nil
		}
		return fmt.Errorf("eventfd signal: %w", err)
	}
	return nil
}

// Wait blocks until the counter is non-zero, resets it and returns its value
// (the number of signals coalesced). It returns ctx.Err() when ctx ends first
// and ErrClosed once the EventFD is closed.
//
// Wait honours ctx through the descriptor's read deadline, so an EventFD has
// one waiter at a time (its queue's owner): os.File serialises concurrent
// reads, and a second waiter would not see its own context end. Hand each
// consumer its own EventFD instead. A context that can never be cancelled
// (context.Background) costs no allocation.
func (e *EventFD) Wait(ctx context.Context) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	// Always start from the context's own deadline (or none), so that a
	// previous Wait whose context was cancelled cannot leave a past deadline
	// behind, and always clear it on the way out.
	dl, _ := ctx.Deadline()
	if err := e.f.SetReadDeadline(dl); err != nil {
		return 0, ErrClosed
	}
	defer e.f.SetReadDeadline(time.Time{})
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { _ = e.f.SetReadDeadline(time.Unix(1, 0)) })
		defer stop()
	}
	var b [8]byte
	for {
		_, err := e.f.Read(b[:])
		switch {
		case err == nil:
			return binary.NativeEndian.Uint64(b[:]), nil
		case errors.Is(err, os.ErrClosed):
			return 0, ErrClosed
		case errors.Is(err, os.ErrDeadlineExceeded):
			if cerr := ctx.Err(); cerr != nil {
				return 0, cerr
			}
			if !dl.IsZero() && !time.Now().Before(dl) {
				return 0, context.DeadlineExceeded
			}
			// Not our deadline: the cancellation callback of an earlier Wait
			// fired late, after that Wait had returned. Restore ours and keep
			// waiting.
			if err := e.f.SetReadDeadline(dl); err != nil {
				return 0, ErrClosed
			}
		default:
			return 0, fmt.Errorf("eventfd wait: %w", err)
		}
	}
}

// TryWait consumes pending signals without blocking; it reports zero when
// none were pending.
func (e *EventFD) TryWait() (uint64, error) {
	var b [8]byte
	rc, err := e.f.SyscallConn()
	if err != nil {
		return 0, ErrClosed
	}
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), b[:])
		return true
	}); err != nil {
		return 0, ErrClosed
	}
	if rerr == unix.EAGAIN {
		return 0, nil
	}
	if rerr != nil || n != 8 {
		return 0, fmt.Errorf("eventfd read: %w", rerr)
	}
	return binary.NativeEndian.Uint64(b[:]), nil
}

// Close closes the descriptor and unblocks any Wait.
func (e *EventFD) Close() error { return e.f.Close() }

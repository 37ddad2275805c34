package vhostsys

import "errors"

// OpError is the error of one vhost operation: Op is the ioctl (or
// "VHOST_IOTLB_MSG_V2 write" and similar for non-ioctl operations) as the
// kernel headers name it, Err the cause, usually a syscall.Errno.
type OpError struct {
	Op  string
	Err error
}

func (e *OpError) Error() string { return e.Op + ": " + e.Err.Error() }

// Unwrap returns the cause, so errors.Is(err, unix.EBUSY) works.
func (e *OpError) Unwrap() error { return e.Err }

// ErrShortWrite is the cause when the kernel accepted fewer bytes of an
// IOTLB message than were written.
var ErrShortWrite = errors.New("short write")

func opErr(op string, err error) error {
	if err == nil {
		return nil
	}
	return &OpError{Op: op, Err: err}
}

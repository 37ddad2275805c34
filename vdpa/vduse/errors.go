package vduse

import "errors"

// Errors returned by the package, checked with errors.Is.
var (
	// ErrUnavailable: VDUSE is not usable here (no /dev/vduse/control: the
	// vduse module is not loaded, or no permission).
	ErrUnavailable = errors.New("vduse: not available")
	// ErrClosed: the device was closed.
	ErrClosed = errors.New("vduse: device closed")
	// ErrBadRequest: the kernel sent a request the device cannot decode or
	// answer (answered VDUSE_REQ_RESULT_FAILED).
	ErrBadRequest = errors.New("vduse: bad request")
	// ErrHandler: the handler is unfit for VDUSE (for example a net device
	// without VERSION_1 and ACCESS_PLATFORM).
	ErrHandler = errors.New("vduse: handler not servable")
)

// OpError is a failed VDUSE operation (an ioctl, open, read or write) and
// the errno or error behind it.
type OpError struct {
	Op  string
	Err error
}

func (e *OpError) Error() string { return "vduse: " + e.Op + ": " + e.Err.Error() }

// Unwrap returns the cause (a syscall.Errno for ioctls).
func (e *OpError) Unwrap() error { return e.Err }

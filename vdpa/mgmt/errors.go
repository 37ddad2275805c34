package mgmt

import "errors"

var (
	// ErrNotAvailable means the kernel has no "vdpa" generic netlink
	// family: the vdpa module is not loaded (or the kernel lacks it).
	ErrNotAvailable = errors.New("vdpa: the kernel's vdpa netlink interface is not available (is the vdpa module loaded?)")
	// ErrMalformed means a kernel reply could not be decoded.
	ErrMalformed = errors.New("vdpa: malformed netlink reply")
	// ErrInvalidSpec means a DeviceSpec was rejected before it was sent.
	ErrInvalidSpec = errors.New("vdpa: invalid device spec")
	// ErrNotFound means a lookup by name found no such device.
	ErrNotFound = errors.New("vdpa: no such device")
)

// OpError is the error of one netlink command: Op is the command as
// linux/vdpa.h names it ("VDPA_CMD_DEV_NEW"), Err the cause. Kernel errnos
// are reachable with errors.Is (for example unix.EEXIST, unix.ENODEV); the
// kernel's extended-ack message, when it sent one, is part of Err's text.
type OpError struct {
	Op  string
	Err error
}

func (e *OpError) Error() string { return e.Op + ": " + e.Err.Error() }

// Unwrap returns the cause.
func (e *OpError) Unwrap() error { return e.Err }

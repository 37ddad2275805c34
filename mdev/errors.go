package mdev

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error returned by this package wraps one of them, so
// callers can test with errors.Is.
var (
	// ErrRegion: the access named a region the device does not have.
	ErrRegion = errors.New("mdev: unknown region")
	// ErrAccessSize: the access width does not match the field (virtio 1.2
	// §4.1.3.1: the driver accesses each field with its natural width; 64-bit
	// fields as two 32-bit halves).
	ErrAccessSize = errors.New("mdev: access size does not match the field")
	// ErrOutOfRange: the access lies (partly) outside the region.
	ErrOutOfRange = errors.New("mdev: access outside the region")
	// ErrBacking: the backing vdpa.Device failed an operation.
	ErrBacking = errors.New("mdev: backing device failed")
	// ErrInvalidOptions: NewDevice was given unusable options or a backing
	// device whose parameters are out of the spec's range.
	ErrInvalidOptions = errors.New("mdev: invalid options")
	// ErrMigrationState: a migration state transition is not possible from
	// the current state (or the operation is not allowed in it).
	ErrMigrationState = errors.New("mdev: illegal migration state transition")
	// ErrNotSupported: the backing device lacks a capability the operation
	// needs (suspend, dirty logging).
	ErrNotSupported = errors.New("mdev: not supported by the backing device")
	// ErrClosed: the device was closed.
	ErrClosed = errors.New("mdev: device closed")
)

// AccessError describes a rejected register access.
type AccessError struct {
	Region Region
	Offset uint64
	Size   int
	Write  bool
	Err    error
}

func (e *AccessError) Error() string {
	op := "read"
	if e.Write {
		op = "write"
	}
	return fmt.Sprintf("mdev: %s %s+%#x size %d: %v", op, e.Region, e.Offset, e.Size, e.Err)
}

func (e *AccessError) Unwrap() error { return e.Err }

// BackingError wraps an error from the backing device with the operation
// that failed.
type BackingError struct {
	Op  string
	Err error
}

func (e *BackingError) Error() string { return fmt.Sprintf("mdev: backing %s: %v", e.Op, e.Err) }

// Unwrap returns both ErrBacking and the backing device's own error.
func (e *BackingError) Unwrap() []error { return []error{ErrBacking, e.Err} }

func backingErr(op string, err error) error {
	if err == nil {
		return nil
	}
	return &BackingError{Op: op, Err: err}
}

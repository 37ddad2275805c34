//go:build !amd64 && !arm64

package vring

import "sync/atomic"

// On architectures without an assembly implementation, 16-bit ring fields
// are accessed with plain aligned halfword loads and stores (single-copy
// atomic on every architecture Go supports) bracketed by sequentially
// consistent sync/atomic operations on a private word, which act as full
// barriers. This never touches a byte outside the 16-bit field.

func load16(p *uint16) uint16 {
	var fence uint32
	v := *p
	atomic.AddUint32(&fence, 1)
	return v
}

func store16(p *uint16, v uint16) {
	var fence uint32
	atomic.AddUint32(&fence, 1)
	*p = v
	atomic.AddUint32(&fence, 1)
}

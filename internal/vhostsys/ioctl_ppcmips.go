//go:build linux && (mips || mipsle || mips64 || mips64le || ppc || ppc64 || ppc64le)

package vhostsys

// The powerpc and mips ioctl encoding: 8 bits number, 8 bits type, 13 bits
// size, 3 bits direction.
const (
	iocNone  = 1
	iocWrite = 4
	iocRead  = 2

	iocSizeBits = 13
)

//go:build linux && !(mips || mipsle || mips64 || mips64le || ppc || ppc64 || ppc64le)

package vhostsys

// The asm-generic ioctl encoding (x86, arm, arm64, riscv, s390, loongarch):
// 8 bits number, 8 bits type, 14 bits size, 2 bits direction.
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2

	iocSizeBits = 14
)

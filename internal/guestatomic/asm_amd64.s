#include "textflag.h"

// Aligned MOVs are single-copy atomic on x86, and TSO orders a load before
// every later load and store: an acquire load. XCHG and LOCK-prefixed
// instructions are full barriers: sequentially consistent stores and
// read-modify-writes, as sync/atomic's are on amd64.

// func load32(p *uint32) uint32
TEXT ·load32(SB), NOSPLIT, $0-12
	MOVQ p+0(FP), AX
	MOVL (AX), AX
	MOVL AX, ret+8(FP)
	RET

// func store32(p *uint32, v uint32)
TEXT ·store32(SB), NOSPLIT, $0-12
	MOVQ p+0(FP), BX
	MOVL v+8(FP), AX
	XCHGL AX, (BX)
	RET

// func load64(p *uint64) uint64
TEXT ·load64(SB), NOSPLIT, $0-16
	MOVQ p+0(FP), AX
	MOVQ (AX), AX
	MOVQ AX, ret+8(FP)
	RET

// func swap64(p *uint64, v uint64) uint64
TEXT ·swap64(SB), NOSPLIT, $0-24
	MOVQ p+0(FP), BX
	MOVQ v+8(FP), AX
	XCHGQ AX, (BX)
	MOVQ AX, ret+16(FP)
	RET

// func or64(p *uint64, v uint64)
TEXT ·or64(SB), NOSPLIT, $0-16
	MOVQ p+0(FP), BX
	MOVQ v+8(FP), AX
	LOCK
	ORQ AX, (BX)
	RET

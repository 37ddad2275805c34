#include "textflag.h"

// LDAR/LDARW are load-acquire and STLR/STLRW store-release, RCsc: a later
// load-acquire is never ordered before an earlier store-release, which makes
// them sequentially consistent together, as sync/atomic's are on arm64. The
// read-modify-writes are load-acquire-exclusive/store-release-exclusive
// loops, which need no CPU feature (LSE is optional before ARMv8.1).

// func load32(p *uint32) uint32
TEXT ·load32(SB), NOSPLIT, $0-12
	MOVD p+0(FP), R0
	LDARW (R0), R1
	MOVW R1, ret+8(FP)
	RET

// func store32(p *uint32, v uint32)
TEXT ·store32(SB), NOSPLIT, $0-12
	MOVD p+0(FP), R0
	MOVWU v+8(FP), R1
	STLRW R1, (R0)
	RET

// func load64(p *uint64) uint64
TEXT ·load64(SB), NOSPLIT, $0-16
	MOVD p+0(FP), R0
	LDAR (R0), R1
	MOVD R1, ret+8(FP)
	RET

// func swap64(p *uint64, v uint64) uint64
TEXT ·swap64(SB), NOSPLIT, $0-24
	MOVD p+0(FP), R0
	MOVD v+8(FP), R1
again:
	LDAXR (R0), R2
	STLXR R1, (R0), R3
	CBNZ R3, again
	MOVD R2, ret+16(FP)
	RET

// func or64(p *uint64, v uint64)
TEXT ·or64(SB), NOSPLIT, $0-16
	MOVD p+0(FP), R0
	MOVD v+8(FP), R1
again:
	LDAXR (R0), R2
	ORR R1, R2, R3
	STLXR R3, (R0), R4
	CBNZ R4, again
	RET

//go:build !race

#include "textflag.h"

// func storeRelease32(p *uint32, v uint32)
// An aligned 32-bit MOV is single-copy atomic, and x86 (TSO) never reorders
// a store with earlier loads or stores: a release store. The call itself
// keeps the compiler from moving memory accesses across it.
TEXT ·storeRelease32(SB), NOSPLIT, $0-12
	MOVQ p+0(FP), AX
	MOVL v+8(FP), BX
	MOVL BX, (AX)
	RET

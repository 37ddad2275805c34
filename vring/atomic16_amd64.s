#include "textflag.h"

// func load16(p *uint16) uint16
// An aligned 16-bit load is single-copy atomic on x86, and x86 (TSO) never
// reorders a load with later loads or stores: acquire.
TEXT ·load16(SB), NOSPLIT, $0-10
	MOVQ p+0(FP), AX
	MOVWLZX (AX), AX
	MOVW AX, ret+8(FP)
	RET

// func store16(p *uint16, v uint16)
// XCHG with a memory operand is implicitly locked: an atomic store that is
// also a full barrier (like sync/atomic.StoreUint32 on amd64).
TEXT ·store16(SB), NOSPLIT, $0-10
	MOVQ p+0(FP), BX
	MOVW v+8(FP), AX
	XCHGW AX, (BX)
	RET

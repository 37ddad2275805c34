#include "textflag.h"

// func load16(p *uint16) uint16
// LDARH: load-acquire halfword (RCsc, ordered after any earlier STLR/STLRH,
// like sync/atomic.LoadUint32's LDARW).
TEXT ·load16(SB), NOSPLIT, $0-10
	MOVD p+0(FP), R0
	LDARH (R0), R1
	MOVH R1, ret+8(FP)
	RET

// func store16(p *uint16, v uint16)
// STLRH: store-release halfword (like sync/atomic.StoreUint32's STLRW).
TEXT ·store16(SB), NOSPLIT, $0-10
	MOVD p+0(FP), R0
	MOVHU v+8(FP), R1
	STLRH R1, (R0)
	RET

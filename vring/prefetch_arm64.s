#include "textflag.h"

// func prefetchLines(p *byte, lines int, write bool)
// PRFM PSTL1KEEP (for a store) or PLDL1KEEP (for a load) on the line
// holding p and the lines-1 lines after it. A prefetch never faults and
// changes no memory.
TEXT ·prefetchLines(SB), NOSPLIT, $0-17
	MOVD p+0(FP), R0
	MOVD lines+8(FP), R1
	CMP $0, R1
	BLE done
	MOVBU write+16(FP), R2
	CBNZ R2, writable
readable:
	PRFM (R0), PLDL1KEEP
	AND $~63, R0
	ADD $64, R0
	SUBS $1, R1
	BNE readable
	RET
writable:
	PRFM (R0), PSTL1KEEP
	AND $~63, R0
	ADD $64, R0
	SUBS $1, R1
	BNE writable
done:
	RET

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

// func prefetchDescsW(descs *descEntry, elems *UsedElem, n int)
// PRFM PSTL1KEEP on the descriptor descs[elems[i].Head] for each i < n:
// descEntry is 16 bytes, UsedElem 8 with Head (uint16) at offset 0 (both
// asserted in prefetch_asm.go). The caller has checked every Head against
// the table.
TEXT ·prefetchDescsW(SB), NOSPLIT, $0-24
	MOVD descs+0(FP), R0
	MOVD elems+8(FP), R1
	MOVD n+16(FP), R2
	CMP $0, R2
	BLE pdone
ploop:
	MOVHU (R1), R3
	ADD R3<<4, R0, R4
	PRFM (R4), PSTL1KEEP
	ADD $8, R1
	SUBS $1, R2
	BNE ploop
pdone:
	RET

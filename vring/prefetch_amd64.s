#include "textflag.h"

// func prefetchLines(p *byte, lines int, write bool)
// Hints the CPU to bring into its cache the line holding p and the
// lines-1 lines after it: PREFETCHW (0F 0D /1, a writable copy) when write
// is set, PREFETCHT0 otherwise. The caller sets write only when the CPU has
// PREFETCHW (hasPrefetchW). A prefetch never faults and changes no memory.
TEXT ·prefetchLines(SB), NOSPLIT, $0-17
	MOVQ p+0(FP), AX
	MOVQ lines+8(FP), CX
	TESTQ CX, CX
	JLE done
	MOVBLZX write+16(FP), DX
	TESTB DX, DX
	JNE writable
readable:
	PREFETCHT0 (AX)
	ANDQ $~63, AX
	ADDQ $64, AX
	DECQ CX
	JNE readable
	RET
writable:
	BYTE $0x0F; BYTE $0x0D; BYTE $0x08 // PREFETCHW (AX)
	ANDQ $~63, AX
	ADDQ $64, AX
	DECQ CX
	JNE writable
done:
	RET

// func cpuid(leaf uint32) (eax, ecx uint32)
TEXT ·cpuid(SB), NOSPLIT, $0-16
	MOVL leaf+0(FP), AX
	XORL CX, CX
	CPUID
	MOVL AX, eax+8(FP)
	MOVL CX, ecx+12(FP)
	RET

// func prefetchDescsW(descs *descEntry, elems *UsedElem, n int)
// PREFETCHW on the descriptor descs[elems[i].Head] for each i < n:
// descEntry is 16 bytes, UsedElem 8 with Head (uint16) at offset 0 (both
// asserted in prefetch_asm.go). The caller has checked every Head against
// the table and that the CPU has PREFETCHW.
TEXT ·prefetchDescsW(SB), NOSPLIT, $0-24
	MOVQ descs+0(FP), AX
	MOVQ elems+8(FP), BX
	MOVQ n+16(FP), CX
	TESTQ CX, CX
	JLE pdone
ploop:
	MOVWQZX (BX), DX
	SHLQ $4, DX
	ADDQ AX, DX
	BYTE $0x0F; BYTE $0x0D; BYTE $0x0A // PREFETCHW (DX)
	ADDQ $8, BX
	DECQ CX
	JNE ploop
pdone:
	RET

//go:build !race

#include "textflag.h"

// func storeRelease32(p *uint32, v uint32)
// STLRW: store-release word. A later LDAR/LDARW/LDARH (sync/atomic's loads,
// load16) is ordered after it (RCsc), so on arm64 storeLoadFence's barrier
// is redundant but harmless.
TEXT ·storeRelease32(SB), NOSPLIT, $0-12
	MOVD p+0(FP), R0
	MOVWU v+8(FP), R1
	STLRW R1, (R0)
	RET

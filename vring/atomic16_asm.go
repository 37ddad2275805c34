//go:build amd64 || arm64

package vring

// load16 atomically loads *p with acquire semantics and store16 atomically
// stores v to *p with sequentially consistent semantics (amd64: MOVW load,
// XCHGW store; arm64: LDARH, STLRH). They are the 16-bit counterparts of
// sync/atomic's LoadUint32/StoreUint32 on these architectures and are
// ordered with them exactly as those are with each other. p must be
// 2-aligned (ptr16 checks this).
//
//go:noescape
func load16(p *uint16) uint16

//go:noescape
func store16(p *uint16, v uint16)

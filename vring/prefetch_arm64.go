package vring

// hasPrefetchW: arm64's PRFM PSTL1KEEP (a prefetch for a store) is part of
// the base instruction set.
const hasPrefetchW = true

package vring

// The driver side's prefetches, for a device on another CPU (see
// docs/performance, "The driver's reclaim asks ahead"). ReclaimBatch asks
// for two kinds of lines before it needs them:
//
//   - the used-ring entries it is about to read, as soon as a used.idx load
//     shows them: the device has just written them on its CPU, and a loop
//     that reads them in turn waits for each line as it reaches it, where
//     lines asked for together travel together;
//   - for writing, the descriptor of each chain it frees (one assembly call
//     per run of entries taken, prefetchDescsW): the free list is last in,
//     first out, so those are the descriptors the next Adds will write, and
//     the device read them last. A store to a line another CPU holds
//     waits for that copy to be invalidated, and x86 commits stores in
//     order, so each such store held up every later one; asked for at
//     reclaim time, the invalidation is done by the time Add writes.
//
// Both are hints: they change no memory and nothing the queue reads, and a
// prefetch never faults. They are given only addresses inside the ring's
// areas: used entries below the queue size, heads reclaimRun checked.

// prefetchUsed asks for the used-ring lines of the n entries from lastUsed
// on (1 <= n <= the queue size), unless they lie in one line: the load
// that follows asks for that one as soon.
func (q *DriverQueue) prefetchUsed(n int) {
	size := int(q.r.size)
	first := int(q.lastUsed & q.r.mask)
	k := min(n, size-first) // up to the ring's end; the rest from 0
	// A run that wraps lies in one line only when the whole ring does
	// (a queue of 4 or fewer); then both pieces are in that line.
	if (k == n && q.usedLines(first, k) < 2) || (k < n && q.usedLines(0, size) < 2) {
		return
	}
	q.prefetchUsedRange(first, k)
	if n > k {
		q.prefetchUsedRange(0, n-k)
	}
}

// usedLines is how many cache lines used.ring[first:first+k] touches.
func (q *DriverQueue) usedLines(first, k int) int {
	start := uint64(hostAddrOf(q.r.used)) + uint64(4+8*first)
	return int((start+uint64(8*k)-1)>>6 - start>>6 + 1)
}

func (q *DriverQueue) prefetchUsedRange(first, k int) {
	lines := q.usedLines(first, k)
	p := &q.r.used[4+8*first]
	if q.prefetchTrace != nil {
		q.prefetchTrace(true, hostAddrOf(q.r.used[4+8*first:]), k, lines)
	}
	prefetchLines(p, lines, false)
}

// prefetchFreed asks, for writing, for the descriptor of each chain in
// elems, which reclaimRun has just freed (every Head checked below the
// queue size, the length of the descriptor table). Where the CPU has no
// prefetch for writing (an amd64 CPU without PREFETCHW) it asks for
// nothing: a copy for reading would still need the invalidation.
func (q *DriverQueue) prefetchFreed(elems []UsedElem) {
	if len(elems) == 0 || !hasPrefetchW {
		return
	}
	if q.prefetchTrace != nil {
		for _, e := range elems {
			q.prefetchTrace(false, hostAddrOf(q.r.desc[16*int(e.Head):]), 1, 1)
		}
	}
	prefetchDescsW(&q.r.descs[0], &elems[0], len(elems))
}

package vring

// The driver side's prefetches, for a device on another CPU (see
// docs/performance, "The driver's reclaim asks ahead"). ReclaimBatch asks
// for two kinds of lines before it needs them:
//
//   - the used-ring entries it is about to read, as soon as a used.idx load
//     shows them: the device has just written them on its CPU, and a loop
//     that reads them in turn waits for each line as it reaches it, where
//     lines asked for together travel together;
//   - for writing, the descriptor of each chain it frees: the free list is
//     last in, first out, so those are the descriptors the next Adds will
//     write, and the device read them last. A store to a line another CPU
//     holds waits for that copy to be invalidated, x86 commits stores in
//     order, so each such store held up every later one; asked for at
//     reclaim time, the invalidation is done by the time Add writes.
//
// Both are hints: they change no memory and nothing the queue reads, and a
// prefetch never faults. They are given only addresses inside the ring's
// areas: used entries below the queue size, heads reclaimRun checked.

// prefetchUsed asks for the used-ring lines of the n entries from lastUsed
// on (n <= the queue size), unless they lie in one line: the load that
// follows asks for that one as soon.
func (q *DriverQueue) prefetchUsed(n int) {
	first := int(q.lastUsed & q.r.mask)
	k := min(n, int(q.r.size)-first) // up to the ring's end; the rest from 0
	if k == n && q.usedLines(first, k) < 2 {
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
	if q.prefetchTrace != nil {
		q.prefetchTrace(true, first, k, lines)
	}
	prefetchLines(&q.r.used[4+8*first], lines, false)
}

// prefetchFreed asks, for writing, for the descriptor of each chain in
// elems, which reclaimRun has just freed (every Head checked below the
// queue size, the length of the descriptor table).
func (q *DriverQueue) prefetchFreed(elems []UsedElem) {
	if len(elems) == 0 {
		return
	}
	if q.prefetchTrace != nil {
		for _, e := range elems {
			q.prefetchTrace(false, int(e.Head), 1, 1)
		}
	}
	if hasPrefetchW {
		prefetchDescsW(&q.r.descs[0], &elems[0], len(elems))
	}
}

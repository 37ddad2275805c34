// Package abbench runs A/B benchmarks: two loops that do the same work two
// ways (or a piece of work and its floor), measured in alternating slices
// on one thread so that both see the same state of a shared, noisy
// machine. vring's A/B benchmarks and dirty's Mark-against-a-call
// benchmark use it.
package abbench

import (
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ThreadCPU is the calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID), or
// 0 if the clock cannot be read. Benchmarks report it per operation
// (cpu-ns/op) next to wall-clock ns/op: on a shared, loaded machine wall
// time includes time spent descheduled.
func ThreadCPU() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// Run measures a and bb, each of which does n operations when called with
// n, alternating slices of slice operations (A, B, A, B, ...) over b.N
// operations each, on the benchmark's goroutine locked to its thread and
// timed by that thread's CPU clock. Whatever the machine does meanwhile
// lands on both sides within milliseconds, so their comparison holds where
// two benchmark runs minutes apart can differ by half. Both loops are run
// once (one slice each) before the timer starts. It reports each side's
// median CPU ns per operation over the slices as A-ns/op and B-ns/op, and
// returns them.
func Run(b *testing.B, slice int, a, bb func(n int)) (medianA, medianB float64) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	a(slice) // warm both
	bb(slice)
	n := max(1, b.N/slice)
	ra := make([]float64, 0, n)
	rb := make([]float64, 0, n)
	b.ReportAllocs()
	b.ResetTimer()
	for range n {
		t0 := ThreadCPU()
		a(slice)
		t1 := ThreadCPU()
		bb(slice)
		t2 := ThreadCPU()
		ra = append(ra, float64(t1-t0)/float64(slice))
		rb = append(rb, float64(t2-t1)/float64(slice))
	}
	b.StopTimer()
	slices.Sort(ra)
	slices.Sort(rb)
	medianA, medianB = ra[len(ra)/2], rb[len(rb)/2]
	b.ReportMetric(medianA, "A-ns/op")
	b.ReportMetric(medianB, "B-ns/op")
	return medianA, medianB
}

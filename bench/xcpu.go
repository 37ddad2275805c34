package main

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The machine's state. On a shared VM the cost of moving a cache line
// between the two vCPUs changes when the host moves them (measured here:
// about 1.7x between two states that last from seconds to minutes), and
// every cross-CPU comparison moves with it. crossCPURoundTrip measures that
// cost just before each run, so a comparison whose rounds ran in different
// states can say so.

// crossCPURoundTrip returns the mean time for a cache line to go from CPU a
// to CPU b and back: two goroutines, each locked to a thread pinned to its
// CPU, take turns incrementing one counter n times each.
func crossCPURoundTrip(a, b, n int) (time.Duration, error) {
	if a == b {
		return 0, errors.New("cross-CPU probe: both sides on one CPU")
	}
	var line struct {
		_ [64]byte
		v atomic.Int64
		_ [64]byte
	}
	deadline := time.Now().Add(2 * time.Second)
	errc := make(chan error, 2)
	ready := make(chan struct{}, 2)
	start := make(chan struct{})
	side := func(cpu int, parity int64) {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			ready <- struct{}{}
			errc <- fmt.Errorf("cross-CPU probe: pin to cpu %d: %w", cpu, err)
			return
		}
		ready <- struct{}{}
		<-start
		for i := int64(0); i < int64(n); i++ {
			want := 2*i + parity
			for spins := 0; line.v.Load() != want; spins++ {
				if spins&0xffff == 0xffff && time.Now().After(deadline) {
					errc <- errors.New("cross-CPU probe: the other side did not answer within 2 s")
					return
				}
			}
			line.v.Store(want + 1)
		}
		errc <- nil
	}
	go side(a, 0)
	go side(b, 1)
	<-ready
	<-ready
	t0 := time.Now()
	close(start)
	err := errors.Join(<-errc, <-errc)
	el := time.Since(t0)
	if err != nil {
		return 0, err
	}
	return el / time.Duration(n), nil
}

// stateShift is the ratio between the slowest and fastest cross-CPU round
// trip among a comparison's rounds beyond which the rounds did not all run
// in one machine state. Measured here: 90-170 ns in the fast state; the
// slow one moves between about 440 and 970 ns without a matching change
// in throughput, so the threshold sits between the two.
const stateShift = 2.5

// probeRange returns the fastest and slowest of the probes in sets (ns),
// skipping NaN (a round not probed); lo is +Inf when there are none.
func probeRange(sets ...[]float64) (lo, hi float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, probes := range sets {
		for _, p := range probes {
			if !math.IsNaN(p) && p > 0 {
				lo, hi = math.Min(lo, p), math.Max(hi, p)
			}
		}
	}
	return lo, hi
}

// stateChanged reports whether the cross-CPU round trips measured before a
// comparison's rounds (ns; NaN for a round not probed; one slice per side)
// span more than stateShift, and describes the span.
func stateChanged(probes ...[]float64) (bool, string) {
	lo, hi := probeRange(probes...)
	if math.IsInf(lo, 1) {
		return false, "not probed"
	}
	span := fmt.Sprintf("cross-CPU round trip %.0f–%.0f ns", lo, hi)
	return hi > stateShift*lo, span
}

// probeState is the fastest of five short crossCPURoundTrip runs, in ns (a
// run whose thread was descheduled reads several times too slow), or NaN
// when it cannot be measured.
func probeState(a, b int) float64 {
	var v []float64
	for range 5 {
		rt, err := crossCPURoundTrip(a, b, 4000)
		if err != nil {
			return math.NaN()
		}
		v = append(v, float64(rt.Nanoseconds()))
	}
	return spreadOf(v).Min
}

// byState splits a comparison's round pairs (a[i]/b[i], with the probes
// pa[i], pb[i] taken before each side's run) by machine state: a round
// pair whose two probes are both within stateShift of the fastest probe
// ran in the fast state, one whose probes are both beyond it in the slow
// state, and a pair that straddles the two is left out. It describes the
// ratio in each state that has rounds ("" when all ran in one state).
func byState(a, b, pa, pb []float64) string {
	lo, _ := probeRange(pa, pb)
	if math.IsInf(lo, 1) {
		return ""
	}
	var fast, slow []float64
	for i := 0; i < len(a) && i < len(b) && i < len(pa) && i < len(pb); i++ {
		if math.IsNaN(a[i]) || math.IsNaN(b[i]) || b[i] == 0 || math.IsNaN(pa[i]) || math.IsNaN(pb[i]) {
			continue
		}
		fa, fb := pa[i] <= stateShift*lo, pb[i] <= stateShift*lo
		switch {
		case fa && fb:
			fast = append(fast, a[i]/b[i])
		case !fa && !fb:
			slow = append(slow, a[i]/b[i])
		}
	}
	if len(fast) == 0 || len(slow) == 0 {
		return ""
	}
	f, s := spreadOf(fast), spreadOf(slow)
	return fmt.Sprintf("by state: fast (round trip ≤ %.0f ns) %.2fx [%.2f–%.2f] over %d round pair(s), slow %.2fx [%.2f–%.2f] over %d",
		stateShift*lo, f.Median, f.Min, f.Max, f.N, s.Median, s.Min, s.Max, s.N)
}

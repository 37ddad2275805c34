package main

import (
	"context"
	"fmt"
	"math"
	"sort"
	"time"
)

// Harness collects results while suites run.
type Harness struct {
	cfg     *Config
	prog    *Progress
	results []Result
	failed  int
}

func (h *Harness) add(r Result) { h.results = append(h.results, r) }

// skip records a measurement that could not run, with the reason.
func (h *Harness) skip(suite, name string, params map[string]any, reason string) {
	h.prog.Warn("%s %s skipped: %s", suite, name, reason)
	h.add(Result{Suite: suite, Name: name, Params: params, Skipped: true, Reason: reason})
}

// fail records a measurement that broke; the run exits non-zero.
func (h *Harness) fail(suite, name string, params map[string]any, err error) {
	h.failed++
	h.prog.Warn("%s %s FAILED: %v", suite, name, err)
	h.add(Result{Suite: suite, Name: name, Params: params, Skipped: true, Reason: "FAILED: " + err.Error()})
}

// maxLoop bounds timeLoop's n: 2^34, and on 32-bit what nextN can still
// multiply by 100 within an int.
const maxLoop = min(1<<34, math.MaxInt/100)

// timeLoop calibrates n so that f(n) runs for about d, like testing.B does,
// and returns the final n and its elapsed time. f runs its n operations and
// returns an error if anything went wrong.
func timeLoop(ctx context.Context, d time.Duration, f func(n int) error) (int, time.Duration, error) {
	n := 1
	for {
		start := time.Now()
		if err := f(n); err != nil {
			return n, 0, err
		}
		el := time.Since(start)
		if el >= d || n >= maxLoop || ctx.Err() != nil {
			return n, el, ctx.Err()
		}
		next := nextN(n, el, d)
		n = next
	}
}

// nextN predicts the iteration count that runs for d, given that n ran for
// el: 20% over the linear prediction, at least n+1 and at most 100n.
func nextN(n int, el, d time.Duration) int {
	if el < time.Microsecond {
		el = time.Microsecond
	}
	pred := float64(n) * 1.2 * float64(d) / float64(el)
	next := int(math.Min(pred, float64(n)*100))
	if next <= n {
		next = n + 1
	}
	return next
}

// nsPer returns nanoseconds per operation.
func nsPer(n int, el time.Duration) float64 {
	if n <= 0 {
		return 0
	}
	return float64(el.Nanoseconds()) / float64(n)
}

// mppsOf returns millions of operations per second.
func mppsOf(n int, el time.Duration) float64 {
	if el <= 0 {
		return 0
	}
	return float64(n) / el.Seconds() / 1e6
}

// median of a non-empty slice (the input is not modified).
func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// ratio returns a/b, or NaN when b is zero.
func ratio(a, b float64) float64 {
	if b == 0 {
		return math.NaN()
	}
	return a / b
}

func chainLabel(descs int) string {
	if descs == 1 {
		return "1-desc"
	}
	return fmt.Sprintf("%d-desc", descs)
}

package main

import (
	"fmt"
	"math"
)

// Spread summarises the samples of one side of a comparison (or the
// per-round ratios): how many, their median, and their minimum and maximum.
type Spread struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

// spreadOf summarises v. An empty v gives N 0 and NaN everywhere; NaN
// samples are left out.
func spreadOf(v []float64) Spread {
	var s Spread
	var kept []float64
	for _, x := range v {
		if !math.IsNaN(x) {
			kept = append(kept, x)
		}
	}
	s.N = len(kept)
	if s.N == 0 {
		return Spread{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	s.Median = median(kept)
	s.Min, s.Max = kept[0], kept[0]
	for _, x := range kept[1:] {
		s.Min = math.Min(s.Min, x)
		s.Max = math.Max(s.Max, x)
	}
	return s
}

// minRounds is the fewest round pairs a comparison needs before it may be
// called conclusive: with fewer, the ranges say nothing about the spread.
const minRounds = 3

// Comparison is the outcome of interleaved rounds of two sides: the
// library (A) and its peer (B), sample i of each taken in round i, one
// right after the other, with the same pinning and duration.
type Comparison struct {
	A, B Spread
	// Ratio summarises A[i]/B[i] per round pair: the ratio of two runs made
	// a few seconds apart, so load that hit one round hits both sides.
	Ratio Spread
	// Overlap is the length of the intersection of A's and B's min–max
	// ranges (0 when they are disjoint); Gap is |median(A) - median(B)|.
	Overlap, Gap float64
	// Inconclusive is set when the ranges overlap by more than the medians
	// differ (Overlap > Gap), when the medians are equal, when one range
	// contains the other, or when there are fewer than minRounds round
	// pairs; Why says which, in words.
	Inconclusive bool
	Why          string
}

// Compare summarises interleaved samples a (the library) and b (the peer),
// a[i] and b[i] being round i. Rounds where either side has no sample
// (NaN, or a slice shorter than the other) do not count as pairs but their
// samples still count for that side's spread.
//
// The rule for inconclusive is: the two min–max ranges overlap by more
// than the two medians differ. Overlap is max(0, min(maxA, maxB) -
// max(minA, minB)); the difference is |medianA - medianB|. When the ranges
// are disjoint the comparison is conclusive; when they overlap but the
// medians are further apart than the shared stretch, the spread of each
// side is small against the difference and the comparison stands; when the
// shared stretch is longer than the distance between medians, the
// run-to-run noise is as large as the effect and no ratio decides
// anything. Equal medians (a zero difference) decide nothing either, even
// when both ranges are single points. Nor does a comparison where one
// side's range contains the other's (however short the overlap measured
// on the inner range): the outer side's rounds fell on both sides of every
// round of the inner one. Fewer than minRounds round pairs are always
// inconclusive.
func Compare(a, b []float64) Comparison {
	c := Comparison{A: spreadOf(a), B: spreadOf(b)}
	var ratios []float64
	for i := 0; i < len(a) && i < len(b); i++ {
		if math.IsNaN(a[i]) || math.IsNaN(b[i]) || b[i] == 0 {
			continue
		}
		ratios = append(ratios, a[i]/b[i])
	}
	c.Ratio = spreadOf(ratios)
	if c.A.N == 0 || c.B.N == 0 {
		c.Inconclusive, c.Why = true, "a side has no samples"
		c.Overlap, c.Gap = math.NaN(), math.NaN()
		return c
	}
	c.Overlap = math.Max(0, math.Min(c.A.Max, c.B.Max)-math.Max(c.A.Min, c.B.Min))
	c.Gap = math.Abs(c.A.Median - c.B.Median)
	switch {
	case c.Ratio.N < minRounds:
		c.Inconclusive = true
		c.Why = fmt.Sprintf("%d round pair(s), fewer than %d", c.Ratio.N, minRounds)
	case c.Overlap > c.Gap:
		c.Inconclusive = true
		c.Why = fmt.Sprintf("ranges overlap by %s, more than the medians differ (%s)", formatValue(c.Overlap), formatValue(c.Gap))
	case c.Gap == 0:
		c.Inconclusive = true
		c.Why = "equal medians"
	case contains(c.A, c.B) || contains(c.B, c.A):
		c.Inconclusive = true
		c.Why = "one side's range contains the other's"
	}
	return c
}

// contains reports whether outer's min–max range contains inner's.
func contains(outer, inner Spread) bool {
	return outer.Min <= inner.Min && inner.Max <= outer.Max
}

// Verdict is the word printed with a comparison: "inconclusive", or
// whether A is ahead of or behind B.
func (c Comparison) Verdict() string {
	switch {
	case c.Inconclusive:
		return "inconclusive"
	case c.A.Median > c.B.Median:
		return "ahead"
	case c.A.Median < c.B.Median:
		return "behind"
	}
	return "equal"
}

// spreadMetric is a metric whose value is a median over rounds, with the
// range of the rounds.
// With no samples it is a NaN value and no range (the caller records a
// skip or failure instead of such a metric).
func spreadMetric(name, unit string, s Spread) Metric {
	if s.N == 0 {
		return Metric{Name: name, Value: math.NaN(), Unit: unit}
	}
	return Metric{Name: name, Value: s.Median, Unit: unit, N: s.N, Min: s.Min, Max: s.Max}
}

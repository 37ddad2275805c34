package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSpreadOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []float64
		want Spread
	}{
		{"one sample", []float64{4}, Spread{N: 1, Median: 4, Min: 4, Max: 4}},
		{"odd count: middle of the sorted samples", []float64{9, 1, 5}, Spread{N: 3, Median: 5, Min: 1, Max: 9}},
		{"even count: mean of the two middle ones", []float64{8, 2, 4, 6}, Spread{N: 4, Median: 5, Min: 2, Max: 8}},
		{"NaN (a round that did not run) is left out", []float64{3, math.NaN(), 1, 2}, Spread{N: 3, Median: 2, Min: 1, Max: 3}},
		{"repeated values", []float64{7, 7, 7, 1, 7}, Spread{N: 5, Median: 7, Min: 1, Max: 7}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, spreadOf(tc.in))
		})
	}
	t.Run("no samples", func(t *testing.T) {
		s := spreadOf([]float64{math.NaN()})
		assert.Zero(t, s.N)
		assert.True(t, math.IsNaN(s.Median) && math.IsNaN(s.Min) && math.IsNaN(s.Max))
	})
	t.Run("input is not reordered", func(t *testing.T) {
		in := []float64{3, 1, 2}
		spreadOf(in)
		assert.Equal(t, []float64{3, 1, 2}, in)
	})
}

func TestCompare(t *testing.T) {
	for _, tc := range []struct {
		name         string
		a, b         []float64
		ratio        Spread
		overlap, gap float64
		inconclusive bool
		verdict      string
	}{
		{
			name: "disjoint ranges: conclusive",
			a:    []float64{10, 11, 12}, b: []float64{5, 6, 4},
			ratio:   Spread{N: 3, Median: 2, Min: 11.0 / 6, Max: 3},
			overlap: 0, gap: 6, verdict: "ahead",
		},
		{
			name: "ranges overlap less than the medians differ: conclusive",
			// A in [8,12] median 10, B in [5,9] median 6: overlap 1, gap 4.
			a: []float64{8, 10, 12}, b: []float64{5, 6, 9},
			ratio:   Spread{N: 3, Median: 8.0 / 5, Min: 12.0 / 9, Max: 10.0 / 6},
			overlap: 1, gap: 4, verdict: "ahead",
		},
		{
			name: "ranges overlap more than the medians differ: inconclusive",
			// The loopback figures: 3.25/2.92/3.55 against 3.64/5.50/5.14.
			a: []float64{3.25, 2.92, 3.55}, b: []float64{3.64, 5.50, 5.14},
			ratio:   Spread{N: 3, Median: 3.55 / 5.14, Min: 2.92 / 5.50, Max: 3.25 / 3.64},
			overlap: 0, gap: 5.14 - 3.25, verdict: "behind",
		},
		{
			name: "one range inside the other: inconclusive",
			a:    []float64{5, 6, 7}, b: []float64{2, 6.5, 10},
			ratio:   Spread{N: 3, Median: 6.0 / 6.5, Min: 0.7, Max: 2.5},
			overlap: 2, gap: 0.5, inconclusive: true, verdict: "inconclusive",
		},
		{
			name: "overlap equal to the gap is still conclusive",
			// A [4,6] median 5, B [5,7] median 6: overlap 1, gap 1.
			a: []float64{4, 5, 6}, b: []float64{5, 6, 7},
			ratio:   Spread{N: 3, Median: 5.0 / 6, Min: 0.8, Max: 6.0 / 7},
			overlap: 1, gap: 1, verdict: "behind",
		},
		{
			name: "one range inside the other with a short overlap: inconclusive",
			// A [2.16,2.45] inside B [0.45,9.30]: overlap 0.29 < gap 3.08.
			a: []float64{2.44, 2.16, 2.45}, b: []float64{5.52, 0.45, 9.30},
			ratio:   Spread{N: 3, Median: 2.44 / 5.52, Min: 2.45 / 9.30, Max: 2.16 / 0.45},
			overlap: 0.29, gap: 5.52 - 2.44, inconclusive: true, verdict: "inconclusive",
		},
		{
			name: "equal medians decide nothing, even as single points",
			a:    []float64{4, 4, 4}, b: []float64{4, 4, 4},
			ratio:   Spread{N: 3, Median: 1, Min: 1, Max: 1},
			overlap: 0, gap: 0, inconclusive: true, verdict: "inconclusive",
		},
		{
			name: "too few round pairs: inconclusive even when disjoint",
			a:    []float64{10, 11}, b: []float64{1, 2},
			ratio:   Spread{N: 2, Median: 7.75, Min: 5.5, Max: 10},
			overlap: 0, gap: 9, inconclusive: true, verdict: "inconclusive",
		},
		{
			name: "a failed round drops the pair but keeps the other side's sample",
			a:    []float64{10, math.NaN(), 12, 11}, b: []float64{5, 4, 6, 5},
			ratio:   Spread{N: 3, Median: 2, Min: 2, Max: 2.2},
			overlap: 0, gap: 6, verdict: "ahead",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Compare(tc.a, tc.b)
			assert.Equal(t, tc.ratio.N, c.Ratio.N)
			assert.InDelta(t, tc.ratio.Median, c.Ratio.Median, 1e-9, "ratio median")
			assert.InDelta(t, tc.ratio.Min, c.Ratio.Min, 1e-9, "ratio min")
			assert.InDelta(t, tc.ratio.Max, c.Ratio.Max, 1e-9, "ratio max")
			assert.InDelta(t, tc.overlap, c.Overlap, 1e-9, "overlap")
			assert.InDelta(t, tc.gap, c.Gap, 1e-9, "gap")
			assert.Equal(t, tc.inconclusive, c.Inconclusive)
			assert.Equal(t, tc.inconclusive, c.Why != "", "a reason exactly when inconclusive: %q", c.Why)
			assert.Equal(t, tc.verdict, c.Verdict())
		})
	}
	t.Run("a side with no samples", func(t *testing.T) {
		c := Compare([]float64{1, 2, 3}, nil)
		assert.True(t, c.Inconclusive)
		assert.Zero(t, c.Ratio.N)
		assert.Equal(t, "inconclusive", c.Verdict())
	})
}

func TestSpreadMetricFormatting(t *testing.T) {
	m := spreadMetric("mpps", "Mpps", spreadOf([]float64{3.25, 2.92, 3.55}))
	assert.Equal(t, "3.25 Mpps [2.92–3.55]", formatMetrics([]Metric{m}))
	one := spreadMetric("ratio", "x", spreadOf([]float64{1.5}))
	assert.Equal(t, "1.50x", formatMetrics([]Metric{one}), "a single round has no range to print")
}

func TestStartPinned(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var before unix.CPUSet
	require.NoError(t, unix.SchedGetaffinity(0, &before))
	// The child and every thread it starts run only on the CPU asked for.
	for cpu := 0; cpu < min(2, runtime.NumCPU()); cpu++ {
		cmd := exec.Command("sh", "-c", "grep Cpus_allowed_list /proc/self/status & wait")
		var out bytes.Buffer
		cmd.Stdout = &out
		require.NoError(t, startPinned(cmd, cpu))
		require.NoError(t, cmd.Wait())
		assert.Equal(t, strconv.Itoa(cpu), statusField(out.Bytes(), "Cpus_allowed_list"))
	}
	// The calling thread's mask is restored.
	var after unix.CPUSet
	require.NoError(t, unix.SchedGetaffinity(0, &after))
	assert.Equal(t, before, after)
}

func TestPinSummary(t *testing.T) {
	assert.Equal(t, "all 3 threads on CPU 0", pinSummary(map[string]string{"1": "0", "2": "0", "3": "0"}))
	assert.Equal(t, "threads 1 on CPU 1, 2 on CPU 0-1", pinSummary(map[string]string{"1": "0-1", "2": "1", "3": "0-1"}))
	assert.Equal(t, "no threads seen", pinSummary(nil))
}

func TestPeerRatiosPlot(t *testing.T) {
	c := Compare([]float64{3, 4, 5}, []float64{3.8, 4, 4.2})
	h := &Harness{prog: NewProgress(io.Discard, false, false)}
	h.addComparison("peers", "ratio x / y", map[string]any{"mode": "txonly"}, c, "")
	h.add(Result{Suite: "peers", Name: "one round only", Metrics: []Metric{{Name: "ratio", Value: 2, Unit: "x"}}})
	rp := peerRatios(h.results)
	require.Equal(t, 1, rp.Len(), "only ratios with rounds are plotted")
	lo, hi := rp.YError(0)
	assert.InDeltaSlice(t, []float64{1, 1 - 3/3.8, 5/4.2 - 1}, []float64{rp.med[0], lo, hi}, 1e-9)
	assert.True(t, rp.inconclusive[0], "3/4/5 against 3.8/4/4.2 overlaps")

	dir := t.TempDir()
	files, err := WritePlots(dir, h.results)
	require.NoError(t, err)
	require.Contains(t, files, filepath.Join(dir, "peer_ratios.svg"))
	legend, err := os.ReadFile(filepath.Join(dir, "peer_ratios.txt"))
	require.NoError(t, err)
	assert.Equal(t, "1. ratio x / y: 1x [0.79–1.19]\n", string(legend))
}

func TestWaitForOutput(t *testing.T) {
	ctx := context.Background()
	p := &testpmdProc{done: make(chan error, 1)}
	go func() {
		time.Sleep(20 * time.Millisecond)
		p.Write([]byte("Done\nNo commandline core given, start packet forwarding\n"))
	}()
	require.NoError(t, waitForOutput(ctx, p, "start packet forwarding", 10*time.Second))

	exited := &testpmdProc{done: make(chan error, 1)}
	exited.Write([]byte("EAL: Cannot create lock\n"))
	exited.done <- errors.New("exit status 1")
	err := waitForOutput(ctx, exited, "start packet forwarding", 10*time.Second)
	require.ErrorContains(t, err, "exited before forwarding")
	assert.ErrorContains(t, err, "Cannot create lock", "its last output is in the error")

	silent := &testpmdProc{done: make(chan error, 1)}
	assert.ErrorContains(t, waitForOutput(ctx, silent, "start packet forwarding", 30*time.Millisecond), "did not start forwarding")
}

package main

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
)

// TestScaleSmoke runs the scale suite's pieces at tiny counts: every
// device and session answers its ping, nothing is left behind after
// close, and the throughput runs move frames in both modes.
func TestScaleSmoke(t *testing.T) {
	cfg, err := parseArgs([]string{"scale", "-short"}, io.Discard)
	require.NoError(t, err)
	h := &Harness{cfg: cfg, prog: NewProgress(io.Discard, false, false)}
	ctx := context.Background()
	h.scaleCount(ctx, "softnet", 4, 3, 0, newLocalDevice)
	h.scaleCount(ctx, "vhost-user", 3, 8, 0, newVhostSession)
	h.scaleCount(ctx, "softnet on a poll group", 5, 3, 0, groupedDevices())
	require.Zero(t, h.failed, "%+v", h.results)
	for _, r := range h.results {
		for _, name := range []string{"leaked goroutines", "leaked fds"} {
			m, ok := r.Metric(name)
			require.True(t, ok, "%s has %s", r.Name, name)
			assert.Zero(t, m.Value, "%s: %s", r.Name, name)
		}
		m, _ := r.Metric("fds")
		assert.Positive(t, m.Value, "%s: the embedder's descriptors are counted", r.Name)
	}
	// A quarter second, so that the driver goroutines get a CPU within the
	// window on a loaded machine (a window in which no frame moved makes
	// fps zero).
	for _, sm := range scaleModes {
		res, err := pairThroughput(ctx, sm, 3, 16, 250*time.Millisecond)
		require.NoError(t, err, "%v", sm.name)
		assert.Positive(t, res.fps, "%v", sm.name)
		assert.Positive(t, res.cpuNs, "%v", sm.name)
	}
	_, err = pairThroughput(ctx, scaleMode{name: "event, driver per core", mode: softnet.ModeEvent, coreDrivers: true}, 3, 16, 50*time.Millisecond)
	assert.ErrorContains(t, err, "needs a polling device", "a busy-polling driver per core takes no interrupts")
}

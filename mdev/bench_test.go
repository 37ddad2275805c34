package mdev_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(tb testing.TB) (net.Conn, net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(tb, err)
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); acc <- c }()
	c1, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(tb, err)
	c2 := <-acc
	require.NotNil(tb, c2)
	tb.Cleanup(func() { _ = c1.Close(); _ = c2.Close() })
	return c1, c2
}

// BenchmarkDowntime1GiB migrates a 1 GiB guest on the software device over
// loopback TCP while the guest sends frames and dirties memory at a
// moderate rate (5000 pages/s, 20 MB/s), and reports the measured downtime
// (guest stopped on the source until the destination runs again).
func BenchmarkDowntime1GiB(b *testing.B) {
	for _, mode := range []mdev.DirtyMode{mdev.DirtyDeviceLog, mdev.DirtyRelay} {
		b.Run(mode.String(), func(b *testing.B) {
			const size = 1 << 30
			var total time.Duration
			var rounds, n int
			for b.Loop() {
				rep := benchMigrate(b, size, mode, 5000)
				total += rep.Downtime
				b.Logf("downtime %v: stop guest %v, stop device %v, final copy %v (%d pages), resume %v",
					rep.Downtime, rep.StopGuest, rep.StopDevice, rep.FinalCopy, rep.Final.Pages, rep.Resume)
				rounds += len(rep.Rounds)
				n++
			}
			b.ReportMetric(float64(total.Microseconds())/1000/float64(n), "downtime-ms")
			b.ReportMetric(float64(rounds)/float64(n), "rounds")
		})
	}
}

func benchMigrate(b *testing.B, size uint64, mode mdev.DirtyMode, rate float64) *mdev.SourceReport {
	src := newSide(b, size, mode)
	dst := newSide(b, size, mode)
	g, err := mdevtest.Boot(src.dev, src.mem, 0, nil)
	require.NoError(b, err)
	scratch := mdevtest.Layout(nil)
	dirtier, err := mdevtest.NewDirtier(src.mem, scratch, size, rate, 1)
	require.NoError(b, err)
	log, err := dirty.New(size, nil)
	require.NoError(b, err)
	closeLogAfter(b, log, src, dst)
	g.SetLog(log)
	dirtier.SetLog(log)
	v := startVCPUs(b, g, dirtier)
	c1, c2 := tcpPair(b)
	var dv *vcpus
	errc := goDestination(b, c2, mdev.DestOptions{
		Device: dst.dev, Memory: dst.mem,
		StartGuest: func() error {
			dg, err := mdevtest.Attach(dst.dev, dst.mem)
			if err != nil {
				return err
			}
			d2, err := mdevtest.NewDirtier(dst.mem, scratch, size, rate, 2)
			if err != nil {
				return err
			}
			dv = startVCPUs(b, dg, d2)
			return nil
		},
	})
	rep, err := mdev.MigrateSource(context.Background(), c1, mdev.SourceOptions{
		Device: src.dev, Memory: src.mem, Log: log,
		Tracker:   dirty.TrackerOptions{Bandwidth: 1e9, DowntimeTarget: time.Millisecond, MaxRounds: 10},
		StopGuest: v.stop,
	})
	require.NoError(b, err)
	require.NoError(b, <-errc)
	require.NoError(b, dv.stop())
	return rep
}

// trafficRate runs frames through a fresh device (passthrough, or relay
// when relay is set) and returns frames per second.
func trafficRate(b *testing.B, frames uint64, relay bool) float64 {
	s := newSide(b, 32<<20, mdev.DirtyRelay)
	g, err := mdevtest.Boot(s.dev, s.mem, frames, nil)
	require.NoError(b, err)
	if relay {
		log, err := dirty.New(32<<20, nil)
		require.NoError(b, err)
		closeLogAfter(b, log, s)
		mode, err := s.dev.StartDirtyTracking(log)
		require.NoError(b, err)
		require.Equal(b, mdev.DirtyRelay, mode)
	}
	start := time.Now()
	require.NoError(b, g.Run(context.Background()))
	el := time.Since(start)
	require.NoError(b, g.Verify())
	return float64(frames) / el.Seconds()
}

// BenchmarkRelayThroughput measures loopback traffic through the mediated
// device in passthrough and in shadow-relay mode, alternating, and reports
// the relay/passthrough ratio of the best runs of each.
func BenchmarkRelayThroughput(b *testing.B) {
	const frames = 100000
	var bestPT, bestRelay float64
	for b.Loop() {
		bestPT = max(bestPT, trafficRate(b, frames, false))
		bestRelay = max(bestRelay, trafficRate(b, frames, true))
	}
	b.ReportMetric(bestPT, "passthrough-frames/s")
	b.ReportMetric(bestRelay, "relay-frames/s")
	b.ReportMetric(bestRelay/bestPT, "relay/passthrough")
}

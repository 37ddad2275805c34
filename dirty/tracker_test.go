package dirty_test

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
)

type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time          { return c.now }
func (c *fakeClock) Advance(d time.Duration) { c.now = c.now.Add(d) }

// markN marks n distinct pages starting at page first.
func markN(t *testing.T, log *dirty.Bitmap, first, n uint64) {
	t.Helper()
	if n > 0 {
		require.NoError(t, log.Mark(first*log.PageSize(), n*log.PageSize()))
	}
}

const gib = 1 << 30

func TestTrackerDecisions(t *testing.T) {
	type round struct {
		elapsed time.Duration // clock advance before the harvest
		dirtied uint64        // pages dirtied during the round
		want    dirty.Decision
	}
	cases := []struct {
		name   string
		opts   dirty.TrackerOptions
		rounds []round
	}{
		{
			name: "stops when the pending bytes fit the downtime target",
			// 1e9 B/s, 300 ms target: at most 73242 pages of 4 KiB.
			opts: dirty.TrackerOptions{Bandwidth: 1e9},
			rounds: []round{
				{time.Second, 200000, dirty.Continue},       // 819 ms
				{time.Second, 100000, dirty.Continue},       // 410 ms
				{time.Second, 73243, dirty.Continue},        // 300.0003 ms: just over
				{time.Second, 73242, dirty.StopDowntimeMet}, // 299.9992 ms
			},
		},
		{
			name: "a clean round meets any target",
			opts: dirty.TrackerOptions{Bandwidth: 1, DowntimeTarget: time.Nanosecond},
			rounds: []round{
				{time.Second, 0, dirty.StopDowntimeMet},
			},
		},
		{
			name: "stops at the round limit",
			opts: dirty.TrackerOptions{Bandwidth: 1e6, DowntimeTarget: time.Millisecond, MaxRounds: 3},
			rounds: []round{
				{time.Second, 1000, dirty.Continue},
				{time.Second, 900, dirty.Continue},
				{time.Second, 800, dirty.StopMaxRounds},
			},
		},
		{
			name: "a round limit of 1 stops after the full copy",
			opts: dirty.TrackerOptions{Bandwidth: 1e6, DowntimeTarget: time.Millisecond, MaxRounds: 1},
			rounds: []round{
				{time.Second, 1000, dirty.StopMaxRounds},
			},
		},
		{
			name: "the downtime target wins over the round limit",
			opts: dirty.TrackerOptions{Bandwidth: 1e9, MaxRounds: 2},
			rounds: []round{
				{time.Second, 1000000, dirty.Continue},
				{time.Second, 10, dirty.StopDowntimeMet},
			},
		},
		{
			name: "no convergence when the dirty set stops shrinking",
			opts: dirty.TrackerOptions{Bandwidth: 1e6, DowntimeTarget: time.Millisecond, StallRounds: 2},
			rounds: []round{
				{time.Second, 1000, dirty.Continue},
				{time.Second, 1200, dirty.Continue},          // not below 1000: stall 1
				{time.Second, 1000, dirty.StopNoConvergence}, // equal is not progress: stall 2
			},
		},
		{
			name: "a new minimum resets the stall count",
			opts: dirty.TrackerOptions{Bandwidth: 1e6, DowntimeTarget: time.Millisecond, StallRounds: 2},
			rounds: []round{
				{time.Second, 1000, dirty.Continue},
				{time.Second, 1200, dirty.Continue}, // stall 1
				{time.Second, 900, dirty.Continue},  // new minimum: stall 0
				{time.Second, 950, dirty.Continue},  // stall 1 (a drop from 1200 is not enough)
				{time.Second, 901, dirty.StopNoConvergence},
			},
		},
		{
			name: "defaults: 300 ms target, 30 rounds, 5 stalled rounds",
			opts: dirty.TrackerOptions{Bandwidth: 4096}, // one page per second
			rounds: []round{
				{time.Second, 10, dirty.Continue},
				{time.Second, 10, dirty.Continue},
				{time.Second, 10, dirty.Continue},
				{time.Second, 10, dirty.Continue},
				{time.Second, 10, dirty.Continue},
				{time.Second, 10, dirty.StopNoConvergence},
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			log := mustNew(t, 4*gib)
			clock := &fakeClock{now: time.Unix(1000, 0)}
			opts := c.opts
			opts.Now = clock.Now
			tr, err := dirty.NewTracker(log, &opts)
			require.NoError(t, err)
			require.NoError(t, tr.Begin())
			dst := mustNew(t, 4*gib)
			for i, r := range c.rounds {
				markN(t, log, 7, r.dirtied)
				clock.Advance(r.elapsed)
				got, err := tr.Next(dst)
				require.NoError(t, err)
				assert.Equal(t, i+1, got.N)
				assert.Equal(t, r.dirtied, got.Pages)
				assert.Equal(t, r.dirtied, dst.Count())
				assert.Equalf(t, r.want, got.Decision, "round %d: %v", got.N, got.Decision)
				require.NoError(t, dst.Clear()) // "sent"
			}
			assert.Len(t, tr.Rounds(), len(c.rounds))
		})
	}
}

func TestTrackerMeasurements(t *testing.T) {
	log := mustNew(t, 4*gib)
	clock := &fakeClock{now: time.Unix(0, 0)}
	tr, err := dirty.NewTracker(log, &dirty.TrackerOptions{Bandwidth: 100e6, Now: clock.Now})
	require.NoError(t, err)

	// Before the first harvest, stopping means sending everything: 4 GiB at
	// 100 MB/s is 42.94967296 s.
	assert.Equal(t, 42949672960*time.Nanosecond, tr.Downtime(100e6))
	pr, br := tr.DirtyRate()
	assert.Zero(t, pr)
	assert.Zero(t, br)

	markN(t, log, 0, 999) // dirtied before Begin: in the full copy, not a round
	require.NoError(t, tr.Begin())
	assert.Zero(t, log.Count(), "Begin clears the log")

	dst := mustNew(t, 4*gib)
	markN(t, log, 100, 1000)
	clock.Advance(2 * time.Second)
	r, err := tr.Next(dst)
	require.NoError(t, err)
	assert.Equal(t, dirty.Round{
		N:        1,
		Pages:    1000,
		Bytes:    4096000,
		At:       time.Unix(2, 0),
		Interval: 2 * time.Second,
		PageRate: 500,
		ByteRate: 2048000,
		Downtime: 40960 * time.Microsecond, // 4096000 B / 100e6 B/s
		Decision: dirty.StopDowntimeMet,
	}, r)
	pr, br = tr.DirtyRate()
	assert.Equal(t, 500.0, pr)
	assert.Equal(t, 2048000.0, br)
	assert.Equal(t, 4096*time.Microsecond, tr.Downtime(1e9))
	assert.Equal(t, time.Duration(math.MaxInt64), tr.Downtime(0))

	// No time passes: the rate is unknown and reported as zero.
	markN(t, log, 5000, 10)
	r, err = tr.Next(dst)
	require.NoError(t, err)
	assert.Equal(t, 2, r.N)
	assert.Zero(t, r.Interval)
	assert.Zero(t, r.PageRate)
	assert.Zero(t, r.ByteRate)
	assert.Equal(t, uint64(1010), dst.Count(), "Next ORs into an unsent destination")

	rounds := tr.Rounds()
	require.Len(t, rounds, 2)
	assert.Equal(t, uint64(1000), rounds[0].Pages)
	assert.Equal(t, uint64(10), rounds[1].Pages)
	rounds[0].Pages = 7
	assert.Equal(t, uint64(1000), tr.Rounds()[0].Pages, "Rounds returns a copy")
}

func TestTrackerFinal(t *testing.T) {
	log := mustNew(t, gib)
	clock := &fakeClock{now: time.Unix(0, 0)}
	tr, err := dirty.NewTracker(log, &dirty.TrackerOptions{Bandwidth: 1e6, MaxRounds: 2, Now: clock.Now})
	require.NoError(t, err)

	dst := mustNew(t, gib)
	_, err = tr.Next(dst)
	require.ErrorIs(t, err, dirty.ErrTracker, "Next before Begin")
	_, err = tr.Final(dst)
	require.ErrorIs(t, err, dirty.ErrTracker, "Final before Begin")

	require.NoError(t, tr.Begin())
	markN(t, log, 0, 1000)
	clock.Advance(time.Second)
	r, err := tr.Next(dst)
	require.NoError(t, err)
	require.Equal(t, dirty.Continue, r.Decision)
	require.NoError(t, dst.Clear())

	markN(t, log, 2000, 900)
	clock.Advance(time.Second)
	r, err = tr.Next(dst)
	require.NoError(t, err)
	require.Equal(t, dirty.StopMaxRounds, r.Decision)

	// The guest stops; the device wrote a few more pages in between, some of
	// them already pending.
	markN(t, log, 2800, 300)
	clock.Advance(10 * time.Millisecond)
	f, err := tr.Final(dst)
	require.NoError(t, err)
	assert.True(t, f.Final)
	assert.Equal(t, 3, f.N)
	assert.Equal(t, uint64(300), f.Pages)
	assert.Equal(t, dirty.StopMaxRounds, f.Decision)
	assert.Equal(t, uint64(900+200), dst.Count(), "dst holds every page left to copy")
	assert.Zero(t, log.Count())

	_, err = tr.Next(dst)
	require.ErrorIs(t, err, dirty.ErrTracker, "Next after Final")
	_, err = tr.Final(dst)
	require.ErrorIs(t, err, dirty.ErrTracker, "Final after Final")
	_, err = tr.Next(nil)
	require.ErrorIs(t, err, dirty.ErrTracker)

	// Begin starts over.
	require.NoError(t, tr.Begin())
	assert.Empty(t, tr.Rounds())
	_, err = tr.Next(nil)
	require.ErrorIs(t, err, dirty.ErrTracker, "nil destination")
	_, err = tr.Next(mustNew(t, gib/2))
	require.ErrorIs(t, err, dirty.ErrGeometry, "destination too small for the log")
	r, err = tr.Next(dst)
	require.NoError(t, err)
	assert.Equal(t, 1, r.N)
}

func TestTrackerOptionsRejected(t *testing.T) {
	log := mustNew(t, gib)
	cases := []struct {
		name string
		log  *dirty.Bitmap
		opts *dirty.TrackerOptions
	}{
		{"nil log", nil, &dirty.TrackerOptions{Bandwidth: 1}},
		{"nil options: bandwidth is required", log, nil},
		{"zero bandwidth", log, &dirty.TrackerOptions{}},
		{"negative bandwidth", log, &dirty.TrackerOptions{Bandwidth: -1}},
		{"NaN bandwidth", log, &dirty.TrackerOptions{Bandwidth: math.NaN()}},
		{"infinite bandwidth", log, &dirty.TrackerOptions{Bandwidth: math.Inf(1)}},
		{"negative downtime target", log, &dirty.TrackerOptions{Bandwidth: 1, DowntimeTarget: -1}},
		{"negative round limit", log, &dirty.TrackerOptions{Bandwidth: 1, MaxRounds: -1}},
		{"negative stall limit", log, &dirty.TrackerOptions{Bandwidth: 1, StallRounds: -1}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := dirty.NewTracker(c.log, c.opts)
			require.ErrorIs(t, err, dirty.ErrTracker)
		})
	}
}

func TestDecisionString(t *testing.T) {
	assert.Equal(t, "continue", dirty.Continue.String())
	assert.Equal(t, "stop: downtime target met", dirty.StopDowntimeMet.String())
	assert.Equal(t, "stop: round limit reached", dirty.StopMaxRounds.String())
	assert.Equal(t, "stop: no convergence", dirty.StopNoConvergence.String())
	assert.Equal(t, "Decision(9)", dirty.Decision(9).String())
}

// TestTrackerSimulatedMigration runs whole pre-copy migrations of a simulated
// guest in fake time: each round takes (bytes sent / bandwidth), during which
// the guest dirties pages at a fixed rate within a working set. A guest that
// dirties slower than the link drains converges to the downtime target; one
// that dirties faster never does and the tracker gives up.
func TestTrackerSimulatedMigration(t *testing.T) {
	const (
		memory    = gib
		bandwidth = 1e8 // bytes/s: 24414 pages/s
	)
	cases := []struct {
		name       string
		dirtyRate  float64 // pages per second
		workingSet uint64  // pages
		want       dirty.Decision
		maxRounds  int // the decision must come by this round
	}{
		{"idle-ish guest converges in few rounds", 100, 1 << 18, dirty.StopDowntimeMet, 4},
		{"busy guest below link speed converges", 12000, 1 << 18, dirty.StopDowntimeMet, 15},
		{"guest dirtying faster than the link never converges", 40000, 1 << 18, dirty.StopNoConvergence, 30},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			log := mustNew(t, memory)
			dst := mustNew(t, memory)
			clock := &fakeClock{now: time.Unix(0, 0)}
			tr, err := dirty.NewTracker(log, &dirty.TrackerOptions{Bandwidth: bandwidth, Now: clock.Now})
			require.NoError(t, err)
			rng := rand.New(rand.NewPCG(1, 1))
			// guestRuns lets the guest run for d, dirtying pages.
			guestRuns := func(d time.Duration) {
				clock.Advance(d)
				for range int(c.dirtyRate * d.Seconds()) {
					if err := log.Mark(rng.Uint64N(c.workingSet)*4096, 8); err != nil {
						t.Fatal(err)
					}
				}
			}
			require.NoError(t, tr.Begin())
			toSend := uint64(memory) // round 0: the full copy
			var r dirty.Round
			for {
				guestRuns(time.Duration(float64(toSend) / bandwidth * float64(time.Second)))
				r, err = tr.Next(dst)
				require.NoError(t, err)
				require.LessOrEqual(t, r.N, c.maxRounds, "no decision by round %d", c.maxRounds)
				if r.Decision != dirty.Continue {
					break
				}
				toSend = dst.Count() * 4096
				require.NoError(t, dst.Clear())
			}
			assert.Equal(t, c.want, r.Decision)
			assert.InDelta(t, c.dirtyRate, r.PageRate, c.dirtyRate*0.5+1, "observed rate (distinct pages, so at most the true rate)")
			f, err := tr.Final(dst)
			require.NoError(t, err)
			assert.Zero(t, f.Pages, "the guest stopped: nothing new")
			if c.want == dirty.StopDowntimeMet {
				assert.LessOrEqual(t, tr.Rounds()[len(tr.Rounds())-2].Downtime, dirty.DefaultDowntimeTarget)
			}
			t.Logf("%v after %d rounds, %d pages left for stop-and-copy", r.Decision, r.N, dst.Count())
		})
	}
}

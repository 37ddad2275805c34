package dirty

import (
	"fmt"
	"math"
	"time"
)

// Defaults for TrackerOptions fields left zero.
const (
	// DefaultDowntimeTarget is the downtime a Tracker aims for (QEMU's
	// default maximum downtime is also 300 ms).
	DefaultDowntimeTarget = 300 * time.Millisecond
	// DefaultMaxRounds bounds the pre-copy rounds, the full copy included.
	DefaultMaxRounds = 30
	// DefaultStallRounds is how many rounds in a row may fail to shrink the
	// dirty set before the tracker gives up on convergence.
	DefaultStallRounds = 5
)

// TrackerOptions configure a Tracker. Only Bandwidth is required.
type TrackerOptions struct {
	// Bandwidth is the migration link's throughput in bytes per second,
	// used to turn the pending dirty bytes into an expected downtime.
	Bandwidth float64
	// DowntimeTarget is the longest acceptable stop-and-copy: when the
	// pages pending after a round could be sent in this time, the tracker
	// says stop. DefaultDowntimeTarget if zero.
	DowntimeTarget time.Duration
	// MaxRounds bounds the rounds sent while the guest runs, the full copy
	// (round 0) included: Next reports StopMaxRounds for round MaxRounds.
	// DefaultMaxRounds if zero.
	MaxRounds int
	// StallRounds is the number of consecutive rounds whose dirty set is no
	// smaller than the smallest seen before, after which the tracker reports
	// StopNoConvergence. DefaultStallRounds if zero.
	StallRounds int
	// Now is the clock; time.Now if nil. Tests inject a fake one.
	Now func() time.Time
}

// Decision is what a Tracker advises after a round's harvest.
type Decision int

// Decisions. Every value but Continue means: stop the guest and the device
// now, call Tracker.Final, and send the result as the stop-and-copy.
const (
	// Continue: send this round's pages while the guest runs, then call
	// Next again.
	Continue Decision = iota
	// StopDowntimeMet: the pages pending can be sent within the downtime
	// target.
	StopDowntimeMet
	// StopMaxRounds: the round limit is reached.
	StopMaxRounds
	// StopNoConvergence: the dirty set has not shrunk for StallRounds
	// rounds; more rounds would not bring the downtime down.
	StopNoConvergence
)

func (d Decision) String() string {
	switch d {
	case Continue:
		return "continue"
	case StopDowntimeMet:
		return "stop: downtime target met"
	case StopMaxRounds:
		return "stop: round limit reached"
	case StopNoConvergence:
		return "stop: no convergence"
	}
	return fmt.Sprintf("Decision(%d)", int(d))
}

// Round records one harvest of the log.
type Round struct {
	// N is the round that sends these pages. Round 0 is the full copy (it
	// has no Round record); round N >= 1 sends what was dirtied while round
	// N-1 was being sent.
	N int
	// Final marks the harvest taken by Final, after the device stopped.
	Final bool
	// Pages is the number of pages harvested; Bytes is Pages*PageSize.
	Pages, Bytes uint64
	// At is when the harvest was taken; Interval is the time since the
	// previous harvest (or Begin), the window in which these pages were
	// dirtied.
	At       time.Time
	Interval time.Duration
	// PageRate and ByteRate are the dirty rate observed over Interval, per
	// second (0 when Interval is not positive).
	PageRate, ByteRate float64
	// Downtime is the expected stop-and-copy time if the guest stopped now:
	// Bytes / Bandwidth.
	Downtime time.Duration
	// Decision is the tracker's advice after this round (for a Final round,
	// the advice that led to it).
	Decision Decision
}

// Tracker drives iterative pre-copy migration from a live dirty log.
//
// The algorithm:
//
//  1. Begin clears the log. The caller then sends all of guest memory
//     (round 0). Anything written from here on is marked in the log.
//  2. Next harvests the log into a destination bitmap: these pages were
//     dirtied while the previous round was being sent, and are what the
//     current round must send. It records the round (pages, bytes, the
//     interval since the previous harvest, the dirty rate over it) and
//     estimates the downtime of stopping now as the harvested bytes divided
//     by the link bandwidth: if the guest stopped now, those pages (and
//     only those, the earlier rounds having been sent) would have to be
//     copied while it is stopped.
//  3. It then decides, in this order: StopDowntimeMet if that downtime is
//     within the target; StopMaxRounds if this is round MaxRounds;
//     StopNoConvergence if for StallRounds rounds in a row the harvest was
//     not smaller than the smallest earlier harvest (the guest dirties
//     memory at least as fast as the link drains it, so iterating further
//     cannot help); otherwise Continue.
//  4. On Continue the caller sends the destination's pages, clears it, and
//     calls Next again. On a stop decision it stops the guest and device,
//     then calls Final with the same, unsent destination: Final harvests
//     what was dirtied since, so the destination holds everything left to
//     copy during downtime.
//
// If sending a round fails, put its pages back into the log
// (log.Union(dst)) so that a later round sends them. A Tracker is not safe
// for concurrent use; the log it harvests is.
type Tracker struct {
	log  *Bitmap
	opts TrackerOptions

	began, done bool
	last        time.Time // time of the previous harvest (or Begin)
	rounds      []Round
	minPages    uint64 // smallest harvest so far
	stalled     int    // consecutive rounds not below minPages
}

// NewTracker returns a tracker harvesting log. opts.Bandwidth must be
// positive; other zero fields take their defaults.
func NewTracker(log *Bitmap, opts *TrackerOptions) (*Tracker, error) {
	if log == nil {
		return nil, fmt.Errorf("%w: nil log", ErrTracker)
	}
	if opts == nil {
		return nil, fmt.Errorf("%w: options with a bandwidth are required", ErrTracker)
	}
	o := *opts
	if !(o.Bandwidth > 0) || math.IsInf(o.Bandwidth, 0) {
		return nil, fmt.Errorf("%w: bandwidth %v is not a positive finite number of bytes per second", ErrTracker, o.Bandwidth)
	}
	if o.DowntimeTarget < 0 || o.MaxRounds < 0 || o.StallRounds < 0 {
		return nil, fmt.Errorf("%w: negative downtime target, round limit or stall limit", ErrTracker)
	}
	if o.DowntimeTarget == 0 {
		o.DowntimeTarget = DefaultDowntimeTarget
	}
	if o.MaxRounds == 0 {
		o.MaxRounds = DefaultMaxRounds
	}
	if o.StallRounds == 0 {
		o.StallRounds = DefaultStallRounds
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Tracker{log: log, opts: o}, nil
}

// Begin starts pre-copy: it clears the log and starts the clock. Call it
// with logging already on (the device writing into the log) and right
// before sending all of guest memory, which is round 0: a page written
// before the clear is in that full copy, one written after it is in the log.
// Begin may be called again to restart from scratch.
func (t *Tracker) Begin() error {
	if err := t.log.Clear(); err != nil {
		return err
	}
	t.began, t.done = true, false
	t.last = t.opts.Now()
	t.rounds = t.rounds[:0]
	t.minPages = math.MaxUint64
	t.stalled = 0
	return nil
}

// Next ends the current round: it harvests the log into dst (OR-ing, as
// Harvest does) and returns the record of the next round, whose pages dst
// now holds, with the tracker's decision.
func (t *Tracker) Next(dst *Bitmap) (Round, error) {
	r, err := t.harvest(dst)
	if err != nil {
		return Round{}, err
	}
	if r.Pages < t.minPages {
		t.minPages, t.stalled = r.Pages, 0
	} else {
		t.stalled++
	}
	switch {
	case r.Downtime <= t.opts.DowntimeTarget:
		r.Decision = StopDowntimeMet
	case r.N >= t.opts.MaxRounds:
		r.Decision = StopMaxRounds
	case t.stalled >= t.opts.StallRounds:
		r.Decision = StopNoConvergence
	}
	t.rounds = append(t.rounds, r)
	return r, nil
}

// Final takes the last harvest, after the guest and the device have stopped,
// into dst (normally the destination of the Next that advised stopping,
// still unsent). dst then holds every page left to copy. Its record has N
// one past the last Next's, Final set, and the last Next's Decision. After
// Final the tracker accepts no more rounds until Begin.
func (t *Tracker) Final(dst *Bitmap) (Round, error) {
	r, err := t.harvest(dst)
	if err != nil {
		return Round{}, err
	}
	r.Final = true
	if n := len(t.rounds); n > 0 {
		r.Decision = t.rounds[n-1].Decision
	}
	t.rounds = append(t.rounds, r)
	t.done = true
	return r, nil
}

// harvest takes one harvest into dst and fills in the round's measurements
// (everything but Decision and Final). The caller records the round.
func (t *Tracker) harvest(dst *Bitmap) (Round, error) {
	if !t.began {
		return Round{}, fmt.Errorf("%w: round before Begin", ErrTracker)
	}
	if t.done {
		return Round{}, fmt.Errorf("%w: round after Final", ErrTracker)
	}
	if dst == nil {
		return Round{}, fmt.Errorf("%w: nil destination", ErrTracker)
	}
	pages, err := t.log.Harvest(dst)
	if err != nil {
		return Round{}, err
	}
	now := t.opts.Now()
	r := Round{
		N:        len(t.rounds) + 1,
		Pages:    pages,
		Bytes:    pages * t.log.PageSize(),
		At:       now,
		Interval: now.Sub(t.last),
	}
	if r.Interval > 0 {
		secs := r.Interval.Seconds()
		r.PageRate = float64(pages) / secs
		r.ByteRate = float64(r.Bytes) / secs
	}
	r.Downtime = transferTime(r.Bytes, t.opts.Bandwidth)
	t.last = now
	return r, nil
}

// transferTime is how long bytes take at bandwidth bytes per second,
// saturating at the largest Duration.
func transferTime(bytes uint64, bandwidth float64) time.Duration {
	d := float64(bytes) / bandwidth * float64(time.Second)
	if d >= math.MaxInt64 {
		return math.MaxInt64
	}
	return time.Duration(math.Ceil(d))
}

// Rounds returns a copy of the rounds recorded since Begin, in order.
func (t *Tracker) Rounds() []Round { return append([]Round(nil), t.rounds...) }

// DirtyRate returns the dirty rate observed over the most recent round, in
// pages and bytes per second (zero before the first Next).
func (t *Tracker) DirtyRate() (pagesPerSec, bytesPerSec float64) {
	if len(t.rounds) == 0 {
		return 0, 0
	}
	r := t.rounds[len(t.rounds)-1]
	return r.PageRate, r.ByteRate
}

// Downtime estimates the stop-and-copy time, if the guest stopped now, over a
// link of bandwidth bytes per second: the bytes of the most recent harvest,
// still to be sent, or before the first harvest all of the log's span (the
// full copy). It returns the largest Duration for a bandwidth that is not
// positive.
func (t *Tracker) Downtime(bandwidth float64) time.Duration {
	if !(bandwidth > 0) {
		return math.MaxInt64
	}
	if len(t.rounds) == 0 {
		return transferTime(t.log.Span(), bandwidth)
	}
	return transferTime(t.rounds[len(t.rounds)-1].Bytes, bandwidth)
}

package softnet

import (
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vdpakit/vdpakit/vring"
)

// PollGroupOptions configures a PollGroup.
type PollGroupOptions struct {
	// Workers is the most goroutines the group polls with. Zero means
	// runtime.GOMAXPROCS(0) at NewPollGroup; at most MaxPollWorkers.
	Workers int
	// PollSpins, PollSleep and PollNoSleep are the idle policy of a
	// worker whose queues are all empty, as the Options fields of the
	// same names are for a queue of its own, counted in empty polls of a
	// queue (a round over n idle queues is n of them): up to PollSpins
	// empty polls, then rounds with runtime.Gosched between them until
	// twice that, then sleeps of PollSleep between rounds (or, with
	// PollNoSleep, Gosched for good). Zero means 64 spins (1 with
	// PollNoSleep) and 20µs; PollSleep is bounded to [1µs, 1ms].
	PollSpins   int
	PollSleep   time.Duration
	PollNoSleep bool
}

// MaxPollWorkers bounds PollGroupOptions.Workers.
const MaxPollWorkers = 1024

// PollGroup runs the transmit and control queues of ModePoll devices on a
// fixed number of goroutines, instead of one goroutine per queue: each
// worker goroutine polls the queues it was given in turn, one batch
// (Options.BatchSize chains at most) per queue per round, as a DPDK lcore
// polls the queues of many ports. Many queue pairs, or many devices, then
// cost a few goroutines rather than one busy goroutine each; a device
// joins a group with Options.PollGroup.
//
// A queue goes to the worker serving the fewest queues when it starts and
// leaves it when it stops; a worker goroutine exists only while it serves
// at least one queue, so a group needs no Close and leaves nothing behind
// once its devices' queues are stopped. Receive queues have no goroutine
// in either case (frames are written into them by the transmit side).
//
// Everything per queue holds as for a queue of its own: StopQueue returns
// the exact ring state once the worker has finished the queue's batch, a
// memory fault or a broken ring rule breaks that queue only (QueueErr) and
// the worker goes on with its other queues. After its queues change (one
// starts or stops), a worker goes on from the queue it had reached, so
// frequent starts and stops of some queues starve none of the others.
//
// What is shared is time, and the worker's goroutine. A FrameHandler that
// blocks holds up every queue of its worker, so handlers of grouped
// devices should hand frames off rather than wait. And a handler runs on
// the worker, so it must not stop, reset or close a device whose queues
// may be on the same group (StopQueue, Reset, vdpa.Local's Close and
// SetStatus 0 wait for the worker, which is busy in the handler): that
// waits for ever, as a handler stopping its own device's queue does with
// a goroutine per queue.
//
// A PollGroup is safe for concurrent use and may be shared by any number
// of devices.
type PollGroup struct {
	spins   int
	sleep   time.Duration
	noSleep bool

	mu      sync.Mutex
	workers []*pollWorker
}

// pollWorker is one of a group's goroutines, with the queues it serves.
type pollWorker struct {
	g *PollGroup
	// running and queues are under g.mu. running is set while a
	// goroutine serves queues; queues are the entries given to it and
	// not yet taken off by the goroutine (sync).
	running bool
	queues  []*pollEntry
	// changed tells the goroutine that queues changed (an entry added) or
	// that an entry is to be taken off (stopped, failed): it re-reads
	// them under g.mu. Set with or after the change (queue.stop sets it
	// after stopReq), cleared by the goroutine under g.mu before it
	// reads, so no change is missed.
	changed atomic.Bool
	// idle (the running goroutine's own) counts empty polls since the
	// last one that found work, across changes of the entries.
	idle int
}

// pollEntry is one started queue in a group.
type pollEntry struct {
	q       *queue
	process batchFunc
	done    chan struct{} // q.done of this start: closed when the entry is taken off
	// adopted and failed belong to the worker goroutine: it turned the
	// queue's notifications off; the queue broke (q.err is set) and is to
	// be taken off.
	adopted, failed bool
}

// ErrPollGroup: Options.PollGroup with a mode other than ModePoll (the
// zero Mode is ModeEvent, so a group needs Mode set).
var ErrPollGroup = errors.New("softnet: Options.PollGroup needs Mode: ModePoll")

// NewPollGroup returns a group configured by opts (nil means defaults).
// It starts no goroutine until a queue joins it.
func NewPollGroup(opts *PollGroupOptions) *PollGroup {
	var o PollGroupOptions
	if opts != nil {
		o = *opts
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	o.Workers = min(o.Workers, MaxPollWorkers)
	if o.PollSpins <= 0 {
		o.PollSpins = 64
		if o.PollNoSleep {
			o.PollSpins = 1 // see New
		}
	}
	if o.PollSleep == 0 {
		o.PollSleep = 20 * time.Microsecond
	}
	g := &PollGroup{spins: o.PollSpins, sleep: min(max(o.PollSleep, time.Microsecond), time.Millisecond), noSleep: o.PollNoSleep}
	g.workers = make([]*pollWorker, o.Workers)
	for i := range g.workers {
		g.workers[i] = &pollWorker{g: g}
	}
	return g
}

// Queues returns how many queues each worker serves now, one entry per
// worker (running or not).
func (g *PollGroup) Queues() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := make([]int, len(g.workers))
	for i, w := range g.workers {
		n[i] = len(w.queues)
	}
	return n
}

// Running returns how many worker goroutines run now.
func (g *PollGroup) Running() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, w := range g.workers {
		if w.running {
			n++
		}
	}
	return n
}

// String describes the group for logs.
func (g *PollGroup) String() string {
	return fmt.Sprintf("softnet.PollGroup(%d workers, queues %v)", len(g.workers), g.Queues())
}

// add gives a started queue to the worker serving the fewest, starting
// its goroutine if it has none.
func (g *PollGroup) add(e *pollEntry) {
	g.mu.Lock()
	defer g.mu.Unlock()
	w := g.workers[0]
	for _, o := range g.workers[1:] {
		if len(o.queues) < len(w.queues) {
			w = o
		}
	}
	w.queues = append(w.queues, e)
	e.q.poller = w
	w.changed.Store(true)
	if !w.running {
		w.running = true
		go w.run()
	}
}

// run is a worker goroutine. Like a queue's own goroutine (Device.run) it
// turns on SetPanicOnFault for itself; serve defers vring.CatchFault once
// per stretch of polling, not per batch, and a fault or an error ends the
// stretch with the entry it happened in, which is then taken off alone.
func (w *pollWorker) run() {
	debug.SetPanicOnFault(true) // this goroutine only; it ends with the worker
	var qs []*pollEntry
	// next is the entry to serve first after the entries change, pos its
	// index then: each stretch of polling resumes where the last one
	// stopped, so queues at the end of a worker's list are not starved
	// by others starting and stopping faster than a round takes.
	var next *pollEntry
	pos := 0
	w.idle = 0
	for {
		if qs = w.sync(qs); qs == nil {
			return
		}
		for _, e := range qs {
			if !e.adopted {
				e.adopted = true
				q := e.q
				if err := vring.Guard(func() error { q.dq.DisableNotify(); return nil }); err != nil {
					w.fail(e, err)
				}
			}
		}
		start := slices.Index(qs, next)
		if start < 0 { // taken off: whatever moved into its place
			start = min(pos, len(qs)-1)
		}
		i, err := w.serve(qs, start)
		if err != nil {
			w.fail(qs[i], err)
			i = (i + 1) % len(qs)
		}
		next, pos = qs[i], i
	}
}

// fail records a queue's error and has the entry taken off.
func (w *pollWorker) fail(e *pollEntry, err error) {
	e.q.setErr(err)
	e.failed = true
	w.changed.Store(true)
}

// sync takes stopped and failed entries off (closing their done channels:
// the worker never touches their queues again) and returns the entries to
// serve, in qs's storage, or nil when none is left: the goroutine then
// ends, and the next add starts another.
func (w *pollWorker) sync(qs []*pollEntry) []*pollEntry {
	w.g.mu.Lock()
	defer w.g.mu.Unlock()
	w.changed.Store(false)
	keep := w.queues[:0]
	for _, e := range w.queues {
		if e.failed || e.q.stopReq.Load() {
			close(e.done)
			continue
		}
		keep = append(keep, e)
	}
	clear(w.queues[len(keep):])
	w.queues = keep
	clear(qs)
	if len(keep) == 0 {
		w.running = false
		return nil
	}
	return append(qs[:0], keep...)
}

// serve polls qs in turn from qs[start] until the entries change (nil
// error; qs[i] is the next entry it would have served) or processing qs[i]
// fails (a ring error, a failed log write, a memory fault caught here).
func (w *pollWorker) serve(qs []*pollEntry, start int) (i int, err error) {
	defer vring.CatchFault(&err)
	g := w.g
	i = start
	for {
		work := false
		for range len(qs) {
			// Checked before every queue, not once per round: a round over
			// thousands of queues is long, and a stop (which sets changed
			// after stopReq) waits for the worker to let go of its queue.
			if w.changed.Load() {
				return i, nil
			}
			if e := qs[i]; !e.failed {
				// errTxHeld: idle until the receive queue starts again.
				n, err := e.process(e.q)
				if err != nil && err != errTxHeld {
					return i, err
				}
				if n > 0 {
					work = true
				}
			}
			if i++; i == len(qs) {
				i = 0
			}
		}
		if work {
			w.idle = 0
			continue
		}
		// The idle policy counts empty polls, as a queue's own goroutine
		// does, not rounds: a round over thousands of idle queues is
		// itself a long spin, and the worker must not keep its CPU from
		// other goroutines for PollSpins of them.
		w.idle += len(qs)
		switch {
		case w.idle < g.spins:
		case w.idle < 2*g.spins || g.noSleep:
			runtime.Gosched()
		default:
			time.Sleep(g.sleep)
		}
	}
}

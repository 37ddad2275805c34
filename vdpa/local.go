package vdpa

import (
	"errors"
	"fmt"
	"sync"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Errors returned by Local for calls that break the virtio initialization
// rules. All are checked with errors.Is.
var (
	// ErrBadStatus: a status write the virtio status rules forbid
	// (clearing bits without a reset, FEATURES_OK before features,
	// DRIVER_OK before FEATURES_OK or without memory).
	ErrBadStatus = errors.New("vdpa: invalid status transition")
	// ErrBadFeatures: features that were not offered, or set at the wrong
	// time.
	ErrBadFeatures = errors.New("vdpa: invalid features")
	// ErrBadQueue: a queue index or size out of range, or a queue
	// configured while it runs.
	ErrBadQueue = errors.New("vdpa: invalid queue configuration")
	// ErrQueueBusy: the queue is running; suspend the device (or disable the
	// queue) first.
	ErrQueueBusy = errors.New("vdpa: queue is running")
	// ErrNoMemory: a queue is started before SetMemory.
	ErrNoMemory = errors.New("vdpa: no guest memory set")
)

// QueueErrReporter is implemented by handlers that can report a queue
// whose processing stopped on an error (a ring rule broken by the driver, a
// failed dirty-log write). Local turns such an error into the
// DEVICE_NEEDS_RESET status bit (virtio 1.2 §2.1.2). softnet.Device
// implements it.
type QueueErrReporter interface {
	QueueErr(q int) error
}

// QueueErrNotifier is a QueueErrReporter that also announces a queue error
// when it happens, so that whoever watches the device waits for the
// announcement instead of asking QueueErr on a timer. softnet.Device
// implements it.
type QueueErrNotifier interface {
	QueueErrReporter
	// QueueErrNotify returns the channel that receives after a queue
	// stops on an error. It has room for one value: announcements made
	// while one is waiting merge into it, so a receiver asks QueueErr
	// about every queue it cares for. The channel is the same for the
	// handler's life and is never closed; one watcher at a time receives
	// from it.
	QueueErrNotify() <-chan struct{}
}

// FailureNotifier is implemented by devices that can announce that their
// data path may have failed on its own, so that a caller watching for
// DEVICE_NEEDS_RESET need not poll Status. Local implements it when its
// handler is a QueueErrNotifier.
type FailureNotifier interface {
	// FailureNotify returns a channel that receives after the device's
	// data path may have failed on its own (Status then says whether it
	// did), or nil when the device cannot announce failures and must be
	// polled. A failure the device reports from a call (an error from
	// SetLog, SetStatus...) is not announced: the caller has the error.
	// The channel has room for one value, is never closed, and must have
	// one receiver at a time. FailureNotify does not block.
	FailureNotify() <-chan struct{}
}

// LocalOptions configure a Local device. A nil *LocalOptions means
// defaults.
type LocalOptions struct {
	// FeatureMask, when non-zero, limits the features offered to the
	// driver to those in the mask (the handler's offer & FeatureMask).
	FeatureMask virtio.Features
}

type localQueue struct {
	num   uint16
	addr  QueueAddr
	state QueueState
	// stateSet: state came from SetQueueBase or a stop since the reset;
	// otherwise the queue starts fresh (vring.InitialState: a packed
	// queue's positions start with their wrap counters set).
	stateSet bool
	kick     *EventFD
	call     *EventFD
	enabled  bool
	running  bool
	err      error // the last start failure
	// dq is the running queue; nil when stopped.
	dq *vring.DeviceQueue
}

// Local is an in-process Device that serves a Handler directly: it runs the
// control path (feature negotiation, the status state machine, queue
// configuration) and hands validated vring.DeviceQueues to the handler, so
// a whole virtio stack can run in one process with no kernel. It also
// implements Suspender and Logger.
//
// A queue runs while the device is DRIVER_OK, the queue is enabled and the
// device is not suspended. Its rings are validated against the Memory given
// to SetMemory when it starts; a queue whose rings are invalid is not
// started, the error is returned by the call that tried to start it and the
// device status gets NEEDS_RESET.
//
// Local's methods are safe for concurrent use (they serialize on a mutex).
type Local struct {
	h       Handler
	offered virtio.Features

	mu        sync.Mutex
	status    virtio.Status
	features  virtio.Features
	featSet   bool
	mem       *vring.Memory
	log       *dirty.Bitmap
	suspended bool
	closed    bool
	queues    []localQueue
	// orphans are queues whose handler failed to stop them: their cached
	// dirty-log marks are applied after the handler's next Reset (until
	// then the handler may still be driving the queue, so they cannot be
	// applied earlier). Until then SetMemory and SetLog refuse: the
	// caller would release memory or a log still in use.
	orphans []*vring.DeviceQueue
}

var (
	_ Device    = (*Local)(nil)
	_ Suspender = (*Local)(nil)
	_ Logger    = (*Local)(nil)
)

// NewLocal returns a Local serving h.
func NewLocal(h Handler, opts *LocalOptions) *Local {
	offered := h.Features()
	if opts != nil && opts.FeatureMask != 0 {
		offered &= opts.FeatureMask
	}
	return &Local{h: h, offered: offered, queues: make([]localQueue, h.NumQueues())}
}

// Handler returns the handler Local serves.
func (l *Local) Handler() Handler { return l.h }

func (l *Local) lock() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	return nil
}

// DeviceID implements Device.
func (l *Local) DeviceID() (virtio.DeviceID, error) { return l.h.DeviceID(), nil }

// Features implements Device: the handler's offer (masked by
// LocalOptions.FeatureMask).
func (l *Local) Features() (virtio.Features, error) { return l.offered, nil }

// SetFeatures implements Device. The driver may set features after
// ACKNOWLEDGE|DRIVER and before FEATURES_OK (virtio 1.2 §3.1.1), and only
// offered ones.
func (l *Local) SetFeatures(f virtio.Features) error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.mu.Unlock()
	if l.status&virtio.StatusFeaturesOK != 0 {
		return fmt.Errorf("%w: features are fixed once FEATURES_OK is set (status %v)", ErrBadFeatures, l.status)
	}
	if extra := f &^ l.offered; extra != 0 {
		return fmt.Errorf("%w: not offered: %s", ErrBadFeatures, extra.Format(l.h.DeviceID()))
	}
	l.features, l.featSet = f, true
	return nil
}

// Status implements Device. A running queue the handler reports broken
// (QueueErrReporter) sets DEVICE_NEEDS_RESET.
func (l *Local) Status() (virtio.Status, error) {
	if err := l.lock(); err != nil {
		return 0, err
	}
	defer l.mu.Unlock()
	if r, ok := l.h.(QueueErrReporter); ok {
		for i := range l.queues {
			if l.queues[i].running && r.QueueErr(i) != nil {
				l.status |= virtio.StatusDeviceNeedsReset
			}
		}
	}
	return l.status, nil
}

// FailureNotify implements FailureNotifier: the handler's QueueErrNotify
// channel when it is a QueueErrNotifier (a queue it stops on an error is
// what sets DEVICE_NEEDS_RESET in Status), otherwise nil. It is the
// handler's own channel: a watcher of the Local and one of the handler
// would take each other's announcements, so watch one or the other.
func (l *Local) FailureNotify() <-chan struct{} {
	if n, ok := l.h.(QueueErrNotifier); ok {
		return n.QueueErrNotify()
	}
	return nil
}

// QueueErr returns the error that stopped queue i: a failed start (invalid
// rings) or, from a QueueErrReporter handler, a data-path error.
func (l *Local) QueueErr(i int) error {
	return l.withQueue(i, func(q *localQueue) error {
		if q.err != nil {
			return q.err
		}
		if r, ok := l.h.(QueueErrReporter); ok && q.running {
			return r.QueueErr(i)
		}
		return nil
	})
}

// SetStatus implements Device. Zero resets the device (every queue stops,
// the handler is reset, queue configuration is cleared). Otherwise bits
// may only be added: FEATURES_OK is accepted only if the handler accepts
// the features (if not, the bit stays clear, as §3.1.1 step 6 expects the
// driver to notice); DRIVER_OK starts every enabled queue.
func (l *Local) SetStatus(s virtio.Status) error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.mu.Unlock()
	if s == 0 {
		l.resetLocked()
		return nil
	}
	old := l.status
	if s&old != old {
		return fmt.Errorf("%w: %v -> %v clears bits without a reset", ErrBadStatus, old, s)
	}
	added := s &^ old
	if added&virtio.StatusDeviceNeedsReset != 0 {
		return fmt.Errorf("%w: NEEDS_RESET is set by the device, not the driver", ErrBadStatus)
	}
	if added&virtio.StatusFeaturesOK != 0 {
		if s&virtio.StatusDriver == 0 || !l.featSet {
			return fmt.Errorf("%w: FEATURES_OK needs DRIVER and SetFeatures first", ErrBadStatus)
		}
		if err := l.h.SetFeatures(l.features); err != nil {
			// Leave FEATURES_OK clear: the driver reads status back and
			// sees the device refused (§3.1.1).
			l.status = s &^ (virtio.StatusFeaturesOK | virtio.StatusDriverOK)
			return nil
		}
	}
	if added&virtio.StatusDriverOK != 0 && s&virtio.StatusFeaturesOK == 0 {
		return fmt.Errorf("%w: DRIVER_OK without FEATURES_OK", ErrBadStatus)
	}
	l.status = s
	if added&virtio.StatusFailed != 0 {
		_ = l.stopAllLocked()
		return nil
	}
	if added&virtio.StatusDriverOK != 0 {
		return l.startAllLocked()
	}
	return nil
}

func (l *Local) resetLocked() {
	_ = l.stopAllLocked()
	l.h.Reset()
	// Queues whose StopQueue failed are stopped now: apply what their
	// loggers still cache.
	for _, dq := range l.orphans {
		_ = dq.FlushLog()
	}
	clear(l.orphans)
	l.orphans = l.orphans[:0]
	l.status = 0
	l.features, l.featSet = 0, false
	l.suspended = false
	for i := range l.queues {
		l.queues[i] = localQueue{}
	}
}

// running reports whether queues should be running.
func (l *Local) live() bool {
	return l.status&virtio.StatusDriverOK != 0 && l.status&(virtio.StatusFailed|virtio.StatusDeviceNeedsReset) == 0 && !l.suspended
}

func (l *Local) startAllLocked() error {
	if !l.live() {
		return nil
	}
	var errs []error
	for i := range l.queues {
		if l.queues[i].enabled && !l.queues[i].running {
			if err := l.startLocked(i); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// startLocked validates queue i and hands it to the handler.
func (l *Local) startLocked(i int) error {
	q := &l.queues[i]
	err := l.buildAndStart(i, q)
	q.err = err
	if err != nil {
		l.status |= virtio.StatusDeviceNeedsReset
	}
	return err
}

func (l *Local) buildAndStart(i int, q *localQueue) error {
	if l.mem == nil {
		return fmt.Errorf("queue %d: %w", i, ErrNoMemory)
	}
	if q.num == 0 {
		return fmt.Errorf("%w: queue %d enabled without a size", ErrBadQueue, i)
	}
	opts := vring.DeviceQueueOptions{
		Index:    i,
		Layout:   vring.Layout{Size: q.num, Desc: q.addr.Desc, Avail: q.addr.Avail, Used: q.addr.Used},
		Features: l.features,
		State:    q.state,
	}
	if !q.stateSet {
		opts.State = vring.InitialState(l.features)
	}
	if l.log != nil {
		// Each queue logs through its own cache, applied at every push
		// and flushed by stopLocked once the handler has stopped it.
		opts.Log = l.log.NewCache()
	}
	dq, err := vring.NewDeviceQueue(l.mem, opts)
	if err != nil {
		return fmt.Errorf("vdpa: local: queue %d: %w", i, err)
	}
	if err := l.h.StartQueue(i, dq, q.kick, q.call); err != nil {
		return fmt.Errorf("vdpa: local: start queue %d: %w", i, err)
	}
	q.running, q.dq = true, dq
	return nil
}

// stopLocked stops queue i and keeps its state for QueueBase and restart.
func (l *Local) stopLocked(i int) error {
	q := &l.queues[i]
	if !q.running {
		return nil
	}
	st, err := l.h.StopQueue(i)
	dq := q.dq
	q.running, q.dq = false, nil
	if err != nil {
		// The handler may still drive dq: its cached dirty-log marks are
		// applied after the handler's Reset (resetLocked), even if the
		// queue is started again meanwhile.
		l.orphans = append(l.orphans, dq)
		return fmt.Errorf("vdpa: local: stop queue %d: %w", i, err)
	}
	q.state, q.stateSet = st, true
	// Apply the dirty-log marks the queue's logger still caches (see
	// vring.LogFlusher), so that a log harvested after the stop holds
	// every write the queue made. It fails only on a log closed under
	// the running queue; the queue is stopped all the same.
	if err := dq.FlushLog(); err != nil {
		return &flushError{fmt.Errorf("vdpa: local: queue %d stopped, but applying its dirty-log marks failed: %w", i, err)}
	}
	return nil
}

// flushError is stopLocked's error for a queue that stopped but whose
// cached dirty-log marks could not be applied.
type flushError struct{ error }

func (e *flushError) Unwrap() error { return e.error }

// stopAllLocked stops every queue, highest index first: in virtio-net
// (and other devices with queue pairs) the transmit queue of a pair follows
// its receive queue, so a device that loops or forwards transmitted data
// stops producing before the queue it produces into stops, and nothing is
// dropped for lack of a running receive queue.
func (l *Local) stopAllLocked() error {
	var errs []error
	for i := len(l.queues) - 1; i >= 0; i-- {
		if err := l.stopLocked(i); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ConfigSize implements Device.
func (l *Local) ConfigSize() (int, error) { return l.h.ConfigSize(), nil }

// ReadConfig implements Device.
func (l *Local) ReadConfig(off int, p []byte) error {
	if off < 0 {
		return fmt.Errorf("vdpa: local: negative config offset %d", off)
	}
	l.h.ReadConfig(off, p)
	return nil
}

// WriteConfig implements Device.
func (l *Local) WriteConfig(off int, p []byte) error {
	if off < 0 {
		return fmt.Errorf("vdpa: local: negative config offset %d", off)
	}
	return l.h.WriteConfig(off, p)
}

// NumQueues implements Device.
func (l *Local) NumQueues() (int, error) { return len(l.queues), nil }

// MaxQueueSize implements Device.
func (l *Local) MaxQueueSize() (uint16, error) { return l.h.MaxQueueSize(), nil }

// SetMemory implements Device. The memory must not change under running
// queues. Local does not take ownership: the caller closes it, and only
// after Close, a reset or a successful Suspend, since running queues
// access it. After a queue's StopQueue failed (the handler may still
// drive it), SetMemory returns ErrQueueBusy until a reset.
func (l *Local) SetMemory(mem *vring.Memory) error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.mu.Unlock()
	for i := range l.queues {
		if l.queues[i].running {
			return fmt.Errorf("%w: queue %d: suspend before changing memory", ErrQueueBusy, i)
		}
	}
	if err := l.orphanedLocked("changing memory"); err != nil {
		return err
	}
	l.mem = mem
	return nil
}

// orphanedLocked returns an ErrQueueBusy error while a queue whose
// StopQueue failed may still be driven by the handler: until a reset, its
// guest memory and dirty log stay in use, so the caller must neither
// replace (and then release) them nor be told it may.
func (l *Local) orphanedLocked(what string) error {
	if len(l.orphans) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %d queue(s) the handler failed to stop may still run: reset the device before %s", ErrQueueBusy, len(l.orphans), what)
}

// withQueue runs fn on queue i with the device locked, after checking that
// i names one of its queues.
func (l *Local) withQueue(i int, fn func(q *localQueue) error) error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.mu.Unlock()
	if i < 0 || i >= len(l.queues) {
		return fmt.Errorf("%w: queue %d of %d", ErrBadQueue, i, len(l.queues))
	}
	return fn(&l.queues[i])
}

// configureQueue is withQueue for a queue that must not be running: queue
// configuration changes only while a queue is stopped.
func (l *Local) configureQueue(i int, set func(q *localQueue) error) error {
	return l.withQueue(i, func(q *localQueue) error {
		if q.running {
			return fmt.Errorf("%w: queue %d", ErrQueueBusy, i)
		}
		return set(q)
	})
}

// SetQueueNum implements Device: up to MaxQueueSize, a power of two unless
// RING_PACKED was set with SetFeatures (virtio 1.2 §2.8: any size).
func (l *Local) SetQueueNum(i int, size uint16) error {
	return l.configureQueue(i, func(q *localQueue) error {
		if !vring.ValidQueueSizeFor(size, l.features) || size > l.h.MaxQueueSize() {
			return fmt.Errorf("%w: queue %d size %d (up to %d; a power of two unless RING_PACKED)", ErrBadQueue, i, size, l.h.MaxQueueSize())
		}
		q.num = size
		return nil
	})
}

// SetQueueAddr implements Device. Addresses are validated when the queue
// starts, against the memory current then.
func (l *Local) SetQueueAddr(i int, addr QueueAddr) error {
	return l.configureQueue(i, func(q *localQueue) error { q.addr = addr; return nil })
}

// SetQueueBase implements Device.
func (l *Local) SetQueueBase(i int, st QueueState) error {
	return l.configureQueue(i, func(q *localQueue) error { q.state, q.stateSet = st, true; return nil })
}

// QueueBase implements Device. The queue must not be running (Suspend
// first): unlike vhost, Local does not stop a queue as a side effect of
// reading its position.
func (l *Local) QueueBase(i int) (QueueState, error) {
	var st QueueState
	err := l.configureQueue(i, func(q *localQueue) error {
		st = q.state
		if !q.stateSet {
			st = vring.InitialState(l.features)
		}
		return nil
	})
	return st, err
}

// SetQueueKick implements Device.
func (l *Local) SetQueueKick(i int, kick *EventFD) error {
	return l.configureQueue(i, func(q *localQueue) error { q.kick = kick; return nil })
}

// SetQueueCall implements Device.
func (l *Local) SetQueueCall(i int, call *EventFD) error {
	return l.configureQueue(i, func(q *localQueue) error { q.call = call; return nil })
}

// EnableQueue implements Device. Enabling a queue of a DRIVER_OK device
// starts it; disabling stops it and keeps its state for QueueBase.
func (l *Local) EnableQueue(i int, enable bool) error {
	return l.withQueue(i, func(q *localQueue) error {
		if !enable {
			q.enabled = false
			return l.stopLocked(i)
		}
		q.enabled = true
		if l.live() && !q.running {
			return l.startLocked(i)
		}
		return nil
	})
}

// Suspend implements Suspender: every running queue stops with its state
// kept (read it with QueueBase).
func (l *Local) Suspend() error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.mu.Unlock()
	l.suspended = true
	return l.stopAllLocked()
}

// Resume implements Suspender: queues stopped by Suspend restart from their
// (possibly SetQueueBase-changed) state.
func (l *Local) Resume() error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.mu.Unlock()
	l.suspended = false
	return l.startAllLocked()
}

// SetLog implements Logger: every write the handler's queues make to guest
// memory is marked in log from now on (nil stops logging). Running queues
// restart with the new logger at their exact position. After a queue's
// StopQueue failed, SetLog returns ErrQueueBusy until a reset, as
// SetMemory does: the old log may still be marked.
func (l *Local) SetLog(log *dirty.Bitmap) error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.mu.Unlock()
	if err := l.orphanedLocked("changing the log"); err != nil {
		return err
	}
	var restart []int
	var errs []error
	for i := len(l.queues) - 1; i >= 0; i-- {
		if l.queues[i].running {
			if err := l.stopLocked(i); err != nil {
				var fe *flushError
				if !errors.As(err, &fe) {
					return err
				}
				errs = append(errs, err) // stopped: it restarts on the new log
			}
			restart = append(restart, i)
		}
	}
	l.log = log
	for k := len(restart) - 1; k >= 0; k-- {
		i := restart[k]
		if err := l.startLocked(i); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close implements Device: it stops every queue and resets the handler.
// Memory and eventfds stay owned by the caller.
func (l *Local) Close() error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.mu.Unlock()
	l.resetLocked()
	l.closed = true
	return nil
}

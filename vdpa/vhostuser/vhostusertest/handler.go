// Package vhostusertest is a test kit for vhost-user peers. Handler is a
// small virtio-net vdpa.Handler used by the vhost-user tests, the DPDK
// interop tests and the vhost-user-net example: one queue pair (queue 0
// receive, queue 1 transmit) processed by one goroutine that busy-polls
// with notification suppression (NO_NOTIFY while polling, so a polling
// driver such as DPDK's virtio-user never needs to kick) and sleeps on the
// kick eventfds after a spell of idle polls. The full-featured software
// device (multi-queue, control queue) is vdpa/softnet.
//
// Modes: Loopback writes every transmitted frame back into a receive
// buffer (like vdpa_sim_net); Sink counts and discards; Responder answers
// ARP requests and ICMP echo requests for its IPv4 address. In every mode
// Inject delivers frames to the driver with back-pressure, so none is lost.
//
// Guest memory that faults (the front-end truncated its memory file) stops
// the worker with an error matching vring.ErrMemoryFault, which the
// handler reports through vdpa.QueueErrReporter; the process lives on.
package vhostusertest

import (
	"context"
	"encoding/binary"
	"errors"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vdpakit/vdpakit/internal/netreply"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Mode selects what happens to transmitted frames.
type Mode int

const (
	Loopback  Mode = iota // echo transmitted frames to the receive queue
	Sink                  // count and drop transmitted frames
	Responder             // answer ARP and ICMP echo requests for SetIPv4's address
)

// Counters are cumulative traffic counters.
type Counters struct {
	TxFrames, TxBytes uint64 // taken from the transmit queue
	RxFrames, RxBytes uint64 // delivered to the receive queue
	RxDropped         uint64 // frames for the receive queue dropped: loopback frames with no receive buffer, responder replies beyond MaxPendingReplies
	Kicks, Calls      uint64 // eventfd wake-ups and interrupts sent
}

// Handler is the device. Create with New.
type Handler struct {
	mode Mode
	mac  [6]byte

	mu       sync.Mutex
	features virtio.Features
	queues   [2]*queue
	cancel   context.CancelFunc
	done     chan struct{}

	txFrames, txBytes, rxFrames, rxBytes, rxDropped, kicks, calls atomic.Uint64

	inject   chan []byte
	injected atomic.Uint64
	ip       atomic.Uint32
	errMu    sync.Mutex
	err      error
	fault    error // the memory fault that stopped the worker, or nil
}

func (h *Handler) setErr(err error) {
	h.errMu.Lock()
	if h.err == nil {
		h.err = err
	}
	h.errMu.Unlock()
}

// QueueErr implements vdpa.QueueErrReporter: once guest memory faulted
// (the front-end truncated the file behind it), the worker serving both
// queues has stopped, and QueueErr returns the fault (matching
// vring.ErrMemoryFault) for either queue until the queues are restarted or
// the handler is reset.
func (h *Handler) QueueErr(q int) error {
	if q < 0 || q > 1 {
		return errors.New("vhostusertest: no such queue")
	}
	h.errMu.Lock()
	defer h.errMu.Unlock()
	return h.fault
}

func (h *Handler) setFault(err error) {
	h.errMu.Lock()
	h.fault = err
	if h.err == nil {
		h.err = err
	}
	h.errMu.Unlock()
}

// Err returns the first ring error the handler met (a broken queue), or nil.
func (h *Handler) Err() error {
	h.errMu.Lock()
	defer h.errMu.Unlock()
	return h.err
}

// SetIPv4 sets the address the Responder answers for.
func (h *Handler) SetIPv4(ip [4]byte) { h.ip.Store(binary.BigEndian.Uint32(ip[:])) }

type queue struct {
	dq         *vring.DeviceQueue
	kick, call *vdpa.EventFD
}

var _ vdpa.QueueErrReporter = (*Handler)(nil)

// New returns a handler in the given mode.
func New(mode Mode, mac [6]byte) *Handler {
	return &Handler{mode: mode, mac: mac, inject: make(chan []byte, 1024)}
}

// DeviceID implements vdpa.Handler.
func (h *Handler) DeviceID() virtio.DeviceID { return virtio.DeviceNet }

// Features implements vdpa.Handler.
func (h *Handler) Features() virtio.Features {
	return virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC, virtio.NetFStatus, virtio.NetFMrgRxbuf,
		virtio.FIndirectDesc, virtio.FEventIdx, virtio.FRingPacked)
}

// SetFeatures implements vdpa.Handler.
func (h *Handler) SetFeatures(f virtio.Features) error {
	if f&^h.Features() != 0 {
		return errors.New("vhostusertest: features not offered")
	}
	h.mu.Lock()
	h.features = f
	h.mu.Unlock()
	return nil
}

// ConfigSize implements vdpa.Handler: mac, status, max_virtqueue_pairs.
func (h *Handler) ConfigSize() int { return virtio.NetCfgMTU }

// ReadConfig implements vdpa.Handler.
func (h *Handler) ReadConfig(off int, p []byte) {
	var cfg [virtio.NetConfigSize]byte
	c := virtio.NetConfig{MAC: h.mac, Status: virtio.NetSLinkUp, MaxVirtqueuePairs: 1}
	_ = c.Encode(cfg[:])
	clear(p)
	if off >= 0 && off < h.ConfigSize() {
		copy(p, cfg[off:h.ConfigSize()])
	}
}

// WriteConfig implements vdpa.Handler: every field here is read-only, and
// writes to read-only fields are ignored.
func (h *Handler) WriteConfig(off int, p []byte) error { return nil }

// NumQueues implements vdpa.Handler.
func (h *Handler) NumQueues() int { return 2 }

// MaxQueueSize implements vdpa.Handler.
func (h *Handler) MaxQueueSize() uint16 { return 4096 }

// StartQueue implements vdpa.Handler.
func (h *Handler) StartQueue(q int, dq *vring.DeviceQueue, kick, call *vdpa.EventFD) error {
	if q < 0 || q > 1 {
		return errors.New("vhostusertest: no such queue")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stopWorker()
	h.queues[q] = &queue{dq: dq, kick: kick, call: call}
	h.startWorker()
	return nil
}

// StopQueue implements vdpa.Handler.
func (h *Handler) StopQueue(q int) (vring.QueueState, error) {
	if q < 0 || q > 1 {
		return vring.QueueState{}, errors.New("vhostusertest: no such queue")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stopWorker()
	qq := h.queues[q]
	h.queues[q] = nil
	h.startWorker()
	if qq == nil {
		return vring.QueueState{}, errors.New("vhostusertest: queue not started")
	}
	return qq.dq.State(), nil
}

// Reset implements vdpa.Handler.
func (h *Handler) Reset() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stopWorker()
	h.queues = [2]*queue{}
	h.features = 0
	h.errMu.Lock()
	h.fault = nil
	h.errMu.Unlock()
}

// Counters returns the traffic counters.
func (h *Handler) Counters() Counters {
	return Counters{
		TxFrames: h.txFrames.Load(), TxBytes: h.txBytes.Load(),
		RxFrames: h.rxFrames.Load(), RxBytes: h.rxBytes.Load(), RxDropped: h.rxDropped.Load(),
		Kicks: h.kicks.Load(), Calls: h.calls.Load(),
	}
}

// Rings returns the guest-memory view of the receive (0) and transmit (1)
// rings (zero for a queue not started): a diagnostic for stalls, safe to
// call while the worker runs.
func (h *Handler) Rings() [2]vring.RingSnapshot {
	h.mu.Lock()
	defer h.mu.Unlock()
	var s [2]vring.RingSnapshot
	for i, q := range h.queues {
		if q != nil {
			s[i] = q.dq.Snapshot()
		}
	}
	return s
}

// Inject queues frame (without virtio-net header) for delivery to the
// driver; it is delivered as soon as a receive buffer is available, never
// dropped. It blocks while 1024 frames are already waiting.
func (h *Handler) Inject(ctx context.Context, frame []byte) error {
	select {
	case h.inject <- frame:
		h.injected.Add(1)
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (h *Handler) stopWorker() {
	if h.cancel != nil {
		h.cancel()
		<-h.done
		h.cancel, h.done = nil, nil
	}
}

func (h *Handler) startWorker() {
	h.errMu.Lock()
	h.fault = nil
	h.errMu.Unlock()
	if h.queues[0] == nil && h.queues[1] == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel, h.done = cancel, make(chan struct{})
	w := &worker{h: h, rx: h.queues[0], tx: h.queues[1], hdrLen: virtio.NetHdrLen(h.features),
		wake: make(chan struct{}, 1)}
	go w.run(ctx, h.done)
}

type worker struct {
	h        *Handler
	rx, tx   *queue
	hdrLen   int
	wake     chan struct{}
	chains   [32]vring.Chain
	used     [32]vring.UsedElem
	rxChain  vring.Chain
	buf      [65536 + 12]byte
	pending  []byte   // an injected frame waiting for a receive buffer
	pending2 [][]byte // responder replies waiting for receive buffers
}

// MaxPendingReplies is how many responder replies wait for receive
// buffers at most. A peer that transmits requests and never posts receive
// buffers (or never starts its receive queue) gets its later replies
// dropped (counted in Counters.RxDropped) rather than queued without bound:
// each reply can copy a request of up to 64 KiB.
const MaxPendingReplies = 256

// spinRounds is how many empty polls the worker makes before re-enabling
// notifications and sleeping on the kick eventfds.
const spinRounds = 2000

func (w *worker) run(ctx context.Context, done chan struct{}) {
	defer close(done)
	var wg sync.WaitGroup
	for _, q := range []*queue{w.rx, w.tx} {
		if q != nil && q.kick != nil {
			wg.Add(1)
			go func(k *vdpa.EventFD) {
				defer wg.Done()
				for {
					n, err := k.Wait(ctx)
					if err != nil {
						return
					}
					w.h.kicks.Add(n)
					select {
					case w.wake <- struct{}{}:
					default:
					}
				}
			}(q.kick)
		}
	}
	defer wg.Wait()
	// Guest memory is the front-end's file, which it may truncate under
	// the mapping: this goroutine turns the SIGBUS of a lost page into a
	// panic, which loop recovers (once, for its whole run) into an error
	// that stops the worker and is reported through QueueErr.
	debug.SetPanicOnFault(true)
	if err := w.loop(ctx); err != nil {
		w.h.setFault(err)
	}
}

// loop polls and sleeps until ctx ends (nil) or guest memory faults.
func (w *worker) loop(ctx context.Context) (err error) {
	defer vring.CatchFault(&err)
	w.suppress(true)
	idle := 0
	for ctx.Err() == nil {
		n := w.poll()
		if n > 0 {
			idle = 0
			continue
		}
		idle++
		if idle < spinRounds {
			if idle%64 == 0 {
				select {
				case <-ctx.Done():
				default:
				}
			}
			continue
		}
		// Going to sleep: ask for kicks, then re-check (EnableNotify
		// reports chains that raced with the request).
		pending := w.suppress(false)
		if pending || (w.pending == nil && len(w.h.inject) > 0) {
			w.suppress(true)
			idle = 0
			continue
		}
		var injectCh chan []byte
		if w.pending == nil {
			injectCh = w.h.inject
		}
		// A queue started without a kick eventfd must be polled
		// (vdpa.Handler): nothing would wake the worker for it.
		var pollC <-chan time.Time
		var pollT *time.Timer
		if w.mustPoll() {
			pollT = time.NewTimer(pollSleep)
			pollC = pollT.C
		}
		select {
		case <-ctx.Done():
		case <-w.wake:
		case <-pollC:
		case f := <-injectCh:
			w.pending = f
		}
		if pollT != nil {
			pollT.Stop()
		}
		w.suppress(true)
		idle = 0
	}
	return nil
}

// pollSleep is how long an idle worker sleeps between polls when a queue
// has no kick eventfd.
const pollSleep = 100 * time.Microsecond

// mustPoll reports whether a started queue has no kick eventfd.
func (w *worker) mustPoll() bool {
	for _, q := range []*queue{w.rx, w.tx} {
		if q != nil && q.kick == nil {
			return true
		}
	}
	return false
}

// suppress disables (on) or enables (off) driver notifications on both
// queues; on enable it reports whether work raced in.
func (w *worker) suppress(on bool) bool {
	pending := false
	for _, q := range []*queue{w.rx, w.tx} {
		if q == nil {
			continue
		}
		if on {
			q.dq.DisableNotify()
			continue
		}
		// The receive queue matters only when something waits for it.
		if q == w.rx && w.pending == nil && len(w.pending2) == 0 && len(w.h.inject) == 0 {
			if _, err := q.dq.EnableNotify(); err != nil {
				return false
			}
			continue
		}
		p, err := q.dq.EnableNotify()
		if err != nil {
			return false
		}
		pending = pending || p
	}
	return pending
}

func (w *worker) interrupt(q *queue) {
	if q.call != nil && q.dq.NeedsInterrupt() {
		_ = q.call.Signal()
		w.h.calls.Add(1)
	}
}

// deliver writes one frame (header + payload) into c and pushes it.
func (w *worker) deliver(c *vring.Chain, frame []byte) bool {
	n := w.hdrLen + len(frame)
	if uint64(n) > c.WritableLen {
		_ = w.rx.dq.PushChain(c, 0)
		return false
	}
	var hdr [12]byte
	if w.hdrLen == 12 {
		binary.LittleEndian.PutUint16(hdr[10:], 1) // num_buffers
	}
	scatter(c, hdr[:w.hdrLen], frame)
	if err := w.rx.dq.PushChain(c, uint32(n)); err != nil {
		return false
	}
	w.h.rxFrames.Add(1)
	w.h.rxBytes.Add(uint64(len(frame)))
	return true
}

func scatter(c *vring.Chain, parts ...[]byte) {
	seg, off := c.Readable, 0
	for _, p := range parts {
		for len(p) > 0 && seg < len(c.Segs) {
			k := copy(c.Segs[seg].Buf[off:], p)
			p, off = p[k:], off+k
			if off == len(c.Segs[seg].Buf) {
				seg, off = seg+1, 0
			}
		}
	}
}

func (w *worker) poll() int {
	work := 0
	if w.tx != nil {
		n, err := w.tx.dq.PopBatch(w.chains[:])
		if err != nil {
			w.h.setErr(err)
		}
		rxUsed := false
		var bytes uint64
		for i := 0; i < n; i++ {
			c := &w.chains[i]
			bytes += c.ReadableLen - uint64(min(uint64(w.hdrLen), c.ReadableLen))
			w.used[i] = vring.UsedElem{Head: c.Head}
			if w.h.mode == Responder {
				m := c.Gather(w.buf[:])
				if m > w.hdrLen {
					if reply := w.h.respond(w.buf[w.hdrLen:m]); reply != nil {
						if len(w.pending2) < MaxPendingReplies {
							w.pending2 = append(w.pending2, reply)
						} else {
							w.h.rxDropped.Add(1)
						}
					}
				}
			}
			if w.h.mode == Loopback {
				if w.rx != nil {
					ok, err := w.rx.dq.Pop(&w.rxChain)
					if ok && err == nil {
						m := c.Gather(w.buf[:])
						if m >= w.hdrLen && w.deliver(&w.rxChain, w.buf[w.hdrLen:m]) {
							rxUsed = true
						} else {
							w.h.rxDropped.Add(1)
						}
					} else {
						w.h.rxDropped.Add(1)
					}
				} else {
					w.h.rxDropped.Add(1)
				}
			}
		}
		if n > 0 {
			// One used.idx store for the whole burst.
			if err := w.tx.dq.PushBatch(w.used[:n]); err != nil {
				w.h.setErr(err)
			}
			w.h.txFrames.Add(uint64(n))
			w.h.txBytes.Add(bytes)
			w.interrupt(w.tx)
			work += n
		}
		if rxUsed {
			w.interrupt(w.rx)
		}
	}
	if w.rx != nil {
		delivered := 0
		for delivered < 32 {
			if w.pending == nil && len(w.pending2) > 0 {
				w.pending = w.pending2[0]
				w.pending2[0] = nil // not kept alive by the array
				w.pending2 = w.pending2[1:]
			}
			if w.pending == nil {
				select {
				case f := <-w.h.inject:
					w.pending = f
				default:
				}
			}
			if w.pending == nil {
				break
			}
			ok, err := w.rx.dq.Pop(&w.rxChain)
			if !ok || err != nil {
				break
			}
			if w.deliver(&w.rxChain, w.pending) {
				delivered++
			}
			w.pending = nil
		}
		if delivered > 0 {
			w.interrupt(w.rx)
			work += delivered
		}
	}
	return work
}

// respond builds the reply to an ARP request or ICMP echo request for the
// handler's address (internal/netreply, the responder softnet.Responder
// uses too), or returns nil.
func (h *Handler) respond(f []byte) []byte {
	ip := h.ip.Load()
	if ip == 0 {
		return nil
	}
	var myIP [4]byte
	binary.BigEndian.PutUint32(myIP[:], ip)
	r, k := netreply.Append(nil, h.mac, myIP, f)
	if k == netreply.None {
		return nil
	}
	return r
}

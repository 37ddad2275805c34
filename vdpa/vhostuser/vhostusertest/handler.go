// Package nethandler is a small virtio-net vdpa.Handler used by the
// vhost-user tests, DPDK interop tests and the vhost-user-net example: one
// queue pair (queue 0 receive, queue 1 transmit) processed by one
// goroutine that busy-polls with notification suppression and sleeps on the
// kick eventfds when idle.
//
// Modes: Loopback writes every transmitted frame back into a receive
// buffer (like vdpa_sim_net); Sink counts and discards; Source also
// generates frames towards the driver (Inject) with back-pressure, so none
// is lost.
package nethandler

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"sync/atomic"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Mode selects what happens to transmitted frames.
type Mode int

const (
	Loopback Mode = iota // echo transmitted frames to the receive queue
	Sink                 // count and drop transmitted frames
)

// Counters are cumulative traffic counters.
type Counters struct {
	TxFrames, TxBytes uint64 // taken from the transmit queue
	RxFrames, RxBytes uint64 // delivered to the receive queue
	RxDropped         uint64 // loopback frames with no receive buffer
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
}

type queue struct {
	dq         *vring.DeviceQueue
	kick, call *vdpa.EventFD
}

// New returns a handler in the given mode.
func New(mode Mode, mac [6]byte) *Handler {
	return &Handler{mode: mode, mac: mac, inject: make(chan []byte, 1024)}
}

// DeviceID implements vdpa.Handler.
func (h *Handler) DeviceID() virtio.DeviceID { return virtio.DeviceNet }

// Features implements vdpa.Handler.
func (h *Handler) Features() virtio.Features {
	return virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC, virtio.NetFStatus, virtio.NetFMrgRxbuf,
		virtio.FIndirectDesc, virtio.FEventIdx)
}

// SetFeatures implements vdpa.Handler.
func (h *Handler) SetFeatures(f virtio.Features) error {
	if f&^h.Features() != 0 {
		return errors.New("nethandler: features not offered")
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
		return errors.New("nethandler: no such queue")
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
		return vring.QueueState{}, errors.New("nethandler: no such queue")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stopWorker()
	qq := h.queues[q]
	h.queues[q] = nil
	h.startWorker()
	if qq == nil {
		return vring.QueueState{}, errors.New("nethandler: queue not started")
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
}

// Counters returns the traffic counters.
func (h *Handler) Counters() Counters {
	return Counters{
		TxFrames: h.txFrames.Load(), TxBytes: h.txBytes.Load(),
		RxFrames: h.rxFrames.Load(), RxBytes: h.rxBytes.Load(), RxDropped: h.rxDropped.Load(),
		Kicks: h.kicks.Load(), Calls: h.calls.Load(),
	}
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
	h       *Handler
	rx, tx  *queue
	hdrLen  int
	wake    chan struct{}
	chains  [32]vring.Chain
	rxChain vring.Chain
	buf     [65536 + 12]byte
	pending []byte // an injected frame waiting for a receive buffer
}

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
		select {
		case <-ctx.Done():
		case <-w.wake:
		case f := <-injectCh:
			w.pending = f
		}
		w.suppress(true)
		idle = 0
	}
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
		if q == w.rx && w.pending == nil && len(w.h.inject) == 0 {
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
		n, _ := w.tx.dq.PopBatch(w.chains[:])
		rxUsed := false
		for i := 0; i < n; i++ {
			c := &w.chains[i]
			plen := c.ReadableLen - uint64(min(uint64(w.hdrLen), c.ReadableLen))
			w.h.txFrames.Add(1)
			w.h.txBytes.Add(plen)
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
			_ = w.tx.dq.Push(c.Head, 0)
		}
		if n > 0 {
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

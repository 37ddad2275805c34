package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/ctxclose"
	"github.com/vdpakit/vdpakit/internal/vhostcore"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// FrontendOptions configure a Frontend. A nil *FrontendOptions means all
// defaults.
type FrontendOptions struct {
	// DeviceID is the device type behind the socket (vhost-user does not
	// carry it); virtio.DeviceNet if zero.
	DeviceID virtio.DeviceID
	// ProtocolFeatures restricts the protocol features negotiated (zero:
	// every one this package supports).
	ProtocolFeatures ProtocolFeatures
	// NumQueues is the number of virtqueues when the back-end does not
	// offer MQ (2 if zero: one receive/transmit pair).
	NumQueues int
	// MaxQueueSize is reported by MaxQueueSize (vhost-user has no query);
	// 1024 if zero.
	MaxQueueSize uint16
	// ConfigSize is the device configuration size (vhost-user has no
	// message that reports it, and a back-end answers GET_CONFIG only for
	// reads within its configuration space). Zero means the size of the
	// device type's configuration layout where this package knows it
	// (virtio.NetConfigSize for virtio.DeviceNet); for other types, when
	// CONFIG is negotiated, the size is probed once: the longest read
	// from offset 0 the back-end answers (at most MaxConfigSize).
	ConfigSize int
	// Timeout bounds each request/reply exchange on top of the caller's
	// context (10s if zero). An exchange that runs out of time breaks the
	// session (ErrSessionBroken).
	Timeout time.Duration
	// Reconnect, if set, keeps the session through a restart of the
	// back-end: the Frontend dials again and hands the new back-end the
	// session (see ReconnectOptions). Nil: a lost back-end breaks the
	// session for good (ErrSessionBroken).
	Reconnect *ReconnectOptions
}

// Frontend drives a vhost-user back-end (DPDK's net_vhost, a vhost-user
// switch, this package's Backend) as a vdpa.Device: we are the VMM. It also
// implements vdpa.Suspender (GET_VRING_BASE stops each ring; Resume restores
// SET_VRING_BASE and kicks it back to life) and vdpa.Logger (SET_LOG_BASE
// with a shared dirty.Bitmap's memfd).
//
// Ring addresses cross the socket as this process's virtual addresses,
// translated from guest addresses through the Memory given to SetMemory,
// whose regions must be fd-backed (vring.NewMemfdRegion).
//
// # Blocking, contexts and Close
//
// Every method that talks to the back-end has a form taking a
// context.Context (SetFeaturesContext, QueueBaseContext, ...); the
// vdpa.Device methods are those with context.Background(). Each exchange is
// also bounded by FrontendOptions.Timeout. Requests are serialized (the
// protocol has one request outstanding at a time): a caller waiting for its
// turn gives up when its context ends, without harm. A context that ends
// while its request is on the socket interrupts it; since vhost-user
// replies carry no request id, the session is then out of step, so the
// connection is closed and every later request fails with ErrSessionBroken
// (wrapping the cause, and vdpa.ErrClosed: the back-end has stopped). A
// reply to another request, or a message that is not a reply, breaks the
// session the same way (ErrUnexpectedReply): the awaited reply may still
// be on its way. Close never waits for a request: it closes the
// socket, and a request in flight returns an error wrapping vdpa.ErrClosed.
//
// With FrontendOptions.Reconnect a session that breaks is not over: the
// Frontend dials again and hands the new back-end the session, and
// requests wait for that instead of failing (ReconnectOptions).
//
// Like any vdpa.Device the caller should not interleave configuration
// sequences from several goroutines.
type Frontend struct {
	// cc is the connection (conn). A reconnect replaces it, under the
	// turn and while broken is set: a request (holding the turn) sees one
	// connection throughout, and breakSession (under rmu, with broken
	// nil) sees the current one.
	cc   atomic.Pointer[conn]
	opts FrontendOptions
	// Set by the handshake, then read-only.
	devF  virtio.Features // back-end's offer
	proto ProtocolFeatures
	nq    int

	// turn is held (a token in the channel) by the request on the socket;
	// it guards the session state below.
	turn  chan struct{}
	acked virtio.Features
	// status is the last status set: written under the turn, atomic
	// because Status reads it while the back-end is away, without it.
	status  atomic.Uint32
	mem     *vring.Memory
	log     *dirty.Bitmap
	queues  []feQueue
	suspend bool
	cfgSize int // probed configuration size, -1 until probed

	done      chan struct{} // closed by Close
	closeOnce sync.Once
	broken    atomic.Pointer[error] // why the session is out of step

	// Reconnecting (FrontendOptions.Reconnect, reconnect.go).
	rmu         sync.Mutex
	away        chan struct{}  // non-nil while reconnecting; closed when that ends (guarded by rmu)
	joined      time.Time      // when the current session started or was last taken over (guarded by rmu)
	reconnects  atomic.Uint64  // sessions rejoined
	reconnectOn atomic.Bool    // the session started, with Reconnect set
	bg          sync.WaitGroup // the reconnect's goroutines, waited for by Close
	rejoining   bool           // the turn's holder is the reconnect (no waiting for itself)
	noWait      bool           // the turn's holder does not wait for a reconnect (Status)
}

type feQueue struct {
	num      uint16
	addr     vdpa.QueueAddr
	addrSet  bool
	kick     *vdpa.EventFD
	kickSet  bool
	call     *vdpa.EventFD // the last SET_VRING_CALL's (nil: unbound), for Resume
	callSet  bool
	enabled  bool
	suspSt   vring.QueueState
	suspOK   bool
	lastBase uint16
	base     vring.QueueState // the last SET_VRING_BASE's, for a reconnect
	baseSet  bool
	errFd    *vdpa.EventFD // the last SET_VRING_ERR's (nil: unbound), for a reconnect
	errSet   bool
}

var (
	_ vdpa.Device    = (*Frontend)(nil)
	_ vdpa.Suspender = (*Frontend)(nil)
	_ vdpa.Logger    = (*Frontend)(nil)
)

// Dial connects to a back-end listening at path and performs the session
// start: SET_OWNER, GET_FEATURES, protocol feature negotiation and, with
// MQ, GET_QUEUE_NUM.
func Dial(ctx context.Context, path string, opts *FrontendOptions) (*Frontend, error) {
	if opts != nil && opts.Reconnect != nil && opts.Reconnect.Dial == nil {
		o, rc := *opts, *opts.Reconnect
		rc.Dial = DialPath(path)
		o.Reconnect = &rc
		opts = &o
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("vhost-user: dial %s: %w", path, err)
	}
	f, err := NewFrontend(ctx, c.(*net.UnixConn), opts)
	if err != nil {
		c.Close()
		return nil, err
	}
	return f, nil
}

// NewFrontend starts a session on an established connection (for example
// one accepted from a back-end running in client mode). ctx (and
// FrontendOptions.Timeout, per exchange) bounds the handshake. On error the
// caller still owns uc and should close it (an interrupted handshake has
// closed it already).
func NewFrontend(ctx context.Context, uc *net.UnixConn, opts *FrontendOptions) (*Frontend, error) {
	f := &Frontend{cfgSize: -1, turn: make(chan struct{}, 1), done: make(chan struct{})}
	f.cc.Store(newConn(uc))
	if opts != nil {
		f.opts = *opts
	}
	if err := f.opts.check(); err != nil {
		return nil, err
	}
	if rc := f.opts.Reconnect; rc != nil {
		c := *rc // the caller's struct is not shared
		c.defaults()
		f.opts.Reconnect = &c
	}
	if f.opts.DeviceID == 0 {
		f.opts.DeviceID = virtio.DeviceNet
	}
	if f.opts.NumQueues == 0 {
		f.opts.NumQueues = 2
	}
	if f.opts.MaxQueueSize == 0 {
		f.opts.MaxQueueSize = 1024
	}
	if f.opts.Timeout == 0 {
		f.opts.Timeout = 10 * time.Second
	}
	if err := f.handshake(ctx); err != nil {
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			return nil, fmt.Errorf("%w: %w", err, ctx.Err())
		}
		return nil, err
	}
	if rc := f.opts.Reconnect; rc != nil {
		// Only a session that started is taken to a new back-end: a
		// handshake that failed leaves the connection to the caller.
		f.rmu.Lock()
		f.joined = time.Now()
		f.rmu.Unlock()
		f.reconnectOn.Store(true)
		f.bg.Add(1)
		go f.watchPeer(rc.Interval)
	}
	return f, nil
}

// check refuses options out of range (zero values are defaults).
func (o *FrontendOptions) check() error {
	switch {
	case o.NumQueues < 0 || o.NumQueues > MaxQueues:
		return fmt.Errorf("%w: NumQueues %d, not in [0, %d]", ErrBadOptions, o.NumQueues, MaxQueues)
	case o.ConfigSize < 0 || o.ConfigSize > MaxConfigSize:
		return fmt.Errorf("%w: ConfigSize %d, not in [0, %d]", ErrBadOptions, o.ConfigSize, MaxConfigSize)
	case o.Timeout < 0:
		return fmt.Errorf("%w: Timeout %v", ErrBadOptions, o.Timeout)
	}
	if rc := o.Reconnect; rc != nil {
		switch {
		case rc.Dial == nil:
			return fmt.Errorf("%w: Reconnect without Dial (Dial, the function, fills it in)", ErrBadOptions)
		case rc.Interval < 0 || rc.Timeout < 0:
			return fmt.Errorf("%w: Reconnect interval %v, timeout %v", ErrBadOptions, rc.Interval, rc.Timeout)
		}
	}
	return nil
}

func (f *Frontend) handshake(ctx context.Context) error {
	devF, proto, nq, err := f.negotiate(ctx, nil)
	if err != nil {
		return err
	}
	f.devF, f.proto, f.nq = devF, proto, nq
	f.queues = make([]feQueue, f.nq)
	return nil
}

// negotiate runs the session start on the current connection: SET_OWNER,
// GET_FEATURES and, when offered, the protocol features and GET_QUEUE_NUM.
// With fixed set (a reconnect), exactly *fixed is negotiated, and a
// back-end that does not offer all of it is refused.
func (f *Frontend) negotiate(ctx context.Context, fixed *ProtocolFeatures) (devF virtio.Features, proto ProtocolFeatures, nq int, err error) {
	// Unacknowledged: REPLY_ACK is not in effect before
	// SET_PROTOCOL_FEATURES, on a new connection as on the first.
	if err := f.exchangeNoAck(ctx, ReqSetOwner, nil); err != nil {
		return 0, 0, 0, err
	}
	v, err := f.getU64(ctx, ReqGetFeatures)
	if err != nil {
		return 0, 0, 0, err
	}
	devF = virtio.Features(v)
	nq = f.opts.NumQueues
	if !devF.Has(virtio.FProtocolFeat) {
		if fixed != nil && *fixed != 0 {
			return 0, 0, 0, fmt.Errorf("%w: the back-end no longer offers PROTOCOL_FEATURES", ErrBackendChanged)
		}
		return devF, 0, nq, nil
	}
	p, err := f.getU64(ctx, ReqGetProtocolFeatures)
	if err != nil {
		return 0, 0, 0, err
	}
	// The Frontend sends whole tables (SET_MEM_TABLE); it does not
	// ask for region-by-region updates.
	want := SupportedProtocolFeatures &^ (1 << PFConfigureMemSlots)
	if f.opts.ProtocolFeatures != 0 {
		want &= f.opts.ProtocolFeatures
	}
	proto = ProtocolFeatures(p) & want
	if fixed != nil {
		if lost := *fixed &^ ProtocolFeatures(p); lost != 0 {
			return 0, 0, 0, fmt.Errorf("%w: it no longer offers protocol features %#x", ErrBackendChanged, uint64(lost))
		}
		proto = *fixed
	}
	// Sent before REPLY_ACK is in effect (as QEMU and DPDK do): no
	// acknowledgement is asked for this one. (exchange asks for one when
	// f.proto has REPLY_ACK, so a reconnect sends it unacknowledged too.)
	if err := f.exchangeNoAck(ctx, ReqSetProtocolFeatures, putU64(uint64(proto))); err != nil {
		return 0, 0, 0, err
	}
	if proto.Has(PFMQ) {
		n, err := f.getU64(ctx, ReqGetQueueNum)
		if err != nil {
			return 0, 0, 0, err
		}
		per := uint64(1)
		if f.opts.DeviceID == virtio.DeviceNet {
			per = 2 // a net back-end counts queue pairs
		}
		// Bounded before it is scaled: a hostile 2^63+1 pairs
		// would wrap to 2 queues and pass a check made after.
		if n == 0 || n > MaxQueues/per {
			return 0, 0, 0, msgErr(ReqGetQueueNum, ErrProtocol, "back-end reports %d (times %d) queues, at most %d", n, per, MaxQueues)
		}
		nq = int(n * per)
	}
	return devF, proto, nq, nil
}

// ProtocolFeatures returns the negotiated protocol features.
func (f *Frontend) ProtocolFeatures() ProtocolFeatures { return f.proto }

// acquire waits for the turn to use the socket; release gives it back.
//
// While the Frontend reconnects to a restarted back-end
// (FrontendOptions.Reconnect) it waits for that to end, within ctx.
func (f *Frontend) acquire(ctx context.Context) error {
	for {
		away, err := f.sessionState()
		if away != nil {
			if err := f.waitFor(ctx, away); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		select {
		case f.turn <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-f.done:
			return vdpa.ErrClosed
		}
		away, err = f.sessionState()
		if away != nil {
			// The session broke while this caller waited: wait for the
			// reconnect instead.
			f.release()
			continue
		}
		if err != nil {
			f.release()
			return err
		}
		return nil
	}
}

func (f *Frontend) release() { <-f.turn }

// breakSession records why the session on connection c is out of step
// and closes c, so the back-end resets and no late reply is taken for the
// answer to a later request. The error matches vdpa.ErrClosed too: like a
// closed device, the back-end has stopped (a disconnected vhost-user
// back-end stops its rings), which a caller resetting the device (mdev)
// counts as a completed reset.
//
// c is the connection the caller found failed. A break of a connection
// that is no longer the session's (a reconnect replaced it meanwhile) is
// stale and does nothing: it must neither break the new session nor close
// its connection. For the same reason c, never the current connection, is
// what closes here: the reconnect this starts may have stored its own
// connection by the time this goroutine gets to the close.
func (f *Frontend) breakSession(c *conn, cause error) {
	err := fmt.Errorf("%w (connection closed, %w): %w", ErrSessionBroken, vdpa.ErrClosed, cause)
	// The break and the reconnect (FrontendOptions.Reconnect) are marked
	// together, under rmu, before the connection closes: whoever finds
	// the session broken or the connection closed also finds the
	// reconnect to wait for.
	f.rmu.Lock()
	if f.broken.Load() != nil || f.conn() != c {
		f.rmu.Unlock()
		return
	}
	f.broken.Store(&err)
	away := f.markAway()
	f.rmu.Unlock()
	if away != nil {
		go f.reconnectLoop(f.opts.Reconnect, cause, away)
	}
	_ = c.close()
}

// exchange sends a request and, when want is true or REPLY_ACK applies,
// reads its reply. The caller holds the turn (acquire). ctx and
// FrontendOptions.Timeout bound the socket I/O: when either ends first the
// connection is closed under the request, which returns an error wrapping
// ctx's error, and the session is broken. A failure to read or write the
// socket breaks the session too.
func (f *Frontend) exchange(ctx context.Context, r Request, payload []byte, fds []int, want bool) (*Message, error) {
	return f.exchangeAck(ctx, r, payload, fds, want, !want && f.proto.Has(PFReplyAck))
}

// exchangeNoAck sends r without asking for an acknowledgement, whatever
// REPLY_ACK says (SET_PROTOCOL_FEATURES, which puts it in effect).
func (f *Frontend) exchangeNoAck(ctx context.Context, r Request, payload []byte) error {
	_, err := f.exchangeAck(ctx, r, payload, nil, false, false)
	return err
}

// exchangeAck is exchange with the acknowledgement decided by the caller.
//
// With FrontendOptions.Reconnect, a request whose connection failed under
// it waits for the reconnect and is sent again to the new back-end, which
// by then holds the whole session as recorded before this request (except
// for the reconnect's own requests, and GET_STATUS, whose caller takes the
// last status set instead). A back-end that takes the session and dies
// again under the request (a crash loop) is waited for again, and so on.
// The first wait is for the reconnect the request's own failure started,
// which ends within ReconnectOptions.Timeout (its error, when it gives up,
// is the request's). Later waits end ReconnectOptions.Timeout after the
// first failure, and the request then returns its last connection error
// (its last exchange may still take up to FrontendOptions.Timeout). Close
// and ctx end any wait sooner, with their own error.
func (f *Frontend) exchangeAck(ctx context.Context, r Request, payload []byte, fds []int, want, ack bool) (*Message, error) {
	m, lost, err := f.exchangeOnce(ctx, r, payload, fds, want, ack)
	if !lost || !f.reconnectOn.Load() || f.rejoining || f.noWait || isClosed(f.done) {
		return m, err
	}
	later, cancel := context.WithTimeout(ctx, f.opts.Reconnect.Timeout)
	defer cancel()
	for first := true; lost; first = false {
		wctx := later
		if first {
			wctx = ctx
		}
		if werr := f.awaitRejoin(wctx); werr != nil {
			if ctx.Err() == nil && errors.Is(werr, context.DeadlineExceeded) {
				return nil, err // this request's own time is up
			}
			return nil, &MessageError{Request: r, Err: werr}
		}
		m, lost, err = f.exchangeOnce(ctx, r, payload, fds, want, ack)
	}
	return m, err
}

// exchangeOnce is one exchange; lost reports that the connection failed
// under it (not the caller's context, not Close).
func (f *Frontend) exchangeOnce(ctx context.Context, r Request, payload []byte, fds []int, want, ack bool) (m *Message, lost bool, err error) {
	h := Header{Request: r, Flags: Version}
	if ack {
		h.Flags |= FlagNeedReply
	}
	ctx, cancel := context.WithTimeout(ctx, f.opts.Timeout)
	defer cancel()
	if err := ctx.Err(); err != nil {
		return nil, false, &MessageError{Request: r, Err: err}
	}
	// The caller holds the turn, so the connection stays this one for
	// the whole exchange (a reconnect replaces it under the turn).
	c := f.conn()
	// Runs when ctx ends mid-exchange: interrupt the I/O.
	release := ctxclose.OnDone(ctx, c.close)
	m, err = f.roundTrip(c, h, payload, fds, want || ack)
	if release() {
		// The I/O was (or is being) interrupted: whatever happened on
		// the socket, the session is out of step.
		if m != nil {
			m.Close()
		}
		cause := ctx.Err()
		if isClosed(f.done) {
			cause = vdpa.ErrClosed
		}
		f.breakSession(c, cause)
		return nil, false, &MessageError{Request: r, Err: cause}
	}
	if err != nil {
		if isClosed(f.done) {
			return nil, false, &MessageError{Request: r, Err: fmt.Errorf("%w: %w", vdpa.ErrClosed, err)}
		}
		f.breakSession(c, err)
		return nil, true, &MessageError{Request: r, Err: err}
	}
	if m == nil {
		return nil, false, nil
	}
	if !m.IsReply() || m.Request != r {
		// Not the answer to r: the back-end sent a message nobody asked
		// for, and r's reply (if any) is still to come, where it would
		// be taken for the answer to the next request. The session is
		// out of step, whatever the message carries (checked first, so
		// that one with descriptors breaks the session too).
		m.Close()
		err := msgErr(r, ErrUnexpectedReply, "got %v flags %#x", m.Request, uint32(m.Flags))
		f.breakSession(c, err)
		return nil, false, err
	}
	if n := len(m.Fds); n > 0 {
		// r's own reply, with descriptors no reply takes: refused, and
		// the session stays in step.
		m.Close() // empties m.Fds: report n
		return nil, false, msgErr(r, ErrFdCount, "reply carries %d descriptors", n)
	}
	if ack {
		if len(m.Payload) != u64Size {
			return nil, false, msgErr(r, ErrBadSize, "ack payload %d bytes", len(m.Payload))
		}
		if v := m.U64(); v != 0 {
			return nil, false, msgErr(r, ErrReplyFailed, "status %d", v)
		}
		return nil, false, nil
	}
	return m, false, nil
}

// roundTrip writes one message on c and, with reply, reads one.
func (f *Frontend) roundTrip(c *conn, h Header, payload []byte, fds []int, reply bool) (*Message, error) {
	if err := c.write(h, payload, fds); err != nil {
		return nil, err
	}
	if !reply {
		return nil, nil
	}
	return c.read()
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func (f *Frontend) send(ctx context.Context, r Request, payload []byte, fds []int) error {
	_, err := f.exchange(ctx, r, payload, fds, false)
	return err
}

func (f *Frontend) getU64(ctx context.Context, r Request) (uint64, error) {
	m, err := f.exchange(ctx, r, nil, nil, true)
	if err != nil {
		return 0, err
	}
	if len(m.Payload) != u64Size {
		return 0, msgErr(r, ErrBadSize, "reply payload %d bytes", len(m.Payload))
	}
	return m.U64(), nil
}

func (f *Frontend) queue(q int) (*feQueue, error) {
	if q < 0 || q >= len(f.queues) {
		return nil, fmt.Errorf("%w: queue %d of %d", ErrBadQueue, q, len(f.queues))
	}
	return &f.queues[q], nil
}

// DeviceID implements vdpa.Device.
func (f *Frontend) DeviceID() (virtio.DeviceID, error) { return f.opts.DeviceID, nil }

// Features returns the back-end's features without the vhost-user-only
// PROTOCOL_FEATURES bit (managed here). LOG_ALL is kept: set it with
// SetFeatures to turn dirty logging on.
func (f *Frontend) Features() (virtio.Features, error) {
	return f.devF &^ virtio.FProtocolFeat.Bit(), nil
}

// SetFeatures sends SET_FEATURES (plus PROTOCOL_FEATURES when the back-end
// offers it). Toggling LOG_ALL re-sends the ring addresses so their log
// flag follows.
func (f *Frontend) SetFeatures(fs virtio.Features) error {
	return f.SetFeaturesContext(context.Background(), fs)
}

// SetFeaturesContext is SetFeatures with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetFeaturesContext(ctx context.Context, fs virtio.Features) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	if fs&^f.devF != 0 {
		return fmt.Errorf("%w: features %#x not offered", ErrProtocol, uint64(fs&^f.devF))
	}
	if f.devF.Has(virtio.FProtocolFeat) {
		fs = fs.With(virtio.FProtocolFeat)
	}
	if err := f.send(ctx, ReqSetFeatures, putU64(uint64(fs)), nil); err != nil {
		return err
	}
	logChanged := f.acked.Has(virtio.FLogAll) != fs.Has(virtio.FLogAll)
	f.acked = fs
	if logChanged {
		return f.resendAddrs(ctx)
	}
	return nil
}

// Status implements vdpa.Device: GET_STATUS with the STATUS protocol
// feature, else the last status set.
func (f *Frontend) Status() (virtio.Status, error) {
	return f.StatusContext(context.Background())
}

// StatusContext is Status with ctx bounding the wait for the socket and
// the exchange.
//
// While the Frontend reconnects to a restarted back-end it returns the last
// status set, without waiting: the device is not failed unless the
// reconnect gives up.
func (f *Frontend) StatusContext(ctx context.Context) (virtio.Status, error) {
	if f.awayCh() != nil && !isClosed(f.done) {
		return virtio.Status(f.status.Load()), nil
	}
	if err := f.acquire(ctx); err != nil {
		return 0, err
	}
	defer f.release()
	if f.proto.Has(PFStatus) {
		f.noWait = true
		v, err := f.getU64(ctx, ReqGetStatus)
		f.noWait = false
		if err != nil {
			if f.awayCh() != nil && ctx.Err() == nil {
				// The back-end went away under this request and the
				// Frontend reconnects: not a failure yet.
				return virtio.Status(f.status.Load()), nil
			}
			return 0, err
		}
		// The device status is 8 bits (the virtio status field,
		// VHOST_VDPA_GET_STATUS's __u8; the Backend refuses a wider
		// SET_STATUS): a wider reply is no status, and truncating it
		// would report another one (0x100 would read as a reset).
		if v > 0xff {
			return 0, msgErr(ReqGetStatus, ErrProtocol, "status %#x beyond 8 bits", v)
		}
		return virtio.Status(v), nil
	}
	return virtio.Status(f.status.Load()), nil
}

// SetStatus implements vdpa.Device. Status 0 resets the device: SET_STATUS
// 0 with the STATUS feature, RESET_DEVICE with that feature, else every
// ring is stopped with GET_VRING_BASE.
func (f *Frontend) SetStatus(st virtio.Status) error {
	return f.SetStatusContext(context.Background(), st)
}

// SetStatusContext is SetStatus with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetStatusContext(ctx context.Context, st virtio.Status) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	switch {
	case f.proto.Has(PFStatus):
		if err := f.send(ctx, ReqSetStatus, putU64(uint64(st)), nil); err != nil {
			return err
		}
	case st == 0 && f.proto.Has(PFResetDevice):
		if err := f.send(ctx, ReqResetDevice, nil, nil); err != nil {
			return err
		}
	case st == 0:
		for i := len(f.queues) - 1; i >= 0; i-- { // highest first, as Suspend
			if f.queues[i].kickSet {
				if _, err := f.getBase(ctx, i, true); err != nil {
					return err
				}
			}
		}
	}
	f.status.Store(uint32(st))
	if st == 0 {
		for i := range f.queues {
			q := &f.queues[i]
			*q = feQueue{kick: q.kick}
		}
		f.suspend = false
	}
	return nil
}

// knownConfigSize is the size of a device type's configuration layout,
// or 0 when this package does not know it.
func knownConfigSize(id virtio.DeviceID) int {
	if id == virtio.DeviceNet {
		return virtio.NetConfigSize
	}
	return 0
}

// ConfigSize implements vdpa.Device: FrontendOptions.ConfigSize, else the
// device type's configuration size, else (CONFIG negotiated) the probed
// size; 0 without CONFIG.
func (f *Frontend) ConfigSize() (int, error) {
	return f.ConfigSizeContext(context.Background())
}

// ConfigSizeContext is ConfigSize with ctx bounding the probe.
func (f *Frontend) ConfigSizeContext(ctx context.Context) (int, error) {
	if f.opts.ConfigSize > 0 {
		return f.opts.ConfigSize, nil
	}
	if !f.proto.Has(PFConfig) {
		return 0, nil
	}
	if n := knownConfigSize(f.opts.DeviceID); n > 0 {
		return n, nil
	}
	if err := f.acquire(ctx); err != nil {
		return 0, err
	}
	defer f.release()
	if f.cfgSize < 0 {
		n, err := f.probeConfigSize(ctx)
		if err != nil {
			return 0, err
		}
		f.cfgSize = n
	}
	return f.cfgSize, nil
}

// probeConfigSize finds the longest GET_CONFIG read from offset 0 the
// back-end answers, by bisection over [0, MaxConfigSize]: a back-end
// answers every read within its configuration space and fails (an empty
// or wrongly sized reply) every read beyond it. Errors other than a failed
// read (the connection broke) are returned.
func (f *Frontend) probeConfigSize(ctx context.Context) (int, error) {
	var buf [MaxConfigSize]byte
	lo, hi := 0, MaxConfigSize+1 // a read of lo bytes succeeds, of hi fails
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		err := f.readConfig(ctx, 0, buf[:mid])
		switch {
		case err == nil:
			lo = mid
		case errors.Is(err, ErrReplyFailed) || errors.Is(err, ErrBadSize):
			hi = mid
		default:
			return 0, err
		}
	}
	return lo, nil
}

// ReadConfig implements vdpa.Device with GET_CONFIG.
func (f *Frontend) ReadConfig(off int, p []byte) error {
	return f.ReadConfigContext(context.Background(), off, p)
}

// ReadConfigContext is ReadConfig with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) ReadConfigContext(ctx context.Context, off int, p []byte) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	return f.readConfig(ctx, off, p)
}

func (f *Frontend) readConfig(ctx context.Context, off int, p []byte) error {
	if !f.proto.Has(PFConfig) {
		return fmt.Errorf("%w: CONFIG not negotiated", ErrUnsupported)
	}
	// The message's offset field is 32 bits: an offset it cannot carry is
	// refused, not truncated (on 32-bit every non-negative int fits).
	if off < 0 || len(p) > MaxConfigSize || uint64(off) > math.MaxUint32 {
		return fmt.Errorf("%w: config read %d+%d", ErrProtocol, off, len(p))
	}
	m, err := f.exchange(ctx, ReqGetConfig, Config{Offset: uint32(off), Data: make([]byte, len(p))}.Encode(), nil, true)
	if err != nil {
		return err
	}
	c, err := DecodeConfig(m.Payload)
	if err != nil || len(m.Payload) == configHeaderSize && len(p) > 0 {
		return msgErr(ReqGetConfig, ErrReplyFailed, "empty or malformed config reply")
	}
	if len(c.Data) != len(p) {
		return msgErr(ReqGetConfig, ErrBadSize, "reply %d bytes, asked %d", len(c.Data), len(p))
	}
	// The reply echoes the request's region (vhost-user: "the same
	// virtio_device_config_space" layout): bytes for another offset are
	// not the bytes asked for.
	if c.Offset != uint32(off) {
		return msgErr(ReqGetConfig, ErrProtocol, "reply for offset %d, asked %d", c.Offset, off)
	}
	copy(p, c.Data)
	return nil
}

// WriteConfig implements vdpa.Device with SET_CONFIG.
func (f *Frontend) WriteConfig(off int, p []byte) error {
	return f.WriteConfigContext(context.Background(), off, p)
}

// WriteConfigContext is WriteConfig with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) WriteConfigContext(ctx context.Context, off int, p []byte) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	if !f.proto.Has(PFConfig) {
		return fmt.Errorf("%w: CONFIG not negotiated", ErrUnsupported)
	}
	if off < 0 || len(p) > MaxConfigSize || uint64(off) > math.MaxUint32 {
		return fmt.Errorf("%w: config write %d+%d", ErrProtocol, off, len(p))
	}
	return f.send(ctx, ReqSetConfig, Config{Offset: uint32(off), Flags: ConfigFlagWritable, Data: p}.Encode(), nil)
}

// NumQueues implements vdpa.Device.
func (f *Frontend) NumQueues() (int, error) { return f.nq, nil }

// MaxQueueSize implements vdpa.Device (FrontendOptions.MaxQueueSize).
func (f *Frontend) MaxQueueSize() (uint16, error) { return f.opts.MaxQueueSize, nil }

// SetMemory sends the memory table: each region's guest address, size,
// this process's address and its fd and offset.
func (f *Frontend) SetMemory(mem *vring.Memory) error {
	return f.SetMemoryContext(context.Background(), mem)
}

// SetMemoryContext is SetMemory with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetMemoryContext(ctx context.Context, mem *vring.Memory) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	if err := f.sendMemTable(ctx, mem); err != nil {
		return err
	}
	f.mem = mem
	return nil
}

// sendMemTable sends SET_MEM_TABLE for mem.
func (f *Frontend) sendMemTable(ctx context.Context, mem *vring.Memory) error {
	regs := mem.Regions()
	if len(regs) > MaxRegions {
		return fmt.Errorf("%w: %d regions", ErrTooManyRegions, len(regs))
	}
	rs := make([]MemoryRegion, len(regs))
	fds := make([]int, len(regs))
	for i, r := range regs {
		if r.Fd() < 0 {
			return fmt.Errorf("%w: region %v has no file descriptor to share", ErrBadRegion, r)
		}
		rs[i] = MemoryRegion{GuestPhysAddr: uint64(r.Base()), MemorySize: r.Size(),
			UserspaceAddr: uint64(r.HostAddr()), MmapOffset: r.FdOffset()}
		fds[i] = r.Fd()
	}
	return f.send(ctx, ReqSetMemTable, EncodeMemTable(rs), fds)
}

// SetQueueNum implements vdpa.Device.
func (f *Frontend) SetQueueNum(q int, size uint16) error {
	return f.SetQueueNumContext(context.Background(), q, size)
}

// SetQueueNumContext is SetQueueNum with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetQueueNumContext(ctx context.Context, q int, size uint16) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if err := f.send(ctx, ReqSetVringNum, VringState{Index: uint32(q), Num: uint32(size)}.Encode(), nil); err != nil {
		return err
	}
	fq.num = size
	return nil
}

func (f *Frontend) vringAddr(q int, a vdpa.QueueAddr) (VringAddr, error) {
	if f.mem == nil {
		return VringAddr{}, fmt.Errorf("%w: SetMemory first", ErrProtocol)
	}
	tr := func(g vring.GuestAddr) (uint64, error) {
		h, err := f.mem.GuestToHost(g)
		if err != nil {
			return 0, fmt.Errorf("%w: queue %d ring at %v: %w", ErrAddrNotMapped, q, g, err)
		}
		return uint64(h), nil
	}
	var va VringAddr
	var err error
	va.Index = uint32(q)
	if va.Desc, err = tr(a.Desc); err != nil {
		return va, err
	}
	if va.Avail, err = tr(a.Avail); err != nil {
		return va, err
	}
	if va.Used, err = tr(a.Used); err != nil {
		return va, err
	}
	// log_guest_addr is where the back-end logs the device's ring
	// writes: the used ring of a split queue. A packed queue's device
	// writes used descriptors into the descriptor ring, and DPDK's vhost
	// library logs them at log_guest_addr plus their offset in that
	// ring, so for packed it is the descriptor ring's guest address.
	va.Log = uint64(a.Used)
	if f.acked.Has(virtio.FRingPacked) {
		va.Log = uint64(a.Desc)
	}
	if f.acked.Has(virtio.FLogAll) && f.log != nil {
		va.Flags = VringFLog
	}
	return va, nil
}

// SetQueueAddr sends the ring addresses as this process's addresses.
func (f *Frontend) SetQueueAddr(q int, a vdpa.QueueAddr) error {
	return f.SetQueueAddrContext(context.Background(), q, a)
}

// SetQueueAddrContext is SetQueueAddr with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetQueueAddrContext(ctx context.Context, q int, a vdpa.QueueAddr) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	va, err := f.vringAddr(q, a)
	if err != nil {
		return err
	}
	if err := f.send(ctx, ReqSetVringAddr, va.Encode(), nil); err != nil {
		return err
	}
	fq.addr, fq.addrSet = a, true
	return nil
}

func (f *Frontend) resendAddrs(ctx context.Context) error {
	for i := range f.queues {
		if !f.queues[i].addrSet {
			continue
		}
		va, err := f.vringAddr(i, f.queues[i].addr)
		if err != nil {
			return err
		}
		if err := f.send(ctx, ReqSetVringAddr, va.Encode(), nil); err != nil {
			return err
		}
	}
	return nil
}

// SetQueueBase sends SET_VRING_BASE: st.NextAvail for a split ring
// (vhost-user carries no used index for it; the used ring in memory holds
// it), NextAvail in bits 0..15 and NextUsed in bits 16..31 for a packed
// ring, as QEMU sends them (vhostcore.VringBase).
func (f *Frontend) SetQueueBase(q int, st vdpa.QueueState) error {
	return f.SetQueueBaseContext(context.Background(), q, st)
}

// SetQueueBaseContext is SetQueueBase with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetQueueBaseContext(ctx context.Context, q int, st vdpa.QueueState) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if err := f.send(ctx, ReqSetVringBase, VringState{Index: uint32(q), Num: vhostcore.VringBase(st, f.acked)}.Encode(), nil); err != nil {
		return err
	}
	fq.base, fq.baseSet = st, true
	return nil
}

// getBase stops queue q with GET_VRING_BASE and returns the position the
// back-end stopped at, checked against what the queue can be at. With
// discard (a reset, which forgets the position) only the reply's form is
// checked: the ring is stopped whatever position it names.
func (f *Frontend) getBase(ctx context.Context, q int, discard bool) (vring.QueueState, error) {
	fq := &f.queues[q]
	m, err := f.exchange(ctx, ReqGetVringBase, VringState{Index: uint32(q)}.Encode(), nil, true)
	if err != nil {
		return vring.QueueState{}, err
	}
	st, err := DecodeVringState(m.Payload)
	packed := f.acked.Has(virtio.FRingPacked)
	if err != nil || st.Index != uint32(q) || (st.Num > 0xffff && !packed) {
		return vring.QueueState{}, msgErr(ReqGetVringBase, ErrUnexpectedReply, "reply %+v for queue %d", st, q)
	}
	out := vring.QueueState{NextAvail: uint16(st.Num)}
	// The ring is stopped either way.
	fq.kickSet = false
	fq.lastBase = out.NextAvail
	if discard {
		return out, nil
	}
	if packed {
		// Bits 16..31 are the used position (QEMU, Linux vhost and this
		// package's back-end); DPDK's vhost library leaves them zero, its
		// rings having nothing in flight once stopped: used = avail.
		out.NextUsed = uint16(st.Num >> 16)
		if st.Num>>16 == 0 {
			out.NextUsed = out.NextAvail
		}
		// A hostile back-end's word must not become a state no queue of
		// this size can be at (an index >= size, used ahead of avail,
		// more than a ring in flight): it would be handed on to a
		// migration stream or a restarted queue. A queue whose size
		// is not known here (its SET_VRING_NUM failed, or none was
		// sent since a reset) is held to the largest packed ring, 2^15
		// entries: that still refuses used ahead of avail, which no
		// queue of any size can be at.
		size := fq.num
		if size == 0 {
			size = 1 << 15 // positions are 15 bits and a wrap bit
		}
		if _, ok := out.PackedInFlight(size); !ok {
			return vring.QueueState{}, msgErr(ReqGetVringBase, ErrUnexpectedReply,
				"queue %d: packed base %#x impossible for a queue of size %d", q, st.Num, size)
		}
		return out, nil
	}
	if fq.addrSet && f.mem != nil {
		var b [2]byte
		if err := f.mem.Read(fq.addr.Used+2, b[:]); err != nil {
			return vring.QueueState{}, msgErr(ReqGetVringBase, ErrAddrNotMapped,
				"queue %d stopped at avail %d, but its used.idx at %v cannot be read: %v", q, out.NextAvail, fq.addr.Used+2, err)
		}
		out.NextUsed = uint16(b[0]) | uint16(b[1])<<8
		// A split ring cannot have more chains in flight (taken from the
		// avail ring, not yet in the used ring) than it has entries. A
		// back-end's avail index that says otherwise, or one behind
		// used.idx, is no state a queue can be restarted or migrated at
		// (vring refuses it with ErrInvalidState): say so here, naming
		// the message, rather than hand it on. The size is the largest
		// split ring's when none is known.
		size := uint32(fq.num)
		if size == 0 {
			size = 1 << 15
		}
		if n := uint32(out.NextAvail - out.NextUsed); n > size {
			return vring.QueueState{}, msgErr(ReqGetVringBase, ErrUnexpectedReply,
				"queue %d stopped at avail %d with used.idx %d: %d chains in flight, more than a queue of size %d holds",
				q, out.NextAvail, out.NextUsed, n, size)
		}
	}
	return out, nil
}

// QueueBase sends GET_VRING_BASE, which stops the ring; for a split ring
// NextUsed is read from the used ring, for a packed ring it is in the
// reply's bits 16..31 (or equal to NextAvail when the back-end leaves them
// zero, as DPDK's does).
func (f *Frontend) QueueBase(q int) (vdpa.QueueState, error) {
	return f.QueueBaseContext(context.Background(), q)
}

// QueueBaseContext is QueueBase with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) QueueBaseContext(ctx context.Context, q int) (vdpa.QueueState, error) {
	if err := f.acquire(ctx); err != nil {
		return vdpa.QueueState{}, err
	}
	defer f.release()
	if _, err := f.queue(q); err != nil {
		return vdpa.QueueState{}, err
	}
	if fq := &f.queues[q]; f.suspend && fq.suspOK {
		return fq.suspSt, nil
	}
	return f.getBase(ctx, q, false)
}

func (f *Frontend) setFd(ctx context.Context, r Request, q int, e *vdpa.EventFD) error {
	v := uint64(q)
	var fds []int
	if e == nil {
		v |= VringNoFd
	} else {
		fds = []int{e.Fd()}
	}
	return f.send(ctx, r, putU64(v), fds)
}

// SetQueueKick sends SET_VRING_KICK (a nil kick asks the back-end to poll).
// The back-end starts the ring on it.
func (f *Frontend) SetQueueKick(q int, kick *vdpa.EventFD) error {
	return f.SetQueueKickContext(context.Background(), q, kick)
}

// SetQueueKickContext is SetQueueKick with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetQueueKickContext(ctx context.Context, q int, kick *vdpa.EventFD) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if err := f.setFd(ctx, ReqSetVringKick, q, kick); err != nil {
		return err
	}
	fq.kick, fq.kickSet = kick, true
	return nil
}

// SetQueueCall sends SET_VRING_CALL (nil: the driver polls).
func (f *Frontend) SetQueueCall(q int, call *vdpa.EventFD) error {
	return f.SetQueueCallContext(context.Background(), q, call)
}

// SetQueueCallContext is SetQueueCall with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetQueueCallContext(ctx context.Context, q int, call *vdpa.EventFD) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if err := f.setFd(ctx, ReqSetVringCall, q, call); err != nil {
		return err
	}
	fq.call, fq.callSet = call, true
	return nil
}

// SetQueueErr sends SET_VRING_ERR: the back-end signals err when the ring
// fails.
func (f *Frontend) SetQueueErr(q int, e *vdpa.EventFD) error {
	return f.SetQueueErrContext(context.Background(), q, e)
}

// SetQueueErrContext is SetQueueErr with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetQueueErrContext(ctx context.Context, q int, e *vdpa.EventFD) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if err := f.setFd(ctx, ReqSetVringErr, q, e); err != nil {
		return err
	}
	fq.errFd, fq.errSet = e, true
	return nil
}

// EnableQueue sends SET_VRING_ENABLE. Without PROTOCOL_FEATURES rings are
// enabled from the start and cannot be disabled.
func (f *Frontend) EnableQueue(q int, enable bool) error {
	return f.EnableQueueContext(context.Background(), q, enable)
}

// EnableQueueContext is EnableQueue with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) EnableQueueContext(ctx context.Context, q int, enable bool) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if !f.acked.Has(virtio.FProtocolFeat) {
		if !enable {
			return fmt.Errorf("%w: SET_VRING_ENABLE needs PROTOCOL_FEATURES", ErrUnsupported)
		}
		fq.enabled = true
		return nil
	}
	var n uint32
	if enable {
		n = 1
	}
	if err := f.send(ctx, ReqSetVringEnable, VringState{Index: uint32(q), Num: n}.Encode(), nil); err != nil {
		return err
	}
	fq.enabled = enable
	return nil
}

// Suspend stops every started ring with GET_VRING_BASE and remembers its
// state; QueueBase then returns it without stopping again.
//
// The rings stop from the highest index down: a virtio-net back-end that
// answers transmitted frames on the receive queue (a loopback, a responder,
// a switch port looped back) completes a transmit chain only after placing
// the reply, so with transmitq k stopped before receiveq k no frame is
// transmitted into a receive ring that is already stopped.
func (f *Frontend) Suspend() error {
	return f.SuspendContext(context.Background())
}

// SuspendContext is Suspend with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SuspendContext(ctx context.Context) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	if f.suspend {
		return nil
	}
	for i := range f.queues {
		f.queues[i].suspOK = false
	}
	for i := len(f.queues) - 1; i >= 0; i-- {
		fq := &f.queues[i]
		if !fq.kickSet {
			continue
		}
		st, err := f.getBase(ctx, i, false)
		if err != nil {
			return err
		}
		fq.suspSt, fq.suspOK = st, true
	}
	f.suspend = true
	return nil
}

// Resume restarts the rings Suspend stopped: SET_VRING_NUM and
// SET_VRING_ADDR again, SET_VRING_BASE with the saved position,
// SET_VRING_CALL with the call descriptor last set, then SET_VRING_KICK
// with the same kick descriptor (QEMU's order when it restarts a ring).
func (f *Frontend) Resume() error {
	return f.ResumeContext(context.Background())
}

// ResumeContext is Resume with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) ResumeContext(ctx context.Context) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	if !f.suspend {
		return nil
	}
	for i := range f.queues {
		fq := &f.queues[i]
		if !fq.suspOK {
			continue
		}
		// Size and addresses again before the base, as QEMU's
		// vhost_virtqueue_start sends them: DPDK's vhost library
		// forgets a ring's addresses on GET_VRING_BASE and would not
		// take the ring up again without them.
		if err := f.sendNumAddr(ctx, i); err != nil {
			return err
		}
		if err := f.send(ctx, ReqSetVringBase, VringState{Index: uint32(i), Num: vhostcore.VringBase(fq.suspSt, f.acked)}.Encode(), nil); err != nil {
			return err
		}
		// DPDK's vhost library also closes a ring's call descriptor on
		// GET_VRING_BASE: the same one again.
		if fq.callSet {
			if err := f.setFd(ctx, ReqSetVringCall, i, fq.call); err != nil {
				return err
			}
		}
		if err := f.setFd(ctx, ReqSetVringKick, i, fq.kick); err != nil {
			return err
		}
		fq.kickSet, fq.suspOK = true, false
	}
	f.suspend = false
	return nil
}

// SetLog hands the back-end a shared dirty bitmap (dirty.New with
// Options.Shared) with SET_LOG_BASE. The back-end logs while LOG_ALL is
// negotiated (SetFeatures). nil stops used-ring logging on every ring
// (vhost-user has no message to withdraw the log itself).
func (f *Frontend) SetLog(log *dirty.Bitmap) error {
	return f.SetLogContext(context.Background(), log)
}

// SetLogContext is SetLog with ctx bounding the wait for the socket and
// the exchange.
func (f *Frontend) SetLogContext(ctx context.Context, log *dirty.Bitmap) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	if log == nil {
		f.log = nil
		return f.resendAddrs(ctx)
	}
	if !f.proto.Has(PFLogShmfd) {
		return fmt.Errorf("%w: LOG_SHMFD not negotiated", ErrUnsupported)
	}
	if log.Fd() < 0 {
		return fmt.Errorf("%w: dirty bitmap is not shared (dirty.Options.Shared)", ErrBadRegion)
	}
	if err := f.sendLogBase(ctx, log); err != nil {
		return err
	}
	f.log = log
	return f.resendAddrs(ctx)
}

// sendLogBase sends SET_LOG_BASE for a shared bitmap.
func (f *Frontend) sendLogBase(ctx context.Context, log *dirty.Bitmap) error {
	m, err := f.exchange(ctx, ReqSetLogBase, Log{MmapSize: uint64(log.Size()), MmapOffset: log.FdOffset()}.Encode(),
		[]int{log.Fd()}, true)
	if err != nil {
		return err
	}
	if len(m.Payload) == u64Size && m.U64() != 0 {
		return msgErr(ReqSetLogBase, ErrReplyFailed, "status %d", m.U64())
	}
	return nil
}

// Close closes the connection; the back-end stops its rings and releases
// the memory. It does not wait for a request in flight: that request
// returns an error wrapping vdpa.ErrClosed. A second Close returns
// vdpa.ErrClosed.
func (f *Frontend) Close() error {
	first := false
	f.closeOnce.Do(func() {
		first = true
		// Under rmu: a break that starts a reconnect (markAway) either
		// sees done closed or counts its goroutine before bg.Wait.
		f.rmu.Lock()
		close(f.done)
		f.rmu.Unlock()
	})
	if !first {
		return vdpa.ErrClosed
	}
	err := f.conn().close()
	// The reconnect's goroutines (Reconnect) end promptly once done is
	// closed: their dial's context ends with it.
	f.bg.Wait()
	if errors.Is(err, net.ErrClosed) {
		return nil // closed already when the session broke
	}
	return err
}

package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/ctxclose"
	"github.com/vdpakit/vdpakit/internal/vhostcore"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// SupportedProtocolFeatures are the protocol features the back-end
// implements and offers by default.
const SupportedProtocolFeatures = ProtocolFeatures(1)<<PFMQ | 1<<PFLogShmfd | 1<<PFReplyAck |
	1<<PFConfig | 1<<PFResetDevice | 1<<PFStatus | 1<<PFConfigureMemSlots

// DefaultMessageTimeout is BackendOptions.MessageTimeout's default.
const DefaultMessageTimeout = 10 * time.Second

// BackendOptions configure a Backend. A nil *BackendOptions means all
// defaults.
type BackendOptions struct {
	// ProtocolFeatures restricts the protocol features offered to this set
	// (intersected with SupportedProtocolFeatures). Zero offers them all.
	ProtocolFeatures ProtocolFeatures
	// ReconnectInterval is how long client mode waits between connection
	// attempts (100ms if zero).
	ReconnectInterval time.Duration
	// Logger receives connection events and per-message debug records;
	// nil discards them.
	Logger *slog.Logger
	// MessageTimeout bounds how long the rest of a message may take once
	// its first byte has arrived, and how long writing a reply may take: a
	// front-end that stalls inside a message, or stops reading the replies
	// it asked for, ends its session with ErrStalled. A connection may idle
	// between messages for any time. 10s if zero; negative: no bound.
	MessageTimeout time.Duration
	// MaxGuestMemory bounds the bytes one memory table may map: the sum
	// of its regions' sizes. A table beyond it is refused (ErrBadRegion)
	// before anything is mapped. The front-end's files may be sparse, so
	// the mappings need not cost memory, but they take this process's
	// address space (128 TiB on x86-64 with 4-level page tables), and
	// without a bound one front-end could take all of it, after which the
	// Go runtime aborts the process. Zero means DefaultMaxGuestMemory.
	MaxGuestMemory uint64
}

// DefaultMaxGuestMemory is BackendOptions.MaxGuestMemory's default, 16 TiB:
// above any guest's RAM a vhost-user front-end runs today, and an eighth of
// a 47-bit user address space, so that the current table, the one
// replacing it, and the tables a broken ring still holds (one per queue at
// most) leave the rest of the process room. On 32-bit it is an eighth of
// the 4 GiB address space, 512 MiB, for the same reason; a back-end for a
// larger guest there sets MaxGuestMemory itself.
const DefaultMaxGuestMemory = min(16<<40, math.MaxInt/4+1)

// Backend serves a vdpa.Handler to one vhost-user front-end at a time (QEMU,
// DPDK's virtio-user, or this package's Frontend). It validates every
// message, maps the front-end's memory, translates ring addresses and builds
// a vring.DeviceQueue per started ring before handing it to the Handler.
//
// A Backend's serving methods may be called from one goroutine; Negotiated
// may be called from any.
type Backend struct {
	h      vdpa.Handler
	offerP ProtocolFeatures
	retry  time.Duration
	log    *slog.Logger
	msgTO  time.Duration
	maxMem uint64 // BackendOptions.MaxGuestMemory

	mu   sync.Mutex
	info SessionInfo

	// logHook, set only by tests before serving, sees the dirty log each
	// logged queue starts with and returns the one the queue uses (a tee,
	// or nil to hide the log: the dirty-log tests' negative control).
	logHook func(queue int, l vring.WriteLogger) vring.WriteLogger
}

// SessionInfo describes the current (or last) front-end session.
type SessionInfo struct {
	Connected        bool
	Features         virtio.Features  // accepted by SET_FEATURES
	ProtocolFeatures ProtocolFeatures // accepted by SET_PROTOCOL_FEATURES
	Status           virtio.Status
	RunningQueues    int
	Sessions         int // connections served so far
}

// NewBackend returns a back-end serving h.
func NewBackend(h vdpa.Handler, opts *BackendOptions) *Backend {
	var o BackendOptions
	if opts != nil {
		o = *opts
	}
	b := &Backend{h: h, offerP: SupportedProtocolFeatures, retry: o.ReconnectInterval, log: o.Logger, msgTO: o.MessageTimeout,
		maxMem: o.MaxGuestMemory}
	if b.maxMem == 0 {
		b.maxMem = DefaultMaxGuestMemory
	}
	if o.ProtocolFeatures != 0 {
		b.offerP &= o.ProtocolFeatures
	}
	if b.retry <= 0 {
		b.retry = 100 * time.Millisecond
	}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	switch {
	case b.msgTO == 0:
		b.msgTO = DefaultMessageTimeout
	case b.msgTO < 0:
		b.msgTO = 0
	}
	return b
}

// Info returns a snapshot of the session state.
func (b *Backend) Info() SessionInfo {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.info
}

// offeredFeatures are the vhost features of GET_FEATURES: the handler's
// device features plus PROTOCOL_FEATURES and LOG_ALL (this back-end logs),
// less VIRTIO_F_ACCESS_PLATFORM. With that feature negotiated, ring and
// buffer addresses are I/O virtual addresses the front-end translates
// through an IOTLB (PROTOCOL_F_IOMMU, IOTLB_MSG), which this back-end does
// not implement: it would read them as guest-physical addresses. A
// handler that offers the feature (softnet with AccessPlatform, for VDUSE)
// is served without it, and a front-end that sets it anyway is refused.
func (b *Backend) offeredFeatures() virtio.Features {
	return b.h.Features().With(virtio.FProtocolFeat, virtio.FLogAll) &^ virtio.FAccessPlatform.Bit()
}

// ListenAndServe listens on a unix socket at path (server mode) and serves
// front-ends one after another until ctx ends. A stale socket file is
// removed first; the socket file is removed on return.
func (b *Backend) ListenAndServe(ctx context.Context, path string) error {
	_ = os.Remove(path)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("vhost-user: listen %s: %w", path, err)
	}
	l.SetUnlinkOnClose(true)
	return b.Serve(ctx, l)
}

// Serve accepts front-ends on l one at a time, serving each until it
// disconnects, until ctx ends. It closes l.
//
// A temporary accept failure (this process or the system out of
// descriptors or memory, a connection aborted before it was accepted) is
// logged and retried after a back-off of 5ms doubling to 1s, as net/http
// does; any other accept error ends Serve.
func (b *Backend) Serve(ctx context.Context, l *net.UnixListener) error {
	// ctx's end closes l to interrupt Accept; on the way out Serve closes
	// it too and waits for that close, so that the listener and its
	// socket file are gone when Serve returns.
	release := ctxclose.OnDone(ctx, l.Close)
	defer release()
	defer l.Close()
	var delay time.Duration
	for {
		uc, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if !temporaryAcceptError(err) {
				return fmt.Errorf("vhost-user: accept: %w", err)
			}
			delay = min(max(2*delay, acceptRetryMin), acceptRetryMax)
			b.log.Warn("vhost-user: accept failed; retrying", "err", err, "delay", delay)
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
			continue
		}
		delay = 0
		if err := b.ServeConn(ctx, uc); err != nil && ctx.Err() == nil {
			b.log.Warn("vhost-user session ended", "err", err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// Back-off bounds for temporary accept failures.
const (
	acceptRetryMin = 5 * time.Millisecond
	acceptRetryMax = time.Second
)

// temporaryAcceptError reports whether an accept error is worth retrying:
// the process or the system is out of descriptors or memory, or the
// connection was aborted before it was accepted.
func temporaryAcceptError(err error) bool {
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// DialAndServe connects to a front-end listening at path (client mode) and
// serves it; when the connection ends (the front-end restarted, say) it
// reconnects, retrying every ReconnectInterval, until ctx ends.
func (b *Backend) DialAndServe(ctx context.Context, path string) error {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			if err := b.ServeConn(ctx, c.(*net.UnixConn)); err != nil && ctx.Err() == nil {
				b.log.Warn("vhost-user session ended", "err", err)
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		t := time.NewTimer(b.retry)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// ServeConn serves one front-end connection until it closes (nil), sends
// bad input (a *MessageError wrapping one of the sentinel errors) or ctx
// ends. It closes uc. Whatever the outcome, every queue is stopped, the
// handler is reset, the front-end's memory is unmapped and every descriptor
// received is closed before it returns. When ctx ends, the queues are
// stopped before uc is closed: the front-end sees the connection end only
// once the rings have stopped moving.
func (b *Backend) ServeConn(ctx context.Context, uc *net.UnixConn) error {
	s := &session{b: b, h: b.h, c: newConn(uc), errWake: make(chan struct{}, 1)}
	s.c.msgTimeout = b.msgTO
	s.queues = make([]vq, min(b.h.NumQueues(), MaxQueues))
	b.mu.Lock()
	b.info = SessionInfo{Connected: true, Sessions: b.info.Sessions + 1}
	b.mu.Unlock()
	b.log.Info("vhost-user front-end connected")
	// ctx's end interrupts the session's socket I/O but does not close
	// uc: the session returns, teardown stops every queue, and only then
	// closes uc. A front-end that sees the connection end takes the rings'
	// positions from guest memory (QEMU's ring restore, when it cannot
	// send GET_VRING_BASE) and gives them to the next back-end, so the
	// rings must not move once it has seen it: a ring still running after
	// the close would make the next back-end process chains again.
	stop := context.AfterFunc(ctx, s.c.interrupt)
	defer stop()
	defer s.teardown()
	if r, ok := b.h.(vdpa.QueueErrReporter); ok {
		wctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); s.watchErrors(wctx, r) }()
		defer func() { cancel(); <-done }()
	}
	for {
		m, err := s.c.read()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				b.log.Info("vhost-user front-end disconnected")
				return nil
			}
			return err
		}
		err = s.handle(m)
		m.Close()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
	}
}

// vq is the back-end's view of one virtqueue.
type vq struct {
	num     uint16
	addr    VringAddr
	addrSet bool
	// base is the ring position as SET_VRING_BASE carries it (and
	// GET_VRING_BASE returns it): vhostcore.VringBase's encoding, the
	// next avail index for a split ring, avail and used positions with
	// their wrap counters for a packed one. baseSet: a SET_VRING_BASE or
	// a stop gave it since the last reset (a packed ring that never got
	// one starts at vring.InitialState, not at the zero word).
	base    uint32
	baseSet bool
	saved   *vring.QueueState // state from a disable, reused on enable
	kick    *vdpa.EventFD
	call    *vdpa.EventFD
	errFd   *vdpa.EventFD
	kicked  bool // SET_VRING_KICK received since the ring last stopped
	enabled bool
	running bool
	runs    uint64 // times the ring has started: tells one run from the next
	// broken: the handler failed to stop the ring (StopQueue returned an
	// error), so it may still own the DeviceQueue. The back-end never
	// reads that queue's state again and does not start the ring until a
	// reset (RESET_DEVICE, RESET_OWNER) or the end of the session.
	broken bool
	dq     *vring.DeviceQueue
	// orphan is the DeviceQueue of a ring whose handler failed to stop
	// it: its cached dirty-log marks are flushed after the next handler
	// Reset, when nothing drives it any more. Marks it cached against a
	// log replaced before that Reset (a new SET_LOG_BASE, the pending log
	// dropped or grown) go to the replaced log, which stays mapped until
	// then (session.retired), and are lost to the new one: while the
	// handler may still be driving the queue they cannot be applied
	// earlier.
	orphan *vring.DeviceQueue
	// orphanUses is what the orphan's handler may still touch: the memory
	// table and the logs (front-end's and pending) current when the ring
	// broke. A ring that runs is stopped before any of them is replaced,
	// so these are the ones it was started with.
	orphanUses [3]any
}

type session struct {
	b *Backend
	h vdpa.Handler
	c *conn

	owner       bool // SET_OWNER received (and no RESET_OWNER since)
	ownerNoted  bool // a device request without an owner was logged
	features    virtio.Features
	featuresSet bool
	handlerSet  bool // handler.SetFeatures called since the last reset
	proto       ProtocolFeatures
	status      virtio.Status
	held        bool // SET_STATUS 0 came and no SET_STATUS with DRIVER_OK since: no ring starts (see tryStart)
	mem         *peerMemory
	log         *dirty.Bitmap
	// pending logs the rings' writes while LOG_ALL is negotiated and no
	// SET_LOG_BASE has arrived yet; setLog merges it into the log. See
	// ringLog.
	pending *dirty.Bitmap
	queues  []vq
	// retired holds the releases (unmapping guest memory, closing a log)
	// of what an orphan queue's handler may still read, write or mark
	// (vq.orphanUses) when a new memory table, log or feature set replaces
	// it: they run after the next handler Reset (handlerReset) instead.
	// Unmapping under a running worker would send its writes into
	// whatever mapping reuses the addresses. Each orphan holds back at
	// most one memory table and two logs.
	retired []func()

	// errFds publishes, per queue, the SET_VRING_ERR eventfd of a running
	// queue (nil otherwise) to the watcher goroutine that signals it when
	// a vdpa.QueueErrReporter handler reports the queue broken.
	errFds atomic.Pointer[[]errWatch]
	// errWake wakes the watcher when errFds changes (room for one).
	errWake chan struct{}

	// logFault is set when an access to the front-end's dirty log from
	// the session goroutine faulted: the front-end truncated the log's
	// file under the mapping. The log can no longer be written, so the
	// request being served fails with it and the session ends (see
	// flushLog).
	logFault error
}

func (s *session) update() {
	n := 0
	fds := make([]errWatch, len(s.queues))
	for i := range s.queues {
		if q := &s.queues[i]; q.running {
			n++
			fds[i] = errWatch{q.errFd, q.runs}
		}
	}
	if old := s.errFds.Load(); old == nil || !slices.Equal(*old, fds) {
		s.errFds.Store(&fds)
		select {
		case s.errWake <- struct{}{}:
		default: // a wake is pending already
		}
	}
	s.b.mu.Lock()
	s.b.info.Features, s.b.info.ProtocolFeatures, s.b.info.Status = s.features, s.proto, s.status
	s.b.info.RunningQueues = n
	s.b.mu.Unlock()
}

func (s *session) teardown() {
	s.stopAll()
	s.handlerReset()
	for i := range s.queues {
		q := &s.queues[i]
		for _, e := range []*vdpa.EventFD{q.kick, q.call, q.errFd} {
			if e != nil {
				_ = e.Close()
			}
		}
		*q = vq{}
	}
	s.mem.close()
	s.mem = nil
	if s.log != nil {
		_ = s.log.Close()
		s.log = nil
	}
	s.dropPending()
	_ = s.c.close()
	s.b.mu.Lock()
	s.b.info.Connected = false
	s.b.info.RunningQueues = 0
	s.b.mu.Unlock()
}

// replyAck reports whether a REPLY_ACK acknowledgement (a u64 status) is
// due for m: NEED_REPLY with REPLY_ACK negotiated, and a request without a
// reply body of its own (ownReply).
func (s *session) replyAck(m *Message) bool {
	return m.NeedReply() && s.proto.Has(PFReplyAck) && !ownReply(m.Request)
}

// ownReply reports whether request r has a reply body of its own. The
// REPLY_ACK status is due "unless the message already has an explicit
// reply body": a u64 status sent for these would be read as that body (a
// status 1 as GET_VRING_BASE's position of queue 1, as one memory slot, as
// features 0x1). When one of them fails without its reply (bad input, a
// request this back-end does not serve), the session ends without one.
// The replies of SET_LOG_BASE, IOTLB_MSG and POSTCOPY_END are a u64 that
// is non-zero on failure: a status is their own failure form.
func ownReply(r Request) bool {
	switch r {
	case ReqGetFeatures, ReqGetProtocolFeatures, ReqGetVringBase, ReqGetQueueNum, ReqGetConfig,
		ReqCreateCryptoSession, ReqPostcopyAdvise, ReqGetInflightFd, ReqGetMaxMemSlots, ReqGetStatus:
		return true
	}
	return false
}

func (s *session) reply(m *Message, payload []byte) error {
	if s.b.log.Enabled(context.Background(), slog.LevelDebug) {
		s.b.log.Debug("vhost-user reply", "req", m.Request, "msg", describeReply(m.Request, payload))
	}
	return s.c.write(Header{Request: m.Request, Flags: Version | FlagReply}, payload, nil)
}

// handle validates and serves one message. An error closes the session;
// before that, a front-end waiting for an acknowledgement gets a failure
// status so it does not hang (a request with a reply body of its own gets
// none: see ownReply).
func (s *session) handle(m *Message) error {
	if s.b.log.Enabled(context.Background(), slog.LevelDebug) {
		s.b.log.Debug("vhost-user request", "req", m.Request, "flags", uint32(m.Flags), "size", m.Size, "fds", len(m.Fds),
			"msg", describe(m))
	}
	if err := Validate(m); err != nil {
		if s.replyAck(m) {
			_ = s.reply(m, putU64(1))
		}
		return err
	}
	payload, hasReply, err := s.dispatch(m)
	if s.logFault != nil {
		// The log faulted while this request was served: the session
		// ends with that, unless the request failed on its own account.
		var me *MessageError
		if !errors.As(err, &me) {
			err = &MessageError{Request: m.Request, Err: s.logFault}
		}
	}
	s.update() // before replying: the front-end may look right after
	switch {
	case err != nil:
		if !hasReply && s.replyAck(m) {
			_ = s.reply(m, putU64(1))
		}
		return err
	case hasReply:
		return s.reply(m, payload)
	case s.replyAck(m):
		return s.reply(m, putU64(0))
	}
	return nil
}

func (s *session) queue(r Request, idx uint32) (*vq, int, error) {
	if idx >= uint32(len(s.queues)) {
		return nil, 0, msgErr(r, ErrBadQueue, "queue %d, device has %d", idx, len(s.queues))
	}
	return &s.queues[idx], int(idx), nil
}

func (s *session) dispatch(m *Message) (reply []byte, hasReply bool, err error) {
	r := m.Request
	needProto := func(f ProtocolFeature) error {
		if !s.proto.Has(f) {
			return msgErr(r, ErrUnsupported, "protocol feature %v not negotiated", f)
		}
		return nil
	}
	if !s.owner && !s.ownerNoted && needsOwner(r) {
		// Served anyway (see needsOwner); noted once per session.
		s.ownerNoted = true
		s.b.log.Info("vhost-user: front-end configures the device without SET_OWNER", "req", r)
	}
	switch r {
	case ReqSetOwner:
		// QEMU sends one SET_OWNER per queue pair (one vhost_dev each)
		// on the same connection: a repeat is not an error.
		s.owner = true
		return nil, false, nil
	case ReqResetOwner:
		// Deprecated. Like the kernel's VHOST_RESET_OWNER and DPDK's
		// vhost library: give up ownership and reset the device.
		s.reset()
		s.owner, s.ownerNoted = false, false
		return nil, false, nil
	case ReqGetFeatures:
		return putU64(uint64(s.b.offeredFeatures())), true, nil
	case ReqSetFeatures:
		return nil, false, s.setFeatures(virtio.Features(m.U64()))
	case ReqGetProtocolFeatures:
		return putU64(uint64(s.b.offerP)), true, nil
	case ReqSetProtocolFeatures:
		p := ProtocolFeatures(m.U64())
		if p&^s.b.offerP != 0 {
			return nil, false, msgErr(r, ErrProtocol, "features %v not offered (offer %v)", p&^s.b.offerP, s.b.offerP)
		}
		s.proto = p
		return nil, false, nil
	case ReqGetQueueNum:
		if err := needProto(PFMQ); err != nil {
			return nil, true, err
		}
		return putU64(uint64(s.queueNum())), true, nil
	case ReqSetMemTable:
		rs, _ := DecodeMemTable(m.Payload)
		fds := make([]int, len(m.Fds))
		for i := range fds {
			fds[i] = m.TakeFd(i)
		}
		return nil, false, s.setMemTable(rs, fds)
	case ReqGetMaxMemSlots:
		if err := needProto(PFConfigureMemSlots); err != nil {
			return nil, true, err
		}
		return putU64(MaxMemSlots), true, nil
	case ReqAddMemReg, ReqRemMemReg:
		if err := needProto(PFConfigureMemSlots); err != nil {
			return nil, false, err
		}
		// Validate checked the payload's size with the message, the
		// only thing DecodeSingleRegion can refuse.
		reg, _ := DecodeSingleRegion(m.Payload)
		if r == ReqRemMemReg {
			// A descriptor sent with it (allowed for compatibility)
			// is closed unused with the message.
			return nil, false, s.changeMemory(removeRegion(s.mem, reg))
		}
		return nil, false, s.changeMemory(addRegion(s.mem, reg, m.TakeFd(0), s.b.maxMem))
	case ReqSetLogBase:
		if err := needProto(PFLogShmfd); err != nil {
			return nil, false, err
		}
		if len(m.Fds) != 1 {
			return nil, false, msgErr(r, ErrFdCount, "LOG_SHMFD needs the log descriptor")
		}
		l, _ := DecodeLog(m.Payload)
		if err := s.setLog(l, m.Fds[0]); err != nil {
			return nil, false, err
		}
		// With LOG_SHMFD the front-end waits for a reply.
		return putU64(0), true, nil
	case ReqSetLogFd:
		// Optional "log modified" eventfd; this back-end writes the log
		// directly and needs no signal.
		return nil, false, nil
	case ReqSetVringNum:
		st, _ := DecodeVringState(m.Payload)
		q, _, err := s.queue(r, st.Index)
		if err != nil {
			return nil, false, err
		}
		// A split ring's size is a power of two; a packed ring's is
		// any size up to 32768 (virtio 1.2 §2.8), once RING_PACKED is
		// negotiated (QEMU and DPDK send SET_FEATURES first).
		if st.Num == 0 || st.Num > uint32(s.h.MaxQueueSize()) || !vring.ValidQueueSizeFor(uint16(st.Num), s.features) {
			return nil, false, msgErr(r, ErrBadQueue, "queue %d size %d (max %d; a power of two unless RING_PACKED)", st.Index, st.Num, s.h.MaxQueueSize())
		}
		if q.running {
			return nil, false, msgErr(r, ErrProtocol, "queue %d resized while running", st.Index)
		}
		q.num = uint16(st.Num)
		return nil, false, nil
	case ReqSetVringAddr:
		a, _ := DecodeVringAddr(m.Payload)
		return nil, false, s.setVringAddr(a)
	case ReqSetVringBase:
		st, _ := DecodeVringState(m.Payload)
		q, _, err := s.queue(r, st.Index)
		if err != nil {
			return nil, false, err
		}
		if q.running {
			return nil, false, msgErr(r, ErrProtocol, "queue %d base set while running", st.Index)
		}
		// A packed ring's base carries the used position in bits
		// 16..31 (vhostcore.VringBase); a split ring's is 16 bits.
		if st.Num > 0xffff && !s.features.Has(virtio.FRingPacked) {
			return nil, false, msgErr(r, ErrProtocol, "queue %d base %#x beyond 16 bits", st.Index, st.Num)
		}
		// A packed word no queue of the size already set can be at (an
		// index >= size, used ahead of avail, more than a ring in
		// flight) is refused here rather than when the ring starts.
		if s.features.Has(virtio.FRingPacked) && q.num != 0 {
			if _, ok := packedStart(st.Num, true, s.features).PackedInFlight(q.num); !ok {
				return nil, false, msgErr(r, ErrProtocol, "queue %d packed base %#x for size %d: %w",
					st.Index, st.Num, q.num, vring.ErrInvalidState)
			}
		}
		q.base, q.baseSet, q.saved = st.Num, true, nil
		return nil, false, nil
	case ReqGetVringBase:
		st, _ := DecodeVringState(m.Payload)
		q, i, err := s.queue(r, st.Index)
		if err != nil {
			return nil, true, err
		}
		s.stopQueue(i)
		if q.saved != nil {
			q.base, q.baseSet = vhostcore.VringBase(*q.saved, s.features), true
			q.saved = nil
		}
		if q.broken && !s.features.Has(virtio.FRingPacked) {
			// The handler may still own the ring: report the position
			// the device last published (used.idx), as QEMU does for
			// a back-end that cannot answer; chains taken but not
			// completed are offered again rather than lost. A packed
			// ring publishes no index in memory (used descriptors
			// overwrite available ones in place), so a broken packed
			// ring reports the position it started from.
			if u, err := s.usedIdx(i); err == nil {
				q.base, q.baseSet = uint32(u), true
			}
		}
		if !q.baseSet && s.featuresSet {
			// Never set nor started since the reset: the fresh
			// position of the negotiated format (a packed ring's wrap
			// counters start at 1). Before SET_FEATURES the format
			// is unknown and the answer stays 0.
			q.base = vhostcore.VringBase(vring.InitialState(s.features), s.features)
		}
		// The ring is stopped until the next SET_VRING_KICK.
		q.kicked = false
		if q.kick != nil {
			_ = q.kick.Close()
			q.kick = nil
		}
		return VringState{Index: st.Index, Num: q.base}.Encode(), true, nil
	case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		return nil, false, s.setVringFd(m)
	case ReqSetVringEnable:
		st, _ := DecodeVringState(m.Payload)
		// QEMU enables rings right after SET_PROTOCOL_FEATURES, before
		// SET_FEATURES; the bit is only known to be declined once
		// SET_FEATURES arrives without it.
		if s.featuresSet && !s.features.Has(virtio.FProtocolFeat) {
			return nil, false, msgErr(r, ErrProtocol, "PROTOCOL_FEATURES not negotiated")
		}
		q, i, err := s.queue(r, st.Index)
		if err != nil {
			return nil, false, err
		}
		if st.Num > 1 {
			return nil, false, msgErr(r, ErrProtocol, "queue %d enable value %d", st.Index, st.Num)
		}
		q.enabled = st.Num == 1
		if !q.enabled {
			s.pauseQueue(i)
			return nil, false, nil
		}
		return nil, false, s.tryStart(i)
	case ReqGetConfig:
		if err := needProto(PFConfig); err != nil {
			return nil, true, err
		}
		c, _ := DecodeConfig(m.Payload)
		if uint64(c.Offset)+uint64(len(c.Data)) > uint64(s.h.ConfigSize()) {
			// "a zero length of payload to indicate an error" (the
			// reply's header has size 0, as libvhost-user and DPDK
			// send it; QEMU checks the size and fails the read).
			return []byte{}, true, nil
		}
		out := Config{Offset: c.Offset, Flags: c.Flags, Data: make([]byte, len(c.Data))}
		s.h.ReadConfig(int(c.Offset), out.Data)
		return out.Encode(), true, nil
	case ReqSetConfig:
		if err := needProto(PFConfig); err != nil {
			return nil, false, err
		}
		c, _ := DecodeConfig(m.Payload)
		// "The vhost-user back-end must check the flags field": a
		// front-end write (0) or a live migration (1).
		if c.Flags != ConfigFlagWritable && c.Flags != ConfigFlagMigration {
			return nil, false, msgErr(r, ErrProtocol, "config write flags %#x (want %d or %d)", c.Flags, ConfigFlagWritable, ConfigFlagMigration)
		}
		if uint64(c.Offset)+uint64(len(c.Data)) > uint64(s.h.ConfigSize()) {
			return nil, false, msgErr(r, ErrProtocol, "config write %d+%d beyond %d", c.Offset, len(c.Data), s.h.ConfigSize())
		}
		if err := s.h.WriteConfig(int(c.Offset), c.Data); err != nil {
			return nil, false, &MessageError{Request: r, Err: fmt.Errorf("%w: %w", ErrDeviceFailed, err)}
		}
		return nil, false, nil
	case ReqResetDevice:
		if err := needProto(PFResetDevice); err != nil {
			return nil, false, err
		}
		s.reset()
		return nil, false, nil
	case ReqSetStatus:
		if err := needProto(PFStatus); err != nil {
			return nil, false, err
		}
		v := m.U64()
		if v > 0xff {
			return nil, false, msgErr(r, ErrProtocol, "status %#x beyond 8 bits", v)
		}
		st := virtio.Status(v)
		if st == 0 {
			// QEMU's vhost_dev_stop (monitor stop, the stop-and-copy
			// of every migration) sends SET_STATUS 0 and then
			// GET_VRING_BASE, and resumes with the base it got back.
			// So status 0 suspends: the rings stop and keep their
			// positions (as DPDK's vhost library does), nothing is
			// reset. The driver's status no longer has DRIVER_OK,
			// and a virtio device must not use its rings before
			// DRIVER_OK: no ring starts again (on SET_VRING_ENABLE 1
			// or a kick) until it is set again, which is how QEMU's
			// cont and DPDK's start end.
			s.stopAllRunning()
			s.status, s.held = 0, true
			return nil, false, nil
		}
		s.status = st
		if st&virtio.StatusDriverOK != 0 {
			s.held = false
			for i := range s.queues {
				if err := s.tryStart(i); err != nil {
					return nil, false, err
				}
			}
		}
		return nil, false, nil
	case ReqGetStatus:
		if err := needProto(PFStatus); err != nil {
			return nil, true, err
		}
		// A running queue the handler reports broken sets
		// DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2).
		if r, ok := s.h.(vdpa.QueueErrReporter); ok && s.status != 0 {
			for i := range s.queues {
				if s.queues[i].running && r.QueueErr(i) != nil {
					s.status |= virtio.StatusDeviceNeedsReset
				}
			}
		}
		for i := range s.queues {
			if s.queues[i].broken && s.status != 0 {
				s.status |= virtio.StatusDeviceNeedsReset
			}
		}
		return putU64(uint64(s.status)), true, nil
	}
	return nil, false, msgErr(r, ErrUnsupported, "not implemented by this back-end")
}

// needsOwner reports whether request r configures or drives the device,
// which a front-end would do after SET_OWNER. The spec only says SET_OWNER
// "is issued when a new connection is established" and "can be used on the
// back-end as a session start flag"; it does not have the back-end refuse
// requests before it, and real front-ends rely on that: QEMU negotiates
// features and protocol features (vhost_user_backend_init) before its
// first SET_OWNER (vhost_dev_init) and sends one SET_OWNER per queue pair
// on the same connection; DPDK 22.11's virtio-user in server mode never
// sends SET_OWNER when a back-end reconnects (recorded in
// testdata/lifecycle/dpdk-reconnect.vu), and starts with SET_VRING_ENABLE 0
// and GET_VRING_BASE. So the back-end serves these requests without an
// owner and notes it in the log once per session.
func needsOwner(r Request) bool {
	switch r {
	case ReqSetOwner, ReqGetFeatures, ReqGetProtocolFeatures, ReqSetProtocolFeatures, ReqGetQueueNum,
		ReqGetConfig, ReqGetStatus, ReqGetMaxMemSlots:
		return false
	}
	return true
}

// queueNum is GET_QUEUE_NUM's answer: queue pairs for a net device (what
// QEMU and DPDK compare with their queue-pair count), queues otherwise.
func (s *session) queueNum() int {
	if s.h.DeviceID() == virtio.DeviceNet {
		return max(len(s.queues)/2, 1)
	}
	return len(s.queues)
}

func (s *session) setFeatures(f virtio.Features) error {
	offered := s.b.offeredFeatures()
	if f&^offered != 0 {
		return msgErr(ReqSetFeatures, ErrProtocol, "features %#x not offered", uint64(f&^offered))
	}
	dev := f &^ virtio.FProtocolFeat.Bit() &^ virtio.FLogAll.Bit()
	old := s.features &^ virtio.FProtocolFeat.Bit() &^ virtio.FLogAll.Bit()
	running := s.stopAllRunning()
	formatChanged := s.featuresSet && f.Has(virtio.FRingPacked) != s.features.Has(virtio.FRingPacked)
	s.features, s.featuresSet = f, true
	if !f.Has(virtio.FLogAll) {
		s.dropPending()
	}
	if formatChanged {
		// A ring's size, addresses and position mean different things
		// in the split and the packed format (a packed size need not be
		// a power of two, the areas differ, the base word differs), so a
		// front-end that renegotiates the format (mdev switching a
		// packed guest onto split shadow rings, a driver reset) sets each
		// ring up again; what was configured before is dropped rather
		// than re-read under the new rules. The eventfds stay.
		for i := range s.queues {
			q := &s.queues[i]
			q.num, q.addr, q.addrSet = 0, VringAddr{}, false
			q.base, q.baseSet, q.saved, q.kicked = 0, false, nil, false
		}
		running = nil
		s.b.log.Info("vhost-user: ring format renegotiated; ring configuration dropped", "packed", f.Has(virtio.FRingPacked))
	}
	if !s.handlerSet || dev != old {
		if err := s.h.SetFeatures(dev); err != nil {
			return &MessageError{Request: ReqSetFeatures, Err: fmt.Errorf("%w: %w", ErrDeviceFailed, err)}
		}
		s.handlerSet = true
	}
	if !f.Has(virtio.FProtocolFeat) {
		// Without PROTOCOL_FEATURES rings start enabled.
		for i := range s.queues {
			s.queues[i].enabled = true
		}
	}
	return s.restart(running)
}

// Stop and restart order. A device may feed one of its queues from
// another: softnet's loopback (and any virtio-net device replying to a
// frame) completes a transmit chain after writing the frame into the
// receive queue of the same pair. Stopping the receive queue while its
// transmit queue still runs would let the transmit worker complete chains
// whose frames the stopped receive queue then drops. So whenever the
// back-end stops queues on its own account (a restart to apply a new
// memory table, log, features, ring address or eventfd, or a reset), it
// stops every running queue from the highest index down (virtio-net:
// transmitq k before receiveq k) and starts them again from the lowest up
// (receive buffers are served before the frames that need them), as
// vdpa.Local does. Messages that stop one ring by the front-end's explicit
// request (GET_VRING_BASE, SET_VRING_ENABLE 0) stop only that ring: the
// order is then the front-end's to choose. QEMU chooses receiveq k first;
// a vdpa/softnet handler holds transmitq k meanwhile (it consumes nothing
// until receiveq k starts again), so nothing is dropped then either.

// stopAll stops every running queue, highest index first, keeping each
// one's next avail index as its base.
func (s *session) stopAll() {
	for i := len(s.queues) - 1; i >= 0; i-- {
		s.stopQueue(i)
	}
}

// stopAllRunning pauses every running queue, highest index first, keeping
// its state for restart. The result lists the paused queues in that
// (descending) order.
func (s *session) stopAllRunning() []int {
	var running []int
	for i := len(s.queues) - 1; i >= 0; i-- {
		if s.queues[i].running {
			s.pauseQueue(i)
			running = append(running, i)
		}
	}
	return running
}

// restart starts the queues stopAllRunning paused again, lowest index
// first.
func (s *session) restart(qs []int) error {
	for k := len(qs) - 1; k >= 0; k-- {
		if err := s.tryStart(qs[k]); err != nil {
			return err
		}
	}
	return nil
}

// reset serves RESET_DEVICE (and the deprecated RESET_OWNER): "disable all
// rings and reset all internal device state to the initial state, ready to
// be reinitialized".
func (s *session) reset() {
	s.stopAll()
	for i := range s.queues {
		// A reset device has no ring configuration: the size, addresses
		// and position go (the front-end sends them again before it
		// starts a ring, as QEMU, DPDK and Frontend do). A size kept over
		// the reset would check the next SET_VRING_BASE of a packed ring
		// against the old size. Every ring is disabled, as rings are
		// initialized: SET_VRING_ENABLE 1, or a SET_FEATURES without
		// PROTOCOL_FEATURES, enables it again. The kick and
		// call eventfds stay: they belong to the connection's setup, and
		// a ring starts only on a new SET_VRING_KICK anyway.
		q := &s.queues[i]
		q.num, q.addr, q.addrSet = 0, VringAddr{}, false
		q.saved = nil
		q.base, q.baseSet = 0, false
		q.kicked = false
		q.enabled = false
	}
	s.handlerReset()
	for i := range s.queues {
		s.queues[i].broken = false // Reset stopped whatever the handler still ran
	}
	// The features go too: the front-end negotiates them again (QEMU
	// sends SET_FEATURES before it starts the device), and a ring does not
	// start before it has. The protocol features are the connection's and
	// stay (QEMU does not send them again).
	s.features, s.featuresSet, s.handlerSet = 0, false, false
	s.status, s.held = 0, false
}

func (s *session) setMemTable(rs []MemoryRegion, fds []int) error {
	pm, err := mapMemTable(rs, fds, s.b.maxMem)
	if err != nil {
		return err
	}
	running := s.swapMemory(pm)
	// The rings that were running must lie in the new memory: restart
	// checks them and ends the session if one does not. The addresses of
	// a ring that is not running are not checked here: a front-end that
	// moves guest memory sends the new table before the ring's new
	// SET_VRING_ADDR (Linux vhost, too, checks only the rings it runs),
	// and a ring is checked against the memory of its day when it starts.
	return s.restart(running)
}

// swapMemory stops every running ring, retires the memory table (once no
// orphaned ring uses it) and installs pm. It returns the rings it stopped,
// highest index first (stopAllRunning).
func (s *session) swapMemory(pm *peerMemory) []int {
	running := s.stopAllRunning()
	s.release(s.mem, s.mem.close)
	s.mem = pm
	return running
}

// changeMemory serves ADD_MEM_REG and REM_MEM_REG: when the table changed,
// it becomes pm, and every running ring is stopped and started again on
// it, as for SET_MEM_TABLE. Unlike a whole new table, one step of a table
// built region by region may leave a ring's memory out for a while (QEMU
// sends the removals of a change before its additions): such a ring stays
// stopped, not failed, and starts when a later step brings its memory
// back (or a new SET_VRING_ADDR moves it into mapped memory).
//
// The rings are not held back between a removal and the addition that
// follows it: a front-end that replaces a region holding buffers that
// way lets them run for a moment without it, and a chain taken then with
// a buffer there breaks its ring, which reports it and restarts at its
// saved position with the next change. No QEMU sequence recorded here
// replaces a region in use.
func (s *session) changeMemory(pm *peerMemory, changed bool, err error) error {
	if err != nil || !changed {
		return err
	}
	s.swapMemory(pm)
	// Lowest index first, as restart: a receive queue runs again before
	// its transmit queue.
	for i := range s.queues {
		if err := s.tryStart(i); err != nil {
			if !errors.Is(err, ErrAddrNotMapped) {
				return err
			}
			s.b.log.Info("vhost-user: ring stopped until its memory is back", "queue", i, "err", err)
		}
	}
	return nil
}

func (s *session) setLog(l Log, fd int) error {
	if l.MmapSize == 0 || l.MmapSize > dirty.MaxSize {
		return msgErr(ReqSetLogBase, ErrProtocol, "log size %#x", l.MmapSize)
	}
	// A memfd or a file: dirty.AttachFd checks that it is as long as the
	// log and seals it against shrinking where it can. Anything else
	// (a device node, say) is refused: its size cannot be checked, and
	// a mapping past its end faults.
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return msgErr(ReqSetLogBase, ErrBadRegion, "log descriptor: %v", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return msgErr(ReqSetLogBase, ErrBadRegion, "log descriptor is not a regular file or memfd (mode %#o)", st.Mode)
	}
	bm, err := dirty.AttachFd(fd, l.MmapOffset, l.MmapSize, nil)
	if err != nil {
		return msgErr(ReqSetLogBase, ErrBadRegion, "log mapping: %v", err)
	}
	running := s.stopAllRunning()
	if old := s.log; old != nil {
		s.release(old, func() { _ = old.Close() })
	}
	s.log = bm
	if err := s.mergePending(); err != nil {
		return err
	}
	return s.restart(running)
}

// Dirty logging before the log exists.
//
// Once LOG_ALL is negotiated every write the device makes to guest memory
// must reach the log, but front-ends do not always send SET_LOG_BASE before
// the rings run: QEMU's vhost_dev_start sets the features (with LOG_ALL
// while migrating), the memory table and every ring, kicks included, and
// only then SET_LOG_BASE. That is the order when a back-end that was
// restarted during a migration is attached again. Rings that start in that
// window and served the guest without logging would leave pages dirty that
// the migration never sends again (the destination then runs on stale
// memory). Holding the rings until the log arrives is no answer either:
// nothing obliges a front-end to ever send one.
//
// So a ring started with LOG_ALL and no log logs into a private pending
// bitmap covering the memory table, and SET_LOG_BASE ORs it into the log
// before the rings restart with the real log: every write is in the log
// the front-end reads, and the rings never wait. The pending bitmap is
// dropped when LOG_ALL is turned off (nobody asked for those pages) and at
// the end of the session; it survives a device reset (the pages were
// written all the same); a new memory table grows it.

// ringLog returns the log a ring starting now must write: the front-end's
// log, or the pending bitmap while LOG_ALL is on without one, or nil.
func (s *session) ringLog() (*dirty.Bitmap, error) {
	if !s.features.Has(virtio.FLogAll) {
		s.dropPending()
		return nil, nil
	}
	if s.log != nil {
		return s.log, nil
	}
	span := s.memSpan()
	if s.pending != nil && s.pending.Span() >= span {
		return s.pending, nil
	}
	// Shared: a memfd whose holes the merge and the scans skip, so a
	// memory table with a region at a high address costs what the rings
	// write, not the span.
	bm, err := dirty.New(span, &dirty.Options{Shared: true})
	if err != nil {
		return nil, msgErr(ReqSetFeatures, ErrProtocol, "pending dirty log for %#x bytes of guest memory: %v", span, err)
	}
	if s.pending != nil {
		if err := bm.Union(s.pending); err != nil {
			_ = bm.Close()
			return nil, msgErr(ReqSetMemTable, ErrProtocol, "growing the pending dirty log: %v", err)
		}
		old := s.pending
		s.release(old, func() { _ = old.Close() })
	} else {
		s.b.log.Info("vhost-user: LOG_ALL negotiated before SET_LOG_BASE; logging into a pending bitmap until the log arrives")
	}
	s.pending = bm
	return bm, nil
}

// memSpan is the end of the highest guest-physical region of the memory
// table: the span a log for this memory must cover. A region that ends at
// the top of the address space gives the largest span there is, which no
// log can cover (dirty.New refuses it), rather than one that wraps to 0.
func (s *session) memSpan() uint64 {
	var last uint64
	any := false
	if s.mem != nil && s.mem.mem != nil {
		for _, r := range s.mem.mem.Regions() {
			last, any = max(last, uint64(r.Last())), true
		}
	}
	if !any {
		return 1
	}
	return last + min(1, math.MaxUint64-last)
}

// mergePending ORs the pending bitmap into the front-end's log and drops
// it. Every running ring is stopped (setLog stopped them), so no write
// lands in the pending bitmap after the merge. The pending bitmap is a
// sparse memfd: the merge reads only what the rings wrote, and copies
// nothing, however large the memory table made it.
func (s *session) mergePending() error {
	if s.pending == nil {
		return nil
	}
	defer s.dropPending()
	n := s.pending.Count()
	// The log is the front-end's file: a front-end that truncates it
	// makes the writes fault (see flushLog).
	if err := vring.Guard(func() error { return s.log.Union(s.pending) }); err != nil {
		switch {
		case errors.Is(err, vring.ErrMemoryFault):
			return msgErr(ReqSetLogBase, ErrBadRegion, "merging the pending dirty log: log no longer backed by its file: %w", err)
		case errors.Is(err, dirty.ErrGeometry):
			return msgErr(ReqSetLogBase, ErrProtocol,
				"log of %#x bytes does not cover pages the rings wrote before it arrived: %v", s.log.Span(), err)
		}
		return msgErr(ReqSetLogBase, ErrProtocol, "merging the pending dirty log: %v", err)
	}
	s.b.log.Info("vhost-user: pending dirty log merged into the front-end's log", "pages", n)
	return nil
}

func (s *session) dropPending() {
	if old := s.pending; old != nil {
		s.release(old, func() { _ = old.Close() })
		s.pending = nil
	}
}

func (s *session) setVringAddr(a VringAddr) error {
	q, i, err := s.queue(ReqSetVringAddr, a.Index)
	if err != nil {
		return err
	}
	if a.Flags&^uint32(VringFLog) != 0 {
		return msgErr(ReqSetVringAddr, ErrProtocol, "queue %d unknown flags %#x", a.Index, a.Flags)
	}
	var running []int
	if q.running {
		// QEMU toggles VHOST_VRING_F_LOG on live rings when migration
		// starts or ends: restart the ring with the new addresses (with
		// every running ring, in the order that loses nothing).
		running = s.stopAllRunning()
	}
	prev, prevSet := q.addr, q.addrSet
	q.addr, q.addrSet = a, true
	if s.mem != nil {
		if _, err := s.layout(i); err != nil {
			q.addr, q.addrSet = prev, prevSet
			return err // the session ends; teardown stops the rest
		}
	}
	return s.restart(running)
}

func (s *session) setVringFd(m *Message) error {
	v := m.U64()
	q, i, err := s.queue(m.Request, uint32(v&VringIndexMask))
	if err != nil {
		return err
	}
	var e *vdpa.EventFD
	if v&VringNoFd == 0 {
		// Taken from the message only once adopted: a descriptor refused
		// (not an eventfd) stays with the message, which closes it.
		e, err = vdpa.EventFDFromFd(m.Fds[0])
		if err != nil {
			return &MessageError{Request: m.Request, Err: err}
		}
		m.TakeFd(0)
	}
	swap := func(slot **vdpa.EventFD) {
		if *slot != nil {
			_ = (*slot).Close()
		}
		*slot = e
	}
	switch m.Request {
	case ReqSetVringErr:
		swap(&q.errFd)
		return nil
	case ReqSetVringCall:
		var running []int
		if q.running {
			running = s.stopAllRunning()
		}
		swap(&q.call)
		return s.restart(running)
	}
	// SET_VRING_KICK starts the ring (spec: "start ring upon receiving a
	// kick"; a kick without descriptor means the back-end polls).
	var running []int
	if q.running {
		running = s.stopAllRunning()
	}
	swap(&q.kick)
	q.kicked = true
	if err := s.restart(running); err != nil {
		return err
	}
	return s.tryStart(i)
}

// layout translates queue i's ring addresses into a validated layout.
func (s *session) layout(i int) (vring.Layout, error) {
	q := &s.queues[i]
	mem := s.mem.mem
	desc, err := userToGuest(mem, "descriptor table", i, q.addr.Desc)
	if err != nil {
		return vring.Layout{}, err
	}
	avail, err := userToGuest(mem, "available ring", i, q.addr.Avail)
	if err != nil {
		return vring.Layout{}, err
	}
	used, err := userToGuest(mem, "used ring", i, q.addr.Used)
	if err != nil {
		return vring.Layout{}, err
	}
	l := vring.Layout{Size: q.num, Desc: desc, Avail: avail, Used: used}
	if q.num == 0 {
		return l, nil // size not yet known: checked at start
	}
	// The rings are as large as the negotiated features make them (as
	// Linux vhost sizes them); before SET_FEATURES, as large as any do.
	f := virtio.Features(0).With(virtio.FEventIdx)
	if s.featuresSet {
		f = s.features
	}
	if err := l.ValidateFor(f); err != nil {
		return l, msgErr(ReqSetVringAddr, ErrAddrNotMapped, "queue %d: %v", i, err)
	}
	ds, as, us := vring.RingSizes(q.num, f)
	for _, a := range []struct {
		g vring.GuestAddr
		n uint64
	}{{desc, ds}, {avail, as}, {used, us}} {
		if _, err := mem.Slice(a.g, a.n); err != nil {
			return l, msgErr(ReqSetVringAddr, ErrAddrNotMapped, "queue %d ring at %v+%#x: %v", i, a.g, a.n, err)
		}
	}
	return l, nil
}

// tryStart starts queue i when the spec's conditions hold: kicked (or
// polling), enabled, sized, addressed, memory mapped, features set, and
// not held by a SET_STATUS 0 without DRIVER_OK since.
func (s *session) tryStart(i int) error {
	if s.logFault != nil {
		return s.logFault // no ring starts with a log that faults
	}
	q := &s.queues[i]
	if q.running || q.broken || s.held || !q.kicked || !q.enabled || q.num == 0 || !q.addrSet || s.mem == nil || !s.featuresSet {
		return nil
	}
	if !s.handlerSet {
		dev := s.features &^ virtio.FProtocolFeat.Bit() &^ virtio.FLogAll.Bit()
		if err := s.h.SetFeatures(dev); err != nil {
			return &MessageError{Request: ReqSetFeatures, Err: fmt.Errorf("%w: %w", ErrDeviceFailed, err)}
		}
		s.handlerSet = true
	}
	l, err := s.layout(i)
	if err != nil {
		return err
	}
	var st vring.QueueState
	if q.saved != nil {
		st = *q.saved
	} else if s.features.Has(virtio.FRingPacked) {
		st = packedStart(q.base, q.baseSet, s.features)
		st = s.packedResync(i, l, st)
	} else {
		if q.base > 0xffff {
			return msgErr(ReqSetVringBase, ErrProtocol, "queue %d base %#x beyond 16 bits for a split ring", i, q.base)
		}
		st.NextAvail = uint16(q.base)
		// vhost-user carries only the avail index; the used index is
		// what the used ring says (the front-end restores it there).
		u, err := s.usedIdx(i)
		if err != nil {
			return msgErr(ReqSetVringKick, ErrAddrNotMapped, "queue %d used.idx: %v", i, err)
		}
		st.NextUsed = u
		if st.NextAvail != u {
			// A fresh ring has no chains in flight, so a base that
			// disagrees with used.idx cannot be resumed as is: DPDK's
			// virtio-user (server=1) reconnecting sends base 0 while
			// used.idx holds the old position; a base ahead of used.idx
			// names chains a previous back-end took and never
			// completed (they would never come back). Resynchronise
			// from used.idx, as DPDK's vhost library does; the driver
			// sees those chains served again.
			s.b.log.Warn("vhost-user: ring base disagrees with used.idx; resynchronised from used.idx",
				"queue", i, "base", st.NextAvail, "used_idx", u)
			st.NextAvail = u
			q.base = uint32(u)
		}
	}
	opts := vring.DeviceQueueOptions{Index: i, Layout: l, Features: s.features, State: st}
	rl, err := s.ringLog()
	if err != nil {
		return err
	}
	if rl != nil {
		// Each ring logs through its own cache, applied at every push
		// and flushed by halt once the handler has stopped the ring.
		opts.Log = rl.NewCache()
		// log_guest_addr relocates the logging of used-ring writes
		// (split). A packed ring's used descriptors are written into
		// the descriptor ring, which is not where log_guest_addr
		// points (QEMU sends the device area's address), and the ring
		// addresses here are guest-physical already (no IOTLB), so a
		// packed ring logs its writes at their own guest addresses.
		if q.addr.Flags&VringFLog != 0 && !s.features.Has(virtio.FRingPacked) {
			opts.UsedLogAddr = vring.GuestAddr(q.addr.Log)
		}
		if s.b.logHook != nil {
			if opts.Log = s.b.logHook(i, opts.Log); opts.Log == nil {
				opts.UsedLogAddr = 0
			}
		}
	}
	dq, err := vring.NewDeviceQueue(s.mem.mem, opts)
	if err != nil {
		if errors.Is(err, vring.ErrOutOfRange) || errors.Is(err, vring.ErrSpansRegions) {
			return msgErr(ReqSetVringKick, ErrAddrNotMapped, "queue %d: %v", i, err)
		}
		return msgErr(ReqSetVringKick, ErrProtocol, "queue %d: %v", i, err)
	}
	if err := s.h.StartQueue(i, dq, q.kick, q.call); err != nil {
		return &MessageError{Request: ReqSetVringKick, Err: fmt.Errorf("%w: start queue %d: %w", ErrDeviceFailed, i, err)}
	}
	q.dq, q.running, q.saved = dq, true, nil
	q.runs++
	return nil
}

// packedStart is the state a packed ring starts at from the SET_VRING_BASE
// word base (set reports whether one came since the last reset).
//
// Bits 0..15 are the next avail position (index and wrap counter) in the
// vhost-user and vhost encodings alike. Bits 16..31 are the used position
// as QEMU and Linux vhost send them; DPDK (virtio-user and its vhost
// library) leaves them zero and means "used equals avail": a stopped ring
// has no chains in flight. Zero there is therefore read as "same as
// avail"; the one real position it could also name (index 0, wrap counter
// 0, with chains still in flight) never reaches a back-end that completes
// every chain before GET_VRING_BASE answers, as this one does. What the
// ring itself records can still overrule it (packedResync).
func packedStart(base uint32, set bool, f virtio.Features) vring.QueueState {
	if !set {
		return vring.InitialState(f)
	}
	st := vring.QueueState{NextAvail: uint16(base), NextUsed: uint16(base >> 16)}
	if base>>16 == 0 {
		st.NextUsed = st.NextAvail
	}
	return st
}

// packedResync is the packed ring's counterpart of the split ring's
// resynchronisation from used.idx: a ring handed over with no chain in
// flight whose descriptor ring records a different used position (the
// run of used descriptors a vring.DeviceQueue wrote, see
// vring.PackedResumePosition for when a full ring's is taken) resumes
// from the recorded one. QEMU needs it
// after a back-end was lost: it cannot ask a dead back-end for the
// position (GET_VRING_BASE) and, unlike a split ring's used.idx, a packed
// ring has no index in guest memory to take it from, so it hands the new
// back-end the position of the last hand-over it saw, one the back-end
// before went past long ago: started there, the queue finds nothing
// available and stays dead. The resynchronisation is the expected way out
// of that, so it is noted (Info), not warned about. A driver that resets
// its rings zeroes them (§2.8.13; DPDK's virtio-user reconnecting in
// server mode too), which records no position, and a hand-over QEMU did
// see (stop/cont, migration) gives the position the ring records: both
// start where they are told. A ring whose used descriptors do not add up
// is started where it is told, with a warning.
func (s *session) packedResync(i int, l vring.Layout, st vring.QueueState) vring.QueueState {
	if st.NextAvail != st.NextUsed {
		return st // chains in flight: a hand-over that knew the position
	}
	pos, src, err := vring.PackedResumePosition(s.mem.mem, l, st.NextAvail)
	switch {
	case err != nil:
		s.b.log.Warn("vhost-user: packed ring's used descriptors unreadable; starting at the base given",
			"queue", i, "base", fmt.Sprintf("%#x", st.NextAvail), "err", err)
	case src != vring.NoPosition && pos != st.NextAvail:
		s.b.log.Info("vhost-user: packed ring base disagrees with the used position the ring records; resynchronised from the ring",
			"queue", i, "base", fmt.Sprintf("%#x", st.NextAvail), "ring", fmt.Sprintf("%#x", pos), "from", src.String())
		st = vring.QueueState{NextAvail: pos, NextUsed: pos}
		s.queues[i].base = uint32(pos)
	}
	return st
}

// usedIdx reads queue i's used.idx from guest memory.
func (s *session) usedIdx(i int) (uint16, error) {
	q := &s.queues[i]
	if s.mem == nil || !q.addrSet {
		return 0, fmt.Errorf("queue %d not addressed", i)
	}
	l, err := s.layout(i)
	if err != nil {
		return 0, err
	}
	var b [2]byte
	if err := s.mem.mem.Read(l.Used+2, b[:]); err != nil {
		return 0, err
	}
	return uint16(b[0]) | uint16(b[1])<<8, nil
}

// pauseQueue stops queue i and keeps its full state for a restart.
func (s *session) pauseQueue(i int) {
	q := &s.queues[i]
	if !q.running {
		return
	}
	st, ok := s.halt(i)
	if ok {
		q.saved = &st
	}
}

// flushLog applies the dirty-log marks the stopped ring i's logger still
// caches (see vring.LogFlusher), so that a log the front-end reads after
// the stop holds every write the ring made.
//
// The log is mapped from the front-end's file, which the front-end can
// truncate under the mapping when the file cannot be sealed against
// shrinking (a memfd made without MFD_ALLOW_SEALING, a tmpfs file): the
// write then faults (SIGBUS). The data path's workers recover such a
// fault (vring.CatchFault); here, on the session goroutine, the flush runs
// under vring.Guard, and a fault is recorded in logFault, which fails the
// request being served and ends the session, instead of killing the
// process. The marks are lost with the log.
func (s *session) flushLog(i int, dq *vring.DeviceQueue) {
	err := vring.Guard(dq.FlushLog)
	if err == nil {
		return
	}
	s.b.log.Warn("vhost-user: flushing the ring's dirty-log marks failed", "queue", i, "err", err)
	if errors.Is(err, vring.ErrMemoryFault) && s.logFault == nil {
		s.logFault = fmt.Errorf("%w: queue %d: dirty log no longer backed by its file (truncated by the front-end?): %w",
			ErrBadRegion, i, err)
	}
}

// handlerReset resets the handler, which stops every ring, and then
// flushes the marks of rings whose StopQueue had failed.
func (s *session) handlerReset() {
	s.h.Reset()
	for i := range s.queues {
		if q := &s.queues[i]; q.orphan != nil {
			s.flushLog(i, q.orphan)
			q.orphan, q.orphanUses = nil, [3]any{}
		}
	}
	for _, release := range s.retired {
		release()
	}
	clear(s.retired)
	s.retired = s.retired[:0]
}

// release runs fn, which unmaps guest memory or closes a dirty log (res)
// the session no longer uses, now, or after the next handler Reset while
// an orphan queue's handler may still be using res (see retired).
func (s *session) release(res any, fn func()) {
	for i := range s.queues {
		if q := &s.queues[i]; q.orphan != nil && slices.Contains(q.orphanUses[:], res) {
			s.retired = append(s.retired, fn)
			return
		}
	}
	fn()
}

// stopQueue stops queue i (GET_VRING_BASE, reset, disconnect); its next
// avail index becomes the base.
func (s *session) stopQueue(i int) {
	q := &s.queues[i]
	if !q.running {
		return
	}
	if st, ok := s.halt(i); ok {
		q.base, q.baseSet = vhostcore.VringBase(st, s.features), true
	}
	q.saved = nil
}

func (s *session) halt(i int) (vring.QueueState, bool) {
	q := &s.queues[i]
	st, err := s.h.StopQueue(i)
	dq := q.dq
	q.running, q.dq = false, nil
	if err != nil {
		// The handler may still be using dq: reading its state would
		// race with it and save a position nobody vouches for. The
		// queue is broken until a reset.
		s.b.log.Warn("vhost-user: stop queue failed; queue broken until reset", "queue", i, "err", err)
		q.broken, q.saved, q.orphan = true, nil, dq
		q.orphanUses = [3]any{s.mem, s.log, s.pending}
		s.signalErr(q)
		return vring.QueueState{}, false
	}
	s.flushLog(i, dq)
	qerr := dq.Err()
	if r, ok := s.h.(vdpa.QueueErrReporter); ok && qerr == nil {
		qerr = r.QueueErr(i)
	}
	if qerr != nil {
		s.b.log.Warn("vhost-user: queue failed", "queue", i, "err", qerr)
		s.signalErr(q)
	}
	return st, true
}

// errWatch is what the error watcher knows of a queue: its SET_VRING_ERR
// eventfd (nil: none, or the queue is not running) and which run of the
// queue it is for, so that a queue restarted with the same eventfd (a
// SET_MEM_TABLE, SET_VRING_CALL or SET_LOG_BASE restarts it) is signalled
// again when its new run breaks.
type errWatch struct {
	fd  *vdpa.EventFD
	run uint64
}

// errWatchInterval is how often the watcher asks a QueueErrReporter
// handler that does not announce errors (vdpa.QueueErrNotifier) about
// running queues that have a SET_VRING_ERR eventfd.
const errWatchInterval = 50 * time.Millisecond

// watchErrors signals a running queue's error eventfd once when the
// handler reports the queue broken. It reads only the published errFds
// snapshot; signalling an eventfd the session closed meanwhile fails
// harmlessly. It looks when the handler announces an error (a
// vdpa.QueueErrNotifier, such as softnet.Device) or, for a handler that
// cannot, every errWatchInterval; and whenever the snapshot changes, so
// that a queue that broke before its eventfd was published, or before the
// front-end sent one, is signalled when it is.
func (s *session) watchErrors(ctx context.Context, r vdpa.QueueErrReporter) {
	var notify <-chan struct{}
	var ticks <-chan time.Time
	if n, ok := r.(vdpa.QueueErrNotifier); ok {
		notify = n.QueueErrNotify()
	} else {
		t := time.NewTicker(errWatchInterval)
		defer t.Stop()
		ticks = t.C
	}
	var signalled []errWatch
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticks:
		case <-notify:
		case <-s.errWake:
		}
		p := s.errFds.Load()
		if p == nil {
			continue
		}
		fds := *p
		if len(signalled) != len(fds) {
			signalled = make([]errWatch, len(fds))
		}
		for q, e := range fds {
			if e.fd == nil || signalled[q] == e {
				continue // nothing to signal, or signalled in this run
			}
			if r.QueueErr(q) != nil {
				_ = e.fd.Signal()
				signalled[q] = e
			}
		}
	}
}

func (s *session) signalErr(q *vq) {
	if q.errFd != nil {
		_ = q.errFd.Signal()
	}
}

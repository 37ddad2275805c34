package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/vdpakit/vdpakit/internal/vhostcore"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// ReconnectOptions let a Frontend outlive its back-end (FrontendOptions.
// Reconnect): when the back-end goes away (its process restarted, the
// connection reset), the Frontend dials it again and hands the new back-end
// the whole session, as QEMU does for a vhost-user NIC whose back-end
// restarted (each ring in the order Resume restarts one):
//
//   - SET_OWNER, then the features, protocol features and queue count are
//     checked: the new back-end must offer every feature and protocol
//     feature the session negotiated (every feature offered before, when
//     none was negotiated yet), and at least as many queues
//     (ErrBackendChanged otherwise: the attempt fails and the next dials
//     again);
//   - SET_FEATURES, SET_MEM_TABLE and SET_LOG_BASE as last set;
//   - for every queue set up: SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE,
//     SET_VRING_CALL, SET_VRING_ERR and SET_VRING_KICK, then
//     SET_VRING_ENABLE for the enabled ones, and SET_STATUS.
//
// A started ring resumes where the guest's memory says its device got to,
// because the dead back-end could not say (no GET_VRING_BASE): a split ring
// at its used.idx (chains the old back-end had taken but not used are
// taken again: a frame it was transmitting may go out twice, and one it
// was writing into a receive buffer is lost with it), a packed
// ring at the used position its descriptors record where the old back-end
// recorded one (vring.PackedUsedPosition; this package's Backend records
// it), at the oldest available descriptor of a ring the driver keeps full
// of one-descriptor chains, else at the base last set (which is stale if
// the ring moved since: such a ring stays stopped, as with QEMU's own
// reconnect). A ring that Suspend stopped resumes at the position Suspend
// read, when Resume is called.
//
// While the back-end is away, Status returns the last status set (the
// device has not failed yet; the status replayed is that one too), and
// every other request waits, within its context, until the session is back
// or the Frontend gives up. A request whose connection failed under it is
// sent again once the session is back, and again after each further
// reconnect when the new back-end dies under it too, for up to Timeout
// from its first failure (it then returns its last connection error, or
// ErrSessionBroken when the Frontend gave up). The Frontend gives up after
// Timeout without a back-end that took the session: the session is then
// broken for good, as without Reconnect (ErrSessionBroken), and Status
// reports the error. The eventfds given for kicks, calls and errors
// are handed to each new back-end; notifications made while none ran are
// not lost (an eventfd counts them).
type ReconnectOptions struct {
	// Dial makes a new connection to the back-end, and must return when
	// its context ends (Close ends it, and waits). With Dial (the
	// function) nil means dialling the same path again; NewFrontend needs
	// it set.
	Dial func(ctx context.Context) (*net.UnixConn, error)
	// Interval is the wait between attempts; the least time from a
	// session's start (or its last takeover) to the first attempt after
	// it ends, up to half of Timeout (a session that ends at once, as
	// with a back-end that dies as soon as it took the session over, is
	// not dialled again at once, so a crash loop is paced); and how
	// often the connection is looked at to notice that the back-end has
	// gone when no request does (100 ms if zero).
	Interval time.Duration
	// Timeout is how long the Frontend tries before it gives up (30 s if
	// zero), and how long a request whose connection failed under it
	// keeps waiting for a back-end that answers it.
	Timeout time.Duration
	// Logger, if set, is told of each reconnect (Info) and of giving up
	// (Warn).
	Logger *slog.Logger
}

func (rc *ReconnectOptions) defaults() {
	if rc.Interval == 0 {
		rc.Interval = 100 * time.Millisecond
	}
	if rc.Timeout == 0 {
		rc.Timeout = 30 * time.Second
	}
	if rc.Logger == nil {
		rc.Logger = slog.New(slog.DiscardHandler)
	}
}

// DialPath returns a ReconnectOptions.Dial that dials the unix socket at
// path.
func DialPath(path string) func(ctx context.Context) (*net.UnixConn, error) {
	return func(ctx context.Context) (*net.UnixConn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			return nil, err
		}
		return c.(*net.UnixConn), nil
	}
}

// Reconnects returns how many times the Frontend took its session to a new
// back-end (FrontendOptions.Reconnect).
func (f *Frontend) Reconnects() uint64 { return f.reconnects.Load() }

func (f *Frontend) conn() *conn { return f.cc.Load() }

// awayCh returns the channel closed when the current reconnect ends, or
// nil when the Frontend is not reconnecting.
func (f *Frontend) awayCh() chan struct{} {
	f.rmu.Lock()
	defer f.rmu.Unlock()
	return f.away
}

// sessionState returns, read together, the channel of the reconnect in
// progress (nil: none) and why no request can be sent (nil: one can).
func (f *Frontend) sessionState() (away chan struct{}, err error) {
	if isClosed(f.done) {
		return nil, vdpa.ErrClosed
	}
	f.rmu.Lock()
	defer f.rmu.Unlock()
	if p := f.broken.Load(); p != nil {
		err = *p
	}
	return f.away, err
}

// waitFor waits, within ctx, for the reconnect whose channel is away to
// end.
func (f *Frontend) waitFor(ctx context.Context, away chan struct{}) error {
	select {
	case <-away:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-f.done:
		return vdpa.ErrClosed
	}
}

// markAway starts a reconnect, when the options ask for one: it returns
// the channel the reconnect closes when it ends, and records it as the
// current one. breakSession calls it with rmu held, once per break.
func (f *Frontend) markAway() chan struct{} {
	if f.opts.Reconnect == nil || !f.reconnectOn.Load() || isClosed(f.done) {
		return nil
	}
	f.bg.Add(1) // reconnectLoop's; Close closes done under rmu, then waits
	f.away = make(chan struct{})
	return f.away
}

// reconnectLoop dials until a back-end takes the session, Timeout passes or
// the Frontend is closed.
func (f *Frontend) reconnectLoop(rc *ReconnectOptions, cause error, away chan struct{}) {
	defer f.bg.Done()
	start := time.Now()
	deadline := start.Add(rc.Timeout)
	var last error
	attempts := 0
	// end closes away and, in the same step under rmu, marks the session
	// back (joined) or given up (failed), so that a request never sees
	// one without the other.
	end := func(joined bool, failed error) {
		var gave error
		if failed != nil {
			gave = fmt.Errorf("%w (connection closed, %w): %w; no back-end took the session over in %v (%d attempts; the last: %w)",
				ErrSessionBroken, vdpa.ErrClosed, cause, rc.Timeout, attempts, failed)
		}
		f.rmu.Lock()
		switch {
		case joined:
			f.broken.Store(nil)
			f.joined = time.Now()
		case gave != nil:
			f.broken.Store(&gave)
		}
		close(away)
		if f.away == away {
			f.away = nil
		}
		f.rmu.Unlock()
		if gave != nil {
			rc.Logger.Warn("vhost-user back-end did not come back", "err", gave)
		}
	}
	// A session that ended, for whatever reason, within Interval of its
	// start is not dialled again at once: a back-end that takes the
	// session over and dies at once, in a loop, would otherwise be
	// dialled and replayed to as fast as it restarts and a request
	// notices. One that lived longer (a single restart) is dialled at
	// once. The pause takes at most half of Timeout, so that an Interval
	// as long as Timeout still leaves time for an attempt.
	f.rmu.Lock()
	pause := min(rc.Interval-time.Since(f.joined), rc.Timeout/2)
	f.rmu.Unlock()
	f.sleep(pause)
	for {
		if isClosed(f.done) {
			end(false, nil)
			return
		}
		if time.Now().After(deadline) {
			if last == nil {
				last = errors.New("no attempt")
			}
			end(false, last)
			return
		}
		attempts++
		err := f.tryRejoin(rc, deadline)
		if err == nil {
			n := f.reconnects.Add(1)
			end(true, nil)
			rc.Logger.Info("vhost-user back-end reconnected", "after", time.Since(start).Round(time.Millisecond),
				"attempts", attempts, "reconnects", n, "cause", cause)
			return
		}
		if errors.Is(err, vdpa.ErrClosed) && isClosed(f.done) {
			end(false, nil)
			return
		}
		// An attempt the deadline cut short says less than the one before
		// it (a back-end refused as changed, a dial refused): keep that.
		if last == nil || !errors.Is(err, context.DeadlineExceeded) {
			last = err
		}
		f.sleep(rc.Interval)
	}
}

// sleep waits for d (nothing when d <= 0), or until the Frontend is closed.
func (f *Frontend) sleep(d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-f.done:
	}
}

// tryRejoin is one attempt: dial, then take the turn and hand the session
// over. The session stays marked broken until it succeeds, so no other
// request runs meanwhile (they wait in acquire).
func (f *Frontend) tryRejoin(rc *ReconnectOptions, deadline time.Time) error {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	go func() { // Close ends a dial or a replay in progress
		select {
		case <-f.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	uc, err := rc.Dial(ctx)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	select {
	case f.turn <- struct{}{}:
	case <-f.done:
		uc.Close()
		return vdpa.ErrClosed
	}
	defer f.release()
	c := newConn(uc)
	f.cc.Store(c)
	if isClosed(f.done) { // Close may have closed the previous connection
		_ = c.close()
		return vdpa.ErrClosed
	}
	f.rejoining = true
	err = f.rejoin(ctx)
	f.rejoining = false
	if err != nil {
		_ = c.close()
		return err
	}
	return nil // reconnectLoop marks the session back
}

// rejoin hands the session to the back-end on the new connection. The
// caller holds the turn.
func (f *Frontend) rejoin(ctx context.Context) error {
	proto := f.proto
	devF, _, nq, err := f.negotiate(ctx, &proto)
	if err != nil {
		return err
	}
	need := f.acked
	if need == 0 {
		// Nothing negotiated yet: Features reported the first offer, and
		// a driver may yet accept any of it.
		need = f.devF
	}
	if lost := need &^ devF; lost != 0 {
		return fmt.Errorf("%w: it no longer offers features %#x", ErrBackendChanged, uint64(lost))
	}
	if nq < f.nq {
		return fmt.Errorf("%w: %d queues, the session has %d", ErrBackendChanged, nq, f.nq)
	}
	if f.acked != 0 {
		if err := f.send(ctx, ReqSetFeatures, putU64(uint64(f.acked)), nil); err != nil {
			return err
		}
	}
	if f.mem != nil {
		if err := f.sendMemTable(ctx, f.mem); err != nil {
			return err
		}
	}
	if f.log != nil {
		if err := f.sendLogBase(ctx, f.log); err != nil {
			return err
		}
	}
	for i := range f.queues {
		if err := f.rejoinQueue(ctx, i); err != nil {
			return err
		}
	}
	if f.acked.Has(virtio.FProtocolFeat) {
		for i := range f.queues {
			if f.queues[i].enabled {
				if err := f.send(ctx, ReqSetVringEnable, VringState{Index: uint32(i), Num: 1}.Encode(), nil); err != nil {
					return err
				}
			}
		}
	}
	if st := f.status.Load(); f.proto.Has(PFStatus) && st != 0 {
		if err := f.send(ctx, ReqSetStatus, putU64(uint64(st)), nil); err != nil {
			return err
		}
	}
	return nil
}

// rejoinQueue sets queue i up on the new back-end as it was, and starts it
// if it ran.
func (f *Frontend) rejoinQueue(ctx context.Context, i int) error {
	fq := &f.queues[i]
	if err := f.sendNumAddr(ctx, i); err != nil {
		return err
	}
	base, baseOK := fq.base, fq.baseSet
	if fq.kickSet && fq.addrSet && f.mem != nil {
		st, from, err := f.ringPosition(i)
		if err != nil {
			return err
		}
		f.opts.Reconnect.Logger.Info("vhost-user ring resumes", "queue", i, "at", st.NextAvail, "from", from)
		base, baseOK = st, true
	}
	if baseOK {
		if err := f.send(ctx, ReqSetVringBase, VringState{Index: uint32(i), Num: vhostcore.VringBase(base, f.acked)}.Encode(), nil); err != nil {
			return err
		}
		fq.base = base
	}
	if fq.callSet {
		if err := f.setFd(ctx, ReqSetVringCall, i, fq.call); err != nil {
			return err
		}
	}
	if fq.errSet {
		if err := f.setFd(ctx, ReqSetVringErr, i, fq.errFd); err != nil {
			return err
		}
	}
	if fq.kickSet {
		if err := f.setFd(ctx, ReqSetVringKick, i, fq.kick); err != nil {
			return err
		}
	}
	return nil
}

// sendNumAddr sends queue i's size (SET_VRING_NUM, when one was set) and
// ring addresses (SET_VRING_ADDR, when set) again: a restarted ring's first
// steps (Resume, a reconnect).
func (f *Frontend) sendNumAddr(ctx context.Context, i int) error {
	fq := &f.queues[i]
	if fq.num != 0 {
		if err := f.send(ctx, ReqSetVringNum, VringState{Index: uint32(i), Num: uint32(fq.num)}.Encode(), nil); err != nil {
			return err
		}
	}
	if !fq.addrSet {
		return nil
	}
	va, err := f.vringAddr(i, fq.addr)
	if err != nil {
		return err
	}
	return f.send(ctx, ReqSetVringAddr, va.Encode(), nil)
}

// ringPosition is where started queue i resumes on a new back-end: what
// the guest's memory says the device got to (see ReconnectOptions), and
// where that came from.
func (f *Frontend) ringPosition(i int) (vring.QueueState, string, error) {
	fq := &f.queues[i]
	if f.acked.Has(virtio.FRingPacked) {
		l := vring.Layout{Size: fq.num, Desc: fq.addr.Desc, Avail: fq.addr.Avail, Used: fq.addr.Used}
		base := fq.base.NextUsed
		if !fq.baseSet {
			base = vring.InitialState(f.acked).NextUsed
		}
		// The base last set is stale as soon as the ring moved after it,
		// and it is the only thing this side knows: what the ring
		// records wins, an OldestAvailable position included (unlike
		// PackedResumePosition, which a back-end uses to check a base
		// its front-end read from the device itself).
		pos, src, err := vring.PackedUsedPosition(f.mem, l)
		from := "ring: " + src.String()
		if err != nil || src == vring.NoPosition {
			pos, from = base, "the base last set (the ring records none)"
			if err != nil {
				from = fmt.Sprintf("the base last set (the ring: %v)", err)
			}
		}
		return vring.QueueState{NextAvail: pos, NextUsed: pos}, from, nil
	}
	var b [2]byte
	if err := f.mem.Read(fq.addr.Used+2, b[:]); err != nil {
		return vring.QueueState{}, "", fmt.Errorf("%w: queue %d's used.idx at %v: %w", ErrAddrNotMapped, i, fq.addr.Used+2, err)
	}
	u := uint16(b[0]) | uint16(b[1])<<8
	return vring.QueueState{NextAvail: u, NextUsed: u}, "used.idx", nil
}

// awaitRejoin waits, within ctx, for the reconnect that the caller's
// failed request started, and reports whether the session is back. The
// caller holds the turn; it gives it up meanwhile (the reconnect needs it)
// and holds it again on return, whatever the outcome: taking it back may
// outlast ctx by what its holder takes (a request, bounded by its own
// context and FrontendOptions.Timeout, or a reconnect's replay, bounded by
// ReconnectOptions.Timeout).
func (f *Frontend) awaitRejoin(ctx context.Context) error {
	f.release()
	for {
		away, err := f.sessionState()
		if away != nil {
			if werr := f.waitFor(ctx, away); werr != nil {
				f.turn <- struct{}{}
				return werr
			}
			continue
		}
		f.turn <- struct{}{}
		if err != nil {
			return err
		}
		if away, err = f.sessionState(); away == nil && err == nil {
			return nil
		}
		// Broken again before this caller had the turn.
		f.release()
	}
}

// errPeerGone is the cause of a session the back-end left: it closed or
// reset the connection.
var errPeerGone = errors.New("the back-end closed the connection")

// watchPeer looks at the connection every interval, between and during
// requests, and breaks the session (which starts the reconnect) as soon as
// the back-end has gone: a Frontend whose rings run with no request to
// send would not otherwise notice. It runs with Reconnect set, until Close.
func (f *Frontend) watchPeer(every time.Duration) {
	defer f.bg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-f.done:
			return
		case <-t.C:
		}
		f.checkPeer()
	}
}

// checkPeer is one look of watchPeer: it breaks the session when the
// back-end has gone, unless a request on the socket has bytes the
// back-end sent before it went still to read (its own read then meets
// the end of the stream).
func (f *Frontend) checkPeer() {
	if f.broken.Load() != nil {
		return // reconnecting, or given up
	}
	c := f.conn()
	switch c.peerGone() {
	case peerThere:
		return
	case peerGoneUnread:
		// A reply a request on the socket is about to read, or, with no
		// request there (the turn is free), bytes nobody asked for and
		// nobody will read.
		select {
		case f.turn <- struct{}{}:
			f.release()
		default:
			return // a request holds the turn: its read decides
		}
	}
	// breakSession ignores c if a reconnect replaced it meanwhile.
	if !isClosed(f.done) {
		f.breakSession(c, errPeerGone)
	}
}

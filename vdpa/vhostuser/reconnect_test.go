package vhostuser

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// restartable is a back-end "process" a test can kill and start again:
// each start is a fresh Backend and handler serving one end of a new
// socketpair, whose other end Dial hands the Frontend.
type restartable struct {
	t        *testing.T
	mode     vhostusertest.Mode
	features virtio.Features // the handler's offer is limited to these (0: all)
	mu       sync.Mutex
	cur      *restartInstance
	all      []*restartInstance
	refuse   bool // Dial fails, as when no back-end listens
	// wrap, if set, makes each start's handler from the test handler and
	// the back-end's end of the connection (set before the first start).
	wrap func(h *vhostusertest.Handler, be *net.UnixConn) vdpa.Handler
}

type restartInstance struct {
	h      *vhostusertest.Handler
	rec    *msgRecorder
	be     *Backend
	cancel context.CancelFunc
	done   chan struct{} // closed when ServeConn returned
}

func newRestartable(t *testing.T, mode vhostusertest.Mode) *restartable {
	r := &restartable{t: t, mode: mode}
	t.Cleanup(func() {
		if t.Failed() {
			r.mu.Lock()
			for i, in := range r.all {
				_, warns := in.rec.snapshot()
				t.Logf("back-end %d: warnings %q, notes %q", i, warns, in.rec.notes())
			}
			r.mu.Unlock()
		}
	})
	t.Cleanup(func() {
		r.mu.Lock()
		all := append([]*restartInstance(nil), r.all...)
		r.mu.Unlock()
		for _, in := range all {
			in.cancel()
			<-in.done
		}
	})
	return r
}

// start serves a new back-end and returns the Frontend's end.
func (r *restartable) start() *net.UnixConn {
	a, b := socketpair(r.t)
	h := vhostusertest.New(r.mode, [6]byte{2, 0, 0, 0, 0, 1})
	var hd vdpa.Handler = h
	if r.features != 0 {
		hd = limitFeatures{h, r.features}
	}
	if r.wrap != nil {
		hd = r.wrap(h, b)
	}
	rec := &msgRecorder{}
	in := &restartInstance{h: h, rec: rec, be: NewBackend(hd, &BackendOptions{Logger: slog.New(rec)}), done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	in.cancel = cancel
	go func() { _ = in.be.ServeConn(ctx, b); close(in.done) }()
	r.mu.Lock()
	r.cur = in
	r.all = append(r.all, in)
	r.mu.Unlock()
	return a
}

// kill ends the current back-end as a crash would: its session closes.
func (r *restartable) kill() {
	r.mu.Lock()
	in := r.cur
	r.mu.Unlock()
	in.cancel()
	<-in.done
}

func (r *restartable) current() *restartInstance {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur
}

// dial is ReconnectOptions.Dial: a new back-end, unless refused.
func (r *restartable) dial(ctx context.Context) (*net.UnixConn, error) {
	r.mu.Lock()
	refuse := r.refuse
	r.mu.Unlock()
	if refuse {
		return nil, errors.New("connection refused")
	}
	return r.start(), nil
}

// limitFeatures offers only some of a handler's features (a back-end
// restarted with another configuration).
type limitFeatures struct {
	*vhostusertest.Handler
	f virtio.Features
}

func (l limitFeatures) Features() virtio.Features { return l.Handler.Features() & l.f }

// loopRound sends n frames and checks that each came back on the receive
// queue, byte for byte.
func loopRound(t *testing.T, d *testDriver, tag byte, n int) {
	t.Helper()
	rxBufs := map[uint32]vring.GuestAddr{}
	for i := 0; i < n; i++ {
		a := d.alloc()
		head, err := d.dqs[0].Add([]vring.Buffer{{Addr: a, Len: bufSize, Writable: true}})
		require.NoError(t, err)
		rxBufs[uint32(head)] = a
	}
	d.dqs[0].Publish()
	require.NoError(t, d.kicks[0].Signal())
	for i := 0; i < n; i++ {
		f := make([]byte, 60)
		f[0], f[1], f[59] = tag, byte(i), 0xab
		d.send(f)
	}
	assert.Len(t, d.reclaim(1, n), n)
	rx := d.reclaim(0, n)
	for i, u := range rx {
		require.Equal(t, uint32(d.hdrLen+60), u[1], "round %d frame %d length", tag, i)
		b := make([]byte, u[1])
		a, ok := rxBufs[u[0]]
		require.True(t, ok, "round %d: used id %d names no buffer posted this round", tag, u[0])
		require.NoError(t, d.mem.Read(a, b))
		assert.Equal(t, []byte{tag, byte(i)}, b[d.hdrLen:d.hdrLen+2], "round %d frame %d", tag, i)
	}
}

// TestFrontendReconnect kills the back-end under a running session, twice,
// and checks that the Frontend (FrontendOptions.Reconnect) notices with no
// request of its own, hands the whole session to the new back-end and that
// frames flow again: on split rings (resumed at used.idx) and packed ones
// (resumed at the position the used descriptors record). Status keeps
// reporting the device as running through each restart.
func TestFrontendReconnect(t *testing.T) {
	ringFormats(t, vhostusertest.New(vhostusertest.Loopback, [6]byte{}).Features(), testFrontendReconnect)
}

func testFrontendReconnect(t *testing.T, want virtio.Features) {
	r := newRestartable(t, vhostusertest.Loopback)
	reg, err := vring.NewMemfdRegion(0x100000, 4<<20, nil)
	require.NoError(t, err)
	d := newTestDriverOpts(t, r.start(), want, &FrontendOptions{Reconnect: &ReconnectOptions{Dial: r.dial, Interval: 10 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(tlogWriter{t}, nil))}}, reg)
	// Close ends the reconnect's goroutines before the back-ends go
	// (cleanups run last first).
	t.Cleanup(func() { _ = d.fe.Close() })
	d.startQueue(0)
	d.startQueue(1)
	running := virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK
	require.NoError(t, d.fe.SetStatus(running))
	loopRound(t, d, 1, 5)

	for round := 1; round <= 2; round++ {
		old := r.current()
		r.kill()
		require.Eventually(t, func() bool { return d.fe.Reconnects() == uint64(round) }, 10*time.Second, 5*time.Millisecond,
			"round %d: the Frontend reconnected on its own", round)
		st, err := d.fe.Status()
		require.NoError(t, err)
		assert.Equal(t, running, st, "round %d: status after the reconnect", round)
		in := r.current()
		require.NotSame(t, old, in)
		info := in.be.Info()
		assert.Equal(t, d.features.With(virtio.FProtocolFeat), info.Features, "round %d: features handed over", round)
		assert.Equal(t, 2, info.RunningQueues, "round %d: both rings started", round)
		// The bases handed over are the rings' own positions: the new
		// back-end (which checks them against the ring) had nothing to
		// correct.
		for _, n := range in.rec.notes() {
			assert.NotContains(t, n, "resynchronised", "round %d: the base handed over was not the ring's position", round)
		}
		_, warns := in.rec.snapshot()
		assert.Empty(t, warns, "round %d: new back-end's warnings", round)
		loopRound(t, d, byte(1+round), 5+round)
		c := in.h.Counters()
		assert.Equal(t, uint64(5+round), c.TxFrames, "round %d: frames the new back-end took", round)
		assert.Equal(t, uint64(5+round), c.RxFrames, "round %d: frames the new back-end delivered", round)
	}
	// The position handed over is where the old back-end stopped: a
	// GET_VRING_BASE now reports every chain of the three rounds.
	qs, err := d.fe.QueueBase(1)
	require.NoError(t, err)
	pos := positionAfter(d.features, 5+6+7)
	assert.Equal(t, vring.QueueState{NextAvail: pos, NextUsed: pos}, qs)
}

// A back-end that does not come back within Timeout: the Frontend gives up,
// Status and every request fail with ErrSessionBroken, naming the last
// attempt's error.
func TestFrontendReconnectGivesUp(t *testing.T) {
	r := newRestartable(t, vhostusertest.Loopback)
	d := newTestDriverOpts(t, r.start(), virtio.Features(0).With(virtio.FVersion1),
		&FrontendOptions{Reconnect: &ReconnectOptions{Dial: r.dial, Interval: 10 * time.Millisecond, Timeout: 200 * time.Millisecond}}, mustRegion(t))
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	r.mu.Lock()
	r.refuse = true
	r.mu.Unlock()
	r.kill()
	start := time.Now()
	// A request made meanwhile waits for the outcome.
	err := d.fe.SetQueueNum(0, testQueueSize)
	assert.ErrorIs(t, err, ErrSessionBroken)
	assert.ErrorContains(t, err, "connection refused")
	assert.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond, "the request waited for the reconnect to give up")
	_, err = d.fe.Status()
	assert.ErrorIs(t, err, ErrSessionBroken)
	assert.ErrorIs(t, err, vdpa.ErrClosed)
	assert.Zero(t, d.fe.Reconnects())
}

// A restarted back-end that no longer offers a feature the session
// negotiated cannot take it over: each attempt fails with
// ErrBackendChanged, and the Frontend gives up.
func TestFrontendReconnectRefusesChangedBackend(t *testing.T) {
	r := newRestartable(t, vhostusertest.Loopback)
	want := virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx)
	d := newTestDriverOpts(t, r.start(), want,
		&FrontendOptions{Reconnect: &ReconnectOptions{Dial: r.dial, Interval: 10 * time.Millisecond, Timeout: time.Second}}, mustRegion(t))
	require.True(t, d.features.Has(virtio.FEventIdx))
	d.startQueue(0)
	d.startQueue(1)
	r.mu.Lock()
	r.features = ^virtio.FEventIdx.Bit()
	r.mu.Unlock()
	r.kill()
	err := d.fe.EnableQueue(0, true)
	assert.ErrorIs(t, err, ErrSessionBroken)
	assert.ErrorIs(t, err, ErrBackendChanged)
	assert.Zero(t, d.fe.Reconnects())
	r.mu.Lock()
	n := len(r.all)
	r.mu.Unlock()
	assert.Greater(t, n, 2, "attempts made")
}

// Close while the Frontend reconnects: waiting requests return
// vdpa.ErrClosed and the reconnect loop ends.
func TestFrontendReconnectClose(t *testing.T) {
	r := newRestartable(t, vhostusertest.Loopback)
	d := newTestDriverOpts(t, r.start(), virtio.Features(0).With(virtio.FVersion1),
		&FrontendOptions{Reconnect: &ReconnectOptions{Dial: r.dial, Interval: 10 * time.Millisecond, Timeout: time.Minute}}, mustRegion(t))
	r.mu.Lock()
	r.refuse = true
	r.mu.Unlock()
	r.kill()
	require.Eventually(t, func() bool { return d.fe.awayCh() != nil }, 5*time.Second, 5*time.Millisecond)
	errc := make(chan error, 1)
	go func() { errc <- d.fe.SetQueueNum(0, testQueueSize) }()
	time.Sleep(30 * time.Millisecond)
	require.NoError(t, d.fe.Close())
	select {
	case err := <-errc:
		assert.ErrorIs(t, err, vdpa.ErrClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("a request waiting for the reconnect did not return after Close")
	}
	require.Eventually(t, func() bool { return d.fe.awayCh() == nil }, 5*time.Second, 5*time.Millisecond, "the reconnect loop ended")
}

func mustRegion(t *testing.T) *vring.Region {
	reg, err := vring.NewMemfdRegion(0x100000, 4<<20, nil)
	require.NoError(t, err)
	return reg
}

// Options: Reconnect needs a Dial with NewFrontend, and sane durations.
func TestFrontendReconnectOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		rc   ReconnectOptions
	}{
		{"no dial", ReconnectOptions{}},
		{"negative interval", ReconnectOptions{Dial: DialPath("/nonexistent"), Interval: -1}},
		{"negative timeout", ReconnectOptions{Dial: DialPath("/nonexistent"), Timeout: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, _ := socketpair(t)
			_, err := NewFrontend(context.Background(), a, &FrontendOptions{Reconnect: &tc.rc})
			assert.ErrorIs(t, err, ErrBadOptions)
		})
	}
}

// Back-ends that die again right after taking the session over (a crash
// loop), then one that stays: every break starts a reconnect of its own,
// none is lost or closes another's wait, and traffic flows in the end.
func TestFrontendReconnectCrashLoop(t *testing.T) {
	ringFormats(t, vhostusertest.New(vhostusertest.Loopback, [6]byte{}).Features(), func(t *testing.T, want virtio.Features) {
		r := newRestartable(t, vhostusertest.Loopback)
		flaky := 4 // only the reconnect loop dials: no lock needed
		dial := func(ctx context.Context) (*net.UnixConn, error) {
			c, err := r.dial(ctx)
			if err == nil && flaky > 0 {
				flaky--
				in, after := r.current(), time.Duration(flaky)*time.Millisecond
				go func() { time.Sleep(after); in.cancel() }()
			}
			return c, err
		}
		d := newTestDriverOpts(t, r.start(), want, &FrontendOptions{Reconnect: &ReconnectOptions{Dial: dial, Interval: 2 * time.Millisecond}}, mustRegion(t))
		d.startQueue(0)
		d.startQueue(1)
		require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
		loopRound(t, d, 1, 4)
		r.kill()
		// Requests made through the crash loop wait for a back-end that
		// stays, and succeed.
		for i := 0; i < 20; i++ {
			_, err := d.fe.Status()
			require.NoError(t, err)
			require.NoError(t, d.fe.EnableQueue(0, true))
			time.Sleep(time.Millisecond)
		}
		require.Eventually(t, func() bool {
			r.mu.Lock()
			n := len(r.all)
			r.mu.Unlock()
			// The first back-end, the four that die, and one that stays.
			return n >= 6 && d.fe.awayCh() == nil && r.current().be.Info().RunningQueues == 2
		}, 10*time.Second, 5*time.Millisecond, "a back-end that stays took the session")
		loopRound(t, d, 2, 4)
		assert.GreaterOrEqual(t, d.fe.Reconnects(), uint64(1))
		require.NoError(t, d.fe.Close()) // before the test's eventfds close
	})
}

// tlogWriter writes log lines into the test's log.
type tlogWriter struct{ t *testing.T }

func (w tlogWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// A break reported for a connection a reconnect has already replaced is
// stale: the watcher or a request may find the old connection failed
// after the reconnect stored the new one. It must neither start another
// reconnect nor close the new connection (CI once saw the break's close
// land on the new back-end's connection, just after it took the session).
func TestFrontendStaleBreakLeavesNewSession(t *testing.T) {
	r := newRestartable(t, vhostusertest.Loopback)
	d := newTestDriverOpts(t, r.start(), virtio.Features(0).With(virtio.FVersion1),
		&FrontendOptions{Reconnect: &ReconnectOptions{Dial: r.dial, Interval: 10 * time.Millisecond}}, mustRegion(t))
	t.Cleanup(func() { _ = d.fe.Close() })
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	loopRound(t, d, 1, 3)
	old := d.fe.conn()
	r.kill()
	require.Eventually(t, func() bool { return d.fe.Reconnects() == 1 }, 10*time.Second, 5*time.Millisecond, "the Frontend reconnected")
	in := r.current()
	require.NotSame(t, old, d.fe.conn())

	for _, cause := range []error{errPeerGone, errors.New("write: broken pipe")} {
		d.fe.breakSession(old, cause)
		assert.Nil(t, d.fe.broken.Load(), "a stale break (%v) left the session as it was", cause)
		assert.Nil(t, d.fe.awayCh(), "a stale break (%v) started no reconnect", cause)
	}
	require.NoError(t, d.fe.EnableQueue(0, true))
	loopRound(t, d, 2, 4)
	assert.Equal(t, uint64(1), d.fe.Reconnects())
	assert.Same(t, in, r.current(), "no back-end was dialled after the stale breaks")
	c := in.h.Counters()
	assert.Equal(t, uint64(4), c.TxFrames, "frames the new back-end took")
	assert.Equal(t, uint64(4), c.RxFrames, "frames the new back-end delivered")
	require.NoError(t, d.fe.Close())
}

// crashOnConfigWrite is a back-end that dies (its connection closes) when
// told to write its configuration, while the shared count of such deaths
// to come is above zero; the first that outlives it takes the write.
type crashOnConfigWrite struct {
	*vhostusertest.Handler
	be      *net.UnixConn
	crashes *atomic.Int32 // deaths to come
	writes  *atomic.Int32 // SET_CONFIG requests seen, by every back-end
}

func (c crashOnConfigWrite) WriteConfig(off int, p []byte) error {
	c.writes.Add(1)
	if c.crashes.Add(-1) >= 0 {
		_ = c.be.Close() // the Frontend reads no reply: end of stream
	}
	return nil
}

// newCrashingRestartable returns a restartable whose back-ends die at the
// SET_CONFIG that reaches them, the first crashes of them (crashOnConfigWrite),
// and the count of SET_CONFIG requests they all saw.
func newCrashingRestartable(t *testing.T, crashes int32) (*restartable, *atomic.Int32) {
	left, writes := new(atomic.Int32), new(atomic.Int32)
	left.Store(crashes)
	r := newRestartable(t, vhostusertest.Loopback)
	r.wrap = func(h *vhostusertest.Handler, be *net.UnixConn) vdpa.Handler {
		return crashOnConfigWrite{Handler: h, be: be, crashes: left, writes: writes}
	}
	return r, writes
}

// A request whose back-end dies under it again and again (each new one
// takes the session, then dies when the request comes to it) is sent to
// each in turn until one answers, within ReconnectOptions.Timeout.
func TestFrontendRequestOutlivesCrashLoop(t *testing.T) {
	r, writes := newCrashingRestartable(t, 3)
	d := newTestDriverOpts(t, r.start(), virtio.Features(0).With(virtio.FVersion1),
		&FrontendOptions{Reconnect: &ReconnectOptions{Dial: r.dial, Interval: 5 * time.Millisecond, Timeout: 5 * time.Second}}, mustRegion(t))
	t.Cleanup(func() { _ = d.fe.Close() })
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))

	require.NoError(t, d.fe.WriteConfig(0, []byte{2, 0, 0, 0, 0, 9}), "the write outlived three back-ends")
	assert.Equal(t, int32(4), writes.Load(), "the write went to the first back-end and to each of the three that followed")
	assert.Equal(t, uint64(3), d.fe.Reconnects())
	// A back-end "dies" here by closing its connection; its rings run
	// until its session ends. Wait for that, as for a dead process, so
	// that the frames go to the back-end that stayed.
	r.mu.Lock()
	dead := append([]*restartInstance(nil), r.all[:len(r.all)-1]...)
	r.mu.Unlock()
	for _, in := range dead {
		<-in.done
	}
	loopRound(t, d, 1, 4)
	c := r.current().h.Counters()
	assert.Equal(t, uint64(4), c.TxFrames, "frames the last back-end took")
	require.NoError(t, d.fe.Close())
}

// A back-end that takes the session over and dies at once, again and
// again, is not dialled again at once: each attempt comes at least
// ReconnectOptions.Interval after the session it follows started, so a
// crash loop does not turn into a busy loop of dials and replays. Here
// three back-ends die as the request under the crash loop reaches them,
// each as soon as it took the session.
func TestFrontendReconnectPacesCrashLoop(t *testing.T) {
	const interval = 50 * time.Millisecond
	r, writes := newCrashingRestartable(t, 3)
	var dials []time.Time // only the reconnect loop dials, one at a time
	dial := func(ctx context.Context) (*net.UnixConn, error) {
		dials = append(dials, time.Now())
		return r.dial(ctx)
	}
	start := time.Now() // before the first session started
	d := newTestDriverOpts(t, r.start(), virtio.Features(0).With(virtio.FVersion1),
		&FrontendOptions{Reconnect: &ReconnectOptions{Dial: dial, Interval: interval, Timeout: 5 * time.Second}}, mustRegion(t))
	t.Cleanup(func() { _ = d.fe.Close() })
	require.NoError(t, d.fe.WriteConfig(0, []byte{2, 0, 0, 0, 0, 9}), "the write outlived three back-ends")
	require.Equal(t, int32(4), writes.Load())
	require.Equal(t, uint64(3), d.fe.Reconnects())
	require.NoError(t, d.fe.Close()) // no dial runs after it returned
	require.Len(t, dials, 3)
	// Each session started after the dial that made it (the first after
	// start), and the next dial waited Interval from that start.
	prev := start
	for i, at := range dials {
		assert.GreaterOrEqual(t, at.Sub(prev), interval, "dial %d came %v after the one before", i+1, at.Sub(prev))
		prev = at
	}
}

// The pause before dialling again takes at most half of Timeout: with an
// Interval longer than Timeout, a session that ends at once is still
// taken to a new back-end (the pause of a whole Interval would leave no
// time for an attempt, and the Frontend would give up without one).
func TestFrontendReconnectPauseLeavesTimeToDial(t *testing.T) {
	r, writes := newCrashingRestartable(t, 1)
	d := newTestDriverOpts(t, r.start(), virtio.Features(0).With(virtio.FVersion1),
		&FrontendOptions{Reconnect: &ReconnectOptions{Dial: r.dial, Interval: 10 * time.Second, Timeout: 3 * time.Second}}, mustRegion(t))
	t.Cleanup(func() { _ = d.fe.Close() })
	require.NoError(t, d.fe.WriteConfig(0, []byte{2, 0, 0, 0, 0, 9}), "the write went to the back-end that followed")
	assert.Equal(t, int32(2), writes.Load())
	assert.Equal(t, uint64(1), d.fe.Reconnects())
	require.NoError(t, d.fe.Close())
}

// A request under a back-end that dies at every attempt gives up once
// ReconnectOptions.Timeout has passed since its first failure, with its
// own connection error: it neither loops for ever nor waits out a
// reconnect that began before its time was up. Here two slow back-ends
// (120 ms to dial) take the session and die, and the third reconnect,
// starting at about 250 ms, finds no back-end until it gives up at about
// 1250 ms; the request stops at 1 s. (With a Timeout of 300 ms, a loaded
// TCG guest once took the second back-end past the request's limit.)
func TestFrontendRequestGivesUpOnCrashLoop(t *testing.T) {
	r, writes := newCrashingRestartable(t, math.MaxInt32)
	slow := 2 // only the reconnect loop dials: no lock needed
	dial := func(ctx context.Context) (*net.UnixConn, error) {
		if slow == 0 {
			return nil, errors.New("connection refused")
		}
		slow--
		select {
		case <-time.After(120 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return r.dial(ctx)
	}
	d := newTestDriverOpts(t, r.start(), virtio.Features(0).With(virtio.FVersion1),
		&FrontendOptions{Reconnect: &ReconnectOptions{Dial: dial, Interval: 5 * time.Millisecond, Timeout: time.Second}}, mustRegion(t))
	t.Cleanup(func() { _ = d.fe.Close() })
	start := time.Now()
	err := d.fe.WriteConfig(0, []byte{2, 0, 0, 0, 0, 9})
	took := time.Since(start)
	var me *MessageError
	require.ErrorAs(t, err, &me)
	assert.Equal(t, ReqSetConfig, me.Request)
	assert.GreaterOrEqual(t, took, time.Second, "the request tried for the reconnect's Timeout")
	assert.NotErrorIs(t, err, ErrSessionBroken, "the request's own connection error, not the last reconnect's give-up")
	assert.Equal(t, int32(3), writes.Load(), "the request went to the first back-end and the two that followed")
	require.NoError(t, d.fe.Close())
}

// TestPeerGone: watchPeer's look at the connection. A back-end that is
// there is there, with or without bytes waiting to be read; one that
// closed its end is gone, and told apart when it wrote something before
// it exited (a reply a request is about to read, or an acknowledgment
// nobody asked for), which a one-byte peek took for a live peer (found by
// a review: the reconnect never started then).
func TestPeerGone(t *testing.T) {
	for _, tc := range []struct {
		name          string
		queued, close bool
		want          peerState
	}{
		{"open, nothing queued", false, false, peerThere},
		{"open, bytes queued", true, false, peerThere},
		{"closed, nothing queued", false, true, peerGoneEmpty},
		{"closed, bytes queued", true, true, peerGoneUnread},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := socketpair(t)
			c := newConn(a)
			if tc.queued {
				_, err := b.Write([]byte("unread"))
				require.NoError(t, err)
			}
			if tc.close {
				require.NoError(t, b.Close())
			}
			assert.Equal(t, tc.want, c.peerGone())
		})
	}
	t.Run("closed here", func(t *testing.T) {
		a, _ := socketpair(t)
		c := newConn(a)
		require.NoError(t, c.close())
		assert.Equal(t, peerGoneEmpty, c.peerGone())
	})
}

// TestCheckPeer: watchPeer's decision. A back-end that went is a broken
// session, unless it left bytes behind for a request on the socket (the
// turn held) to read: that request's read meets the end of the stream
// itself, after taking its reply, which a break here would have lost (a
// GET_VRING_BASE answer, say). Bytes left with no request on the socket
// are nobody's: the session breaks.
func TestCheckPeer(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		queued, close, holding bool
		broken                 bool
	}{
		{"there", false, false, false, false},
		{"there, a reply on its way to a request", true, false, true, false},
		{"gone", false, true, false, true},
		{"gone during a request, nothing left", false, true, true, true},
		{"gone, a reply left for the request reading it", true, true, true, false},
		{"gone, bytes nobody asked for", true, true, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := socketpair(t)
			f := &Frontend{turn: make(chan struct{}, 1), done: make(chan struct{})}
			f.cc.Store(newConn(a))
			if tc.queued {
				_, err := b.Write([]byte("a reply"))
				require.NoError(t, err)
			}
			if tc.close {
				require.NoError(t, b.Close())
			}
			if tc.holding {
				f.turn <- struct{}{}
			}
			f.checkPeer()
			assert.Equal(t, tc.broken, f.broken.Load() != nil)
			if tc.holding {
				assert.Len(t, f.turn, 1, "the request's turn is left alone")
			} else {
				assert.Empty(t, f.turn, "a turn taken to look is given back")
			}
		})
	}
}

package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
)

// errLogRecorder is a slog.Handler keeping each record's message and "err"
// attribute.
type errLogRecorder struct {
	mu   sync.Mutex
	recs []errLogRecord
}

type errLogRecord struct {
	msg string
	err error
}

func (r *errLogRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *errLogRecorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *errLogRecorder) WithGroup(string) slog.Handler            { return r }
func (r *errLogRecorder) Handle(_ context.Context, rec slog.Record) error {
	lr := errLogRecord{msg: rec.Message}
	rec.Attrs(func(a slog.Attr) bool {
		if e, ok := a.Value.Any().(error); ok && a.Key == "err" {
			lr.err = e
		}
		return true
	})
	r.mu.Lock()
	r.recs = append(r.recs, lr)
	r.mu.Unlock()
	return nil
}

// find returns the first record whose error matches target.
func (r *errLogRecorder) find(target error) (errLogRecord, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, lr := range r.recs {
		if errors.Is(lr.err, target) {
			return lr, true
		}
	}
	return errLogRecord{}, false
}

// serveOn listens at a fresh path and runs Serve on it. The socket is
// listening when serveOn returns: waiting for the socket file of
// ListenAndServe instead would race the gap between bind (the file
// appears) and listen (connections are accepted), which a slow machine
// (the TCG guest of vmtest) hits as "connection refused".
func serveOn(t *testing.T, ctx context.Context, opts *BackendOptions) (path string, done <-chan error) {
	t.Helper()
	path = t.TempDir() + "/vu.sock"
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	l.SetUnlinkOnClose(true)
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
	be := NewBackend(h, opts)
	errc := make(chan error, 1)
	go func() { errc <- be.Serve(ctx, l) }()
	return path, errc
}

// A front-end that sends half a header and holds the connection open: the
// session ends with ErrStalled once the message timeout passes, and the
// server goes on to serve the next front-end.
func TestBackendStalledHalfHeader(t *testing.T) {
	t.Run("ServeConn", func(t *testing.T) {
		h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
		_, a, done := startBackend(t, h, &BackendOptions{MessageTimeout: 50 * time.Millisecond})
		sendRaw(t, a, rawMsg(ReqGetFeatures, Version, 0, nil)[:5], nil)
		select {
		case err := <-done:
			assert.ErrorIs(t, err, ErrStalled)
		case <-time.After(5 * time.Second):
			t.Fatal("session still blocked on a half-sent header")
		}
	})
	t.Run("Serve", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		rec := &errLogRecorder{}
		path, done := serveOn(t, ctx, &BackendOptions{MessageTimeout: 50 * time.Millisecond, Logger: slog.New(rec)})
		stalled, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		require.NoError(t, err)
		defer stalled.Close()
		_, err = stalled.Write(rawMsg(ReqGetFeatures, Version, 0, nil)[:5])
		require.NoError(t, err)

		dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
		defer dcancel()
		fe, err := Dial(dctx, path, nil)
		require.NoError(t, err, "the server is still stuck on the stalled session")
		f, err := fe.Features()
		require.NoError(t, err)
		assert.True(t, f.Has(virtio.FVersion1))
		require.NoError(t, fe.Close())
		_, ok := rec.find(ErrStalled)
		assert.True(t, ok, "the stalled session's end was not logged with ErrStalled")
		cancel()
		assert.ErrorIs(t, <-done, context.Canceled)
	})
}

// At the descriptor limit accept fails with EMFILE; the server backs off
// and serves again once descriptors are free (net/http's behaviour). Runs
// in a child process: it lowers RLIMIT_NOFILE.
func TestServeRetriesAcceptAtFdLimit(t *testing.T) {
	inChild(t, func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		rec := &errLogRecorder{}
		path, done := serveOn(t, ctx, &BackendOptions{Logger: slog.New(rec)})

		// The table is this process's, but not only this test's: a
		// descriptor freed behind the test's back (it happened once in
		// the real-kernel VM) lets the accept succeed, and one taken
		// between fillFdTable's close and the dial (it happened once in
		// CI) leaves the dial nothing. Either way the attempt is made
		// again from a fresh fill; what the taken slot held is logged.
		var (
			uc      *net.UnixConn
			logged  bool
			release func()
		)
		for attempt := 0; attempt < 5 && !logged; attempt++ {
			if uc != nil {
				release()
				uc.Close()
				uc = nil
			}
			before := fdTargets(t)
			release = fillFdTable(t, 1)
			var err error
			uc, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"}) // takes the last slot
			if err != nil {
				release()
				release = func() {}
				require.ErrorIs(t, err, syscall.EMFILE)
				t.Logf("attempt %d: the free slot was taken before the dial; descriptors opened meanwhile: %v",
					attempt, newFds(before, fdTargets(t)))
				continue // uc is nil
			}
			for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				if _, logged = rec.find(syscall.EMFILE); logged {
					break
				}
			}
		}
		// Let the back-off run a few rounds at the limit.
		time.Sleep(50 * time.Millisecond)
		release()
		require.True(t, logged, "no accept failure with EMFILE logged")
		require.NotNil(t, uc)
		select {
		case err := <-done:
			t.Fatalf("Serve returned at the descriptor limit: %v", err)
		default:
		}

		fe, err := NewFrontend(ctx, uc, nil)
		require.NoError(t, err, "the server did not serve again once descriptors were free")
		f, err := fe.Features()
		require.NoError(t, err)
		assert.True(t, f.Has(virtio.FVersion1))
		require.NoError(t, fe.Close())
		cancel()
		assert.ErrorIs(t, <-done, context.Canceled)
	})
}

// A front-end that sends requests but never reads the replies fills the
// socket; the back-end's reply write then blocks. It gives up after the
// message timeout and ends the session with ErrStalled.
func TestBackendPeerStopsReading(t *testing.T) {
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
	_, a, done := startBackend(t, h, &BackendOptions{MessageTimeout: 100 * time.Millisecond})
	req := rawMsg(ReqGetFeatures, Version, 0, nil)
	go func() {
		// Until the back-end stops reading (its reply write is blocked)
		// and this write blocks too, or the connection ends.
		for {
			if _, err := a.Write(req); err != nil {
				return
			}
		}
	}()
	select {
	case err := <-done:
		assert.ErrorIs(t, err, ErrStalled)
	case <-time.After(10 * time.Second):
		a.Close()
		t.Fatal("session still blocked writing replies nobody reads")
	}
}

// When Serve returns because its context ended, the listener is closed and
// its socket file removed: a server restarted on the same path at once
// binds it. The close runs on the context's own goroutine; Serve waits for
// it. Before, Serve could return while that goroutine was still inside
// Close, and the listening socket outlived Serve for a moment (its file
// did not: net removes it under a once that the second Close waits for).
// Many rounds, as the window is narrow; a CPU hog beside the test made the
// old code fail about one run in three.
func TestServeReturnsWithListenerClosed(t *testing.T) {
	dir := t.TempDir()
	for round := range 300 {
		path := fmt.Sprintf("%s/%d.sock", dir, round%4)
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		require.NoError(t, err, "round %d: the path is free again", round)
		l.SetUnlinkOnClose(true)
		ino := socketInode(t, l)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		be := NewBackend(vhostusertest.New(vhostusertest.Sink, [6]byte{}), nil)
		go func() { done <- be.Serve(ctx, l) }()
		runtime.Gosched()
		cancel()
		require.ErrorIs(t, <-done, context.Canceled)
		_, err = os.Stat(path)
		require.ErrorIs(t, err, fs.ErrNotExist, "round %d: the socket file outlived Serve", round)
		require.False(t, socketOpen(t, ino), "round %d: the listener outlived Serve", round)
	}
}

// socketInode returns the inode of l's socket.
func socketInode(t *testing.T, l *net.UnixListener) uint64 {
	t.Helper()
	rc, err := l.SyscallConn()
	require.NoError(t, err)
	var st unix.Stat_t
	var serr error
	require.NoError(t, rc.Control(func(fd uintptr) { serr = unix.Fstat(int(fd), &st) }))
	require.NoError(t, serr)
	return st.Ino
}

// socketOpen reports whether a descriptor of this process refers to the
// socket with inode ino.
func socketOpen(t *testing.T, ino uint64) bool {
	t.Helper()
	want := fmt.Sprintf("socket:[%d]", ino)
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == want {
			return true
		}
	}
	return false
}

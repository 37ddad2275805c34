package vhostuser

import (
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// childEnv names the test a re-executed test binary runs as a child
// process (tests that lower RLIMIT_NOFILE must not do it to the whole test
// binary).
const childEnv = "VDPAKIT_VHOSTUSER_CHILD"

// inChild runs body in a child process: the test binary re-executed with
// only the calling (top-level) test selected. It reports whether this
// process is that child; the parent asserts the child passed.
func inChild(t *testing.T, body func(t *testing.T)) {
	t.Helper()
	if os.Getenv(childEnv) == t.Name() {
		body(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1", "-test.timeout=60s")
	cmd.Env = append(os.Environ(), childEnv+"="+t.Name())
	out, err := cmd.CombinedOutput()
	t.Logf("child process:\n%s", out)
	require.NoError(t, err, "child process:\n%s", out)
	require.Contains(t, string(out), "--- PASS: "+t.Name(), "child process did not run the test:\n%s", out)
}

// fillFdTable lowers RLIMIT_NOFILE to a little above the descriptors open
// now and opens descriptors until the table is full, then closes free of
// them. release closes the rest (the limit stays low: call it only in a
// child process).
func fillFdTable(t *testing.T, free int) (release func()) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	high := 0
	for _, e := range ents {
		var n int
		for _, c := range e.Name() {
			n = n*10 + int(c-'0')
		}
		high = max(high, n)
	}
	var lim unix.Rlimit
	require.NoError(t, unix.Getrlimit(unix.RLIMIT_NOFILE, &lim))
	lim.Cur = uint64(high + 1 + 32)
	require.NoError(t, unix.Setrlimit(unix.RLIMIT_NOFILE, &lim))
	var fill []int
	for {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			require.ErrorIs(t, err, unix.EMFILE)
			break
		}
		fill = append(fill, fd)
	}
	require.Greater(t, len(fill), free)
	closeFds(fill[len(fill)-free:])
	fill = fill[:len(fill)-free]
	return func() { closeFds(fill) }
}

// fdTargets maps each descriptor open in this process to what it refers
// to (readlink of /proc/self/fd/N).
func fdTargets(t *testing.T) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	m := make(map[string]string, len(ents))
	for _, e := range ents {
		m[e.Name()], _ = os.Readlink("/proc/self/fd/" + e.Name())
	}
	return m
}

// newFds lists the descriptors of after that before did not have, or had
// referring to something else, as "N -> target".
func newFds(before, after map[string]string) []string {
	var l []string
	for fd, target := range after {
		if old, ok := before[fd]; !ok || old != target {
			l = append(l, fd+" -> "+target)
		}
	}
	slices.Sort(l)
	return l
}

// A peer that sends one byte with MaxFds descriptors per sendmsg must not
// make the reader hold more than MaxFds descriptors: the limit holds as
// descriptors arrive, not when the message is complete.
func TestConnFdLimitAsFdsArrive(t *testing.T) {
	a, b := socketpair(t)
	fds := pipeFds(t, MaxFds)
	defer closeFds(fds)
	// Only descriptors of these pipes are counted: other tests' goroutines
	// may still be opening or closing descriptors of their own.
	ours := pipeInodes(t, fds)
	msg := rawMsg(ReqSetFeatures, Version, 8, u64p(0))
	for i := 0; i < len(msg)-1; i++ { // all but the last byte
		sendRaw(t, a, msg[i:i+1], fds)
	}
	before := countFdsTo(t, ours)
	require.Equal(t, MaxFds, before, "the originals")
	errc := make(chan error, 1)
	go func() {
		_, err := newConn(b).read()
		errc <- err
	}()
	peak := before
	var err error
	deadline := time.After(2 * time.Second)
wait:
	for {
		peak = max(peak, countFdsTo(t, ours))
		select {
		case err = <-errc:
			break wait
		case <-deadline:
			peak = max(peak, countFdsTo(t, ours))
			a.Close() // unblock the reader
			err = <-errc
			break wait
		case <-time.After(time.Millisecond):
		}
	}
	assert.ErrorIs(t, err, ErrFdCount)
	// The kernel installs one read's descriptors (one piece: MaxFds)
	// before the reader can close those past MaxFds, so the peak may
	// briefly be MaxFds kept plus one piece's MaxFds; keeping them all
	// (the old reader) would reach before+(len(msg)-1)*MaxFds.
	assert.LessOrEqual(t, peak, before+2*MaxFds, "descriptors held for one message")
	assert.Equal(t, before, countFdsTo(t, ours), "descriptors leaked")
}

// pipeInodes returns the inodes of the pipes behind fds.
func pipeInodes(t *testing.T, fds []int) map[uint64]bool {
	t.Helper()
	ino := make(map[uint64]bool, len(fds))
	for _, fd := range fds {
		var st unix.Stat_t
		require.NoError(t, unix.Fstat(fd, &st))
		ino[st.Ino] = true
	}
	return ino
}

// countFdsTo counts this process's descriptors of the pipes whose inodes
// are in ino. A descriptor closed while it is looked at is not counted.
func countFdsTo(t *testing.T, ino map[uint64]bool) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	n := 0
	for _, e := range ents {
		var st unix.Stat_t
		if unix.Stat("/proc/self/fd/"+e.Name(), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFIFO && ino[st.Ino] {
			n++
		}
	}
	return n
}

// MSG_CTRUNC because this process's descriptor table is full is not the
// peer sending too many descriptors.
func TestConnFdsExhausted(t *testing.T) {
	inChild(t, func(t *testing.T) {
		// A descriptor freed behind the fill (by anything else in the
		// process) lets the message's descriptor in: that attempt proves
		// nothing, and the next one starts from a fresh fill, as
		// TestServeRetriesAcceptAtFdLimit does.
		const attempts = 5
		var err error
		for attempt := 1; ; attempt++ {
			a, b := socketpair(t)
			fds := pipeFds(t, 1)
			sendRaw(t, a, rawMsg(ReqSetVringCall, Version, 8, u64p(0)), fds)
			closeFds(fds)
			c := newConn(b)
			before := fdTargets(t)
			release := fillFdTable(t, 0)
			var m *Message
			m, err = c.read()
			release()
			if err == nil {
				closeFds(m.Fds) // not part of what changed behind the fill
			}
			if err != nil || attempt == attempts {
				break
			}
			after := fdTargets(t)
			t.Logf("attempt %d: the descriptor arrived (a slot was freed behind the fill); gone since: %v; new: %v",
				attempt, newFds(after, before), newFds(before, after))
		}
		require.Error(t, err)
		assert.ErrorIs(t, err, ErrFdsExhausted)
		assert.False(t, errors.Is(err, ErrFdCount), "reported as the peer's fault: %v", err)
		assert.True(t, strings.Contains(err.Error(), "MSG_CTRUNC"), "%v", err)
	})
}

// Once a message has started, the rest of it must arrive within the
// message timeout; between messages a connection may idle.
func TestConnStalledMessage(t *testing.T) {
	t.Run("half header", func(t *testing.T) {
		a, b := socketpair(t)
		sendRaw(t, a, []byte{1, 0, 0, 0, 1}, nil)
		c := newConn(b)
		c.msgTimeout = 50 * time.Millisecond
		start := time.Now()
		_, err := c.read()
		assert.ErrorIs(t, err, ErrStalled)
		assert.Less(t, time.Since(start), 2*time.Second)
	})
	t.Run("half payload closes its descriptors", func(t *testing.T) {
		a, b := socketpair(t)
		fds := pipeFds(t, 1)
		sendRaw(t, a, rawMsg(ReqSetMemTable, Version, 40, memTablePayload(1, 1)[:20]), fds)
		closeFds(fds)
		before := openFdSet(t)
		c := newConn(b)
		c.msgTimeout = 50 * time.Millisecond
		_, err := c.read()
		assert.ErrorIs(t, err, ErrStalled)
		assert.Empty(t, leakedSince(t, before))
	})
	t.Run("idle between messages is no stall", func(t *testing.T) {
		a, b := socketpair(t)
		c := newConn(b)
		c.msgTimeout = 20 * time.Millisecond
		go func() {
			time.Sleep(100 * time.Millisecond)
			sendRaw(t, a, rawMsg(ReqGetFeatures, Version, 0, nil), nil)
		}()
		m, err := c.read()
		require.NoError(t, err)
		assert.Equal(t, ReqGetFeatures, m.Request)
	})
}

// TestConnInterruptSticks: once interrupted, a connection's reads and
// writes return at once, even after its own per-message deadline handling
// sets or clears the deadlines (a message that ends clears the read
// deadline; a write clears the write deadline when done), and the socket
// stays open.
func TestConnInterruptSticks(t *testing.T) {
	t.Run("read, after the connection clears its deadline", func(t *testing.T) {
		a, b := socketpair(t)
		c := newConn(b)
		c.msgTimeout = time.Minute
		c.interrupt()
		c.startMessage() // as read does once bytes arrive
		c.endMessage()   // and when the message is complete
		sendRaw(t, a, rawMsg(ReqGetFeatures, Version, 0, nil), nil)
		start := time.Now()
		_, err := c.read()
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		assert.Less(t, time.Since(start), 2*time.Second)
	})
	t.Run("read blocked when interrupted", func(t *testing.T) {
		_, b := socketpair(t)
		c := newConn(b)
		done := make(chan error, 1)
		go func() { _, err := c.read(); done <- err }()
		time.Sleep(20 * time.Millisecond)
		c.interrupt()
		select {
		case err := <-done:
			require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		case <-time.After(5 * time.Second):
			t.Fatal("a blocked read did not return after interrupt")
		}
	})
	t.Run("write, after the connection clears its deadline", func(t *testing.T) {
		a, b := socketpair(t)
		c := newConn(b)
		c.msgTimeout = time.Minute
		c.interrupt()
		c.setWriteDeadline(time.Time{}) // as write does when it is done
		err := c.write(Header{Request: ReqGetFeatures, Flags: Version}, nil, nil)
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		// The socket is still open: the peer sees no end.
		require.NoError(t, a.SetReadDeadline(time.Now().Add(50*time.Millisecond)))
		_, err = a.Read(make([]byte, 1))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	})
}

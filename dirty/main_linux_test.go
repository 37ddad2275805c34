package dirty_test

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
)

// childEnv, when set, makes the test binary act as the peer process of
// TestCrossProcessMark instead of running tests. Its value is the log size.
const childEnv = "DIRTY_TEST_CHILD_LOG_SIZE"

// TestMain runs the cross-process child when asked to, and otherwise fails
// the run if the tests leaked file descriptors (memfds, attached fds).
func TestMain(m *testing.M) {
	if v := os.Getenv(childEnv); v != "" {
		os.Exit(childMain(v))
	}
	// Start the runtime's poller first (os/exec uses it): its epoll and
	// wake-up fds live for the rest of the process and are not a leak.
	if r, w, err := os.Pipe(); err == nil {
		r.Close()
		w.Close()
	}
	before := openFds()
	code := m.Run()
	if after := openFds(); code == 0 && after > before {
		fmt.Fprintf(os.Stderr, "dirty tests leaked %d file descriptors:\n", after-before)
		ents, _ := os.ReadDir("/proc/self/fd")
		for _, e := range ents {
			link, _ := os.Readlink("/proc/self/fd/" + e.Name())
			fmt.Fprintf(os.Stderr, "  fd %s -> %s\n", e.Name(), link)
		}
		code = 1
	}
	os.Exit(code)
}

func openFds() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}

// childPages is the set of pages the child marks: a deterministic function
// of the page number, so the parent knows it without shared state.
func childPages(p uint64) bool { return (p*0x9e3779b97f4a7c15)>>61 == 0 || p%97 == 5 }

// childMain is the peer: it maps the log fd it inherited as fd 3, the way a
// vhost-user back-end maps the fd of VHOST_USER_SET_LOG_BASE, and marks
// childPages through it, some as single bytes and runs as ranges.
func childMain(sizeArg string) int {
	size, err := strconv.ParseUint(sizeArg, 10, 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	log, err := dirty.AttachFd(3, 0, size, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	defer log.Close()
	pages := log.NumPages()
	for p := uint64(0); p < pages; {
		if !childPages(p) {
			p++
			continue
		}
		n := uint64(1)
		for p+n < pages && childPages(p+n) {
			n++
		}
		// A run of n pages: mark it as one range starting mid-page and
		// ending mid-page.
		if err := log.Mark(p*dirty.DefaultPageSize+100, (n-1)*dirty.DefaultPageSize+1); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			return 2
		}
		p += n
	}
	return 0
}

// TestCrossProcessMark has a child process (this test binary re-executed)
// attach the shared log through its fd and mark pages while the parent
// harvests in a loop; the union of the parent's harvests must be exactly the
// child's pages.
func TestCrossProcessMark(t *testing.T) {
	const span = 4 << 30 // 1 Mi pages, 128 KiB of log
	log, err := dirty.New(span, &dirty.Options{Shared: true})
	require.NoError(t, err)
	defer log.Close()

	// Hand the child a duplicate: exec.Cmd closes the *os.File's fd in the
	// parent after start, and the log keeps its own.
	dup, err := unix.FcntlInt(uintptr(log.Fd()), unix.F_DUPFD_CLOEXEC, 0)
	require.NoError(t, err)
	f := os.NewFile(uintptr(dup), "dirty-log")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+strconv.Itoa(log.Size()))
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	require.NoError(t, f.Close())
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()

	union := make([]uint64, log.Words())
	harvests := 0
	var childErr error
	for running := true; running; {
		select {
		case childErr = <-waited:
			running = false
		default:
		}
		_, err := log.HarvestWords(union)
		require.NoError(t, err)
		harvests++
	}
	require.NoError(t, childErr, "child process")

	var want, got int
	for p := range log.NumPages() {
		marked := union[p/64]&(1<<(p%64)) != 0
		if childPages(p) {
			want++
		}
		if marked {
			got++
		}
		if marked != childPages(p) {
			t.Fatalf("page %d: harvested %v, child marked %v", p, marked, childPages(p))
		}
	}
	assert.Equal(t, want, got)
	assert.Greater(t, want, 100000)
	assert.Zero(t, log.Count())
	t.Logf("%d pages marked by the child, %d harvests", want, harvests)
}

package vfiouser_test

import (
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vring"
)

// unreadBytes is what the client sent that the server has not read yet
// (SIOCOUTQ on a unix socket).
func unreadBytes(t *testing.T, c *vfiousertest.Client) int {
	t.Helper()
	rc, err := c.Conn().SyscallConn()
	require.NoError(t, err)
	var n int
	var ierr error
	require.NoError(t, rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) }))
	require.NoError(t, ierr)
	return n
}

// TestDescriptorsSpreadOverAMessageAreBounded: a message may arrive in
// many pieces, each with its own descriptors. The server keeps at most
// max_msg_fds of them for the message and closes the rest as they arrive:
// it used to keep them all until the message was complete, so one message
// of 1 MiB, one byte per sendmsg with 16 descriptors each, could exhaust
// RLIMIT_NOFILE. The message is refused (EBADF) and the session ends, as
// for any message with more than max_msg_fds descriptors.
func TestDescriptorsSpreadOverAMessageAreBounded(t *testing.T) {
	r := newRig(t, nil)
	ctx := testCtx(t)
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	fds := make([]int, vfiouser.MaxMsgFds)
	for i := range fds {
		fds[i] = e.Fd()
	}
	before := fdCount(t)
	c := r.dial(t)
	_, err = c.Negotiate(ctx)
	require.NoError(t, err)

	const pieces = 1000 // 16000 descriptors in all: below this machine's RLIMIT_NOFILE, so the old server kept them
	msg := vfiousertest.Message(9, vfiouser.CmdDeviceReset, 0, make([]byte, pieces))
	require.NoError(t, c.SendRaw(msg[:vfiouser.HeaderSize], nil))
	for i := 0; i < pieces-1; i++ {
		off := vfiouser.HeaderSize + i
		require.NoError(t, c.SendRaw(msg[off:off+1], fds))
	}
	// Everything but the last byte has been read by the server. The
	// kernel installs a read's descriptors before the server can close
	// those past max_msg_fds, so right after the last read it may still
	// hold one piece's more for a moment: what it keeps is what remains
	// once that read is dealt with.
	require.Eventually(t, func() bool { return unreadBytes(t, c) == 0 }, 10*time.Second, time.Millisecond)
	held := 0
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		ents, err := os.ReadDir("/proc/self/fd")
		if !assert.NoError(c, err) {
			return
		}
		held = len(ents) - before
		assert.LessOrEqual(c, held, 2+vfiouser.MaxMsgFds,
			"descriptors held mid-message: both ends of the connection and at most max_msg_fds (the server used to hold 15986)")
	}, 5*time.Second, time.Millisecond)
	assert.GreaterOrEqual(t, held, 2, "both ends of the connection are open")

	require.NoError(t, c.SendRaw(msg[len(msg)-1:], fds))
	h, _, err := c.ReadReply(ctx)
	require.NoError(t, err)
	require.Equal(t, uint16(9), h.ID)
	require.NotZero(t, h.Flags&vfiouser.FlagError, "an error reply")
	require.Equal(t, uint32(unix.EBADF), h.Error)
	_, _, err = c.ReadReply(ctx)
	require.True(t, errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET), "the server closed the session: %v", err)
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return fdCount(t) <= before }, 5*time.Second, 10*time.Millisecond,
		"descriptors leaked: %d before, %d after", before, fdCount(t))

	// The server serves the next client.
	c = r.dial(t)
	_, err = c.Negotiate(ctx)
	require.NoError(t, err)
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err)
}

// TestDMALoggingReportOfAHugeRange: over a 1 TiB log, a report of the whole
// TiB as one 1 TiB page, which took the old server 2^28 steps under the
// migration lock per request (reportDirty's tests count the work), answers
// the one page dirty after traffic and clean once reported; a range past
// the log is clean; a page-granular report is what it was.
func TestDMALoggingReportOfAHugeRange(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, d := r.driver(t)
	const tib = 1 << 40
	require.NoError(t, c.StartDMALogging(ctx, 4096, 0, tib))
	traffic := func() {
		require.NoError(t, d.SendFrames(frames(4, 5)))
		require.NoError(t, d.Receive(ctx, d.Sent, nil))
	}
	traffic()
	// Stopped, the device writes nothing more (after the last frame came
	// back it may still complete a transmit chain or re-arm a ring's
	// event index), so a second report must find the page clean, as a
	// VMM's reports in STOP_COPY do.
	migrateTo(t, ctx, c, mdev.MigStop)
	bm, err := c.DMALoggingReport(ctx, 0, tib, tib)
	require.NoError(t, err)
	require.Equal(t, []uint64{1}, bm, "guest memory was written")
	bm, err = c.DMALoggingReport(ctx, 0, tib, tib)
	require.NoError(t, err)
	require.Equal(t, []uint64{0}, bm, "reported pages are cleared")
	bm, err = c.DMALoggingReport(ctx, 1<<62, 1<<62, 1<<62)
	require.NoError(t, err)
	require.Equal(t, []uint64{0}, bm, "past the log")

	migrateTo(t, ctx, c, mdev.MigRunning)
	traffic()
	bm, err = c.DMALoggingReport(ctx, 0, vfiousertest.GuestMemSize, 4096)
	require.NoError(t, err)
	dirtyPages := 0
	for _, w := range bm {
		dirtyPages += bits.OnesCount64(w)
	}
	require.NotZero(t, dirtyPages, "page-granular report")
	require.NoError(t, c.StopDMALogging(ctx))
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err, "the session goes on")
}

// sparseFile is a memfd of size bytes (sparse: it takes no memory) named
// name, closed at the end of the test.
func sparseFile(t *testing.T, name string, size uint64) int {
	t.Helper()
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	require.NoError(t, err)
	t.Cleanup(func() { _ = unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, int64(size)))
	return fd
}

// TestDMAWindowLimits: the server announces its window cap as max_dma_maps;
// a DMA_MAP beyond the cap is refused with ENOSPC, one beyond the
// address-space budget with ENOMEM, before anything is mapped; the session
// goes on, an unmap makes room again, and the end of the session leaves no
// descriptor or mapping. A client used to be able to map 65535 windows of
// 64 TiB each: a few of them exhaust the 128 TiB user address space (after
// which the Go runtime aborts), and stepping down the sizes after each
// refusal fills it to the last page.
func TestDMAWindowLimits(t *testing.T) {
	const (
		budget  = 64<<20 - 4096 // 14 windows of 32 MiB, 16 MiB, ..., 4 KiB
		windows = 24
		name    = "vfu-window-limits"
	)
	_, srv, path := stubbornRigOpts(t, &vfiouser.Options{MaxDMAWindows: windows, DMABudget: budget})
	ctx := testCtx(t)
	file := sparseFile(t, name, 1<<40)
	before := fdCount(t)
	c := dialPath(t, path)
	v, err := c.Negotiate(ctx)
	require.NoError(t, err)
	require.NotNil(t, v.Caps.MaxDMAMaps)
	require.Equal(t, uint64(windows), *v.Caps.MaxDMAMaps, "max_dma_maps")

	// A hostile client: the biggest window it can, then the biggest that
	// still fits, down to a page. On 32-bit a window an int cannot hold
	// is refused as too large (EINVAL), not for the budget: start at 1 GiB
	// there.
	addr, size := uint64(0), min(uint64(1<<40), uint64(math.MaxInt)/2+1)
	var refusals, mapped int
	for size >= 4096 && mapped < windows {
		err := c.DMAMap(ctx, addr, size, file, 0)
		if err != nil {
			require.True(t, vfiousertest.IsErrno(err, unix.ENOMEM), "refused for the budget: %v", err)
			refusals++
			size /= 2
			continue
		}
		mapped++
		addr += size
		require.LessOrEqual(t, srv.DMAReserved(), uint64(budget))
	}
	require.NotZero(t, refusals)
	require.Equal(t, 14, mapped)
	assert.Equal(t, uint64(budget), srv.DMAReserved(), "the budget is used to the last page")
	assert.Equal(t, mapped, mappings(t, name))
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err, "the session goes on")

	// The window cap: windows without descriptors count, and take no
	// address space.
	for ; mapped < windows; mapped++ {
		require.NoError(t, c.DMAMap(ctx, addr, 4096, -1, 0))
		addr += 4096
	}
	err = c.DMAMap(ctx, addr, 4096, -1, 0)
	require.True(t, vfiousertest.IsErrno(err, unix.ENOSPC), "refused for the window count: %v", err)
	err = c.DMAMap(ctx, addr, 4096, file, 0)
	require.True(t, vfiousertest.IsErrno(err, unix.ENOSPC), "refused for the window count: %v", err)
	assert.Equal(t, uint64(budget), srv.DMAReserved())

	// An unmap makes room again.
	require.NoError(t, c.DMAUnmap(ctx, 0, 32<<20))
	require.NoError(t, c.DMAMap(ctx, addr, 16<<20, file, 0))
	assert.Equal(t, uint64(budget-32<<20+16<<20), srv.DMAReserved())
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err, "the session goes on")

	requireEndLeavesNothing(t, c, srv, before, name)
}

// requireEndLeavesNothing closes the client's session and requires that
// the server lets go of every descriptor (back to before) and every
// mapping of the memfds named name, and holds no address space.
func requireEndLeavesNothing(t *testing.T, c *vfiousertest.Client, srv *vfiouser.Server, before int, name string) {
	t.Helper()
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return fdCount(t) <= before && mappings(t, name) == 0 }, 5*time.Second, 10*time.Millisecond,
		"leaked: %d descriptors before, %d after; %d mappings", before, fdCount(t), mappings(t, name))
	assert.Zero(t, srv.DMAReserved())
}

// TestDMAWindowRules: the size a window may have, and the options.
func TestDMAWindowRules(t *testing.T) {
	ctx := testCtx(t)
	const name = "vfu-window-rules"
	file := sparseFile(t, name, 64<<40)
	var intBeyond unix.Errno // mapped on 64-bit
	if strconv.IntSize == 32 {
		intBeyond = unix.EINVAL
	}
	for _, tc := range []struct {
		name   string
		budget uint64
		size   uint64
		errno  unix.Errno // 0: mapped
	}{
		{"beyond the budget", 1 << 30, 1<<30 + 4096, unix.ENOMEM},
		{"the whole budget", 1 << 30, 1 << 30, 0},
		{"beyond the largest window", 1 << 62, 32<<40 + 4096, unix.EINVAL},
		{"64 TiB", 1 << 62, 64 << 40, unix.EINVAL},
		// 4 GiB and 1 MiB: on 32-bit an int holds neither it nor 2 GiB (a
		// length truncated to 1 MiB would map less than the window), on
		// 64-bit it is a window like any other.
		{"beyond what an int holds", 1 << 62, 1<<32 + 1<<20, intBeyond},
		{"a budget near 2^64", ^uint64(0), 64 << 40, unix.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, srv, path := stubbornRigOpts(t, &vfiouser.Options{DMABudget: tc.budget})
			c := dialPath(t, path)
			v, err := c.Negotiate(ctx)
			require.NoError(t, err)
			require.Equal(t, uint64(vfiouser.DefaultMaxDMAWindows), *v.Caps.MaxDMAMaps)
			err = c.DMAMap(ctx, 0, tc.size, file, 0)
			if tc.errno == 0 {
				require.NoError(t, err)
				assert.Equal(t, tc.size, srv.DMAReserved())
				require.NoError(t, c.DMAUnmap(ctx, 0, tc.size))
			} else {
				require.True(t, vfiousertest.IsErrno(err, tc.errno), "want %v: %v", tc.errno, err)
				assert.Zero(t, mappings(t, name))
			}
			assert.Zero(t, srv.DMAReserved())
		})
	}

	assert.Equal(t, unix.ENOSPC, vfiouser.Errno(vfiouser.ErrDMALimit))
	budget := vfiouser.DefaultDMABudget()
	assert.NotZero(t, budget)
	assert.LessOrEqual(t, budget, uint64(32<<40))
	if strconv.IntSize == 32 {
		assert.LessOrEqual(t, budget, uint64(1<<30), "a quarter of a 32-bit address space")
	}
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	backing := vdpa.NewLocal(sn, nil)
	defer backing.Close()
	for _, n := range []int{-1, 65536} {
		_, err := vfiouser.New(backing, &vfiouser.Options{MaxDMAWindows: n})
		require.ErrorIs(t, err, mdev.ErrInvalidOptions, "MaxDMAWindows %d", n)
		_, err = vfiouser.New(backing, &vfiouser.Options{MaxDMAFiles: n})
		require.ErrorIs(t, err, mdev.ErrInvalidOptions, "MaxDMAFiles %d", n)
	}
}

// fileIno is the inode number of the file fd refers to.
func fileIno(t *testing.T, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Fstat(fd, &st))
	return uint64(st.Ino)
}

// TestDMAWindowsShareTheirFile: the windows of one file share one
// descriptor in the server, which goes with the last of them, and every
// window's guest memory region hands on that descriptor with the window's
// offset. A descriptor per window used to let a client fill the process's
// descriptor table (RLIMIT_NOFILE: 20000 on the machine this was found on,
// against 32768 windows by default), after which nothing else in the
// process could open a file, accept a connection or create an eventfd.
func TestDMAWindowsShareTheirFile(t *testing.T) {
	_, srv, path := stubbornRigOpts(t, nil)
	ctx := testCtx(t)
	const name, windows = "vfu-window-shared", 64
	file := sparseFile(t, name, windows<<20)
	c := dialPath(t, path)
	_, err := c.Negotiate(ctx)
	require.NoError(t, err)
	before := fdCount(t)
	for i := uint64(0); i < windows; i++ {
		require.NoError(t, c.DMAMap(ctx, i<<21, 1<<20, file, i<<20), "window %d", i)
		require.Equal(t, before+1, fdCount(t), "descriptors held after window %d", i)
	}
	regions := srv.Memory().Regions()
	require.Len(t, regions, windows)
	for i, r := range regions {
		require.GreaterOrEqual(t, r.Fd(), 0, "region %d", i)
		assert.Equal(t, fileIno(t, file), fileIno(t, r.Fd()), "region %d maps the client's file", i)
		assert.Equal(t, regions[0].Fd(), r.Fd(), "region %d shares the descriptor", i)
		assert.Equal(t, uint64(i)<<20, r.FdOffset(), "region %d", i)
	}
	assert.Equal(t, uint64(windows<<20), srv.DMAReserved())
	for i := uint64(0); i < windows-1; i++ {
		require.NoError(t, c.DMAUnmap(ctx, i<<21, 1<<20), "window %d", i)
	}
	assert.Equal(t, before+1, fdCount(t), "the last window keeps the descriptor")
	assert.Equal(t, 1, mappings(t, name))
	require.NoError(t, c.DMAUnmap(ctx, (windows-1)<<21, 1<<20))
	assert.Equal(t, before, fdCount(t), "the descriptor goes with the last window")
	assert.Zero(t, mappings(t, name))
	assert.Zero(t, srv.DMAReserved())
}

// TestDMAWindowsShareByAccessMode: windows share a descriptor only when
// the client's descriptors were opened the same way, so a writable window
// never hands a read-only descriptor on to a backing device that maps guest
// memory itself.
func TestDMAWindowsShareByAccessMode(t *testing.T) {
	_, srv, path := stubbornRigOpts(t, nil)
	ctx := testCtx(t)
	rw := sparseFile(t, "vfu-window-modes", 4<<20)
	ro, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", rw), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(ro)
	c := dialPath(t, path)
	_, err = c.Negotiate(ctx)
	require.NoError(t, err)
	before := fdCount(t)
	readOnly := vfiouser.DMAMap{Argsz: vfiouser.DMAMapSize, Flags: vfiouser.DMAReadable, Address: 0, Size: 1 << 20}
	_, err = c.Call(ctx, vfiouser.CmdDMAMap, readOnly.Marshal(), []int{ro})
	require.NoError(t, err)
	require.NoError(t, c.DMAMap(ctx, 2<<20, 1<<20, rw, 1<<20))
	readOnly.Address, readOnly.Offset = 4<<20, 2<<20
	_, err = c.Call(ctx, vfiouser.CmdDMAMap, readOnly.Marshal(), []int{rw})
	require.NoError(t, err)
	assert.Equal(t, before+2, fdCount(t), "one descriptor per access mode")

	regions := srv.Memory().Regions()
	require.Len(t, regions, 3)
	mode := func(fd int) int {
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		require.NoError(t, err)
		return fl & unix.O_ACCMODE
	}
	assert.Equal(t, unix.O_RDONLY, mode(regions[0].Fd()), "the read-only window's descriptor")
	assert.Equal(t, unix.O_RDWR, mode(regions[1].Fd()), "the writable window's descriptor")
	assert.Equal(t, regions[1].Fd(), regions[2].Fd(), "a window from the same descriptor mode shares it")
	assert.NotEqual(t, regions[0].Fd(), regions[1].Fd())
	require.NoError(t, c.DMAUnmap(ctx, 0, 1<<20))
	assert.Equal(t, before+1, fdCount(t))
}

// TestDMAFileLimit: at most MaxDMAFiles distinct files are mapped; a window
// of another file is refused with ENOSPC before anything is mapped, a
// window of a file already mapped is not, and unmapping a file's last
// window makes room. The session goes on, and its end leaves nothing.
func TestDMAFileLimit(t *testing.T) {
	const limit = 3
	_, srv, path := stubbornRigOpts(t, &vfiouser.Options{MaxDMAFiles: limit})
	ctx := testCtx(t)
	const name = "vfu-file-limit"
	files := make([]int, limit+1)
	for i := range files {
		files[i] = sparseFile(t, name, 1<<20)
	}
	before := fdCount(t)
	c := dialPath(t, path)
	_, err := c.Negotiate(ctx)
	require.NoError(t, err)
	window := func(i int) uint64 { return uint64(i) << 21 }
	for i := 0; i < limit; i++ {
		require.NoError(t, c.DMAMap(ctx, window(i), 1<<20, files[i], 0), "file %d", i)
	}
	err = c.DMAMap(ctx, window(limit), 1<<20, files[limit], 0)
	require.True(t, vfiousertest.IsErrno(err, unix.ENOSPC), "a file beyond the limit: %v", err)
	assert.Equal(t, limit, mappings(t, name), "nothing mapped for the refused window")
	require.NoError(t, c.DMAMap(ctx, window(limit+1), 1<<20, files[0], 0), "another window of a mapped file")
	require.NoError(t, c.DMAMap(ctx, window(limit+2), 4096, -1, 0), "a window without a file")

	// The file of window 1 goes with its only window.
	require.NoError(t, c.DMAUnmap(ctx, window(1), 1<<20))
	require.NoError(t, c.DMAMap(ctx, window(limit), 1<<20, files[limit], 0), "room once a file is gone")
	// File 0 still has a window: unmapping one of its two frees no room.
	require.NoError(t, c.DMAUnmap(ctx, window(0), 1<<20))
	err = c.DMAMap(ctx, window(1), 1<<20, files[1], 0)
	require.True(t, vfiousertest.IsErrno(err, unix.ENOSPC), "file 0 still mapped: %v", err)
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err, "the session goes on")

	requireEndLeavesNothing(t, c, srv, before, name)
}

// TestRetiredWindowsCountAgainstTheBudget: the address range of a window
// unmapped while the data path could not be stopped stays reserved until
// it stops, so it counts against the budget: a client cannot fill the
// address space by mapping and unmapping under a stuck data path (a backing
// device that refuses its reset too retires windows beyond maxRetired). A
// map refused for it succeeds once the device has been reset.
func TestRetiredWindowsCountAgainstTheBudget(t *testing.T) {
	b, srv, path := stubbornRigOpts(t, &vfiouser.Options{DMABudget: vfiousertest.GuestMemSize + 2*extraSize})
	ctx := testCtx(t)
	c := dialPath(t, path)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	defer d.Close()
	b.stuck.Store(true)
	require.Error(t, c.SetMigState(ctx, uint32(mdev.MigStop)), "the stop fails")
	const name = "vfu-window-retired-budget"
	extra := windowFile(t, name, extraSize)
	for round := 0; round < 2; round++ {
		require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0), "round %d", round)
		require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize), "round %d", round)
	}
	require.Equal(t, 2, srv.RetiredWindows())
	assert.Equal(t, uint64(vfiousertest.GuestMemSize+2*extraSize), srv.DMAReserved())
	err = c.DMAMap(ctx, extraBase, extraSize, extra, 0)
	require.True(t, vfiousertest.IsErrno(err, unix.ENOMEM), "the retired ranges fill the budget: %v", err)
	assert.Zero(t, mappings(t, name))

	b.stuck.Store(false)
	require.NoError(t, c.Reset(ctx))
	assert.Zero(t, srv.RetiredWindows())
	require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0))
	require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize))
}

// TestRetiredWindowKeepsItsFileForTheOthers: of two windows of one file,
// the one unmapped while the data path cannot be stopped is retired; the
// other keeps the file's descriptor open, and its guest memory region
// hands on that descriptor. The retired range counts until the device is
// reset, and the descriptor goes with the last window.
func TestRetiredWindowKeepsItsFileForTheOthers(t *testing.T) {
	b, srv, path := stubbornRigOpts(t, nil)
	ctx := testCtx(t)
	c := dialPath(t, path)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	defer d.Close()
	const name = "vfu-window-retired-shared"
	extra := windowFile(t, name, 2*extraSize)
	before := fdCount(t)
	require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0))
	require.NoError(t, c.DMAMap(ctx, extraBase+extraSize, extraSize, extra, extraSize))
	require.Equal(t, before+1, fdCount(t), "one descriptor for the file's two windows")

	b.stuck.Store(true)
	require.Error(t, c.SetMigState(ctx, uint32(mdev.MigStop)), "the stop fails")
	require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize))
	require.Equal(t, 1, srv.RetiredWindows())
	assert.Equal(t, uint64(vfiousertest.GuestMemSize+2*extraSize), srv.DMAReserved(), "one window mapped, one retired")
	assert.Equal(t, before+1, fdCount(t), "the other window keeps the descriptor")
	var region *vring.Region
	for _, r := range srv.Memory().Regions() {
		if r.Base() == extraBase+extraSize {
			region = r
		}
	}
	require.NotNil(t, region, "the remaining window is guest memory")
	assert.Equal(t, fileIno(t, extra), fileIno(t, region.Fd()), "its region hands on the file's open descriptor")

	b.stuck.Store(false)
	require.NoError(t, c.Reset(ctx))
	assert.Zero(t, srv.RetiredWindows())
	assert.Equal(t, uint64(vfiousertest.GuestMemSize+extraSize), srv.DMAReserved())
	require.NoError(t, c.DMAUnmap(ctx, extraBase+extraSize, extraSize))
	assert.Equal(t, before, fdCount(t), "the descriptor goes with the last window")
	assert.Zero(t, mappings(t, name))
}

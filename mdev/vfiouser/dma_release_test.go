package vfiouser_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
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
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// windowFile returns a memfd of size bytes named name, closed at the end of
// the test; the test does not map it, so every mapping of it in
// /proc/self/maps is the server's.
func windowFile(t *testing.T, name string, size int64) int {
	t.Helper()
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	require.NoError(t, err)
	t.Cleanup(func() { _ = unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, size))
	return fd
}

// mappings counts the mappings of memfds named name in this process.
func mappings(t *testing.T, name string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	require.NoError(t, err)
	return strings.Count(string(b), "/memfd:"+name+" ")
}

// guestMemName is the name of the memfd vfiousertest.Driver's guest memory
// lives in (vring.NewMemfdRegion's default).
const guestMemName = "vring-guest-memory"

const (
	extraBase = 0x1_0000_0000
	extraSize = 64 << 10
)

// TestDMAUnmapReleasesInEveryMigrationState: whatever migration state the
// client put a DRIVER_OK device in, DMA_UNMAP and UNMAP_ALL release the
// window's descriptor and mapping before they reply (vfio-user.rst: "the
// server must release all references to that DMA region before
// replying"), round after round, and so does the end of the session. In
// the states where the data path runs, the server stops it for the change
// and restarts it afterwards; the client keeps seeing the state it set and
// the traffic goes on. They used to be kept (one descriptor and one mapping
// per round) until the device stopped being live or the server closed: a
// migration source ending in STOP_COPY kept all of guest memory open.
func TestDMAUnmapReleasesInEveryMigrationState(t *testing.T) {
	for _, tc := range []struct {
		state   mdev.MigState
		running bool // the data path runs in it
	}{
		{mdev.MigRunning, true},
		{mdev.MigRunningP2P, true},
		{mdev.MigPreCopy, true},
		{mdev.MigPreCopyP2P, true},
		{mdev.MigStop, false},
		{mdev.MigStopCopy, false},
		{mdev.MigResuming, false},
		{mdev.MigError, false},
	} {
		t.Run(tc.state.String(), func(t *testing.T) {
			r := newRig(t, nil)
			ctx := testCtx(t)
			c := r.dial(t)
			d, err := vfiousertest.NewDriver(ctx, c, nil)
			require.NoError(t, err)
			defer d.Close()
			fs := frames(40, 11)
			require.NoError(t, d.SendFrames(fs[:10]))
			require.NoError(t, d.Receive(ctx, 10, nil))
			if tc.state == mdev.MigError {
				// A restart without the memory the rings are in fails:
				// ERROR, with the data path stopped.
				migrateTo(t, ctx, c, mdev.MigStop)
				require.NoError(t, c.DMAUnmap(ctx, 0, vfiousertest.GuestMemSize))
				require.Error(t, c.SetMigState(ctx, uint32(mdev.MigRunning)))
				require.NoError(t, c.DMAMap(ctx, 0, vfiousertest.GuestMemSize, d.Region.Fd(), 0))
				st, err := c.MigState(ctx)
				require.NoError(t, err)
				require.Equal(t, uint32(mdev.MigError), st)
			} else {
				migrateTo(t, ctx, c, tc.state)
			}
			if tc.state != mdev.MigResuming { // STOP -> RESUMING resets the device
				require.NotZero(t, r.srv.Device().Status()&virtio.StatusDriverOK)
			}
			served := mappings(t, guestMemName) // the driver's and the server's
			name := "vfu-window-" + tc.state.String()
			extra := windowFile(t, name, extraSize)
			before := fdCount(t)
			for round := 0; round < 10; round++ {
				require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0))
				require.Equal(t, 1, mappings(t, name), "round %d: mapped", round)
				if round%2 == 0 {
					require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize))
				} else {
					require.NoError(t, c.DMAUnmapAll(ctx))
					require.Equal(t, served-1, mappings(t, guestMemName), "round %d: guest memory released by UNMAP_ALL", round)
					require.NoError(t, c.DMAMap(ctx, 0, vfiousertest.GuestMemSize, d.Region.Fd(), 0))
				}
				require.Zero(t, mappings(t, name), "round %d: the window is unmapped when the reply comes", round)
				require.LessOrEqual(t, fdCount(t), before, "round %d: its descriptor is closed when the reply comes", round)
				st, err := c.MigState(ctx)
				require.NoError(t, err)
				require.Equal(t, uint32(tc.state), st, "round %d: the client still sees the state it set", round)
			}
			assert.Zero(t, r.srv.RetiredWindows())
			if tc.running {
				// The data path was stopped for each change and runs again:
				// nothing lost, nothing duplicated.
				require.NoError(t, d.SendFrames(fs[10:]))
				require.NoError(t, d.Receive(ctx, 40, nil))
				tx, rx := softnetCounts(r.sn)
				assert.Equal(t, uint64(40), tx)
				assert.Equal(t, uint64(40), rx)
			}
			// The session's end releases guest memory, in this state too.
			require.NoError(t, c.Close())
			require.Eventually(t, func() bool { return mappings(t, guestMemName) == served-1 }, 5*time.Second, 10*time.Millisecond,
				"guest memory still mapped by the server after the client left")
			require.Eventually(t, func() bool { return fdCount(t) < before }, 5*time.Second, 10*time.Millisecond,
				"guest memory's descriptor still open after the client left")
		})
	}
}

// stubbornBacking is a software device whose stop can be made to fail:
// Suspend and the reset (SetStatus(0)) fail while stuck is set, and the
// data path then goes on.
type stubbornBacking struct {
	*vdpa.Local
	stuck     atomic.Bool
	noSuspend atomic.Bool // Suspend alone fails
}

var errStuck = errors.New("test: the backing device does not stop")

func (b *stubbornBacking) Suspend() error {
	if b.stuck.Load() || b.noSuspend.Load() {
		return errStuck
	}
	return b.Local.Suspend()
}

func (b *stubbornBacking) SetStatus(s virtio.Status) error {
	if s == 0 && b.stuck.Load() {
		return errStuck
	}
	return b.Local.SetStatus(s)
}

// stubbornRig is a server in front of a stubbornBacking.
func stubbornRig(t *testing.T) (*stubbornBacking, *vfiouser.Server, string) {
	return stubbornRigOpts(t, &vfiouser.Options{Device: mdev.Options{Backend: "software"}})
}

// stubbornRigOpts is stubbornRig with the server's options.
func stubbornRigOpts(t *testing.T, opts *vfiouser.Options) (*stubbornBacking, *vfiouser.Server, string) {
	t.Helper()
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	b := &stubbornBacking{Local: vdpa.NewLocal(sn, nil)}
	t.Cleanup(func() { _ = b.Local.Close() })
	srv, err := vfiouser.New(b, opts)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "vfu.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		b.stuck.Store(false)
		cancel()
		<-done
		require.NoError(t, srv.Close())
	})
	return b, srv, path
}

// stubbornSession is stubbornRig with a client connected and a driver
// that has brought the device up, closed when the test ends.
func stubbornSession(t *testing.T) (*stubbornBacking, *vfiouser.Server, context.Context, *vfiousertest.Client, *vfiousertest.Driver) {
	b, srv, path := stubbornRig(t)
	ctx := testCtx(t)
	c := dialPath(t, path)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	t.Cleanup(func() { d.Close() })
	return b, srv, ctx, c, d
}

func dialPath(t *testing.T, path string) *vfiousertest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := vfiousertest.Dial(ctx, path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// TestDMAUnmapUnderADataPathThatCannotStop: when stopping the data path
// fails, the device is in ERROR with its data path still live. A DMA_UNMAP
// then still releases the client's descriptor and file before it replies
// (the pages under the data path become anonymous memory, whose address
// range waits for the data path to stop), at most maxRetired (64) times:
// beyond that the server resets the device, which stops the data path and
// releases everything, and the unmap succeeds. It used to be refused with
// EBUSY, which QEMU only logs; its next map of the range then failed with
// EEXIST, and QEMU aborts on that.
func TestDMAUnmapUnderADataPathThatCannotStop(t *testing.T) {
	b, srv, ctx, c, d := stubbornSession(t)
	require.NoError(t, d.SendFrames(frames(4, 1)))
	require.NoError(t, d.Receive(ctx, 4, nil))
	b.stuck.Store(true)
	require.Error(t, c.SetMigState(ctx, uint32(mdev.MigStop)), "the stop fails")
	st, err := c.MigState(ctx)
	require.NoError(t, err)
	require.Equal(t, uint32(mdev.MigError), st)
	require.True(t, srv.Device().DataPathActive(), "the data path may still run")

	const name = "vfu-window-stuck"
	extra := windowFile(t, name, extraSize)
	before := fdCount(t)
	const limit = 64
	for round := 0; round < limit; round++ {
		require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0))
		require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize), "round %d", round)
		require.Zero(t, mappings(t, name), "round %d: the client's file is no longer mapped", round)
		require.LessOrEqual(t, fdCount(t), before, "round %d: the client's descriptor is closed", round)
	}
	require.Equal(t, limit, srv.RetiredWindows())

	// One more: the device is reset, which stops the data path; the held
	// ranges go, and so does the window.
	b.stuck.Store(false)
	require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0))
	require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize), "the unmap beyond the limit succeeds")
	assert.Zero(t, mappings(t, name))
	assert.LessOrEqual(t, fdCount(t), before)
	assert.False(t, srv.Device().DataPathActive())
	assert.Zero(t, srv.RetiredWindows())
	st, err = c.MigState(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint32(mdev.MigRunning), st, "reset: ERROR is left")
	require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0), "QEMU's next map of the range")
	require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize))
}

// TestDMAUnmapBeyondTheLimitUnderAStuckReset: a backing device that refuses
// its reset too cannot be stopped at all; an unmap beyond maxRetired is
// still not refused (QEMU aborts on the consequences): the window is
// retired past the limit.
func TestDMAUnmapBeyondTheLimitUnderAStuckReset(t *testing.T) {
	b, srv, ctx, c, _ := stubbornSession(t)
	b.stuck.Store(true)
	require.Error(t, c.SetMigState(ctx, uint32(mdev.MigStop)), "the stop fails")
	const name = "vfu-window-stuck-reset"
	extra := windowFile(t, name, extraSize)
	for round := 0; round < 65; round++ {
		require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0))
		require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize), "round %d", round)
		require.Zero(t, mappings(t, name), "round %d", round)
	}
	require.True(t, srv.Device().DataPathActive(), "the reset failed")
	assert.Equal(t, 65, srv.RetiredWindows())
	require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0), "QEMU's next map of the range")
	b.stuck.Store(false)
	require.NoError(t, c.Reset(ctx))
	assert.Zero(t, srv.RetiredWindows())
}

// TestDMAUnmapWhenTheServersStopFails: when the server's own stop of a
// running data path for a memory change fails (the device enters ERROR
// with its data path live), the server resets the device instead of
// retiring the window: the unmap succeeds with everything released, and
// nothing stays reserved. The window used to be retired, and the data
// path left running in ERROR.
func TestDMAUnmapWhenTheServersStopFails(t *testing.T) {
	b, srv, ctx, c, d := stubbornSession(t)
	require.NoError(t, d.SendFrames(frames(4, 1)))
	require.NoError(t, d.Receive(ctx, 4, nil))
	const name = "vfu-window-pause-fails"
	extra := windowFile(t, name, extraSize)
	require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0))
	b.noSuspend.Store(true) // the stop fails, the reset works
	require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize))
	assert.Zero(t, mappings(t, name))
	assert.Zero(t, srv.RetiredWindows(), "nothing is left reserved")
	assert.False(t, srv.Device().DataPathActive(), "the device was reset")
	st, err := c.MigState(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint32(mdev.MigRunning), st)
}

// TestDisconnectResetsADataPathThatCannotStop: a client that leaves while
// the data path cannot be stopped through the migration state machine
// (ERROR after a failed stop) gets everything released all the same: the
// server resets the device, which stops the data path, and unmaps guest
// memory.
func TestDisconnectResetsADataPathThatCannotStop(t *testing.T) {
	b, srv, ctx, c, _ := stubbornSession(t)
	served := mappings(t, guestMemName)
	b.stuck.Store(true)
	require.Error(t, c.SetMigState(ctx, uint32(mdev.MigStop)))
	require.True(t, srv.Device().DataPathActive())
	b.stuck.Store(false) // the reset works
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return mappings(t, guestMemName) == served-1 }, 5*time.Second, 10*time.Millisecond,
		"guest memory still mapped by the server after the client left")
	assert.False(t, srv.Device().DataPathActive())
	assert.Equal(t, mdev.MigRunning, srv.Device().MigrationState(), "reset: ERROR is left")
	assert.Zero(t, srv.RetiredWindows())
}

// mapReadOnly DMA-maps [addr, addr+size) of fd readable but not writable.
func mapReadOnly(ctx context.Context, c *vfiousertest.Client, addr, size uint64, fd int) error {
	m := vfiouser.DMAMap{Argsz: vfiouser.DMAMapSize, Flags: vfiouser.DMAReadable, Address: addr, Size: size}
	_, err := c.Call(ctx, vfiouser.CmdDMAMap, m.Marshal(), []int{fd})
	return err
}

// TestReadOnlyWindow: a window the client did not make writable is mapped
// read-only. The device reads it; a write into it fails (a memory fault,
// caught) instead of changing the client's memory; a descriptor opened
// read-only serves such a window (and only such a window). The writable
// flag used to be ignored: every window was mapped read-write.
func TestReadOnlyWindow(t *testing.T) {
	r := newRig(t, nil)
	ctx := testCtx(t)
	c := r.dial(t)
	_, err := c.Negotiate(ctx)
	require.NoError(t, err)
	fd := windowFile(t, "vfu-readonly", extraSize)
	_, err = unix.Pwrite(fd, []byte("client data"), 0)
	require.NoError(t, err)
	require.NoError(t, mapReadOnly(ctx, c, extraBase, extraSize, fd))
	mem := r.srv.Memory()
	got := make([]byte, 11)
	require.NoError(t, mem.Read(extraBase, got))
	assert.Equal(t, "client data", string(got))
	// Backing devices that map guest memory themselves (vhost-vdpa) learn
	// that the window is read-only.
	var readOnly []bool
	for _, rg := range mem.Regions() {
		if rg.Base() == extraBase {
			readOnly = append(readOnly, rg.ReadOnly())
		}
	}
	assert.Equal(t, []bool{true}, readOnly, "the window's region is read-only")
	err = mem.Write(extraBase, []byte("device data"))
	require.ErrorIs(t, err, vring.ErrMemoryFault)
	_, err = unix.Pread(fd, got, 0)
	require.NoError(t, err)
	assert.Equal(t, "client data", string(got), "the client's memory is unchanged")
	require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize))

	ro, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fd), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(ro)
	require.NoError(t, mapReadOnly(ctx, c, extraBase, extraSize, ro), "a read-only descriptor for a read-only window")
	require.NoError(t, mem.Read(extraBase, got))
	assert.Equal(t, "client data", string(got))
	require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize))
	err = c.DMAMap(ctx, extraBase, extraSize, ro, 0)
	assert.True(t, vfiousertest.IsErrno(err, unix.EINVAL), "a read-only descriptor for a writable window: %v", err)
}

// TestRingsInAReadOnlyWindow: a device whose rings the client maps
// read-only cannot complete anything: its first write into them faults, the
// data path catches the fault and the device reports DEVICE_NEEDS_RESET,
// and the process lives on.
func TestRingsInAReadOnlyWindow(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, d := r.driver(t)
	require.NoError(t, d.SendFrames(frames(4, 6)))
	require.NoError(t, d.Receive(ctx, 4, nil))
	require.NoError(t, c.DMAUnmap(ctx, 0, vfiousertest.GuestMemSize))
	require.NoError(t, mapReadOnly(ctx, c, 0, vfiousertest.GuestMemSize, d.Region.Fd()))
	require.NoError(t, d.SendFrames(frames(4, 7))) // restarts the data path on read-only rings
	require.Eventually(t, func() bool {
		return r.srv.Device().Status()&virtio.StatusDeviceNeedsReset != 0
	}, 5*time.Second, 10*time.Millisecond, "the device reports its data path broken")
	tx, _ := softnetCounts(r.sn)
	assert.Equal(t, uint64(4), tx, "no frame of the read-only rings was completed")
}

// TestRetiredWindowsOutliveUnmapsWithoutMemory: while the data path cannot
// be stopped (ERROR after a failed stop), the ranges of retired windows
// stay reserved across a DMA_UNMAP that releases no memory (a window
// without a descriptor, as QEMU maps pc.bios and pc.rom) and an UNMAP_ALL
// on an empty table. Those used to count as "the data path stopped" and
// unmapped the retired ranges under workers still holding slices into
// them, free for a later mmap to reuse.
func TestRetiredWindowsOutliveUnmapsWithoutMemory(t *testing.T) {
	b, srv, ctx, c, _ := stubbornSession(t)
	b.stuck.Store(true)
	require.Error(t, c.SetMigState(ctx, uint32(mdev.MigStop)), "the stop fails")
	require.True(t, srv.Device().DataPathActive())

	extra := windowFile(t, "vfu-window-retired", extraSize)
	require.NoError(t, c.DMAMap(ctx, extraBase, extraSize, extra, 0))
	require.NoError(t, c.DMAUnmap(ctx, extraBase, extraSize))
	require.Equal(t, 1, srv.RetiredWindows())

	const romBase = 0x2_0000_0000
	require.NoError(t, c.DMAMap(ctx, romBase, extraSize, -1, 0))
	require.NoError(t, c.DMAUnmap(ctx, romBase, extraSize))
	assert.Equal(t, 1, srv.RetiredWindows(), "a window without memory released the retired ranges")

	require.NoError(t, c.DMAUnmapAll(ctx))
	require.True(t, srv.Device().DataPathActive())
	require.Equal(t, 2, srv.RetiredWindows(), "guest memory retired too")
	require.NoError(t, c.DMAUnmapAll(ctx))
	assert.Equal(t, 2, srv.RetiredWindows(), "UNMAP_ALL on an empty table released the retired ranges")

	b.stuck.Store(false)
	require.NoError(t, c.Reset(ctx))
	assert.Zero(t, srv.RetiredWindows())
}

// TestNextClientDoesNotResumeThePreviousRings: a client that leaves while
// the device runs gets its data path stopped (to release its memory). The
// next client's memory is not the previous client's: its first messages
// (here a config read and SET_IRQS) must not restart the previous rings at
// their old positions in it. They used to (the server's pause was resumed
// as soon as any memory was mapped); the device now stays in STOP until
// the client restarts or resets it.
func TestNextClientDoesNotResumeThePreviousRings(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, d := r.driver(t)
	require.NoError(t, d.SendFrames(frames(4, 1)))
	require.NoError(t, d.Receive(ctx, 4, nil))
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return !r.srv.Device().DataPathActive() }, 5*time.Second, 10*time.Millisecond)

	c2 := r.dial(t)
	_, err := c2.Negotiate(ctx)
	require.NoError(t, err)
	mem := windowFile(t, "vfu-next-client", vfiousertest.GuestMemSize)
	require.NoError(t, c2.DMAMap(ctx, 0, vfiousertest.GuestMemSize, mem, 0))
	_, err = c2.ReadN(ctx, vfiouser.RegionConfig, 0, 4)
	require.NoError(t, err)
	require.NoError(t, c2.SetIRQs(ctx, vfiouser.IRQIntx, vfiouser.IRQSetActionUnmask|vfiouser.IRQSetDataNone, 0, 1))
	assert.False(t, r.srv.Device().DataPathActive(), "the previous client's rings run in the new client's memory")
	st, err := c2.MigState(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint32(mdev.MigStop), st)
	require.NoError(t, c2.Reset(ctx))
	assert.False(t, r.srv.Device().DataPathActive())
}

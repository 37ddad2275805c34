package vfiouser_test

import (
	"context"
	"encoding/binary"
	"math/bits"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestMigrationBetweenServers: a driver runs traffic on server A with DMA
// logging on (the pages the device wrote are reported), A is stopped and
// its device state read over MIG_DATA_READ, server B loads it over
// MIG_DATA_WRITE and runs, and the traffic continues on B with no frame
// lost or duplicated. It runs on split rings and on packed rings of a
// size that is not a power of two (the state stream carries the packed
// positions with their wrap counters).
func TestMigrationBetweenServers(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts *vfiousertest.DriverOptions
	}{
		{"split", nil},
		{"packed", &vfiousertest.DriverOptions{Packed: true, QueueSize: 100}},
	} {
		t.Run(tc.name, func(t *testing.T) { migrateBetweenServers(t, tc.opts) })
	}
}

func migrateBetweenServers(t *testing.T, opts *vfiousertest.DriverOptions) {
	a, b := newRig(t, nil), newRig(t, nil)
	ctx := testCtx(t)
	ca, cb := a.dial(t), b.dial(t)
	d, err := vfiousertest.NewDriver(ctx, ca, opts)
	require.NoError(t, err)
	defer d.Close()
	packed := opts != nil && opts.Packed
	require.Equal(t, packed, a.srv.Device().DriverFeatures().Has(virtio.FRingPacked))

	flags, err := ca.Feature(ctx, vfiouser.FeatureGet|vfiouser.FeatureMigration, nil, 8)
	require.NoError(t, err)
	require.Len(t, flags, 8)
	assert.NotZero(t, flags[0]&byte(vfiouser.MigrationStopCopy))

	require.NoError(t, ca.StartDMALogging(ctx, 4096, 0, vfiousertest.GuestMemSize))
	err = ca.StartDMALogging(ctx, 4096, 0, vfiousertest.GuestMemSize)
	assert.True(t, vfiousertest.IsErrno(err, unix.EBUSY), "logging started twice: %v", err)
	fs := frames(100, 5)
	var got [][]byte
	require.NoError(t, d.SendFrames(fs[:50]))
	require.NoError(t, d.Receive(ctx, 50, func(f []byte) { got = append(got, f) }))
	bm, err := ca.DMALoggingReport(ctx, 0, vfiousertest.GuestMemSize, 4096)
	require.NoError(t, err)
	dirtyPages := 0
	for _, w := range bm {
		dirtyPages += bits.OnesCount64(w)
	}
	assert.NotZero(t, dirtyPages, "the device's writes (used ring, receive buffers) are reported")
	// Reported bits are cleared: once the device has gone idle, a report
	// comes back empty. The device returns the transmit chains after it
	// delivered their replies (and re-arms notifications once the ring is
	// empty), so the transmit ring's page can be written again just after
	// Receive returns: a report may show it once more, but not for ever
	// (a report that did not clear would).
	for try := 0; ; try++ {
		bm, err = ca.DMALoggingReport(ctx, 0, vfiousertest.GuestMemSize, 4096)
		require.NoError(t, err)
		var left []int
		for i, w := range bm {
			for ; w != 0; w &= w - 1 {
				left = append(left, 64*i+bits.TrailingZeros64(w))
			}
		}
		if len(left) == 0 {
			break
		}
		require.Less(t, try, 100, "pages still reported dirty after 100 reports 10ms apart: %v", left)
		time.Sleep(10 * time.Millisecond)
	}
	// Frames in flight at the switch-over: sent on A, received on B.
	require.NoError(t, d.SendFrames(fs[50:60]))
	require.NoError(t, ca.StopDMALogging(ctx))

	require.NoError(t, d.Migrate(ctx, cb))
	st, err := cb.MigState(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint32(mdev.MigRunning), st)
	assert.Equal(t, packed, b.srv.Device().DriverFeatures().Has(virtio.FRingPacked), "the destination runs the same ring format")
	require.NoError(t, d.SendFrames(fs[60:]))
	require.NoError(t, d.Receive(ctx, 100, func(f []byte) { got = append(got, f) }))
	require.Len(t, got, len(fs))
	for i := range fs {
		require.Equal(t, fs[i], got[i], "frame %d", i)
	}
	atx, arx := softnetCounts(a.sn)
	btx, brx := softnetCounts(b.sn)
	assert.Equal(t, uint64(100), atx+btx, "every frame transmitted once")
	assert.Equal(t, uint64(100), arx+brx, "every frame received once")
	assert.NotZero(t, btx, "the destination carried traffic")
	t.Logf("source took %d and delivered %d frames, destination %d and %d", atx, arx, btx, brx)
}

func TestMigrationHostile(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, _ := r.driver(t)
	// STOP_COPY -> PRE_COPY is not an arc.
	require.NoError(t, c.SetMigState(ctx, uint32(mdev.MigStopCopy)))
	err := c.SetMigState(ctx, uint32(mdev.MigPreCopy))
	assert.True(t, vfiousertest.IsErrno(err, unix.EINVAL), "%v", err)
	// A garbage state stream is refused when leaving RESUMING.
	require.NoError(t, c.SetMigState(ctx, uint32(mdev.MigStop)))
	require.NoError(t, c.SetMigState(ctx, uint32(mdev.MigResuming)))
	require.NoError(t, c.WriteMigData(ctx, []byte("not a device state"), 7))
	err = c.SetMigState(ctx, uint32(mdev.MigStop))
	assert.True(t, vfiousertest.IsErrno(err, unix.EINVAL), "%v", err)
	// DEVICE_RESET returns the state machine to RUNNING.
	require.NoError(t, c.Reset(ctx))
	st, err := c.MigState(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint32(mdev.MigRunning), st)
	// Logging ranges that overflow.
	err = c.StartDMALogging(ctx, 4096, ^uint64(0)-4095, 8192)
	assert.True(t, vfiousertest.IsErrno(err, unix.EINVAL), "%v", err)
}

// TestPauseKeepsTheClientMigrationState: the server stops the data path
// for a memory change through mdev's state machine, but that is its own
// business: the client keeps seeing the state it set (the device is in
// STOP underneath), and the server keeps knowing whether it stopped the
// data path. GET used to report STOP, a state the client never set; a SET
// RUNNING then restarted the data path while the server still took it for
// stopped, and the next unmap went ahead under it.
func TestPauseKeepsTheClientMigrationState(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, d := r.driver(t)
	fs := frames(30, 4)
	require.NoError(t, d.SendFrames(fs[:10]))
	require.NoError(t, d.Receive(ctx, 10, nil))
	dev := r.srv.Device()
	clientSees := func(want mdev.MigState) {
		t.Helper()
		st, err := c.MigState(ctx)
		require.NoError(t, err)
		assert.Equal(t, uint32(want), st, "the state the client sees")
	}
	mapGuest := func() {
		t.Helper()
		require.NoError(t, c.DMAMap(ctx, 0, vfiousertest.GuestMemSize, d.Region.Fd(), 0))
	}
	unmapGuest := func() {
		t.Helper()
		require.NoError(t, c.DMAUnmap(ctx, 0, vfiousertest.GuestMemSize))
	}

	require.NoError(t, c.DMAUnmapAll(ctx))
	assert.Equal(t, mdev.MigStop, dev.MigrationState(), "the server stopped the data path")
	clientSees(mdev.MigRunning)

	// The client sets the state it sees, then unmaps the rings' window
	// again: the data path must not be running under that unmap.
	mapGuest()
	migrateTo(t, ctx, c, mdev.MigRunning)
	unmapGuest()
	assert.Equal(t, mdev.MigStop, dev.MigrationState(), "the data path is stopped while the rings are unmapped")
	clientSees(mdev.MigRunning)

	// Touching the device restarts the data path; the next unmap stops it
	// again. The restart runs on the session goroutine, within the posted
	// doorbell write: the frames can be back before the device's state
	// reads RUNNING, so a round trip (served after that write) comes first.
	mapGuest()
	require.NoError(t, d.SendFrames(fs[10:20]))
	require.NoError(t, d.Receive(ctx, 20, nil))
	clientSees(mdev.MigRunning)
	assert.Equal(t, mdev.MigRunning, dev.MigrationState())
	unmapGuest()
	assert.Equal(t, mdev.MigStop, dev.MigrationState(), "the data path was stopped before the rings were unmapped")
	clientSees(mdev.MigRunning)

	// A state change while paused: STOP ends the pause, RUNNING restarts.
	migrateTo(t, ctx, c, mdev.MigStop)
	mapGuest()
	migrateTo(t, ctx, c, mdev.MigRunning)
	assert.Equal(t, mdev.MigRunning, dev.MigrationState())
	require.NoError(t, d.SendFrames(fs[20:]))
	require.NoError(t, d.Receive(ctx, 30, nil))
	tx, rx := softnetCounts(r.sn)
	assert.Equal(t, uint64(30), tx)
	assert.Equal(t, uint64(30), rx)
}

// TestSetCurrentMigrationStateKeepsTheStream: setting the state the device
// is in again is a successful no-op (the kernel's FSM has no arc there).
// It used to restart the stream: STOP_COPY again rewound the read position
// (the stream's start came twice), RESUMING again dropped what had been
// written.
func TestSetCurrentMigrationStateKeepsTheStream(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, d := r.driver(t)
	require.NoError(t, d.SendFrames(frames(8, 2)))
	require.NoError(t, d.Receive(ctx, 8, nil))
	migrateTo(t, ctx, c, mdev.MigStopCopy)
	whole, err := c.ReadMigData(ctx, 64)
	require.NoError(t, err)
	require.Greater(t, len(whole), 64)
	migrateTo(t, ctx, c, mdev.MigStop)

	t.Run("STOP_COPY", func(t *testing.T) {
		migrateTo(t, ctx, c, mdev.MigStopCopy)
		head := readMig(t, c, 32)
		migrateTo(t, ctx, c, mdev.MigStopCopy)
		rest, err := c.ReadMigData(ctx, 64)
		require.NoError(t, err)
		assert.Equal(t, whole, append(head, rest...), "the stream goes on where it was")
		migrateTo(t, ctx, c, mdev.MigStop)
	})
	t.Run("RESUMING", func(t *testing.T) {
		migrateTo(t, ctx, c, mdev.MigResuming)
		half := len(whole) / 2
		require.NoError(t, c.WriteMigData(ctx, whole[:half], 50))
		migrateTo(t, ctx, c, mdev.MigResuming)
		require.NoError(t, c.WriteMigData(ctx, whole[half:], 50))
		migrateTo(t, ctx, c, mdev.MigStop) // loads the state: all of it arrived
		migrateTo(t, ctx, c, mdev.MigRunning)
		require.NoError(t, d.SendFrames(frames(4, 3)))
		require.NoError(t, d.Receive(ctx, 12, nil))
	})
}

// readMig reads n bytes of the migration stream with one MIG_DATA_READ.
func readMig(t *testing.T, c *vfiousertest.Client, n uint32) []byte {
	t.Helper()
	req := make([]byte, 8)
	binary.LittleEndian.PutUint32(req, 8+n)
	binary.LittleEndian.PutUint32(req[4:], n)
	p, err := c.Call(testCtx(t), vfiouser.CmdMigDataRead, req, nil)
	require.NoError(t, err)
	require.Len(t, p, 8+int(n))
	return p[8:]
}

// TestDeviceFeatureRules: a PROBE succeeds only when the feature supports
// every method it names (vfio-user.rst: "the probe will only return
// success if all of the indicated methods are supported"); no reply is
// longer than the request's argsz; a DMA logging report whose length is
// near 2^64 is refused, not answered with an empty bitmap (the page count
// overflowed); a MIG_DATA_READ whose argsz has no room for the size it asks
// is refused instead of answered short (a short answer ends the stream).
func TestDeviceFeatureRules(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, _ := r.driver(t)
	require.NoError(t, c.StartDMALogging(ctx, 4096, 0, vfiousertest.GuestMemSize))

	report := func(iova, length, ps uint64) []byte {
		b := make([]byte, 24)
		binary.LittleEndian.PutUint64(b, iova)
		binary.LittleEndian.PutUint64(b[8:], length)
		binary.LittleEndian.PutUint64(b[16:], ps)
		return b
	}
	const (
		get, set, probe = vfiouser.FeatureGet, vfiouser.FeatureSet, vfiouser.FeatureProbe
		mig, state      = vfiouser.FeatureMigration, vfiouser.FeatureMigDeviceState
		start, stop     = vfiouser.FeatureDMALoggingStart, vfiouser.FeatureDMALoggingStop
		rep             = vfiouser.FeatureDMALoggingRep
	)
	oneMiB := report(0, vfiousertest.GuestMemSize, 4096) // 1024 pages: 16 words
	for _, tc := range []struct {
		name  string
		flags uint32
		argsz uint32 // 0: the reply's size (8 + data)
		data  []byte
		errno unix.Errno
		reply int // payload size of a successful reply
	}{
		{"probe get migration", probe | get | mig, 0, nil, 0, 8},
		{"probe set migration", probe | set | mig, 0, nil, unix.EINVAL, 0},
		{"probe get and set state", probe | get | set | state, 0, nil, 0, 8},
		{"probe start", probe | start, 0, nil, 0, 8},
		{"probe set start", probe | set | start, 0, nil, 0, 8},
		{"probe get start", probe | get | start, 0, nil, unix.EINVAL, 0},
		{"probe get stop", probe | get | stop, 0, nil, unix.EINVAL, 0},
		{"probe get report", probe | get | rep, 0, nil, 0, 8},
		{"probe set report", probe | set | rep, 0, nil, unix.EINVAL, 0},
		{"probe unknown", probe | get | 3, 0, nil, unix.ENOTTY, 0},
		{"get migration", get | mig, 16, nil, 0, 16},
		{"get migration argsz without room", get | mig, 8, nil, unix.EINVAL, 0},
		{"get state argsz without room", get | state, 12, nil, unix.EINVAL, 0},
		{"set state argsz without room", set | state, 12, []byte{2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}, unix.EINVAL, 0},
		{"report", get | rep, 8 + 24 + 16*8, oneMiB, 0, 8 + 24 + 16*8},
		{"report argsz without the header", get | rep, 24 + 16*8, oneMiB, unix.EINVAL, 0},
		{"report length 2^64-1", get | rep, 1 << 20, report(0, ^uint64(0), 4096), unix.E2BIG, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			argsz := tc.argsz
			if argsz == 0 {
				argsz = uint32(8 + len(tc.data))
			}
			req := make([]byte, 8, 8+len(tc.data))
			binary.LittleEndian.PutUint32(req, argsz)
			binary.LittleEndian.PutUint32(req[4:], tc.flags)
			p, err := c.Call(ctx, vfiouser.CmdDeviceFeature, append(req, tc.data...), nil)
			if tc.errno != 0 {
				assert.True(t, vfiousertest.IsErrno(err, tc.errno), "want %v, got %v", tc.errno, err)
				return
			}
			require.NoError(t, err)
			require.Len(t, p, tc.reply)
			assert.LessOrEqual(t, len(p), int(argsz), "reply within argsz")
			assert.Equal(t, uint32(len(p)), binary.LittleEndian.Uint32(p), "reply argsz")
		})
	}
	st, err := c.MigState(ctx)
	require.NoError(t, err)
	require.Equal(t, uint32(mdev.MigRunning), st, "refused SETs changed nothing")

	t.Run("MIG_DATA_READ argsz without room", func(t *testing.T) {
		require.NoError(t, c.StopDMALogging(ctx))
		migrateTo(t, ctx, c, mdev.MigStopCopy)
		req := make([]byte, 8)
		binary.LittleEndian.PutUint32(req, 8+16)
		binary.LittleEndian.PutUint32(req[4:], 64)
		_, err := c.Call(ctx, vfiouser.CmdMigDataRead, req, nil)
		assert.True(t, vfiousertest.IsErrno(err, unix.EINVAL), "%v", err)
		// Nothing was consumed: the whole stream still reads.
		whole, err := c.ReadMigData(ctx, 64)
		require.NoError(t, err)
		_, err = mdev.DecodeState(whole)
		require.NoError(t, err)
	})
}

// migrateTo sets the migration state and checks the client sees it.
func migrateTo(t *testing.T, ctx context.Context, c *vfiousertest.Client, st mdev.MigState) {
	t.Helper()
	require.NoError(t, c.SetMigState(ctx, uint32(st)), "SET %s", st)
	got, err := c.MigState(ctx)
	require.NoError(t, err)
	require.Equal(t, uint32(st), got, "the state the client set")
}

package vfiouser_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
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
	"github.com/vdpakit/vdpakit/vdpa/vhostuser"
	"github.com/vdpakit/vdpakit/virtio"
)

// rig is a server for a softnet-backed device listening on a socket.
type rig struct {
	sn     *softnet.Device
	srv    *vfiouser.Server
	path   string
	cancel context.CancelFunc
	done   chan error
}

func newRig(t *testing.T, sopts *softnet.Options) *rig { return newRigTB(t, sopts) }

func newRigB(b *testing.B) *rig { return newRigTB(b, nil) }

func (r *rig) dialB(b *testing.B) *vfiousertest.Client { return r.dialTB(b) }

func newRigTB(t testing.TB, sopts *softnet.Options) *rig {
	t.Helper()
	r := &rig{}
	if sopts == nil {
		sopts = &softnet.Options{}
	}
	o := *sopts
	o.OnConfigChange = func() {
		if r.srv != nil {
			r.srv.Device().ConfigChanged()
		}
	}
	sn, err := softnet.New(&o)
	require.NoError(t, err)
	r.sn = sn
	var backing vdpa.Device
	kind := "software"
	if vhostUserBacking {
		backing, kind = vhostUserFrontend(t, sn), "vhost-user"
	} else {
		l := vdpa.NewLocal(sn, nil)
		t.Cleanup(func() { _ = l.Close() })
		backing = l
	}
	if wrapBacking != nil {
		backing = wrapBacking(backing)
	}
	r.srv, err = vfiouser.New(backing, &vfiouser.Options{Device: mdev.Options{Backend: kind}})
	require.NoError(t, err)
	r.path = filepath.Join(t.TempDir(), "vfu.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: r.path, Net: "unix"})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel, r.done = cancel, make(chan error, 1)
	go func() { r.done <- r.srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		<-r.done
		require.NoError(t, r.srv.Close())
	})
	return r
}

func (r *rig) dial(t *testing.T) *vfiousertest.Client { return r.dialTB(t) }

func (r *rig) dialTB(t testing.TB) *vfiousertest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := vfiousertest.Dial(ctx, r.path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// driver dials the rig and brings a driver up on it (closed when the test
// ends), with the test's context.
func (r *rig) driver(t *testing.T) (context.Context, *vfiousertest.Client, *vfiousertest.Driver) {
	t.Helper()
	ctx := testCtx(t)
	c := r.dial(t)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	t.Cleanup(d.Close)
	return ctx, c, d
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// frames returns n frames of mixed sizes from a broadcast source.
func frames(n int, seed int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		size := 60 + (i*37+seed)%1400
		f := make([]byte, size)
		copy(f, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x88, 0xb5})
		for j := 14; j < size; j++ {
			f[j] = byte(i + j)
		}
		out[i] = f
	}
	return out
}

func softnetCounts(sn *softnet.Device) (tx, rx uint64) {
	for i, q := range sn.Stats().Queues {
		if i%2 == 0 {
			rx += q.Frames
		} else {
			tx += q.Frames
		}
	}
	return tx, rx
}

// vhostUserBacking makes newRig put a vhost-user back-end (softnet behind
// vhostuser.Backend, reached through vhostuser.Frontend) behind the server.
var vhostUserBacking bool

// wrapBacking, when set, wraps the backing device newRig gives the server.
var wrapBacking func(vdpa.Device) vdpa.Device

func vhostUserFrontend(t testing.TB, sn *softnet.Device) vdpa.Device {
	var bo *vhostuser.BackendOptions
	if testing.Verbose() && os.Getenv("VDPAKIT_QEMU") == "1" {
		bo = &vhostuser.BackendOptions{Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	}
	be := vhostuser.NewBackend(sn, bo)
	path := filepath.Join(t.TempDir(), "vu.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- be.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done })
	dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dcancel()
	fe, err := vhostuser.Dial(dctx, path, &vhostuser.FrontendOptions{ConfigSize: virtio.NetConfigSize, NumQueues: sn.NumQueues(), MaxQueueSize: sn.MaxQueueSize()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = fe.Close() })
	return fe
}

// restartableVhostUser serves sn behind a vhost-user back-end and returns a
// Frontend that reconnects to it, and a restart that ends the back-end's
// session as a dying process would and serves a new device from newSN on
// the same socket.
func restartableVhostUser(t testing.TB, sn *softnet.Device, newSN func() *softnet.Device) (vdpa.Device, func()) {
	path := filepath.Join(t.TempDir(), "vu.sock")
	var stop func()
	var bo *vhostuser.BackendOptions
	var log *slog.Logger
	if testing.Verbose() && os.Getenv("VDPAKIT_QEMU") == "1" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
		bo = &vhostuser.BackendOptions{Logger: log}
	}
	serve := func(sn *softnet.Device) {
		be := vhostuser.NewBackend(sn, bo)
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- be.Serve(ctx, l) }()
		stop = func() { cancel(); <-done }
	}
	serve(sn)
	t.Cleanup(func() { stop() })
	dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dcancel()
	fe, err := vhostuser.Dial(dctx, path, &vhostuser.FrontendOptions{ConfigSize: virtio.NetConfigSize, NumQueues: sn.NumQueues(), MaxQueueSize: sn.MaxQueueSize(),
		Reconnect: &vhostuser.ReconnectOptions{Interval: 20 * time.Millisecond, Logger: log}})
	require.NoError(t, err)
	// Closed before the back-end stops (cleanups run last first): a
	// Frontend whose back-end went away would wait for it.
	t.Cleanup(func() { _ = fe.Close() })
	return fe, func() {
		stop()
		serve(newSN())
	}
}

func TestBringUpAndTraffic(t *testing.T) {
	for _, tc := range []struct {
		name      string
		intx      bool
		vhostUser bool
		packed    bool
	}{
		{"msix", false, false, false}, {"intx", true, false, false},
		{"vhost-user/msix", false, true, false}, {"vhost-user/intx", true, true, false},
		{"packed/msix", false, false, true}, {"packed/intx", true, false, true},
		{"vhost-user/packed/msix", false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vhostUserBacking = tc.vhostUser
			defer func() { vhostUserBacking = false }()
			r := newRig(t, nil)
			c := r.dial(t)
			ctx := testCtx(t)
			o := &vfiousertest.DriverOptions{INTx: tc.intx, ReplaceIRQs: true}
			if tc.packed {
				// Packed rings (virtio 1.2 §2.8) of a size that is not a
				// power of two: 300 frames wrap them several times.
				o.Packed, o.QueueSize = true, 50
			}
			d, err := vfiousertest.NewDriver(ctx, c, o)
			require.NoError(t, err)
			defer d.Close()
			assert.Equal(t, tc.packed, d.Features.Has(virtio.FRingPacked))
			assert.Equal(t, tc.packed, r.srv.Device().DriverFeatures().Has(virtio.FRingPacked))

			// The configuration space the client reads is mdev.Layout's.
			l := r.srv.Device().Layout()
			require.Len(t, d.Caps, len(l.Capabilities))
			for i, cp := range l.Capabilities {
				assert.Equal(t, cp.ConfigOffset, d.Caps[i].Offset)
				assert.Equal(t, cp.CfgType, d.Caps[i].CfgType)
				assert.Equal(t, cp.Bar, d.Caps[i].Bar)
				assert.Equal(t, cp.Offset, d.Caps[i].BarOffset)
				assert.Equal(t, cp.Length, d.Caps[i].Length)
			}
			require.NotZero(t, d.MSIXCap)
			for _, b := range l.BARs {
				ri, err := c.RegionInfo(ctx, uint32(b.Index))
				require.NoError(t, err)
				assert.Equal(t, b.Size, ri.Size, "BAR %d", b.Index)
			}

			const n = 300
			fs := frames(n, 0)
			var got [][]byte
			for i := 0; i < n; i += 32 {
				require.NoError(t, d.SendFrames(fs[i:min(i+32, n)]))
				require.NoError(t, d.Receive(ctx, uint64(min(i+32, n)), func(f []byte) { got = append(got, f) }))
			}
			require.Len(t, got, n)
			for i := range fs {
				require.Equal(t, fs[i], got[i], "frame %d", i)
			}
			tx, rx := softnetCounts(r.sn)
			assert.Equal(t, d.Sent, tx, "frames the guest sent = frames the device took")
			assert.Equal(t, d.Received, rx, "frames the guest received = frames the device delivered")
			assert.Equal(t, uint64(n), tx)
			if tc.intx {
				assert.NotZero(t, r.srv.Stats().IntxTriggers)
			}
		})
	}
}

func TestLinkChangeRaisesConfigInterrupt(t *testing.T) {
	r := newRig(t, nil)
	c := r.dial(t)
	ctx := testCtx(t)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	defer d.Close()
	_, _ = d.IRQ(0).TryWait()
	r.sn.SetLinkUp(false)
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = d.IRQ(0).Wait(wctx)
	require.NoError(t, err, "config interrupt on MSI-X vector 0")
	isr, err := d.ReadISR(ctx)
	require.NoError(t, err)
	assert.Equal(t, mdev.ISRConfig, isr&mdev.ISRConfig)
}

func TestDisconnectKeepsDeviceStateAndReconnects(t *testing.T) {
	r := newRig(t, nil)
	c := r.dial(t)
	ctx := testCtx(t)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	defer d.Close()
	require.NoError(t, d.SendFrames(frames(4, 1)))
	require.NoError(t, d.Receive(ctx, 4, nil))
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return len(r.srv.Memory().Regions()) == 0 }, 5*time.Second, 10*time.Millisecond)
	assert.NotZero(t, r.srv.Device().Status()&0x04, "device state kept across the disconnect")

	// A new client re-establishes memory and interrupts and, as the data
	// path was stopped (STOP) when the first client left, restarts it: it
	// continues where it was. The server cannot tell the new client's
	// memory is the same, so it does not restart it by itself.
	c2 := r.dial(t)
	_, err = c2.Negotiate(ctx)
	require.NoError(t, err)
	require.NoError(t, c2.DMAMap(ctx, 0, vfiousertest.GuestMemSize, d.Region.Fd(), 0))
	fds := make([]int, 0, 3)
	for v := 0; v < 3; v++ {
		fds = append(fds, d.IRQ(v).Fd())
	}
	require.NoError(t, c2.SetIRQEventfds(ctx, vfiouser.IRQMSIX, 0, 3, fds))
	st, err := c2.MigState(ctx)
	require.NoError(t, err)
	require.Equal(t, uint32(mdev.MigStop), st)
	require.NoError(t, c2.SetMigState(ctx, uint32(mdev.MigRunning)))
	d.C = c2
	require.NoError(t, d.SendFrames(frames(4, 2)))
	require.NoError(t, d.Receive(ctx, 8, nil))
}

func fdCount(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}

func TestHostileInput(t *testing.T) {
	type tc struct {
		name    string
		cmd     vfiouser.Command
		payload []byte
		fds     int // eventfds to attach
		errno   unix.Errno
		closes  bool // the server ends the session
	}
	le32 := func(vs ...uint32) []byte {
		b := make([]byte, 4*len(vs))
		for i, v := range vs {
			b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
		}
		return b
	}
	access := func(off uint64, region, count uint32, data []byte) []byte {
		b := make([]byte, vfiouser.RegionAccessSize, vfiouser.RegionAccessSize+len(data))
		vfiouser.RegionAccess{Offset: off, Region: region, Count: count}.Put(b)
		return append(b, data...)
	}
	dmaMap := func(addr, size uint64) []byte {
		return vfiouser.DMAMap{Argsz: 32, Flags: 3, Address: addr, Size: size}.Marshal()
	}
	cases := []tc{
		{"unknown command", 99, nil, 0, unix.ENOSYS, false},
		{"region io fds unsupported", vfiouser.CmdGetRegionIOFDs, le32(16, 0, 0, 0), 0, unix.ENOSYS, false},
		{"device info truncated", vfiouser.CmdDeviceGetInfo, le32(16), 0, unix.EINVAL, false},
		{"device info bad argsz", vfiouser.CmdDeviceGetInfo, le32(8, 0, 0, 0), 0, unix.EINVAL, false},
		{"region info index", vfiouser.CmdDeviceGetRegionInfo, append(le32(32, 0, 9, 0), make([]byte, 16)...), 0, unix.EINVAL, false},
		{"irq info index", vfiouser.CmdDeviceGetIRQInfo, le32(16, 0, 5, 0), 0, unix.EINVAL, false},
		{"set irqs index", vfiouser.CmdDeviceSetIRQs, le32(20, vfiouser.IRQSetDataNone|vfiouser.IRQSetActionTrigger, 7, 0, 1), 0, unix.EINVAL, false},
		{"set irqs past the vectors", vfiouser.CmdDeviceSetIRQs, le32(20, vfiouser.IRQSetDataNone|vfiouser.IRQSetActionTrigger, 2, 2, 5), 0, unix.EINVAL, false},
		{"set irqs two data flags", vfiouser.CmdDeviceSetIRQs, le32(20, 3|vfiouser.IRQSetActionTrigger, 2, 0, 1), 0, unix.EINVAL, false},
		{"set irqs fewer fds than count", vfiouser.CmdDeviceSetIRQs, le32(20, vfiouser.IRQSetDataEventfd|vfiouser.IRQSetActionTrigger, 2, 0, 3), 2, unix.EBADF, false},
		{"set irqs bool argsz", vfiouser.CmdDeviceSetIRQs, le32(20, vfiouser.IRQSetDataBool|vfiouser.IRQSetActionTrigger, 2, 0, 3), 0, unix.EINVAL, false},
		{"mask msix", vfiouser.CmdDeviceSetIRQs, le32(20, vfiouser.IRQSetDataNone|vfiouser.IRQSetActionMask, 2, 0, 1), 0, unix.EINVAL, false},
		{"fds on a read", vfiouser.CmdRegionRead, access(0, vfiouser.RegionConfig, 4, nil), 1, unix.EBADF, false},
		{"read past config", vfiouser.CmdRegionRead, access(254, vfiouser.RegionConfig, 4, nil), 0, unix.EINVAL, false},
		{"read empty region", vfiouser.CmdRegionRead, access(0, 0, 4, nil), 0, unix.EINVAL, false},
		{"read region 12", vfiouser.CmdRegionRead, access(0, 12, 4, nil), 0, unix.EINVAL, false},
		{"read odd size in a BAR", vfiouser.CmdRegionRead, access(0, 4, 3, nil), 0, unix.EINVAL, false},
		{"read huge count", vfiouser.CmdRegionRead, access(0, 4, 1<<30, nil), 0, unix.E2BIG, false},
		{"read offset overflow", vfiouser.CmdRegionRead, access(^uint64(0)-1, 4, 4, nil), 0, unix.EINVAL, false},
		{"write count mismatch", vfiouser.CmdRegionWrite, access(0, 4, 4, []byte{1, 2}), 0, unix.EINVAL, false},
		{"write misaligned register", vfiouser.CmdRegionWrite, access(1, 4, 2, []byte{1, 2}), 0, unix.EINVAL, false},
		{"write past BAR", vfiouser.CmdRegionWrite, access(1<<30, 4, 4, []byte{1, 2, 3, 4}), 0, unix.EINVAL, false},
		{"write multi zero", vfiouser.CmdRegionWriteMulti, make([]byte, 8), 0, unix.E2BIG, false},
		{"dma map without fd is accepted but overlapping one is not", vfiouser.CmdDMAMap, dmaMap(0x1000_0000, 0x1000), 0, 0, false},
		{"dma map overlap", vfiouser.CmdDMAMap, dmaMap(0x1000_0800, 0x1000), 0, unix.EEXIST, false},
		{"dma map overflow", vfiouser.CmdDMAMap, dmaMap(^uint64(0)-0xfff, 0x2000), 0, unix.EINVAL, false},
		{"dma map zero size", vfiouser.CmdDMAMap, dmaMap(0x2000_0000, 0), 0, unix.EINVAL, false},
		{"dma map bad argsz", vfiouser.CmdDMAMap, vfiouser.DMAMap{Argsz: 8, Flags: 3, Address: 0x3000_0000, Size: 0x1000}.Marshal(), 0, unix.EINVAL, false},
		{"dma map eventfd is not memory", vfiouser.CmdDMAMap, dmaMap(0x4000_0000, 0x1000), 1, unix.EINVAL, false},
		{"dma map two fds", vfiouser.CmdDMAMap, dmaMap(0x5000_0000, 0x1000), 2, unix.EBADF, false},
		{"dma unmap unknown", vfiouser.CmdDMAUnmap, vfiouser.DMAUnmap{Argsz: 24, Address: 0x7000_0000, Size: 0x1000}.Marshal(), 0, unix.ENOENT, false},
		{"dma unmap partial", vfiouser.CmdDMAUnmap, vfiouser.DMAUnmap{Argsz: 24, Address: 0x1000_0000, Size: 0x800}.Marshal(), 0, unix.ENOENT, false},
		{"dma unmap dirty bitmap", vfiouser.CmdDMAUnmap, vfiouser.DMAUnmap{Argsz: 24, Flags: 1, Address: 0x1000_0000, Size: 0x1000}.Marshal(), 0, unix.EINVAL, false},
		{"reset with payload", vfiouser.CmdDeviceReset, []byte{1}, 0, unix.EINVAL, false},
		{"device feature unknown", vfiouser.CmdDeviceFeature, le32(16, vfiouser.FeatureGet|3), 0, unix.ENOTTY, false},
		{"mig state error", vfiouser.CmdDeviceFeature, append(le32(16, vfiouser.FeatureSet|2), le32(0, 0)...), 0, unix.EINVAL, false},
		{"mig data read while running", vfiouser.CmdMigDataRead, le32(64, 16), 0, unix.EINVAL, false},
		{"mig data write while running", vfiouser.CmdMigDataWrite, le32(64, 2, 0), 0, unix.EINVAL, false},
		{"logging report before start", vfiouser.CmdDeviceFeature, append(le32(64, vfiouser.FeatureGet|8), make([]byte, 24)...), 0, unix.EINVAL, false},
		{"second version", vfiouser.CmdVersion, vfiouser.Version{}.Marshal(), 0, unix.ENOTSUP, true},
	}
	r := newRig(t, nil)
	other := newRig(t, nil) // another server whose client keeps its traffic going
	ctx := testCtx(t)
	oc := other.dial(t)
	od, err := vfiousertest.NewDriver(ctx, oc, nil)
	require.NoError(t, err)
	defer od.Close()

	before := fdCount(t)
	c := r.dial(t)
	_, err = c.Negotiate(ctx)
	require.NoError(t, err)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var fds []int
			for i := 0; i < tc.fds; i++ {
				e, err := vdpa.NewEventFD()
				require.NoError(t, err)
				defer e.Close()
				fds = append(fds, e.Fd())
			}
			_, err := c.Call(ctx, tc.cmd, tc.payload, fds)
			if tc.errno == 0 {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.True(t, vfiousertest.IsErrno(err, tc.errno), "want errno %v, got %v", tc.errno, err)
			if tc.closes {
				_, _, err := c.ReadReply(ctx)
				require.Error(t, err, "session closed")
				return
			}
			_, err = c.DeviceInfo(ctx)
			require.NoError(t, err, "session survives")
		})
		// The other server's client is unharmed.
		require.NoError(t, od.SendFrames(frames(2, 3)))
		require.NoError(t, od.Receive(ctx, od.Sent, nil))
	}
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return fdCount(t) <= before }, 5*time.Second, 10*time.Millisecond,
		"descriptors leaked: %d before, %d after", before, fdCount(t))
}

func TestFramingErrorsCloseTheSession(t *testing.T) {
	r := newRig(t, nil)
	ctx := testCtx(t)
	for _, tc := range []struct {
		name string
		msg  []byte
	}{
		{"size below the header", func() []byte {
			b := make([]byte, 16)
			vfiouser.Header{ID: 1, Command: vfiouser.CmdVersion, Size: 8}.Put(b)
			return b
		}()},
		{"oversized", func() []byte {
			b := make([]byte, 16)
			vfiouser.Header{ID: 1, Command: vfiouser.CmdRegionWrite, Size: 64 << 20}.Put(b)
			return b
		}()},
		{"reserved flags", func() []byte {
			b := make([]byte, 16)
			vfiouser.Header{ID: 1, Command: vfiouser.CmdDeviceGetInfo, Size: 16, Flags: 1 << 9}.Put(b)
			return b
		}()},
		{"command before version", vfiousertest.Message(1, vfiouser.CmdDeviceGetInfo, 0, make([]byte, 16))},
		{"reply before version", vfiousertest.Message(1, vfiouser.CmdVersion, vfiouser.TypeReply, vfiouser.Version{}.Marshal())},
		{"version major 1", vfiousertest.Message(1, vfiouser.CmdVersion, 0, vfiouser.Version{Major: 1}.Marshal())},
		{"version json not terminated", vfiousertest.Message(1, vfiouser.CmdVersion, 0, []byte{0, 0, 0, 0, '{', '}'})},
		{"version json garbage", vfiousertest.Message(1, vfiouser.CmdVersion, 0, []byte{0, 0, 0, 0, '{', 0})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := r.dial(t)
			require.NoError(t, c.SendRaw(tc.msg, nil))
			h, _, err := c.ReadReply(ctx)
			if err == nil {
				assert.NotZero(t, h.Flags&vfiouser.FlagError, "an error reply")
				_, _, err = c.ReadReply(ctx)
			}
			// A closed connection, not the client's read deadline: a
			// server that ignored the message would fail here.
			require.True(t, errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET), "the server closed the session: %v", err)
		})
	}
	// A truncated message followed by a hang-up.
	c := r.dial(t)
	_, err := c.Negotiate(ctx)
	require.NoError(t, err)
	require.NoError(t, c.SendRaw(vfiousertest.Message(2, vfiouser.CmdDeviceGetInfo, 0, make([]byte, 16))[:20], nil))
	require.NoError(t, c.Close())
	// The server still serves the next client.
	c = r.dial(t)
	_, err = c.Negotiate(ctx)
	require.NoError(t, err)
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err)
}

// TestTooManyDescriptorsCloseTheSession: a message with more descriptors
// than the max_msg_fds the server announced gets an EBADF error reply and
// ends the session, whatever the message. The kernel closes the
// descriptors that do not fit the server's buffer and flags the message
// MSG_CTRUNC; the server must not serve the message with those that fit
// (it used to: a SET_IRQS with one eventfd too many was answered as a
// count mismatch and the session went on). Found by FuzzServerSession.
func TestTooManyDescriptorsCloseTheSession(t *testing.T) {
	r := newRig(t, nil)
	ctx := testCtx(t)
	irqs := func(count uint32) []byte {
		return vfiouser.IRQSet{Flags: vfiouser.IRQSetDataEventfd | vfiouser.IRQSetActionTrigger,
			Index: vfiouser.IRQMSIX, Count: count}.Marshal()
	}
	for _, tc := range []struct {
		name      string
		cmd       vfiouser.Command
		flags     uint32
		payload   []byte
		fds       int
		closes    bool
		negotiate bool
	}{
		{"max_msg_fds is accepted", vfiouser.CmdDeviceSetIRQs, 0, irqs(vfiouser.MaxMsgFds), vfiouser.MaxMsgFds, false, true},
		{"set irqs", vfiouser.CmdDeviceSetIRQs, 0, irqs(vfiouser.MaxMsgFds + 1), vfiouser.MaxMsgFds + 1, true, true},
		{"dma map", vfiouser.CmdDMAMap, 0, vfiouser.DMAMap{Argsz: 32, Flags: 3, Size: 4096}.Marshal(), vfiouser.MaxMsgFds + 4, true, true},
		{"no reply wanted", vfiouser.CmdDeviceReset, vfiouser.FlagNoReply, nil, vfiouser.MaxMsgFds + 1, true, true},
		{"before version", vfiouser.CmdVersion, 0, vfiouser.Version{}.Marshal(), vfiouser.MaxMsgFds + 1, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := fdCount(t)
			c := r.dial(t)
			c.Timeout = 2 * time.Second
			if tc.negotiate {
				_, err := c.Negotiate(ctx)
				require.NoError(t, err)
			}
			var efds []*vdpa.EventFD
			var fds []int
			for i := 0; i < tc.fds; i++ {
				e, err := vdpa.NewEventFD()
				require.NoError(t, err)
				efds = append(efds, e)
				fds = append(fds, e.Fd())
			}
			require.NoError(t, c.SendRaw(vfiousertest.Message(7, tc.cmd, tc.flags, tc.payload), fds))
			for _, e := range efds {
				require.NoError(t, e.Close())
			}
			h, _, err := c.ReadReply(ctx)
			require.NoError(t, err, "a reply, even to a No_reply command")
			assert.Equal(t, uint16(7), h.ID)
			require.NotZero(t, h.Flags&vfiouser.FlagError, "an error reply")
			if !tc.closes {
				// count 16 on an index with 3 vectors: refused, but
				// only for the range.
				assert.Equal(t, uint32(unix.EINVAL), h.Error)
				_, err = c.DeviceInfo(ctx)
				require.NoError(t, err, "the session goes on")
			} else {
				assert.Equal(t, uint32(unix.EBADF), h.Error)
				// Closed, not just quiet: a read timeout does not count.
				_, _, err = c.ReadReply(ctx)
				require.True(t, errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET), "the server closed the session: %v", err)
			}
			require.NoError(t, c.Close())
			require.Eventually(t, func() bool { return fdCount(t) <= before }, 5*time.Second, 10*time.Millisecond,
				"descriptors leaked: %d before, %d after", before, fdCount(t))
		})
	}
}

func TestNewRejectsServerOwnedOptions(t *testing.T) {
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	backing := vdpa.NewLocal(sn, nil)
	defer backing.Close()
	_, err = vfiouser.New(backing, &vfiouser.Options{Device: mdev.Options{Vector: func(uint16) *vdpa.EventFD { return nil }}})
	require.True(t, errors.Is(err, mdev.ErrInvalidOptions))
}

// TestDMAChangesUnderTraffic: windows mapped and unmapped while the data
// path runs (QEMU does this for memory hot-plug and PCI holes) stop and
// restart it without losing a frame; a window whose file is too short is
// refused; no descriptor leaks.
func TestDMAChangesUnderTraffic(t *testing.T) {
	r := newRig(t, nil)
	ctx := testCtx(t)
	before := fdCount(t)
	c := r.dial(t)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	fs := frames(60, 9)
	require.NoError(t, d.SendFrames(fs[:20]))
	require.NoError(t, d.Receive(ctx, 20, nil))

	extra, err := unix.MemfdCreate("extra", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	require.NoError(t, unix.Ftruncate(extra, 1<<20))
	const base = 0x1_0000_0000
	require.NoError(t, c.DMAMap(ctx, base, 1<<20, extra, 0))
	// In flight across the unmap: sent before, received after.
	require.NoError(t, d.SendFrames(fs[20:40]))
	require.NoError(t, c.DMAUnmap(ctx, base, 1<<20))
	require.NoError(t, d.Receive(ctx, 40, nil))

	// A window longer than its file would fault: refused.
	err = c.DMAMap(ctx, base, 2<<20, extra, 0)
	assert.True(t, vfiousertest.IsErrno(err, unix.EINVAL), "%v", err)
	// Unmapping the window the rings live in stops the data path until
	// memory is mapped again and the client touches the device.
	require.NoError(t, c.DMAUnmap(ctx, 0, vfiousertest.GuestMemSize))
	require.NoError(t, c.DMAMap(ctx, 0, vfiousertest.GuestMemSize, d.Region.Fd(), 0))
	require.NoError(t, d.SendFrames(fs[40:]))
	require.NoError(t, d.Receive(ctx, 60, nil))
	tx, rx := softnetCounts(r.sn)
	assert.Equal(t, uint64(60), tx)
	assert.Equal(t, uint64(60), rx)

	require.NoError(t, unix.Close(extra))
	d.Close()
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return fdCount(t) <= before }, 5*time.Second, 10*time.Millisecond,
		"descriptors leaked: %d before, %d after", before, fdCount(t))
}

// TestDisconnectStopsDMALogging: a client that started DMA logging and went
// away (a migration source that crashed) leaves no tracking behind: the
// device's dirty tracking ends with the session, and the next client can
// start logging of its own.
func TestDisconnectStopsDMALogging(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, d := r.driver(t)
	require.NoError(t, c.StartDMALogging(ctx, 4096, 0, vfiousertest.GuestMemSize))
	require.NotEqual(t, mdev.DirtyAuto, r.srv.Device().DirtyTracking(), "tracking on while the client logs")
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return r.srv.Device().DirtyTracking() == mdev.DirtyAuto },
		5*time.Second, 10*time.Millisecond, "tracking ended with the session")

	c2 := r.dial(t)
	_, err := c2.Negotiate(ctx)
	require.NoError(t, err)
	require.NoError(t, c2.DMAMap(ctx, 0, vfiousertest.GuestMemSize, d.Region.Fd(), 0))
	require.NoError(t, c2.StartDMALogging(ctx, 4096, 0, vfiousertest.GuestMemSize), "the next client's logging")
	require.NoError(t, c2.StopDMALogging(ctx))
}

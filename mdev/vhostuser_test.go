package mdev_test

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// vhostUserSide is a mediated device backed by a vhost-user back-end (the
// software device behind vhostuser.Backend on a unix socket).
func vhostUserSide(t *testing.T, size uint64, mode mdev.DirtyMode) *side {
	t.Helper()
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	be := vhostuser.NewBackend(sn, nil)
	path := filepath.Join(t.TempDir(), "vu.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- be.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done })
	dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dcancel()
	fe, err := vhostuser.Dial(dctx, path, &vhostuser.FrontendOptions{ConfigSize: virtio.NetConfigSize})
	require.NoError(t, err)
	t.Cleanup(func() { _ = fe.Close() })
	r, err := vring.NewMemfdRegion(0, size, &vring.RegionOptions{Name: "guest"})
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	dev, err := mdev.NewDevice(fe, &mdev.Options{Memory: mem, Backend: "vhost-user", DirtyMode: mode})
	require.NoError(t, err)
	t.Cleanup(func() { _ = dev.Close() })
	return &side{mem: mem, dev: dev}
}

// Migration between two vhost-user back-ends under traffic: with the
// back-end's own log (SET_LOG_BASE with a shared bitmap, LOG_ALL
// negotiated) and with the relay, on split and packed guest rings (packed:
// the back-end logs used descriptors in the descriptor ring; the relay runs
// split shadow rings behind the packed guest ring).
func TestMigrateVhostUser(t *testing.T) {
	for _, rf := range ringFormats {
		for _, mode := range []mdev.DirtyMode{mdev.DirtyDeviceLog, mdev.DirtyRelay} {
			t.Run(rf.name+"/"+mode.String(), func(t *testing.T) {
				const frames = 20000
				src := vhostUserSide(t, testGuestMem, mode)
				dst := vhostUserSide(t, testGuestMem, mode)
				m := startMigration(t, src, dst, migrationOptions{size: testGuestMem, frames: frames, guest: rf.guest,
					rate: 5000, seed: 3, dstSeed: 4, log: &dirty.Options{Shared: true}})
				packed := rf.guest != nil
				require.Equal(t, packed, src.dev.DriverFeatures().Has(virtio.FRingPacked))
				waitFor(t, msg("traffic"), func() bool { s, _, _, _ := m.g.Stats(); return s >= frames/4 })

				rep := m.switchOver(dirty.TrackerOptions{Bandwidth: 2e9, DowntimeTarget: 2 * time.Millisecond, MaxRounds: 8})
				assert.Equal(t, mode, rep.Mode)
				m.finish()
				assert.Equal(t, packed, dst.dev.DriverFeatures().Has(virtio.FRingPacked))
			})
		}
	}
}

// vhostUserServer serves a fresh softnet device at path until stop; a
// second call after stop is the back-end's process started again.
func vhostUserServer(t *testing.T, path string) (stop func()) {
	t.Helper()
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	be := vhostuser.NewBackend(sn, nil)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = be.Serve(ctx, l); close(done) }()
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	t.Cleanup(stop)
	return stop
}

// A mediated device backed by a vhost-user back-end whose process restarts
// under traffic, twice: with FrontendOptions.Reconnect the Frontend hands
// the session to each new back-end, and the guest's device never fails
// (no DEVICE_NEEDS_RESET); its frames keep flowing, none corrupt. On split
// and packed guest rings.
func TestVhostUserBackendRestart(t *testing.T) {
	for _, rf := range ringFormats {
		t.Run(rf.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "vu.sock")
			stop := vhostUserServer(t, path)
			dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer dcancel()
			fe, err := vhostuser.Dial(dctx, path, &vhostuser.FrontendOptions{ConfigSize: virtio.NetConfigSize,
				Reconnect: &vhostuser.ReconnectOptions{Interval: 10 * time.Millisecond}})
			require.NoError(t, err)
			t.Cleanup(func() { _ = fe.Close() })
			r, err := vring.NewMemfdRegion(0, testGuestMem, &vring.RegionOptions{Name: "guest"})
			require.NoError(t, err)
			mem, err := vring.NewMemory(r)
			require.NoError(t, err)
			t.Cleanup(func() { _ = mem.Close() })
			dev, err := mdev.NewDevice(fe, &mdev.Options{Memory: mem, Backend: "vhost-user"})
			require.NoError(t, err)
			t.Cleanup(func() { _ = dev.Close() })
			g, err := mdevtest.Boot(dev, mem, 1<<40, rf.guest)
			require.NoError(t, err)
			ctx, cancel := context.WithCancel(context.Background())
			ran := make(chan struct{})
			go func() { _ = g.Run(ctx); close(ran) }()
			t.Cleanup(func() { cancel(); <-ran })
			received := func() uint64 { _, rcv, _, _ := g.Stats(); return rcv }
			t.Cleanup(func() {
				if t.Failed() {
					sent, rcv, dup, bad := g.Stats()
					t.Logf("guest: sent %d received %d dup %d bad %d; reconnects %d; device err %v status %v",
						sent, rcv, dup, bad, fe.Reconnects(), dev.Err(), dev.Status())
				}
			})
			waitFor(t, msg("traffic"), func() bool { return received() >= 2000 })
			for round := 1; round <= 2; round++ {
				stop()
				time.Sleep(50 * time.Millisecond)
				stop = vhostUserServer(t, path)
				waitFor(t, msg("the Frontend reconnected"), func() bool { return fe.Reconnects() == uint64(round) })
				from := received()
				waitFor(t, msg("traffic on the new back-end"), func() bool { return received() >= from+2000 })
				require.NoError(t, dev.Err(), "round %d", round)
				assert.Zero(t, dev.Status()&virtio.StatusDeviceNeedsReset, "round %d: status %v", round, dev.Status())
			}
			cancel()
			<-ran
			sent, rcv, dup, bad := g.Stats()
			t.Logf("sent %d, received %d, duplicates %d (chains the old back-end took without using them are taken again), corrupt %d", sent, rcv, dup, bad)
			assert.Zero(t, bad, "corrupt frames")
			// Closed while the back-end serves: a Frontend whose back-end
			// went away would wait for its return (ReconnectOptions).
			require.NoError(t, dev.Close())
			require.NoError(t, fe.Close())
		})
	}
}

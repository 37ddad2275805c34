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

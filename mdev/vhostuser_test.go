package mdev_test

import (
	"context"
	"fmt"
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
// negotiated) and with the relay.
func TestMigrateVhostUser(t *testing.T) {
	for _, mode := range []mdev.DirtyMode{mdev.DirtyDeviceLog, mdev.DirtyRelay} {
		t.Run(mode.String(), func(t *testing.T) {
			const frames = 20000
			src := vhostUserSide(t, testGuestMem, mode)
			dst := vhostUserSide(t, testGuestMem, mode)
			g, err := mdevtest.Boot(src.dev, src.mem, frames, nil)
			require.NoError(t, err)
			scratch := mdevtest.Layout(nil)
			dirtier, err := mdevtest.NewDirtier(src.mem, scratch, testGuestMem, 5000, 3)
			require.NoError(t, err)
			log, err := dirty.New(testGuestMem, &dirty.Options{Shared: true})
			require.NoError(t, err)
			closeLogAfter(t, log, src, dst)
			g.SetLog(log)
			dirtier.SetLog(log)
			v := startVCPUs(t, g, dirtier)
			waitFor(t, msg("traffic"), func() bool { s, _, _, _ := g.Stats(); return s >= frames/4 })

			c1, c2 := net.Pipe()
			defer c1.Close()
			defer c2.Close()
			var dstHash [32]byte
			var dg *mdevtest.Guest
			var dv *vcpus
			errc := make(chan error, 1)
			go func() {
				_, err := mdev.MigrateDestination(context.Background(), c2, mdev.DestOptions{
					Device: dst.dev, Memory: dst.mem,
					Loaded: func() error { dstHash = memHash(dst.mem); return nil },
					StartGuest: func() error {
						var err error
						if dg, err = mdevtest.Attach(dst.dev, dst.mem); err != nil {
							return err
						}
						d2, err := mdevtest.NewDirtier(dst.mem, scratch, testGuestMem, 5000, 4)
						if err != nil {
							return err
						}
						dv = startVCPUs(t, dg, d2)
						return nil
					},
				})
				errc <- err
			}()
			rep, err := mdev.MigrateSource(context.Background(), c1, mdev.SourceOptions{
				Device: src.dev, Memory: src.mem, Log: log,
				Tracker:   dirty.TrackerOptions{Bandwidth: 2e9, DowntimeTarget: 2 * time.Millisecond, MaxRounds: 8},
				StopGuest: v.stop,
			})
			require.NoError(t, err)
			require.NoError(t, <-errc)
			assert.Equal(t, mode, rep.Mode)
			assert.Equal(t, memHash(src.mem), dstHash, "guest memory identical at switchover")
			waitFor(t, func() string { return fmt.Sprint(dg.Stats()) }, dg.Done)
			require.NoError(t, dv.stop())
			require.NoError(t, dg.Verify())
		})
	}
}

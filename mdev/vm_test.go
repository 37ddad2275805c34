package mdev_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/internal/vmrig"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// simSide is a mediated device backed by a kernel vdpa_sim_net device
// (through /dev/vhost-vdpa-N).
func simSide(t *testing.T, name string, size uint64) *side {
	t.Helper()
	return kernelSide(t, name, vmrig.AddSimNet(t, name, "mac", "02:00:00:00:00:01"), size)
}

// vduseSide is a mediated device backed by a VDUSE device served by the
// software virtio-net device, bound to vhost_vdpa: guest -> mdev ->
// /dev/vhost-vdpa-N -> kernel -> VDUSE -> softnet, and back.
func vduseSide(t *testing.T, name string, size uint64) *side {
	t.Helper()
	testenv.RequireVM(t)
	testenv.RequireRoot(t)
	testenv.RequireModule(t, "vduse")
	testenv.RequireModule(t, "vhost_vdpa")
	testenv.RequireFile(t, "/dev/vduse/control")
	sn, err := softnet.New(&softnet.Options{AccessPlatform: true, NoCtrlVQ: true, MaxQueueSize: 256})
	require.NoError(t, err)
	vmrig.ServeVDUSE(t, name, sn)
	return kernelSide(t, name, testenv.VhostVDPAPath(t, name), size)
}

// kernelSide is a mediated device over the vDPA device name, bound to
// vhost_vdpa at path.
func kernelSide(t *testing.T, name, path string, size uint64) *side {
	t.Helper()
	kd, err := kernel.Open(path, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = kd.Close() })
	r, err := vring.NewMemfdRegion(0, size, &vring.RegionOptions{Name: name})
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	dev, err := mdev.NewDevice(kd, &mdev.Options{Memory: mem, Backend: "vhost-vdpa"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = dev.Close() })
	return &side{mem: mem, dev: dev}
}

// The mediated device backed by the kernel's vdpa_sim_net migrates with
// traffic: vhost-vdpa cannot log, so dirty tracking runs through the shadow
// relay, whose shadow rings the kernel device reaches through its IOTLB.
func TestVMMigrateVdpaSimNet(t *testing.T) {
	migrateKernel(t, simSide(t, "mdev-src", vmGuestMem), simSide(t, "mdev-dst", vmGuestMem))
}

// The same over VDUSE devices served by the software device.
func TestVMMigrateVDUSE(t *testing.T) {
	migrateKernel(t, vduseSide(t, "mdev-vduse-src", vmGuestMem), vduseSide(t, "mdev-vduse-dst", vmGuestMem))
}

const vmGuestMem = 16 << 20

func migrateKernel(t *testing.T, src, dst *side) {
	const size = vmGuestMem
	const frames = 3000
	opts := &mdevtest.Options{Features: virtio.FAccessPlatform.Bit(), MaxFrames: frames}
	g, err := mdevtest.Boot(src.dev, src.mem, frames, opts)
	require.NoError(t, err)
	scratch := mdevtest.Layout(opts)
	dirtier, err := mdevtest.NewDirtier(src.mem, scratch, size, 2000, 1)
	require.NoError(t, err)
	log, err := dirty.New(size, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, src, dst)
	g.SetLog(log)
	dirtier.SetLog(log)
	v := startVCPUs(t, g, dirtier)
	waitFor(t, msg("traffic on the source"), func() bool { s, _, _, _ := g.Stats(); return s >= frames/3 })

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
				d2, err := mdevtest.NewDirtier(dst.mem, scratch, size, 2000, 2)
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
		Tracker:   dirty.TrackerOptions{Bandwidth: 1e8, DowntimeTarget: 50 * time.Millisecond, MaxRounds: 5},
		StopGuest: v.stop,
	})
	require.NoError(t, err)
	require.NoError(t, <-errc)
	assert.Equal(t, mdev.DirtyRelay, rep.Mode)
	assert.Equal(t, memHash(src.mem), dstHash, "guest memory identical at switchover")
	waitFor(t, msg("destination traffic"), dg.Done)
	require.NoError(t, dv.stop())
	require.NoError(t, dg.Verify())
	t.Logf("downtime %v, %d rounds", rep.Downtime, len(rep.Rounds))
}

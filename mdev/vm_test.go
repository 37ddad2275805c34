package mdev_test

import (
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
	const frames = 3000
	m := startMigration(t, src, dst, migrationOptions{size: vmGuestMem, frames: frames,
		guest: &mdevtest.Options{Features: virtio.FAccessPlatform.Bit(), MaxFrames: frames},
		rate:  2000, seed: 1, dstSeed: 2})
	waitFor(t, msg("traffic on the source"), func() bool { s, _, _, _ := m.g.Stats(); return s >= frames/3 })

	rep := m.switchOver(dirty.TrackerOptions{Bandwidth: 1e8, DowntimeTarget: 50 * time.Millisecond, MaxRounds: 5})
	assert.Equal(t, mdev.DirtyRelay, rep.Mode)
	m.finish()
	t.Logf("downtime %v, %d rounds", rep.Downtime, len(rep.Rounds))
}

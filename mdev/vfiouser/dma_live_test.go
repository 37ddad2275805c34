package vfiouser_test

import (
	"slices"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// tableRecorder records the guest memory tables the server hands its
// backing device (the base of every region, per SetMemory).
type tableRecorder struct {
	vdpa.Device
	mu     sync.Mutex
	tables [][]vring.GuestAddr
}

func (r *tableRecorder) SetMemory(mem *vring.Memory) error {
	var bases []vring.GuestAddr
	if mem != nil {
		for _, g := range mem.Regions() {
			bases = append(bases, g.Base())
		}
	}
	r.mu.Lock()
	r.tables = append(r.tables, bases)
	r.mu.Unlock()
	return r.Device.SetMemory(mem)
}

func (r *tableRecorder) last() []vring.GuestAddr {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.tables) == 0 {
		return nil
	}
	return r.tables[len(r.tables)-1]
}

// TestDMAMapWhileLiveReachesTheBacking: a backing device that takes the
// memory table when its data path starts (here a vhost-user back-end, as
// for vhost-vdpa and vhost-net) is handed the table again when the client
// maps a window while the data path runs (memory hot-plug): the server
// stops the data path for the map and restarts it with the new table, and
// traffic goes on. It used to keep the old table (found by a review).
func TestDMAMapWhileLiveReachesTheBacking(t *testing.T) {
	vhostUserBacking = true
	rec := &tableRecorder{}
	wrapBacking = func(d vdpa.Device) vdpa.Device { rec.Device = d; return rec }
	defer func() { vhostUserBacking, wrapBacking = false, nil }()
	r := newRig(t, nil)
	ctx, c, d := r.driver(t)
	fs := frames(40, 3)
	require.NoError(t, d.SendFrames(fs[:20]))
	require.NoError(t, d.Receive(ctx, 20, nil))
	require.NotContains(t, rec.last(), vring.GuestAddr(0x1_0000_0000))

	extra, err := unix.MemfdCreate("hotplug", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(extra)
	require.NoError(t, unix.Ftruncate(extra, 1<<20))
	require.NoError(t, c.DMAMap(ctx, 0x1_0000_0000, 1<<20, extra, 0))
	assert.True(t, slices.Contains(rec.last(), vring.GuestAddr(0x1_0000_0000)), "the backing's table has the new window: %v", rec.last())
	assert.Equal(t, mdev.MigRunning, r.srv.Device().MigrationState())
	require.NoError(t, d.SendFrames(fs[20:]))
	require.NoError(t, d.Receive(ctx, 40, nil))
	assert.Zero(t, r.srv.Device().Status()&virtio.StatusDeviceNeedsReset)
}

// TestDMAUnmapOfTheRingsWaitsForTheirReturn: the client unmaps the window
// the rings lie in while another window stays mapped. The data path stops
// for the unmap and stays stopped, the client still seeing RUNNING, until
// the rings are mapped again; it then restarts where it stopped. It used
// to restart at once, fail its ring check and leave the device in ERROR
// with NEEDS_RESET, which remapping did not undo (found by a review).
func TestDMAUnmapOfTheRingsWaitsForTheirReturn(t *testing.T) {
	r := newRig(t, nil)
	ctx, c, d := r.driver(t)
	fs := frames(40, 5)
	require.NoError(t, d.SendFrames(fs[:20]))
	require.NoError(t, d.Receive(ctx, 20, nil))

	extra, err := unix.MemfdCreate("other", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(extra)
	require.NoError(t, unix.Ftruncate(extra, 1<<20))
	require.NoError(t, c.DMAMap(ctx, 0x1_0000_0000, 1<<20, extra, 0))
	require.NoError(t, c.DMAUnmap(ctx, 0, vfiousertest.GuestMemSize))
	dev := r.srv.Device()
	assert.Zero(t, dev.Status()&virtio.StatusDeviceNeedsReset, "%v", dev.Err())
	assert.Equal(t, mdev.MigStop, dev.MigrationState(), "stopped while the rings are away")
	assert.ErrorIs(t, dev.CheckRings(), mdev.ErrQueueLayout)
	_, err = d.ReadISR(ctx) // a region access: still no rings
	require.NoError(t, err)
	assert.Equal(t, mdev.MigStop, dev.MigrationState())
	// A migration's first step (QEMU sets RUNNING_P2P) waits the same way.
	require.NoError(t, c.SetMigState(ctx, uint32(mdev.MigRunningP2P)))
	assert.Equal(t, mdev.MigStop, dev.MigrationState())
	assert.Zero(t, dev.Status()&virtio.StatusDeviceNeedsReset, "%v", dev.Err())
	st, err := c.MigState(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint32(mdev.MigRunningP2P), st, "what the client set")

	require.NoError(t, c.DMAMap(ctx, 0, vfiousertest.GuestMemSize, d.Region.Fd(), 0))
	assert.Equal(t, mdev.MigRunningP2P, dev.MigrationState(), "restarted with its rings back, in the state the client set")
	require.NoError(t, c.SetMigState(ctx, uint32(mdev.MigRunning)))
	require.NoError(t, dev.CheckRings())
	require.NoError(t, d.SendFrames(fs[20:]))
	require.NoError(t, d.Receive(ctx, 40, nil))
	assert.Zero(t, dev.Status()&virtio.StatusDeviceNeedsReset)
}

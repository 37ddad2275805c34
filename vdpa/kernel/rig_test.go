package kernel_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/vmrig"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

const (
	memBase  = vring.GuestAddr(0x4000_0000)
	memSize  = 4 << 20
	qsize    = 64
	hdrLen   = virtio.NetHdrSize
	rxQ, txQ = vmrig.RxQueue, vmrig.TxQueue
)

// ringLayout: rx and tx rings, then 64 buffers of 2 KiB per queue.
var ringLayout = vmrig.RingLayout{
	Ring:      [2]vring.GuestAddr{memBase, memBase + 0x10000},
	Buf:       [2]vring.GuestAddr{memBase + 0x100000, memBase + 0x200000},
	BufSize:   2048,
	QueueSize: qsize,
}

// rig drives a vdpa_sim_net device's rx and tx queues with the library's
// driver-side rings.
type rig struct {
	*vmrig.Rings
	dev *kernel.Device
}

func newRig(t *testing.T, path string, opts *kernel.Options, want virtio.Features) *rig {
	t.Helper()
	return newRigWith(t, path, opts, want, nil)
}

// newRigWith is newRig with a hook that runs after the rx and tx queues are
// set up and before DRIVER_OK (vhost-vdpa refuses ring addresses after it).
func newRigWith(t *testing.T, path string, opts *kernel.Options, want virtio.Features, beforeDriverOK func(*rig)) *rig {
	t.Helper()
	dev, err := kernel.Open(path, opts)
	require.NoError(t, err)
	t.Cleanup(func() { dev.Close() })
	f, err := dev.Negotiate(want)
	require.NoError(t, err)

	reg, err := vring.NewMemfdRegion(memBase, memSize, &vring.RegionOptions{Name: "vdpakit-test"})
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	require.NoError(t, dev.SetMemory(mem))

	r := &rig{Rings: vmrig.NewRings(t, mem, ringLayout), dev: dev}
	r.Setup(dev, f, vdpa.QueueState{}, vdpa.QueueState{})
	if beforeDriverOK != nil {
		beforeDriverOK(r)
	}
	require.NoError(t, dev.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	return r
}

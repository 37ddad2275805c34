package vhostnet

import (
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/vhostsys"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// fakeDevice builds a Device around /dev/null for the checks that happen
// before any ioctl.
func fakeDevice(t *testing.T) *Device {
	f, err := vhostsys.Open("/dev/null")
	require.NoError(t, err)
	tap, err := os.Open("/dev/null")
	require.NoError(t, err)
	d := &Device{f: f, tap: tap, offered: virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC, virtio.NetFStatus)}
	d.cfg.MAC = [6]byte{2, 0, 0, 0, 0, 1}
	d.cfg.Status = virtio.NetSLinkUp
	d.cfg.MaxVirtqueuePairs = 1
	t.Cleanup(func() { d.Close() })
	return d
}

func TestConfigSpaceRules(t *testing.T) {
	d := fakeDevice(t)
	n, err := d.ConfigSize()
	require.NoError(t, err)
	raw := make([]byte, n)
	require.NoError(t, d.ReadConfig(0, raw))
	assert.Equal(t, []byte{2, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0}, raw, "mac, status LINK_UP, one queue pair, mtu 0 (le16)")
	assert.ErrorIs(t, d.ReadConfig(10, make([]byte, 4)), ErrConfigRange)
	assert.ErrorIs(t, d.WriteConfig(virtio.NetCfgStatus, []byte{0, 0}), ErrReadOnlyConfig)
	require.NoError(t, d.WriteConfig(virtio.NetCfgMAC+4, []byte{0xab, 0xcd}))
	require.NoError(t, d.ReadConfig(0, raw[:6]))
	assert.Equal(t, []byte{2, 0, 0, 0, 0xab, 0xcd}, raw[:6], "a legacy driver may write the MAC")
}

func TestChecksBeforeTheKernel(t *testing.T) {
	d := fakeDevice(t)
	assert.ErrorIs(t, d.SetFeatures(virtio.Features(0).With(virtio.FRingPacked)), ErrFeatures)
	assert.ErrorIs(t, d.SetQueueNum(2, 64), ErrQueueIndex)
	assert.ErrorIs(t, d.SetQueueNum(0, 100), ErrQueueLayout)
	assert.ErrorIs(t, d.SetQueueAddr(0, vdpa.QueueAddr{}), ErrQueueLayout, "size first")
	assert.ErrorIs(t, d.SetQueueBase(1, vdpa.QueueState{NextAvail: 2, NextUsed: 1}), ErrInFlight)
	d.status = virtio.StatusAcknowledge | virtio.StatusDriver
	assert.ErrorIs(t, d.SetStatus(virtio.StatusAcknowledge), ErrStatus, "clearing bits without a reset")
	log, err := dirty.New(1<<20, &dirty.Options{PageSize: 8192})
	require.NoError(t, err)
	defer log.Close()
	assert.ErrorIs(t, d.SetLog(log), ErrLog, "vhost logs 4 KiB pages")
	n, err := d.NumQueues()
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	id, err := d.DeviceID()
	require.NoError(t, err)
	assert.Equal(t, virtio.DeviceNet, id)
}

func TestClosedDevice(t *testing.T) {
	d := fakeDevice(t)
	require.NoError(t, d.Close())
	_, err := d.Status()
	assert.ErrorIs(t, err, ErrClosed)
	assert.ErrorIs(t, d.Close(), ErrClosed)
}

// Bit 27 means ANY_LAYOUT to the driver and VHOST_NET_F_VIRTIO_NET_HDR to
// vhost-net: it is never passed to the kernel.
func TestAnyLayoutNeverReachesVhost(t *testing.T) {
	d := fakeDevice(t)
	k := d.kernelFeatures(virtio.Features(0).With(virtio.FAnyLayout, virtio.FVersion1))
	assert.Zero(t, k&(1<<vhostsys.VHOST_NET_F_VIRTIO_NET_HDR))
	assert.Equal(t, uint64(virtio.FVersion1.Bit()), k)
	assert.Equal(t, uint64(virtio.FVersion1.Bit()), d.kernelFeatures(virtio.FVersion1.Bit()|virtio.FLogAll.Bit()),
		"no LOG_ALL for the kernel without a log base")
	d.log = &dirty.Bitmap{}
	assert.Equal(t, uint64(virtio.FVersion1.Bit()|virtio.FLogAll.Bit()), d.kernelFeatures(virtio.FVersion1.Bit()), "LOG_ALL while logging")
}

// The ring areas are checked as large as the negotiated features make them,
// as vhost itself sizes them: a used ring flush against the end of guest
// memory is accepted without EVENT_IDX (and reaches the kernel, here
// /dev/null's ENOTTY) and refused with it.
func TestRingAtTheEndOfMemoryIsSizedByFeatures(t *testing.T) {
	const size = 8
	for _, tc := range []struct {
		name string
		feat virtio.Features
		want error
	}{
		{"without EVENT_IDX", 0, unix.ENOTTY},
		{"with EVENT_IDX", virtio.Features(0).With(virtio.FEventIdx), ErrQueueLayout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := fakeDevice(t)
			r, err := vring.NewRegion(0, make([]byte, 0x2000), nil)
			require.NoError(t, err)
			mem, err := vring.NewMemory(r)
			require.NoError(t, err)
			d.mem, d.features = mem, tc.feat
			d.queues[0].num = size
			_, _, u := vring.RingSizes(size, 0)
			a := vdpa.QueueAddr{Desc: 0, Avail: 0x1000, Used: r.End() - vring.GuestAddr(u)}
			assert.ErrorIs(t, d.SetQueueAddr(0, a), tc.want)
		})
	}
}

// TestSetMemoryWithinTheLog: while a dirty log is set, a memory table
// with a region past the log's span is refused before the kernel sees it:
// vhost does not know the log's size and would set bits past its end for
// writes there (found by a review). A table inside the span reaches the
// kernel (here /dev/null's ENOTTY); a nil table is refused.
func TestSetMemoryWithinTheLog(t *testing.T) {
	d := fakeDevice(t)
	log, err := dirty.New(1<<20, nil)
	require.NoError(t, err)
	defer log.Close()
	d.log = log
	defer func() { d.log = nil }()
	mem := func(base vring.GuestAddr) *vring.Memory {
		r, err := vring.NewMemfdRegion(base, 0x10000, nil)
		require.NoError(t, err)
		m, err := vring.NewMemory(r)
		require.NoError(t, err)
		t.Cleanup(func() { m.Close() })
		return m
	}
	assert.ErrorIs(t, d.SetMemory(mem(1<<20-0x8000)), ErrLog, "ends past the span")
	assert.ErrorIs(t, d.SetMemory(mem(0)), unix.ENOTTY, "inside the span: the kernel's turn")
	assert.ErrorIs(t, d.SetMemory(nil), ErrNoMemory)
}

package vdpa_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

const (
	ack  = virtio.StatusAcknowledge
	drv  = virtio.StatusDriver
	fok  = virtio.StatusFeaturesOK
	dok  = virtio.StatusDriverOK
	feat = virtio.Features(1<<virtio.FVersion1 | 1<<virtio.NetFMAC)
)

func newLocal(t *testing.T) (*vdpa.Local, *softnet.Device, *vring.Memory) {
	t.Helper()
	dev, err := softnet.New(&softnet.Options{MaxQueueSize: 64})
	require.NoError(t, err)
	l := vdpa.NewLocal(dev, nil)
	r, err := vring.NewMemfdRegion(0x10000, 1<<20, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close(); mem.Close() })
	return l, dev, mem
}

func TestLocalStatusRules(t *testing.T) {
	tests := []struct {
		name  string
		steps func(l *vdpa.Local) error
		err   error
	}{
		{"§3.1.1: FEATURES_OK before SetFeatures is refused", func(l *vdpa.Local) error {
			return l.SetStatus(ack | drv | fok)
		}, vdpa.ErrBadStatus},
		{"§2.1.1: the driver must not clear status bits", func(l *vdpa.Local) error {
			if err := l.SetStatus(ack | drv); err != nil {
				return err
			}
			return l.SetStatus(ack)
		}, vdpa.ErrBadStatus},
		{"DRIVER_OK without FEATURES_OK is refused", func(l *vdpa.Local) error {
			if err := l.SetStatus(ack | drv); err != nil {
				return err
			}
			if err := l.SetFeatures(feat); err != nil {
				return err
			}
			return l.SetStatus(ack | drv | dok)
		}, vdpa.ErrBadStatus},
		{"NEEDS_RESET is set by the device only", func(l *vdpa.Local) error {
			return l.SetStatus(ack | virtio.StatusDeviceNeedsReset)
		}, vdpa.ErrBadStatus},
		{"features not offered are refused", func(l *vdpa.Local) error {
			if err := l.SetStatus(ack | drv); err != nil {
				return err
			}
			return l.SetFeatures(feat.With(virtio.NetFGuestTSO4))
		}, vdpa.ErrBadFeatures},
		{"features are fixed after FEATURES_OK", func(l *vdpa.Local) error {
			if err := l.SetStatus(ack | drv); err != nil {
				return err
			}
			if err := l.SetFeatures(feat); err != nil {
				return err
			}
			if err := l.SetStatus(ack | drv | fok); err != nil {
				return err
			}
			return l.SetFeatures(feat.With(virtio.NetFMTU))
		}, vdpa.ErrBadFeatures},
		{"queue size must be a power of two", func(l *vdpa.Local) error { return l.SetQueueNum(0, 48) }, vdpa.ErrBadQueue},
		{"queue size above the maximum", func(l *vdpa.Local) error { return l.SetQueueNum(0, 128) }, vdpa.ErrBadQueue},
		{"queue index out of range", func(l *vdpa.Local) error { return l.SetQueueNum(3, 64) }, vdpa.ErrBadQueue},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, _, _ := newLocal(t)
			assert.ErrorIs(t, tt.steps(l), tt.err)
		})
	}
}

func TestLocalHandlerRefusesFeatures(t *testing.T) {
	// §3.1.1 step 6: a device that cannot support the features leaves
	// FEATURES_OK clear and the driver reads status back to notice.
	l, _, _ := newLocal(t)
	require.NoError(t, l.SetStatus(ack|drv))
	require.NoError(t, l.SetFeatures(feat.With(virtio.NetFCtrlRx))) // CTRL_RX without CTRL_VQ
	require.NoError(t, l.SetStatus(ack|drv|fok))
	st, err := l.Status()
	require.NoError(t, err)
	assert.Equal(t, ack|drv, st)
}

// setup brings queues 0 and 1 up to DRIVER_OK with rings at the given
// addresses.
func setup(t *testing.T, l *vdpa.Local, mem *vring.Memory, addrs [2]vdpa.QueueAddr) error {
	t.Helper()
	require.NoError(t, l.SetStatus(ack|drv))
	require.NoError(t, l.SetFeatures(feat))
	require.NoError(t, l.SetStatus(ack|drv|fok))
	require.NoError(t, l.SetMemory(mem))
	for q := 0; q < 2; q++ {
		require.NoError(t, l.SetQueueNum(q, 64))
		require.NoError(t, l.SetQueueAddr(q, addrs[q]))
		require.NoError(t, l.EnableQueue(q, true))
	}
	return l.SetStatus(ack | drv | fok | dok)
}

func ringAt(base vring.GuestAddr) vdpa.QueueAddr {
	lay := vring.ContiguousLayout(base, 64)
	return vdpa.QueueAddr{Desc: lay.Desc, Avail: lay.Avail, Used: lay.Used}
}

func TestLocalValidatesRingsAtDriverOK(t *testing.T) {
	tests := []struct {
		name string
		addr vdpa.QueueAddr
		err  error
	}{
		{"ring outside guest memory", ringAt(0x1000), vring.ErrOutOfRange},
		{"§2.7: descriptor table must be 16-byte aligned", vdpa.QueueAddr{Desc: 0x10008, Avail: 0x11000, Used: 0x12000}, vring.ErrMisaligned},
		{"§2.7: used ring must be 4-byte aligned", vdpa.QueueAddr{Desc: 0x10000, Avail: 0x11000, Used: 0x12002}, vring.ErrMisaligned},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, dev, mem := newLocal(t)
			err := setup(t, l, mem, [2]vdpa.QueueAddr{ringAt(0x20000), tt.addr})
			assert.ErrorIs(t, err, tt.err)
			st, serr := l.Status()
			require.NoError(t, serr)
			assert.NotZero(t, st&virtio.StatusDeviceNeedsReset, "a device that cannot run a queue sets NEEDS_RESET")
			_, qerr := dev.StopQueue(1)
			assert.ErrorIs(t, qerr, softnet.ErrQueueStopped, "the invalid queue never reached the handler")
			require.NoError(t, l.SetStatus(0))
			st, _ = l.Status()
			assert.Zero(t, st)
		})
	}
}

func TestLocalQueueLifecycle(t *testing.T) {
	l, dev, mem := newLocal(t)
	require.NoError(t, setup(t, l, mem, [2]vdpa.QueueAddr{ringAt(0x20000), ringAt(0x30000)}))

	_, err := l.QueueBase(1)
	assert.ErrorIs(t, err, vdpa.ErrQueueBusy, "reading a running queue's base needs Suspend first")
	assert.ErrorIs(t, l.SetQueueNum(1, 32), vdpa.ErrQueueBusy)
	assert.ErrorIs(t, l.SetMemory(mem), vdpa.ErrQueueBusy)

	require.NoError(t, l.Suspend())
	st, err := l.QueueBase(1)
	require.NoError(t, err)
	assert.Equal(t, vdpa.QueueState{}, st)
	require.NoError(t, l.SetQueueBase(1, vdpa.QueueState{NextAvail: 5, NextUsed: 5}))
	require.NoError(t, l.Resume())
	_, err = dev.StopQueue(1) // the handler got the queue back: stop it behind Local's back
	require.NoError(t, err)
	// Local still thinks queue 1 runs: Suspend reports the handler's error.
	assert.ErrorIs(t, l.Suspend(), softnet.ErrQueueStopped)
	require.NoError(t, l.Resume())

	require.NoError(t, l.EnableQueue(0, false))
	_, err = dev.StopQueue(0)
	assert.ErrorIs(t, err, softnet.ErrQueueStopped, "disabling stops the queue")
	require.NoError(t, l.EnableQueue(0, true))
	_, err = l.QueueBase(0)
	assert.ErrorIs(t, err, vdpa.ErrQueueBusy, "enabling after DRIVER_OK starts the queue")

	require.NoError(t, l.Close())
	assert.ErrorIs(t, l.SetStatus(ack), vdpa.ErrClosed)
}

func TestLocalFeatureMask(t *testing.T) {
	dev, err := softnet.New(nil)
	require.NoError(t, err)
	l := vdpa.NewLocal(dev, &vdpa.LocalOptions{FeatureMask: feat})
	f, err := l.Features()
	require.NoError(t, err)
	assert.Equal(t, feat, f)
}

// A queue whose StopQueue failed may still be driven by the handler, in its
// guest memory and into its dirty log. Until a reset stops the handler,
// Local refuses to replace either, since the caller would then release
// what the queue may still touch.
func TestLocalKeepsMemoryAndLogOfAQueueThatFailedToStop(t *testing.T) {
	l, dev, mem := newLocal(t)
	require.NoError(t, setup(t, l, mem, [2]vdpa.QueueAddr{ringAt(0x20000), ringAt(0x30000)}))
	_, err := dev.StopQueue(1) // behind Local's back: Local's own stop of queue 1 fails
	require.NoError(t, err)
	require.ErrorIs(t, l.Suspend(), softnet.ErrQueueStopped)

	assert.ErrorIs(t, l.SetMemory(mem), vdpa.ErrQueueBusy)
	assert.ErrorIs(t, l.SetLog(nil), vdpa.ErrQueueBusy)

	require.NoError(t, l.SetStatus(0)) // reset
	assert.NoError(t, l.SetMemory(mem))
	assert.NoError(t, l.SetLog(nil))
}

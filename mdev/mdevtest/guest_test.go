package mdevtest_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

func newDevice(t *testing.T, size uint64) (*mdev.Device, *vring.Memory) {
	t.Helper()
	r, err := vring.NewMemfdRegion(0, size, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	local := vdpa.NewLocal(sn, nil)
	t.Cleanup(func() { _ = local.Close() })
	dev, err := mdev.NewDevice(local, &mdev.Options{Memory: mem})
	require.NoError(t, err)
	t.Cleanup(func() { _ = dev.Close() })
	return dev, mem
}

func TestGuestTrafficAndVerify(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts mdevtest.Options
	}{
		{"split", mdevtest.Options{MaxFrames: 1000}},
		// 256 buffers in the accounting below; the ring itself is any size.
		{"packed", mdevtest.Options{MaxFrames: 1000, Features: virtio.FRingPacked.Bit()}},
	} {
		t.Run(tc.name, func(t *testing.T) { guestTraffic(t, tc.opts) })
	}
}

func guestTraffic(t *testing.T, opts mdevtest.Options) {
	dev, mem := newDevice(t, 8<<20)
	_, err := mdevtest.Attach(dev, mem)
	require.ErrorIs(t, err, mdevtest.ErrNotBooted)
	g, err := mdevtest.Boot(dev, mem, 1000, &opts)
	require.NoError(t, err)
	assert.Equal(t, opts.Features.Has(virtio.FRingPacked), dev.DriverFeatures().Has(virtio.FRingPacked))
	for !g.Done() {
		g.Step()
	}
	require.NoError(t, g.Verify())
	sent, received, dup, bad := g.Stats()
	assert.EqualValues(t, 1000, sent)
	assert.EqualValues(t, 1000, received)
	assert.Zero(t, dup+bad)

	// A resumed driver sees the same state; Verify catches a frame counted
	// twice.
	g2, err := mdevtest.Attach(dev, mem)
	require.NoError(t, err)
	require.NoError(t, g2.Verify())
	counts := vring.GuestAddr(0x100000 + 2*256*2048)
	require.NoError(t, mem.Write(counts+17, []byte{2}))
	assert.ErrorIs(t, g2.Verify(), mdevtest.ErrVerify)
}

// A packed guest runs a ring whose size is not a power of two (virtio 1.2
// §2.8), through several wraps of both rings, and resumes by Attach.
func TestGuestPackedOddQueueSize(t *testing.T) {
	dev, mem := newDevice(t, 8<<20)
	const frames = 2000
	g, err := mdevtest.Boot(dev, mem, frames, &mdevtest.Options{QueueSize: 200, MaxFrames: frames,
		Features: virtio.FRingPacked.Bit()})
	require.NoError(t, err)
	require.True(t, dev.DriverFeatures().Has(virtio.FRingPacked))
	for i := 0; !g.Done() && i < frames; i++ {
		g.Step()
	}
	g2, err := mdevtest.Attach(dev, mem)
	require.NoError(t, err)
	for !g2.Done() {
		g2.Step()
	}
	require.NoError(t, g2.Verify())
	sent, received, _, _ := g2.Stats()
	assert.EqualValues(t, frames, sent)
	assert.EqualValues(t, frames, received)
	st := dev.State()
	assert.EqualValues(t, 200, st.Queues[0].Size)
	assert.EqualValues(t, 200, st.Queues[1].Size)
}

// A split guest still needs a power-of-two size.
func TestGuestSplitOddQueueSize(t *testing.T) {
	dev, mem := newDevice(t, 8<<20)
	_, err := mdevtest.Boot(dev, mem, 10, &mdevtest.Options{QueueSize: 200})
	assert.ErrorIs(t, err, mdevtest.ErrLayout)
}

func TestGuestRejectsSmallMemory(t *testing.T) {
	dev, mem := newDevice(t, 1<<20)
	_, err := mdevtest.Boot(dev, mem, 10, nil)
	assert.ErrorIs(t, err, mdevtest.ErrLayout)
}

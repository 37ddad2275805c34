package vmrig

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// iproute2 prints known feature bits by name and the rest as bit_N; keys
// may carry a trailing space.
func TestIproute2Decoding(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   any
		want virtio.Features
		bad  bool
	}{
		{"named bits", []any{"VERSION_1", "MAC", "ACCESS_PLATFORM"},
			virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC, virtio.FAccessPlatform), false},
		{"bit_N for unnamed bits", []any{"bit_41", "CSUM "}, 1<<41 | 1, false},
		{"unknown name", []any{"NO_SUCH_FEATURE"}, 0, true},
		{"bit beyond 63", []any{"bit_64"}, 0, true},
		{"not an array", "VERSION_1", 0, true},
		{"not a string", []any{1.0}, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseFeatureList(tc.in)
			if tc.bad {
				assert.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
	v := trimKeys(map[string]any{"link ": "up", "dev": []any{map[string]any{"mtu ": 1500.0}}})
	assert.Equal(t, map[string]any{"link": "up", "dev": []any{map[string]any{"mtu": 1500.0}}}, v)
}

// loopback records the layouts Setup programs.
type loopback struct{ l [2]vring.Layout }

func (d *loopback) SetupQueue(q int, l vring.Layout, _ vdpa.QueueState, _, _ *vdpa.EventFD) error {
	d.l[q] = l
	return nil
}

// Frames sent on the transmit ring and written back by a device into the
// receive ring come back from Reclaim byte for byte, and every buffer is
// free again afterwards.
func TestRingsLoopback(t *testing.T) {
	const base = vring.GuestAddr(0x10000)
	reg, err := vring.NewMemfdRegion(base, 1<<20, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	defer mem.Close()
	lay := RingLayout{Ring: [2]vring.GuestAddr{base, base + 0x1000},
		Buf: [2]vring.GuestAddr{base + 0x10000, base + 0x20000}, BufSize: 1024, QueueSize: 8}
	r := NewRings(t, mem, lay)
	dev := &loopback{}
	r.Setup(dev, virtio.FVersion1.Bit(), vdpa.QueueState{}, vdpa.QueueState{})
	assert.Equal(t, [2]vring.Layout{r.Layout(RxQueue), r.Layout(TxQueue)}, dev.l)

	var dq [2]*vring.DeviceQueue
	for q := range 2 {
		dq[q], err = vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Index: q, Layout: dev.l[q], Features: virtio.FVersion1.Bit()})
		require.NoError(t, err)
	}
	rx := r.PostRx(3)
	require.Len(t, rx, 3)
	sent := r.Send([]byte("first frame"), []byte("second"))
	for i, f := range [][]byte{[]byte("first frame"), []byte("second")} {
		assert.Equal(t, append(make([]byte, virtio.NetHdrSize), f...), sent[i])
	}
	for range sent {
		var tc, rc vring.Chain
		ok, err := dq[TxQueue].Pop(&tc)
		require.NoError(t, err)
		require.True(t, ok)
		pkt := make([]byte, tc.ReadableLen)
		tc.Gather(pkt)
		ok, err = dq[RxQueue].Pop(&rc)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, len(pkt), rc.Scatter(pkt))
		require.NoError(t, dq[RxQueue].PushChain(&rc, uint32(len(pkt))))
		require.NoError(t, dq[TxQueue].PushChain(&tc, 0))
	}
	require.NoError(t, r.Call[RxQueue].Signal())
	require.NoError(t, r.Call[TxQueue].Signal())

	got := r.Reclaim(RxQueue, 2)
	for i := range got {
		assert.Equal(t, sent[i], got[i].Data, "frame %d", i)
		assert.Contains(t, rx, got[i].Addr)
	}
	for _, u := range r.Reclaim(TxQueue, 2) {
		assert.Empty(t, u.Data, "transmit buffers carry nothing back")
	}
	assert.Equal(t, uint16(2), r.UsedIdx(RxQueue))
	assert.Equal(t, uint16(2), r.UsedIdx(TxQueue))
	assert.Len(t, r.free[RxQueue], 7, "one receive buffer still posted")
	assert.Len(t, r.free[TxQueue], 8)
}

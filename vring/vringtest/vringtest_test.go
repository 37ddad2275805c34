package vringtest_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

func TestHarnessEcho(t *testing.T) {
	for _, indirect := range []bool{false, true} {
		h, err := vringtest.New(&vringtest.Options{Size: 4, Features: virtio.Features(0).With(virtio.FIndirectDesc), Indirect: indirect})
		require.NoError(t, err)
		defer h.Close()
		for i := range 10 { // wraps the size-4 ring
			msg := fmt.Sprintf("frame %d", i)
			_, kick, err := h.Driver.Send([][]byte{[]byte("hdr:"), []byte(msg)}, []uint32{64})
			require.NoError(t, err)
			require.True(t, kick)
			var c vring.Chain
			ok, err := h.Device.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			buf := make([]byte, c.ReadableLen)
			c.Gather(buf)
			require.Equal(t, "hdr:"+msg, string(buf))
			n := c.Scatter(buf)
			require.NoError(t, h.Device.PushChain(&c, uint32(n)))
			comp, ok, err := h.Driver.Receive()
			require.NoError(t, err)
			require.True(t, ok)
			require.Equal(t, c.Head, comp.Head)
			require.Equal(t, "hdr:"+msg, string(comp.Data))
		}
	}
}

// Example shows a device under test served by a Harness: the driver sends a
// request, the device echoes it upper-cased.
func Example() {
	h, err := vringtest.New(&vringtest.Options{Size: 8})
	if err != nil {
		panic(err)
	}
	defer h.Close()
	if _, _, err := h.Driver.Send([][]byte{[]byte("ping")}, []uint32{16}); err != nil {
		panic(err)
	}
	var c vring.Chain
	if ok, err := h.Device.Pop(&c); !ok || err != nil {
		panic(err)
	}
	req := make([]byte, c.ReadableLen)
	c.Gather(req)
	n := c.Scatter([]byte("PONG"))
	if err := h.Device.PushChain(&c, uint32(n)); err != nil {
		panic(err)
	}
	comp, _, _ := h.Driver.Receive()
	fmt.Printf("device got %q, driver got %q\n", req, comp.Data)
	// Output: device got "ping", driver got "PONG"
}

func TestRawRingFeedsHostileChains(t *testing.T) {
	h, err := vringtest.New(&vringtest.Options{Size: 8})
	require.NoError(t, err)
	defer h.Close()
	raw, err := vringtest.NewRawRing(h.Mem, h.Layout)
	require.NoError(t, err)
	// A valid chain, then one that loops.
	require.NoError(t, raw.WriteDesc(h.Layout.Desc, 0, 0x4000, 16, vring.DescFWrite, 0))
	require.NoError(t, raw.WriteDesc(h.Layout.Desc, 1, 0x4000, 16, vring.DescFNext, 1))
	require.NoError(t, raw.SetAvail(0, 0))
	require.NoError(t, raw.SetAvail(1, 1))
	require.NoError(t, raw.SetAvailIdx(2))
	var c vring.Chain
	ok, err := h.Device.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, h.Device.Push(c.Head, 5))
	flags, idx, err := raw.UsedIdx()
	require.NoError(t, err)
	require.Equal(t, uint16(0), flags)
	require.Equal(t, uint16(1), idx)
	id, n, err := raw.Used(0)
	require.NoError(t, err)
	require.Equal(t, []uint32{0, 5}, []uint32{id, n})
	_, err = h.Device.Pop(&c)
	require.ErrorIs(t, err, vring.ErrChainLoop)
	_, err = vringtest.NewRawRing(h.Mem, vring.ContiguousLayout(1<<40, 8))
	require.ErrorIs(t, err, vring.ErrOutOfRange)
}

func TestHarnessEchoPacked(t *testing.T) {
	for _, indirect := range []bool{false, true} {
		for _, size := range []uint16{3, 5, 256} {
			f := virtio.Features(0).With(virtio.FIndirectDesc, virtio.FRingPacked)
			h, err := vringtest.New(&vringtest.Options{Size: size, Features: f, Indirect: indirect})
			require.NoError(t, err)
			defer h.Close()
			require.True(t, h.Device.Packed())
			for i := range 3 * int(size) { // wraps the ring several times
				msg := fmt.Sprintf("frame %d", i)
				_, kick, err := h.Driver.Send([][]byte{[]byte("hdr:"), []byte(msg)}, []uint32{64})
				require.NoError(t, err)
				require.True(t, kick)
				var c vring.Chain
				ok, err := h.Device.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				buf := make([]byte, c.ReadableLen)
				c.Gather(buf)
				require.Equal(t, "hdr:"+msg, string(buf))
				n := c.Scatter(buf)
				require.NoError(t, h.Device.PushChain(&c, uint32(n)))
				comp, ok, err := h.Driver.Receive()
				require.NoError(t, err)
				require.True(t, ok)
				require.Equal(t, c.Head, comp.Head)
				require.Equal(t, "hdr:"+msg, string(comp.Data))
			}
		}
	}
}

// TestRawPackedRing feeds a device a chain written byte by byte and reads
// back the used descriptor and the device event structure.
func TestRawPackedRing(t *testing.T) {
	f := virtio.Features(0).With(virtio.FRingPacked, virtio.FEventIdx)
	h, err := vringtest.New(&vringtest.Options{Size: 4, Features: f})
	require.NoError(t, err)
	defer h.Close()
	r, err := vringtest.NewRawPackedRing(h.Mem, h.Layout)
	require.NoError(t, err)
	data := h.Layout.Desc + 0x2000
	require.NoError(t, h.Mem.Write(data, []byte("raw")))
	require.NoError(t, r.WritePackedDesc(h.Layout.Desc, 1, data+16, 8, 3, vringtest.PackedAvail(true)|vring.DescFWrite))
	require.NoError(t, r.WritePackedDesc(h.Layout.Desc, 0, data, 3, 0, vringtest.PackedAvail(true)|vring.DescFNext))
	var c vring.Chain
	ok, err := h.Device.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, uint16(3), c.Head, "the id of the last descriptor")
	require.Equal(t, "raw", string(c.Segs[0].Buf))
	require.NoError(t, h.Device.Push(c.Head, 5))
	_, n, id, flags, err := r.PackedDesc(0)
	require.NoError(t, err)
	require.Equal(t, uint32(5), n)
	require.Equal(t, uint16(3), id)
	require.Equal(t, vringtest.PackedUsed(true)|vring.DescFWrite, flags)
	ok, err = h.Device.Pop(&c)
	require.NoError(t, err)
	require.False(t, ok)
	off, fl, err := r.DeviceEvent()
	require.NoError(t, err)
	require.Equal(t, vring.EventFlagsDesc, fl)
	require.Equal(t, vring.PackedIndex(2, true), off, "kick wanted at the next avail position")
}

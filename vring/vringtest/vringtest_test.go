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

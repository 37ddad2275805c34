package virtio_test

import (
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
)

// The receive header a device writes in front of a frame that fills three
// mergeable buffers.
func ExampleNetHdr_Encode() {
	f := virtio.Features(0).With(virtio.FVersion1, virtio.NetFMrgRxbuf)
	h := virtio.NetHdr{NumBuffers: 3}
	p := make([]byte, virtio.NetHdrLen(f))
	_ = h.Encode(p, len(p))
	fmt.Printf("% x\n", p)
	// Output: 00 00 00 00 00 00 00 00 00 00 03 00
}

// Decoding the readable part of a control-queue command: MQ VQ_PAIRS_SET 4.
func ExampleParseNetCtrl() {
	cmd, err := virtio.ParseNetCtrl([]byte{virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 4, 0})
	if err != nil {
		fmt.Println(err)
		return
	}
	n, err := cmd.VQPairs(8)
	fmt.Println(n, err)
	_, err = virtio.ParseNetCtrl([]byte{virtio.NetCtrlRx, virtio.NetCtrlRxPromisc})
	fmt.Println(err)
	// Output:
	// 4 <nil>
	// virtio: net control command: wrong data length: class 0 command 0 carries 0 bytes, want 1
}

func ExampleNetConfig_Encode() {
	c := virtio.NetConfig{MAC: [6]byte{0x02, 0, 0, 0, 0, 1}, Status: virtio.NetSLinkUp, MaxVirtqueuePairs: 1, MTU: 1500}
	p := make([]byte, virtio.NetConfigSize)
	_ = c.Encode(p)
	fmt.Printf("% x\n", p[:12])
	// Output: 02 00 00 00 00 01 01 00 01 00 dc 05
}

package vduse

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// The expected values are the kernel's: <linux/vduse.h> compiled with gcc on
// x86-64 (sizeof and the _IO* macros), recorded here as constants.
func TestIoctlNumbersMatchHeader(t *testing.T) {
	tests := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"VDUSE_GET_API_VERSION", ioctlGetAPIVersion, 0x80088100},
		{"VDUSE_SET_API_VERSION", ioctlSetAPIVersion, 0x40088101},
		{"VDUSE_CREATE_DEV", ioctlCreateDev, 0x41508102},
		{"VDUSE_DESTROY_DEV", ioctlDestroyDev, 0x41008103},
		{"VDUSE_IOTLB_GET_FD", ioctlIOTLBGetFD, 0xc0208110},
		{"VDUSE_DEV_GET_FEATURES", ioctlDevGetFeatures, 0x80088111},
		{"VDUSE_DEV_SET_CONFIG", ioctlDevSetConfig, 0x40088112},
		{"VDUSE_DEV_INJECT_CONFIG_IRQ", ioctlInjectConfigIRQ, 0x8113},
		{"VDUSE_VQ_SETUP", ioctlVQSetup, 0x40208114},
		{"VDUSE_VQ_GET_INFO", ioctlVQGetInfo, 0xc0308115},
		{"VDUSE_VQ_SETUP_KICKFD", ioctlVQSetupKickFD, 0x40088116},
		{"VDUSE_VQ_INJECT_IRQ", ioctlVQInjectIRQ, 0x40048117},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assert.Equal(t, tt.want, tt.got) })
	}
}

func TestDevConfigLayout(t *testing.T) {
	c := devConfig{Name: "vduse-net0", VendorID: 0x1af4, DeviceID: 1, Features: 0x0000000300010020,
		VQNum: 2, VQAlign: 4096, ConfigData: []byte{1, 2, 3}}
	b, err := c.encode()
	require.NoError(t, err)
	require.Len(t, b, 336+3)
	assert.Equal(t, "vduse-net0", string(b[:10]))
	assert.Zero(t, b[10], "name NUL-terminated")
	le := binary.LittleEndian
	assert.Equal(t, uint32(0x1af4), le.Uint32(b[256:]), "vendor_id at 256")
	assert.Equal(t, uint32(1), le.Uint32(b[260:]), "device_id at 260")
	assert.Equal(t, uint64(0x0000000300010020), le.Uint64(b[264:]), "features at 264")
	assert.Equal(t, uint32(2), le.Uint32(b[272:]), "vq_num at 272")
	assert.Equal(t, uint32(4096), le.Uint32(b[276:]), "vq_align at 276")
	assert.Equal(t, make([]byte, 52), b[280:332], "reserved[13] zero")
	assert.Equal(t, uint32(3), le.Uint32(b[332:]), "config_size at 332")
	assert.Equal(t, []byte{1, 2, 3}, b[336:], "config[] follows")

	for _, bad := range []string{"", "a/b", "nul\x00", string(make([]byte, 256))} {
		_, err := (&devConfig{Name: bad}).encode()
		assert.Error(t, err, "name %q", bad)
	}
}

func TestRequestResponseLayout(t *testing.T) {
	b := make([]byte, 152)
	le := binary.LittleEndian
	le.PutUint32(b[0:], reqUpdateIOTLB)
	le.PutUint32(b[4:], 77)
	le.PutUint64(b[24:], 0x1000)
	le.PutUint64(b[32:], 0x1fff)
	r, err := decodeRequest(b)
	require.NoError(t, err)
	assert.Equal(t, request{Type: reqUpdateIOTLB, ID: 77, IOVAStart: 0x1000, IOVALast: 0x1fff}, r)

	clear(b)
	le.PutUint32(b[0:], reqSetStatus)
	b[24] = 0x0f
	r, err = decodeRequest(b)
	require.NoError(t, err)
	assert.Equal(t, uint8(0x0f), r.Status)

	clear(b)
	le.PutUint32(b[0:], reqGetVQState)
	le.PutUint32(b[24:], 3)
	r, err = decodeRequest(b)
	require.NoError(t, err)
	assert.Equal(t, uint32(3), r.VQIndex)

	_, err = decodeRequest(b[:100])
	assert.Error(t, err)

	resp := make([]byte, 152)
	for i := range resp {
		resp[i] = 0xee
	}
	encodeResponse(resp, 77, resultOK, 3, vring.QueueState{NextAvail: 0x1234, NextUsed: 0x1200}, false)
	want := make([]byte, 152)
	le.PutUint32(want[0:], 77)
	le.PutUint32(want[24:], 3)
	le.PutUint16(want[28:], 0x1234)
	assert.Equal(t, want, resp, "request_id, result 0, reserved zero, vq_state{index, split.avail_index}, padding zero")

	// Packed: struct vduse_vq_state_packed {last_avail_counter,
	// last_avail_idx, last_used_counter, last_used_idx} after the index.
	encodeResponse(resp, 78, resultOK, 2, vring.QueueState{NextAvail: 1<<15 | 300, NextUsed: 299}, true)
	want = make([]byte, 152)
	le.PutUint32(want[0:], 78)
	le.PutUint32(want[24:], 2)
	le.PutUint16(want[28:], 1)   // avail wrap counter
	le.PutUint16(want[30:], 300) // avail index
	le.PutUint16(want[32:], 0)   // used wrap counter
	le.PutUint16(want[34:], 299) // used index
	assert.Equal(t, want, resp, "vq_state{index, packed{avail counter, avail idx, used counter, used idx}}")
}

// The packed view of vduse_vq_info's union, as the kernel fills it: the
// counters are 0 or 1 and the indices 15 bits; state picks the view the
// features select.
func TestVQInfoPackedState(t *testing.T) {
	b := make([]byte, 48)
	le := binary.LittleEndian
	le.PutUint32(b[4:], 1000)
	le.PutUint16(b[32:], 1)   // last_avail_counter
	le.PutUint16(b[34:], 999) // last_avail_idx
	le.PutUint16(b[36:], 0)   // last_used_counter
	le.PutUint16(b[38:], 7)   // last_used_idx
	info := decodeVQInfo(b)
	packed := virtio.Features(0).With(virtio.FVersion1, virtio.FRingPacked)
	assert.Equal(t, vring.QueueState{NextAvail: 0x8000 | 999, NextUsed: 7}, info.state(packed))
	assert.Equal(t, vring.QueueState{NextAvail: 1}, info.state(virtio.Features(0).With(virtio.FVersion1)),
		"split reads the same bytes as split.avail_index")

	// A fresh packed queue as virtio_vdpa sets it: both counters 1.
	clear(b)
	le.PutUint16(b[32:], 1)
	le.PutUint16(b[36:], 1)
	assert.Equal(t, vring.InitialState(packed), decodeVQInfo(b).state(packed))

	// Round trip through the response encoding for every corner.
	for _, st := range []vring.QueueState{{NextAvail: 0, NextUsed: 0}, {NextAvail: 0xffff, NextUsed: 0x7fff}, {NextAvail: 0x8000, NextUsed: 0x8001}} {
		resp := make([]byte, 152)
		encodeResponse(resp, 1, resultOK, 0, st, true)
		got := vring.QueueState{NextAvail: packedPos(le.Uint16(resp[30:]), le.Uint16(resp[28:])),
			NextUsed: packedPos(le.Uint16(resp[34:]), le.Uint16(resp[32:]))}
		assert.Equal(t, st, got)
	}
}

func TestVQInfoAndIOTLBLayout(t *testing.T) {
	b := make([]byte, 48)
	le := binary.LittleEndian
	le.PutUint32(b[0:], 1)
	le.PutUint32(b[4:], 256)
	le.PutUint64(b[8:], 0x10000)
	le.PutUint64(b[16:], 0x11000)
	le.PutUint64(b[24:], 0x12000)
	le.PutUint16(b[32:], 9)
	b[40] = 1
	assert.Equal(t, vqInfo{Index: 1, Num: 256, DescAddr: 0x10000, DriverAddr: 0x11000, DeviceAddr: 0x12000,
		AvailIndex: 9, Packed: vring.QueueState{NextAvail: 0x8000}, Ready: true}, decodeVQInfo(b),
		"the packed view of the same union: last_avail_counter 9 masked to 1, last_avail_idx 0")

	e := iotlbEntry{Offset: 0x2000, Start: 0x4000, Last: 0x7fff, Perm: accessRW}
	var eb [32]byte
	e.encode(eb[:])
	assert.Equal(t, e, decodeIOTLBEntry(eb[:]))
	assert.Equal(t, uint8(3), eb[24], "perm at 24")
}

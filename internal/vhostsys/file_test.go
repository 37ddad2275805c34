package vhostsys

import (
	"errors"
	"os"
	"strconv"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// An ioctl the device does not implement fails with the operation's name
// and the errno, reachable through errors.Is.
func TestOpErrorNamesOperationAndWrapsErrno(t *testing.T) {
	f, err := Open("/dev/null")
	require.NoError(t, err)
	defer f.Close()

	_, err = f.GetFeatures()
	require.Error(t, err)
	assert.ErrorIs(t, err, unix.ENOTTY)
	var oe *OpError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, "VHOST_GET_FEATURES", oe.Op)
	assert.Equal(t, "VHOST_GET_FEATURES: "+unix.ENOTTY.Error(), err.Error())

	err = f.VDPASetStatus(0)
	assert.ErrorIs(t, err, unix.ENOTTY)
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, "VHOST_VDPA_SET_STATUS", oe.Op)
}

func TestOpenMissingDeviceIsNotExist(t *testing.T) {
	_, err := Open("/dev/vhost-vdpa-does-not-exist")
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestCallsAfterCloseFailWithErrClosed(t *testing.T) {
	f, err := Open("/dev/null")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	_, err = f.VDPAGetDeviceID()
	assert.ErrorIs(t, err, os.ErrClosed)
	err = f.WriteMsgV2(&MsgV2{Type: VHOST_IOTLB_MSG_V2, IOTLB: IOTLBMsg{Type: VHOST_IOTLB_BATCH_BEGIN}})
	assert.ErrorIs(t, err, os.ErrClosed)
	var oe *OpError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, "VHOST_IOTLB_BATCH_BEGIN", oe.Op)
}

func TestConfigAccessRejectsEmptyBuffer(t *testing.T) {
	f, err := Open("/dev/null")
	require.NoError(t, err)
	defer f.Close()
	assert.ErrorIs(t, f.VDPAGetConfig(0, nil), unix.EINVAL)
}

func TestEventFDRangeChecked(t *testing.T) {
	f, err := Open("/dev/null")
	require.NoError(t, err)
	defer f.Close()
	assert.ErrorIs(t, f.SetVringKick(0, -2), unix.EBADF)
	// A descriptor beyond int32 (the ioctl's field) is refused, not
	// truncated; only a 64-bit int can hold one.
	if strconv.IntSize == 64 {
		beyond := int64(1) << 31
		assert.ErrorIs(t, f.SetVringCall(0, int(beyond)), unix.EBADF)
	}
}

// The hand-written encoder puts every field where the C struct has it: the
// struct layout is checked against the headers (abi_test.go), so decoding
// the bytes through it must give back the message.
func TestMsgV2MarshalMatchesStructLayout(t *testing.T) {
	in := MsgV2{Type: VHOST_IOTLB_MSG_V2, ASID: 1, IOTLB: IOTLBMsg{
		IOVA: 0x1122334455667788, Size: 0x2000, UAddr: 0x7f0012345000,
		Perm: VHOST_ACCESS_RW, Type: VHOST_IOTLB_UPDATE,
	}}
	var buf [SizeofMsgV2]uint64 // 8-aligned backing
	b := unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), SizeofMsgV2)
	for i := range b {
		b[i] = 0xee // the encoder must clear padding
	}
	in.marshal(b)
	out := *(*MsgV2)(unsafe.Pointer(&buf[0]))
	assert.Equal(t, in, out)
	for i := offsetofMsgV2IOTLB + 26; i < SizeofMsgV2; i++ {
		assert.Zero(t, b[i], "padding byte %d", i)
	}
}

func TestOpErrorUnwrapsToUnsupported(t *testing.T) {
	err := opErr("VHOST_VDPA_SUSPEND", unix.EOPNOTSUPP)
	assert.True(t, errors.Is(err, errors.ErrUnsupported))
}

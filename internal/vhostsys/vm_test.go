package vhostsys

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/internal/testenv"
)

// The raw wrappers reach the ioctls they name: each answer below is what
// drivers/vhost/net.c and vhost.c give for that request and no other.
func TestVhostNetAnswersTheNamedIoctls(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireModule(t, "vhost_net")
	testenv.RequireFile(t, "/dev/vhost-net")
	f, err := Open("/dev/vhost-net")
	require.NoError(t, err)
	defer f.Close()

	require.NoError(t, f.SetOwner())
	assert.ErrorIs(t, f.SetOwner(), unix.EBUSY, "a second VHOST_SET_OWNER")

	feat, err := f.GetFeatures()
	require.NoError(t, err)
	assert.NotZero(t, feat&(1<<VHOST_NET_F_VIRTIO_NET_HDR), "vhost-net offers VHOST_NET_F_VIRTIO_NET_HDR")
	assert.NotZero(t, feat&(1<<VHOST_F_LOG_ALL), "vhost-net offers VHOST_F_LOG_ALL")

	be, err := f.GetBackendFeatures()
	require.NoError(t, err)
	assert.Equal(t, uint64(1<<VHOST_BACKEND_F_IOTLB_MSG_V2), be, "VHOST_NET_BACKEND_FEATURES")
	require.NoError(t, f.SetBackendFeatures(be))
	assert.ErrorIs(t, f.SetBackendFeatures(1<<VHOST_BACKEND_F_SUSPEND), unix.EOPNOTSUPP)

	require.NoError(t, f.SetVringBusyloopTimeout(1, 50))
	v, err := f.GetVringBusyloopTimeout(1)
	require.NoError(t, err)
	assert.Equal(t, uint32(50), v)

	require.NoError(t, f.SetVringNum(0, 256))
	assert.ErrorIs(t, f.SetVringNum(0, 3), unix.EINVAL, "not a power of two")
	require.NoError(t, f.SetVringBase(0, 17))
	base, err := f.GetVringBase(0)
	require.NoError(t, err)
	assert.Equal(t, uint32(17), base)
	_, err = f.GetVringBase(2)
	assert.ErrorIs(t, err, unix.ENOBUFS, "vhost-net has two rings")

	require.NoError(t, f.SetMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: 0x7f00_0000_0000}}))
	require.NoError(t, f.SetMemTable(nil))

	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(efd)
	require.NoError(t, f.SetVringKick(0, efd))
	require.NoError(t, f.SetVringCall(0, efd))
	require.NoError(t, f.SetVringErr(0, efd))
	require.NoError(t, f.SetLogFD(efd))
	require.NoError(t, f.SetVringCall(0, FileUnbind))
	assert.ErrorIs(t, f.SetVringKick(0, 1<<20), unix.EBADF)

	_, err = f.VDPAGetDeviceID()
	assert.ErrorIs(t, err, unix.ENOTTY, "vhost-net has no vhost-vdpa ioctls")
	require.NoError(t, f.ResetOwner())
	require.NoError(t, f.SetOwner(), "ownership can be taken again after VHOST_RESET_OWNER")
}

func TestTapCreation(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFile(t, "/dev/net/tun")
	tap, name, err := OpenTap(TapOptions{Name: "vdpakit-tt0", VnetHdrSize: 12})
	if err != nil && !testenv.InVM() {
		t.Skipf("cannot create a tap here: %v", err)
	}
	require.NoError(t, err)
	defer tap.Close()
	assert.Equal(t, "vdpakit-tt0", name)
	require.NoError(t, SetTapVnetHdrSize(tap, 10))
	assert.ErrorIs(t, SetTapVnetHdrSize(tap, 4), unix.EINVAL, "smaller than struct virtio_net_hdr")
	require.NoError(t, SetLinkUp(name, true))
	require.NoError(t, SetLinkUp(name, false))
	assert.ErrorIs(t, SetLinkUp("vdpakit-nope", true), unix.ENODEV)
}

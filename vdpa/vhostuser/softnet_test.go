package vhostuser

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// The software virtio-net device (vdpa/softnet) served over vhost-user:
// frames the driver transmits come back on its receive queue.
func TestBackendServesSoftnet(t *testing.T) {
	dev, err := softnet.New(&softnet.Options{MaxQueueSize: 1024})
	require.NoError(t, err)
	_, uc, _ := startBackend(t, dev, nil)
	d := newTestDriver(t, uc, virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC))
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	rx := d.postRx(4)
	frame := make([]byte, 60)
	copy(frame, []byte{2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x88, 0xb5, 0xde, 0xad})
	d.send(frame)
	d.reclaim(1, 1)
	u := d.reclaim(0, 1)[0]
	b := make([]byte, u[1])
	require.NoError(t, d.mem.Read(rx[u[0]], b))
	require.Equal(t, d.hdrLen+len(frame), len(b))
	assert.Equal(t, frame, b[d.hdrLen:])
	mac := make([]byte, 6)
	require.NoError(t, d.fe.ReadConfig(virtio.NetCfgMAC, mac))
	assert.Equal(t, []byte{2, 0, 0, 0, 0, 1}, mac)
}

// A driver that breaks a ring rule (avail.idx jumping by more than the
// queue size, virtio 1.2 §2.7.13.3): the device reports the queue broken,
// the back-end signals the SET_VRING_ERR eventfd and GET_STATUS shows
// DEVICE_NEEDS_RESET.
func TestBackendSignalsBrokenQueue(t *testing.T) {
	dev, err := softnet.New(&softnet.Options{MaxQueueSize: 1024})
	require.NoError(t, err)
	_, uc, _ := startBackend(t, dev, nil)
	d := newTestDriver(t, uc, virtio.Features(0).With(virtio.FVersion1))
	errFd, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer errFd.Close()
	require.NoError(t, d.fe.SetQueueErr(1, errFd))
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))

	var idx [2]byte
	binary.LittleEndian.PutUint16(idx[:], testQueueSize+5)
	require.NoError(t, d.mem.Write(d.layouts[1].Avail+2, idx[:]))
	require.NoError(t, d.kicks[1].Signal())

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = errFd.Wait(ctx)
	require.NoError(t, err, "SET_VRING_ERR eventfd not signalled")
	st, err := d.fe.Status()
	require.NoError(t, err)
	assert.NotZero(t, st&virtio.StatusDeviceNeedsReset, "status %v", st)
}

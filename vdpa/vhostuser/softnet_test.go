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

// runningWithErrFd serves a softnet device to a test driver offering
// want, with a SET_VRING_ERR eventfd on the transmit queue (1), both
// queues started and DRIVER_OK set.
func runningWithErrFd(t *testing.T, want virtio.Features) (*softnet.Device, *testDriver, *vdpa.EventFD) {
	t.Helper()
	h, err := softnet.New(&softnet.Options{MaxQueueSize: 1024})
	require.NoError(t, err)
	_, uc, _ := startBackend(t, h, nil)
	d := newTestDriver(t, uc, want)
	errFd, err := vdpa.NewEventFD()
	require.NoError(t, err)
	t.Cleanup(func() { errFd.Close() })
	require.NoError(t, d.fe.SetQueueErr(1, errFd))
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	return h, d, errFd
}

// jumpAvail breaks queue q's ring rules (virtio 1.2 §2.7.13.3): it sets
// its avail.idx to idx, more than the queue size ahead, and kicks.
func (d *testDriver) jumpAvail(q int, idx uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], idx)
	require.NoError(d.t, d.mem.Write(d.layouts[q].Avail+2, b[:]))
	require.NoError(d.t, d.kicks[q].Signal())
}

// A driver that breaks a ring rule (avail.idx jumping by more than the
// queue size, virtio 1.2 §2.7.13.3): the device reports the queue broken,
// the back-end signals the SET_VRING_ERR eventfd and GET_STATUS shows
// DEVICE_NEEDS_RESET.
func TestBackendSignalsBrokenQueue(t *testing.T) {
	_, d, errFd := runningWithErrFd(t, virtio.Features(0).With(virtio.FVersion1))
	d.jumpAvail(1, testQueueSize+5)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := errFd.Wait(ctx)
	require.NoError(t, err, "SET_VRING_ERR eventfd not signalled")
	st, err := d.fe.Status()
	require.NoError(t, err)
	assert.NotZero(t, st&virtio.StatusDeviceNeedsReset, "status %v", st)
}

// vhost-user has no message reporting the configuration size, and a
// back-end answers GET_CONFIG only within its configuration space (the
// spec: the reply's payload size must match the request, a zero-length
// one signals failure). The front-end's ConfigSize is therefore the device
// type's layout size (struct virtio_net_config for net) or, for a type it
// does not know, the longest read the back-end answers: a caller reading
// "the whole configuration space" succeeds either way.
func TestFrontendConfigSize(t *testing.T) {
	mac := [6]byte{2, 0, 0, 0, 0, 0x2a}
	tests := []struct {
		name string
		opts *FrontendOptions
		want int
	}{
		{"net device: struct virtio_net_config", nil, virtio.NetConfigSize},
		{"unknown layout: probed from the back-end", &FrontendOptions{DeviceID: virtio.DeviceConsole}, virtio.NetConfigSize},
		{"explicit size wins", &FrontendOptions{ConfigSize: 8}, 8},
		{"no CONFIG protocol feature: no configuration space", &FrontendOptions{ProtocolFeatures: SupportedProtocolFeatures &^ (1 << PFConfig)}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev, err := softnet.New(&softnet.Options{MAC: mac})
			require.NoError(t, err)
			_, uc, _ := startBackend(t, dev, nil)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			fe, err := NewFrontend(ctx, uc, tc.opts)
			require.NoError(t, err)
			t.Cleanup(func() { fe.Close() })
			n, err := fe.ConfigSize()
			require.NoError(t, err)
			require.Equal(t, tc.want, n)
			if n == 0 {
				return
			}
			cfg := make([]byte, n)
			require.NoError(t, fe.ReadConfig(0, cfg), "reading the whole configuration space")
			assert.Equal(t, mac[:], cfg[:6])
			// The session survived the probe's failed reads.
			n2, err := fe.ConfigSize()
			require.NoError(t, err)
			assert.Equal(t, n, n2)
		})
	}
}

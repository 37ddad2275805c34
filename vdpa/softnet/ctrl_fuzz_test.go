package softnet

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// FuzzControlQueue puts arbitrary bytes on the control queue as one
// command, split at an arbitrary point into two readable descriptors, and
// checks the device's answer: exactly one ack byte, VIRTIO_NET_OK or
// VIRTIO_NET_ERR, OK only for a command the parser accepts, every byte the
// device wrote (the ack, the used ring) marked in the dirty log, and device
// state within its limits afterwards.
func FuzzControlQueue(f *testing.F) {
	f.Add([]byte{0, 0, 0}, uint8(1))
	f.Add([]byte{1, 1, 2, 0, 0, 0, 0, 9}, uint8(3))
	f.Add([]byte{4, 0, 3, 0}, uint8(2))
	f.Add([]byte{1, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0}, uint8(5))
	const size = 16
	d, err := New(&Options{MaxQueuePairs: 4, MaxQueueSize: size})
	require.NoError(f, err)
	feat := d.Features() &^ virtio.FEventIdx.Bit()
	require.NoError(f, d.SetFeatures(feat))
	r, err := vring.NewMemfdRegion(0, 1<<16, nil)
	require.NoError(f, err)
	mem, err := vring.NewMemory(r)
	require.NoError(f, err)
	f.Cleanup(func() { mem.Close() })
	l := vring.ContiguousLayout(0, size)
	q := d.queues[d.ctrlIndex()]
	q.gather = make([]byte, virtio.NetHdrSize+MaxFrame)
	const data = vring.GuestAddr(0x2000)
	// A log of 8-byte pages (see FuzzReceiveRing), and guest memory as the
	// driver left it before the device ran.
	log, err := dirty.New(1<<16, &dirty.Options{PageSize: 8})
	require.NoError(f, err)
	f.Cleanup(func() { log.Close() })
	before := make([]byte, 1<<16)
	f.Fuzz(func(t *testing.T, cmd []byte, split uint8) {
		if len(cmd) == 0 || len(cmd) > 0x4000 {
			return
		}
		drv, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: l, Features: feat})
		require.NoError(t, err)
		dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: l, Features: feat, State: vring.InitialState(feat),
			Log: log.NewCache()})
		require.NoError(t, err)
		q.dq = dq
		require.NoError(t, mem.Write(data, cmd))
		ackAddr := data + vring.GuestAddr(len(cmd))
		require.NoError(t, mem.Write(ackAddr, []byte{0xaa}))
		k := int(split) % len(cmd)
		bufs := []vring.Buffer{{Addr: data, Len: uint32(len(cmd))}}
		if k > 0 {
			bufs = []vring.Buffer{{Addr: data, Len: uint32(k)}, {Addr: data + vring.GuestAddr(k), Len: uint32(len(cmd) - k)}}
		}
		bufs = append(bufs, vring.Buffer{Addr: ackAddr, Len: 1, Writable: true})
		_, err = drv.Add(bufs)
		require.NoError(t, err)
		drv.Publish()
		require.NoError(t, log.Clear())
		copy(before, r.Bytes())
		n, err := d.ctrlBatch(q)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		require.NoError(t, dq.FlushLog())
		checkLogged(t, log, r.Bytes(), before)
		_, length, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, uint32(1), length)
		var ack [1]byte
		require.NoError(t, mem.Read(ackAddr, ack[:]))
		require.Contains(t, []byte{virtio.NetCtrlOK, virtio.NetCtrlErr}, ack[0])
		if _, perr := virtio.ParseNetCtrl(cmd); perr != nil {
			require.Equal(t, virtio.NetCtrlErr, ack[0], "malformed command acknowledged OK")
		}
		require.GreaterOrEqual(t, d.ActivePairs(), 1)
		require.LessOrEqual(t, d.ActivePairs(), 4)
		require.Zero(t, d.MAC()[0]&1, "station address became multicast")
	})
}

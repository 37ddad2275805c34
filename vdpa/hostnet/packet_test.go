package hostnet_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/hostnet"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// newPacketRig attaches an AF_PACKET socket to one end of a veth pair in
// the host namespace; the host's address is on the other end.
func newPacketRig(t *testing.T, features virtio.Features, opts hostnet.PacketOptions) *rig {
	return newRig(t, features, func(host *netns) (backend, string) {
		host.ip("link", "add", "vdpk0", "type", "veth", "peer", "name", "vdpk1")
		host.ip("link", "set", "vdpk0", "up")
		opts.NetNS = host.path
		p, err := hostnet.OpenPacket("vdpk0", &opts)
		require.NoError(t, err)
		return p, "vdpk1"
	})
}

func TestPacketTCPAndUDP(t *testing.T) {
	all := guestBase | softnet.HostOffloads | softnet.GuestOffloads
	for _, tc := range []struct {
		name     string
		features virtio.Features
		opts     hostnet.PacketOptions
	}{
		{"offloads", all, hostnet.PacketOptions{}},
		{"no offloads negotiated", guestBase, hostnet.PacketOptions{}},
		{"offloads negotiated, socket without offloads", all, hostnet.PacketOptions{NoOffload: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newPacketRig(t, tc.features, tc.opts)
			// USO frames from the guest are segmented by the device (a packet
			// socket takes no UDP_L4 header from it).
			trafficChecks(t, r, tc.features, !tc.opts.NoOffload, true, r.guest.uso)
		})
	}
}

// TestPacketCloseLeaksNothing: Close closes the socket and the reader ends.
func TestPacketCloseLeaksNothing(t *testing.T) {
	requireNetAdmin(t)
	ns := newNetNS(t)
	ns.ip("link", "add", "vdpk0", "type", "veth", "peer", "name", "vdpk1")
	before := countFDs(t)
	dev, err := softnet.New(&softnet.Options{Offload: true})
	require.NoError(t, err)
	p, err := hostnet.OpenPacket("vdpk0", &hostnet.PacketOptions{NetNS: ns.path})
	require.NoError(t, err)
	require.NoError(t, p.Attach(dev))
	assert.ErrorIs(t, p.Attach(dev), hostnet.ErrAttached)
	assert.Equal(t, before+1, countFDs(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, p.Close(ctx))
	assert.ErrorIs(t, p.Close(ctx), hostnet.ErrClosed)
	assert.ErrorIs(t, p.Attach(dev), hostnet.ErrClosed)
	assert.Equal(t, before, countFDs(t))
	_, err = hostnet.OpenPacket("nosuchif0", &hostnet.PacketOptions{NetNS: ns.path})
	assert.Error(t, err)
	assert.Equal(t, before, countFDs(t), "a failed open leaks nothing")
}

// TestPacketPathsAllocateNothing: sending a frame with its header and
// reading a ring block and delivering its frames allocate nothing.
func TestPacketPathsAllocateNothing(t *testing.T) {
	requireNetAdmin(t)
	ns := newNetNS(t)
	ns.ip("link", "add", "vdpk0", "type", "veth", "peer", "name", "vdpk1")
	ns.ip("link", "set", "vdpk0", "up")
	ns.ip("addr", "add", "10.79.0.1/24", "dev", "vdpk1")
	ns.ip("link", "set", "vdpk1", "up")
	ns.ip("neigh", "add", "10.79.0.2", "lladdr", "02:00:00:00:00:02", "dev", "vdpk1")
	p, err := hostnet.OpenPacket("vdpk0", &hostnet.PacketOptions{NetNS: ns.path})
	require.NoError(t, err)
	defer p.Close(context.Background())
	// A started device with a driver and its receive buffers posted, so
	// that receiving measures the delivery into them, not a drop.
	dev, err := softnet.New(&softnet.Options{Offload: true})
	require.NoError(t, err)
	g := startDriver(t, dev, guestBase, 0)
	require.NoError(t, g.postRx(guestQueueSize))

	frame := make([]byte, 1000)
	copy(frame, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x88, 0xb5})
	tx := &softnet.Tx{}
	p.HandleOffload(tx, virtio.NetHdr{}, frame)
	assert.Zero(t, testing.AllocsPerRun(200, func() { p.HandleOffload(tx, virtio.NetHdr{}, frame) }), "send")

	var c *net.UDPConn
	ns.run(func() {
		c, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IP{10, 79, 0, 2}, Port: 9})
		require.NoError(t, err)
	})
	defer c.Close()
	payload := make([]byte, 1000)
	round := func() {
		_, err := c.Write(payload) // out of vdpk1, into vdpk0's ring
		require.NoError(t, err)
		require.NoError(t, p.ReceiveBlock(dev))
	}
	round()
	assert.Zero(t, testing.AllocsPerRun(40, round), "receive") // 42 frames and the kernel's few IPv6 ones fit the 64 buffers
	st := p.Stats()
	assert.GreaterOrEqual(t, st.RxFrames, uint64(42), "every frame read delivered: %+v", st)
	assert.Zero(t, st.RxDropped, "every frame read delivered: %+v", st)
	assert.Equal(t, uint64(202), st.TxFrames+st.TxDropped, "every send accounted for: %+v", st)
}

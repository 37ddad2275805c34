package hostnet_test

import (
	"context"
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
			trafficChecks(t, r, tc.features, !tc.opts.NoOffload, true, false)
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
	assert.Equal(t, before+1, countFDs(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, p.Close(ctx))
	assert.ErrorIs(t, p.Close(ctx), hostnet.ErrClosed)
	assert.Equal(t, before, countFDs(t))
	_, err = hostnet.OpenPacket("nosuchif0", &hostnet.PacketOptions{NetNS: ns.path})
	assert.Error(t, err)
	assert.Equal(t, before, countFDs(t), "a failed open leaks nothing")
}

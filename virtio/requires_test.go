package virtio

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestConsistent: the virtio-net rules of §5.1.3.1, one row each, and the
// chains they form. Each row offers a feature without what it needs, and
// the expected set is written out by hand.
func TestConsistent(t *testing.T) {
	f := func(fs ...Feature) Features { return Features(0).With(fs...) }
	base := f(FVersion1, NetFMAC, NetFMrgRxbuf)
	tests := []struct {
		name    string
		dev     DeviceID
		in, out Features
	}{
		{"nothing to drop", DeviceNet, base | f(NetFCsum, NetFHostTSO4, NetFCtrlVQ, NetFMQ), base | f(NetFCsum, NetFHostTSO4, NetFCtrlVQ, NetFMQ)},
		{"GUEST_TSO4 needs GUEST_CSUM", DeviceNet, base | f(NetFGuestTSO4), base},
		{"GUEST_TSO6 needs GUEST_CSUM", DeviceNet, base | f(NetFGuestTSO6), base},
		{"GUEST_UFO needs GUEST_CSUM", DeviceNet, base | f(NetFGuestUFO), base},
		{"GUEST_USO4/6 need GUEST_CSUM", DeviceNet, base | f(NetFGuestUSO4, NetFGuestUSO6), base},
		{"HOST_TSO4/6, HOST_UFO, HOST_USO need CSUM", DeviceNet, base | f(NetFHostTSO4, NetFHostTSO6, NetFHostUFO, NetFHostUSO), base},
		{"GUEST_ECN with one of GUEST_TSO4/6 stays", DeviceNet, base | f(NetFGuestCsum, NetFGuestTSO6, NetFGuestECN), base | f(NetFGuestCsum, NetFGuestTSO6, NetFGuestECN)},
		{"GUEST_ECN without GUEST_TSO4/6", DeviceNet, base | f(NetFGuestCsum, NetFGuestECN), base | f(NetFGuestCsum)},
		{"HOST_ECN without HOST_TSO4/6", DeviceNet, base | f(NetFCsum, NetFHostECN), base | f(NetFCsum)},
		{"chain: no GUEST_CSUM takes TSO4, TSO6 and then ECN", DeviceNet, base | f(NetFGuestTSO4, NetFGuestTSO6, NetFGuestECN), base},
		{"chain: no CSUM takes HOST_TSO4, then HOST_ECN and RSC_EXT", DeviceNet, base | f(NetFHostTSO4, NetFHostECN, NetFRSCExt), base},
		{"RSC_EXT with HOST_TSO6 stays", DeviceNet, base | f(NetFCsum, NetFHostTSO6, NetFRSCExt), base | f(NetFCsum, NetFHostTSO6, NetFRSCExt)},
		{"no CTRL_VQ: every control-queue feature goes", DeviceNet,
			base | f(NetFCtrlRx, NetFCtrlVLAN, NetFGuestAnnounce, NetFMQ, NetFCtrlMACAddr, NetFNotfCoal, NetFVQNotfCoal, NetFRSS, NetFCtrlGuestOffloads, NetFCtrlRxExtra, NetFHashReport),
			base},
		{"CTRL_RX_EXTRA needs CTRL_RX", DeviceNet, base | f(NetFCtrlVQ, NetFCtrlRxExtra), base | f(NetFCtrlVQ)},
		{"transport bits are not net's business", DeviceNet, base | f(FRingPacked, FEventIdx, FIndirectDesc), base | f(FRingPacked, FEventIdx, FIndirectDesc)},
		{"another device type: bit 7 means something else", DeviceBlock, base | f(Feature(7)), base | f(Feature(7))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.in.Consistent(tc.dev)
			assert.Equal(t, tc.out.Format(tc.dev), got.Format(tc.dev))
		})
	}
}

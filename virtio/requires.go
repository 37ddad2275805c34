package virtio

// A device must not offer a feature that requires another feature it does
// not offer (virtio 1.2 §2.2.2), and a driver must not accept one either
// (§2.2.1); Linux's virtio-net driver fails to probe a device whose
// negotiated features break the control-queue rules. netRequires is the
// virtio-net table of §5.1.3.1 ("Feature bit requirements"): a feature
// needs at least one of the features listed for it.
var netRequires = map[Feature][]Feature{
	NetFGuestTSO4:     {NetFGuestCsum},
	NetFGuestTSO6:     {NetFGuestCsum},
	NetFGuestECN:      {NetFGuestTSO4, NetFGuestTSO6},
	NetFGuestUFO:      {NetFGuestCsum},
	NetFGuestUSO4:     {NetFGuestCsum},
	NetFGuestUSO6:     {NetFGuestCsum},
	NetFHostTSO4:      {NetFCsum},
	NetFHostTSO6:      {NetFCsum},
	NetFHostECN:       {NetFHostTSO4, NetFHostTSO6},
	NetFHostUFO:       {NetFCsum},
	NetFHostUSO:       {NetFCsum},
	NetFCtrlRx:        {NetFCtrlVQ},
	NetFCtrlVLAN:      {NetFCtrlVQ},
	NetFGuestAnnounce: {NetFCtrlVQ},
	NetFMQ:            {NetFCtrlVQ},
	NetFCtrlMACAddr:   {NetFCtrlVQ},
	NetFNotfCoal:      {NetFCtrlVQ},
	NetFVQNotfCoal:    {NetFCtrlVQ},
	NetFRSS:           {NetFCtrlVQ},
	NetFRSCExt:        {NetFHostTSO4, NetFHostTSO6},
	// Not in the table, but used only through control-queue commands
	// (VIRTIO_NET_CTRL_GUEST_OFFLOADS, the extra RX modes, the hash
	// configuration), so without a control queue they cannot be used at
	// all; Linux's virtio-net refuses a device with HASH_REPORT and no
	// CTRL_VQ.
	NetFCtrlGuestOffloads: {NetFCtrlVQ},
	NetFCtrlRxExtra:       {NetFCtrlRx},
	NetFHashReport:        {NetFCtrlVQ},
}

// Requires returns the features of which f needs at least one in a device
// of type dev, or nil when f needs none (or the type's table is not known
// here: only virtio-net's is).
func (f Feature) Requires(dev DeviceID) []Feature {
	if dev == DeviceNet {
		return netRequires[f]
	}
	return nil
}

// Consistent returns s less every feature whose requirements s does not
// meet, repeated until none is left (GUEST_ECN goes with GUEST_TSO4 and
// GUEST_TSO6 when GUEST_CSUM is missing): the largest subset of s a device
// of type dev may offer, or a driver accept.
func (s Features) Consistent(dev DeviceID) Features {
	for {
		out := s
		for f := Feature(0); f < 64; f++ {
			need := f.Requires(dev)
			if s&f.Bit() == 0 || len(need) == 0 {
				continue
			}
			met := false
			for _, n := range need {
				met = met || s&n.Bit() != 0
			}
			if !met {
				out &^= f.Bit()
			}
		}
		if out == s {
			return s
		}
		s = out
	}
}

package mgmt

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sort"
	"testing"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/virtio"
)

// fakeKernel answers vdpa requests the way drivers/vdpa/vdpa.c does, from a
// little in-memory state: one bus-less management device and the devices
// added to it. It records every request for the tests to inspect.
type fakeKernel struct {
	t        *testing.T
	devices  map[string]fakeDev
	requests []genetlink.Message
	flags    []netlink.HeaderFlags
	// statusWidth is the byte width of VDPA_ATTR_DEV_NET_STATUS (2 since
	// Linux 6.0, 1 before).
	statusWidth int
	// corrupt, when set, rewrites replies before they are sent.
	corrupt func([]byte) []byte
}

type fakeDev struct {
	mac        net.HardwareAddr
	mtu        uint16
	maxVQP     uint16
	negotiated uint64 // 0: FEATURES_OK not set
}

const (
	fakeFamilyID     = 0x1b
	fakeMgmtName     = "vdpasim_net"
	fakeFeatures     = uint64(1)<<5 | 1<<16 | 1<<3 | 1<<17 | 1<<23 | 1<<27 | 1<<32 | 1<<33
	fakeMaxVQs       = 3
	fakeMaxVQSize    = 256
	fakeVendorID     = 0
	fakeNetDeviceID  = 1
	fakeStatusLinkUp = 1
)

func newFakeKernel(t *testing.T) *fakeKernel {
	return &fakeKernel{t: t, devices: map[string]fakeDev{}, statusWidth: 2}
}

func (k *fakeKernel) client(t *testing.T) *Client {
	c := genltest.Dial(genltest.ServeFamily(genetlink.Family{ID: fakeFamilyID, Name: "vdpa", Version: 1}, k.serve))
	cl, err := New(c)
	require.NoError(t, err)
	t.Cleanup(func() { cl.Close() })
	return cl
}

// dump answers a dump: an empty one is a lone NLMSG_DONE, which genltest
// spells io.EOF.
func dump(msgs []genetlink.Message) ([]genetlink.Message, error) {
	if len(msgs) == 0 {
		return nil, io.EOF
	}
	return msgs, nil
}

// ack is the kernel's NLMSG_ERROR with code 0 answering NLM_F_ACK.
func ack() error { return genltest.Error(0) }

func decodeReq(t *testing.T, data []byte) map[uint16][]byte {
	m := map[uint16][]byte{}
	ad, err := netlink.NewAttributeDecoder(data)
	require.NoError(t, err)
	for ad.Next() {
		m[ad.Type()] = ad.Bytes()
	}
	require.NoError(t, ad.Err())
	return m
}

func (k *fakeKernel) serve(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
	if nreq.Header.Type != fakeFamilyID {
		return nil, genltest.Error(int(unix.EINVAL))
	}
	k.requests = append(k.requests, greq)
	k.flags = append(k.flags, nreq.Header.Flags)
	req := decodeReq(k.t, greq.Data)
	name := str(req[attrDevName])
	reply := func(cmd uint8, fill func(ae *netlink.AttributeEncoder)) genetlink.Message {
		ae := netlink.NewAttributeEncoder()
		fill(ae)
		b, err := ae.Encode()
		require.NoError(k.t, err)
		if k.corrupt != nil {
			b = k.corrupt(b)
		}
		return genetlink.Message{Header: genetlink.Header{Command: cmd, Version: 1}, Data: b}
	}
	names := func() []string {
		var ns []string
		for n := range k.devices {
			if name == "" || n == name {
				ns = append(ns, n)
			}
		}
		sort.Strings(ns)
		return ns
	}
	switch greq.Header.Command {
	case cmdMgmtdevGet:
		if h, ok := req[attrMgmtdevDevName]; ok && str(h) != fakeMgmtName {
			return nil, genltest.Error(int(unix.ENODEV))
		}
		return []genetlink.Message{reply(cmdMgmtdevNew, func(ae *netlink.AttributeEncoder) {
			ae.String(attrMgmtdevDevName, fakeMgmtName)
			ae.Uint64(attrMgmtdevSupportedClasses, 1<<fakeNetDeviceID)
			ae.Uint32(attrDevMgmtdevMaxVQs, fakeMaxVQs)
			ae.Uint64(attrDevSupportedFeatures, fakeFeatures)
		})}, nil
	case cmdDevNew:
		if str(req[attrMgmtdevDevName]) != fakeMgmtName {
			return nil, genltest.Error(int(unix.ENODEV))
		}
		if _, ok := k.devices[name]; ok {
			return nil, genltest.Error(int(unix.EEXIST))
		}
		d := fakeDev{mac: net.HardwareAddr{0, 0, 0, 0, 0, 0}, mtu: 1500, maxVQP: 1}
		if b, ok := req[attrDevNetCfgMACAddr]; ok {
			d.mac = net.HardwareAddr(b)
		}
		if b, ok := req[attrDevNetCfgMTU]; ok {
			d.mtu = binary.NativeEndian.Uint16(b)
		}
		if b, ok := req[attrDevNetCfgMaxVQP]; ok {
			d.maxVQP = binary.NativeEndian.Uint16(b)
		}
		k.devices[name] = d
		return nil, ack()
	case cmdDevDel:
		if _, ok := k.devices[name]; !ok {
			return nil, genltest.Error(int(unix.ENODEV))
		}
		delete(k.devices, name)
		return nil, ack()
	case cmdDevGet:
		if _, ok := k.devices[name]; name != "" && !ok {
			return nil, genltest.Error(int(unix.ENODEV))
		}
		var out []genetlink.Message
		for _, n := range names() {
			out = append(out, reply(cmdDevNew, func(ae *netlink.AttributeEncoder) {
				ae.String(attrDevName, n)
				ae.String(attrMgmtdevDevName, fakeMgmtName)
				ae.Uint32(attrDevID, fakeNetDeviceID)
				ae.Uint32(attrDevVendorID, fakeVendorID)
				ae.Uint32(attrDevMaxVQs, fakeMaxVQs)
				ae.Uint16(attrDevMaxVQSize, fakeMaxVQSize)
				ae.Uint16(attrDevMinVQSize, 1)
			}))
		}
		return dump(out)
	case cmdDevConfigGet:
		if _, ok := k.devices[name]; name != "" && !ok {
			return nil, genltest.Error(int(unix.ENODEV))
		}
		var out []genetlink.Message
		for _, n := range names() {
			d := k.devices[n]
			out = append(out, reply(cmdDevConfigGet, func(ae *netlink.AttributeEncoder) {
				ae.String(attrDevName, n)
				ae.Uint32(attrDevID, fakeNetDeviceID)
				if d.negotiated != 0 {
					ae.Uint64(attrDevNegotiatedFeatures, d.negotiated)
				}
				ae.Uint64(attrDevFeatures, fakeFeatures)
				ae.Uint16(attrDevNetCfgMTU, d.mtu)
				ae.Bytes(attrDevNetCfgMACAddr, d.mac)
				if k.statusWidth == 1 {
					ae.Uint8(attrDevNetStatus, fakeStatusLinkUp)
				} else {
					ae.Uint16(attrDevNetStatus, fakeStatusLinkUp)
				}
			}))
		}
		return dump(out)
	case cmdDevVstatsGet:
		d, ok := k.devices[name]
		if !ok {
			return nil, genltest.Error(int(unix.ENODEV))
		}
		if d.negotiated == 0 {
			return nil, genltest.Error(int(unix.EAGAIN))
		}
		q := binary.NativeEndian.Uint32(req[attrDevQueueIndex])
		return []genetlink.Message{reply(cmdDevVstatsGet, func(ae *netlink.AttributeEncoder) {
			ae.String(attrDevName, name)
			ae.Uint32(attrDevID, fakeNetDeviceID)
			ae.Uint64(attrDevNegotiatedFeatures, d.negotiated)
			ae.Uint32(attrDevQueueIndex, q)
			ae.String(attrDevVendorAttrName, "received_desc")
			ae.Uint64(attrDevVendorAttrValue, 7)
			ae.String(attrDevVendorAttrName, "completed_desc")
			ae.Uint64(attrDevVendorAttrValue, 5)
		})}, nil
	}
	return nil, genltest.Error(int(unix.EOPNOTSUPP))
}

func TestManagementDevicesDecodesClassesAndLimits(t *testing.T) {
	k := newFakeKernel(t)
	c := k.client(t)
	ms, err := c.ManagementDevices(context.Background())
	require.NoError(t, err)
	require.Len(t, ms, 1)
	m := ms[0]
	assert.Equal(t, "vdpasim_net", m.Handle())
	assert.Equal(t, []virtio.DeviceID{virtio.DeviceNet}, m.Classes)
	assert.Equal(t, uint32(fakeMaxVQs), m.MaxVQs)
	assert.Equal(t, virtio.Features(fakeFeatures), m.SupportedFeatures)
	assert.Equal(t, netlink.Request|netlink.Dump, k.flags[0])

	one, err := c.ManagementDevice(context.Background(), "vdpasim_net")
	require.NoError(t, err)
	assert.Equal(t, m, one)
	_, err = c.ManagementDevice(context.Background(), "pci/0000:00:01.0")
	assert.ErrorIs(t, err, unix.ENODEV)
	req := decodeReq(t, k.requests[len(k.requests)-1].Data)
	assert.Equal(t, "pci", str(req[attrMgmtdevBusName]), "bus part of the handle goes in VDPA_ATTR_MGMTDEV_BUS_NAME")
	assert.Equal(t, "0000:00:01.0", str(req[attrMgmtdevDevName]))
}

func TestAddShowDeleteRoundTrip(t *testing.T) {
	k := newFakeKernel(t)
	c := k.client(t)
	ctx := context.Background()
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x11}
	require.NoError(t, c.AddDevice(ctx, DeviceSpec{Name: "vdpa0", MgmtDev: "vdpasim_net", MAC: mac, MTU: 9000, MaxVQPairs: 1}))

	// The request carries exactly what iproute2's `vdpa dev add` sends.
	req := decodeReq(t, k.requests[0].Data)
	assert.Equal(t, "vdpa0\x00", string(req[attrDevName]))
	assert.Equal(t, "vdpasim_net\x00", string(req[attrMgmtdevDevName]))
	assert.NotContains(t, req, uint16(attrMgmtdevBusName))
	assert.Equal(t, []byte(mac), req[attrDevNetCfgMACAddr])
	assert.Equal(t, uint16(9000), binary.NativeEndian.Uint16(req[attrDevNetCfgMTU]))
	assert.Equal(t, uint16(1), binary.NativeEndian.Uint16(req[attrDevNetCfgMaxVQP]))
	assert.Equal(t, netlink.Request|netlink.Acknowledge, k.flags[0])

	err := c.AddDevice(ctx, DeviceSpec{Name: "vdpa0", MgmtDev: "vdpasim_net"})
	assert.ErrorIs(t, err, unix.EEXIST)
	var oe *OpError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, "VDPA_CMD_DEV_NEW", oe.Op)

	devs, err := c.Devices(ctx)
	require.NoError(t, err)
	require.Len(t, devs, 1)
	assert.Equal(t, Device{Name: "vdpa0", MgmtName: "vdpasim_net", DeviceID: virtio.DeviceNet,
		MaxVQs: fakeMaxVQs, MaxVQSize: fakeMaxVQSize, MinVQSize: 1}, devs[0])
	assert.Equal(t, "vdpasim_net", devs[0].MgmtHandle())
	d, err := c.Device(ctx, "vdpa0")
	require.NoError(t, err)
	assert.Equal(t, devs[0], d)

	cfg, err := c.DeviceConfig(ctx, "vdpa0")
	require.NoError(t, err)
	assert.Equal(t, mac, cfg.MAC)
	assert.Equal(t, uint16(9000), cfg.MTU)
	assert.True(t, cfg.HasStatus)
	assert.True(t, cfg.LinkUp())
	assert.False(t, cfg.Announce())
	assert.False(t, cfg.HasNegotiated, "no negotiated features before FEATURES_OK")
	assert.Equal(t, virtio.Features(fakeFeatures), cfg.Features)

	require.NoError(t, c.DeleteDevice(ctx, "vdpa0"))
	devs, err = c.Devices(ctx)
	require.NoError(t, err)
	assert.Empty(t, devs)
}

func TestMissingDeviceIsErrNotFoundAndENODEV(t *testing.T) {
	c := newFakeKernel(t).client(t)
	ctx := context.Background()
	for name, err := range map[string]error{
		"Device":       func() error { _, err := c.Device(ctx, "nope"); return err }(),
		"DeviceConfig": func() error { _, err := c.DeviceConfig(ctx, "nope"); return err }(),
		"DeleteDevice": c.DeleteDevice(ctx, "nope"),
		"QueueStats":   func() error { _, err := c.QueueStats(ctx, "nope", 0); return err }(),
	} {
		assert.ErrorIs(t, err, ErrNotFound, name)
		assert.ErrorIs(t, err, unix.ENODEV, name)
	}
}

func TestQueueStatsPairsNamesWithValues(t *testing.T) {
	k := newFakeKernel(t)
	c := k.client(t)
	ctx := context.Background()
	require.NoError(t, c.AddDevice(ctx, DeviceSpec{Name: "vdpa0", MgmtDev: "vdpasim_net"}))

	_, err := c.QueueStats(ctx, "vdpa0", 0)
	assert.ErrorIs(t, err, unix.EAGAIN, "before FEATURES_OK the kernel refuses stats")

	d := k.devices["vdpa0"]
	d.negotiated = 1 << 32
	k.devices["vdpa0"] = d
	st, err := c.QueueStats(ctx, "vdpa0", 1)
	require.NoError(t, err)
	assert.Equal(t, uint32(1), st.Queue)
	assert.Equal(t, virtio.Features(1<<32), st.Negotiated)
	assert.Equal(t, []Stat{{"received_desc", 7}, {"completed_desc", 5}}, st.Stats)
	v, ok := st.Get("completed_desc")
	assert.True(t, ok)
	assert.Equal(t, uint64(5), v)
	_, ok = st.Get("nope")
	assert.False(t, ok)
}

// Linux before 6.0 sent VDPA_ATTR_DEV_NET_STATUS as a u8, later kernels as a
// u16; both decode.
func TestNetStatusAcceptsBothWidths(t *testing.T) {
	for _, w := range []int{1, 2} {
		k := newFakeKernel(t)
		k.statusWidth = w
		c := k.client(t)
		require.NoError(t, c.AddDevice(context.Background(), DeviceSpec{Name: "vdpa0", MgmtDev: "vdpasim_net"}))
		cfgs, err := c.DeviceConfigs(context.Background())
		require.NoError(t, err)
		require.Len(t, cfgs, 1)
		assert.True(t, cfgs[0].LinkUp(), "width %d", w)
	}
}

func TestMalformedRepliesAreRejected(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt func([]byte) []byte
	}{
		{"truncated attribute", func(b []byte) []byte { return b[:len(b)-3] }},
		{"u32 attribute with 2 bytes", func([]byte) []byte {
			ae := netlink.NewAttributeEncoder()
			ae.String(attrDevName, "vdpa0")
			ae.Uint16(attrDevID, 1)
			b, _ := ae.Encode()
			return b
		}},
		{"MAC of 5 bytes", func([]byte) []byte {
			ae := netlink.NewAttributeEncoder()
			ae.String(attrDevName, "vdpa0")
			ae.Uint32(attrDevID, 1)
			ae.Bytes(attrDevNetCfgMACAddr, []byte{1, 2, 3, 4, 5})
			b, _ := ae.Encode()
			return b
		}},
		{"no device id", func([]byte) []byte {
			ae := netlink.NewAttributeEncoder()
			ae.String(attrDevName, "vdpa0")
			b, _ := ae.Encode()
			return b
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := newFakeKernel(t)
			c := k.client(t)
			require.NoError(t, c.AddDevice(context.Background(), DeviceSpec{Name: "vdpa0", MgmtDev: "vdpasim_net"}))
			k.corrupt = tc.corrupt
			_, err := c.DeviceConfig(context.Background(), "vdpa0")
			assert.ErrorIs(t, err, ErrMalformed)
		})
	}
}

func TestStatsWithUnpairedValueIsMalformed(t *testing.T) {
	for _, data := range [][]byte{
		func() []byte {
			ae := netlink.NewAttributeEncoder()
			ae.String(attrDevName, "vdpa0")
			ae.Uint32(attrDevQueueIndex, 0)
			ae.Uint64(attrDevVendorAttrValue, 1)
			b, _ := ae.Encode()
			return b
		}(),
		func() []byte {
			ae := netlink.NewAttributeEncoder()
			ae.String(attrDevName, "vdpa0")
			ae.Uint32(attrDevQueueIndex, 0)
			ae.String(attrDevVendorAttrName, "x")
			b, _ := ae.Encode()
			return b
		}(),
	} {
		_, err := decodeStats(data)
		assert.ErrorIs(t, err, ErrMalformed)
	}
}

func TestInvalidSpecIsRejectedBeforeSending(t *testing.T) {
	k := newFakeKernel(t)
	c := k.client(t)
	for _, s := range []DeviceSpec{
		{MgmtDev: "vdpasim_net"},
		{Name: "vdpa0"},
		{Name: "vdpa0", MgmtDev: "vdpasim_net", MAC: net.HardwareAddr{1, 2, 3}},
		{Name: "vdpa0", MgmtDev: "vdpasim_net", MTU: 67},
	} {
		assert.ErrorIs(t, c.AddDevice(context.Background(), s), ErrInvalidSpec)
	}
	assert.ErrorIs(t, c.SetMAC(context.Background(), "vdpa0", net.HardwareAddr{1}), ErrInvalidSpec)
	assert.Empty(t, k.requests)
}

func TestNoVDPAFamilyIsErrNotAvailable(t *testing.T) {
	conn := genltest.Dial(func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, genltest.Error(int(unix.ENOENT))
	})
	defer conn.Close()
	_, err := New(conn)
	assert.ErrorIs(t, err, ErrNotAvailable)
}

func TestCancelledContextSendsNothing(t *testing.T) {
	k := newFakeKernel(t)
	c := k.client(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.Devices(ctx)
	assert.ErrorIs(t, err, context.Canceled)
	assert.Empty(t, k.requests)
}

func TestProvisionedFeaturesAreSent(t *testing.T) {
	k := newFakeKernel(t)
	c := k.client(t)
	f := virtio.Features(0).With(virtio.FVersion1, virtio.FAccessPlatform, virtio.NetFMAC)
	require.NoError(t, c.AddDevice(context.Background(), DeviceSpec{Name: "vdpa1", MgmtDev: "vdpasim_net", Features: &f}))
	req := decodeReq(t, k.requests[0].Data)
	assert.Equal(t, uint64(f), binary.NativeEndian.Uint64(req[attrDevFeatures]))
}

func TestOpErrorUnwraps(t *testing.T) {
	e := &OpError{Op: "VDPA_CMD_DEV_DEL", Err: os.ErrPermission}
	assert.True(t, errors.Is(e, os.ErrPermission))
	assert.Equal(t, "VDPA_CMD_DEV_DEL: permission denied", e.Error())
}

package mgmt_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/vdpa/mgmt"
	"github.com/vdpakit/vdpakit/virtio"
)

func requireVDPA(t *testing.T) *mgmt.Client {
	t.Helper()
	testenv.RequireVM(t)
	testenv.RequireRoot(t)
	testenv.RequireModule(t, "vdpa")
	testenv.RequireModule(t, "vdpa_sim_net")
	c, err := mgmt.Dial(nil)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// vdpaJSON runs `vdpa -j ARGS...`; keys are trimmed (iproute2 6.1 prints
// some with a trailing space).
func vdpaJSON(t *testing.T, args ...string) map[string]any {
	t.Helper()
	out := testenv.Command(t, "vdpa", append([]string{"-j"}, args...)...)
	t.Logf("vdpa -j %s: %s", strings.Join(args, " "), out)
	var v map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	return trimKeys(v).(map[string]any)
}

func trimKeys(v any) any {
	switch x := v.(type) {
	case map[string]any:
		m := map[string]any{}
		for k, e := range x {
			m[strings.TrimSpace(k)] = trimKeys(e)
		}
		return m
	case []any:
		for i := range x {
			x[i] = trimKeys(x[i])
		}
	}
	return v
}

func obj(t *testing.T, v map[string]any, keys ...string) map[string]any {
	t.Helper()
	for _, k := range keys {
		n, ok := v[k].(map[string]any)
		require.True(t, ok, "no object %q in %v", k, v)
		v = n
	}
	return v
}

// iproute2's feature names (vdpa/vdpa.c), "bit_N" for the rest.
var featureBits = map[string]uint{
	"CSUM": 0, "GUEST_CSUM": 1, "CTRL_GUEST_OFFLOADS": 2, "MTU": 3, "MAC": 5, "GUEST_TSO4": 7,
	"GUEST_TSO6": 8, "GUEST_ECN": 9, "GUEST_UFO": 10, "HOST_TSO4": 11, "HOST_TSO6": 12, "HOST_ECN": 13,
	"HOST_UFO": 14, "MRG_RXBUF": 15, "STATUS": 16, "CTRL_VQ": 17, "CTRL_RX": 18, "CTRL_VLAN": 19,
	"CTRL_RX_EXTRA": 20, "GUEST_ANNOUNCE": 21, "MQ": 22, "CTRL_MAC_ADDR": 23, "NOTIFY_ON_EMPTY": 24,
	"ANY_LAYOUT": 27, "RING_INDIRECT_DESC": 28, "RING_EVENT_IDX": 29, "VERSION_1": 32,
	"ACCESS_PLATFORM": 33, "RING_PACKED": 34, "IN_ORDER": 35, "ORDER_PLATFORM": 36, "SR_IOV": 37,
	"NOTIFICATION_DATA": 38, "HASH_REPORT": 57, "RSS": 60, "RSC_EXT": 61, "STANDBY": 62, "SPEED_DUPLEX": 63,
}

func features(t *testing.T, v any) virtio.Features {
	t.Helper()
	list, ok := v.([]any)
	require.True(t, ok, "feature list %v", v)
	var f virtio.Features
	for _, e := range list {
		s := strings.TrimSpace(e.(string))
		if b, ok := featureBits[s]; ok {
			f |= 1 << b
			continue
		}
		var n uint
		_, err := fmt.Sscanf(s, "bit_%d", &n)
		require.NoError(t, err, "unknown feature name %q", s)
		f |= 1 << n
	}
	return f
}

// Management devices: the same set, classes, limits and features as
// `vdpa mgmtdev show`.
func TestManagementDevicesMatchVdpaTool(t *testing.T) {
	c := requireVDPA(t)
	ms, err := c.ManagementDevices(context.Background())
	require.NoError(t, err)
	tool := obj(t, vdpaJSON(t, "mgmtdev", "show"), "mgmtdev")
	require.Len(t, ms, len(tool))
	for _, m := range ms {
		tm := obj(t, tool, m.Handle())
		var classes []any
		for _, cl := range m.Classes {
			classes = append(classes, map[virtio.DeviceID]string{virtio.DeviceNet: "net", virtio.DeviceBlock: "block"}[cl])
		}
		assert.Equal(t, tm["supported_classes"], classes, m.Handle())
		assert.EqualValues(t, tm["max_supported_vqs"], m.MaxVQs, m.Handle())
		if df, ok := tm["dev_features"]; ok {
			assert.Equal(t, features(t, df).Format(virtio.DeviceNet), m.SupportedFeatures.Format(virtio.DeviceNet), m.Handle())
		}
	}
	one, err := c.ManagementDevice(context.Background(), "vdpasim_net")
	require.NoError(t, err)
	assert.Equal(t, []virtio.DeviceID{virtio.DeviceNet}, one.Classes)
}

func checkDeviceAgainstTool(t *testing.T, c *mgmt.Client, name string) {
	t.Helper()
	d, err := c.Device(context.Background(), name)
	require.NoError(t, err)
	td := obj(t, vdpaJSON(t, "dev", "show", name), "dev", name)
	assert.Equal(t, td["type"], map[virtio.DeviceID]string{virtio.DeviceNet: "network", virtio.DeviceBlock: "block"}[d.DeviceID])
	assert.Equal(t, td["mgmtdev"], d.MgmtHandle())
	assert.EqualValues(t, td["vendor_id"], d.VendorID)
	assert.EqualValues(t, td["max_vqs"], d.MaxVQs)
	assert.EqualValues(t, td["max_vq_size"], d.MaxVQSize)

	cfg, err := c.DeviceConfig(context.Background(), name)
	require.NoError(t, err)
	tc := obj(t, vdpaJSON(t, "dev", "config", "show", name), "config", name)
	assert.Equal(t, tc["mac"], cfg.MAC.String())
	assert.EqualValues(t, tc["mtu"], cfg.MTU)
	assert.Equal(t, tc["link"], map[bool]string{true: "up", false: "down"}[cfg.LinkUp()])
	assert.Equal(t, tc["link_announce"], cfg.Announce())
	if nf, ok := tc["negotiated_features"]; ok {
		require.True(t, cfg.HasNegotiated)
		assert.Equal(t, features(t, nf), cfg.Negotiated)
	} else {
		assert.False(t, cfg.HasNegotiated)
	}
	if mq, ok := tc["max_vq_pairs"]; ok {
		assert.EqualValues(t, mq, cfg.MaxVQPairs)
	}
}

// A device added through netlink looks the same to iproute2 and to us; a
// device added with iproute2 too; both delete cleanly.
func TestAddShowDeleteMatchVdpaTool(t *testing.T) {
	c := requireVDPA(t)
	ctx := context.Background()
	mac := net.HardwareAddr{0x02, 0x12, 0x34, 0x56, 0x78, 0x9a}
	require.NoError(t, c.AddDevice(ctx, mgmt.DeviceSpec{Name: "vdpa-nl", MgmtDev: "vdpasim_net", MAC: mac, MTU: 4000}))
	t.Cleanup(func() { _ = c.DeleteDevice(context.Background(), "vdpa-nl") })
	assert.ErrorIs(t, c.AddDevice(ctx, mgmt.DeviceSpec{Name: "vdpa-nl", MgmtDev: "vdpasim_net"}), errEEXIST)

	checkDeviceAgainstTool(t, c, "vdpa-nl")
	cfg, err := c.DeviceConfig(ctx, "vdpa-nl")
	require.NoError(t, err)
	assert.Equal(t, mac, cfg.MAC)
	assert.Equal(t, uint16(4000), cfg.MTU)

	testenv.AddVDPA(t, "vdpa-ip", "vdpasim_net", "mac", "02:00:00:00:00:77")
	checkDeviceAgainstTool(t, c, "vdpa-ip")

	devs, err := c.Devices(ctx)
	require.NoError(t, err)
	var names []string
	for _, d := range devs {
		names = append(names, d.Name)
	}
	tool := obj(t, vdpaJSON(t, "dev", "show"), "dev")
	var toolNames []string
	for n := range tool {
		toolNames = append(toolNames, n)
	}
	assert.ElementsMatch(t, toolNames, names)
	cfgs, err := c.DeviceConfigs(ctx)
	require.NoError(t, err)
	assert.Len(t, cfgs, len(devs))

	// VDPA_CMD_DEV_ATTR_SET changes the MAC; iproute2 sees the new one.
	mac2 := net.HardwareAddr{0x02, 0x21, 0x43, 0x65, 0x87, 0xa9}
	require.NoError(t, c.SetMAC(ctx, "vdpa-nl", mac2))
	cfg, err = c.DeviceConfig(ctx, "vdpa-nl")
	require.NoError(t, err)
	assert.Equal(t, mac2, cfg.MAC)
	checkDeviceAgainstTool(t, c, "vdpa-nl")
	assert.ErrorIs(t, c.SetMAC(ctx, "vdpa-none", mac2), mgmt.ErrNotFound)

	require.NoError(t, c.DeleteDevice(ctx, "vdpa-nl"))
	assert.NotContains(t, obj(t, vdpaJSON(t, "dev", "show"), "dev"), "vdpa-nl")
	assert.ErrorIs(t, c.DeleteDevice(ctx, "vdpa-nl"), mgmt.ErrNotFound)
	_, err = c.Device(ctx, "vdpa-nl")
	assert.ErrorIs(t, err, mgmt.ErrNotFound)
}

// Per-queue vendor statistics agree with `vdpa dev vstats show`.
func TestQueueStatsMatchVdpaTool(t *testing.T) {
	c := requireVDPA(t)
	testenv.RequireModule(t, "vhost_vdpa")
	testenv.AddVDPA(t, "vdpa-st", "vdpasim_net", "mac", "02:00:00:00:00:31")
	dev, err := kernel.Open(testenv.VhostVDPAPath(t, "vdpa-st"), nil)
	require.NoError(t, err)
	defer dev.Close()
	f, err := dev.Negotiate(virtio.Features(0).With(virtio.FVersion1, virtio.FAccessPlatform, virtio.NetFMAC))
	require.NoError(t, err)

	for q := range 2 {
		st, err := c.QueueStats(context.Background(), "vdpa-st", uint32(q))
		require.NoError(t, err)
		assert.Equal(t, uint32(q), st.Queue)
		assert.Equal(t, f, st.Negotiated)
		require.NotEmpty(t, st.Stats)
		tool := obj(t, vdpaJSON(t, "dev", "vstats", "show", "vdpa-st", "qidx", fmt.Sprint(q)), "vstats", "vdpa-st")
		assert.Equal(t, []string{"rx", "tx"}[q], tool["queue_type"])
		delete(tool, "queue_type")
		ours := map[string]any{}
		for _, s := range st.Stats {
			ours[s.Name] = float64(s.Value)
		}
		assert.Equal(t, tool, ours, "queue %d", q)
	}
}

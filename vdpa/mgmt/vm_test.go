package mgmt_test

import (
	"context"
	"fmt"
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/internal/vmrig"
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

// Management devices: the same set, classes, limits and features as
// `vdpa mgmtdev show`.
func TestManagementDevicesMatchVdpaTool(t *testing.T) {
	c := requireVDPA(t)
	ms, err := c.ManagementDevices(context.Background())
	require.NoError(t, err)
	tool := vmrig.Obj(t, vmrig.VdpaJSON(t, "mgmtdev", "show"), "mgmtdev")
	require.Len(t, ms, len(tool))
	for _, m := range ms {
		tm := vmrig.Obj(t, tool, m.Handle())
		var classes []any
		for _, cl := range m.Classes {
			classes = append(classes, map[virtio.DeviceID]string{virtio.DeviceNet: "net", virtio.DeviceBlock: "block"}[cl])
		}
		assert.Equal(t, tm["supported_classes"], classes, m.Handle())
		assert.EqualValues(t, tm["max_supported_vqs"], m.MaxVQs, m.Handle())
		if df, ok := tm["dev_features"]; ok {
			assert.Equal(t, vmrig.FeatureList(t, df).Format(virtio.DeviceNet), m.SupportedFeatures.Format(virtio.DeviceNet), m.Handle())
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
	td := vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "show", name), "dev", name)
	assert.Equal(t, td["type"], map[virtio.DeviceID]string{virtio.DeviceNet: "network", virtio.DeviceBlock: "block"}[d.DeviceID])
	assert.Equal(t, td["mgmtdev"], d.MgmtHandle())
	assert.EqualValues(t, td["vendor_id"], d.VendorID)
	assert.EqualValues(t, td["max_vqs"], d.MaxVQs)
	assert.EqualValues(t, td["max_vq_size"], d.MaxVQSize)

	cfg, err := c.DeviceConfig(context.Background(), name)
	require.NoError(t, err)
	tc := vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "config", "show", name), "config", name)
	assert.Equal(t, tc["mac"], cfg.MAC.String())
	assert.EqualValues(t, tc["mtu"], cfg.MTU)
	assert.Equal(t, tc["link"], map[bool]string{true: "up", false: "down"}[cfg.LinkUp()])
	assert.Equal(t, tc["link_announce"], cfg.Announce())
	if nf, ok := tc["negotiated_features"]; ok {
		require.True(t, cfg.HasNegotiated)
		assert.Equal(t, vmrig.FeatureList(t, nf), cfg.Negotiated)
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
	tool := vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "show"), "dev")
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
	assert.NotContains(t, vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "show"), "dev"), "vdpa-nl")
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
		tool := vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "vstats", "show", "vdpa-st", "qidx", fmt.Sprint(q)), "vstats", "vdpa-st")
		assert.Equal(t, []string{"rx", "tx"}[q], tool["queue_type"])
		delete(tool, "queue_type")
		ours := map[string]any{}
		for _, s := range st.Stats {
			ours[s.Name] = float64(s.Value)
		}
		assert.Equal(t, tool, ours, "queue %d", q)
	}
}

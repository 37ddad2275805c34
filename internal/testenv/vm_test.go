package testenv_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
)

// TestHarnessKernel proves the real-kernel harness provides what the
// project's kernel tests rely on. It runs only inside the harness
// (vmtest/run.sh ./internal/testenv) and skips elsewhere.
func TestHarnessKernel(t *testing.T) {
	testenv.RequireVM(t)
	testenv.RequireRoot(t)

	t.Run("modules are loaded", func(t *testing.T) {
		for _, m := range []string{
			"vdpa", "vhost", "vhost_iotlb", "vhost_vdpa", "virtio_vdpa", "vduse",
			"vhost_net", "tun", "vringh", "vdpa_sim", "vdpa_sim_net", "virtio_net",
		} {
			assert.DirExists(t, filepath.Join("/sys/module", m))
		}
	})

	t.Run("device nodes exist", func(t *testing.T) {
		for _, path := range []string{"/dev/vhost-net", "/dev/net/tun", "/dev/vduse/control"} {
			fi, err := os.Stat(path)
			if assert.NoError(t, err) {
				assert.Equal(t, os.ModeDevice|os.ModeCharDevice, fi.Mode().Type(), "%s is a character device", path)
			}
		}
	})

	t.Run("IPv6 is disabled", func(t *testing.T) {
		assert.NoDirExists(t, "/proc/sys/net/ipv6", "ipv6.disable=1 keeps autoconf frames out of rings")
	})

	t.Run("vdpa mgmtdev lists vdpa_sim_net", func(t *testing.T) {
		var out struct {
			MgmtDev map[string]json.RawMessage `json:"mgmtdev"`
		}
		require.NoError(t, json.Unmarshal([]byte(testenv.Command(t, "vdpa", "-j", "mgmtdev", "show")), &out))
		assert.Contains(t, out.MgmtDev, "vdpasim_net")
		assert.Contains(t, out.MgmtDev, "vdpasim_blk")
	})

	t.Run("vdpa_sim_net device moves between vhost_vdpa and virtio_vdpa", func(t *testing.T) {
		const dev = "vdpatest0"
		testenv.AddVDPA(t, dev, "vdpasim_net")
		drv, err := testenv.VDPADriver(dev)
		require.NoError(t, err)
		require.Equal(t, testenv.DriverVhostVDPA, drv, "a new device binds to vhost_vdpa (loaded first)")

		node := testenv.VhostVDPAPath(t, dev)
		assert.Regexp(t, `^/dev/vhost-vdpa-[0-9]+$`, node)
		f, err := os.OpenFile(node, os.O_RDWR, 0)
		require.NoError(t, err, "open %s", node)
		require.NoError(t, f.Close())

		testenv.BindVDPA(t, dev, testenv.DriverVirtioVDPA)
		drv, err = testenv.VDPADriver(dev)
		require.NoError(t, err)
		assert.Equal(t, testenv.DriverVirtioVDPA, drv)
		assert.NoFileExists(t, node, "the vhost-vdpa node goes away with the driver")
		nets, err := filepath.Glob(filepath.Join("/sys/bus/vdpa/devices", dev, "virtio*", "net", "*"))
		require.NoError(t, err)
		assert.Len(t, nets, 1, "virtio_net drives the device through virtio_vdpa")

		testenv.BindVDPA(t, dev, testenv.DriverVhostVDPA)
		assert.FileExists(t, testenv.VhostVDPAPath(t, dev))
	})

	t.Run("deleted device disappears", func(t *testing.T) {
		const dev = "vdpatest1"
		testenv.AddVDPA(t, dev, "vdpasim_net", "mac", "02:00:00:00:00:01")
		show := testenv.Command(t, "vdpa", "dev", "show", dev)
		assert.True(t, strings.HasPrefix(show, dev+":"), "vdpa dev show: %q", show)
		testenv.Command(t, "vdpa", "dev", "del", dev)
		_, err := testenv.VDPADriver(dev)
		assert.ErrorIs(t, err, os.ErrNotExist)
	})
}

package testenv

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeBus builds a sysfs-like vdpa bus tree: devices/<dev> with a driver
// symlink when drv is not empty.
func fakeBus(t *testing.T, dev, drv string) string {
	t.Helper()
	bus := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(bus, "devices", dev), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(bus, "drivers", DriverVhostVDPA), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(bus, "drivers", DriverVirtioVDPA), 0o755))
	if drv != "" {
		require.NoError(t, os.Symlink(filepath.Join("..", "..", "drivers", drv), filepath.Join(bus, "devices", dev, "driver")))
	}
	return bus
}

func TestVDPADriverReadsTheDriverLink(t *testing.T) {
	got, err := vdpaDriver(fakeBus(t, "vdpa0", DriverVirtioVDPA), "vdpa0")
	require.NoError(t, err)
	assert.Equal(t, DriverVirtioVDPA, got)

	got, err = vdpaDriver(fakeBus(t, "vdpa0", ""), "vdpa0")
	require.NoError(t, err)
	assert.Empty(t, got, "an unbound device has no driver")

	_, err = vdpaDriver(fakeBus(t, "vdpa0", ""), "vdpa1")
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestBindVDPARejectsUnknownDriver(t *testing.T) {
	bus := fakeBus(t, "vdpa0", DriverVhostVDPA)
	err := bindVDPA(bus, "vdpa0", "no_such_driver")
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.ErrorContains(t, err, "no_such_driver")
}

func TestVhostVDPAPathFindsTheMinorNotTheName(t *testing.T) {
	bus := fakeBus(t, "vdpa0", DriverVhostVDPA)
	devRoot := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(bus, "devices", "vdpa0", "vhost-vdpa-3"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(devRoot, "vhost-vdpa-3"), nil, 0o600))
	got, err := vhostVDPAPath(bus, devRoot, "vdpa0")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(devRoot, "vhost-vdpa-3"), got)

	_, err = vhostVDPAPath(fakeBus(t, "vdpa0", DriverVirtioVDPA), devRoot, "vdpa0")
	assert.ErrorContains(t, err, "0 vhost-vdpa char devices")
}

func TestCommandReportsStderr(t *testing.T) {
	_, err := command("sh", "-c", "echo boom >&2; exit 3")
	assert.ErrorContains(t, err, "boom")
	out, err := command("sh", "-c", "echo hello")
	require.NoError(t, err)
	assert.Equal(t, "hello\n", out)
}

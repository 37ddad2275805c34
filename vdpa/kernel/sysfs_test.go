package kernel

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDevicePathFromSysfs(t *testing.T) {
	sys := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(sys, "vdpa0", "vhost-vdpa-3"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(sys, "vdpa1"), 0o755))

	p, err := devicePath(sys, "/dev", "vdpa0")
	require.NoError(t, err)
	assert.Equal(t, "/dev/vhost-vdpa-3", p)
	_, err = devicePath(sys, "/dev", "vdpa1")
	assert.ErrorIs(t, err, ErrNotBound)
	_, err = devicePath(sys, "/dev", "vdpa9")
	assert.ErrorIs(t, err, os.ErrNotExist)
	for _, bad := range []string{"", "..", "a/b", "."} {
		_, err = devicePath(sys, "/dev", bad)
		assert.Error(t, err, "%q", bad)
	}
}

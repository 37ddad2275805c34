package mdev

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeSysfs builds the part of /sys the mdev core exposes.
func fakeSysfs(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	mk := func(p, content string) {
		full := filepath.Join(root, p)
		require.NoError(t, os.MkdirAll(filepath.Dir(full), 0o755))
		require.NoError(t, os.WriteFile(full, []byte(content), 0o644))
	}
	types := "class/mdev_bus/0000:3b:00.0/mdev_supported_types/"
	mk(types+"vdpa-net-1/name", "vdpa net 1q\n")
	mk(types+"vdpa-net-1/description", "virtio-net, 1 queue pair\n")
	mk(types+"vdpa-net-1/device_api", "vfio-pci\n")
	mk(types+"vdpa-net-1/available_instances", "3\n")
	mk(types+"vdpa-net-1/create", "")
	mk(types+"vdpa-net-4/device_api", "vfio-pci\n")
	mk(types+"vdpa-net-4/available_instances", "0\n")
	mk(types+"vdpa-net-4/create", "")
	require.NoError(t, os.MkdirAll(filepath.Join(root, types, "vdpa-net-4", "devices", "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"), 0o755))
	mk("class/mdev_bus/mtty/mdev_supported_types/mtty-2/device_api", "vfio-pci\n")
	mk("class/mdev_bus/mtty/mdev_supported_types/mtty-2/available_instances", "24\n")
	mk("class/mdev_bus/mtty/mdev_supported_types/mtty-2/create", "")
	mk("bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001/remove", "")
	return root
}

func TestSysfsParentsAndTypes(t *testing.T) {
	s := NewSysfs(fakeSysfs(t))
	parents, err := s.Parents()
	require.NoError(t, err)
	assert.Equal(t, []string{"0000:3b:00.0", "mtty"}, parents)
	types, err := s.Types("0000:3b:00.0")
	require.NoError(t, err)
	require.Len(t, types, 2)
	assert.Equal(t, MdevType{ID: "vdpa-net-1", Name: "vdpa net 1q", Description: "virtio-net, 1 queue pair",
		DeviceAPI: "vfio-pci", AvailableInstances: 3}, types[0])
	u, _ := ParseUUID("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")
	assert.Equal(t, []UUID{u}, types[1].Devices)
	assert.Equal(t, 0, types[1].AvailableInstances)

	empty := NewSysfs(t.TempDir())
	parents, err = empty.Parents()
	require.NoError(t, err)
	assert.Empty(t, parents, "no mdev_bus class: no parents")
}

func TestSysfsCreateRemove(t *testing.T) {
	root := fakeSysfs(t)
	s := NewSysfs(root)
	u, err := ParseUUID("0f5bd8a2-1c1e-4c8e-9d6e-5c7a3b2a1f00")
	require.NoError(t, err)
	require.NoError(t, s.Create("0000:3b:00.0", "vdpa-net-1", u))
	got, err := os.ReadFile(filepath.Join(root, "class/mdev_bus/0000:3b:00.0/mdev_supported_types/vdpa-net-1/create"))
	require.NoError(t, err)
	assert.Equal(t, "0f5bd8a2-1c1e-4c8e-9d6e-5c7a3b2a1f00", string(got))

	existing, _ := ParseUUID("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")
	require.NoError(t, s.Remove(existing))
	got, err = os.ReadFile(filepath.Join(root, "bus/mdev/devices", existing.String(), "remove"))
	require.NoError(t, err)
	assert.Equal(t, "1", string(got))

	for _, tc := range []struct {
		name   string
		parent string
		typ    string
		id     UUID
		want   error
	}{
		{"missing parent", "0000:00:00.0", "vdpa-net-1", u, ErrNoParent},
		{"path in parent name", "../mtty", "mtty-2", u, ErrNoParent},
		{"unknown type", "0000:3b:00.0", "vdpa-net-8", u, ErrUnknownType},
		{"no instances left", "0000:3b:00.0", "vdpa-net-4", u, ErrNoInstances},
		{"UUID in use", "mtty", "mtty-2", existing, ErrInstanceExists},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, s.Create(tc.parent, tc.typ, tc.id), tc.want)
		})
	}
	require.ErrorIs(t, s.Remove(u), ErrNoInstance, "created only in the fake: no device node appeared")
}

func TestUUID(t *testing.T) {
	u, err := NewUUID()
	require.NoError(t, err)
	assert.EqualValues(t, 4, u[6]>>4, "version 4")
	assert.EqualValues(t, 2, u[8]>>6, "RFC variant")
	p, err := ParseUUID(u.String())
	require.NoError(t, err)
	assert.Equal(t, u, p)
	for _, bad := range []string{"", "0f5bd8a2-1c1e-4c8e-9d6e-5c7a3b2a1f0", "0f5bd8a2x1c1e-4c8e-9d6e-5c7a3b2a1f00", "zf5bd8a2-1c1e-4c8e-9d6e-5c7a3b2a1f00"} {
		_, err := ParseUUID(bad)
		assert.ErrorIs(t, err, ErrInvalidUUID, bad)
	}
}

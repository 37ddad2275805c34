package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ErrNotBound is returned by DevicePath for a vDPA device that has no
// vhost-vdpa character device (it is bound to another driver, such as
// virtio_vdpa, or to none).
var ErrNotBound = errors.New("vdpa/kernel: vDPA device is not bound to vhost_vdpa")

// DevicePath returns the /dev/vhost-vdpa-N node of the vDPA device named
// name (as `vdpa dev show` lists it), found through sysfs. N is the
// vhost-vdpa minor number, unrelated to the device's name.
func DevicePath(name string) (string, error) {
	return devicePath("/sys/bus/vdpa/devices", "/dev", name)
}

func devicePath(sysDevices, dev, name string) (string, error) {
	if name == "" || name != filepath.Base(name) || name == "." || name == ".." {
		return "", fmt.Errorf("vdpa/kernel: invalid vDPA device name %q", name)
	}
	dir := filepath.Join(sysDevices, name)
	if _, err := os.Stat(dir); err != nil {
		return "", fmt.Errorf("vdpa/kernel: vDPA device %q: %w", name, err)
	}
	m, err := filepath.Glob(filepath.Join(dir, "vhost-vdpa-*"))
	if err != nil {
		return "", err
	}
	switch len(m) {
	case 0:
		return "", fmt.Errorf("%w: %q", ErrNotBound, name)
	case 1:
		return filepath.Join(dev, filepath.Base(m[0])), nil
	}
	return "", fmt.Errorf("vdpa/kernel: vDPA device %q has %d vhost-vdpa nodes", name, len(m))
}

package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Kernel vDPA helpers. They change kernel state, so they run only inside the
// real-kernel harness: outside it they skip the test (RequireVM).
//
// In the harness vhost_vdpa is registered on the vdpa bus before virtio_vdpa,
// so a freshly added device binds to vhost_vdpa and gets a
// /dev/vhost-vdpa-N node. BindVDPA moves a device to virtio_vdpa (the kernel's
// own virtio driver stack, e.g. virtio_net on top of it) and back.

// Names of the vdpa bus drivers, as they appear under /sys/bus/vdpa/drivers.
const (
	DriverVhostVDPA  = "vhost_vdpa"
	DriverVirtioVDPA = "virtio_vdpa"
)

const vdpaBus = "/sys/bus/vdpa"

// Command runs a program (inside the harness: busybox, iproute2's ip and
// vdpa) and returns its standard output. A non-zero exit fails the test with
// the program's standard error in the message.
func Command(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := command(name, args...)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return out
}

func command(name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "),
			err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// AddVDPA adds the vDPA device name on management device mgmtdev with
// iproute2's tool (`vdpa dev add name NAME mgmtdev MGMTDEV ARGS...`, where
// ARGS are further attributes such as "mac", "00:11:22:33:44:55") and deletes
// it when the test ends. It runs only inside the harness.
func AddVDPA(t testing.TB, name, mgmtdev string, args ...string) {
	t.Helper()
	RequireVM(t)
	Command(t, "vdpa", append([]string{"dev", "add", "name", name, "mgmtdev", mgmtdev}, args...)...)
	t.Cleanup(func() {
		if _, err := os.Stat(filepath.Join(vdpaBus, "devices", name)); errors.Is(err, os.ErrNotExist) {
			return // the test deleted it itself
		}
		if _, err := command("vdpa", "dev", "del", name); err != nil {
			t.Errorf("testenv: cleanup: %v", err)
		}
	})
}

// VDPADriver returns the name of the driver the vDPA device dev is bound to,
// or "" when it is bound to none.
func VDPADriver(dev string) (string, error) {
	return vdpaDriver(vdpaBus, dev)
}

func vdpaDriver(bus, dev string) (string, error) {
	devDir := filepath.Join(bus, "devices", dev)
	if _, err := os.Stat(devDir); err != nil {
		return "", fmt.Errorf("vdpa device %q: %w", dev, err)
	}
	target, err := os.Readlink(filepath.Join(devDir, "driver"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("vdpa device %q: %w", dev, err)
	}
	return filepath.Base(target), nil
}

// BindVDPA binds the vDPA device dev to driver (DriverVhostVDPA,
// DriverVirtioVDPA, or "" for no driver) through sysfs: it sets the device's
// driver_override so that only that driver may claim it, unbinds it from its
// current driver and binds it to the wanted one. When the test ends the
// device, if it still exists, goes back to the driver it had before. It runs
// only inside the harness.
func BindVDPA(t testing.TB, dev, driver string) {
	t.Helper()
	RequireVM(t)
	prev, err := VDPADriver(dev)
	if err != nil {
		t.Fatalf("testenv: BindVDPA: %v", err)
	}
	if err := bindVDPA(vdpaBus, dev, driver); err != nil {
		t.Fatalf("testenv: BindVDPA: %v", err)
	}
	t.Cleanup(func() {
		if _, err := os.Stat(filepath.Join(vdpaBus, "devices", dev)); errors.Is(err, os.ErrNotExist) {
			return
		}
		if err := bindVDPA(vdpaBus, dev, prev); err != nil {
			t.Errorf("testenv: BindVDPA cleanup: %v", err)
		}
	})
}

func bindVDPA(bus, dev, driver string) error {
	cur, err := vdpaDriver(bus, dev)
	if err != nil {
		return err
	}
	if driver != "" {
		if _, err := os.Stat(filepath.Join(bus, "drivers", driver)); err != nil {
			return fmt.Errorf("vdpa driver %q: %w", driver, err)
		}
	}
	// driver_override: an empty line clears it (any driver may claim the device).
	if err := writeSysfs(filepath.Join(bus, "devices", dev, "driver_override"), driver); err != nil {
		return err
	}
	if cur == driver {
		return nil
	}
	if cur != "" {
		if err := writeSysfs(filepath.Join(bus, "drivers", cur, "unbind"), dev); err != nil {
			return err
		}
	}
	if driver != "" {
		if err := writeSysfs(filepath.Join(bus, "drivers", driver, "bind"), dev); err != nil {
			return err
		}
	}
	got, err := vdpaDriver(bus, dev)
	if err != nil {
		return err
	}
	if got != driver {
		return fmt.Errorf("vdpa device %q: bound to %q after binding to %q", dev, got, driver)
	}
	return nil
}

func writeSysfs(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	// One write: sysfs attributes take the whole value in a single store.
	_, werr := f.WriteString(value + "\n")
	cerr := f.Close()
	if werr != nil {
		return fmt.Errorf("write %q to %s: %w", value, path, werr)
	}
	return cerr
}

// VhostVDPAPath returns the character device (/dev/vhost-vdpa-N) of the vDPA
// device dev, which must be bound to vhost_vdpa. The N is the vhost-vdpa
// minor, not part of the vDPA device's name, so tests must not guess it.
func VhostVDPAPath(t testing.TB, dev string) string {
	t.Helper()
	RequireVM(t)
	path, err := vhostVDPAPath(vdpaBus, "/dev", dev)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return path
}

func vhostVDPAPath(bus, devRoot, dev string) (string, error) {
	matches, err := filepath.Glob(filepath.Join(bus, "devices", dev, "vhost-vdpa-*"))
	if err != nil {
		return "", err
	}
	if len(matches) != 1 {
		drv, _ := vdpaDriver(bus, dev)
		return "", fmt.Errorf("vdpa device %q (driver %q) has %d vhost-vdpa char devices, want 1", dev, drv, len(matches))
	}
	path := filepath.Join(devRoot, filepath.Base(matches[0]))
	if _, err := os.Stat(path); err != nil {
		return "", err
	}
	return path, nil
}

package testenv

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// EnvVar is the environment variable the real-kernel harness sets to "1" in
// the guest. Any other value (or its absence) means an ordinary machine.
const EnvVar = "VDPAKIT_VMTEST"

// InVM reports whether the test runs inside the real-kernel harness, that is
// whether VDPAKIT_VMTEST is exactly "1".
func InVM() bool {
	return os.Getenv(EnvVar) == "1"
}

// Require stops the test when ok is false: inside the harness with t.Fatal
// (nothing may skip there), elsewhere with t.Skip. why says what is missing,
// for example "needs /dev/vhost-net"; it is part of the message either way.
func Require(t testing.TB, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if InVM() {
		t.Fatalf("testenv: %s (inside the real-kernel harness nothing may skip; %s=1)", why, EnvVar)
		return
	}
	t.Skipf("testenv: %s (run inside the real-kernel harness: vmtest/run.sh)", why)
}

// RequireVM skips the test unless it runs inside the real-kernel harness. Use
// it for tests that change kernel state (add or remove vDPA devices, load
// modules, bind drivers) and must never run on a developer's machine even as
// root. Inside the harness it does nothing.
func RequireVM(t testing.TB) {
	t.Helper()
	if !InVM() {
		t.Skipf("testenv: runs only inside the real-kernel harness (vmtest/run.sh sets %s=1)", EnvVar)
	}
}

// RequireRoot requires an effective user id of 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	euid := os.Geteuid()
	Require(t, euid == 0, fmt.Sprintf("needs root (euid is %d)", euid))
}

// RequireFile requires that path exists (a file, directory or device node;
// symbolic links are followed).
func RequireFile(t testing.TB, path string) {
	t.Helper()
	_, err := os.Stat(path)
	Require(t, err == nil, fmt.Sprintf("needs %s: %v", path, describeStatErr(err)))
}

// RequireModule requires that the kernel module name is loaded or built in,
// as shown by the presence of /sys/module/<name>. Use the name with
// underscores, as the kernel lists it (vhost_vdpa, not vhost-vdpa).
func RequireModule(t testing.TB, name string) {
	t.Helper()
	RequireFile(t, filepath.Join(sysModuleDir, name))
}

const sysModuleDir = "/sys/module"

func describeStatErr(err error) string {
	switch {
	case err == nil:
		return "present"
	case errors.Is(err, os.ErrNotExist):
		return "does not exist"
	case errors.Is(err, os.ErrPermission):
		return "permission denied"
	default:
		return err.Error()
	}
}

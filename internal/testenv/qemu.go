package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// QEMUEnvVar selects the QEMU interop tests (vdpa/vhostuser, mdev/vfiouser):
// "1" means they must run and fail when a peer is missing (CI's interop
// step); unset or anything else, they skip, saying how to run them. They
// boot dozens of TCG guests (tens of minutes on a 2-core machine, past go
// test's default 10-minute timeout for vdpa/vhostuser), so the default go
// test ./... must not run them merely because a machine has QEMU and the
// guest kernel cached, as one that ran .ci/run has.
const QEMUEnvVar = "VDPAKIT_QEMU"

// QEMUInterop gates a QEMU interop test, which boots TCG guests for tens of
// seconds each. missing names the peers the test needs that are absent
// (empty: all present). With VDPAKIT_QEMU=1 it returns true: the test must
// run, and the caller fails on anything missing. Otherwise it skips the
// test, saying why (and naming what is missing, if anything), and returns
// false. Inside the real-kernel harness VM it always skips: the interop
// tests run on the host.
func QEMUInterop(t testing.TB, missing []string) (required bool) {
	t.Helper()
	if InVM() {
		t.Skipf("QEMU interop test: runs on the host, not inside the real-kernel harness VM (leave it out with -test.skip QEMU)")
		return false
	}
	if os.Getenv(QEMUEnvVar) == "1" {
		return true
	}
	why := "slow (boots TCG guests for minutes); " + QEMUEnvVar + "=1 runs it"
	if len(missing) > 0 {
		why += ", and needs " + strings.Join(missing, ", ")
	}
	t.Skipf("QEMU interop test: %s", why)
	return false
}

// VMTestCache is the real-kernel harness's cache directory (vmtest/run.sh's
// VDPAKIT_CACHE, default ~/.cache/vdpakit-vmtest).
func VMTestCache() string {
	if c := os.Getenv("VDPAKIT_CACHE"); c != "" {
		return c
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "vdpakit-vmtest")
}

// GuestKernelCached reports whether the harness's Debian kernel is in the
// cache (vmtest/run.sh --prepare fills it), so a test can boot a guest
// without downloading anything.
func GuestKernelCached() bool {
	cache := VMTestCache()
	if cache == "" {
		return false
	}
	cur, err := os.ReadFile(filepath.Join(cache, "current"))
	if err != nil {
		return false
	}
	_, err = os.Stat(filepath.Join(cache, "kernel-"+strings.TrimSpace(string(cur)), "vmlinuz"))
	return err == nil
}

// QEMU11Cached is the QEMU 11 wrapper vmtest/qemu11.sh leaves in its cache
// (VDPAKIT_QEMU11_CACHE, default ~/.cache/vdpakit-vmtest/qemu11), or "" if
// it is not there. It does not run the script, which would build it.
func QEMU11Cached() string {
	cache := os.Getenv("VDPAKIT_QEMU11_CACHE")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		cache = filepath.Join(home, ".cache", "vdpakit-vmtest", "qemu11")
	}
	p := filepath.Join(cache, "qemu-system-x86_64")
	if _, err := os.Stat(filepath.Join(cache, ".ready-v2")); err != nil {
		return ""
	}
	if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
		return ""
	}
	return p
}

// SetChannelsPkg is the guest tool that sets an interface's combined
// channels (ethtool -L) with SIOCETHTOOL, for guests whose busybox has no
// ethtool.
const SetChannelsPkg = "github.com/vdpakit/vdpakit/vmtest/internal/setchannels"

// BuildGuestTool builds the Go command pkg as a static executable (no cgo:
// the QEMU guests have no libc) into dir and returns its path, for
// vmtest/qemu-guest.sh -bin. A failed build fails the test.
func BuildGuestTool(t testing.TB, dir, pkg string) string {
	t.Helper()
	bin := filepath.Join(dir, filepath.Base(pkg))
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, pkg)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	return bin
}

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The kernel's split-ring benchmark lives in tools/virtio/ringtest of the
// kernel tree. The harness builds it from Debian's linux-source-6.12 package
// (bookworm-backports), the same package the real-kernel harness in vmtest/
// uses, and caches the .deb and the binaries under the cache directory.

const (
	linuxSourcePkg   = "linux-source-6.12"
	linuxSourceSuite = "bookworm-backports"
	linuxSourceTar   = "./usr/src/linux-source-6.12.tar.xz"
	ringtestSubdir   = "linux-source-6.12/tools/virtio/ringtest"
	ringtestBinDir   = "bench-ringtest"
)

// ringtestPrograms are the ringtest variants the harness runs:
// virtio_ring_0_9 is the virtio 0.9/1.x split ring, ring is a simpler
// single-array ring shown for contrast.
var ringtestPrograms = []string{"virtio_ring_0_9", "ring"}

// errSkip marks a peer that is not available; its message is the reason.
type errSkip struct{ reason string }

func (e *errSkip) Error() string { return e.reason }

func skipf(format string, args ...any) error {
	return &errSkip{reason: fmt.Sprintf(format, args...)}
}

// findLinuxSource looks for the linux-source .deb (or its inner tarball) in
// the cache directory and one or two levels below it, wherever vmtest's
// fetcher or an earlier bench run left it.
func findLinuxSource(cache string) string {
	pats := []string{
		linuxSourcePkg + "_*.deb",
		"*/" + linuxSourcePkg + "_*.deb",
		"*/*/" + linuxSourcePkg + "_*.deb",
		"linux-source-6.12.tar.xz",
		"*/linux-source-6.12.tar.xz",
		"*/*/linux-source-6.12.tar.xz",
	}
	for _, p := range pats {
		m, _ := filepath.Glob(filepath.Join(cache, p))
		sort.Strings(m)
		for i := len(m) - 1; i >= 0; i-- {
			if st, err := os.Stat(m[i]); err == nil && st.Size() > 1<<20 {
				return m[i]
			}
		}
	}
	return ""
}

// aptConfig returns the text of a private apt configuration that reads only
// its own sources list (bookworm-backports) and keeps its state and cache
// under dir, so the system's apt state is never touched.
func aptConfig(dir string) string {
	return fmt.Sprintf(`Dir::Etc::SourceList "%[1]s/sources.list";
Dir::Etc::SourceParts "%[1]s/sources.list.d";
Dir::Etc::Preferences "%[1]s/preferences";
Dir::Etc::PreferencesParts "%[1]s/preferences.d";
Dir::State "%[1]s/state";
Dir::State::Lists "%[1]s/lists";
Dir::State::status "%[1]s/state/status";
Dir::Cache "%[1]s/cache";
Dir::Cache::Archives "%[1]s/archives";
Acquire::Languages "none";
APT::Sandbox::User "root";
`, dir)
}

const debianKeyring = "/usr/share/keyrings/debian-archive-keyring.gpg"

// debianMirror returns the host's Debian mirror (see debianMirrorFrom).
func debianMirror() (string, error) {
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	more, _ := filepath.Glob("/etc/apt/sources.list.d/*.list")
	files = append(append(files, "/etc/apt/sources.list"), more...)
	return debianMirrorFrom(files)
}

// debianMirrorFrom returns $VDPAKIT_VMTEST_MIRROR if set, else the first
// http(s) Debian mirror (a URI ending in /debian) named in the apt source
// files (deb822 .sources or one-line format), without a trailing slash.
// With none it fails: the repository names no mirror of its own.
func debianMirrorFrom(files []string) (string, error) {
	if m := os.Getenv("VDPAKIT_VMTEST_MIRROR"); m != "" {
		return strings.TrimSuffix(m, "/"), nil
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			fields := strings.Fields(line)
			if len(fields) < 2 || (fields[0] != "URIs:" && fields[0] != "deb") {
				continue
			}
			for _, u := range fields[1:] {
				if (strings.HasPrefix(u, "http://") || strings.HasPrefix(u, "https://")) && strings.HasSuffix(strings.TrimSuffix(u, "/"), "/debian") {
					return strings.TrimSuffix(u, "/"), nil
				}
			}
		}
	}
	return "", fmt.Errorf("no Debian mirror found in the apt sources (%s); set VDPAKIT_VMTEST_MIRROR to one", strings.Join(files, ", "))
}

// fetchLinuxSource downloads the linux-source package with a private apt
// configuration into cache/bench-dl and returns the .deb path.
func fetchLinuxSource(ctx context.Context, cache string, prog *Progress) (string, error) {
	if _, err := exec.LookPath("apt-get"); err != nil {
		return "", skipf("%s not cached in %s and apt-get is not available to fetch it", linuxSourcePkg, cache)
	}
	aptDir := filepath.Join(cache, "bench-apt")
	dl := filepath.Join(cache, "bench-dl")
	if err := os.MkdirAll(filepath.Join(aptDir, "state"), 0o755); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(aptDir, "state", "status"), nil, 0o644); err != nil {
		return "", err
	}
	for _, d := range []string{"lists/partial", "archives/partial", "state", "cache", "sources.list.d", "preferences.d"} {
		if err := os.MkdirAll(filepath.Join(aptDir, d), 0o755); err != nil {
			return "", err
		}
	}
	if err := os.MkdirAll(dl, 0o755); err != nil {
		return "", err
	}
	signed := ""
	if _, err := os.Stat(debianKeyring); err == nil {
		signed = "[signed-by=" + debianKeyring + "] "
	}
	mirror, err := debianMirror()
	if err != nil {
		return "", fmt.Errorf("fetching %s: %w", linuxSourcePkg, err)
	}
	src := "deb " + signed + mirror + " " + linuxSourceSuite + " main\n"
	if err := os.WriteFile(filepath.Join(aptDir, "sources.list"), []byte(src), 0o644); err != nil {
		return "", err
	}
	conf := filepath.Join(aptDir, "apt.conf")
	if err := os.WriteFile(conf, []byte(aptConfig(aptDir)), 0o644); err != nil {
		return "", err
	}
	env := append(os.Environ(), "APT_CONFIG="+conf)
	prog.Step("peers: fetching %s from %s (once, cached in %s)", linuxSourcePkg, linuxSourceSuite, cache)
	for _, args := range [][]string{{"update", "-qq"}, {"download", "-qq", linuxSourcePkg}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = env
		cmd.Dir = dl
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", skipf("apt-get %s %s failed: %v: %s", args[0], linuxSourcePkg, err, lastLine(out))
		}
	}
	if p := findLinuxSource(cache); p != "" {
		return p, nil
	}
	return "", skipf("apt-get download %s left no package in %s", linuxSourcePkg, dl)
}

// ensureRingtest returns the directory holding the built ringtest programs,
// fetching and building them first if needed.
func ensureRingtest(ctx context.Context, cache string, prog *Progress) (string, error) {
	bin := filepath.Join(cache, ringtestBinDir)
	if haveAll(bin, ringtestPrograms) {
		return bin, nil
	}
	for _, tool := range []string{"gcc", "make", "tar", "xz"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", skipf("%s not installed (needed to build tools/virtio/ringtest)", tool)
		}
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", skipf("cache directory %s: %v", cache, err)
	}
	src := findLinuxSource(cache)
	if src == "" {
		var err error
		if src, err = fetchLinuxSource(ctx, cache, prog); err != nil {
			return "", err
		}
	}
	prog.Step("peers: extracting tools/virtio/ringtest from %s", filepath.Base(src))
	work, err := os.MkdirTemp(cache, "ringtest-build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	var pipeline string
	q := shellQuote
	if strings.HasSuffix(src, ".deb") {
		if _, err := exec.LookPath("dpkg-deb"); err != nil {
			return "", skipf("dpkg-deb not installed (needed to unpack %s)", filepath.Base(src))
		}
		pipeline = fmt.Sprintf("dpkg-deb --fsys-tarfile %s | tar -xO %s | tar -xJ -C %s --wildcards %s",
			q(src), q(linuxSourceTar), q(work), q(ringtestSubdir+"/*"))
	} else {
		pipeline = fmt.Sprintf("tar -xJf %s -C %s --wildcards %s", q(src), q(work), q(ringtestSubdir+"/*"))
	}
	cmd := exec.CommandContext(ctx, "bash", "-o", "pipefail", "-c", pipeline)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("extracting ringtest: %v: %s", err, lastLine(out))
	}
	dir := filepath.Join(work, ringtestSubdir)
	prog.Step("peers: building ringtest (%s)", strings.Join(ringtestPrograms, ", "))
	mk := exec.CommandContext(ctx, "make", append([]string{"-C", dir}, ringtestPrograms...)...)
	if out, err := mk.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building ringtest: %v: %s", err, lastLine(out))
	}
	tmpBin := bin + ".tmp"
	os.RemoveAll(tmpBin)
	if err := os.MkdirAll(tmpBin, 0o755); err != nil {
		return "", err
	}
	for _, p := range ringtestPrograms {
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(tmpBin, p), b, 0o755); err != nil {
			return "", err
		}
	}
	os.WriteFile(filepath.Join(tmpBin, "SOURCE"), []byte(filepath.Base(src)+"\n"), 0o644)
	os.RemoveAll(bin)
	if err := os.Rename(tmpBin, bin); err != nil {
		return "", err
	}
	return bin, nil
}

func haveAll(dir string, names []string) bool {
	for _, n := range names {
		st, err := os.Stat(filepath.Join(dir, n))
		if err != nil || st.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func lastLine(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// RingtestArgs are the options passed to a ringtest program; the names are
// those of its main.c.
type RingtestArgs struct {
	HostCPU, GuestCPU int
	RingSize          int
	Batch             int
	RunCycles         int
}

// Argv renders the command-line options.
func (a RingtestArgs) Argv() []string {
	return []string{
		"--host-affinity", strconv.Itoa(a.HostCPU),
		"--guest-affinity", strconv.Itoa(a.GuestCPU),
		"--ring-size", strconv.Itoa(a.RingSize),
		"--batch", strconv.Itoa(a.Batch),
		"--run-cycles", strconv.Itoa(a.RunCycles),
	}
}

// runRingtest runs one ringtest program to completion and returns its wall
// time. ringtest prints nothing on success and asserts on failure, so a
// non-zero exit or any output is an error.
func runRingtest(ctx context.Context, path string, a RingtestArgs) (time.Duration, error) {
	cmd := exec.CommandContext(ctx, path, a.Argv()...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	err := cmd.Wait()
	el := time.Since(start)
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return 0, fmt.Errorf("%s %s: %v: %s", filepath.Base(path), strings.Join(a.Argv(), " "), err, lastLine(out.Bytes()))
		}
		return 0, err
	}
	return el, nil
}

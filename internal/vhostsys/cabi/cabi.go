// Package cabi checks Go copies of kernel ABI constants against the C
// headers. A test lists its constants as Entries; Program turns them into a
// C program, Run compiles and runs it with gcc, and the output ("name
// value" lines) is compared with golden files under the package's testdata,
// so the Go-side comparison also runs where there is no compiler (the
// real-kernel harness guest).
//
// It is test support for vdpakit's kernel packages and imports "testing".
package cabi

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// Entry is one number the headers define.
type Entry struct {
	// Name is the C expression to print, e.g. "VHOST_SET_OWNER" or
	// "sizeof(struct vhost_vring_addr)".
	Name string
	// Value is the Go value under test.
	Value uint64
	// Since is "6.12" when the 6.1 headers lack the name.
	Since string
	// Macro says Name is a #define, so the program can #ifdef it; enum
	// constants newer than the headers are left out instead.
	Macro bool
}

// Program renders a C program that includes headers and prints every
// entry. With newer false, non-macro entries marked Since are left out (an
// enum constant cannot be tested with #ifdef).
func Program(headers []string, entries []Entry, newer bool) string {
	var b strings.Builder
	b.WriteString("#include <stdio.h>\n#include <stddef.h>\n")
	for _, h := range headers {
		fmt.Fprintf(&b, "#include <%s>\n", h)
	}
	b.WriteString("int main(void) {\n")
	seen := map[string]bool{}
	for _, e := range entries {
		if seen[e.Name] || (!newer && !e.Macro && e.Since != "") {
			continue
		}
		seen[e.Name] = true
		if e.Macro {
			fmt.Fprintf(&b, "#ifdef %s\n", e.Name)
		}
		fmt.Fprintf(&b, "\tprintf(\"%%s %%llu\\n\", %q, (unsigned long long)(%s));\n", e.Name, e.Name)
		if e.Macro {
			b.WriteString("#endif\n")
		}
	}
	b.WriteString("\treturn 0;\n}\n")
	return b.String()
}

// HaveGCC reports whether gcc is on PATH.
func HaveGCC() bool {
	_, err := exec.LookPath("gcc")
	return err == nil
}

// NeedGCC reports whether gcc is there to run a header check. Without it a
// test on an ordinary machine is skipped; inside the real-kernel harness,
// whose guest has no compiler by design, NeedGCC logs that the check belongs
// to the build host and returns false, so the caller returns (the golden
// half, CheckGolden, is what runs in the guest).
func NeedGCC(t testing.TB) bool {
	t.Helper()
	if HaveGCC() {
		return true
	}
	if os.Getenv("VDPAKIT_VMTEST") == "1" {
		t.Log("no gcc inside the real-kernel harness: header compilation is a build-host check")
		return false
	}
	t.Skip("gcc not found: the header half of the ABI check runs on the build host; the Go half (golden files) runs everywhere")
	return false
}

// Run compiles src with gcc (include dirs searched before the system's)
// and returns what it prints.
func Run(t testing.TB, src string, includeDirs ...string) map[string]uint64 {
	t.Helper()
	dir := t.TempDir()
	cfile := filepath.Join(dir, "abi.c")
	bin := filepath.Join(dir, "abi")
	if err := os.WriteFile(cfile, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"-Wall", "-Werror", "-o", bin}
	for _, d := range includeDirs {
		args = append(args, "-I", d)
	}
	args = append(args, cfile)
	if out, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s\n%s", err, out, src)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("running the header probe: %v", err)
	}
	m, err := Parse(out)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Parse reads "name value" lines.
func Parse(data []byte) (map[string]uint64, error) {
	m := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		if i <= 0 {
			return nil, fmt.Errorf("cabi: malformed line %q", line)
		}
		v, err := strconv.ParseUint(line[i+1:], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("cabi: line %q: %w", line, err)
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// Format writes m as sorted "name value" lines.
func Format(m map[string]uint64) []byte {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b bytes.Buffer
	for _, k := range keys {
		fmt.Fprintf(&b, "%s %d\n", k, m[k])
	}
	return b.Bytes()
}

// LoadGolden parses a golden file.
func LoadGolden(t testing.TB, path string) map[string]uint64 {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m, err := Parse(data)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

// overlayHeaders are the uapi headers vdpakit checks that changed after
// 6.1; an overlay of them over the system's headers is a 6.12 view.
var overlayHeaders = []string{"vhost.h", "vhost_types.h", "vdpa.h", "vduse.h"}

// UAPI612Dir locates 6.12 uapi headers. $VDPAKIT_UAPI_6_12 names a full
// usr/include tree (Debian's linux-libc-dev 6.12 unpacked). Otherwise the
// real-kernel harness's cache (vmtest/run.sh --prepare) holds the 6.12
// kernel headers, whose raw uapi tree cannot be compiled against directly;
// UAPI612Dir copies linux/vhost.h, vhost_types.h and vdpa.h from it into a
// temporary overlay searched before the system headers. It returns "" when
// neither is there.
func UAPI612Dir(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("VDPAKIT_UAPI_6_12"); d != "" {
		return d
	}
	cache := os.Getenv("VDPAKIT_CACHE")
	if cache == "" {
		uc, err := os.UserCacheDir()
		if err != nil {
			return ""
		}
		cache = filepath.Join(uc, "vdpakit-vmtest")
	}
	srcs, _ := filepath.Glob(filepath.Join(cache, "kernel-6.12*", "usr", "src", "linux-headers-6.12*-common", "include", "uapi", "linux"))
	if len(srcs) == 0 {
		return ""
	}
	sort.Strings(srcs)
	src := srcs[len(srcs)-1]
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "linux"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, h := range overlayHeaders {
		data, err := os.ReadFile(filepath.Join(src, h))
		if err != nil {
			t.Fatalf("6.12 headers in %s: %v", src, err)
		}
		if err := os.WriteFile(filepath.Join(dir, "linux", h), sanitize(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("6.12 headers: %s, %v", src, overlayHeaders)
	return dir
}

// sanitize does the part of the kernel's headers_install these headers
// need: it drops the kernel-internal #include <linux/compiler.h> and the
// __user annotation.
func sanitize(data []byte) []byte {
	var out []byte
	for _, line := range bytes.SplitAfter(data, []byte("\n")) {
		if bytes.HasPrefix(bytes.TrimSpace(line), []byte("#include <linux/compiler.h>")) {
			continue
		}
		out = append(out, bytes.ReplaceAll(line, []byte("__user "), nil)...)
	}
	return out
}

// CheckHeaders compiles the entries against the system headers and, when
// present, the 6.12 headers, and compares the output with golden61 and
// golden612. With update set it rewrites the golden files instead.
func CheckHeaders(t *testing.T, headers []string, entries []Entry, golden61, golden612 string, update bool) {
	t.Helper()
	if !NeedGCC(t) {
		return
	}
	check := func(t *testing.T, golden string, newer bool, dirs ...string) {
		got := Format(Run(t, Program(headers, entries, newer), dirs...))
		if update {
			if err := os.WriteFile(golden, got, 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		want, err := os.ReadFile(golden)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(want, got) {
			t.Errorf("%s is stale: the headers print\n%s\nthe file holds\n%s\n(rerun with -update after checking why)", golden, got, want)
		}
	}
	t.Run("system", func(t *testing.T) { check(t, golden61, false) })
	if d := UAPI612Dir(t); d != "" {
		t.Run("6.12", func(t *testing.T) { check(t, golden612, true, d) })
	} else {
		t.Log("6.12 uapi headers not found (set VDPAKIT_UAPI_6_12 or run vmtest/run.sh --prepare); 6.12-only values are checked only against " + golden612)
	}
}

// CheckGolden compares every entry with the golden files: all must be in
// the 6.12 file; entries not marked Since must also be in the 6.1 file, and
// entries marked Since must not.
func CheckGolden(t *testing.T, entries []Entry, golden61, golden612 string) {
	t.Helper()
	h61, h612 := LoadGolden(t, golden61), LoadGolden(t, golden612)
	for _, e := range entries {
		t.Run(e.Name, func(t *testing.T) {
			v, ok := h612[e.Name]
			if !ok {
				t.Fatalf("the 6.12 headers lack %s", e.Name)
			}
			if v != e.Value {
				t.Errorf("%s: Go has %#x, the 6.12 headers %#x", e.Name, e.Value, v)
			}
			v, ok = h61[e.Name]
			switch {
			case e.Since != "" && ok:
				t.Errorf("%s is marked %s-only but the 6.1 headers define it", e.Name, e.Since)
			case e.Since == "" && !ok:
				t.Errorf("the 6.1 headers lack %s", e.Name)
			case ok && v != e.Value:
				t.Errorf("%s: Go has %#x, the 6.1 headers %#x", e.Name, e.Value, v)
			}
		})
	}
}

package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDebianMirrorComesFromAptSources(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
		return p
	}
	deb822 := write("debian.sources", "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
	oneLine := write("sources.list", "# comment\ndeb [arch=amd64] https://other.example/debian bookworm main\n")
	noDebian := write("other.list", "deb http://example.org/ubuntu jammy main\n")
	empty := write("empty.list", "")

	t.Setenv("VDPAKIT_VMTEST_MIRROR", "")
	for _, tc := range []struct {
		name  string
		files []string
		want  string
	}{
		{"deb822", []string{deb822, oneLine}, "http://mirror.example/debian"},
		{"one-line with options", []string{noDebian, oneLine}, "https://other.example/debian"},
		{"missing files are skipped", []string{filepath.Join(dir, "absent"), oneLine}, "https://other.example/debian"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := debianMirrorFrom(tc.files)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
	// No mirror in the sources: a clear error, never a built-in host.
	for _, files := range [][]string{nil, {empty, noDebian}, {filepath.Join(dir, "absent")}} {
		got, err := debianMirrorFrom(files)
		assert.ErrorContains(t, err, "VDPAKIT_VMTEST_MIRROR")
		assert.Empty(t, got)
	}
	t.Setenv("VDPAKIT_VMTEST_MIRROR", "http://override.example/debian/")
	got, err := debianMirrorFrom(nil)
	require.NoError(t, err)
	assert.Equal(t, "http://override.example/debian", got, "the override wins")
}

// No package-mirror host name is built into the repository: the scripts
// and programs take the mirror from the machine's apt sources (or
// VDPAKIT_VMTEST_MIRROR) and fail clearly without one.
func TestNoMirrorHostInRepository(t *testing.T) {
	out, err := exec.Command("git", "-C", "..", "ls-files").Output()
	if err != nil {
		t.Skipf("not a git checkout: %v", err)
	}
	// Spelled in pieces so this file does not match itself.
	hosts := []string{"deb" + ".debian.org", "ftp" + ".debian.org", "httpredir" + ".debian.org",
		"cdn-fastly.deb" + ".debian.org", "security" + ".debian.org", "archive" + ".ubuntu.com"}
	for _, f := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		b, err := os.ReadFile(filepath.Join("..", f))
		if err != nil {
			continue // deleted in the work tree, or a submodule
		}
		for _, h := range hosts {
			assert.NotContains(t, string(b), h, "%s names a package mirror", f)
		}
	}
}

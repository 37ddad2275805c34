package vhostsys

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// The ABI check has two halves:
//
//   - TestABIMatchesHeaders compiles a C program against the kernel uapi
//     headers with gcc and compares its output with the golden files in
//     testdata/ (abi-6.1.txt from the system headers, abi-6.12.txt from the
//     6.12 headers when present). -update rewrites them from gcc.
//   - TestABIMatchesGolden compares every Go constant, struct size and field
//     offset with the golden files. It needs no compiler, so it also runs in
//     the real-kernel harness, whose guest has no gcc.
//
// The golden files hold only what gcc printed; nothing in them comes from
// the Go code under test.

var update = flag.Bool("update", false, "rewrite testdata/abi-*.txt from the C headers")

// abiEntry is one number the headers define.
type abiEntry struct {
	name  string // C expression printed by the checker
	value uint64 // the Go value
	since string // "6.12" when the 6.1 headers lack it
	macro bool   // a #define, so the C program can #ifdef it
}

func goABI() []abiEntry {
	var out []abiEntry
	for _, e := range ioctlTable {
		out = append(out, abiEntry{name: e.name, value: uint64(e.value), since: e.since, macro: true})
	}
	c := func(name string, v uint64, since string) {
		out = append(out, abiEntry{name: name, value: v, since: since, macro: true})
	}
	unbind := int64(FileUnbind)
	c("VHOST_FILE_UNBIND", uint64(unbind), "")
	c("VHOST_VRING_F_LOG", VHOST_VRING_F_LOG, "")
	c("VHOST_PAGE_SIZE", VHOST_PAGE_SIZE, "")
	c("VHOST_IOTLB_MSG", VHOST_IOTLB_MSG, "")
	c("VHOST_IOTLB_MSG_V2", VHOST_IOTLB_MSG_V2, "")
	c("VHOST_IOTLB_MISS", VHOST_IOTLB_MISS, "")
	c("VHOST_IOTLB_UPDATE", VHOST_IOTLB_UPDATE, "")
	c("VHOST_IOTLB_INVALIDATE", VHOST_IOTLB_INVALIDATE, "")
	c("VHOST_IOTLB_ACCESS_FAIL", VHOST_IOTLB_ACCESS_FAIL, "")
	c("VHOST_IOTLB_BATCH_BEGIN", VHOST_IOTLB_BATCH_BEGIN, "")
	c("VHOST_IOTLB_BATCH_END", VHOST_IOTLB_BATCH_END, "")
	c("VHOST_ACCESS_RO", VHOST_ACCESS_RO, "")
	c("VHOST_ACCESS_WO", VHOST_ACCESS_WO, "")
	c("VHOST_ACCESS_RW", VHOST_ACCESS_RW, "")
	c("VHOST_F_LOG_ALL", VHOST_F_LOG_ALL, "")
	c("VHOST_NET_F_VIRTIO_NET_HDR", VHOST_NET_F_VIRTIO_NET_HDR, "")
	c("VHOST_BACKEND_F_IOTLB_MSG_V2", VHOST_BACKEND_F_IOTLB_MSG_V2, "")
	c("VHOST_BACKEND_F_IOTLB_BATCH", VHOST_BACKEND_F_IOTLB_BATCH, "")
	c("VHOST_BACKEND_F_IOTLB_ASID", VHOST_BACKEND_F_IOTLB_ASID, "")
	c("VHOST_BACKEND_F_SUSPEND", VHOST_BACKEND_F_SUSPEND, "")
	c("VHOST_BACKEND_F_RESUME", VHOST_BACKEND_F_RESUME, "6.12")
	c("VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK", VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK, "6.12")
	c("VHOST_BACKEND_F_DESC_ASID", VHOST_BACKEND_F_DESC_ASID, "6.12")
	c("VHOST_BACKEND_F_IOTLB_PERSIST", VHOST_BACKEND_F_IOTLB_PERSIST, "6.12")
	// tun constants come from x/sys/unix; check them as well.
	c("TUNSETIFF", unix.TUNSETIFF, "")
	c("TUNSETVNETHDRSZ", unix.TUNSETVNETHDRSZ, "")
	c("TUNSETOFFLOAD", unix.TUNSETOFFLOAD, "")
	c("IFF_TAP", unix.IFF_TAP, "")
	c("IFF_NO_PI", unix.IFF_NO_PI, "")
	c("IFF_VNET_HDR", unix.IFF_VNET_HDR, "")

	s := func(ctype string, size uintptr) {
		out = append(out, abiEntry{name: "sizeof(" + ctype + ")", value: uint64(size)})
	}
	o := func(ctype, field string, off uintptr) {
		out = append(out, abiEntry{name: "offsetof(" + ctype + ", " + field + ")", value: uint64(off)})
	}
	var vs VringState
	s("struct vhost_vring_state", unsafe.Sizeof(vs))
	o("struct vhost_vring_state", "index", unsafe.Offsetof(vs.Index))
	o("struct vhost_vring_state", "num", unsafe.Offsetof(vs.Num))
	s("struct vhost_vring_state", SizeofVringState)
	var vf VringFile
	s("struct vhost_vring_file", unsafe.Sizeof(vf))
	s("struct vhost_vring_file", SizeofVringFile)
	o("struct vhost_vring_file", "index", unsafe.Offsetof(vf.Index))
	o("struct vhost_vring_file", "fd", unsafe.Offsetof(vf.Fd))
	var va VringAddr
	s("struct vhost_vring_addr", unsafe.Sizeof(va))
	s("struct vhost_vring_addr", SizeofVringAddr)
	o("struct vhost_vring_addr", "index", unsafe.Offsetof(va.Index))
	o("struct vhost_vring_addr", "flags", unsafe.Offsetof(va.Flags))
	o("struct vhost_vring_addr", "desc_user_addr", unsafe.Offsetof(va.DescUserAddr))
	o("struct vhost_vring_addr", "used_user_addr", unsafe.Offsetof(va.UsedUserAddr))
	o("struct vhost_vring_addr", "avail_user_addr", unsafe.Offsetof(va.AvailUserAddr))
	o("struct vhost_vring_addr", "log_guest_addr", unsafe.Offsetof(va.LogGuestAddr))
	var mr MemoryRegion
	s("struct vhost_memory_region", unsafe.Sizeof(mr))
	s("struct vhost_memory_region", SizeofMemoryRegion)
	o("struct vhost_memory_region", "guest_phys_addr", unsafe.Offsetof(mr.GuestPhysAddr))
	o("struct vhost_memory_region", "memory_size", unsafe.Offsetof(mr.MemorySize))
	o("struct vhost_memory_region", "userspace_addr", unsafe.Offsetof(mr.UserspaceAddr))
	o("struct vhost_memory_region", "flags_padding", unsafe.Offsetof(mr.FlagsPadding))
	var mh memoryHeader
	s("struct vhost_memory", unsafe.Sizeof(mh))
	s("struct vhost_memory", SizeofMemory)
	o("struct vhost_memory", "nregions", unsafe.Offsetof(mh.NRegions))
	o("struct vhost_memory", "padding", unsafe.Offsetof(mh.Padding))
	o("struct vhost_memory", "regions", unsafe.Sizeof(mh))
	var vc vdpaConfigHeader
	s("struct vhost_vdpa_config", unsafe.Sizeof(vc))
	s("struct vhost_vdpa_config", SizeofVDPAConfig)
	o("struct vhost_vdpa_config", "off", unsafe.Offsetof(vc.Off))
	o("struct vhost_vdpa_config", "len", unsafe.Offsetof(vc.Len))
	o("struct vhost_vdpa_config", "buf", unsafe.Sizeof(vc))
	var ir IOVARange
	s("struct vhost_vdpa_iova_range", unsafe.Sizeof(ir))
	s("struct vhost_vdpa_iova_range", SizeofIOVARange)
	o("struct vhost_vdpa_iova_range", "first", unsafe.Offsetof(ir.First))
	o("struct vhost_vdpa_iova_range", "last", unsafe.Offsetof(ir.Last))
	var im IOTLBMsg
	s("struct vhost_iotlb_msg", unsafe.Sizeof(im))
	s("struct vhost_iotlb_msg", SizeofIOTLBMsg)
	o("struct vhost_iotlb_msg", "iova", unsafe.Offsetof(im.IOVA))
	o("struct vhost_iotlb_msg", "size", unsafe.Offsetof(im.Size))
	o("struct vhost_iotlb_msg", "uaddr", unsafe.Offsetof(im.UAddr))
	o("struct vhost_iotlb_msg", "perm", unsafe.Offsetof(im.Perm))
	o("struct vhost_iotlb_msg", "type", unsafe.Offsetof(im.Type))
	var m2 MsgV2
	s("struct vhost_msg_v2", unsafe.Sizeof(m2))
	s("struct vhost_msg_v2", SizeofMsgV2)
	o("struct vhost_msg_v2", "type", unsafe.Offsetof(m2.Type))
	o("struct vhost_msg_v2", "asid", unsafe.Offsetof(m2.ASID))
	o("struct vhost_msg_v2", "iotlb", unsafe.Offsetof(m2.IOTLB))
	o("struct vhost_msg_v2", "iotlb", offsetofMsgV2IOTLB)
	// The encoder writes fields by hand: check its offsets too.
	o("struct vhost_msg_v2", "iotlb.iova", offsetofMsgV2IOTLB+0)
	o("struct vhost_msg_v2", "iotlb.size", offsetofMsgV2IOTLB+8)
	o("struct vhost_msg_v2", "iotlb.uaddr", offsetofMsgV2IOTLB+16)
	o("struct vhost_msg_v2", "iotlb.perm", offsetofMsgV2IOTLB+24)
	o("struct vhost_msg_v2", "iotlb.type", offsetofMsgV2IOTLB+25)
	return out
}

// cProgram prints "name value" for every entry, skipping macros the headers
// do not define.
func cProgram(entries []abiEntry) string {
	var b strings.Builder
	b.WriteString("#include <stdio.h>\n#include <stddef.h>\n#include <linux/vhost.h>\n#include <linux/if_tun.h>\n")
	b.WriteString("int main(void) {\n")
	seen := map[string]bool{}
	for _, e := range entries {
		if seen[e.name] {
			continue
		}
		seen[e.name] = true
		if e.macro {
			fmt.Fprintf(&b, "#ifdef %s\n", e.name)
		}
		fmt.Fprintf(&b, "\tprintf(\"%%s %%llu\\n\", %q, (unsigned long long)(%s));\n", e.name, e.name)
		if e.macro {
			b.WriteString("#endif\n")
		}
	}
	b.WriteString("\treturn 0;\n}\n")
	return b.String()
}

func runC(t *testing.T, src string, includeDirs ...string) map[string]uint64 {
	t.Helper()
	dir := t.TempDir()
	cfile := filepath.Join(dir, "abi.c")
	bin := filepath.Join(dir, "abi")
	require.NoError(t, os.WriteFile(cfile, []byte(src), 0o644))
	args := []string{"-Wall", "-Werror", "-o", bin}
	for _, d := range includeDirs {
		args = append(args, "-I", d)
	}
	args = append(args, cfile)
	out, err := exec.Command("gcc", args...).CombinedOutput()
	require.NoError(t, err, "gcc: %s", out)
	out, err = exec.Command(bin).Output()
	require.NoError(t, err)
	return parseABI(t, out)
}

func parseABI(t *testing.T, data []byte) map[string]uint64 {
	t.Helper()
	m := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		require.Positive(t, i, "malformed line %q", line)
		v, err := strconv.ParseUint(line[i+1:], 10, 64)
		require.NoError(t, err, "line %q", line)
		m[line[:i]] = v
	}
	require.NoError(t, sc.Err())
	return m
}

func formatABI(m map[string]uint64) []byte {
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

// uapi612Dir finds 6.12 uapi headers (a usr/include tree from the
// linux-libc-dev 6.12 package): $VDPAKIT_UAPI_6_12, else the harness cache.
func uapi612Dir() string {
	if d := os.Getenv("VDPAKIT_UAPI_6_12"); d != "" {
		return d
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	d := filepath.Join(cache, "vdpakit-vmtest", "uapi-6.12", "usr", "include")
	if _, err := os.Stat(filepath.Join(d, "linux", "vhost.h")); err != nil {
		return ""
	}
	return d
}

const (
	golden61  = "testdata/abi-6.1.txt"
	golden612 = "testdata/abi-6.12.txt"
)

func TestABIMatchesHeaders(t *testing.T) {
	if _, err := exec.LookPath("gcc"); err != nil {
		// The guest of the real-kernel harness has no compiler; there
		// TestABIMatchesGolden carries the check.
		t.Skip("gcc not found: the header half of the ABI check runs on the build host")
	}
	src := cProgram(goABI())
	check := func(golden string, dirs ...string) {
		got := runC(t, src, dirs...)
		if *update {
			require.NoError(t, os.WriteFile(golden, formatABI(got), 0o644))
			return
		}
		data, err := os.ReadFile(golden)
		require.NoError(t, err)
		assert.Equal(t, string(data), string(formatABI(got)), "%s is stale: the headers say otherwise (go test -run TestABIMatchesHeaders -update)", golden)
	}
	if _, err := os.Stat("/usr/include/linux/vhost.h"); err == nil {
		t.Run("system", func(t *testing.T) { check(golden61) })
	} else {
		t.Log("no /usr/include/linux/vhost.h (install linux-libc-dev); system headers not checked")
	}
	if d := uapi612Dir(); d != "" {
		t.Run("6.12", func(t *testing.T) { check(golden612, d) })
	} else {
		t.Log("6.12 uapi headers not found (set VDPAKIT_UAPI_6_12); 6.12-only values checked only against testdata/abi-6.12.txt")
	}
}

func TestABIMatchesGolden(t *testing.T) {
	load := func(path string) map[string]uint64 {
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		return parseABI(t, data)
	}
	h61, h612 := load(golden61), load(golden612)
	for _, e := range goABI() {
		t.Run(e.name, func(t *testing.T) {
			v, ok := h612[e.name]
			require.True(t, ok, "the 6.12 headers lack %s", e.name)
			assert.Equal(t, v, e.value, "6.12 headers")
			v, ok = h61[e.name]
			if e.since == "6.12" {
				assert.False(t, ok, "%s is marked 6.12-only but the 6.1 headers define it", e.name)
				return
			}
			require.True(t, ok, "the 6.1 headers lack %s", e.name)
			assert.Equal(t, v, e.value, "6.1 headers")
		})
	}
}

package cabi

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseFormatRoundTrip(t *testing.T) {
	in := []byte("sizeof(struct x) 8\nA 1\n")
	m, err := Parse(in)
	require.NoError(t, err)
	assert.Equal(t, map[string]uint64{"A": 1, "sizeof(struct x)": 8}, m)
	assert.Equal(t, "A 1\nsizeof(struct x) 8\n", string(Format(m)))
}

func TestParseRejectsMalformedLines(t *testing.T) {
	for _, line := range []string{"novalue", "A -1", "A 0x10", " 5"} {
		_, err := Parse([]byte(line + "\n"))
		assert.Error(t, err, "%q", line)
	}
}

func TestProgramGuardsMacrosAndLeavesOutNewerEnums(t *testing.T) {
	entries := []Entry{
		{Name: "OLD_MACRO", Macro: true},
		{Name: "NEW_MACRO", Macro: true, Since: "6.12"},
		{Name: "OLD_ENUM"},
		{Name: "NEW_ENUM", Since: "6.12"},
	}
	old := Program([]string{"linux/x.h"}, entries, false)
	assert.Contains(t, old, "#include <linux/x.h>")
	assert.Contains(t, old, "#ifdef NEW_MACRO")
	assert.Contains(t, old, "(OLD_ENUM)")
	assert.NotContains(t, old, "NEW_ENUM")
	assert.Contains(t, Program(nil, entries, true), "(NEW_ENUM)")
}

func TestRunCompilesAgainstHeaders(t *testing.T) {
	if !NeedGCC(t) {
		return
	}
	src := Program([]string{"linux/ioctl.h"}, []Entry{{Name: "_IOC_NRBITS", Macro: true}, {Name: "sizeof(int)"}}, false)
	m := Run(t, src)
	assert.Equal(t, uint64(8), m["_IOC_NRBITS"])
	assert.Equal(t, uint64(4), m["sizeof(int)"])
	assert.False(t, strings.Contains(src, "NEW"))
}

func TestSanitizeDropsKernelOnlyConstructs(t *testing.T) {
	in := "#include <linux/types.h>\n#include <linux/compiler.h>\nint f(void __user *p);\n"
	assert.Equal(t, "#include <linux/types.h>\nint f(void *p);\n", string(sanitize([]byte(in))))
}

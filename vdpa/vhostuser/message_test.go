package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// fdSet is this process's open descriptors, each with the identity
// (device, inode) of the file it refers to.
type fdSet map[int][2]uint64

// openFdSet returns the process's open descriptors now. A descriptor closed
// while it is looked at is left out.
func openFdSet(t testing.TB) fdSet {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	set := make(fdSet, len(ents))
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		require.NoError(t, err)
		var st unix.Stat_t
		if unix.Stat("/proc/self/fd/"+e.Name(), &st) == nil {
			set[fd] = [2]uint64{st.Dev, st.Ino}
		}
	}
	return set
}

// leakedSince lists the descriptors open now that were not open, or
// referred to another file, at before: what a test leaked. Unlike a
// count, it does not mistake a descriptor that something else in the
// process (an earlier test's goroutine still ending) closed meanwhile
// for one the test's own leaked descriptor made up for. The list names
// each with its target, for the failure message.
func leakedSince(t testing.TB, before fdSet) []string {
	t.Helper()
	var leaked []string
	for fd, id := range openFdSet(t) {
		if old, ok := before[fd]; !ok || old != id {
			target, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
			leaked = append(leaked, fmt.Sprintf("%d -> %s", fd, target))
		}
	}
	return leaked
}

// pipeFds returns n fresh descriptors (read ends of pipes; write ends
// closed).
func pipeFds(t testing.TB, n int) []int {
	t.Helper()
	fds := make([]int, n)
	for i := range fds {
		var p [2]int
		require.NoError(t, unix.Pipe2(p[:], unix.O_CLOEXEC))
		require.NoError(t, unix.Close(p[1]))
		fds[i] = p[0]
	}
	return fds
}

func fdOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

func rawMsg(req Request, flags Flags, size uint32, payload []byte) []byte {
	b := make([]byte, HeaderSize, HeaderSize+len(payload))
	binary.NativeEndian.PutUint32(b, uint32(req))
	binary.NativeEndian.PutUint32(b[4:], uint32(flags))
	binary.NativeEndian.PutUint32(b[8:], size)
	return append(b, payload...)
}

func u64p(v uint64) []byte { return putU64(v) }

func memTablePayload(n uint32, regions int) []byte {
	b := make([]byte, memTableHdrSize+regions*memRegionSize)
	binary.NativeEndian.PutUint32(b, n)
	for i := 0; i < regions; i++ {
		MemoryRegion{GuestPhysAddr: uint64(i) << 20, MemorySize: 1 << 20, UserspaceAddr: 0x7f0000000000 + uint64(i)<<20}.
			put(b[memTableHdrSize+i*memRegionSize:])
	}
	return b
}

func TestDecodeValidation(t *testing.T) {
	cfg := Config{Offset: 0, Data: make([]byte, 6)}.Encode()
	tests := []struct {
		name    string
		msg     []byte
		nfds    int
		wantErr error
	}{
		{"header: shorter than 12 bytes is truncated", []byte{1, 0, 0, 0, 1, 0}, 0, ErrTruncated},
		{"header: version must be 1", rawMsg(ReqGetFeatures, 2, 0, nil), 0, ErrBadVersion},
		{"header: version 0 is rejected", rawMsg(ReqGetFeatures, 0, 0, nil), 0, ErrBadVersion},
		{"header: unknown flag bits are rejected", rawMsg(ReqGetFeatures, Version|0x100, 0, nil), 0, ErrBadVersion},
		{"header: size above the cap is rejected", rawMsg(ReqSetMemTable, Version, MaxPayload+1, nil), 0, ErrPayloadTooLarge},
		{"header: size 4GiB-1 is rejected", rawMsg(ReqSetMemTable, Version, ^uint32(0), nil), 0, ErrPayloadTooLarge},
		{"payload: shorter than size is truncated", rawMsg(ReqSetFeatures, Version, 8, []byte{1, 2, 3}), 0, ErrTruncated},
		{"payload: longer than size is rejected", rawMsg(ReqSetFeatures, Version, 8, make([]byte, 9)), 0, ErrBadSize},
		{"unknown request 0", rawMsg(0, Version, 0, nil), 0, ErrUnknownRequest},
		{"unknown request 41", rawMsg(41, Version, 0, nil), 0, ErrUnknownRequest},
		{"unknown request 1000 with fds", rawMsg(1000, Version, 0, nil), 2, ErrUnknownRequest},
		{"request with reply flag", rawMsg(ReqGetFeatures, Version|FlagReply, 0, nil), 0, ErrProtocol},
		{"SET_FEATURES payload is a u64", rawMsg(ReqSetFeatures, Version, 4, make([]byte, 4)), 0, ErrBadSize},
		{"SET_FEATURES carries no fds", rawMsg(ReqSetFeatures, Version, 8, make([]byte, 8)), 1, ErrFdCount},
		{"GET_FEATURES has no payload", rawMsg(ReqGetFeatures, Version, 4, make([]byte, 4)), 0, ErrBadSize},
		{"SET_VRING_NUM is a vring state", rawMsg(ReqSetVringNum, Version, 4, make([]byte, 4)), 0, ErrBadSize},
		{"SET_VRING_ADDR is 40 bytes", rawMsg(ReqSetVringAddr, Version, 32, make([]byte, 32)), 0, ErrBadSize},
		{"SET_VRING_KICK needs its fd", rawMsg(ReqSetVringKick, Version, 8, u64p(0)), 0, ErrFdCount},
		{"SET_VRING_KICK takes one fd", rawMsg(ReqSetVringKick, Version, 8, u64p(0)), 2, ErrFdCount},
		{"SET_VRING_CALL with invalid-fd flag takes none", rawMsg(ReqSetVringCall, Version, 8, u64p(VringNoFd)), 1, ErrFdCount},
		{"SET_VRING_CALL reserved bits", rawMsg(ReqSetVringCall, Version, 8, u64p(0x200)), 1, ErrProtocol},
		{"SET_MEM_TABLE missing fd", rawMsg(ReqSetMemTable, Version, 8+2*32, memTablePayload(2, 2)), 1, ErrFdCount},
		{"SET_MEM_TABLE too many fds", rawMsg(ReqSetMemTable, Version, 8+2*32, memTablePayload(2, 2)), 3, ErrFdCount},
		{"SET_MEM_TABLE nregions > 8", rawMsg(ReqSetMemTable, Version, 8+8*32, memTablePayload(9, 8)), 8, ErrTooManyRegions},
		{"SET_MEM_TABLE regions past payload", rawMsg(ReqSetMemTable, Version, 8+1*32, memTablePayload(2, 1)), 2, ErrBadSize},
		{"SET_MEM_TABLE shorter than its header", rawMsg(ReqSetMemTable, Version, 4, make([]byte, 4)), 0, ErrBadSize},
		{"SET_LOG_BASE is a log description", rawMsg(ReqSetLogBase, Version, 8, make([]byte, 8)), 1, ErrBadSize},
		{"SET_LOG_BASE at most one fd", rawMsg(ReqSetLogBase, Version, 16, make([]byte, 16)), 2, ErrFdCount},
		{"SET_LOG_FD needs an fd", rawMsg(ReqSetLogFd, Version, 0, nil), 0, ErrFdCount},
		{"GET_CONFIG size must match payload", rawMsg(ReqGetConfig, Version, uint32(len(cfg)+1), append(cfg, 0)), 0, ErrBadSize},
		{"GET_CONFIG larger than 256", rawMsg(ReqGetConfig, Version, uint32(configHeaderSize+257), Config{Data: make([]byte, 257)}.Encode()), 0, ErrPayloadTooLarge},
		{"ADD_MEM_REG needs an fd", rawMsg(ReqAddMemReg, Version, singleRegionSize, make([]byte, singleRegionSize)), 0, ErrFdCount},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fds := pipeFds(t, tc.nfds)
			m, err := Decode(tc.msg, fds)
			require.Error(t, err)
			assert.Nil(t, m)
			assert.ErrorIs(t, err, tc.wantErr)
			for _, fd := range fds {
				assert.False(t, fdOpen(fd), "fd %d leaked", fd)
			}
		})
	}
}

func TestDecodeAccepts(t *testing.T) {
	tests := []struct {
		name string
		msg  []byte
		nfds int
	}{
		{"GET_FEATURES without payload", rawMsg(ReqGetFeatures, Version, 0, nil), 0},
		{"SET_OWNER with need_reply", rawMsg(ReqSetOwner, Version|FlagNeedReply, 0, nil), 0},
		{"SET_VRING_KICK with fd", rawMsg(ReqSetVringKick, Version, 8, u64p(3)), 1},
		{"SET_VRING_KICK polling", rawMsg(ReqSetVringKick, Version, 8, u64p(3|VringNoFd)), 0},
		{"SET_MEM_TABLE two regions", rawMsg(ReqSetMemTable, Version, 8+2*32, memTablePayload(2, 2)), 2},
		{"SET_MEM_TABLE full-size struct", rawMsg(ReqSetMemTable, Version, 8+8*32, memTablePayload(1, 8)), 1},
		{"SET_LOG_BASE with fd", rawMsg(ReqSetLogBase, Version, 16, Log{MmapSize: 4096}.Encode()), 1},
		{"GET_CONFIG 256 bytes", rawMsg(ReqGetConfig, Version, configHeaderSize+256, Config{Data: make([]byte, 256)}.Encode()), 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fds := pipeFds(t, tc.nfds)
			m, err := Decode(tc.msg, fds)
			require.NoError(t, err)
			assert.Equal(t, fds, m.Fds)
			m.Close()
			for _, fd := range fds {
				assert.False(t, fdOpen(fd))
			}
		})
	}
}

func TestPayloadRoundTrip(t *testing.T) {
	a := VringAddr{Index: 1, Flags: VringFLog, Desc: 0x1000, Used: 0x2000, Avail: 0x3000, Log: 0x4000}
	got, err := DecodeVringAddr(a.Encode())
	require.NoError(t, err)
	assert.Equal(t, a, got)

	s := VringState{Index: 3, Num: 256}
	gs, err := DecodeVringState(s.Encode())
	require.NoError(t, err)
	assert.Equal(t, s, gs)

	rs := []MemoryRegion{{1, 2, 3, 4}, {5, 6, 7, 8}}
	enc := EncodeMemTable(rs)
	assert.Len(t, enc, 8+2*32)
	grs, err := DecodeMemTable(enc)
	require.NoError(t, err)
	assert.Equal(t, rs, grs)

	l := Log{MmapSize: 1 << 20, MmapOffset: 4096}
	gl, err := DecodeLog(l.Encode())
	require.NoError(t, err)
	assert.Equal(t, l, gl)

	c := Config{Offset: 4, Flags: ConfigFlagMigration, Data: []byte{1, 2, 3}}
	gc, err := DecodeConfig(c.Encode())
	require.NoError(t, err)
	assert.Equal(t, c, gc)

	f := Inflight{MmapSize: 1, MmapOffset: 2, NumQueues: 3, QueueSize: 4}
	gf, err := DecodeInflight(f.Encode())
	require.NoError(t, err)
	assert.Equal(t, f, gf)
}

// The wire layout is fixed by the protocol document: check byte offsets
// against hand-written expectations rather than the encoder.
func TestWireLayout(t *testing.T) {
	b := Encode(nil, Header{Request: ReqSetVringAddr, Flags: Version | FlagNeedReply},
		VringAddr{Index: 2, Flags: 1, Desc: 0x11, Used: 0x22, Avail: 0x33, Log: 0x44}.Encode())
	require.Len(t, b, 12+40)
	ne := binary.NativeEndian
	assert.Equal(t, uint32(9), ne.Uint32(b[0:]), "request")
	assert.Equal(t, uint32(0x9), ne.Uint32(b[4:]), "flags: version 1 | need_reply (bit 3)")
	assert.Equal(t, uint32(40), ne.Uint32(b[8:]), "size")
	assert.Equal(t, uint32(2), ne.Uint32(b[12:]), "index")
	assert.Equal(t, uint32(1), ne.Uint32(b[16:]), "flags")
	assert.Equal(t, uint64(0x11), ne.Uint64(b[20:]), "desc_user_addr")
	assert.Equal(t, uint64(0x22), ne.Uint64(b[28:]), "used_user_addr")
	assert.Equal(t, uint64(0x33), ne.Uint64(b[36:]), "avail_user_addr")
	assert.Equal(t, uint64(0x44), ne.Uint64(b[44:]), "log_guest_addr")
}

func socketpair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	mk := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "sock")
		c, err := net.FileConn(f)
		require.NoError(t, err)
		require.NoError(t, f.Close())
		return c.(*net.UnixConn)
	}
	a, b := mk(p[0]), mk(p[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func sendRaw(t testing.TB, c *net.UnixConn, b []byte, fds []int) {
	t.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := c.WriteMsgUnix(b, oob, nil)
	require.NoError(t, err)
}

func TestConnFraming(t *testing.T) {
	t.Run("message and fds round trip", func(t *testing.T) {
		a, b := socketpair(t)
		ca, cb := newConn(a), newConn(b)
		fds := pipeFds(t, 2)
		defer closeFds(fds)
		require.NoError(t, ca.write(Header{Request: ReqSetMemTable, Flags: Version}, memTablePayload(2, 2), fds))
		m, err := cb.read()
		require.NoError(t, err)
		defer m.Close()
		require.NoError(t, Validate(m))
		assert.Len(t, m.Fds, 2)
		assert.Equal(t, memTablePayload(2, 2), m.Payload)
	})
	t.Run("clean close between messages is io.EOF", func(t *testing.T) {
		a, b := socketpair(t)
		require.NoError(t, a.Close())
		_, err := newConn(b).read()
		assert.ErrorIs(t, err, io.EOF)
	})
	t.Run("close inside the header is truncated", func(t *testing.T) {
		a, b := socketpair(t)
		sendRaw(t, a, []byte{1, 0, 0, 0, 1}, nil)
		require.NoError(t, a.Close())
		_, err := newConn(b).read()
		assert.ErrorIs(t, err, ErrTruncated)
	})
	t.Run("close inside the payload is truncated and closes fds", func(t *testing.T) {
		a, b := socketpair(t)
		fds := pipeFds(t, 1)
		sendRaw(t, a, rawMsg(ReqSetMemTable, Version, 40, memTablePayload(1, 1)[:20]), fds)
		closeFds(fds)
		require.NoError(t, a.Close())
		before := openFdSet(t) // the descriptor in flight is in no table
		_, err := newConn(b).read()
		assert.ErrorIs(t, err, ErrTruncated)
		assert.Empty(t, leakedSince(t, before))
	})
	t.Run("more than 8 fds", func(t *testing.T) {
		a, b := socketpair(t)
		fds := pipeFds(t, 12)
		sendRaw(t, a, rawMsg(ReqSetMemTable, Version, 8, memTablePayload(0, 0)), fds)
		closeFds(fds)
		before := openFdSet(t)
		_, err := newConn(b).read()
		assert.ErrorIs(t, err, ErrFdCount)
		assert.Empty(t, leakedSince(t, before))
	})
	t.Run("oversized size field", func(t *testing.T) {
		a, b := socketpair(t)
		sendRaw(t, a, rawMsg(ReqGetConfig, Version, 1<<20, nil), nil)
		_, err := newConn(b).read()
		assert.ErrorIs(t, err, ErrPayloadTooLarge)
	})
}

func TestMessageErrorUnwraps(t *testing.T) {
	err := msgErr(ReqSetVringAddr, ErrAddrNotMapped, "desc %#x", 0x1000)
	var me *MessageError
	require.True(t, errors.As(err, &me))
	assert.Equal(t, ReqSetVringAddr, me.Request)
	assert.ErrorIs(t, err, ErrAddrNotMapped)
	assert.Contains(t, err.Error(), "SET_VRING_ADDR")
}

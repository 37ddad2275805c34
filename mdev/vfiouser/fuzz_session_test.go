package vfiouser_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
)

// The fuzz input of FuzzServerSession is a vfio-user byte stream as a
// client writes it: 16-byte headers, each followed by the payload its size
// field announces. The harness sends each message with one write, with
// the descriptors a client would attach, so the fuzzer reaches mapped
// memory and registered interrupts.
//
// A command's header Error field is reserved (vfio-user.rst "Header"): the
// server must ignore it, so the harness takes directives from it, and the
// bytes still go to the server unchanged. They let the fuzzer choose what
// a hostile client does with descriptors, which the byte stream cannot
// express.
const (
	// fuzzNoFd: DMA_MAP or SET_IRQS (DATA_EVENTFD) without descriptors.
	fuzzNoFd = 1 << 0
	// fuzzExtraFd: one descriptor more than the message takes.
	fuzzExtraFd = 1 << 1
	// fuzzShortFile: DMA_MAP's file is half the length the window needs.
	fuzzShortFile = 1 << 2
	// fuzzWrongKind: an eventfd for DMA_MAP, a memfd for SET_IRQS.
	fuzzWrongKind = 1 << 3
	// fuzzUnsealed: DMA_MAP's memfd cannot be sealed against shrinking;
	// the harness keeps it, so a later fuzzCut can truncate it under the
	// server's mapping (a hostile client can: accesses to lost pages raise
	// SIGBUS unless the server guards them).
	fuzzUnsealed = 1 << 4
	// fuzzCut: before sending this message, wait until the server has
	// answered every message so far (it has mapped the windows), then
	// truncate every fuzzUnsealed memfd to 0 bytes.
	fuzzCut = 1 << 5
)

const (
	// fuzzMaxFile bounds the memfd the harness makes for a window; a
	// larger window gets a 1 MiB file (which the server must refuse).
	fuzzMaxFile = 64 << 20
	// fuzzMemfdName names the harness's memfds in /proc/self/maps.
	fuzzMemfdName = "vfu-fuzz-mem"
	fuzzTimeout   = 10 * time.Second
)

// fuzzServer is the device the package's tests serve (a softnet device
// behind vdpa.Local), built afresh for every input so that inputs do not
// depend on each other.
type fuzzServer struct {
	local *vdpa.Local
	srv   *vfiouser.Server
}

func newFuzzServer(t *testing.T) *fuzzServer {
	t.Helper()
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	l := vdpa.NewLocal(sn, nil)
	srv, err := vfiouser.New(l, &vfiouser.Options{Device: mdev.Options{Backend: "software"}})
	if err != nil {
		_ = l.Close()
	}
	require.NoError(t, err)
	return &fuzzServer{local: l, srv: srv}
}

func (f *fuzzServer) close(t *testing.T) {
	t.Helper()
	require.NoError(t, f.srv.Close())
	require.NoError(t, f.local.Close())
}

// fuzzSocketpair returns the client's and the server's end of a stream
// socketpair, the way a vfio-user client's connect(2) would.
func fuzzSocketpair(t *testing.T) (client, server *net.UnixConn) {
	t.Helper()
	p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	mk := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "vfu-fuzz-sock")
		c, err := net.FileConn(f)
		require.NoError(t, err)
		require.NoError(t, f.Close())
		return c.(*net.UnixConn)
	}
	return mk(p[0]), mk(p[1])
}

// fuzzExpect is a reply the harness expects, in order.
type fuzzExpect struct {
	id  uint16
	cmd vfiouser.Command
	// mustErr: the message breaks the framing or carries too many
	// descriptors; the server answers with an error and ends the session.
	mustErr bool
}

// fuzzReplies reads the server's messages: every one must be a
// well-formed reply.
type fuzzReplies struct {
	mu   sync.Mutex
	got  []vfiouser.Header
	bad  error
	more chan struct{} // signalled on every reply
	done chan struct{}
}

func readReplies(c *net.UnixConn) *fuzzReplies {
	r := &fuzzReplies{more: make(chan struct{}, 1), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		br := bufio.NewReader(c)
		var hb [vfiouser.HeaderSize]byte
		for {
			n, err := io.ReadFull(br, hb[:])
			if err != nil {
				// The server closed the connection (ECONNRESET when it
				// left our unread messages behind): the end, unless it
				// closed in the middle of a reply.
				if n > 0 {
					r.fail(errors.New("the server's stream ends inside a header"))
				}
				return
			}
			h, err := vfiouser.ParseHeader(hb[:])
			if err != nil {
				r.fail(err)
				return
			}
			if _, err := io.CopyN(io.Discard, br, int64(h.Size)-vfiouser.HeaderSize); err != nil {
				r.fail(errors.New("the server's stream ends inside a reply"))
				return
			}
			r.mu.Lock()
			r.got = append(r.got, h)
			r.mu.Unlock()
			select {
			case r.more <- struct{}{}:
			default:
			}
		}
	}()
	return r
}

func (r *fuzzReplies) fail(err error) {
	r.mu.Lock()
	r.bad = err
	r.mu.Unlock()
}

func (r *fuzzReplies) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.got)
}

// wait waits until n replies arrived, the server stopped sending or the
// session ended.
func (r *fuzzReplies) wait(n int, session <-chan struct{}) {
	timer := time.NewTimer(fuzzTimeout)
	defer timer.Stop()
	for r.count() < n {
		select {
		case <-r.more:
		case <-r.done:
			return
		case <-session:
			return
		case <-timer.C:
			return
		}
	}
}

// fuzzFds makes the descriptors a client attaches to msg. It returns them
// and the unsealed memfds the harness keeps for a later fuzzCut.
func fuzzFds(t *testing.T, h vfiouser.Header, p []byte) (fds, keep []int) {
	t.Helper()
	directives := h.Error
	if h.IsReply() {
		directives = 0 // the Error field of a reply is the errno
	}
	memfd := func(size uint64, flags int, data []byte, at uint64) int {
		fd, err := unix.MemfdCreate(fuzzMemfdName, unix.MFD_CLOEXEC|flags)
		require.NoError(t, err)
		require.NoError(t, unix.Ftruncate(fd, int64(size)))
		if at < size && len(data) > 0 {
			n := min(uint64(len(data)), size-at)
			_, err := unix.Pwrite(fd, data[:n], int64(at))
			require.NoError(t, err)
		}
		return fd
	}
	eventfd := func() int {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		require.NoError(t, err)
		return fd
	}
	switch {
	case h.IsReply():
	case h.Command == vfiouser.CmdDMAMap && directives&fuzzNoFd == 0:
		if directives&fuzzWrongKind != 0 {
			fds = append(fds, eventfd())
			break
		}
		// A file as long as the window needs (the server refuses shorter
		// ones), holding the bytes after the DMA_MAP structure, which the
		// server ignores: so the fuzzer writes guest memory too (rings,
		// descriptors, buffers).
		size, off, need, data := uint64(1<<20), uint64(0), uint64(0), []byte(nil)
		if len(p) >= vfiouser.DMAMapSize {
			off, need = binary.LittleEndian.Uint64(p[8:]), binary.LittleEndian.Uint64(p[24:])
			data = p[vfiouser.DMAMapSize:]
		}
		if end := off + need; end >= off && end > 0 && end <= fuzzMaxFile {
			size = (end + 4095) &^ 4095
		}
		if directives&fuzzShortFile != 0 {
			size /= 2
		}
		flags := unix.MFD_ALLOW_SEALING
		if directives&fuzzUnsealed != 0 {
			flags = 0
		}
		fd := memfd(size, flags, data, off)
		fds = append(fds, fd)
		if directives&fuzzUnsealed != 0 {
			dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
			require.NoError(t, err)
			keep = append(keep, dup)
		}
	case h.Command == vfiouser.CmdDeviceSetIRQs && directives&fuzzNoFd == 0 &&
		len(p) >= vfiouser.IRQSetSize && binary.LittleEndian.Uint32(p[4:])&vfiouser.IRQSetDataEventfd != 0:
		// count eventfds, up to one more than the server takes in a
		// message.
		n := min(binary.LittleEndian.Uint32(p[16:]), vfiouser.MaxMsgFds+1)
		for i := uint32(0); i < n; i++ {
			if directives&fuzzWrongKind != 0 {
				fds = append(fds, memfd(4096, unix.MFD_ALLOW_SEALING, nil, 0))
			} else {
				fds = append(fds, eventfd())
			}
		}
	}
	if directives&fuzzExtraFd != 0 && !h.IsReply() {
		fds = append(fds, eventfd())
	}
	return fds, keep
}

// fuzzMappings counts the harness's memfds still mapped in this process.
func fuzzMappings(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/maps")
	require.NoError(t, err)
	return strings.Count(string(b), "/memfd:"+fuzzMemfdName)
}

// settle waits (bounded) until cond holds.
func settle(cond func() bool) {
	deadline := time.Now().Add(5 * time.Second)
	for !cond() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}

// FuzzServerSession runs a vfio-user session over a socketpair with a
// client whose messages come from the fuzzer (see fuzzNoFd and the other
// directives for the descriptors). Replies are read and checked by a
// reader: every one must be a reply to the next message that wanted one
// (a missing or extra reply shows), and an error reply must carry only
// the header and an errno. The session must end once the client hangs up
// (no hang, no panic, no fault on mapped memory), with io.EOF or a typed
// *vfiouser.Error, and afterwards every descriptor and mapping the session
// made must be gone and the goroutines with them.
func FuzzServerSession(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		goroutines, fdsBefore, mapsBefore := runtime.NumGoroutine(), fdCount(t), fuzzMappings(t)
		fs := newFuzzServer(t)
		a, b := fuzzSocketpair(t)
		replies := readReplies(a)
		done := make(chan struct{})
		var serveErr error
		go func() {
			defer close(done)
			serveErr = fs.srv.ServeConn(context.Background(), b)
		}()
		// A server that stops reading fails the test below instead of
		// blocking the writer.
		require.NoError(t, a.SetWriteDeadline(time.Now().Add(fuzzTimeout)))

		var expect []fuzzExpect
		var kept []int
		modelled := true // the server's view of the stream is still known
		mustEnd := false // the model says the server ends the session
		for len(in) > 0 {
			if len(in) < vfiouser.HeaderSize {
				// A partial header, then the hang-up.
				_, _ = a.Write(in)
				break
			}
			raw := vfiouser.Header{
				ID: binary.LittleEndian.Uint16(in), Command: vfiouser.Command(binary.LittleEndian.Uint16(in[2:])),
				Size: binary.LittleEndian.Uint32(in[4:]), Flags: binary.LittleEndian.Uint32(in[8:]),
				Error: binary.LittleEndian.Uint32(in[12:]),
			}
			n := vfiouser.HeaderSize + int(min(max(raw.Size, vfiouser.HeaderSize)-vfiouser.HeaderSize, vfiouser.MaxMessage+1-vfiouser.HeaderSize))
			truncated := n > len(in)
			n = min(n, len(in))
			msg := in[:n]
			in = in[n:]
			fds, keep := fuzzFds(t, raw, msg[vfiouser.HeaderSize:])
			kept = append(kept, keep...)
			if !raw.IsReply() && raw.Error&fuzzCut != 0 && modelled {
				replies.wait(len(expect), done)
				for _, fd := range kept {
					require.NoError(t, unix.Ftruncate(fd, 0))
				}
			}
			var oob []byte
			if len(fds) > 0 {
				oob = unix.UnixRights(fds...)
			}
			_, _, err := a.WriteMsgUnix(msg, oob, nil)
			for _, fd := range fds {
				require.NoError(t, unix.Close(fd))
			}
			if err != nil {
				break // the server ended the session
			}
			if !modelled {
				continue
			}
			// What the server must answer (session.run): a bad header is
			// answered at once, a message cut short by the hang-up not at
			// all.
			h, err := vfiouser.ParseHeader(msg[:vfiouser.HeaderSize])
			switch {
			case err == nil && truncated:
				modelled = false
			case err != nil || len(fds) > vfiouser.MaxMsgFds:
				expect = append(expect, fuzzExpect{id: raw.ID, cmd: raw.Command, mustErr: true})
				modelled, mustEnd = false, true
			case h.IsReply(), h.NoReply():
			default:
				expect = append(expect, fuzzExpect{id: h.ID, cmd: h.Command})
			}
		}
		require.NoError(t, a.CloseWrite())
		select {
		case <-done:
		case <-time.After(fuzzTimeout):
			t.Fatal("the session did not end after the client hung up")
		}
		select {
		case <-replies.done:
		case <-time.After(fuzzTimeout):
			t.Fatal("the server did not close the connection")
		}
		for _, fd := range kept {
			require.NoError(t, unix.Close(fd))
		}
		require.NoError(t, a.Close())

		var pe *vfiouser.Error
		require.True(t, errors.Is(serveErr, io.EOF) || errors.As(serveErr, &pe), "untyped session error %v", serveErr)
		require.NoError(t, replies.bad)
		got := replies.got
		require.LessOrEqual(t, len(got), len(expect), "more replies than commands that want one")
		for i, h := range got {
			e := expect[i]
			require.Equal(t, e.id, h.ID, "reply %d", i)
			require.Equal(t, e.cmd, h.Command, "reply %d", i)
			require.True(t, h.IsReply(), "reply %d flags %#x", i, h.Flags)
			require.Zero(t, h.Flags&vfiouser.FlagNoReply, "reply %d flags %#x", i, h.Flags)
			if e.mustErr {
				require.NotZero(t, h.Flags&vfiouser.FlagError, "reply %d to a framing or descriptor error", i)
			}
			if h.Flags&vfiouser.FlagError != 0 {
				require.EqualValues(t, vfiouser.HeaderSize, h.Size, "error reply %d has a payload", i)
				require.NotZero(t, h.Error, "error reply %d without an errno", i)
			}
		}
		if errors.Is(serveErr, io.EOF) {
			// The server read the whole stream: every command that wanted
			// a reply got one, and none of them should have ended it.
			require.Len(t, got, len(expect), "replies")
			require.False(t, mustEnd, "the session went on after a framing or descriptor error")
		}

		fs.close(t)
		settle(func() bool { return fdCount(t) <= fdsBefore })
		require.LessOrEqual(t, fdCount(t), fdsBefore, "descriptors leaked")
		require.Equal(t, mapsBefore, fuzzMappings(t), "guest memory still mapped")
		settle(func() bool { return runtime.NumGoroutine() <= goroutines })
		require.LessOrEqual(t, runtime.NumGoroutine(), goroutines, "goroutines leaked")
	})
}

// fuzzSeq builds a client byte stream for the seeds.
type fuzzSeq struct {
	b  []byte
	id uint16
}

func (s *fuzzSeq) add(cmd vfiouser.Command, flags, directives uint32, payload []byte) *fuzzSeq {
	s.id++
	m := vfiousertest.Message(s.id, cmd, flags, payload)
	binary.LittleEndian.PutUint32(m[12:], directives)
	s.b = append(s.b, m...)
	return s
}

func (s *fuzzSeq) version() *fuzzSeq {
	// What QEMU 11.1 proposes.
	fds, xfer, maps, pg := uint64(8), uint64(1<<20), uint64(65535), uint64(4096)
	js, _ := json.Marshal(map[string]any{"capabilities": vfiouser.Capabilities{
		MaxMsgFds: &fds, MaxDataXferSize: &xfer, MaxDMAMaps: &maps, PgSizes: &pg}})
	return s.add(vfiouser.CmdVersion, 0, 0, append(append([]byte{0, 0, 0, 0}, js...), 0))
}

func (s *fuzzSeq) dmaMap(addr, size, offset uint64, directives uint32, mem []byte) *fuzzSeq {
	p := vfiouser.DMAMap{Argsz: vfiouser.DMAMapSize, Flags: vfiouser.DMAReadable | vfiouser.DMAWritable,
		Address: addr, Size: size, Offset: offset}.Marshal()
	return s.add(vfiouser.CmdDMAMap, 0, directives, append(p, mem...))
}

func (s *fuzzSeq) dmaUnmap(addr, size uint64, flags uint32) *fuzzSeq {
	return s.add(vfiouser.CmdDMAUnmap, 0, 0, vfiouser.DMAUnmap{Argsz: vfiouser.DMAUnmapSize, Flags: flags, Address: addr, Size: size}.Marshal())
}

func (s *fuzzSeq) write(region uint32, off uint64, size int, v uint64, flags uint32) *fuzzSeq {
	p := make([]byte, vfiouser.RegionAccessSize+size)
	vfiouser.RegionAccess{Offset: off, Region: region, Count: uint32(size)}.Put(p)
	for i := 0; i < size; i++ {
		p[vfiouser.RegionAccessSize+i] = byte(v >> (8 * i))
	}
	return s.add(vfiouser.CmdRegionWrite, flags, 0, p)
}

func (s *fuzzSeq) read(region uint32, off uint64, count uint32) *fuzzSeq {
	p := make([]byte, vfiouser.RegionAccessSize)
	vfiouser.RegionAccess{Offset: off, Region: region, Count: count}.Put(p)
	return s.add(vfiouser.CmdRegionRead, 0, 0, p)
}

// common writes the virtio common configuration (BAR 4).
func (s *fuzzSeq) common(off uint64, size int, v uint64) *fuzzSeq {
	return s.write(mdev.ModernBAR, mdev.BarOffCommon+off, size, v, 0)
}

func (s *fuzzSeq) kick(q int) *fuzzSeq {
	return s.write(mdev.ModernBAR, mdev.BarOffNotify+uint64(q*mdev.NotifyOffMultiplier), 2, uint64(q), vfiouser.FlagNoReply)
}

func (s *fuzzSeq) setIRQs(index, flags, start, count uint32, directives uint32, bools []byte) *fuzzSeq {
	return s.add(vfiouser.CmdDeviceSetIRQs, 0, directives,
		vfiouser.IRQSet{Flags: flags, Index: index, Start: start, Count: count, Bools: bools}.Marshal())
}

func (s *fuzzSeq) feature(flags uint32, room int, data []byte) *fuzzSeq {
	p := make([]byte, 8, 8+len(data))
	binary.LittleEndian.PutUint32(p, uint32(8+max(len(data), room)))
	binary.LittleEndian.PutUint32(p[4:], flags)
	return s.add(vfiouser.CmdDeviceFeature, 0, 0, append(p, data...))
}

func (s *fuzzSeq) migState(state mdev.MigState) *fuzzSeq {
	d := make([]byte, 8)
	binary.LittleEndian.PutUint32(d, uint32(state))
	return s.feature(vfiouser.FeatureSet|vfiouser.FeatureMigDeviceState, 8, d)
}

func le64s(vs ...uint64) []byte {
	b := make([]byte, 0, 8*len(vs))
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

// Guest memory of the seeds: two split rings of fuzzQueueSize entries at
// the start of the window, a receive buffer and one frame to transmit
// (the softnet device loops it back to the receive queue).
const (
	fuzzQueueSize = 8
	fuzzRxDesc    = 0x000
	fuzzRxAvail   = 0x100
	fuzzRxUsed    = 0x200
	fuzzTxDesc    = 0x400
	fuzzTxAvail   = 0x500
	fuzzTxUsed    = 0x600
	fuzzRxBuf     = 0x800
	fuzzTxBuf     = 0xc00
	fuzzFrameLen  = 12 + 60 // virtio-net header and a minimal frame
	fuzzMemSize   = 4 << 20
)

func fuzzGuestMemory() []byte {
	m := make([]byte, fuzzTxBuf+fuzzFrameLen)
	desc := func(at, addr uint64, n uint32, flags uint16) {
		binary.LittleEndian.PutUint64(m[at:], addr)
		binary.LittleEndian.PutUint32(m[at+8:], n)
		binary.LittleEndian.PutUint16(m[at+12:], flags)
	}
	desc(fuzzRxDesc, fuzzRxBuf, 0x400, 2) // VIRTQ_DESC_F_WRITE
	desc(fuzzTxDesc, fuzzTxBuf, fuzzFrameLen, 0)
	binary.LittleEndian.PutUint16(m[fuzzRxAvail+2:], 1) // idx 1, ring[0] = 0
	binary.LittleEndian.PutUint16(m[fuzzTxAvail+2:], 1)
	copy(m[fuzzTxBuf+12:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x88, 0xb5})
	return m
}

// bringUp is what Linux's virtio_pci driver does behind QEMU's client:
// read the configuration space, enable MSI-X with an eventfd per vector,
// negotiate VERSION_1 and start both queues on the rings of
// fuzzGuestMemory, then kick them.
func (s *fuzzSeq) bringUp() *fuzzSeq {
	const msixCap = 0x98 // mdev's MSI-X capability in configuration space
	s.add(vfiouser.CmdDeviceGetInfo, 0, 0, vfiouser.DeviceInfo{Argsz: vfiouser.DeviceInfoSize}.Marshal())
	for _, idx := range []uint32{vfiouser.RegionConfig, mdev.ModernBAR, mdev.MSIXBAR} {
		s.add(vfiouser.CmdDeviceGetRegionInfo, 0, 0, vfiouser.RegionInfo{Index: idx}.Marshal(vfiouser.RegionInfoSize))
	}
	s.add(vfiouser.CmdDeviceGetIRQInfo, 0, 0, vfiouser.IRQInfo{Argsz: vfiouser.IRQInfoSz, Index: vfiouser.IRQMSIX}.Marshal())
	s.read(vfiouser.RegionConfig, 0, 256)
	s.write(vfiouser.RegionConfig, 4, 2, 0x6, 0) // memory space, bus master
	s.setIRQs(vfiouser.IRQMSIX, vfiouser.IRQSetDataEventfd|vfiouser.IRQSetActionTrigger, 0, 3, 0, nil)
	s.write(vfiouser.RegionConfig, msixCap+2, 2, 0x8002, 0)
	for _, st := range []uint64{0, 1, 3} {
		s.common(mdev.OffDeviceStatus, 1, st)
	}
	s.common(mdev.OffDeviceFeatureSelect, 4, 1).read(mdev.ModernBAR, mdev.OffDeviceFeature, 4)
	s.common(mdev.OffDriverFeatureSelect, 4, 1).common(mdev.OffDriverFeature, 4, 1) // VIRTIO_F_VERSION_1
	s.common(mdev.OffDriverFeatureSelect, 4, 0).common(mdev.OffDriverFeature, 4, 0)
	s.common(mdev.OffDeviceStatus, 1, 0xb).read(mdev.ModernBAR, mdev.OffDeviceStatus, 1)
	s.common(mdev.OffMSIXConfig, 2, 0)
	for q, r := range [][3]uint64{{fuzzRxDesc, fuzzRxAvail, fuzzRxUsed}, {fuzzTxDesc, fuzzTxAvail, fuzzTxUsed}} {
		s.common(mdev.OffQueueSelect, 2, uint64(q)).common(mdev.OffQueueSize, 2, fuzzQueueSize)
		s.common(mdev.OffQueueMSIXVector, 2, uint64(q+1))
		s.common(mdev.OffQueueDesc, 8, r[0]).common(mdev.OffQueueDriver, 8, r[1]).common(mdev.OffQueueDevice, 8, r[2])
		s.common(mdev.OffQueueEnable, 2, 1)
	}
	s.common(mdev.OffDeviceStatus, 1, 0xf)
	return s.kick(0).kick(1).read(mdev.ModernBAR, mdev.BarOffISR, 1)
}

// fuzzSeeds are realistic client sessions and a few hostile ones.
func fuzzSeeds() [][]byte {
	var seeds [][]byte
	// A QEMU-like session: map guest memory, bring the device up, move
	// traffic, log dirty pages, stop and save the device state, restart,
	// remap memory under the running data path, reset, unmap everything.
	s := (&fuzzSeq{}).version().dmaMap(0, fuzzMemSize, 0, 0, fuzzGuestMemory()).bringUp()
	multi := make([]byte, 8+2*vfiouser.WriteMultiEntrySize)
	binary.LittleEndian.PutUint64(multi, 2)
	for i := 0; i < 2; i++ {
		e := multi[8+i*vfiouser.WriteMultiEntrySize:]
		vfiouser.RegionAccess{Offset: mdev.BarOffNotify + uint64(i*mdev.NotifyOffMultiplier), Region: mdev.ModernBAR, Count: 2}.Put(e)
		e[16] = byte(i)
	}
	s.add(vfiouser.CmdRegionWriteMulti, 0, 0, multi)
	s.feature(vfiouser.FeatureGet|vfiouser.FeatureMigration, 8, nil)
	s.feature(vfiouser.FeatureSet|vfiouser.FeatureDMALoggingStart, 0, le64s(4096, 1, 0, fuzzMemSize))
	s.kick(1)
	s.feature(vfiouser.FeatureGet|vfiouser.FeatureDMALoggingRep, 24+16*8, le64s(0, fuzzMemSize, 4096))
	s.feature(vfiouser.FeatureSet|vfiouser.FeatureDMALoggingStop, 0, nil)
	s.migState(mdev.MigStop).migState(mdev.MigStopCopy)
	s.add(vfiouser.CmdMigDataRead, 0, 0, []byte{8 + 64, 0, 0, 0, 64, 0, 0, 0})
	s.migState(mdev.MigStop).migState(mdev.MigRunning)
	s.feature(vfiouser.FeatureGet|vfiouser.FeatureMigDeviceState, 8, nil)
	s.dmaUnmap(0, fuzzMemSize, 0).dmaMap(0, fuzzMemSize, 0, 0, fuzzGuestMemory()).kick(0)
	s.setIRQs(vfiouser.IRQMSIX, vfiouser.IRQSetDataBool|vfiouser.IRQSetActionTrigger, 0, 3, 0, []byte{1, 0, 1})
	s.add(vfiouser.CmdDeviceReset, 0, 0, nil)
	s.dmaUnmap(0, 0, vfiouser.UnmapAll)
	seeds = append(seeds, s.b)

	// INTx instead of MSI-X, masked and unmasked, and a destination's
	// RESUMING with a stream that does not load.
	s = (&fuzzSeq{}).version().dmaMap(0, fuzzMemSize, 0, 0, fuzzGuestMemory())
	s.setIRQs(vfiouser.IRQIntx, vfiouser.IRQSetDataEventfd|vfiouser.IRQSetActionTrigger, 0, 1, 0, nil)
	s.setIRQs(vfiouser.IRQIntx, vfiouser.IRQSetDataNone|vfiouser.IRQSetActionMask, 0, 1, 0, nil)
	s.setIRQs(vfiouser.IRQIntx, vfiouser.IRQSetDataBool|vfiouser.IRQSetActionTrigger, 0, 1, 0, []byte{1})
	s.setIRQs(vfiouser.IRQIntx, vfiouser.IRQSetDataNone|vfiouser.IRQSetActionUnmask, 0, 1, 0, nil)
	s.migState(mdev.MigStop).migState(mdev.MigResuming)
	s.add(vfiouser.CmdMigDataWrite, 0, 0, []byte{12, 0, 0, 0, 4, 0, 0, 0, 'v', 'd', 'p', 'a'})
	s.migState(mdev.MigStop).migState(mdev.MigRunning)
	s.setIRQs(vfiouser.IRQIntx, vfiouser.IRQSetDataNone|vfiouser.IRQSetActionTrigger, 0, 0, 0, nil)
	seeds = append(seeds, s.b)

	// Memory the client cuts under the running data path.
	s = (&fuzzSeq{}).version().dmaMap(0, fuzzMemSize, 0, fuzzUnsealed, fuzzGuestMemory()).bringUp()
	s.add(vfiouser.CmdDeviceGetInfo, 0, fuzzCut, vfiouser.DeviceInfo{Argsz: vfiouser.DeviceInfoSize}.Marshal())
	s.kick(0).kick(1).migState(mdev.MigStop).migState(mdev.MigStopCopy)
	seeds = append(seeds, s.b)

	// Hostile DMA maps: overlapping, wrapping, huge, misaligned offsets,
	// files too short, no file, the wrong kind of file, two files.
	s = (&fuzzSeq{}).version()
	s.dmaMap(0x10000, 0x10000, 0, 0, nil).dmaMap(0x18000, 0x10000, 0, 0, nil)
	s.dmaMap(^uint64(0)-0xfff, 0x1000, 0, 0, nil).dmaMap(^uint64(0)-0xfff, 0x2000, 0, 0, nil)
	s.dmaMap(1<<40, 1<<46, 0, 0, nil).dmaMap(0x100000, 0x1000, 0x800, 0, nil)
	s.dmaMap(0x200000, 0x10000, 0, fuzzShortFile, nil).dmaMap(0x300000, 0x1000, 0, fuzzNoFd, nil)
	s.dmaMap(0x400000, 0x1000, 0, fuzzWrongKind, nil).dmaMap(0x500000, 0x1000, 0, fuzzExtraFd, nil)
	s.dmaUnmap(0x10000, 0x8000, 0).dmaUnmap(0x10000, 0x10000, 0).dmaUnmap(0x10000, 0x10000, 0)
	s.dmaUnmap(0x300000, 0x1000, vfiouser.UnmapGetDirtyBitmap)
	seeds = append(seeds, s.b)

	// Hostile interrupts and region accesses.
	s = (&fuzzSeq{}).version()
	s.setIRQs(vfiouser.IRQMSIX, vfiouser.IRQSetDataEventfd|vfiouser.IRQSetActionTrigger, 1, 17, 0, nil)
	s.setIRQs(vfiouser.IRQMSIX, vfiouser.IRQSetDataEventfd|vfiouser.IRQSetActionTrigger, 2, 2, 0, nil)
	s.setIRQs(vfiouser.IRQMSIX, vfiouser.IRQSetDataEventfd|vfiouser.IRQSetActionTrigger, 0, 3, fuzzWrongKind, nil)
	s.setIRQs(vfiouser.IRQErr, vfiouser.IRQSetDataEventfd|vfiouser.IRQSetActionTrigger, 0, 1, 0, nil)
	s.setIRQs(7, vfiouser.IRQSetDataNone|vfiouser.IRQSetActionTrigger, ^uint32(0), 2, 0, nil)
	s.read(vfiouser.RegionConfig, 250, 16).read(mdev.ModernBAR, ^uint64(0)-3, 4).read(12, 0, 4)
	s.write(mdev.MSIXBAR, 0, 8, ^uint64(0), 0).write(mdev.ModernBAR, mdev.BarOffNotify+0x100, 2, 9, vfiouser.FlagNoReply)
	s.add(vfiouser.CmdDeviceGetRegionInfo, 0, 0, append(vfiouser.RegionInfo{Argsz: 64, Flags: vfiouser.RegionFlagCaps, CapOffset: 40}.Marshal(32), make([]byte, 32)...))
	s.add(vfiouser.CmdDMARead, 0, fuzzExtraFd, le64s(0, 16))
	s.add(vfiouser.CmdMigDataRead, 0, 0, []byte{8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff})
	s.add(vfiouser.CmdDeviceReset, vfiouser.TypeReply, 0, nil)
	// DMA_LOGGING_START claiming 2^32-1 ranges, and a report of a huge
	// range before logging started.
	s.feature(vfiouser.FeatureSet|vfiouser.FeatureDMALoggingStart, 0, le64s(4096, 0xffff_ffff, 0, 0x1000))
	s.feature(vfiouser.FeatureGet|vfiouser.FeatureDMALoggingRep, 1<<20, le64s(0, 1<<40, 4096))
	seeds = append(seeds, s.b)

	// Protocol violations that end the session: a command before
	// VERSION, VERSION with broken JSON, an oversized message.
	seeds = append(seeds, (&fuzzSeq{}).add(vfiouser.CmdDeviceGetInfo, 0, 0, make([]byte, 16)).b)
	seeds = append(seeds, (&fuzzSeq{}).add(vfiouser.CmdVersion, 0, 0, []byte("\x00\x00\x00\x00{\"capabilities\":[}\x00")).b)
	over := (&fuzzSeq{}).version().add(vfiouser.CmdDeviceGetInfo, 0, 0, nil).b
	binary.LittleEndian.PutUint32(over[len(over)-12:], vfiouser.MaxMessage+1)
	seeds = append(seeds, over)
	return seeds
}

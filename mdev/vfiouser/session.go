package vfiouser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/vdpa"
)

// session is one client connection.
type session struct {
	s        *Server
	conn     *net.UnixConn
	version  bool // VERSION negotiated
	hdr      [HeaderSize]byte
	buf      []byte // payload buffer, grown to the largest message seen
	oob      []byte
	fds      []int
	out      []byte // reply buffer
	multi    []WriteMultiEntry
	multiOut []byte
	// ctrunc: the kernel cut the descriptors of the current message short
	// (MSG_CTRUNC): it carried more than oob holds, MaxMsgFds.
	ctrunc bool
	// excess counts the descriptors of the current message beyond
	// MaxMsgFds, closed as they arrived (collectFds).
	excess int
}

// fatal marks errors after which the session is closed.
type fatal struct{ error }

func (f fatal) Unwrap() error { return f.error }

// readFull reads exactly len(b) bytes, collecting descriptors.
func (ss *session) readFull(b []byte) error {
	for len(b) > 0 {
		n, oobn, flags, _, err := ss.conn.ReadMsgUnix(b, ss.oob)
		if oobn > 0 {
			ss.collectFds(ss.oob[:oobn])
		}
		// Descriptors beyond what oob holds are closed by the kernel, which
		// only says so with MSG_CTRUNC: without it, a message with more
		// than MaxMsgFds descriptors would be served with the first
		// MaxMsgFds of them.
		if flags&unix.MSG_CTRUNC != 0 {
			ss.ctrunc = true
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.EOF
		}
		b = b[n:]
	}
	return nil
}

// collectFds keeps the descriptors of a control message, at most
// MaxMsgFds for the whole message: the rest are closed as they arrive and
// counted in excess (the message is refused once read). A message arrives
// in as many reads as the client likes, each with its own descriptors, so
// keeping them all until the message is complete would let one message
// exhaust RLIMIT_NOFILE (vdpa/vhostuser's conn does the same).
func (ss *session) collectFds(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		fds, _ := unix.ParseUnixRights(&m)
		for _, fd := range fds {
			if len(ss.fds) < MaxMsgFds {
				ss.fds = append(ss.fds, fd)
				continue
			}
			_ = unix.Close(fd)
			ss.excess++
		}
	}
}

func (ss *session) run() error {
	ss.oob = make([]byte, unix.CmsgSpace(4*MaxMsgFds))
	defer func() { closeAll(ss.fds); ss.fds = nil }()
	for {
		closeAll(ss.fds)
		ss.fds = ss.fds[:0]
		ss.ctrunc, ss.excess = false, 0
		if err := ss.readFull(ss.hdr[:]); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				return io.EOF
			}
			return err
		}
		h, err := ParseHeader(ss.hdr[:])
		if err != nil {
			// The stream cannot be re-synchronized: tell the client why
			// and close the session.
			ss.reply(h, nil, err)
			return err
		}
		n := int(h.Size) - HeaderSize
		if cap(ss.buf) < n {
			ss.buf = make([]byte, n)
		}
		p := ss.buf[:n]
		if err := ss.readFull(p); err != nil {
			return err
		}
		if ss.excess > 0 || ss.ctrunc {
			err := perr(h.Command, ErrFds, "more than %d descriptors (%d received)", MaxMsgFds, len(ss.fds)+ss.excess)
			ss.reply(h, nil, err)
			return err
		}
		if h.IsReply() {
			// This server sends no commands: an unsolicited reply. Before
			// VERSION it ends the session like any other message (the
			// client must open with VERSION); after it, it is ignored.
			if !ss.version {
				err := perr(h.Command, ErrVersion, "a reply before VERSION")
				ss.s.count(err)
				return err
			}
			ss.s.count(nil)
			continue
		}
		reply, err := ss.handle(h, p)
		// A message may have stopped the data path (a reset, a migration
		// state): memory unmapped while it could not be stopped goes now.
		ss.s.reap()
		ss.s.count(err)
		if err != nil {
			ss.s.log.Debug("vfio-user: rejected", "cmd", h.Command, "err", err)
		}
		if !h.NoReply() {
			ss.reply(h, reply, err)
		}
		if f, ok := err.(fatal); ok {
			return f.error
		}
	}
}

// reply sends the reply for h: the payload, or just the header with the
// error bit and errno.
func (ss *session) reply(h Header, payload []byte, err error) {
	if err != nil {
		payload = nil
	}
	size := HeaderSize + len(payload)
	if cap(ss.out) < size {
		ss.out = make([]byte, size)
	}
	b := ss.out[:size]
	rh := Header{ID: h.ID, Command: h.Command, Size: uint32(size), Flags: TypeReply}
	if err != nil {
		rh.Flags |= FlagError
		rh.Error = uint32(Errno(err))
	}
	rh.Put(b)
	copy(b[HeaderSize:], payload)
	_, _ = ss.conn.Write(b)
}

// takeFds hands the message's descriptors to the caller (the session no
// longer closes them).
func (ss *session) takeFds() []int {
	fds := append([]int(nil), ss.fds...)
	ss.fds = ss.fds[:0]
	return fds
}

func (ss *session) handle(h Header, p []byte) ([]byte, error) {
	if !ss.version && h.Command != CmdVersion {
		return nil, fatal{perr(h.Command, ErrVersion, "%v before VERSION", h.Command)}
	}
	if h.Command != CmdDMAMap && h.Command != CmdDeviceSetIRQs && len(ss.fds) > 0 {
		return nil, perr(h.Command, ErrFds, "%d unexpected descriptors", len(ss.fds))
	}
	switch h.Command {
	case CmdRegionRead, CmdRegionWrite, CmdRegionWriteMulti, CmdDeviceSetIRQs, CmdDeviceReset:
		ss.s.resume() // after an unmap: the client has mapped memory again
	}
	switch h.Command {
	case CmdVersion:
		return ss.handleVersion(p)
	case CmdDMAMap:
		return nil, ss.handleDMAMap(p)
	case CmdDMAUnmap:
		return ss.handleDMAUnmap(p)
	case CmdDeviceGetInfo:
		if _, err := ParseDeviceInfo(p); err != nil {
			return nil, err
		}
		return DeviceInfo{Argsz: DeviceInfoSize, Flags: DeviceFlagsReset | DeviceFlagsPCI,
			NumRegions: NumPCIRegions, NumIRQs: NumIRQs}.Marshal(), nil
	case CmdDeviceGetRegionInfo:
		return ss.handleRegionInfo(p)
	case CmdDeviceGetIRQInfo:
		return ss.handleIRQInfo(p)
	case CmdDeviceSetIRQs:
		return nil, ss.handleSetIRQs(p)
	case CmdRegionRead:
		return ss.handleRegionRead(p)
	case CmdRegionWrite:
		a, data, err := ParseRegionAccess(CmdRegionWrite, p, true)
		if err != nil {
			return nil, err
		}
		if err := ss.regionWrite(CmdRegionWrite, a, data); err != nil {
			return nil, err
		}
		out := ss.scratch(RegionAccessSize)
		a.Put(out)
		return out, nil
	case CmdRegionWriteMulti:
		ws, err := ParseWriteMulti(p, ss.multi)
		ss.multi = ws
		if err != nil {
			return nil, err
		}
		for _, w := range ws {
			if err := ss.regionWrite(CmdRegionWriteMulti, w.RegionAccess, w.Data[:w.Count]); err != nil {
				return nil, err
			}
		}
		out := ss.scratch(8)
		le.PutUint64(out, uint64(len(ws)))
		return out, nil
	case CmdDeviceReset:
		if len(p) != 0 {
			return nil, perr(CmdDeviceReset, ErrTruncated, "%d payload bytes", len(p))
		}
		ss.s.reset()
		return nil, nil
	case CmdDeviceFeature:
		f, err := ParseDeviceFeature(p)
		if err != nil {
			return nil, err
		}
		return ss.s.deviceFeature(f)
	case CmdMigDataRead:
		return ss.s.migDataRead(p)
	case CmdMigDataWrite:
		return nil, ss.s.migDataWrite(p)
	}
	return nil, perr(h.Command, ErrCommand, "command %d", uint16(h.Command))
}

// scratch returns a reply payload buffer of n bytes (reused: reply copies
// it before the next message).
func (ss *session) scratch(n int) []byte {
	if cap(ss.multiOut) < n {
		ss.multiOut = make([]byte, n)
	}
	return ss.multiOut[:n]
}

func (ss *session) handleVersion(p []byte) ([]byte, error) {
	if ss.version {
		return nil, fatal{perr(CmdVersion, ErrVersion, "second VERSION")}
	}
	v, err := ParseVersion(p)
	if err != nil {
		return nil, fatal{err}
	}
	if v.Major != VersionMajor {
		return nil, fatal{perr(CmdVersion, ErrVersion, "major version %d (this server speaks %d)", v.Major, VersionMajor)}
	}
	ss.version = true
	fds, xfer, maps, pg := uint64(MaxMsgFds), uint64(MaxDataXfer), uint64(ss.s.maxWindows), uint64(4096)
	reply := Version{Major: VersionMajor, Minor: min(v.Minor, VersionMinor), Caps: Capabilities{
		MaxMsgFds: &fds, MaxDataXferSize: &xfer, MaxDMAMaps: &maps, PgSizes: &pg,
	}}
	return reply.Marshal(), nil
}

func (ss *session) handleDMAMap(p []byte) error {
	m, err := ParseDMAMap(p)
	if err != nil {
		return err
	}
	if len(ss.fds) > 1 {
		return perr(CmdDMAMap, ErrFds, "%d descriptors", len(ss.fds))
	}
	s := ss.s
	fd := -1
	if len(ss.fds) == 1 {
		fd = ss.takeFds()[0]
	}
	// fd and mem are this session's until the table keeps them.
	var mem []byte
	kept := false
	defer func() {
		if kept {
			return
		}
		if mem != nil {
			_ = unix.Munmap(mem)
		}
		if fd >= 0 {
			_ = unix.Close(fd)
		}
	}()
	// Checked before anything is mapped, and again under mu when the
	// window goes in (only this session maps, but unmaps and reaps change
	// the table in between).
	var id fileID
	identified := false
	check := func() error {
		if s.dma.overlaps(m.Address, m.Address+m.Size-1) {
			return perr(CmdDMAMap, ErrExists, "%#x+%#x", m.Address, m.Size)
		}
		if n := len(s.dma.maps); n >= s.maxWindows {
			return &Error{Cmd: CmdDMAMap, Errno: unix.ENOSPC, Err: fmt.Errorf("%w: %d windows (max_dma_maps %d)", ErrDMALimit, n, s.maxWindows)}
		}
		if fd < 0 {
			return nil
		}
		if used := s.dma.reserved(); m.Size > s.budget || used > s.budget-m.Size {
			return &Error{Cmd: CmdDMAMap, Errno: unix.ENOMEM, Err: fmt.Errorf("%w: %#x bytes with %#x of %#x reserved", ErrDMALimit, m.Size, used, s.budget)}
		}
		if n := len(s.dma.files); identified && n >= s.maxFiles && !s.dma.hasFile(id) {
			return &Error{Cmd: CmdDMAMap, Errno: unix.ENOSPC, Err: fmt.Errorf("%w: a file beyond the %d the windows map (MaxDMAFiles)", ErrDMALimit, n)}
		}
		return nil
	}
	locked := func(f func() error) error {
		s.mu.Lock()
		defer s.mu.Unlock()
		return f()
	}
	if err := locked(check); err != nil {
		return err
	}
	var sealed bool
	if fd >= 0 {
		if fd, id, err = identify(m, fd); err != nil {
			return err
		}
		identified = true
		if err := locked(check); err != nil { // the file limit
			return err
		}
		if mem, sealed, err = mapFile(m, fd); err != nil {
			return err
		}
	}
	mp := &mapping{addr: m.Address, size: m.Size, flags: m.Flags, mem: mem, fdOffset: m.Offset}
	if mp.mem != nil && s.dev.DataPathActive() {
		// A backing device took the memory table when its data path
		// started (vhost-user, vhost-vdpa, vhost-net), and the shadow
		// relay placed its rings above the memory there was: a window
		// mapped while it runs would reach neither. The data path stops
		// for the map and restarts with the new table, as for an unmap.
		// One that cannot be stopped (ERROR) keeps running without it.
		s.pause()
	}
	defer s.resume()
	if err := locked(func() error {
		if err := check(); err != nil {
			return err
		}
		s.dma.insert(mp, id, fd, sealed)
		return nil
	}); err != nil {
		return err
	}
	kept = true
	if mp.mem != nil {
		// Enter the window into guest memory now (it would otherwise appear
		// on first use), so a backing device that takes the whole memory
		// table at DRIVER_OK (vhost-user, vhost-vdpa) sees every window.
		_, _ = s.mem.Slice(toGuest(m.Address), 1)
	}
	return nil
}

func (ss *session) handleDMAUnmap(p []byte) ([]byte, error) {
	u, err := ParseDMAUnmap(p)
	if err != nil {
		return nil, err
	}
	s := ss.s
	if u.Flags&UnmapAll != 0 {
		if err := s.dropWindows(windowSel{all: true}, dropUnmap); err != nil {
			return nil, err
		}
		return u.Marshal(), nil
	}
	sel := windowSel{addr: u.Address, size: u.Size}
	s.mu.Lock()
	i, j := s.dma.selected(sel)
	s.mu.Unlock()
	if i == j {
		return nil, perr(CmdDMAUnmap, ErrNotMapped, "%#x+%#x", u.Address, u.Size)
	}
	err = s.dropWindows(sel, dropUnmap)
	s.resume()
	if err != nil {
		return nil, err
	}
	u.Argsz = DMAUnmapSize
	return u.Marshal(), nil
}

func (ss *session) handleRegionInfo(p []byte) ([]byte, error) {
	r, err := ParseRegionInfo(p)
	if err != nil {
		return nil, err
	}
	if r.Index >= NumPCIRegions {
		return nil, perr(CmdDeviceGetRegionInfo, ErrIndex, "region %d", r.Index)
	}
	out := RegionInfo{Index: r.Index}
	if size := ss.s.regionSize(r.Index); size > 0 {
		out.Size = size
		out.Flags = RegionFlagRead | RegionFlagWrite
	}
	return out.Marshal(r.Argsz), nil
}

// regionSize is the size of vfio region idx: the config space or a BAR of
// mdev.Layout (the upper half of a 64-bit BAR is empty).
func (s *Server) regionSize(idx uint32) uint64 {
	if idx >= NumPCIRegions {
		return 0
	}
	return s.regionSizes[idx]
}

func (ss *session) handleIRQInfo(p []byte) ([]byte, error) {
	q, err := ParseIRQInfo(p)
	if err != nil {
		return nil, err
	}
	if q.Index >= NumIRQs {
		return nil, perr(CmdDeviceGetIRQInfo, ErrIndex, "irq index %d", q.Index)
	}
	out := IRQInfo{Argsz: IRQInfoSz, Index: q.Index}
	switch q.Index {
	case IRQIntx:
		out.Flags, out.Count = IRQInfoEventfd|IRQInfoMaskable|IRQInfoAutomasked, 1
	case IRQMSIX:
		out.Flags, out.Count = IRQInfoEventfd|IRQInfoNoResize, uint32(len(ss.s.irq.msix))
	default:
		out.Flags = IRQInfoEventfd
	}
	return out.Marshal(), nil
}

func (s *Server) irqCount(index uint32) uint32 {
	switch index {
	case IRQIntx:
		return 1
	case IRQMSIX:
		return uint32(len(s.irq.msix))
	}
	return 0
}

func (ss *session) handleSetIRQs(p []byte) error {
	set, err := ParseIRQSet(p, len(ss.fds))
	if err != nil {
		return err
	}
	s := ss.s
	if set.Index >= NumIRQs {
		return perr(CmdDeviceSetIRQs, ErrIndex, "irq index %d", set.Index)
	}
	action, data := set.Flags&irqSetActionMask, set.Flags&irqSetDataMask
	n := s.irqCount(set.Index)
	if action == IRQSetActionTrigger && data == IRQSetDataNone && set.Count == 0 {
		if set.Start != 0 {
			return perr(CmdDeviceSetIRQs, ErrRange, "disable with start %d", set.Start)
		}
		return s.setIRQFds(set.Index, 0, make([]*vdpa.EventFD, n))
	}
	if set.Count == 0 || set.Start+set.Count > n {
		return perr(CmdDeviceSetIRQs, ErrRange, "index %d start %d count %d (the device has %d)", set.Index, set.Start, set.Count, n)
	}
	switch action {
	case IRQSetActionTrigger:
		if data == IRQSetDataEventfd {
			fds := ss.takeFds()
			efds := make([]*vdpa.EventFD, set.Count)
			for i, fd := range fds {
				e, err := vdpa.EventFDFromFd(fd)
				if err != nil {
					closeAll(fds[i:])
					closeFDs(efds)
					return perr(CmdDeviceSetIRQs, ErrFds, "descriptor %d: %v", i, err)
				}
				efds[i] = e
			}
			return s.setIRQFds(set.Index, set.Start, efds)
		}
		// The client triggers the interrupts itself.
		for i := uint32(0); i < set.Count; i++ {
			if data == IRQSetDataBool && set.Bools[i] == 0 {
				continue
			}
			s.trigger(set.Index, set.Start+i)
		}
		return nil
	case IRQSetActionMask, IRQSetActionUnmask:
		if set.Index != IRQIntx {
			return &Error{Cmd: CmdDeviceSetIRQs, Errno: unix.EINVAL, Err: fmt.Errorf("%w: irq index %d is not maskable", ErrFlags, set.Index)}
		}
		if data == IRQSetDataEventfd {
			return &Error{Cmd: CmdDeviceSetIRQs, Errno: unix.EINVAL, Err: fmt.Errorf("%w: mask/unmask eventfds are not supported", ErrFlags)}
		}
		if data == IRQSetDataBool && set.Bools[0] == 0 {
			return nil
		}
		if action == IRQSetActionMask {
			s.irqMu.Lock()
			s.irq.intxMasked = true
			s.irqMu.Unlock()
			return nil
		}
		s.unmaskINTx()
		return nil
	}
	return perr(CmdDeviceSetIRQs, ErrFlags, "flags %#x", set.Flags)
}

// setIRQFds installs the client's eventfds for index at start (nil entries
// de-assign) and takes ownership of them. Enabling one index disables the
// others, as VFIO does. An MSI-X vector that cannot be re-targeted ends
// the installation: its eventfd and those after it are closed and the
// error (ErrDevice) is returned; the vectors before it stay installed.
func (s *Server) setIRQFds(index, start uint32, efds []*vdpa.EventFD) error {
	var old []*vdpa.EventFD
	assign := false
	for _, e := range efds {
		assign = assign || e != nil
	}
	rewire := false
	s.irqMu.Lock()
	if s.irq.closed {
		// The server closed while a session was still ending (Close does
		// not wait for ServeConn): take the eventfds and install nothing.
		s.irqMu.Unlock()
		closeFDs(efds)
		return nil
	}
	var failed error
	switch index {
	case IRQMSIX:
		for i, e := range efds {
			v := int(start) + i
			if e == nil && !s.irq.assigned[v] {
				continue
			}
			if err := s.retarget(v, e); err != nil {
				s.log.Warn("vfio-user: MSI-X vector", "vector", v, "err", err)
				failed = &Error{Cmd: CmdDeviceSetIRQs, Errno: unix.EIO, Err: fmt.Errorf("%w: MSI-X vector %d: %w", ErrDevice, v, err)}
				old = append(old, efds[i:]...) // not installed: closed below
				assign = assign && slices.ContainsFunc(efds[:i], func(e *vdpa.EventFD) bool { return e != nil })
				break
			}
			old = append(old, e)
			s.irq.assigned[v] = e != nil
			rewire = true
		}
		if assign && s.irq.intx != nil {
			old = append(old, s.irq.intx)
			s.irq.intx = nil
		}
	case IRQIntx:
		old = append(old, s.irq.intx)
		s.irq.intx = efds[0]
		s.irq.intxMasked, s.irq.intxPending = false, false
	default:
		old = efds // no interrupts of this kind: nothing to install
	}
	s.irqMu.Unlock()
	if rewire && !s.inProcess {
		if err := s.dev.VectorsChanged(); err != nil {
			s.log.Warn("vfio-user: re-wiring interrupts failed", "err", err)
		}
	}
	closeFDs(old)
	if index == IRQIntx && s.dev.ISRPending() != 0 {
		s.assertINTx()
	}
	return failed
}

// retarget points vector v's stable eventfd at e's file, or at a fresh
// private eventfd when e is nil. Caller holds irqMu.
func (s *Server) retarget(v int, e *vdpa.EventFD) error {
	src := e
	if src == nil {
		fresh, err := vdpa.NewEventFD()
		if err != nil {
			return err
		}
		defer fresh.Close()
		src = fresh
	}
	return unix.Dup3(src.Fd(), s.irq.msix[v].Fd(), unix.O_CLOEXEC)
}

// trigger raises sub-index i of index as the client asked.
func (s *Server) trigger(index, i uint32) {
	switch index {
	case IRQIntx:
		s.dev.RaiseISR(mdev.ISRQueue)
		s.assertINTx()
	case IRQMSIX:
		s.irqMu.Lock()
		if s.irq.assigned[i] {
			_ = s.irq.msix[i].Signal()
		}
		s.irqMu.Unlock()
	}
}

// unmaskINTx unmasks the line; an interrupt that arrived while it was
// masked, or an ISR the guest has not read yet, asserts it again.
func (s *Server) unmaskINTx() {
	s.irqMu.Lock()
	s.irq.intxMasked = false
	pending := s.irq.intxPending
	s.irq.intxPending = false
	s.irqMu.Unlock()
	if pending || s.dev.ISRPending() != 0 {
		s.assertINTx()
	}
}

// reset is DEVICE_RESET: a virtio reset of the device and the INTx line;
// it also returns the migration state machine to RUNNING (the only way out
// of ERROR).
func (s *Server) reset() {
	s.migMu.Lock()
	if s.dev.MigrationState() != mdev.MigRunning {
		s.dev.ResetMigration()
	} else {
		_ = s.dev.Write(mdev.RegionCommon, mdev.OffDeviceStatus, 1, 0)
	}
	s.mig.out, s.mig.outPos, s.mig.in = nil, 0, nil
	s.mig.paused = false
	s.migMu.Unlock()
	s.irqMu.Lock()
	s.irq.intxMasked, s.irq.intxPending = false, false
	s.irqMu.Unlock()
}

// access maps a vfio region access to the device: BAR index or config.
func (s *Server) access(region uint32, off uint64, size int, write bool, v uint64) (uint64, error) {
	var err error
	switch {
	case region == RegionConfig:
		if write {
			err = s.dev.Write(mdev.RegionPCIConfig, off, size, v)
		} else {
			v, err = s.dev.Read(mdev.RegionPCIConfig, off, size)
		}
	default:
		if write {
			err = s.dev.WriteBAR(int(region), off, size, v)
		} else {
			v, err = s.dev.ReadBAR(int(region), off, size)
		}
	}
	return v, err
}

// chunks splits [off, off+n) into naturally aligned accesses of at most
// max bytes and calls fn for each.
func chunks(off uint64, n int, maxSize int, fn func(off uint64, pos, size int) error) error {
	pos := 0
	for pos < n {
		size := maxSize
		for size > 1 && (off%uint64(size) != 0 || size > n-pos) {
			size >>= 1
		}
		if err := fn(off, pos, size); err != nil {
			return err
		}
		off += uint64(size)
		pos += size
	}
	return nil
}

// checkRegion validates a region access against the region's size.
func (s *Server) checkRegion(cmd Command, a RegionAccess) error {
	if a.Region >= NumPCIRegions {
		return perr(cmd, ErrIndex, "region %d", a.Region)
	}
	size := s.regionSize(a.Region)
	if a.Count == 0 || a.Offset >= size || uint64(a.Count) > size-a.Offset {
		return perr(cmd, ErrRange, "region %d offset %#x count %d (size %#x)", a.Region, a.Offset, a.Count, size)
	}
	return nil
}

func deviceErr(cmd Command, a RegionAccess, err error) error {
	errno := unix.EINVAL
	if errors.Is(err, mdev.ErrBacking) {
		errno = unix.EIO
	}
	return &Error{Cmd: cmd, Errno: errno, Err: fmt.Errorf("%w: region %d offset %#x: %w", ErrDevice, a.Region, a.Offset, err)}
}

// maxAccess is the widest single device access: 4 bytes in config space,
// 8 in the BARs.
func maxAccess(region uint32) int {
	if region == RegionConfig {
		return 4
	}
	return 8
}

func (ss *session) regionWrite(cmd Command, a RegionAccess, data []byte) error {
	s := ss.s
	if err := s.checkRegion(cmd, a); err != nil {
		return err
	}
	// BAR accesses keep the width the guest used (the device checks it);
	// only the config space is written piecewise.
	if a.Region != RegionConfig {
		n := len(data)
		if n != 1 && n != 2 && n != 4 && n != 8 {
			return perr(cmd, ErrRange, "%d-byte BAR write", n)
		}
		if _, err := s.access(a.Region, a.Offset, n, true, readN(data)); err != nil {
			return deviceErr(cmd, a, err)
		}
		return nil
	}
	return chunks(a.Offset, len(data), maxAccess(a.Region), func(off uint64, pos, size int) error {
		if _, err := s.access(a.Region, off, size, true, readN(data[pos:pos+size])); err != nil {
			return deviceErr(cmd, a, err)
		}
		return nil
	})
}

func (ss *session) handleRegionRead(p []byte) ([]byte, error) {
	a, _, err := ParseRegionAccess(CmdRegionRead, p, false)
	if err != nil {
		return nil, err
	}
	s := ss.s
	if len(p) != RegionAccessSize {
		return nil, perr(CmdRegionRead, ErrTruncated, "%d-byte request", len(p))
	}
	if err := s.checkRegion(CmdRegionRead, a); err != nil {
		return nil, err
	}
	out := ss.scratch(RegionAccessSize + int(a.Count))
	a.Put(out)
	data := out[RegionAccessSize:]
	if a.Region != RegionConfig {
		n := int(a.Count)
		if n != 1 && n != 2 && n != 4 && n != 8 {
			return nil, perr(CmdRegionRead, ErrRange, "%d-byte BAR read", n)
		}
		v, err := s.access(a.Region, a.Offset, n, false, 0)
		if err != nil {
			return nil, deviceErr(CmdRegionRead, a, err)
		}
		putN(data, v)
		return out, nil
	}
	err = chunks(a.Offset, int(a.Count), maxAccess(a.Region), func(off uint64, pos, size int) error {
		v, err := s.access(a.Region, off, size, false, 0)
		if err != nil {
			return deviceErr(CmdRegionRead, a, err)
		}
		putN(data[pos:pos+size], v)
		return nil
	})
	return out, err
}

func readN(b []byte) uint64 {
	var v uint64
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func putN(b []byte, v uint64) {
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
}

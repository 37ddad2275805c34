package vfiouser

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/internal/ctxclose"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Options configure New. A nil *Options means defaults.
type Options struct {
	// Device configures the mediated device. Memory, Vector and INTx are
	// owned by the server (guest memory is what the client DMA-maps,
	// interrupts are the eventfds it registers) and must be left zero.
	Device mdev.Options
	// Logger receives session events and rejected client input (default:
	// discard).
	Logger *slog.Logger
	// MaxDMAWindows caps the DMA windows mapped at once, with or without a
	// descriptor; the server announces it as max_dma_maps, and a DMA_MAP
	// beyond it is refused with ENOSPC (the errno of the kernel's VFIO
	// type1 driver when its dma_entry_limit is reached). 0 means
	// DefaultMaxDMAWindows; at most 65535 (the protocol's default).
	MaxDMAWindows int
	// DMABudget caps the bytes of address space the DMA windows with
	// descriptors take: the windows mapped and the address ranges of
	// windows unmapped but still reserved because the data path could not
	// be stopped (see DMA_UNMAP in the package documentation). A DMA_MAP
	// that would go beyond it is refused with ENOMEM (the errno of VFIO
	// type1 beyond the locked-memory limit) before anything is mapped. 0
	// means DefaultDMABudget().
	DMABudget uint64
	// MaxDMAFiles caps the distinct files the DMA windows with descriptors
	// map. The server holds one descriptor of each file, shared by every
	// window mapping it, so this bounds the descriptors a client makes the
	// process hold (each window holding its own, a client could fill
	// RLIMIT_NOFILE, and every other part of the process would then fail to
	// open anything). A DMA_MAP of a file beyond it is refused with ENOSPC
	// before anything is mapped; windows of a file already mapped are not.
	// 0 means DefaultMaxDMAFiles; at most 65535.
	MaxDMAFiles int
}

// DefaultMaxDMAFiles is the default Options.MaxDMAFiles. QEMU maps guest
// memory from one file per memory backend (a NUMA node's RAM, a DIMM, a
// virtio-mem device's memory); a q35 machine has at most 256 DIMM slots.
// Memory without a file (ROMs of a guest whose RAM is shared) is mapped
// without a descriptor and reached through DMA_READ/DMA_WRITE.
const DefaultMaxDMAFiles = 512

// DefaultMaxDMAWindows is the default Options.MaxDMAWindows. QEMU maps one
// window per RAM section of guest memory (RAM below and above 4 GiB, the
// low 640 KiB, ROMs and option ROMs): tens for a q35 guest, 9 for the
// 512 MiB guest of this package's QEMU tests. Memory plugged through
// virtio-mem is mapped one block at a time so that it can be unplugged
// block by block (2 MiB blocks by default on x86): 32768 windows are
// 64 GiB of plugged memory at that size, more with larger blocks. The
// kernel's VFIO type1 driver allows 65535 per container; here every
// window is a mapping of this process, which has vm.max_map_count (65530
// by default) for everything it maps, so the default leaves half of that
// to the rest of the process. A VMM plugging more small blocks sets
// MaxDMAWindows up to 65535. The limit is per server: several servers in
// one process share vm.max_map_count (and RLIMIT_NOFILE: each file the
// windows map keeps a descriptor, see MaxDMAFiles), so an embedder that runs more
// than one gives each a share, or hostile clients together can exhaust
// the mappings the Go runtime itself needs.
const DefaultMaxDMAWindows = 32768

// maxDMABudget bounds DefaultDMABudget: a quarter of the 128 TiB user
// address space of x86-64 (4-level paging), which leaves the rest to the
// Go runtime, other servers and whatever else the process maps. Address
// space, not memory, is what the windows consume (a client's memfd may be
// sparse), and the Go runtime aborts when it can no longer reserve any.
// On 32-bit it is a quarter of the 4 GiB address space, 1 GiB.
const maxDMABudget = min(32<<40, math.MaxInt/2+1)

// DefaultDMABudget is the default Options.DMABudget: four times this
// machine's physical memory, at most 32 TiB (a quarter of x86-64's 128 TiB
// user address space; 32 TiB if the memory size is unknown), and on 32-bit
// at most 1 GiB. A guest's
// memory is a file the client shares from this machine; a guest bigger
// than the machine is rare and four times it is not a real configuration,
// while the windows of a normal guest (its RAM once, plus small ROMs) fit
// with room for remapping while earlier windows are still reserved.
func DefaultDMABudget() uint64 {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil || si.Totalram == 0 {
		return maxDMABudget
	}
	unit := uint64(si.Unit)
	if unit == 0 {
		unit = 1
	}
	ram := uint64(si.Totalram)
	if ram > maxDMABudget/4/unit {
		return maxDMABudget
	}
	return 4 * ram * unit
}

// Server serves one mdev.Device to vfio-user clients, one session at a
// time.
type Server struct {
	dev  *mdev.Device
	mem  *vring.Memory
	log  *slog.Logger
	intx *vdpa.EventFD // given to the device as Options.INTx; relayed to the client's INTx

	mu  sync.Mutex // guards dma
	dma dmaTable
	// maxWindows, maxFiles and budget are Options.MaxDMAWindows,
	// MaxDMAFiles and DMABudget, defaults applied.
	maxWindows, maxFiles int
	budget               uint64
	// retired is len(dma.graveyard), read without mu after every message.
	retired atomic.Int32

	irqMu sync.Mutex // guards irq; never held across a call into dev
	irq   irqState

	migMu sync.Mutex // guards mig; taken before mu
	mig   migSession

	sessMu sync.Mutex
	conns  map[*net.UnixConn]struct{}
	closed bool

	// inProcess: the backing device signals interrupts through our
	// descriptors (vdpa.Local), so dup3 onto them re-targets it; other
	// backings took their own reference and are re-wired.
	inProcess bool
	// regionSizes is the size of each vfio region (0: empty).
	regionSizes [NumPCIRegions]uint64

	stop    context.CancelFunc
	relayWG sync.WaitGroup
	// stats is under sessMu, except IntxTriggers, which stays zero there:
	// the INTx relay counts under irqMu, in intxTriggers.
	stats        Stats
	intxTriggers uint64
}

// Stats counts what the server did.
type Stats struct {
	Messages, Errors, Sessions uint64
	IntxTriggers               uint64
}

// irqState is the interrupt configuration the client set.
type irqState struct {
	// msix holds one stable eventfd per MSI-X vector, the one the backing
	// device signals. The client's trigger eventfd for the vector is
	// dup3'ed onto it, so the backing device signals the client directly
	// and a change of eventfd (QEMU re-registers them while the data path
	// runs) needs no re-wiring; a de-assigned vector gets a private
	// eventfd nobody waits on.
	msix        []*vdpa.EventFD
	assigned    []bool
	intx        *vdpa.EventFD // the client's INTx trigger eventfd
	intxMasked  bool
	intxPending bool
	// closed: Close closed msix. A session still ending installs nothing
	// after it (its eventfds are closed instead): a dup3 onto a closed
	// stable eventfd's number could land on whatever file reused it.
	closed bool
}

// New creates a mediated device in front of backing and a server for it.
// The server does not take ownership of backing.
func New(backing vdpa.Device, opts *Options) (*Server, error) {
	s := &Server{conns: map[*net.UnixConn]struct{}{}}
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Device.Memory != nil || o.Device.Vector != nil || o.Device.INTx != nil {
		return nil, fmt.Errorf("%w: Device.Memory, Vector and INTx belong to the server", mdev.ErrInvalidOptions)
	}
	if o.MaxDMAWindows < 0 || o.MaxDMAWindows > 65535 {
		return nil, fmt.Errorf("%w: MaxDMAWindows %d (0..65535)", mdev.ErrInvalidOptions, o.MaxDMAWindows)
	}
	if o.MaxDMAFiles < 0 || o.MaxDMAFiles > 65535 {
		return nil, fmt.Errorf("%w: MaxDMAFiles %d (0..65535)", mdev.ErrInvalidOptions, o.MaxDMAFiles)
	}
	s.maxWindows, s.maxFiles, s.budget = o.MaxDMAWindows, o.MaxDMAFiles, o.DMABudget
	if s.maxWindows == 0 {
		s.maxWindows = DefaultMaxDMAWindows
	}
	if s.maxFiles == 0 {
		s.maxFiles = DefaultMaxDMAFiles
	}
	if s.budget == 0 {
		s.budget = DefaultDMABudget()
	}
	s.log = o.Logger
	if s.log == nil {
		s.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	mem, err := vring.NewMemoryWithOptions(&vring.MemoryOptions{Fault: s.fault})
	if err != nil {
		return nil, err
	}
	s.mem = mem
	if s.intx, err = vdpa.NewEventFD(); err != nil {
		return nil, err
	}
	do := o.Device
	do.Memory, do.Vector, do.INTx = mem, s.vector, s.intx
	if s.dev, err = mdev.NewDevice(backing, &do); err != nil {
		_ = s.intx.Close()
		return nil, err
	}
	n := s.dev.Layout().MSIXVectors
	s.irq.msix = make([]*vdpa.EventFD, n)
	s.irq.assigned = make([]bool, n)
	for i := range s.irq.msix {
		if s.irq.msix[i], err = vdpa.NewEventFD(); err != nil {
			closeFDs(s.irq.msix)
			_ = s.dev.Close()
			_ = s.intx.Close()
			return nil, err
		}
	}
	_, s.inProcess = backing.(*vdpa.Local)
	s.regionSizes[RegionConfig] = 256
	for _, b := range s.dev.Layout().BARs {
		s.regionSizes[b.Index] = b.Size
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	s.relayWG.Add(1)
	go s.relayINTx(ctx)
	return s, nil
}

// Device returns the mediated device the server serves.
func (s *Server) Device() *mdev.Device { return s.dev }

// Memory returns the guest memory: the windows the client DMA-mapped with
// descriptors.
func (s *Server) Memory() *vring.Memory { return s.mem }

// vector is mdev's Options.Vector: the client's MSI-X eventfd.
func (s *Server) vector(v uint16) *vdpa.EventFD {
	s.irqMu.Lock()
	defer s.irqMu.Unlock()
	if int(v) < len(s.irq.msix) {
		return s.irq.msix[v]
	}
	return nil
}

// relayINTx turns the device's line-interrupt eventfd into the client's
// INTx trigger, honouring the automask.
func (s *Server) relayINTx(ctx context.Context) {
	defer s.relayWG.Done()
	for {
		if _, err := s.intx.Wait(ctx); err != nil {
			return
		}
		s.dev.RaiseISR(mdev.ISRQueue)
		s.assertINTx()
	}
}

// assertINTx signals the client's INTx eventfd unless the line is masked
// (then it stays pending until an unmask).
func (s *Server) assertINTx() {
	s.irqMu.Lock()
	fd := s.irq.intx
	if fd == nil {
		s.irqMu.Unlock()
		return
	}
	if s.irq.intxMasked {
		s.irq.intxPending = true
		s.irqMu.Unlock()
		return
	}
	s.irq.intxMasked = true // VFIO_IRQ_INFO_AUTOMASKED
	s.intxTriggers++
	_ = fd.Signal()
	s.irqMu.Unlock()
}

// fault is the guest memory's translation-miss handler: it returns the
// DMA window holding addr.
func (s *Server) fault(addr vring.GuestAddr, n uint64) (*vring.Region, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.dma.find(uint64(addr))
	if m == nil {
		return nil, fmt.Errorf("%w: %v", ErrNotMapped, addr)
	}
	if m.mem == nil {
		return nil, fmt.Errorf("%w: %v is in a window without a descriptor", ErrNotMapped, addr)
	}
	return vring.NewRegion(toGuest(m.addr), m.mem, &vring.RegionOptions{
		Fd: m.fd(), FdOffset: m.fdOffset, Sealed: m.file != nil && m.file.sealed, ReadOnly: m.flags&DMAWritable == 0})
}

// live reports whether the backing device may be touching guest memory.
func (s *Server) live() bool {
	return s.dev.Status()&virtio.StatusDriverOK != 0
}

// Close ends every session, closes the device and releases guest memory.
// The backing device stays open.
func (s *Server) Close() error {
	s.sessMu.Lock()
	if s.closed {
		s.sessMu.Unlock()
		return nil
	}
	s.closed = true
	for c := range s.conns {
		_ = c.Close()
	}
	s.sessMu.Unlock()
	s.stop()
	_ = s.stopLogging()
	err := s.dev.Close()
	_ = s.intx.Close()
	s.relayWG.Wait()
	// The device is closed: its data path no longer touches guest memory.
	s.dropAll(dropClosing)
	// The client's eventfds go with the stable ones, in one step under
	// irqMu: a session still ending (Close does not wait for ServeConn)
	// finds the state closed and installs nothing (setIRQFds), so none
	// lands between a release and the close.
	s.irqMu.Lock()
	s.irq.closed = true
	closeFDs(s.irq.msix)
	if s.irq.intx != nil {
		_ = s.irq.intx.Close()
		s.irq.intx = nil
	}
	clear(s.irq.assigned)
	s.irqMu.Unlock()
	return err
}

// Serve accepts connections on ln and serves them one at a time until ctx
// is cancelled, the listener fails or the server is closed.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	// ctx's end closes ln; Serve returns only once that close is done.
	release := ctxclose.OnDone(ctx, ln.Close)
	defer release()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		if err := s.ServeConn(ctx, c); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, ErrClosed) {
			s.log.Info("vfio-user session ended", "err", err)
		}
	}
}

// ServeConn serves one client connection until it closes, breaks the
// protocol beyond recovery or ctx is cancelled. On return every DMA window
// is unmapped and every interrupt eventfd of the client is closed; the
// device keeps its state (vfio-user.rst "Client Disconnection"; a running
// data path stopped to release guest memory stays stopped, in STOP, until
// the next client restarts or resets it), unless its
// data path could not be stopped otherwise to release guest memory (ERROR
// after a failed stop): it is reset then. It closes conn.
func (s *Server) ServeConn(ctx context.Context, conn *net.UnixConn) error {
	s.sessMu.Lock()
	if s.closed {
		s.sessMu.Unlock()
		_ = conn.Close()
		return ErrClosed
	}
	s.conns[conn] = struct{}{}
	s.stats.Sessions++
	s.sessMu.Unlock()
	release := ctxclose.OnDone(ctx, conn.Close)
	defer func() {
		_ = conn.Close()
		release() // and a close ctx's end started has finished
		s.migMu.Lock()
		running := s.clientState() == mdev.MigRunning
		s.migMu.Unlock()
		if running && s.live() {
			// QEMU 11.1 live-migrates a vfio-user device without asking
			// for its state: the destination's device starts fresh and
			// the guest's NIC stalls there. Make that visible.
			s.log.Warn("vfio-user: client disconnected while the device was running; if the VM was migrated without device state (QEMU 11.1 does that), the destination device is not this one's state")
		}
		s.sessMu.Lock()
		delete(s.conns, conn)
		s.sessMu.Unlock()
		// The dirty log is the client's: only its session reads it
		// (DMA_LOGGING_REPORT). Left on, it would keep the device in
		// dirty tracking (the shadow relay, for a backing device that
		// cannot log) for nobody, and the next client's
		// DMA_LOGGING_START would find it busy.
		_ = s.stopLogging()
		s.dropAll(dropSession)
		s.dropIRQs()
		// A pause for the memory this client took away ends with it:
		// resume would restart the rings at their old positions in the
		// next client's memory. The device stays in STOP, which the
		// next client sees; it restarts it (-> RUNNING) or resets it.
		s.migMu.Lock()
		s.mig.paused = false
		s.migMu.Unlock()
	}()
	ss := &session{s: s, conn: conn}
	err := ss.run()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// maxRetired bounds the windows retired while the data path could not be
// stopped (dmaTable.retire): a DMA_UNMAP that would retire more resets the
// device instead, which stops the data path. The unmap is not refused:
// QEMU only logs a failed unmap, and its next map of an overlapping range
// then fails with EEXIST, which it treats as fatal. Only a backing device
// that refuses its reset too gets more windows retired.
const maxRetired = 64

// How dropWindows may release windows under a data path it cannot stop.
type dropMode int

const (
	// dropUnmap: DMA_UNMAP. Windows are retired, within maxRetired;
	// beyond it, or when the server's own stop failed, the device is
	// reset.
	dropUnmap dropMode = iota
	// dropSession: the client disconnected. The device is reset if its
	// data path cannot be stopped otherwise, so that nothing is deferred.
	dropSession
	// dropClosing: Close, after the device was closed (its data path
	// stopped).
	dropClosing
)

// dropAll removes every DMA window.
func (s *Server) dropAll(mode dropMode) {
	_ = s.dropWindows(windowSel{all: true}, mode)
}

// dropWindows removes the windows sel selects from the DMA table and
// releases their mappings (and a file's descriptor with its last window)
// before it returns, as DMA_UNMAP requires. A data path that may touch
// them is stopped first (pause); one that cannot be stopped through the
// migration state machine (live in ERROR, or a backing device that refused
// its reset) gets them retired (dmaTable.retire), within maxRetired;
// beyond it, when the stop failed, and when the client left, the device is
// reset to stop its data path.
func (s *Server) dropWindows(sel windowSel, mode dropMode) error {
	s.sessMu.Lock()
	if s.closed {
		// A session still ending after Close (which does not wait for
		// it): the device is closed, its data path stopped.
		mode = dropClosing
	}
	s.sessMu.Unlock()
	s.mu.Lock()
	mapped := 0
	i, j := s.dma.selected(sel)
	for _, m := range s.dma.maps[i:j] {
		if m.mem != nil {
			mapped++
		}
	}
	s.mu.Unlock()
	stopped, failed := true, false
	switch {
	case mode == dropClosing:
	case mapped > 0:
		stopped, failed = s.pause()
	default:
		// Nothing mapped goes (a window without a descriptor, UNMAP_ALL
		// on an empty table), but the retired ranges are unmapped below
		// when stopped: only if the data path no longer runs.
		stopped = !s.dev.DataPathActive()
	}
	full := int(s.retired.Load())+mapped > maxRetired
	if !stopped && (mode == dropSession || failed || full) {
		s.log.Warn("vfio-user: the data path cannot be stopped (migration state ERROR, or a backing reset pending): resetting the device to release guest memory",
			"stop_failed", failed, "retired", s.retired.Load())
		s.reset()
		stopped = !s.dev.DataPathActive()
		if !stopped && full {
			s.log.Warn("vfio-user: the backing device refuses its reset: unmapped windows stay reserved beyond the limit", "retired", s.retired.Load())
		}
	}
	s.mu.Lock()
	gone := s.dma.remove(sel)
	empty := len(s.dma.maps) == 0
	s.mu.Unlock()
	if empty {
		_ = s.mem.RemoveRange(0, ^vring.GuestAddr(0))
	} else {
		for _, m := range gone {
			if m.mem != nil {
				_ = s.mem.RemoveRange(toGuest(m.addr), toGuest(m.last()))
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range gone {
		if stopped {
			s.dma.release(m)
		} else {
			s.dma.retire(m)
		}
	}
	if stopped {
		s.reapLocked()
	} else {
		s.retired.Store(int32(len(s.dma.graveyard)))
	}
	return nil
}

// reap unmaps the retired windows' address ranges once the data path has
// stopped. The session calls it after every message.
func (s *Server) reap() {
	if s.retired.Load() == 0 || s.dev.DataPathActive() {
		return
	}
	s.mu.Lock()
	s.reapLocked()
	s.mu.Unlock()
}

// reapLocked unmaps the retired ranges; the caller holds mu and knows the
// data path stopped since they were retired (when it goes live again, it
// is given the memory table of the time, which no longer has them).
func (s *Server) reapLocked() {
	s.dma.reap()
	s.retired.Store(0)
}

// runningState reports whether the data path runs in migration state st
// (the P2P states behave as their counterparts: the device does no
// peer-to-peer DMA).
func runningState(st mdev.MigState) bool {
	switch st {
	case mdev.MigRunning, mdev.MigRunningP2P, mdev.MigPreCopy, mdev.MigPreCopyP2P:
		return true
	}
	return false
}

// pause makes sure the data path does not touch guest memory, and reports
// whether it is stopped. A data path running in one of the running migration
// states is stopped through mdev's state machine (-> STOP, which records
// every queue's position) so that guest memory can change under it; the
// client keeps seeing the state it set (clientState), and resume restarts
// the data path once memory is mapped again. A data path that is live in
// ERROR, or whose backing device refused its reset, cannot be stopped that
// way (mdev never runs one in STOP, STOP_COPY or RESUMING). failed reports
// that pause tried to stop it and failed (the device is in ERROR now).
// While paused the device is in STOP, so a configuration notification (a
// link change, NEEDS_RESET) waits for resume, which the client's next
// region access, SET_IRQS, reset or map brings.
func (s *Server) pause() (stopped, failed bool) {
	if !s.dev.DataPathActive() {
		return true, false
	}
	s.migMu.Lock()
	defer s.migMu.Unlock()
	st := s.dev.MigrationState()
	if !runningState(st) {
		return false, false
	}
	if err := s.dev.SetMigrationState(mdev.MigStop); err != nil {
		// The device is in ERROR now, which the client sees.
		s.log.Warn("vfio-user: stopping the data path for a memory change failed", "err", err)
		stopped = !s.dev.DataPathActive()
		return stopped, !stopped
	}
	s.mig.paused, s.mig.client = true, st
	return !s.dev.DataPathActive(), false
}

// resume restarts a data path pause stopped, in the state the client set,
// once the guest memory the rings lie in is mapped. Until then (the client
// unmapped the window holding them and has not mapped it back) the device
// stays stopped: a restart would fail its ring check and leave the device
// in ERROR for good. resume runs again on the client's next map, region
// access, interrupt setup or reset.
func (s *Server) resume() {
	s.migMu.Lock()
	defer s.migMu.Unlock()
	if !s.mig.paused {
		return
	}
	s.mu.Lock()
	n := len(s.dma.maps)
	s.mu.Unlock()
	if n == 0 {
		return
	}
	if err := s.dev.CheckRings(); err != nil {
		s.log.Debug("vfio-user: data path stays stopped until its rings are mapped", "err", err)
		return
	}
	s.mig.paused = false
	if err := s.dev.SetMigrationState(s.mig.client); err != nil {
		s.log.Warn("vfio-user: restarting the data path failed", "err", err)
	}
}

// clientState is the migration state the client sees: the device's, or
// while pause holds the device in STOP, the state the client set. The
// caller holds migMu.
func (s *Server) clientState() mdev.MigState {
	if s.mig.paused {
		return s.mig.client
	}
	return s.dev.MigrationState()
}

// dropIRQs closes every interrupt eventfd of the client.
func (s *Server) dropIRQs() {
	s.setIRQFds(IRQMSIX, 0, make([]*vdpa.EventFD, len(s.irq.msix)))
	s.setIRQFds(IRQIntx, 0, make([]*vdpa.EventFD, 1))
}

func closeFDs(fds []*vdpa.EventFD) {
	for _, e := range fds {
		if e != nil {
			_ = e.Close()
		}
	}
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	st := s.stats
	s.irqMu.Lock()
	st.IntxTriggers = s.intxTriggers
	s.irqMu.Unlock()
	return st
}

func (s *Server) count(err error) {
	s.sessMu.Lock()
	s.stats.Messages++
	if err != nil {
		s.stats.Errors++
	}
	s.sessMu.Unlock()
}

// closeAll closes raw descriptors.
func closeAll(fds []int) {
	for _, fd := range fds {
		_ = unix.Close(fd)
	}
}

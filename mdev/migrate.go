package mdev

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vring"
)

// Migration stream errors.
var (
	// ErrProtocol: the peer sent a malformed, oversized, unexpected or
	// out-of-range message.
	ErrProtocol = errors.New("mdev: migration protocol error")
	// ErrPeer: the peer reported a failure.
	ErrPeer = errors.New("mdev: migration peer failed")
	// ErrMemoryLayout: source and destination guest memory differ.
	ErrMemoryLayout = errors.New("mdev: guest memory layouts differ")
)

// Wire format: every message is
//
//	type u8 | length u32 LE | payload[length]
//
// with length bounded by maxMsg. Payloads:
//
//	msgHello    version u16 | page size u32 | regions u16 | {base u64, size u64}...
//	msgHelloAck (empty)
//	msgPages    guest addr u64 | page data (whole pages)
//	msgRound    round u32 | pages u64 (end of a pre-copy round, informational)
//	msgState    the device state stream (EncodeState)
//	msgDone     (empty): the source is stopped, everything was sent
//	msgResumed  (empty): the destination is running
//	msgError    UTF-8 text
//	msgSync     (empty): the destination answers msgSyncAck once it has
//	            applied everything before it
//	msgSyncAck  (empty)
const (
	msgHello byte = iota + 1
	msgHelloAck
	msgPages
	msgRound
	msgState
	msgDone
	msgResumed
	msgError
	msgSync
	msgSyncAck

	protoVersion = 1
	maxMsg       = 1<<20 + 64
	// pagesBytes bounds the page data of one msgPages: whole pages, as
	// many as fit (one page of the largest size, minPageSize..maxPageSize,
	// always does), so that every message stays within maxMsg whatever
	// the page size.
	pagesBytes  = 1 << 20
	minPageSize = 512
	maxPageSize = 1 << 16
	maxRegions  = 64
)

// pagesPerMsg is how many pages of pageSize bytes one msgPages carries.
func pagesPerMsg(pageSize uint64) uint64 { return max(1, pagesBytes/pageSize) }

// checkPageSize checks a dirty-log page size against what the protocol can
// carry and guest memory against it: every region must start and end on a
// page boundary, so that a page never straddles a region edge.
func checkPageSize(ps uint64, regions []*vring.Region) error {
	if ps < minPageSize || ps > maxPageSize || ps&(ps-1) != 0 {
		return fmt.Errorf("page size %d (a power of two, %d..%d)", ps, minPageSize, maxPageSize)
	}
	for i, r := range regions {
		if uint64(r.Base())%ps != 0 || r.Size()%ps != 0 {
			return fmt.Errorf("region %d %v not aligned to the %d-byte page size", i, r, ps)
		}
	}
	return nil
}

type wire struct {
	r   *bufio.Reader
	w   *bufio.Writer
	hdr [5]byte
}

// newWire buffers rw: rsize bytes for reading, wsize for writing (the side
// that sends pages wants a large write buffer, the other a large read one).
func newWire(rw io.ReadWriter, rsize, wsize int) *wire {
	return &wire{r: bufio.NewReaderSize(rw, rsize), w: bufio.NewWriterSize(rw, wsize)}
}

func (c *wire) send(typ byte, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n > maxMsg {
		return fmt.Errorf("%w: message of %d bytes", ErrProtocol, n)
	}
	c.hdr[0] = typ
	binary.LittleEndian.PutUint32(c.hdr[1:], uint32(n))
	if _, err := c.w.Write(c.hdr[:]); err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := c.w.Write(p); err != nil {
			return err
		}
	}
	return nil
}

func (c *wire) flush() error { return c.w.Flush() }

// recv reads one message into buf (grown as needed) and returns its type
// and payload.
func (c *wire) recv(buf []byte) (byte, []byte, error) {
	if _, err := io.ReadFull(c.r, c.hdr[:]); err != nil {
		return 0, nil, fmt.Errorf("mdev: migration stream: %w", err)
	}
	n := binary.LittleEndian.Uint32(c.hdr[1:])
	if n > maxMsg {
		return 0, nil, fmt.Errorf("%w: message of %d bytes > %d", ErrProtocol, n, maxMsg)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(c.r, buf); err != nil {
		return 0, nil, fmt.Errorf("%w: truncated message: %w", ErrProtocol, err)
	}
	if c.hdr[0] == msgError {
		return 0, nil, fmt.Errorf("%w: %s", ErrPeer, buf)
	}
	return c.hdr[0], buf, nil
}

// watch makes blocking I/O on rw end when ctx does, for connections with
// deadlines (net.Conn).
func watch(ctx context.Context, rw io.ReadWriter) (stop func() bool) {
	type deadliner interface{ SetDeadline(time.Time) error }
	d, ok := rw.(deadliner)
	if !ok {
		return func() bool { return true }
	}
	return context.AfterFunc(ctx, func() { _ = d.SetDeadline(time.Unix(1, 0)) })
}

// SourceOptions configure MigrateSource.
type SourceOptions struct {
	// Device is the mediated device being migrated (RUNNING).
	Device *Device
	// Memory is the guest memory.
	Memory *vring.Memory
	// Log is the guest's dirty bitmap, indexed by guest address: the VMM's
	// vCPU write tracking marks it, and the device's data path is made to
	// mark it too (StartDirtyTracking).
	Log *dirty.Bitmap
	// Tracker configures the pre-copy convergence decisions.
	Tracker dirty.TrackerOptions
	// StopGuest pauses the guest's vCPUs; called at the start of the
	// stop-and-copy phase. Required.
	StopGuest func() error
	// OnRound, when set, is called after each pre-copy round is sent.
	OnRound func(RoundReport)
}

// RoundReport describes one pre-copy round.
type RoundReport struct {
	dirty.Round
	Sent     uint64        // bytes of page data sent
	SendTime time.Duration // time to send them
}

// SourceReport summarizes a migration from the source's side.
type SourceReport struct {
	Mode   DirtyMode
	Rounds []RoundReport // round 0 (the full copy) first, then pre-copy rounds
	Final  RoundReport   // the stop-and-copy harvest
	// Downtime runs from stopping the guest to the destination reporting
	// it runs again.
	Downtime time.Duration
	// Breakdown of Downtime.
	StopGuest  time.Duration // pausing the vCPUs
	StopDevice time.Duration // suspending the device, reading its state
	FinalCopy  time.Duration // harvesting and sending the last pages and the state
	Resume     time.Duration // until the destination reports it runs
	StateBytes int
	TotalBytes uint64
}

// MigrateSource migrates the guest memory and the device to a destination
// running MigrateDestination at the other end of conn: iterative pre-copy
// driven by a dirty.Tracker while the guest runs, then stop-and-copy of the
// remaining pages and the device state. On success the device is left in
// STOP (the guest runs on the destination). On any failure the device is
// taken back to RUNNING on the source with dirty tracking off, and the error
// is sent to the destination (unless the connection is gone); if StopGuest
// had already run, restarting the vCPUs is the caller's job. A failure to
// get the device running again is joined to the returned error.
//
// Guest memory regions must be aligned to the dirty log's page size, a
// power of two from 512 bytes to 64 KiB.
func MigrateSource(ctx context.Context, conn io.ReadWriter, opts SourceOptions) (*SourceReport, error) {
	if opts.Device == nil || opts.Memory == nil || opts.Log == nil || opts.StopGuest == nil {
		return nil, fmt.Errorf("%w: MigrateSource needs Device, Memory, Log and StopGuest", ErrInvalidOptions)
	}
	regions := opts.Memory.Regions()
	ps := opts.Log.PageSize()
	if err := checkPageSize(ps, regions); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidOptions, err)
	}
	if len(regions) > maxRegions {
		return nil, fmt.Errorf("%w: %d memory regions (at most %d)", ErrInvalidOptions, len(regions), maxRegions)
	}
	defer watch(ctx, conn)()
	c := newWire(conn, 4096, 1<<20)
	s := &sourceRun{c: c, opts: &opts}
	rep, err := s.run(ctx, regions)
	if err == nil {
		return rep, nil
	}
	// Undoing does not stop when ctx has ended: the device must run again.
	undo := context.WithoutCancel(ctx)
	if !s.handedOver {
		// The guest keeps running here: tell the destination, and take
		// the device back to RUNNING with dirty tracking off.
		if !s.connBroken {
			_ = c.send(msgError, []byte(err.Error()))
			_ = c.flush()
		}
		if s.touched {
			if rerr := opts.Device.SetMigrationStateContext(undo, MigRunning); rerr != nil {
				err = errors.Join(err, fmt.Errorf("mdev: source device not running again: %w", rerr))
			}
		}
	}
	if s.tracking {
		if terr := opts.Device.StopDirtyTrackingContext(undo); terr != nil {
			err = errors.Join(err, terr)
		}
	}
	return rep, err
}

// sourceRun is one MigrateSource: what it has done so far decides how a
// failure is undone.
type sourceRun struct {
	c    *wire
	opts *SourceOptions
	// touched: the device left RUNNING.
	touched bool
	// tracking: dirty tracking is on.
	tracking bool
	// connBroken: a read or write on the connection failed, or the peer
	// reported its own failure, so no error message is sent to it.
	connBroken bool
	// handedOver: the destination reported that it runs the guest; the
	// device stays stopped here whatever happens next.
	handedOver bool
}

// io wraps the connection's errors so that a broken connection is
// remembered.
func (s *sourceRun) io(err error) error {
	if err != nil {
		s.connBroken = true
	}
	return err
}

func (s *sourceRun) send(typ byte, parts ...[]byte) error { return s.io(s.c.send(typ, parts...)) }
func (s *sourceRun) flush() error                         { return s.io(s.c.flush()) }

// expect reads the peer's next message, which must be of type want.
func (s *sourceRun) expect(want byte, what string) error {
	typ, _, err := s.c.recv(nil)
	if err != nil {
		// The connection broke, or the peer failed and sent its error:
		// either way nothing more is sent to it (a peer that failed may
		// no longer be reading).
		s.connBroken = true
		return err
	}
	if typ != want {
		return fmt.Errorf("%w: expected %s, got type %d", ErrProtocol, what, typ)
	}
	return nil
}

func (s *sourceRun) run(ctx context.Context, regions []*vring.Region) (*SourceReport, error) {
	c, opts := s.c, s.opts
	ps := opts.Log.PageSize()
	hello := binary.LittleEndian.AppendUint16(nil, protoVersion)
	hello = binary.LittleEndian.AppendUint32(hello, uint32(ps))
	hello = binary.LittleEndian.AppendUint16(hello, uint16(len(regions)))
	for _, r := range regions {
		hello = binary.LittleEndian.AppendUint64(hello, uint64(r.Base()))
		hello = binary.LittleEndian.AppendUint64(hello, r.Size())
	}
	if err := s.send(msgHello, hello); err != nil {
		return nil, err
	}
	if err := s.flush(); err != nil {
		return nil, err
	}
	if err := s.expect(msgHelloAck, "hello ack"); err != nil {
		return nil, err
	}

	rep := &SourceReport{}
	mode, err := opts.Device.StartDirtyTrackingContext(ctx, opts.Log)
	if err != nil {
		return nil, err
	}
	s.tracking = true
	rep.Mode = mode
	tr, err := dirty.NewTracker(opts.Log, &opts.Tracker)
	if err != nil {
		return nil, err
	}
	s.touched = true // a failed transition may leave it anywhere
	if err := opts.Device.SetMigrationStateContext(ctx, MigPreCopy); err != nil {
		return nil, err
	}
	if err := tr.Begin(); err != nil {
		return nil, err
	}
	// Round 0: all of guest memory.
	start := time.Now()
	var sent uint64
	for _, r := range regions {
		n, err := sendRange(c, r.Bytes(), uint64(r.Base()), ps)
		if err != nil {
			return nil, s.io(err)
		}
		sent += n
	}
	if err := s.io(sendRound(c, 0, sent/ps)); err != nil {
		return nil, err
	}
	r0 := RoundReport{Sent: sent, SendTime: time.Since(start)}
	r0.Pages, r0.Bytes = sent/ps, sent
	rep.Rounds = append(rep.Rounds, r0)
	rep.TotalBytes += sent
	if opts.OnRound != nil {
		opts.OnRound(r0)
	}
	dst, err := dirty.New(opts.Log.Span(), &dirty.Options{PageSize: ps})
	if err != nil {
		return nil, err
	}
	defer dst.Close()
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		round, err := tr.Next(dst)
		if err != nil {
			return nil, err
		}
		if round.Decision != dirty.Continue {
			break
		}
		rr, err := s.sendDirty(dst, round)
		if err != nil {
			return nil, err
		}
		rep.Rounds = append(rep.Rounds, rr)
		rep.TotalBytes += rr.Sent
		if opts.OnRound != nil {
			opts.OnRound(rr)
		}
		if err := dst.Clear(); err != nil {
			return nil, err
		}
	}

	// Let the destination drain what was sent so far, so that the
	// downtime does not include a backlog of earlier rounds.
	if err := s.send(msgSync); err != nil {
		return nil, err
	}
	if err := s.flush(); err != nil {
		return nil, err
	}
	if err := s.expect(msgSyncAck, "sync ack"); err != nil {
		return nil, err
	}

	// Stop and copy.
	t0 := time.Now()
	if err := opts.StopGuest(); err != nil {
		return nil, err
	}
	t1 := time.Now()
	rep.StopGuest = t1.Sub(t0)
	if err := opts.Device.SetMigrationStateContext(ctx, MigStopCopy); err != nil {
		return nil, err
	}
	t2 := time.Now()
	rep.StopDevice = t2.Sub(t1)
	final, err := tr.Final(dst)
	if err != nil {
		return nil, err
	}
	fr, err := s.sendDirty(dst, final)
	if err != nil {
		return nil, err
	}
	rep.Final = fr
	rep.TotalBytes += fr.Sent
	state, err := opts.Device.SaveState()
	if err != nil {
		return nil, err
	}
	rep.StateBytes = len(state)
	if err := s.send(msgState, state); err != nil {
		return nil, err
	}
	if err := s.send(msgDone); err != nil {
		return nil, err
	}
	if err := s.flush(); err != nil {
		return nil, err
	}
	t3 := time.Now()
	rep.FinalCopy = t3.Sub(t2)
	if err := s.expect(msgResumed, "resumed"); err != nil {
		return nil, err
	}
	// The guest runs on the destination: from here on the device stays
	// stopped whatever fails.
	s.handedOver = true
	rep.Resume = time.Since(t3)
	rep.Downtime = time.Since(t0)
	s.tracking = false
	done := context.WithoutCancel(ctx)
	err = opts.Device.StopDirtyTrackingContext(done)
	return rep, errors.Join(err, opts.Device.SetMigrationStateContext(done, MigStop))
}

func sendRound(c *wire, n int, pages uint64) error {
	var b [12]byte
	binary.LittleEndian.PutUint32(b[0:], uint32(n))
	binary.LittleEndian.PutUint64(b[4:], pages)
	return c.send(msgRound, b[:])
}

// sendRange sends mem (at guest address base, both page-aligned) in
// messages of whole pages, at most pagesBytes of data each.
//
// mem is guest memory, which the VMM may have mapped from a file it can
// truncate (an unsealed memfd or tmpfs file): the wire's buffered writer
// copies it in this process, and a page past the new end of file raises
// SIGBUS. The copy runs under vring.Guard, so that fault fails the
// migration (an error matching vring.ErrMemoryFault) instead of ending
// the process.
func sendRange(c *wire, mem []byte, base, pageSize uint64) (uint64, error) {
	chunk := pagesPerMsg(pageSize) * pageSize
	var hdr [8]byte
	for off := uint64(0); off < uint64(len(mem)); off += chunk {
		end := min(off+chunk, uint64(len(mem)))
		binary.LittleEndian.PutUint64(hdr[:], base+off)
		if err := vring.Guard(func() error { return c.send(msgPages, hdr[:], mem[off:end]) }); err != nil {
			return 0, err
		}
	}
	return uint64(len(mem)), nil
}

// sendDirty sends every page set in dst. A run of dirty pages is split at
// guest-memory region boundaries (regions are page-aligned, checked by
// MigrateSource); a page outside guest memory fails the migration.
func (s *sourceRun) sendDirty(dst *dirty.Bitmap, round dirty.Round) (RoundReport, error) {
	c, mem := s.c, s.opts.Memory
	start := time.Now()
	ps := dst.PageSize()
	var sent uint64
	for first, n := range dst.DirtyRuns() {
		addr, left := first*ps, n*ps
		for left > 0 {
			b, err := regionPiece(mem, addr, left)
			if err != nil {
				return RoundReport{}, fmt.Errorf("mdev: dirty page %#x outside guest memory: %w", addr, err)
			}
			if _, err := sendRange(c, b, addr, ps); err != nil {
				return RoundReport{}, s.io(err)
			}
			k := uint64(len(b))
			sent += k
			addr += k
			left -= k
		}
	}
	if err := sendRound(c, round.N, sent/ps); err != nil {
		return RoundReport{}, s.io(err)
	}
	if err := s.flush(); err != nil {
		return RoundReport{}, err
	}
	return RoundReport{Round: round, Sent: sent, SendTime: time.Since(start)}, nil
}

// regionPiece returns the host bytes of the longest prefix of
// [addr, addr+n) that lies in one guest-memory region (n > 0).
func regionPiece(mem *vring.Memory, addr, n uint64) ([]byte, error) {
	// One byte first: it validates addr (and faults a lazily mapped
	// region in) before the region table is consulted.
	if _, err := mem.Slice(vring.GuestAddr(addr), 1); err != nil {
		return nil, err
	}
	for _, r := range mem.Regions() {
		if b, last := uint64(r.Base()), uint64(r.Last()); addr >= b && addr <= last {
			return mem.Slice(vring.GuestAddr(addr), min(n-1, last-addr)+1) // n > 0; no wrap at the top
		}
	}
	return nil, fmt.Errorf("%w: %#x", vring.ErrOutOfRange, addr)
}

// DestOptions configure MigrateDestination.
type DestOptions struct {
	// Device is the destination's mediated device, compatible with the
	// source's; it is put into RESUMING.
	Device *Device
	// Memory is the destination guest memory, laid out like the source's.
	Memory *vring.Memory
	// Loaded, when set, is called once all pages and the device state are
	// in, before the device and the guest run (to inspect the memory the
	// guest resumes from, for example).
	Loaded func() error
	// StartGuest resumes the guest's vCPUs once the device runs.
	StartGuest func() error
}

// DestReport summarizes a migration from the destination's side.
type DestReport struct {
	Rounds     int
	PageBytes  uint64
	StateBytes int
	// Restart is how long the device took to leave RESUMING and run
	// (applying the state, programming the backing device); StartGuest
	// how long the StartGuest callback took.
	Restart    time.Duration
	StartGuest time.Duration
}

// MigrateDestination receives a migration from MigrateSource. Every
// message is validated (types, sizes, page addresses inside guest memory);
// the device state is loaded only as a whole (LoadState). On success the
// device and the guest run.
func MigrateDestination(ctx context.Context, conn io.ReadWriter, opts DestOptions) (*DestReport, error) {
	if opts.Device == nil || opts.Memory == nil {
		return nil, fmt.Errorf("%w: MigrateDestination needs Device and Memory", ErrInvalidOptions)
	}
	defer watch(ctx, conn)()
	c := newWire(conn, 1<<20, 4096)
	fail := func(err error) (*DestReport, error) {
		_ = c.send(msgError, []byte(err.Error()))
		_ = c.flush()
		return nil, err
	}
	var buf []byte // grows to the largest message received
	typ, p, err := c.recv(buf)
	if err != nil {
		return nil, err
	}
	if typ != msgHello {
		return fail(fmt.Errorf("%w: expected hello, got type %d", ErrProtocol, typ))
	}
	pageSize, err := checkHello(p, opts.Memory)
	if err != nil {
		return fail(err)
	}
	if err := c.send(msgHelloAck); err != nil {
		return nil, err
	}
	if err := c.flush(); err != nil {
		return nil, err
	}
	if err := opts.Device.SetMigrationStateContext(ctx, MigResuming); err != nil {
		return fail(err)
	}
	rep := &DestReport{}
	for {
		typ, p, err := c.recv(buf)
		if err != nil {
			return nil, err
		}
		buf = p[:0]
		switch typ {
		case msgPages:
			if len(p) < 8 || (len(p)-8)%int(pageSize) != 0 {
				return fail(fmt.Errorf("%w: pages message of %d bytes", ErrProtocol, len(p)))
			}
			addr := binary.LittleEndian.Uint64(p)
			if addr%pageSize != 0 {
				return fail(fmt.Errorf("%w: unaligned page address %#x", ErrProtocol, addr))
			}
			if err := opts.Memory.Write(vring.GuestAddr(addr), p[8:]); err != nil {
				return fail(fmt.Errorf("%w: pages at %#x+%d: %w", ErrProtocol, addr, len(p)-8, err))
			}
			rep.PageBytes += uint64(len(p) - 8)
		case msgRound:
			if len(p) != 12 {
				return fail(fmt.Errorf("%w: round message of %d bytes", ErrProtocol, len(p)))
			}
			rep.Rounds++
		case msgSync:
			if len(p) != 0 {
				return fail(fmt.Errorf("%w: sync message of %d bytes", ErrProtocol, len(p)))
			}
			if err := c.send(msgSyncAck); err != nil {
				return rep, err
			}
			if err := c.flush(); err != nil {
				return rep, err
			}
		case msgState:
			if err := opts.Device.LoadStateContext(ctx, p); err != nil {
				return fail(err)
			}
			rep.StateBytes = len(p)
		case msgDone:
			if opts.Loaded != nil {
				if err := opts.Loaded(); err != nil {
					return fail(err)
				}
			}
			t0 := time.Now()
			if err := opts.Device.SetMigrationStateContext(ctx, MigRunning); err != nil {
				return fail(err)
			}
			t1 := time.Now()
			rep.Restart = t1.Sub(t0)
			if opts.StartGuest != nil {
				if err := opts.StartGuest(); err != nil {
					return fail(err)
				}
			}
			rep.StartGuest = time.Since(t1)
			if err := c.send(msgResumed); err != nil {
				return rep, err
			}
			return rep, c.flush()
		default:
			return fail(fmt.Errorf("%w: unexpected message type %d", ErrProtocol, typ))
		}
	}
}

func checkHello(p []byte, mem *vring.Memory) (uint64, error) {
	if len(p) < 8 {
		return 0, fmt.Errorf("%w: hello of %d bytes", ErrProtocol, len(p))
	}
	if v := binary.LittleEndian.Uint16(p); v != protoVersion {
		return 0, fmt.Errorf("%w: protocol version %d (want %d)", ErrProtocol, v, protoVersion)
	}
	ps := uint64(binary.LittleEndian.Uint32(p[2:]))
	if ps < minPageSize || ps > maxPageSize || ps&(ps-1) != 0 {
		return 0, fmt.Errorf("%w: page size %d", ErrProtocol, ps)
	}
	n := int(binary.LittleEndian.Uint16(p[6:]))
	if n > maxRegions || len(p) != 8+16*n {
		return 0, fmt.Errorf("%w: hello with %d regions in %d bytes", ErrProtocol, n, len(p))
	}
	regions := mem.Regions()
	if n != len(regions) {
		return 0, fmt.Errorf("%w: source has %d regions, destination %d", ErrMemoryLayout, n, len(regions))
	}
	for i, r := range regions {
		base := binary.LittleEndian.Uint64(p[8+16*i:])
		size := binary.LittleEndian.Uint64(p[16+16*i:])
		if base != uint64(r.Base()) || size != r.Size() {
			return 0, fmt.Errorf("%w: source region %d is %#x+%#x, destination %v", ErrMemoryLayout, i, base, size, r)
		}
	}
	if err := checkPageSize(ps, regions); err != nil {
		return 0, fmt.Errorf("%w: %w", ErrMemoryLayout, err)
	}
	return ps, nil
}

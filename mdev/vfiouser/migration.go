package vfiouser

import (
	"fmt"
	"math/bits"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
)

// Device features (VFIO_DEVICE_FEATURE_*).
const (
	FeatureMigration       = 1
	FeatureMigDeviceState  = 2
	FeatureDMALoggingStart = 6
	FeatureDMALoggingStop  = 7
	FeatureDMALoggingRep   = 8
)

// VFIO_MIGRATION_* flags of the MIGRATION feature.
const (
	MigrationStopCopy uint64 = 1 << 0
	MigrationP2P      uint64 = 1 << 1
	MigrationPreCopy  uint64 = 1 << 2
)

// Limits of the migration data path.
const (
	// maxMigState bounds the device state a destination accepts.
	maxMigState = 1 << 20
	// maxLogRanges bounds DMA_LOGGING_START's ranges.
	maxLogRanges = 1024
	// maxLogSpan bounds the address span dirty logging covers (1 TiB).
	maxLogSpan = 1 << 40
)

// migSession is the migration data stream state. Guarded by Server.migMu.
type migSession struct {
	out    []byte // saved state being read (STOP_COPY)
	outPos int
	in     []byte // state being written (RESUMING)
	log    *dirty.Bitmap
	// pending holds bits harvested from log and not reported yet.
	pending []uint64
	// paused: the server stopped the data path for a memory change
	// (Server.pause): the device is in STOP while the client sees client,
	// the running state it set, until Server.resume restarts it there.
	paused bool
	client mdev.MigState
}

// featureOps are the methods (GET, SET) each device feature supports.
var featureOps = map[uint32]uint32{
	FeatureMigration:       FeatureGet,
	FeatureMigDeviceState:  FeatureGet | FeatureSet,
	FeatureDMALoggingStart: FeatureSet,
	FeatureDMALoggingStop:  FeatureSet,
	FeatureDMALoggingRep:   FeatureGet,
}

func featureErr(errno unix.Errno, format string, args ...any) error {
	return &Error{Cmd: CmdDeviceFeature, Errno: errno, Err: fmt.Errorf("%w: "+format, append([]any{ErrCommand}, args...)...)}
}

// deviceFeature serves DEVICE_FEATURE: migration (MIGRATION,
// MIG_DEVICE_STATE) on mdev's state machine and DMA logging on its dirty
// tracking. A PROBE succeeds when the feature supports every method (GET,
// SET) it names. No reply is longer than the request's argsz: a request
// whose reply would be is refused (ErrArgsz) before anything is done.
func (s *Server) deviceFeature(f DeviceFeature) ([]byte, error) {
	idx := f.Flags & FeatureMask
	ops, ok := featureOps[idx]
	if !ok {
		return nil, featureErr(unix.ENOTTY, "device feature %d", idx)
	}
	asked := f.Flags & (FeatureGet | FeatureSet)
	if asked&^ops != 0 {
		return nil, featureErr(unix.EINVAL, "device feature %d does not support flags %#x", idx, f.Flags)
	}
	head := func(extra int) []byte {
		b := make([]byte, 8, 8+extra)
		le.PutUint32(b, uint32(8+extra))
		le.PutUint32(b[4:], f.Flags)
		return b
	}
	if f.Flags&FeatureProbe != 0 {
		return head(0), nil
	}
	if asked == 0 {
		return nil, featureErr(unix.EINVAL, "device feature %d flags %#x: neither GET nor SET", idx, f.Flags)
	}
	room := func(extra int) error {
		if uint64(f.Argsz) < 8+uint64(extra) {
			return perr(CmdDeviceFeature, ErrArgsz, "argsz %d for a %d-byte reply", f.Argsz, 8+extra)
		}
		return nil
	}
	switch idx {
	case FeatureMigration:
		if err := room(8); err != nil {
			return nil, err
		}
		return le.AppendUint64(head(8), MigrationStopCopy|MigrationP2P), nil
	case FeatureMigDeviceState:
		if err := room(8); err != nil {
			return nil, err
		}
		if asked == FeatureSet {
			if len(f.Data) < 8 {
				return nil, featureErr(unix.EINVAL, "MIG_DEVICE_STATE with %d data bytes", len(f.Data))
			}
			if err := s.setMigState(mdev.MigState(le.Uint32(f.Data))); err != nil {
				return nil, err
			}
		}
		s.migMu.Lock()
		st := s.clientState()
		s.migMu.Unlock()
		b := le.AppendUint32(head(8), uint32(st))
		return le.AppendUint32(b, ^uint32(0)), nil
	case FeatureDMALoggingStop:
		return head(0), s.stopLogging()
	case FeatureDMALoggingStart:
		if err := room(len(f.Data)); err != nil {
			return nil, err
		}
		return s.startLogging(f, head)
	default: // FeatureDMALoggingRep
		return s.reportLogging(f, head)
	}
}

// setMigState walks mdev's migration state machine to target, loading the
// written state when leaving RESUMING and capturing it on entering
// STOP_COPY. Setting the state the client sees again changes nothing.
// While the server holds the data path paused (the device in STOP), a
// running target only changes what the client sees unless the guest
// memory the rings lie in is mapped again, in which case the device walks
// from STOP to it; any other target ends the pause.
func (s *Server) setMigState(target mdev.MigState) error {
	if target == mdev.MigError || target > mdev.MigPreCopyP2P {
		return featureErr(unix.EINVAL, "device state %d", uint32(target))
	}
	s.migMu.Lock()
	defer s.migMu.Unlock()
	if target == s.clientState() {
		// No arc: a save or load session in progress goes on.
		return nil
	}
	if s.mig.paused {
		if _, err := mdev.MigrationPath(s.mig.client, target); err != nil {
			return &Error{Cmd: CmdDeviceFeature, Errno: unix.EINVAL, Err: fmt.Errorf("%w: %w", ErrDevice, err)}
		}
		s.mu.Lock()
		mapped := len(s.dma.maps) > 0
		s.mu.Unlock()
		// A running target waits, as resume does, until the memory
		// holding the rings is mapped: the walk would restart the data
		// path, and a restart whose ring check fails leaves the device
		// in ERROR.
		if runningState(target) && (!mapped || s.dev.CheckRings() != nil) {
			s.mig.client = target
			return nil
		}
		s.mig.paused = false
	}
	cur := s.dev.MigrationState()
	if cur == mdev.MigResuming && target != mdev.MigResuming {
		if err := s.dev.LoadState(s.mig.in); err != nil {
			s.mig.in = nil
			return &Error{Cmd: CmdDeviceFeature, Errno: unix.EINVAL, Err: fmt.Errorf("%w: loading device state: %w", ErrDevice, err)}
		}
		s.mig.in = nil
	}
	if err := s.dev.SetMigrationState(target); err != nil {
		return &Error{Cmd: CmdDeviceFeature, Errno: unix.EINVAL, Err: fmt.Errorf("%w: %w", ErrDevice, err)}
	}
	switch target {
	case mdev.MigStopCopy:
		out, err := s.dev.SaveState()
		if err != nil {
			return &Error{Cmd: CmdDeviceFeature, Errno: unix.EIO, Err: fmt.Errorf("%w: %w", ErrDevice, err)}
		}
		s.mig.out, s.mig.outPos = out, 0
	case mdev.MigResuming:
		s.mig.in = s.mig.in[:0]
	default:
		s.mig.out, s.mig.outPos = nil, 0
	}
	return nil
}

// migDataRead serves MIG_DATA_READ: the next bytes of the saved state. A
// reply with fewer bytes than asked for ends the stream, so a request whose
// argsz leaves no room for size bytes is refused (ErrArgsz) rather than
// answered short.
func (s *Server) migDataRead(p []byte) ([]byte, error) {
	if len(p) < 8 {
		return nil, perr(CmdMigDataRead, ErrTruncated, "payload of %d bytes", len(p))
	}
	argsz, size := le.Uint32(p), le.Uint32(p[4:])
	if uint64(argsz) < 8+uint64(size) {
		return nil, perr(CmdMigDataRead, ErrArgsz, "argsz %d for %d bytes", argsz, size)
	}
	if size > MaxDataXfer {
		return nil, perr(CmdMigDataRead, ErrTooLarge, "size %d", size)
	}
	s.migMu.Lock()
	defer s.migMu.Unlock()
	st := s.clientState()
	var chunk []byte
	switch st {
	case mdev.MigStopCopy:
		n := min(int(size), len(s.mig.out)-s.mig.outPos)
		chunk = s.mig.out[s.mig.outPos : s.mig.outPos+n]
		s.mig.outPos += n
	case mdev.MigPreCopy, mdev.MigPreCopyP2P:
		// No pre-copy data: the device state is small and taken at once.
	default:
		return nil, &Error{Cmd: CmdMigDataRead, Errno: unix.EINVAL, Err: fmt.Errorf("%w: MIG_DATA_READ in %s", ErrDevice, st)}
	}
	b := make([]byte, 8, 8+len(chunk))
	le.PutUint32(b, uint32(8+len(chunk)))
	le.PutUint32(b[4:], uint32(len(chunk)))
	return append(b, chunk...), nil
}

// migDataWrite serves MIG_DATA_WRITE: more of the state being loaded.
func (s *Server) migDataWrite(p []byte) error {
	if len(p) < 8 {
		return perr(CmdMigDataWrite, ErrTruncated, "payload of %d bytes", len(p))
	}
	size := le.Uint32(p[4:])
	if uint64(size) != uint64(len(p)-8) {
		return perr(CmdMigDataWrite, ErrTruncated, "size %d with %d data bytes", size, len(p)-8)
	}
	s.migMu.Lock()
	defer s.migMu.Unlock()
	if st := s.clientState(); st != mdev.MigResuming {
		return &Error{Cmd: CmdMigDataWrite, Errno: unix.EINVAL, Err: fmt.Errorf("%w: MIG_DATA_WRITE in %s", ErrDevice, st)}
	}
	if len(s.mig.in)+int(size) > maxMigState {
		return perr(CmdMigDataWrite, ErrTooLarge, "device state above %d bytes", maxMigState)
	}
	s.mig.in = append(s.mig.in, p[8:]...)
	return nil
}

// startLogging serves DMA_LOGGING_START: the device marks every page it
// writes in a bitmap covering the ranges (page size 4096).
func (s *Server) startLogging(f DeviceFeature, head func(int) []byte) ([]byte, error) {
	d := f.Data
	if len(d) < 16 {
		return nil, perr(CmdDeviceFeature, ErrTruncated, "DMA_LOGGING_START with %d data bytes", len(d))
	}
	n := le.Uint32(d[8:])
	if n > maxLogRanges || uint64(len(d)) < 16+16*uint64(n) {
		return nil, perr(CmdDeviceFeature, ErrRange, "%d ranges in %d bytes", n, len(d))
	}
	span := uint64(0)
	for i := uint32(0); i < n; i++ {
		iova, length := le.Uint64(d[16+16*i:]), le.Uint64(d[24+16*i:])
		if length == 0 || iova+length < iova || iova+length > maxLogSpan {
			return nil, perr(CmdDeviceFeature, ErrRange, "range %#x+%#x", iova, length)
		}
		span = max(span, iova+length)
	}
	if n == 0 {
		s.mu.Lock()
		for _, m := range s.dma.maps {
			span = max(span, m.addr+m.size)
		}
		s.mu.Unlock()
	}
	if span == 0 || span > maxLogSpan {
		return nil, perr(CmdDeviceFeature, ErrRange, "logging span %#x", span)
	}
	s.migMu.Lock()
	defer s.migMu.Unlock()
	if s.mig.log != nil {
		return nil, perr(CmdDeviceFeature, ErrBusy, "DMA logging already started")
	}
	log, err := dirty.New(span, nil)
	if err != nil {
		return nil, &Error{Cmd: CmdDeviceFeature, Errno: unix.ENOMEM, Err: fmt.Errorf("%w: %w", ErrDevice, err)}
	}
	if _, err := s.dev.StartDirtyTracking(log); err != nil {
		_ = log.Close()
		return nil, &Error{Cmd: CmdDeviceFeature, Errno: unix.EIO, Err: fmt.Errorf("%w: %w", ErrDevice, err)}
	}
	s.mig.log = log
	s.mig.pending = make([]uint64, log.Words())
	b := head(len(d))
	b = append(b, d...)
	le.PutUint64(b[8:], log.PageSize())
	return b, nil
}

func (s *Server) stopLogging() error {
	s.migMu.Lock()
	defer s.migMu.Unlock()
	if s.mig.log == nil {
		return nil
	}
	err := s.dev.StopDirtyTracking()
	_ = s.mig.log.Close()
	s.mig.log, s.mig.pending = nil, nil
	if err != nil {
		return &Error{Cmd: CmdDeviceFeature, Errno: unix.EIO, Err: fmt.Errorf("%w: %w", ErrDevice, err)}
	}
	return nil
}

// reportLogging serves DMA_LOGGING_REPORT: the pages of [iova,
// iova+length) written since the last report, at the requested page size;
// reported bits are cleared.
func (s *Server) reportLogging(f DeviceFeature, head func(int) []byte) ([]byte, error) {
	d := f.Data
	if len(d) < 24 {
		return nil, perr(CmdDeviceFeature, ErrTruncated, "DMA_LOGGING_REPORT with %d data bytes", len(d))
	}
	iova, length, ps := le.Uint64(d), le.Uint64(d[8:]), le.Uint64(d[16:])
	if ps < 4096 || ps&(ps-1) != 0 || length == 0 || iova+length < iova || iova%ps != 0 {
		return nil, perr(CmdDeviceFeature, ErrRange, "report %#x+%#x page size %#x", iova, length, ps)
	}
	pages := length / ps // length + ps - 1 could overflow
	if length%ps != 0 {
		pages++
	}
	words := (pages + 63) / 64
	reply := 8 + 24 + words*8
	if reply > MaxDataXfer {
		return nil, perr(CmdDeviceFeature, ErrTooLarge, "a %d-page bitmap", pages)
	}
	if reply > uint64(f.Argsz) {
		return nil, perr(CmdDeviceFeature, ErrArgsz, "argsz %d for a %d-byte reply", f.Argsz, reply)
	}
	s.migMu.Lock()
	defer s.migMu.Unlock()
	if s.mig.log == nil {
		return nil, &Error{Cmd: CmdDeviceFeature, Errno: unix.EINVAL, Err: fmt.Errorf("%w: DMA logging not started", ErrDevice)}
	}
	if _, err := s.mig.log.HarvestWords(s.mig.pending); err != nil {
		return nil, &Error{Cmd: CmdDeviceFeature, Errno: unix.EIO, Err: fmt.Errorf("%w: %w", ErrDevice, err)}
	}
	logPS := s.mig.log.PageSize()
	if ps < logPS {
		// Not reached: the log's pages are 4 KiB and ps is at least that.
		return nil, perr(CmdDeviceFeature, ErrRange, "page size %#x below the log's %#x", ps, logPS)
	}
	out := make([]uint64, words)
	reportDirty(s.mig.pending, logPS, iova, length, ps, out)
	b := head(24 + int(words)*8)
	b = append(b, d[:24]...)
	for _, w := range out {
		b = le.AppendUint64(b, w)
	}
	return b, nil
}

// reportDirty moves the dirty bits of [iova, iova+length) out of pending
// (a log of logPS-byte pages: page n is bit n%64 of word n/64) into out,
// one bit per ps-byte page from iova: a page is dirty if any log page it
// overlaps is. ps and logPS are powers of two, ps >= logPS, iova is a
// multiple of ps, length > 0 and iova+length does not overflow; out has a
// bit for every page of the range. The range is clamped to the log first
// and the log is walked a word at a time, so the cost is the words of log
// the range covers (the client chooses length and ps, up to 2^64 and 2^63)
// plus the bits set. It returns the number of words visited.
func reportDirty(pending []uint64, logPS, iova, length, ps uint64, out []uint64) (visited int) {
	nbits := uint64(len(pending)) * 64
	first := iova / logPS
	if first >= nbits {
		return 0
	}
	end := min((iova+length-1)/logPS+1, nbits) // log pages [first, end)
	shift := uint(bits.TrailingZeros64(ps) - bits.TrailingZeros64(logPS))
	for w := first / 64; w <= (end-1)/64; w++ {
		visited++
		x := pending[w]
		if x == 0 {
			continue
		}
		lo := w * 64
		if first > lo {
			x &= ^uint64(0) << (first - lo)
		}
		if end < lo+64 {
			x &= 1<<(end-lo) - 1
		}
		pending[w] &^= x
		for x != 0 {
			p := (lo + uint64(bits.TrailingZeros64(x)) - first) >> shift
			out[p/64] |= 1 << (p % 64)
			x &= x - 1
		}
	}
	return visited
}

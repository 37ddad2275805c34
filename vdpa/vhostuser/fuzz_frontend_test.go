package vhostuser

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// FuzzFrontendSession runs the Frontend against a hostile back-end. The fuzz
// input is a script of the back-end's answers (see feScript for the
// format): a fake back-end on the other end of a socketpair reads each
// request the Frontend sends and answers it with the next script record,
// which may be a well-formed reply, any header and payload with 0..15
// descriptors attached, silence, a hang-up or a stall. The Frontend is
// driven through a whole device life (handshake, features, memory, log,
// two rings with eventfds, DRIVER_OK, config, suspend/resume, stop, reset,
// Close) with a deadline on every call. The Frontend opens no back-end
// request channel (it never offers BACKEND_REQ nor sends
// SET_BACKEND_REQ_FD) and does not use inflight or memory-slot requests,
// so unsolicited messages come on the main socket: feReplyMore, and
// answers to requests that want none, read as the reply to a later one.
//
// What must hold whatever the back-end does: every call returns within its
// deadline; every error wraps one of the sentinels a peer can cause (see
// feAllowedErrs); values the Frontend reports are ones the back-end
// actually sent and that fit the protocol (feSession.check*); after Close
// the fake back-end ends and the descriptor and goroutine counts come back
// to where they were.
func FuzzFrontendSession(f *testing.F) {
	for _, s := range feSeeds() {
		f.Add(s.script)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		runFrontendSession(t, in, feFuzzCallTimeout)
	})
}

// feFuzzCallTimeout bounds each Frontend call while fuzzing. A stalled
// back-end costs one such wait per input, so it is short; on a loaded
// machine a well-behaved exchange may exceed it, which is an allowed
// (context) error, not a failure. The unit test of the seeds uses a long
// one and requires every call to succeed.
const feFuzzCallTimeout = 20 * time.Millisecond

// feGrace is how much longer than its deadline a call may take to return
// (scheduling, -race): a Frontend that ignores its context blocks until
// the per-exchange FrontendOptions.Timeout (a minute here), far beyond.
const feGrace = 2 * time.Second

// Session options (the script's first byte).
const (
	feOptBlock  = 1 << 0 // DeviceBlock: the configuration size is probed
	feOptPacked = 1 << 1 // the driver accepts RING_PACKED if offered
	feOptLog    = 1 << 2 // SET_LOG_BASE, then LOG_ALL on and off
)

// Record actions (low 3 bits of a record's first byte).
const (
	// feSilent reads the request and sends nothing. On a request the
	// Frontend awaits a reply to (feAwaitsReply) the back-end hangs up
	// instead: silence there only makes the Frontend wait out its
	// deadline, the path feStall (and a size field beyond the payload)
	// takes; as the most common mutation of an answer it would spend
	// most of the fuzzing time waiting.
	feSilent    = 0
	feReply     = 1 // send the explicit message that follows
	feAuto      = 2 // answer as a well-behaved back-end would (feAutoReply)
	feHangUp    = 3 // close the connection
	feStall     = 4 // answer nothing any more; keep reading until the Frontend hangs up
	feReplyMore = 5 // send the explicit message, then take the next record for the same request
	// 6 and 7 are feAuto too, so every byte decodes to something.
)

// A script is:
//
//	opts  u8                    session options (feOpt*)
//	record*                     one per request (more with feReplyMore)
//
// and a record is:
//
//	op    u8                    bits 0-2 action, 3-6 descriptor count (0..15), 7 kind (0 eventfd, 1 memfd)
//	for feReply and feReplyMore only:
//	req   u8                    request field (0: the request being answered)
//	flags u8                    flags field
//	delta i8                    size field = len(payload)+delta (mod 2^32: below zero it is huge);
//	                            above zero the back-end hangs up after the short message
//	plen  u16 little endian     payload length (at most feMaxPayload)
//	payload [plen]byte
//
// When the script runs out the back-end hangs up.
type feRecord struct {
	action  int
	nfds    int
	memfd   bool
	req     uint8
	flags   uint8
	delta   int8
	payload []byte
}

const feMaxPayload = 1024

func (r *feRecord) explicit() bool { return r.action == feReply || r.action == feReplyMore }

// next decodes the next record; ok is false at the end of the script.
func feNext(in *[]byte) (r feRecord, ok bool) {
	b := *in
	if len(b) == 0 {
		return r, false
	}
	op := b[0]
	b = b[1:]
	r.action = int(op & 7)
	if r.action > feReplyMore {
		r.action = feAuto
	}
	r.nfds = int(op>>3) & 15
	r.memfd = op&0x80 != 0
	if r.explicit() {
		var hdr [5]byte
		n := copy(hdr[:], b)
		b = b[n:]
		r.req, r.flags, r.delta = hdr[0], hdr[1], int8(hdr[2])
		plen := min(int(binary.LittleEndian.Uint16(hdr[3:])), feMaxPayload, len(b))
		r.payload = b[:plen]
		b = b[plen:]
	}
	*in = b
	return r, true
}

// feScript builds scripts (the seeds).
type feScript struct {
	b    []byte
	reqs []Request // the requests the script expects, in order
}

func newFeScript(opts byte) *feScript { return &feScript{b: []byte{opts}} }

func (s *feScript) op(r Request, op byte) *feScript {
	s.reqs = append(s.reqs, r)
	s.b = append(s.b, op)
	return s
}

func (s *feScript) silent(r Request) *feScript { return s.op(r, feSilent) }

// msg appends an explicit record: action with nfds descriptors, header
// fields and payload.
func (s *feScript) msg(r Request, action byte, nfds int, memfd bool, req Request, flags Flags, delta int8, p []byte) *feScript {
	op := action | byte(nfds&15)<<3
	if memfd {
		op |= 0x80
	}
	if action == feReply {
		s.reqs = append(s.reqs, r)
	}
	s.b = append(s.b, op, byte(req), byte(flags), byte(delta), byte(len(p)), byte(len(p)>>8))
	s.b = append(s.b, p...)
	return s
}

// reply appends a well-formed reply to r.
func (s *feScript) reply(r Request, p []byte) *feScript {
	return s.msg(r, feReply, 0, false, r, Version|FlagReply, 0, p)
}

// ack appends a REPLY_ACK success.
func (s *feScript) ack(r Request) *feScript { return s.reply(r, putU64(0)) }

// feDev is what the fake well-behaved back-end offers.
var feDevFeatures = virtio.Features(0).With(virtio.FVersion1, virtio.FProtocolFeat, virtio.FRingPacked, virtio.FLogAll,
	virtio.NetFMAC, virtio.NetFMQ)

// feDriverFeatures are the features the driver accepts (RING_PACKED with
// feOptPacked).
var feDriverFeatures = virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC, virtio.NetFMQ)

const (
	feQueueSize = 64
	feStride    = 0x10000
	// feBlockConfigSize is the well-behaved block back-end's
	// configuration size, found by the Frontend's probe.
	feBlockConfigSize = 60
)

// feStartBase is the position SET_VRING_BASE starts each ring at: 0, and
// for a packed ring both wrap counters set (a fresh packed ring).
func feStartBase(packed bool) vdpa.QueueState {
	if packed {
		return vdpa.QueueState{NextAvail: 1 << 15, NextUsed: 1 << 15}
	}
	return vdpa.QueueState{}
}

// feFaithful is the script of a well-behaved back-end offering
// feDevFeatures and every supported protocol feature, for the session
// runFrontendSession drives with opts. It spells out each request the
// Frontend sends and its answer: the message flow of the whole session.
func feFaithful(opts byte) *feScript {
	block := opts&feOptBlock != 0
	packed := opts&feOptPacked != 0
	logging := opts&feOptLog != 0
	s := newFeScript(opts)
	// NewFrontend. SET_OWNER and SET_PROTOCOL_FEATURES go before
	// REPLY_ACK is in effect: no answer.
	s.silent(ReqSetOwner)
	s.reply(ReqGetFeatures, putU64(uint64(feDevFeatures)))
	s.reply(ReqGetProtocolFeatures, putU64(uint64(SupportedProtocolFeatures)))
	s.silent(ReqSetProtocolFeatures)
	s.reply(ReqGetQueueNum, putU64(1))
	nq := 2
	if block {
		nq = 1 // one queue (not a pair) for a block device
	}
	acked := feDriverFeatures.With(virtio.FProtocolFeat)
	if packed {
		acked = acked.With(virtio.FRingPacked)
	}
	st := virtio.StatusAcknowledge | virtio.StatusDriver
	s.ack(ReqSetStatus)
	s.ack(ReqSetFeatures)
	st |= virtio.StatusFeaturesOK
	s.ack(ReqSetStatus)
	s.reply(ReqGetStatus, putU64(uint64(st)))
	s.ack(ReqSetMemTable)
	if logging {
		// SET_LOG_BASE always has a reply; no ring addresses yet.
		s.reply(ReqSetLogBase, putU64(0))
	}
	for range nq {
		for _, r := range []Request{ReqSetVringNum, ReqSetVringAddr, ReqSetVringBase, ReqSetVringCall, ReqSetVringErr,
			ReqSetVringKick, ReqSetVringEnable} {
			s.ack(r)
		}
	}
	s.ack(ReqSetStatus) // DRIVER_OK
	if block {
		// ConfigSize bisects [0, MaxConfigSize]: reads up to
		// feBlockConfigSize succeed, longer ones fail (empty reply).
		lo, hi := 0, MaxConfigSize+1
		for hi-lo > 1 {
			mid := lo + (hi-lo)/2
			if mid <= feBlockConfigSize {
				s.reply(ReqGetConfig, Config{Data: make([]byte, mid)}.Encode())
				lo = mid
			} else {
				s.reply(ReqGetConfig, nil)
				hi = mid
			}
		}
	}
	s.reply(ReqGetConfig, Config{Data: feConfigData()}.Encode())
	s.ack(ReqSetConfig)
	if logging {
		// LOG_ALL on and off: SET_FEATURES and the ring addresses
		// again (their log flag follows) each time.
		for range 2 {
			s.ack(ReqSetFeatures)
			for range nq {
				s.ack(ReqSetVringAddr)
			}
		}
	}
	base := VringState{Num: vringBaseNum(feStartBase(packed), acked)}
	// Suspend: highest ring first; QueueBase(0) is then answered from
	// what Suspend saved.
	for q := nq - 1; q >= 0; q-- {
		base.Index = uint32(q)
		s.reply(ReqGetVringBase, base.Encode())
	}
	// Resume: size, addresses, base, call, kick for each ring.
	for range nq {
		for _, r := range []Request{ReqSetVringNum, ReqSetVringAddr, ReqSetVringBase, ReqSetVringCall, ReqSetVringKick} {
			s.ack(r)
		}
	}
	base.Index = uint32(nq - 1)
	s.reply(ReqGetVringBase, base.Encode()) // QueueBase of the last ring stops it
	s.ack(ReqSetStatus)                     // reset: SET_STATUS 0
	return s
}

func vringBaseNum(st vdpa.QueueState, acked virtio.Features) uint32 {
	if acked.Has(virtio.FRingPacked) {
		return uint32(st.NextAvail) | uint32(st.NextUsed)<<16
	}
	return uint32(st.NextAvail)
}

// feConfigData is what the driver reads from (and writes back to) the
// configuration space: a MAC address for net, the first bytes for block.
func feConfigData() []byte { return []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56} }

type feSeed struct {
	name   string
	script []byte
	// faithful seeds must run to the end with every call succeeding.
	faithful bool
	reqs     []Request
}

// feSeeds are the seed scripts: the faithful sessions for each option
// set, and hostile variants of the things a back-end can get wrong.
func feSeeds() []feSeed {
	var seeds []feSeed
	for _, o := range []struct {
		name string
		opts byte
	}{
		{"net_split", 0},
		{"net_packed_log", feOptPacked | feOptLog},
		{"block_probe", feOptBlock},
	} {
		s := feFaithful(o.opts)
		seeds = append(seeds, feSeed{name: o.name, script: s.b, faithful: true, reqs: s.reqs})
	}
	// hostile adds a session that answers as the faithful script with
	// opts until request number n (0-based), then runs tail and answers
	// the rest as a well-behaved back-end (feAuto), so the fuzzer starts
	// from inputs where the session goes on after the fault.
	hostile := func(name string, opts byte, n int, tail func(s *feScript, r Request)) {
		good := feFaithful(opts)
		s := newFeScript(opts)
		// Re-decode the faithful script's first n records.
		in := good.b[1:]
		for i := 0; i < n; i++ {
			start := len(good.b) - len(in)
			_, _ = feNext(&in)
			s.b = append(s.b, good.b[start:len(good.b)-len(in)]...)
			s.reqs = append(s.reqs, good.reqs[i])
		}
		tail(s, good.reqs[n])
		for range len(good.reqs) - n {
			s.b = append(s.b, feAuto)
		}
		seeds = append(seeds, feSeed{name: name, script: s.b})
	}
	const (
		iGetFeatures = 1
		iGetQueueNum = 4
		iGetStatus   = 8
		iSetMemTable = 9
	)
	hostile("queue_num_overflow", 0, iGetQueueNum, func(s *feScript, r Request) {
		// 2^63+1 queue pairs: doubled, it wraps to 2 queues.
		s.reply(r, putU64(1<<63|1))
	})
	hostile("queue_num_huge", 0, iGetQueueNum, func(s *feScript, r Request) { s.reply(r, putU64(1<<40)) })
	hostile("status_beyond_8_bits", 0, iGetStatus, func(s *feScript, r Request) { s.reply(r, putU64(0x10b)) })
	hostile("features_with_9_memfds", 0, iGetFeatures, func(s *feScript, r Request) {
		s.msg(r, feReply, 9, true, r, Version|FlagReply, 0, putU64(uint64(feDevFeatures)))
	})
	hostile("features_with_eventfd", 0, iGetFeatures, func(s *feScript, r Request) {
		s.msg(r, feReply, 1, false, r, Version|FlagReply, 0, putU64(uint64(feDevFeatures)))
	})
	hostile("features_short", 0, iGetFeatures, func(s *feScript, r Request) { s.reply(r, []byte{1, 2, 3}) })
	hostile("features_oversize", 0, iGetFeatures, func(s *feScript, r Request) {
		s.msg(r, feReply, 0, false, r, Version|FlagReply, 0, make([]byte, MaxPayload+1))
	})
	hostile("features_truncated", 0, iGetFeatures, func(s *feScript, r Request) {
		// The size says 8 more bytes than are sent, then the back-end
		// hangs up.
		s.msg(r, feReply, 0, false, r, Version|FlagReply, 8, putU64(uint64(feDevFeatures)))
	})
	hostile("unsolicited_before_features", 0, iGetFeatures, func(s *feScript, r Request) {
		s.msg(r, feReplyMore, 0, false, ReqGetVringBase, Version|FlagReply, 0, VringState{}.Encode())
		s.reply(r, putU64(uint64(feDevFeatures)))
	})
	hostile("bad_version", 0, iGetFeatures, func(s *feScript, r Request) {
		s.msg(r, feReply, 0, false, r, 2|FlagReply, 0, putU64(uint64(feDevFeatures)))
	})
	hostile("mem_table_nack", 0, iSetMemTable, func(s *feScript, r Request) { s.reply(r, putU64(^uint64(0))) })
	hostile("mem_table_ack_short", 0, iSetMemTable, func(s *feScript, r Request) { s.reply(r, []byte{0}) })
	hostile("stall_on_status", 0, iGetStatus, func(s *feScript, r Request) { s.op(r, feStall) })
	hostile("hang_up_on_status", 0, iGetStatus, func(s *feScript, r Request) { s.op(r, feHangUp) })
	// Replies late in the session: index of the first GET_VRING_BASE
	// (Suspend) and of GET_CONFIG in the faithful scripts.
	idx := func(opts byte, r Request) int {
		for i, q := range feFaithful(opts).reqs {
			if q == r {
				return i
			}
		}
		panic(r)
	}
	split, packed := byte(0), byte(feOptPacked|feOptLog)
	hostile("split_base_beyond_16_bits", split, idx(split, ReqGetVringBase), func(s *feScript, r Request) {
		s.reply(r, VringState{Index: 1, Num: 1 << 16}.Encode())
	})
	hostile("base_for_another_ring", split, idx(split, ReqGetVringBase), func(s *feScript, r Request) {
		s.reply(r, VringState{Index: 0}.Encode())
	})
	hostile("packed_base_index_beyond_size", packed, idx(packed, ReqGetVringBase), func(s *feScript, r Request) {
		s.reply(r, VringState{Index: 1, Num: 1<<15 | feQueueSize | (1<<15|feQueueSize)<<16}.Encode())
	})
	hostile("packed_base_used_ahead", packed, idx(packed, ReqGetVringBase), func(s *feScript, r Request) {
		s.reply(r, VringState{Index: 1, Num: 1<<15 | 3 | (1<<15|5)<<16}.Encode())
	})
	hostile("config_reply_longer", split, idx(split, ReqGetConfig), func(s *feScript, r Request) {
		s.reply(r, Config{Data: make([]byte, 8)}.Encode())
	})
	hostile("config_size_field_lies", split, idx(split, ReqGetConfig), func(s *feScript, r Request) {
		p := Config{Data: make([]byte, 6)}.Encode()
		binary.NativeEndian.PutUint32(p[4:], 200)
		s.reply(r, p)
	})
	hostile("log_base_with_memfd", packed, idx(packed, ReqSetLogBase), func(s *feScript, r Request) {
		s.msg(r, feReply, 1, true, r, Version|FlagReply, 0, putU64(0))
	})
	return seeds
}

// feAllowedErrs are the errors a Frontend may return facing a hostile
// back-end: the package's sentinels for bad peer input, its state errors,
// the caller's context ending, Close, and the socket failing (a hang-up is
// io.EOF or a reset/broken pipe, wrapped in a *MessageError, and
// ErrSessionBroken wrapping it afterwards).
var feAllowedErrs = []error{
	ErrTruncated, ErrPayloadTooLarge, ErrBadVersion, ErrBadSize, ErrFdCount, ErrProtocol,
	ErrReplyFailed, ErrUnexpectedReply, ErrSessionBroken, ErrUnsupported,
	vdpa.ErrClosed, context.DeadlineExceeded, context.Canceled,
	io.EOF, syscall.EPIPE, syscall.ECONNRESET,
}

func requireFeError(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	for _, e := range feAllowedErrs {
		if errors.Is(err, e) {
			return
		}
	}
	t.Fatalf("%s: error %q (%T) wraps none of the expected errors", what, err, err)
}

// feBackend is the fake back-end.
type feBackend struct {
	opts   byte
	script []byte
	done   chan struct{}

	mu       sync.Mutex
	reqs     []Request // requests received, in order
	sent     []Message // messages sent (headers and payloads; no descriptors)
	consumed bool      // the script ran out
	err      error     // a harness failure (not the Frontend's)

	// Well-behaved state for feAuto.
	status uint64
	bases  map[uint32]uint32
}

func startFeBackend(c *conn, opts byte, script []byte) *feBackend {
	be := &feBackend{opts: opts, script: script, done: make(chan struct{}), bases: map[uint32]uint32{}}
	go func() {
		defer close(be.done)
		defer c.close()
		be.serve(c)
	}()
	return be
}

func (be *feBackend) serve(c *conn) {
	stalled := false
	for {
		m, err := c.read()
		if err != nil {
			return // the Frontend hung up (or sent garbage, which the checks below catch)
		}
		m.Close()
		be.mu.Lock()
		be.reqs = append(be.reqs, m.Request)
		be.mu.Unlock()
		if stalled {
			continue
		}
		for {
			r, ok := feNext(&be.script)
			if !ok {
				be.mu.Lock()
				be.consumed = true
				be.mu.Unlock()
				return
			}
			var h Header
			var p []byte
			switch r.action {
			case feSilent:
				if feAwaitsReply(m) {
					return // see feSilent
				}
			case feHangUp:
				return
			case feStall:
				stalled = true
			case feAuto:
				var send bool
				h, p, send = be.autoReply(m)
				if !send {
					break
				}
				if err := be.send(c, h, p, r); err != nil {
					return
				}
			case feReply, feReplyMore:
				req := Request(r.req)
				if req == 0 {
					req = m.Request
				}
				h = Header{Request: req, Flags: Flags(r.flags), Size: uint32(int64(len(r.payload)) + int64(r.delta))}
				if err := be.send(c, h, r.payload, r); err != nil {
					return
				}
				if r.delta > 0 {
					// The size field promises more than was sent: hang
					// up inside the message (ErrTruncated). Waiting
					// instead would only repeat feStall's deadline.
					return
				}
			}
			if r.action != feReplyMore {
				break
			}
		}
	}
}

// feAwaitsReply reports whether the Frontend reads a reply to m: a GET,
// SET_LOG_BASE (always answered), or a request with NEED_REPLY.
func feAwaitsReply(m *Message) bool {
	switch m.Request {
	case ReqGetFeatures, ReqGetProtocolFeatures, ReqGetQueueNum, ReqGetVringBase, ReqGetConfig, ReqGetStatus, ReqSetLogBase:
		return true
	}
	return m.NeedReply()
}

// send writes h (with its size field as given, whatever the payload's
// length) and p with r's descriptors.
func (be *feBackend) send(c *conn, h Header, p []byte, r feRecord) error {
	fds, err := feMakeFds(r.nfds, r.memfd)
	defer closeFds(fds)
	if err != nil {
		be.mu.Lock()
		be.err = err
		be.mu.Unlock()
		return err
	}
	b := make([]byte, HeaderSize, HeaderSize+len(p))
	h.put(b)
	b = append(b, p...)
	be.mu.Lock()
	be.sent = append(be.sent, Message{Header: h, Payload: p})
	be.mu.Unlock()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err = c.uc.WriteMsgUnix(b, oob, nil)
	return err
}

func feMakeFds(n int, memfd bool) ([]int, error) {
	fds := make([]int, 0, n)
	for range n {
		var fd int
		var err error
		if memfd {
			if fd, err = unix.MemfdCreate("fe-fuzz", unix.MFD_CLOEXEC); err == nil {
				err = unix.Ftruncate(fd, 1<<16)
				if err != nil {
					_ = unix.Close(fd)
				}
			}
		} else {
			fd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		}
		if err != nil {
			closeFds(fds)
			return nil, err
		}
		fds = append(fds, fd)
	}
	return fds, nil
}

// autoReply is a well-behaved back-end's answer to m.
func (be *feBackend) autoReply(m *Message) (Header, []byte, bool) {
	h := Header{Request: m.Request, Flags: Version | FlagReply}
	var p []byte
	switch m.Request {
	case ReqGetFeatures:
		p = putU64(uint64(feDevFeatures))
	case ReqGetProtocolFeatures:
		p = putU64(uint64(SupportedProtocolFeatures))
	case ReqGetQueueNum:
		p = putU64(1)
	case ReqSetStatus:
		be.status = m.U64()
	case ReqGetStatus:
		p = putU64(be.status)
	case ReqSetVringBase:
		if st, err := DecodeVringState(m.Payload); err == nil {
			be.bases[st.Index] = st.Num
		}
	case ReqGetVringBase:
		st, _ := DecodeVringState(m.Payload)
		st.Num = be.bases[st.Index]
		p = st.Encode()
	case ReqGetConfig:
		c, err := DecodeConfig(m.Payload)
		size := virtio.NetConfigSize
		if be.opts&feOptBlock != 0 {
			size = feBlockConfigSize
		}
		if err == nil && int(c.Offset)+len(c.Data) <= size {
			p = Config{Offset: c.Offset, Flags: c.Flags, Data: make([]byte, len(c.Data))}.Encode()
		}
	case ReqSetLogBase:
		p = putU64(0)
	default:
		if !m.NeedReply() {
			return h, nil, false
		}
	}
	if m.NeedReply() && p == nil {
		p = putU64(0)
	}
	h.Size = uint32(len(p))
	return h, p, true
}

// sentU64s returns the u64 payloads of the well-formed replies to r the
// back-end sent: a size field of 8 and at least 8 bytes sent. The socket
// is a stream, so the Frontend reads the 8 bytes the size field covers;
// bytes sent beyond them are the start of the next message to it.
func (be *feBackend) sentU64s(r Request) []uint64 {
	be.mu.Lock()
	defer be.mu.Unlock()
	var vs []uint64
	for _, m := range be.sent {
		if m.Request == r && m.IsReply() && len(m.Payload) >= u64Size && m.Size == u64Size {
			vs = append(vs, binary.NativeEndian.Uint64(m.Payload))
		}
	}
	return vs
}

// sentPayloads returns the payloads of the replies to r that were sent
// whole: the bytes their size fields cover (see sentU64s).
func (be *feBackend) sentPayloads(r Request) [][]byte {
	be.mu.Lock()
	defer be.mu.Unlock()
	var ps [][]byte
	for _, m := range be.sent {
		if m.Request == r && m.IsReply() && int(m.Size) <= len(m.Payload) {
			ps = append(ps, m.Payload[:m.Size])
		}
	}
	return ps
}

// feResult is what a session run reports to the unit test of the seeds.
type feResult struct {
	failed   []string // calls that returned an error, with the error
	reqs     []Request
	consumed bool // the back-end ran out of script before Close
	rest     int  // bytes of script left after Close
}

// feSession drives the Frontend.
type feSession struct {
	t       *testing.T
	timeout time.Duration
	be      *feBackend
	res     feResult
}

// call runs fn with a context deadline and requires it to return within
// the deadline (plus feGrace) with an allowed error. fn runs on another
// goroutine (so that a hang is reported, not waited for): it must only
// call the Frontend; checks of its results belong after call returns.
func (s *feSession) call(what string, fn func(ctx context.Context) error) error {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- fn(ctx) }()
	var err error
	select {
	case err = <-errc:
	case <-time.After(s.timeout + feGrace):
		buf := make([]byte, 1<<20)
		s.t.Fatalf("%s still blocked %v after its deadline:\n%s", what, feGrace, buf[:runtime.Stack(buf, true)])
	}
	requireFeError(s.t, what, err)
	if err != nil {
		s.res.failed = append(s.res.failed, fmt.Sprintf("%s: %v", what, err))
	}
	return err
}

// runFrontendSession runs one session against the script in and checks
// everything that must hold whatever the script says.
func runFrontendSession(t *testing.T, in []byte, timeout time.Duration) feResult {
	t.Helper()
	// Counted before anything of this session exists.
	goroutines, fds := runtime.NumGoroutine(), openFdSet(t)
	var opts byte
	if len(in) > 0 {
		opts, in = in[0], in[1:]
	}
	s := &feSession{t: t, timeout: timeout}
	s.run(opts, in)
	res := s.res
	// Everything of this session is closed: the count comes back, after
	// the goroutines that were ending have ended (a closed socket's
	// poller wake-ups, timers' AfterFunc).
	deadline := time.Now().Add(5 * time.Second)
	for (runtime.NumGoroutine() > goroutines || len(leakedSince(t, fds)) != 0) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goroutines {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines left after Close (had %d):\n%s", n-goroutines, goroutines, buf[:runtime.Stack(buf, true)])
	}
	require.Empty(t, leakedSince(t, fds), "descriptors after Close")
	return res
}

func (s *feSession) run(opts byte, script []byte) {
	t := s.t
	block := opts&feOptBlock != 0
	// The driver's resources, closed after the Frontend (the Frontend
	// does not own them).
	r, err := vring.NewMemfdRegion(0, 2*feStride, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	defer func() { require.NoError(t, mem.Close()) }()
	log, err := dirty.New(2*feStride, &dirty.Options{Shared: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, log.Close()) }()
	var efds []*vdpa.EventFD
	defer func() {
		for _, e := range efds {
			require.NoError(t, e.Close())
		}
	}()
	newEFD := func() *vdpa.EventFD {
		e, err := vdpa.NewEventFD()
		require.NoError(t, err)
		efds = append(efds, e)
		return e
	}

	a, b := feSocketpair(t)
	s.be = startFeBackend(b, opts, script)
	defer func() {
		// The back-end ends when the Frontend's socket closes.
		select {
		case <-s.be.done:
		case <-time.After(5 * time.Second):
			t.Fatal("fake back-end still running after Close")
		}
		s.be.mu.Lock()
		defer s.be.mu.Unlock()
		require.NoError(t, s.be.err, "fake back-end")
		s.res.reqs = s.be.reqs
		s.res.consumed = s.be.consumed
		s.res.rest = len(s.be.script)
	}()

	fo := &FrontendOptions{Timeout: time.Minute}
	if block {
		fo.DeviceID = virtio.DeviceBlock
	}
	var f *Frontend
	if err := s.call("NewFrontend", func(ctx context.Context) (err error) { f, err = NewFrontend(ctx, a.uc, fo); return }); err != nil {
		_ = a.close() // the caller still owns the connection
		return
	}
	// On a failed check too, so the back-end and the counts settle
	// before the next input.
	closed := false
	defer func() {
		if !closed {
			_ = f.Close()
		}
	}()
	s.drive(f, opts, mem, log, newEFD)
	closed = true
	require.NoError(t, f.Close(), "first Close")
	require.ErrorIs(t, f.Close(), vdpa.ErrClosed, "second Close")
	require.ErrorIs(t, f.SetStatus(0), vdpa.ErrClosed, "request after Close")
}

// drive runs the device life of a virtio driver: the sequence feFaithful
// answers. It goes on after errors (a hostile back-end may make one call
// fail and the next succeed), as a VMM retrying or tearing down would.
func (s *feSession) drive(f *Frontend, opts byte, mem *vring.Memory, log *dirty.Bitmap, newEFD func() *vdpa.EventFD) {
	t := s.t
	packed := opts&feOptPacked != 0
	logging := opts&feOptLog != 0
	s.checkHandshake(f)
	nq, err := f.NumQueues()
	require.NoError(t, err)
	nq = min(nq, 2)
	offered, err := f.Features()
	require.NoError(t, err)
	want := feDriverFeatures
	if packed {
		want = want.With(virtio.FRingPacked)
	}
	acked := offered & want
	packed = acked.Has(virtio.FRingPacked)

	st := virtio.StatusAcknowledge | virtio.StatusDriver
	_ = s.call("SetStatus(DRIVER)", func(ctx context.Context) error { return f.SetStatusContext(ctx, st) })
	_ = s.call("SetFeatures", func(ctx context.Context) error { return f.SetFeaturesContext(ctx, acked) })
	st |= virtio.StatusFeaturesOK
	_ = s.call("SetStatus(FEATURES_OK)", func(ctx context.Context) error { return f.SetStatusContext(ctx, st) })
	var got virtio.Status
	if s.call("Status", func(ctx context.Context) (err error) { got, err = f.StatusContext(ctx); return }) == nil {
		s.checkStatus(f, got)
	}
	_ = s.call("SetMemory", func(ctx context.Context) error { return f.SetMemoryContext(ctx, mem) })
	logSet := false
	if logging {
		logSet = s.call("SetLog", func(ctx context.Context) error { return f.SetLogContext(ctx, log) }) == nil
	}
	// sized[q]: the Frontend knows ring q's size (checkBase).
	sized := make([]bool, nq)
	for q := range nq {
		base := vring.GuestAddr(q) * feStride
		l := vring.ContiguousLayout(base, feQueueSize)
		sized[q] = s.call("SetQueueNum", func(ctx context.Context) error { return f.SetQueueNumContext(ctx, q, feQueueSize) }) == nil
		_ = s.call("SetQueueAddr", func(ctx context.Context) error {
			return f.SetQueueAddrContext(ctx, q, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used})
		})
		_ = s.call("SetQueueBase", func(ctx context.Context) error { return f.SetQueueBaseContext(ctx, q, feStartBase(packed)) })
		_ = s.call("SetQueueCall", func(ctx context.Context) error { return f.SetQueueCallContext(ctx, q, newEFD()) })
		_ = s.call("SetQueueErr", func(ctx context.Context) error { return f.SetQueueErrContext(ctx, q, newEFD()) })
		_ = s.call("SetQueueKick", func(ctx context.Context) error { return f.SetQueueKickContext(ctx, q, newEFD()) })
		_ = s.call("EnableQueue", func(ctx context.Context) error { return f.EnableQueueContext(ctx, q, true) })
	}
	st |= virtio.StatusDriverOK
	_ = s.call("SetStatus(DRIVER_OK)", func(ctx context.Context) error { return f.SetStatusContext(ctx, st) })

	size := 0
	if s.call("ConfigSize", func(ctx context.Context) (err error) { size, err = f.ConfigSizeContext(ctx); return }) == nil {
		require.True(t, size >= 0 && size <= MaxConfigSize, "ConfigSize %d", size)
	}
	cfg := make([]byte, min(size, len(feConfigData())))
	if s.call("ReadConfig", func(ctx context.Context) error { return f.ReadConfigContext(ctx, 0, cfg) }) == nil {
		s.checkConfig(cfg)
	}
	_ = s.call("WriteConfig", func(ctx context.Context) error { return f.WriteConfigContext(ctx, 0, feConfigData()[:len(cfg)]) })
	if logSet && offered.Has(virtio.FLogAll) {
		_ = s.call("SetFeatures(LOG_ALL)", func(ctx context.Context) error { return f.SetFeaturesContext(ctx, acked.With(virtio.FLogAll)) })
		_ = s.call("SetFeatures(no LOG_ALL)", func(ctx context.Context) error { return f.SetFeaturesContext(ctx, acked) })
	}

	_ = s.call("Suspend", func(ctx context.Context) error { return f.SuspendContext(ctx) })
	var base vdpa.QueueState
	if s.call("QueueBase(0)", func(ctx context.Context) (err error) { base, err = f.QueueBaseContext(ctx, 0); return }) == nil {
		s.checkBase(0, base, packed, sized[0])
	}
	_ = s.call("Resume", func(ctx context.Context) error { return f.ResumeContext(ctx) })
	last := nq - 1
	if s.call("QueueBase(last)", func(ctx context.Context) (err error) { base, err = f.QueueBaseContext(ctx, last); return }) == nil {
		s.checkBase(last, base, packed, sized[last])
	}
	_ = s.call("SetStatus(0)", func(ctx context.Context) error { return f.SetStatusContext(ctx, 0) })
}

// checkHandshake: the queue count and features are ones the back-end
// reported, within the protocol's limits.
func (s *feSession) checkHandshake(f *Frontend) {
	t := s.t
	nq, err := f.NumQueues()
	require.NoError(t, err)
	require.True(t, nq >= 1 && nq <= MaxQueues, "NumQueues %d", nq)
	pf := f.ProtocolFeatures()
	require.Zero(t, pf&^SupportedProtocolFeatures, "protocol features beyond the supported ones: %v", pf)
	if pf.Has(PFMQ) {
		per := uint64(1)
		if f.opts.DeviceID == virtio.DeviceNet {
			per = 2
		}
		require.Contains(t, s.scaled(s.be.sentU64s(ReqGetQueueNum), per), uint64(nq),
			"NumQueues %d is not what GET_QUEUE_NUM reported", nq)
	}
	fs, err := f.Features()
	require.NoError(t, err)
	found := false
	for _, v := range s.be.sentU64s(ReqGetFeatures) {
		found = found || virtio.Features(v)&^virtio.FProtocolFeat.Bit() == fs
	}
	require.True(t, found, "Features %#x is not what GET_FEATURES reported", uint64(fs))
}

// scaled multiplies each value by per, dropping those that overflow.
func (s *feSession) scaled(vs []uint64, per uint64) []uint64 {
	var out []uint64
	for _, v := range vs {
		if v <= ^uint64(0)/per {
			out = append(out, v*per)
		}
	}
	return out
}

// checkStatus: with STATUS the status is a GET_STATUS reply, whole (the
// device status is 8 bits: a wider value is no status). Without it the
// status is the Frontend's own record.
func (s *feSession) checkStatus(f *Frontend, got virtio.Status) {
	if !f.ProtocolFeatures().Has(PFStatus) {
		return
	}
	require.Contains(s.t, s.be.sentU64s(ReqGetStatus), uint64(got), "status %#x is not a GET_STATUS reply", uint64(got))
}

// checkConfig: data read is the data of a GET_CONFIG reply of that size.
func (s *feSession) checkConfig(got []byte) {
	for _, p := range s.be.sentPayloads(ReqGetConfig) {
		if c, err := DecodeConfig(p); err == nil && string(c.Data) == string(got) {
			return
		}
	}
	s.t.Fatalf("config %x is not a GET_CONFIG reply's", got)
}

// checkBase: a ring position is a GET_VRING_BASE reply's for that ring,
// one a ring of the size set can be at, or when the Frontend does not know
// the size (its SET_VRING_NUM failed), one a ring of some size can be at.
func (s *feSession) checkBase(q int, got vdpa.QueueState, packed, sized bool) {
	t := s.t
	found := false
	for _, p := range s.be.sentPayloads(ReqGetVringBase) {
		if st, err := DecodeVringState(p); err == nil && st.Index == uint32(q) && uint16(st.Num) == got.NextAvail {
			found = found || packed || st.Num <= 0xffff
		}
	}
	require.True(t, found, "ring %d base %+v is not a GET_VRING_BASE reply's", q, got)
	if packed {
		size := uint16(feQueueSize)
		if !sized {
			size = 1 << 15 // the largest packed ring
		}
		_, ok := got.PackedInFlight(size)
		require.True(t, ok, "ring %d: packed base %+v impossible for size %d", q, got, size)
	}
}

// feSocketpair returns the Frontend's and the back-end's ends as conns.
func feSocketpair(t *testing.T) (*conn, *conn) {
	t.Helper()
	a, b := socketpair(t)
	return newConn(a), newConn(b)
}

// The faithful scripts run the whole session: every call succeeds, the
// Frontend sends exactly the requests the script answers, and the script
// is used up exactly (so the seeds exercise every step, and a change in the
// Frontend's message flow shows here first).
func TestFrontendSessionFaithfulScripts(t *testing.T) {
	for _, sd := range feSeeds() {
		if !sd.faithful {
			continue
		}
		t.Run(sd.name, func(t *testing.T) {
			res := runFrontendSession(t, sd.script, 10*time.Second)
			require.Empty(t, res.failed, "calls that failed")
			require.Equal(t, sd.reqs, res.reqs, "requests sent")
			require.False(t, res.consumed, "the script ran out before Close")
			require.Zero(t, res.rest, "script bytes left")
		})
	}
}

// An all-feAuto script behaves like the faithful one: the well-behaved
// back-end the fuzzer falls back to agrees with the spelled-out one.
func TestFrontendSessionAutoScript(t *testing.T) {
	for _, opts := range []byte{0, feOptPacked | feOptLog, feOptBlock} {
		t.Run(fmt.Sprint(opts), func(t *testing.T) {
			want := feFaithful(opts).reqs
			script := []byte{opts}
			for range want {
				script = append(script, feAuto)
			}
			res := runFrontendSession(t, script, 10*time.Second)
			require.Empty(t, res.failed, "calls that failed")
			require.Equal(t, want, res.reqs, "requests sent")
			require.Zero(t, res.rest, "script bytes left")
		})
	}
}

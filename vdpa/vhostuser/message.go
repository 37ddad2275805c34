package vhostuser

import (
	"encoding/binary"

	"golang.org/x/sys/unix"
)

// Header is the fixed 12-byte message header. All numbers are in the
// machine's native byte order.
type Header struct {
	Request Request
	Flags   Flags
	Size    uint32
}

// NeedReply reports whether the sender asked for a REPLY_ACK.
func (h Header) NeedReply() bool { return h.Flags&FlagNeedReply != 0 }

// IsReply reports whether the reply flag is set.
func (h Header) IsReply() bool { return h.Flags&FlagReply != 0 }

func (h Header) put(b []byte) {
	binary.NativeEndian.PutUint32(b[0:], uint32(h.Request))
	binary.NativeEndian.PutUint32(b[4:], uint32(h.Flags))
	binary.NativeEndian.PutUint32(b[8:], h.Size)
}

// DecodeHeader parses and checks a header: version 1, no unknown flag bits,
// a payload no larger than MaxPayload. The request type is not checked here
// (see Validate) so a reader can still consume the payload of an unknown
// request and report it precisely.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, msgErr(0, ErrTruncated, "header is %d bytes, need %d", len(b), HeaderSize)
	}
	h := Header{
		Request: Request(binary.NativeEndian.Uint32(b[0:])),
		Flags:   Flags(binary.NativeEndian.Uint32(b[4:])),
		Size:    binary.NativeEndian.Uint32(b[8:]),
	}
	if h.Flags&FlagVersionMask != Version || h.Flags&^flagsKnown != 0 {
		return h, msgErr(h.Request, ErrBadVersion, "flags %#x", uint32(h.Flags))
	}
	if h.Size > MaxPayload {
		return h, msgErr(h.Request, ErrPayloadTooLarge, "size %d > %d", h.Size, MaxPayload)
	}
	return h, nil
}

// Message is one decoded message: header, raw payload and the file
// descriptors that arrived with it. The Message owns Fds until they are
// taken with TakeFd; Close closes the rest.
type Message struct {
	Header
	Payload []byte
	Fds     []int
}

// TakeFd transfers ownership of the i'th descriptor to the caller.
func (m *Message) TakeFd(i int) int {
	fd := m.Fds[i]
	m.Fds[i] = -1
	return fd
}

// Close closes every descriptor not taken.
func (m *Message) Close() {
	closeFds(m.Fds)
	m.Fds = nil
}

func closeFds(fds []int) {
	for i, fd := range fds {
		if fd >= 0 {
			_ = unix.Close(fd)
			fds[i] = -1
		}
	}
}

// Decode parses a whole message (header followed by exactly Size payload
// bytes) that arrived with fds, and validates it as a front-end request
// (see Validate). Decode takes ownership of fds: on error they are all
// closed.
func Decode(b []byte, fds []int) (*Message, error) {
	h, err := DecodeHeader(b)
	if err != nil {
		closeFds(fds)
		return nil, err
	}
	if uint64(len(b)-HeaderSize) != uint64(h.Size) {
		closeFds(fds)
		if len(b)-HeaderSize < int(h.Size) {
			return nil, msgErr(h.Request, ErrTruncated, "payload is %d bytes, header says %d", len(b)-HeaderSize, h.Size)
		}
		return nil, msgErr(h.Request, ErrBadSize, "%d bytes after a payload of %d", len(b)-HeaderSize-int(h.Size), h.Size)
	}
	m := &Message{Header: h, Payload: b[HeaderSize:], Fds: fds}
	if err := Validate(m); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// Validate checks a front-end request's payload size and descriptor count
// against its type. It does not close descriptors.
func Validate(m *Message) error {
	r, n, nfd := m.Request, len(m.Payload), len(m.Fds)
	if !r.Known() {
		return msgErr(r, ErrUnknownRequest, "type %d", uint32(r))
	}
	if m.IsReply() {
		return msgErr(r, ErrProtocol, "front-end request has the reply flag")
	}
	size := func(want int) error {
		if n != want {
			return msgErr(r, ErrBadSize, "payload %d bytes, want %d", n, want)
		}
		return nil
	}
	fds := func(lo, hi int) error {
		if nfd < lo || nfd > hi {
			if lo == hi {
				return msgErr(r, ErrFdCount, "%d descriptors, want %d", nfd, lo)
			}
			return msgErr(r, ErrFdCount, "%d descriptors, want %d..%d", nfd, lo, hi)
		}
		return nil
	}
	both := func(errs ...error) error {
		for _, e := range errs {
			if e != nil {
				return e
			}
		}
		return nil
	}
	switch r {
	case ReqGetFeatures, ReqSetOwner, ReqResetOwner, ReqGetProtocolFeatures, ReqGetQueueNum,
		ReqPostcopyAdvise, ReqPostcopyListen, ReqPostcopyEnd, ReqResetDevice,
		ReqGetMaxMemSlots, ReqGetStatus:
		// No payload is defined; some front-ends send a zeroed u64 anyway.
		if n != 0 && n != u64Size {
			return msgErr(r, ErrBadSize, "payload %d bytes, want 0", n)
		}
		return fds(0, 0)
	case ReqSetFeatures, ReqSetProtocolFeatures, ReqSendRARP, ReqNetSetMTU, ReqCloseCryptoSession,
		ReqSetStatus:
		return both(size(u64Size), fds(0, 0))
	case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		if err := size(u64Size); err != nil {
			return err
		}
		v := binary.NativeEndian.Uint64(m.Payload)
		if v&^uint64(VringIndexMask|VringNoFd) != 0 {
			return msgErr(r, ErrProtocol, "reserved bits set in %#x", v)
		}
		if v&VringNoFd != 0 {
			return fds(0, 0)
		}
		return fds(1, 1)
	case ReqSetVringNum, ReqSetVringBase, ReqGetVringBase, ReqSetVringEnable, ReqSetVringEndian,
		ReqVringKick:
		return both(size(vringStateSize), fds(0, 0))
	case ReqSetVringAddr:
		return both(size(vringAddrSize), fds(0, 0))
	case ReqSetMemTable:
		if n < memTableHdrSize {
			return msgErr(r, ErrBadSize, "payload %d bytes, want at least %d", n, memTableHdrSize)
		}
		nr := binary.NativeEndian.Uint32(m.Payload)
		if nr > MaxRegions {
			return msgErr(r, ErrTooManyRegions, "%d regions > %d", nr, MaxRegions)
		}
		if want := memTableHdrSize + int(nr)*memRegionSize; n < want || n > memTableHdrSize+MaxRegions*memRegionSize {
			return msgErr(r, ErrBadSize, "payload %d bytes for %d regions, want %d", n, nr, want)
		}
		return fds(int(nr), int(nr))
	case ReqSetLogBase:
		// The fd is present when LOG_SHMFD is negotiated; the back-end
		// checks that against its negotiated state.
		return both(size(logSize), fds(0, 1))
	case ReqSetLogFd, ReqSetBackendReqFd, ReqGPUSetSocket:
		if n != 0 && n != u64Size {
			return msgErr(r, ErrBadSize, "payload %d bytes, want 0", n)
		}
		return fds(1, 1)
	case ReqIOTLBMsg:
		if n < iotlbSize || n > iotlbMaxSize {
			return msgErr(r, ErrBadSize, "payload %d bytes, want %d..%d", n, iotlbSize, iotlbMaxSize)
		}
		return fds(0, 0)
	case ReqGetConfig, ReqSetConfig:
		if n < configHeaderSize {
			return msgErr(r, ErrBadSize, "payload %d bytes, want at least %d", n, configHeaderSize)
		}
		sz := binary.NativeEndian.Uint32(m.Payload[4:])
		if sz > MaxConfigSize || n != configHeaderSize+int(sz) {
			return msgErr(r, ErrBadSize, "config size %d in a %d-byte payload", sz, n)
		}
		return fds(0, 0)
	case ReqGetInflightFd:
		if n < inflightMinSize || n > inflightMaxSize {
			return msgErr(r, ErrBadSize, "payload %d bytes, want %d..%d", n, inflightMinSize, inflightMaxSize)
		}
		return fds(0, 0)
	case ReqSetInflightFd:
		if n < inflightMinSize || n > inflightMaxSize {
			return msgErr(r, ErrBadSize, "payload %d bytes, want %d..%d", n, inflightMinSize, inflightMaxSize)
		}
		return fds(1, 1)
	case ReqAddMemReg:
		return both(size(singleRegionSize), fds(1, 1))
	case ReqRemMemReg:
		// The spec allows a stray descriptor for compatibility; it is
		// closed unused.
		return both(size(singleRegionSize), fds(0, 1))
	case ReqCreateCryptoSession:
		// Variable-size session description; bounded by MaxPayload.
		return fds(0, 0)
	}
	return msgErr(r, ErrUnknownRequest, "type %d", uint32(r))
}

// Encode appends the wire form of header h and payload p to dst; h.Size is
// set from len(p).
func Encode(dst []byte, h Header, p []byte) []byte {
	h.Size = uint32(len(p))
	var hb [HeaderSize]byte
	h.put(hb[:])
	dst = append(dst, hb[:]...)
	return append(dst, p...)
}

// U64 returns the payload as a u64. Validate has checked the size.
func (m *Message) U64() uint64 {
	if len(m.Payload) < u64Size {
		return 0
	}
	return binary.NativeEndian.Uint64(m.Payload)
}

func putU64(v uint64) []byte {
	b := make([]byte, u64Size)
	binary.NativeEndian.PutUint64(b, v)
	return b
}

// VringState is the vring state description payload (struct
// vhost_vring_state).
type VringState struct {
	Index uint32
	Num   uint32
}

// DecodeVringState parses a vring state description.
func DecodeVringState(p []byte) (VringState, error) {
	if len(p) != vringStateSize {
		return VringState{}, ErrBadSize
	}
	return VringState{Index: binary.NativeEndian.Uint32(p), Num: binary.NativeEndian.Uint32(p[4:])}, nil
}

// Encode returns the wire form.
func (s VringState) Encode() []byte {
	b := make([]byte, vringStateSize)
	binary.NativeEndian.PutUint32(b, s.Index)
	binary.NativeEndian.PutUint32(b[4:], s.Num)
	return b
}

// VringAddr is the vring address description payload (struct
// vhost_vring_addr): ring addresses are user addresses of the front-end's
// process (or IOVAs with IOMMU_PLATFORM); Log is a guest address.
type VringAddr struct {
	Index uint32
	Flags uint32
	Desc  uint64
	Used  uint64
	Avail uint64
	Log   uint64
}

// DecodeVringAddr parses a vring address description.
func DecodeVringAddr(p []byte) (VringAddr, error) {
	if len(p) != vringAddrSize {
		return VringAddr{}, ErrBadSize
	}
	e := binary.NativeEndian
	return VringAddr{
		Index: e.Uint32(p), Flags: e.Uint32(p[4:]),
		Desc: e.Uint64(p[8:]), Used: e.Uint64(p[16:]), Avail: e.Uint64(p[24:]), Log: e.Uint64(p[32:]),
	}, nil
}

// Encode returns the wire form.
func (a VringAddr) Encode() []byte {
	b := make([]byte, vringAddrSize)
	e := binary.NativeEndian
	e.PutUint32(b, a.Index)
	e.PutUint32(b[4:], a.Flags)
	e.PutUint64(b[8:], a.Desc)
	e.PutUint64(b[16:], a.Used)
	e.PutUint64(b[24:], a.Avail)
	e.PutUint64(b[32:], a.Log)
	return b
}

// MemoryRegion is one entry of a memory table.
type MemoryRegion struct {
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
	MmapOffset    uint64
}

func decodeRegion(p []byte) MemoryRegion {
	e := binary.NativeEndian
	return MemoryRegion{GuestPhysAddr: e.Uint64(p), MemorySize: e.Uint64(p[8:]),
		UserspaceAddr: e.Uint64(p[16:]), MmapOffset: e.Uint64(p[24:])}
}

func (r MemoryRegion) put(b []byte) {
	e := binary.NativeEndian
	e.PutUint64(b, r.GuestPhysAddr)
	e.PutUint64(b[8:], r.MemorySize)
	e.PutUint64(b[16:], r.UserspaceAddr)
	e.PutUint64(b[24:], r.MmapOffset)
}

// DecodeMemTable parses a memory regions description. It checks the count
// and size only; region contents are checked when mapped.
func DecodeMemTable(p []byte) ([]MemoryRegion, error) {
	if len(p) < memTableHdrSize {
		return nil, ErrBadSize
	}
	n := binary.NativeEndian.Uint32(p)
	if n > MaxRegions {
		return nil, ErrTooManyRegions
	}
	if len(p) < memTableHdrSize+int(n)*memRegionSize {
		return nil, ErrBadSize
	}
	rs := make([]MemoryRegion, n)
	for i := range rs {
		rs[i] = decodeRegion(p[memTableHdrSize+i*memRegionSize:])
	}
	return rs, nil
}

// EncodeMemTable returns the wire form of a memory table with len(rs)
// regions (the size front-ends send: only the regions present).
func EncodeMemTable(rs []MemoryRegion) []byte {
	b := make([]byte, memTableHdrSize+len(rs)*memRegionSize)
	binary.NativeEndian.PutUint32(b, uint32(len(rs)))
	for i, r := range rs {
		r.put(b[memTableHdrSize+i*memRegionSize:])
	}
	return b
}

// DecodeSingleRegion parses the payload of ADD_MEM_REG and REM_MEM_REG: a
// u64 of padding and one region.
func DecodeSingleRegion(p []byte) (MemoryRegion, error) {
	if len(p) != singleRegionSize {
		return MemoryRegion{}, ErrBadSize
	}
	return decodeRegion(p[8:]), nil
}

// EncodeSingleRegion returns the payload of ADD_MEM_REG and REM_MEM_REG.
func EncodeSingleRegion(r MemoryRegion) []byte {
	b := make([]byte, singleRegionSize)
	r.put(b[8:])
	return b
}

// Log is the log description payload of SET_LOG_BASE.
type Log struct {
	MmapSize   uint64
	MmapOffset uint64
}

// DecodeLog parses a log description.
func DecodeLog(p []byte) (Log, error) {
	if len(p) != logSize {
		return Log{}, ErrBadSize
	}
	return Log{MmapSize: binary.NativeEndian.Uint64(p), MmapOffset: binary.NativeEndian.Uint64(p[8:])}, nil
}

// Encode returns the wire form.
func (l Log) Encode() []byte {
	b := make([]byte, logSize)
	binary.NativeEndian.PutUint64(b, l.MmapSize)
	binary.NativeEndian.PutUint64(b[8:], l.MmapOffset)
	return b
}

// Config flag values.
const (
	ConfigFlagWritable  = 0 // front-end access to writable fields
	ConfigFlagMigration = 1 // live migration: read-only fields may be set
)

// Config is the device config space payload of GET_CONFIG/SET_CONFIG.
type Config struct {
	Offset uint32
	Flags  uint32
	Data   []byte // len(Data) is the size field
}

// DecodeConfig parses a config space payload.
func DecodeConfig(p []byte) (Config, error) {
	if len(p) < configHeaderSize {
		return Config{}, ErrBadSize
	}
	sz := binary.NativeEndian.Uint32(p[4:])
	if sz > MaxConfigSize || len(p) != configHeaderSize+int(sz) {
		return Config{}, ErrBadSize
	}
	return Config{Offset: binary.NativeEndian.Uint32(p), Flags: binary.NativeEndian.Uint32(p[8:]),
		Data: p[configHeaderSize:]}, nil
}

// Encode returns the wire form.
func (c Config) Encode() []byte {
	b := make([]byte, configHeaderSize+len(c.Data))
	binary.NativeEndian.PutUint32(b, c.Offset)
	binary.NativeEndian.PutUint32(b[4:], uint32(len(c.Data)))
	binary.NativeEndian.PutUint32(b[8:], c.Flags)
	copy(b[configHeaderSize:], c.Data)
	return b
}

// Inflight is the inflight description payload.
type Inflight struct {
	MmapSize   uint64
	MmapOffset uint64
	NumQueues  uint16
	QueueSize  uint16
}

// DecodeInflight parses an inflight description.
func DecodeInflight(p []byte) (Inflight, error) {
	if len(p) < inflightMinSize || len(p) > inflightMaxSize {
		return Inflight{}, ErrBadSize
	}
	e := binary.NativeEndian
	return Inflight{MmapSize: e.Uint64(p), MmapOffset: e.Uint64(p[8:]),
		NumQueues: e.Uint16(p[16:]), QueueSize: e.Uint16(p[18:])}, nil
}

// Encode returns the wire form (24 bytes, padded as C lays it out).
func (f Inflight) Encode() []byte {
	b := make([]byte, inflightMaxSize)
	e := binary.NativeEndian
	e.PutUint64(b, f.MmapSize)
	e.PutUint64(b[8:], f.MmapOffset)
	e.PutUint16(b[16:], f.NumQueues)
	e.PutUint16(b[18:], f.QueueSize)
	return b
}

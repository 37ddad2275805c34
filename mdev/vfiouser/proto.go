package vfiouser

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Command is a vfio-user message command.
type Command uint16

// Commands (vfio-user.rst "Commands").
const (
	CmdVersion             Command = 1
	CmdDMAMap              Command = 2
	CmdDMAUnmap            Command = 3
	CmdDeviceGetInfo       Command = 4
	CmdDeviceGetRegionInfo Command = 5
	CmdGetRegionIOFDs      Command = 6
	CmdDeviceGetIRQInfo    Command = 7
	CmdDeviceSetIRQs       Command = 8
	CmdRegionRead          Command = 9
	CmdRegionWrite         Command = 10
	CmdDMARead             Command = 11
	CmdDMAWrite            Command = 12
	CmdDeviceReset         Command = 13
	CmdRegionWriteMulti    Command = 15
	CmdDeviceFeature       Command = 16
	CmdMigDataRead         Command = 17
	CmdMigDataWrite        Command = 18
)

var cmdNames = map[Command]string{
	CmdVersion: "VERSION", CmdDMAMap: "DMA_MAP", CmdDMAUnmap: "DMA_UNMAP",
	CmdDeviceGetInfo: "DEVICE_GET_INFO", CmdDeviceGetRegionInfo: "DEVICE_GET_REGION_INFO",
	CmdGetRegionIOFDs: "DEVICE_GET_REGION_IO_FDS", CmdDeviceGetIRQInfo: "DEVICE_GET_IRQ_INFO",
	CmdDeviceSetIRQs: "DEVICE_SET_IRQS", CmdRegionRead: "REGION_READ", CmdRegionWrite: "REGION_WRITE",
	CmdDMARead: "DMA_READ", CmdDMAWrite: "DMA_WRITE", CmdDeviceReset: "DEVICE_RESET",
	CmdRegionWriteMulti: "REGION_WRITE_MULTI", CmdDeviceFeature: "DEVICE_FEATURE",
	CmdMigDataRead: "MIG_DATA_READ", CmdMigDataWrite: "MIG_DATA_WRITE",
}

func (c Command) String() string {
	if n, ok := cmdNames[c]; ok {
		return n
	}
	return fmt.Sprintf("command(%d)", uint16(c))
}

// Header flags.
const (
	FlagTypeMask uint32 = 0xf
	TypeCommand  uint32 = 0x0
	TypeReply    uint32 = 0x1
	FlagNoReply  uint32 = 1 << 4
	FlagError    uint32 = 1 << 5
	flagsKnown          = FlagTypeMask | FlagNoReply | FlagError
)

// HeaderSize is the size of the message header.
const HeaderSize = 16

// Limits this implementation enforces.
const (
	// MaxDataXfer is the largest count of a region or DMA read or write,
	// and the max_data_xfer_size this server announces (the spec default).
	MaxDataXfer = 1 << 20
	// MaxMessage bounds any message: the largest data transfer plus headers.
	MaxMessage = MaxDataXfer + 64
	// MaxMsgFds bounds the descriptors one message may carry.
	MaxMsgFds = 16
	// MaxVersionJSON bounds the capabilities JSON of a VERSION message.
	MaxVersionJSON = 4096
	// MaxWriteMulti bounds wr_cnt of REGION_WRITE_MULTI.
	MaxWriteMulti = 256
)

// Protocol version this package speaks (QEMU 11.1's client proposes 0.0).
const (
	VersionMajor = 0
	VersionMinor = 0
)

// Sentinel errors. Every decoding or serving error wraps one of them and
// carries the errno the server puts in the error reply (Errno).
var (
	// ErrTruncated: a message or payload shorter than its structure.
	ErrTruncated = errors.New("vfiouser: truncated message")
	// ErrTooLarge: a message, transfer or count above the negotiated limits.
	ErrTooLarge = errors.New("vfiouser: message too large")
	// ErrArgsz: argsz is smaller than the structure it describes.
	ErrArgsz = errors.New("vfiouser: bad argsz")
	// ErrFlags: reserved or contradictory flags.
	ErrFlags = errors.New("vfiouser: bad flags")
	// ErrCommand: an unknown command or one this server does not serve.
	ErrCommand = errors.New("vfiouser: unsupported command")
	// ErrIndex: a region or IRQ index the device does not have.
	ErrIndex = errors.New("vfiouser: no such index")
	// ErrRange: an access outside a region or a DMA range that overflows.
	ErrRange = errors.New("vfiouser: out of range")
	// ErrFds: the wrong number of file descriptors came with a message.
	ErrFds = errors.New("vfiouser: wrong file descriptors")
	// ErrExists: a DMA map overlapping an existing one (the spec's EEXIST).
	ErrExists = errors.New("vfiouser: DMA range already mapped")
	// ErrNotMapped: a DMA unmap matching no mapping, or DMA to unmapped memory.
	ErrNotMapped = errors.New("vfiouser: DMA range not mapped")
	// ErrDMALimit: a DMA map beyond the server's window count
	// (Options.MaxDMAWindows, ENOSPC) or address-space budget
	// (Options.DMABudget, ENOMEM).
	ErrDMALimit = errors.New("vfiouser: DMA window limit reached")
	// ErrBusy: the device already does what the message would start
	// (EBUSY): DMA logging started a second time. (A DMA unmap the data
	// path may still be using is not refused: the server stops the data
	// path, or resets the device, first; see Server.)
	ErrBusy = errors.New("vfiouser: device busy")
	// ErrVersion: a VERSION message this server cannot accept, or any other
	// message before it.
	ErrVersion = errors.New("vfiouser: version negotiation failed")
	// ErrDevice: the device rejected the access.
	ErrDevice = errors.New("vfiouser: device error")
	// ErrClosed: the server or session was closed.
	ErrClosed = errors.New("vfiouser: closed")
	// ErrReply: the peer answered with an error reply (client side).
	ErrReply = errors.New("vfiouser: error reply")
)

// Error is a protocol error: the command it concerns, the errno sent to the
// peer and the cause, which wraps one of the sentinel errors.
type Error struct {
	Cmd   Command
	Errno unix.Errno
	Err   error
}

func (e *Error) Error() string {
	return fmt.Sprintf("vfiouser: %v: %v (%s)", e.Cmd, e.Err, e.Errno.Error())
}

func (e *Error) Unwrap() error { return e.Err }

// Errno returns the errno a server reports for err.
func Errno(err error) unix.Errno {
	var pe *Error
	if errors.As(err, &pe) && pe.Errno != 0 {
		return pe.Errno
	}
	switch {
	case errors.Is(err, ErrExists):
		return unix.EEXIST
	case errors.Is(err, ErrNotMapped):
		return unix.ENOENT
	case errors.Is(err, ErrCommand):
		return unix.ENOSYS
	case errors.Is(err, ErrTooLarge):
		return unix.E2BIG
	case errors.Is(err, ErrRange), errors.Is(err, ErrIndex):
		return unix.EINVAL
	case errors.Is(err, ErrDevice):
		return unix.EIO
	case errors.Is(err, ErrVersion):
		return unix.ENOTSUP
	case errors.Is(err, ErrFds):
		return unix.EBADF
	case errors.Is(err, ErrBusy):
		return unix.EBUSY
	case errors.Is(err, ErrDMALimit):
		return unix.ENOSPC
	}
	return unix.EINVAL
}

func perr(cmd Command, sentinel error, format string, args ...any) error {
	return &Error{Cmd: cmd, Errno: Errno(sentinel), Err: fmt.Errorf("%w: "+format, append([]any{sentinel}, args...)...)}
}

var le = binary.LittleEndian

// Header is the 16-byte header of every message.
type Header struct {
	ID      uint16
	Command Command
	Size    uint32 // the whole message, header included
	Flags   uint32
	Error   uint32
}

// IsReply reports whether the header is a reply.
func (h Header) IsReply() bool { return h.Flags&FlagTypeMask == TypeReply }

// NoReply reports whether the sender wants no reply.
func (h Header) NoReply() bool { return h.Flags&FlagNoReply != 0 }

// Put encodes h into b[:HeaderSize].
func (h Header) Put(b []byte) {
	le.PutUint16(b[0:], h.ID)
	le.PutUint16(b[2:], uint16(h.Command))
	le.PutUint32(b[4:], h.Size)
	le.PutUint32(b[8:], h.Flags)
	le.PutUint32(b[12:], h.Error)
}

// ParseHeader decodes and validates a header: its size covers at least the
// header and at most MaxMessage, its type is command or reply, and no
// reserved flag is set.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, perr(0, ErrTruncated, "header of %d bytes", len(b))
	}
	h := Header{
		ID:      le.Uint16(b[0:]),
		Command: Command(le.Uint16(b[2:])),
		Size:    le.Uint32(b[4:]),
		Flags:   le.Uint32(b[8:]),
		Error:   le.Uint32(b[12:]),
	}
	if h.Size < HeaderSize {
		return h, perr(h.Command, ErrTruncated, "message size %d", h.Size)
	}
	if h.Size > MaxMessage {
		return h, perr(h.Command, ErrTooLarge, "message size %d (max %d)", h.Size, MaxMessage)
	}
	if h.Flags&^flagsKnown != 0 || h.Flags&FlagTypeMask > TypeReply {
		return h, perr(h.Command, ErrFlags, "header flags %#x", h.Flags)
	}
	return h, nil
}

// Capabilities is the "capabilities" object of a VERSION message.
type Capabilities struct {
	MaxMsgFds       *uint64         `json:"max_msg_fds,omitempty"`
	MaxDataXferSize *uint64         `json:"max_data_xfer_size,omitempty"`
	MaxDMAMaps      *uint64         `json:"max_dma_maps,omitempty"`
	PgSizes         *uint64         `json:"pgsizes,omitempty"`
	Migration       *MigrationCaps  `json:"migration,omitempty"`
	WriteMultiple   *bool           `json:"write_multiple,omitempty"`
	TwinSocket      json.RawMessage `json:"twin_socket,omitempty"`
}

// MigrationCaps is the "migration" capability.
type MigrationCaps struct {
	PgSize        uint64 `json:"pgsize"`
	MaxBitmapSize uint64 `json:"max_bitmap_size"`
}

// Version is the VERSION payload.
type Version struct {
	Major, Minor uint16
	Caps         Capabilities
}

type versionJSON struct {
	Capabilities *Capabilities `json:"capabilities,omitempty"`
}

// ParseVersion decodes a VERSION payload: major, minor and optional
// NUL-terminated JSON.
func ParseVersion(p []byte) (Version, error) {
	var v Version
	if len(p) < 4 {
		return v, perr(CmdVersion, ErrTruncated, "payload of %d bytes", len(p))
	}
	v.Major, v.Minor = le.Uint16(p), le.Uint16(p[2:])
	js := p[4:]
	if len(js) > MaxVersionJSON {
		return v, perr(CmdVersion, ErrTooLarge, "%d bytes of version data", len(js))
	}
	if len(js) == 0 {
		return v, nil
	}
	if js[len(js)-1] != 0 {
		return v, perr(CmdVersion, ErrTruncated, "version data not NUL-terminated")
	}
	js = js[:len(js)-1]
	var vj versionJSON
	if err := json.Unmarshal(js, &vj); err != nil {
		return v, perr(CmdVersion, ErrVersion, "version data: %v", err)
	}
	if vj.Capabilities != nil {
		v.Caps = *vj.Capabilities
	}
	return v, nil
}

// Marshal encodes the VERSION payload.
func (v Version) Marshal() []byte {
	js, _ := json.Marshal(versionJSON{Capabilities: &v.Caps})
	b := make([]byte, 4, 4+len(js)+1)
	le.PutUint16(b, v.Major)
	le.PutUint16(b[2:], v.Minor)
	b = append(b, js...)
	return append(b, 0)
}

// DMA map flags.
const (
	DMAReadable uint32 = 1 << 0
	DMAWritable uint32 = 1 << 1
)

// DMAMap is the DMA_MAP payload.
type DMAMap struct {
	Argsz, Flags          uint32
	Offset, Address, Size uint64
}

// DMAMapSize is the size of the DMA_MAP payload.
const DMAMapSize = 32

// ParseDMAMap decodes and validates a DMA_MAP payload.
func ParseDMAMap(p []byte) (DMAMap, error) {
	var m DMAMap
	if len(p) < DMAMapSize {
		return m, perr(CmdDMAMap, ErrTruncated, "payload of %d bytes", len(p))
	}
	m = DMAMap{Argsz: le.Uint32(p), Flags: le.Uint32(p[4:]), Offset: le.Uint64(p[8:]), Address: le.Uint64(p[16:]), Size: le.Uint64(p[24:])}
	if m.Argsz < DMAMapSize || uint64(m.Argsz) > uint64(len(p)) {
		return m, perr(CmdDMAMap, ErrArgsz, "argsz %d for a %d-byte payload", m.Argsz, len(p))
	}
	if m.Flags&^(DMAReadable|DMAWritable) != 0 {
		return m, perr(CmdDMAMap, ErrFlags, "flags %#x", m.Flags)
	}
	if m.Size == 0 || m.Address+m.Size-1 < m.Address || m.Offset+m.Size < m.Offset {
		return m, perr(CmdDMAMap, ErrRange, "address %#x size %#x offset %#x", m.Address, m.Size, m.Offset)
	}
	return m, nil
}

// Marshal encodes the payload.
func (m DMAMap) Marshal() []byte {
	b := make([]byte, DMAMapSize)
	le.PutUint32(b, m.Argsz)
	le.PutUint32(b[4:], m.Flags)
	le.PutUint64(b[8:], m.Offset)
	le.PutUint64(b[16:], m.Address)
	le.PutUint64(b[24:], m.Size)
	return b
}

// DMA unmap flags.
const (
	UnmapGetDirtyBitmap uint32 = 1 << 0
	UnmapAll            uint32 = 1 << 1
)

// DMAUnmap is the DMA_UNMAP payload (request and reply).
type DMAUnmap struct {
	Argsz, Flags  uint32
	Address, Size uint64
}

// DMAUnmapSize is the size of the DMA_UNMAP payload.
const DMAUnmapSize = 24

// ParseDMAUnmap decodes and validates a DMA_UNMAP payload.
func ParseDMAUnmap(p []byte) (DMAUnmap, error) {
	var m DMAUnmap
	if len(p) < DMAUnmapSize {
		return m, perr(CmdDMAUnmap, ErrTruncated, "payload of %d bytes", len(p))
	}
	m = DMAUnmap{Argsz: le.Uint32(p), Flags: le.Uint32(p[4:]), Address: le.Uint64(p[8:]), Size: le.Uint64(p[16:])}
	if m.Argsz < DMAUnmapSize {
		return m, perr(CmdDMAUnmap, ErrArgsz, "argsz %d", m.Argsz)
	}
	if m.Flags&^UnmapAll != 0 {
		return m, perr(CmdDMAUnmap, ErrFlags, "flags %#x (dirty bitmaps are not supported)", m.Flags)
	}
	if m.Flags&UnmapAll != 0 {
		if m.Address != 0 || m.Size != 0 {
			return m, perr(CmdDMAUnmap, ErrFlags, "UNMAP_ALL with address %#x size %#x", m.Address, m.Size)
		}
		return m, nil
	}
	if m.Size == 0 || m.Address+m.Size-1 < m.Address {
		return m, perr(CmdDMAUnmap, ErrRange, "address %#x size %#x", m.Address, m.Size)
	}
	return m, nil
}

// Marshal encodes the payload.
func (m DMAUnmap) Marshal() []byte {
	b := make([]byte, DMAUnmapSize)
	le.PutUint32(b, m.Argsz)
	le.PutUint32(b[4:], m.Flags)
	le.PutUint64(b[8:], m.Address)
	le.PutUint64(b[16:], m.Size)
	return b
}

// Device info flags.
const (
	DeviceFlagsReset uint32 = 1 << 0
	DeviceFlagsPCI   uint32 = 1 << 1
)

// DeviceInfo is the DEVICE_GET_INFO payload.
type DeviceInfo struct {
	Argsz, Flags, NumRegions, NumIRQs uint32
}

// DeviceInfoSize is the size of the DEVICE_GET_INFO payload.
const DeviceInfoSize = 16

// ParseDeviceInfo decodes a DEVICE_GET_INFO request or reply.
func ParseDeviceInfo(p []byte) (DeviceInfo, error) {
	var d DeviceInfo
	if len(p) < DeviceInfoSize {
		return d, perr(CmdDeviceGetInfo, ErrTruncated, "payload of %d bytes", len(p))
	}
	d = DeviceInfo{le.Uint32(p), le.Uint32(p[4:]), le.Uint32(p[8:]), le.Uint32(p[12:])}
	if d.Argsz < DeviceInfoSize {
		return d, perr(CmdDeviceGetInfo, ErrArgsz, "argsz %d", d.Argsz)
	}
	return d, nil
}

// Marshal encodes the payload.
func (d DeviceInfo) Marshal() []byte {
	b := make([]byte, DeviceInfoSize)
	le.PutUint32(b, d.Argsz)
	le.PutUint32(b[4:], d.Flags)
	le.PutUint32(b[8:], d.NumRegions)
	le.PutUint32(b[12:], d.NumIRQs)
	return b
}

// PCI region indices (linux/vfio.h VFIO_PCI_*_REGION_INDEX).
const (
	RegionBAR0     = 0
	RegionROM      = 6
	RegionConfig   = 7
	RegionVGA      = 8
	NumPCIRegions  = 9
	RegionInfoSize = 32
)

// Region info flags.
const (
	RegionFlagRead  uint32 = 1 << 0
	RegionFlagWrite uint32 = 1 << 1
	RegionFlagMmap  uint32 = 1 << 2
	RegionFlagCaps  uint32 = 1 << 3
)

// Region capability ids.
const (
	RegionCapSparseMmap uint16 = 1
)

// SparseArea is one mappable area of a region.
type SparseArea struct{ Offset, Size uint64 }

// RegionInfo is the DEVICE_GET_REGION_INFO payload.
type RegionInfo struct {
	Argsz, Flags, Index, CapOffset uint32
	Size, Offset                   uint64
	// Sparse lists the mappable areas (reply only; encoded as a sparse mmap
	// capability after the structure).
	Sparse []SparseArea
}

// ParseRegionInfo decodes a DEVICE_GET_REGION_INFO request or reply
// (with its sparse-mmap capability, if any).
func ParseRegionInfo(p []byte) (RegionInfo, error) {
	var r RegionInfo
	if len(p) < RegionInfoSize {
		return r, perr(CmdDeviceGetRegionInfo, ErrTruncated, "payload of %d bytes", len(p))
	}
	r = RegionInfo{Argsz: le.Uint32(p), Flags: le.Uint32(p[4:]), Index: le.Uint32(p[8:]), CapOffset: le.Uint32(p[12:]),
		Size: le.Uint64(p[16:]), Offset: le.Uint64(p[24:])}
	if r.Argsz < RegionInfoSize {
		return r, perr(CmdDeviceGetRegionInfo, ErrArgsz, "argsz %d", r.Argsz)
	}
	if r.Flags&RegionFlagCaps == 0 || r.CapOffset == 0 || len(p) <= RegionInfoSize {
		return r, nil
	}
	// Walk the capability chain (bounded: each hop must move forward).
	off := r.CapOffset
	for hops := 0; off != 0 && hops < 16; hops++ {
		if off < RegionInfoSize || uint64(off)+16 > uint64(len(p)) {
			return r, perr(CmdDeviceGetRegionInfo, ErrRange, "capability at %d", off)
		}
		id, next := le.Uint16(p[off:]), le.Uint32(p[off+4:])
		if id == RegionCapSparseMmap {
			n := le.Uint32(p[off+8:])
			if uint64(off)+16+uint64(n)*16 > uint64(len(p)) {
				return r, perr(CmdDeviceGetRegionInfo, ErrTruncated, "%d sparse areas", n)
			}
			for i := uint32(0); i < n; i++ {
				a := p[off+16+16*i:]
				r.Sparse = append(r.Sparse, SparseArea{le.Uint64(a), le.Uint64(a[8:])})
			}
		}
		if next != 0 && next <= off {
			return r, perr(CmdDeviceGetRegionInfo, ErrRange, "capability chain loops at %d", next)
		}
		off = next
	}
	return r, nil
}

// Marshal encodes the payload; with Sparse areas it appends the sparse mmap
// capability and sets CAPS, cap_offset and argsz. When maxArgsz (the
// request's argsz) is too small for the capability, only the structure is
// sent, with argsz telling the size needed.
func (r RegionInfo) Marshal(maxArgsz uint32) []byte {
	full := uint32(RegionInfoSize)
	if len(r.Sparse) > 0 {
		full += 16 + 16*uint32(len(r.Sparse))
	}
	r.Argsz = full
	fits := full <= maxArgsz
	if len(r.Sparse) > 0 && fits {
		r.Flags |= RegionFlagCaps
		r.CapOffset = RegionInfoSize
	} else {
		r.CapOffset = 0
	}
	n := uint32(RegionInfoSize)
	if fits {
		n = full
	}
	b := make([]byte, n)
	le.PutUint32(b, r.Argsz)
	le.PutUint32(b[4:], r.Flags)
	le.PutUint32(b[8:], r.Index)
	le.PutUint32(b[12:], r.CapOffset)
	le.PutUint64(b[16:], r.Size)
	le.PutUint64(b[24:], r.Offset)
	if len(r.Sparse) > 0 && fits {
		c := b[RegionInfoSize:]
		le.PutUint16(c, RegionCapSparseMmap)
		le.PutUint16(c[2:], 1)
		le.PutUint32(c[8:], uint32(len(r.Sparse)))
		for i, a := range r.Sparse {
			le.PutUint64(c[16+16*i:], a.Offset)
			le.PutUint64(c[24+16*i:], a.Size)
		}
	}
	return b
}

// IRQ indices (VFIO_PCI_*_IRQ_INDEX).
const (
	IRQIntx   = 0
	IRQMSI    = 1
	IRQMSIX   = 2
	IRQErr    = 3
	IRQReq    = 4
	NumIRQs   = 5
	IRQInfoSz = 16
)

// IRQ info flags.
const (
	IRQInfoEventfd    uint32 = 1 << 0
	IRQInfoMaskable   uint32 = 1 << 1
	IRQInfoAutomasked uint32 = 1 << 2
	IRQInfoNoResize   uint32 = 1 << 3
)

// IRQInfo is the DEVICE_GET_IRQ_INFO payload.
type IRQInfo struct {
	Argsz, Flags, Index, Count uint32
}

// ParseIRQInfo decodes a DEVICE_GET_IRQ_INFO request or reply.
func ParseIRQInfo(p []byte) (IRQInfo, error) {
	var q IRQInfo
	if len(p) < IRQInfoSz {
		return q, perr(CmdDeviceGetIRQInfo, ErrTruncated, "payload of %d bytes", len(p))
	}
	q = IRQInfo{le.Uint32(p), le.Uint32(p[4:]), le.Uint32(p[8:]), le.Uint32(p[12:])}
	if q.Argsz < IRQInfoSz {
		return q, perr(CmdDeviceGetIRQInfo, ErrArgsz, "argsz %d", q.Argsz)
	}
	return q, nil
}

// Marshal encodes the payload.
func (q IRQInfo) Marshal() []byte {
	b := make([]byte, IRQInfoSz)
	le.PutUint32(b, q.Argsz)
	le.PutUint32(b[4:], q.Flags)
	le.PutUint32(b[8:], q.Index)
	le.PutUint32(b[12:], q.Count)
	return b
}

// SET_IRQS flags.
const (
	IRQSetDataNone      uint32 = 1 << 0
	IRQSetDataBool      uint32 = 1 << 1
	IRQSetDataEventfd   uint32 = 1 << 2
	IRQSetActionMask    uint32 = 1 << 3
	IRQSetActionUnmask  uint32 = 1 << 4
	IRQSetActionTrigger uint32 = 1 << 5
	irqSetDataMask             = IRQSetDataNone | IRQSetDataBool | IRQSetDataEventfd
	irqSetActionMask           = IRQSetActionMask | IRQSetActionUnmask | IRQSetActionTrigger
)

// IRQSet is the DEVICE_SET_IRQS payload.
type IRQSet struct {
	Argsz, Flags, Index, Start, Count uint32
	// Bools is the data of DATA_BOOL (one byte per sub-index).
	Bools []byte
}

// IRQSetSize is the size of the fixed DEVICE_SET_IRQS payload.
const IRQSetSize = 20

// maxIRQCount bounds count (MSI-X allows 2048 vectors).
const maxIRQCount = 2048

// ParseIRQSet decodes and validates a DEVICE_SET_IRQS payload against the
// number of descriptors that came with it: exactly one data flag and one
// action flag; DATA_BOOL carries count bytes; DATA_EVENTFD carries count
// descriptors or none (de-assign).
func ParseIRQSet(p []byte, nfds int) (IRQSet, error) {
	var s IRQSet
	if len(p) < IRQSetSize {
		return s, perr(CmdDeviceSetIRQs, ErrTruncated, "payload of %d bytes", len(p))
	}
	s = IRQSet{Argsz: le.Uint32(p), Flags: le.Uint32(p[4:]), Index: le.Uint32(p[8:]), Start: le.Uint32(p[12:]), Count: le.Uint32(p[16:])}
	if s.Argsz < IRQSetSize || uint64(s.Argsz) > uint64(len(p)) {
		return s, perr(CmdDeviceSetIRQs, ErrArgsz, "argsz %d for a %d-byte payload", s.Argsz, len(p))
	}
	data, action := s.Flags&irqSetDataMask, s.Flags&irqSetActionMask
	if s.Flags&^(irqSetDataMask|irqSetActionMask) != 0 || data&(data-1) != 0 || data == 0 ||
		action&(action-1) != 0 || action == 0 {
		return s, perr(CmdDeviceSetIRQs, ErrFlags, "flags %#x", s.Flags)
	}
	if s.Count > maxIRQCount || s.Start > maxIRQCount || s.Start+s.Count > maxIRQCount {
		return s, perr(CmdDeviceSetIRQs, ErrRange, "start %d count %d", s.Start, s.Count)
	}
	switch data {
	case IRQSetDataBool:
		if uint64(s.Argsz) < IRQSetSize+uint64(s.Count) {
			return s, perr(CmdDeviceSetIRQs, ErrArgsz, "argsz %d for %d booleans", s.Argsz, s.Count)
		}
		s.Bools = p[IRQSetSize : IRQSetSize+s.Count]
		if nfds != 0 {
			return s, perr(CmdDeviceSetIRQs, ErrFds, "%d descriptors with DATA_BOOL", nfds)
		}
	case IRQSetDataEventfd:
		if nfds != 0 && nfds != int(s.Count) {
			return s, perr(CmdDeviceSetIRQs, ErrFds, "%d descriptors for count %d", nfds, s.Count)
		}
	default:
		if nfds != 0 {
			return s, perr(CmdDeviceSetIRQs, ErrFds, "%d descriptors with DATA_NONE", nfds)
		}
	}
	return s, nil
}

// Marshal encodes the payload (Bools appended for DATA_BOOL).
func (s IRQSet) Marshal() []byte {
	b := make([]byte, IRQSetSize, IRQSetSize+len(s.Bools))
	b = append(b, s.Bools...)
	if s.Argsz == 0 {
		s.Argsz = uint32(len(b))
	}
	le.PutUint32(b, s.Argsz)
	le.PutUint32(b[4:], s.Flags)
	le.PutUint32(b[8:], s.Index)
	le.PutUint32(b[12:], s.Start)
	le.PutUint32(b[16:], s.Count)
	return b
}

// RegionAccess is the REGION_READ / REGION_WRITE payload header.
type RegionAccess struct {
	Offset        uint64
	Region, Count uint32
}

// RegionAccessSize is the size of the fixed part.
const RegionAccessSize = 16

// ParseRegionAccess decodes a REGION_READ request (withData false) or a
// REGION_WRITE request (withData true: count data bytes follow, returned).
func ParseRegionAccess(cmd Command, p []byte, withData bool) (RegionAccess, []byte, error) {
	var a RegionAccess
	if len(p) < RegionAccessSize {
		return a, nil, perr(cmd, ErrTruncated, "payload of %d bytes", len(p))
	}
	a = RegionAccess{Offset: le.Uint64(p), Region: le.Uint32(p[8:]), Count: le.Uint32(p[12:])}
	if a.Count > MaxDataXfer {
		return a, nil, perr(cmd, ErrTooLarge, "count %d", a.Count)
	}
	if a.Offset+uint64(a.Count) < a.Offset {
		return a, nil, perr(cmd, ErrRange, "offset %#x count %d", a.Offset, a.Count)
	}
	if !withData {
		return a, nil, nil
	}
	if uint64(len(p)) != RegionAccessSize+uint64(a.Count) {
		return a, nil, perr(cmd, ErrTruncated, "count %d with %d data bytes", a.Count, len(p)-RegionAccessSize)
	}
	return a, p[RegionAccessSize:], nil
}

// Put encodes the fixed part into b[:RegionAccessSize].
func (a RegionAccess) Put(b []byte) {
	le.PutUint64(b, a.Offset)
	le.PutUint32(b[8:], a.Region)
	le.PutUint32(b[12:], a.Count)
}

// WriteMultiEntrySize is the size of one REGION_WRITE_MULTI entry.
const WriteMultiEntrySize = 24

// WriteMultiEntry is one write of REGION_WRITE_MULTI.
type WriteMultiEntry struct {
	RegionAccess
	Data [8]byte
}

// ParseWriteMulti decodes REGION_WRITE_MULTI into dst (reused).
func ParseWriteMulti(p []byte, dst []WriteMultiEntry) ([]WriteMultiEntry, error) {
	if len(p) < 8 {
		return dst, perr(CmdRegionWriteMulti, ErrTruncated, "payload of %d bytes", len(p))
	}
	n := le.Uint64(p)
	if n == 0 || n > MaxWriteMulti {
		return dst, perr(CmdRegionWriteMulti, ErrTooLarge, "wr_cnt %d", n)
	}
	if uint64(len(p)) != 8+n*WriteMultiEntrySize {
		return dst, perr(CmdRegionWriteMulti, ErrTruncated, "wr_cnt %d in %d bytes", n, len(p))
	}
	dst = dst[:0]
	for i := uint64(0); i < n; i++ {
		e := p[8+i*WriteMultiEntrySize:]
		var w WriteMultiEntry
		w.Offset, w.Region, w.Count = le.Uint64(e), le.Uint32(e[8:]), le.Uint32(e[12:])
		if w.Count == 0 || w.Count > 8 {
			return dst, perr(CmdRegionWriteMulti, ErrRange, "entry %d count %d", i, w.Count)
		}
		copy(w.Data[:], e[16:24])
		dst = append(dst, w)
	}
	return dst, nil
}

// DMAAccess is the DMA_READ / DMA_WRITE payload header.
type DMAAccess struct {
	Address, Count uint64
}

// DMAAccessSize is the size of the fixed part.
const DMAAccessSize = 16

// ParseDMAAccess decodes a DMA_READ/DMA_WRITE request or reply header and
// the data after it.
func ParseDMAAccess(cmd Command, p []byte) (DMAAccess, []byte, error) {
	var a DMAAccess
	if len(p) < DMAAccessSize {
		return a, nil, perr(cmd, ErrTruncated, "payload of %d bytes", len(p))
	}
	a = DMAAccess{Address: le.Uint64(p), Count: le.Uint64(p[8:])}
	if a.Count > MaxDataXfer {
		return a, nil, perr(cmd, ErrTooLarge, "count %d", a.Count)
	}
	if a.Address+a.Count < a.Address {
		return a, nil, perr(cmd, ErrRange, "address %#x count %d", a.Address, a.Count)
	}
	return a, p[DMAAccessSize:], nil
}

// Device feature flags (VFIO_DEVICE_FEATURE_*).
const (
	FeatureMask  uint32 = 0xffff
	FeatureGet   uint32 = 1 << 16
	FeatureSet   uint32 = 1 << 17
	FeatureProbe uint32 = 1 << 18
)

// DeviceFeature is the DEVICE_FEATURE payload.
type DeviceFeature struct {
	Argsz, Flags uint32
	Data         []byte
}

// ParseDeviceFeature decodes a DEVICE_FEATURE request.
func ParseDeviceFeature(p []byte) (DeviceFeature, error) {
	var f DeviceFeature
	if len(p) < 8 {
		return f, perr(CmdDeviceFeature, ErrTruncated, "payload of %d bytes", len(p))
	}
	f = DeviceFeature{Argsz: le.Uint32(p), Flags: le.Uint32(p[4:]), Data: p[8:]}
	if f.Argsz < 8 {
		return f, perr(CmdDeviceFeature, ErrArgsz, "argsz %d", f.Argsz)
	}
	if f.Flags&^(FeatureMask|FeatureGet|FeatureSet|FeatureProbe) != 0 ||
		(f.Flags&FeatureGet != 0 && f.Flags&FeatureSet != 0 && f.Flags&FeatureProbe == 0) {
		return f, perr(CmdDeviceFeature, ErrFlags, "flags %#x", f.Flags)
	}
	return f, nil
}

// Message is a decoded message: its header, payload and descriptors.
type Message struct {
	Header
	Payload []byte
	Fds     []int
}

// Decode validates a whole message (header and the payload of a command
// this package understands) without acting on it. It is the entry point of
// the fuzz target; the server runs the same parsers.
func Decode(b []byte, nfds int) (Message, error) {
	h, err := ParseHeader(b)
	if err != nil {
		return Message{}, err
	}
	if uint32(len(b)) != h.Size {
		return Message{}, perr(h.Command, ErrTruncated, "message size %d, %d bytes", h.Size, len(b))
	}
	m := Message{Header: h, Payload: b[HeaderSize:]}
	if h.IsReply() {
		return m, nil
	}
	p := m.Payload
	switch h.Command {
	case CmdVersion:
		_, err = ParseVersion(p)
	case CmdDMAMap:
		_, err = ParseDMAMap(p)
	case CmdDMAUnmap:
		_, err = ParseDMAUnmap(p)
	case CmdDeviceGetInfo:
		_, err = ParseDeviceInfo(p)
	case CmdDeviceGetRegionInfo:
		_, err = ParseRegionInfo(p)
	case CmdDeviceGetIRQInfo:
		_, err = ParseIRQInfo(p)
	case CmdDeviceSetIRQs:
		_, err = ParseIRQSet(p, nfds)
	case CmdRegionRead:
		_, _, err = ParseRegionAccess(h.Command, p, false)
	case CmdRegionWrite:
		_, _, err = ParseRegionAccess(h.Command, p, true)
	case CmdRegionWriteMulti:
		_, err = ParseWriteMulti(p, nil)
	case CmdDMARead, CmdDMAWrite:
		_, _, err = ParseDMAAccess(h.Command, p)
	case CmdDeviceReset:
	case CmdDeviceFeature:
		_, err = ParseDeviceFeature(p)
	case CmdMigDataRead, CmdMigDataWrite:
		if len(p) < 8 {
			err = perr(h.Command, ErrTruncated, "payload of %d bytes", len(p))
		}
	default:
		err = perr(h.Command, ErrCommand, "command %d", uint16(h.Command))
	}
	return m, err
}

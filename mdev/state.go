package mdev

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Device state stream errors. Every decoding failure wraps exactly one of
// them (and is a *StateError naming the field).
var (
	ErrStateTruncated    = errors.New("mdev: device state truncated")
	ErrStateCorrupt      = errors.New("mdev: device state corrupt")
	ErrStateTooLarge     = errors.New("mdev: device state too large")
	ErrStateVersion      = errors.New("mdev: unsupported device state version")
	ErrStateInvalid      = errors.New("mdev: device state violates the virtio spec")
	ErrStateIncompatible = errors.New("mdev: device state incompatible with this device")
)

// StateError says which part of a device state stream was rejected.
type StateError struct {
	Field string
	Err   error
}

func (e *StateError) Error() string { return fmt.Sprintf("%v: %s", e.Err, e.Field) }

// Unwrap returns the sentinel.
func (e *StateError) Unwrap() error { return e.Err }

func stateErr(err error, format string, args ...any) error {
	return &StateError{Field: fmt.Sprintf(format, args...), Err: err}
}

// Stream format constants.
const (
	// StateVersion is the newest version this package writes and reads.
	// Version 2 has version 1's layout and adds packed virtqueues: with
	// VIRTIO_F_RING_PACKED in the driver features, a queue's size is any
	// value from 1 (§2.8) and NextAvail/NextUsed are packed positions in
	// the vhost encoding (ring index in bits 0..14, wrap counter in bit
	// 15; vring.PackedIndex). EncodeState writes the oldest version that
	// describes the state — version 1 for split rings, which releases that
	// know only version 1 read — and DecodeState reads both; a version 1
	// stream with RING_PACKED is rejected.
	StateVersion = 2
	// stateVersionSplit is the first version, split rings only.
	stateVersionSplit = 1
	// MaxStateSize bounds the payload of a state stream.
	MaxStateSize   = 1 << 20
	stateMagic     = "VDPAKMDV"
	stateHeaderLen = 8 + 2 + 2 + 4 // magic, version, reserved, payload length
	stateTrailer   = 4             // CRC32C
	maxBackendName = 64
	maxMSIXBytes   = 2048*16 + 256
	queueRecordLen = 2 + 1 + 2 + 3*8 + 2 + 2
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// QueueRecord is one virtqueue's migrated state.
type QueueRecord struct {
	Size    uint16
	Enabled bool
	Vector  uint16
	Desc    uint64
	Driver  uint64
	Device  uint64
	// NextAvail and NextUsed are the device's ring position, read back
	// after the backing device was suspended.
	NextAvail uint16
	NextUsed  uint16
}

// State is the mediated device's migratable state: everything the guest
// can observe through the control path plus the data path's ring positions.
type State struct {
	Backend             string
	DeviceID            virtio.DeviceID
	DeviceFeatures      virtio.Features // offered by the source
	DriverFeatures      virtio.Features
	Status              virtio.Status
	ConfigGeneration    uint8
	ISR                 uint8
	MSIXConfig          uint16
	DeviceFeatureSelect uint32
	DriverFeatureSelect uint32
	QueueSelect         uint16
	Config              []byte // device configuration space
	PCIConfig           []byte // 256-byte PCI configuration space image
	MSIX                []byte // MSI-X table and PBA
	Queues              []QueueRecord
}

// EncodeState serializes s:
//
//	magic "VDPAKMDV" | version u16 | reserved u16 | payload length u32 |
//	payload | CRC32C(u32) of everything before it
//
// all little-endian; version is 1 for split rings and 2 when the driver
// negotiated RING_PACKED (see StateVersion). It validates s first, so a
// stream it writes always decodes.
func EncodeState(s *State) ([]byte, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	p := encodePayload(s)
	le := binary.LittleEndian
	if len(p) > MaxStateSize {
		return nil, stateErr(ErrStateTooLarge, "payload %d bytes > %d", len(p), MaxStateSize)
	}
	out := make([]byte, 0, stateHeaderLen+len(p)+stateTrailer)
	out = append(out, stateMagic...)
	out = le.AppendUint16(out, s.streamVersion())
	out = le.AppendUint16(out, 0)
	out = le.AppendUint32(out, uint32(len(p)))
	out = append(out, p...)
	out = le.AppendUint32(out, crc32.Checksum(out, castagnoli))
	return out, nil
}

// streamVersion is the oldest stream version that describes s.
func (s *State) streamVersion() uint16 {
	if s.DriverFeatures.Has(virtio.FRingPacked) {
		return StateVersion
	}
	return stateVersionSplit
}

// encodePayload lays out s's fields (s must be valid).
func encodePayload(s *State) []byte {
	p := make([]byte, 0, 128+len(s.Config)+len(s.PCIConfig)+len(s.MSIX)+len(s.Queues)*queueRecordLen)
	le := binary.LittleEndian
	p = append(p, byte(len(s.Backend)))
	p = append(p, s.Backend...)
	p = le.AppendUint32(p, uint32(s.DeviceID))
	p = le.AppendUint64(p, uint64(s.DeviceFeatures))
	p = le.AppendUint64(p, uint64(s.DriverFeatures))
	p = append(p, byte(s.Status), s.ConfigGeneration, s.ISR)
	p = le.AppendUint16(p, s.MSIXConfig)
	p = le.AppendUint32(p, s.DeviceFeatureSelect)
	p = le.AppendUint32(p, s.DriverFeatureSelect)
	p = le.AppendUint16(p, s.QueueSelect)
	p = le.AppendUint16(p, uint16(len(s.Config)))
	p = append(p, s.Config...)
	p = le.AppendUint16(p, uint16(len(s.PCIConfig)))
	p = append(p, s.PCIConfig...)
	p = le.AppendUint32(p, uint32(len(s.MSIX)))
	p = append(p, s.MSIX...)
	p = le.AppendUint16(p, uint16(len(s.Queues)))
	for _, q := range s.Queues {
		p = le.AppendUint16(p, q.Size)
		en := byte(0)
		if q.Enabled {
			en = 1
		}
		p = append(p, en)
		p = le.AppendUint16(p, q.Vector)
		p = le.AppendUint64(p, q.Desc)
		p = le.AppendUint64(p, q.Driver)
		p = le.AppendUint64(p, q.Device)
		p = le.AppendUint16(p, q.NextAvail)
		p = le.AppendUint16(p, q.NextUsed)
	}
	return p
}

// ReadState reads exactly one encoded state stream from r (never more than
// its header's bounded length) and decodes it.
func ReadState(r io.Reader) (*State, error) {
	hdr := make([]byte, stateHeaderLen)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, stateErr(ErrStateTruncated, "header: %v", err)
	}
	n, _, err := checkHeader(hdr)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, stateHeaderLen+n+stateTrailer)
	copy(buf, hdr)
	if _, err := io.ReadFull(r, buf[stateHeaderLen:]); err != nil {
		return nil, stateErr(ErrStateTruncated, "payload: %v", err)
	}
	return DecodeState(buf)
}

// checkHeader validates a stream header and returns the payload length and
// the stream version.
func checkHeader(b []byte) (int, uint16, error) {
	if string(b[:8]) != stateMagic {
		return 0, 0, stateErr(ErrStateCorrupt, "magic %q", b[:8])
	}
	le := binary.LittleEndian
	v := le.Uint16(b[8:])
	if v < stateVersionSplit || v > StateVersion {
		return 0, 0, stateErr(ErrStateVersion, "version %d (want %d..%d)", v, stateVersionSplit, StateVersion)
	}
	if r := le.Uint16(b[10:]); r != 0 {
		return 0, 0, stateErr(ErrStateCorrupt, "reserved header field %#x", r)
	}
	n := le.Uint32(b[12:])
	if n > MaxStateSize {
		return 0, 0, stateErr(ErrStateTooLarge, "payload %d bytes > %d", n, MaxStateSize)
	}
	return int(n), v, nil
}

// DecodeState parses and validates a whole stream. Any defect — truncation,
// trailing bytes, checksum mismatch, unknown version, out-of-range field or
// a state the virtio spec does not allow — is an error wrapping one of the
// ErrState sentinels, and no State is returned.
func DecodeState(b []byte) (*State, error) {
	if len(b) < stateHeaderLen {
		return nil, stateErr(ErrStateTruncated, "header: %d of %d bytes", len(b), stateHeaderLen)
	}
	n, version, err := checkHeader(b[:stateHeaderLen])
	if err != nil {
		return nil, err
	}
	total := stateHeaderLen + n + stateTrailer
	if len(b) < total {
		return nil, stateErr(ErrStateTruncated, "stream: %d of %d bytes", len(b), total)
	}
	if len(b) > total {
		return nil, stateErr(ErrStateCorrupt, "%d trailing bytes", len(b)-total)
	}
	le := binary.LittleEndian
	if want, got := le.Uint32(b[total-4:]), crc32.Checksum(b[:total-4], castagnoli); want != got {
		return nil, stateErr(ErrStateCorrupt, "checksum %#08x, computed %#08x", want, got)
	}
	d := decoder{b: b[stateHeaderLen : total-4]}
	s := &State{}
	s.Backend = string(d.bytes("backend", int(d.u8("backend length"))))
	s.DeviceID = virtio.DeviceID(d.u32("device id"))
	s.DeviceFeatures = virtio.Features(d.u64("device features"))
	s.DriverFeatures = virtio.Features(d.u64("driver features"))
	s.Status = virtio.Status(d.u8("status"))
	s.ConfigGeneration = d.u8("config generation")
	s.ISR = d.u8("isr")
	s.MSIXConfig = d.u16("msix config")
	s.DeviceFeatureSelect = d.u32("device feature select")
	s.DriverFeatureSelect = d.u32("driver feature select")
	s.QueueSelect = d.u16("queue select")
	s.Config = d.bytes("config", int(d.u16("config length")))
	s.PCIConfig = d.bytes("pci config", int(d.u16("pci config length")))
	s.MSIX = d.bytes("msix", int(d.u32("msix length")))
	nq := int(d.u16("queue count"))
	if d.err == nil && nq > maxQueues {
		return nil, stateErr(ErrStateInvalid, "queue count %d > %d", nq, maxQueues)
	}
	if d.err == nil && nq*queueRecordLen > len(d.b) {
		return nil, stateErr(ErrStateCorrupt, "queue count %d exceeds payload", nq)
	}
	if d.err == nil {
		s.Queues = make([]QueueRecord, nq)
	}
	for i := 0; i < nq && d.err == nil; i++ {
		q := &s.Queues[i]
		q.Size = d.u16("queue size")
		switch en := d.u8("queue enable"); en {
		case 0:
		case 1:
			q.Enabled = true
		default:
			if d.err == nil {
				d.err = stateErr(ErrStateCorrupt, "queue %d enable byte %d", i, en)
			}
		}
		q.Vector = d.u16("queue vector")
		q.Desc = d.u64("queue desc")
		q.Driver = d.u64("queue driver")
		q.Device = d.u64("queue device")
		q.NextAvail = d.u16("queue next avail")
		q.NextUsed = d.u16("queue next used")
	}
	if d.err != nil {
		return nil, d.err
	}
	if len(d.b) != 0 {
		return nil, stateErr(ErrStateCorrupt, "%d unparsed payload bytes", len(d.b))
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	if version < s.streamVersion() {
		return nil, stateErr(ErrStateInvalid, "version %d stream with RING_PACKED (needs version %d)", version, s.streamVersion())
	}
	return s, nil
}

// Validate checks s against the virtio spec and this package's bounds.
func (s *State) Validate() error {
	if len(s.Backend) > maxBackendName {
		return stateErr(ErrStateInvalid, "backend name %d bytes > %d", len(s.Backend), maxBackendName)
	}
	for _, c := range []byte(s.Backend) {
		if c < 0x20 || c > 0x7e {
			return stateErr(ErrStateInvalid, "backend name %q not printable ASCII", s.Backend)
		}
	}
	if len(s.Config) > maxConfigSize {
		return stateErr(ErrStateInvalid, "config %d bytes > %d", len(s.Config), maxConfigSize)
	}
	if len(s.PCIConfig) != 0 && len(s.PCIConfig) != pciConfigSize {
		return stateErr(ErrStateInvalid, "pci config %d bytes (0 or %d)", len(s.PCIConfig), pciConfigSize)
	}
	if len(s.MSIX) > maxMSIXBytes {
		return stateErr(ErrStateInvalid, "msix %d bytes > %d", len(s.MSIX), maxMSIXBytes)
	}
	if len(s.Queues) > maxQueues {
		return stateErr(ErrStateInvalid, "queue count %d > %d", len(s.Queues), maxQueues)
	}
	st := s.Status
	if st&^statusKnown != 0 {
		return stateErr(ErrStateInvalid, "status %#x has reserved bits", uint8(st))
	}
	// §3.1.1: status bits are set in order.
	for _, p := range [][2]virtio.Status{
		{virtio.StatusDriver, virtio.StatusAcknowledge},
		{virtio.StatusFeaturesOK, virtio.StatusDriver},
		{virtio.StatusDriverOK, virtio.StatusFeaturesOK},
	} {
		if st&p[0] != 0 && st&p[1] == 0 {
			return stateErr(ErrStateInvalid, "status %s sets %s without %s", st, p[0], p[1])
		}
	}
	if s.DriverFeatures&^s.DeviceFeatures != 0 {
		return stateErr(ErrStateInvalid, "driver features %#x not a subset of device features %#x",
			uint64(s.DriverFeatures), uint64(s.DeviceFeatures))
	}
	if st&virtio.StatusFeaturesOK != 0 && !s.DriverFeatures.Has(virtio.FVersion1) {
		return stateErr(ErrStateInvalid, "FEATURES_OK without VERSION_1")
	}
	if s.ISR&^(ISRQueue|ISRConfig) != 0 {
		return stateErr(ErrStateInvalid, "isr %#x", s.ISR)
	}
	packed := s.DriverFeatures.Has(virtio.FRingPacked)
	// The ring layout rules (§2.7, §2.8) hold once the device runs:
	// DRIVER_OK without NEEDS_RESET means the device checked the layout
	// when the driver set DRIVER_OK (goLive). Before that, or after a
	// DRIVER_OK refused for its layout (NEEDS_RESET), the registers hold
	// whatever the driver wrote, and the state moves as it is: the
	// destination checks the layout when the driver sets DRIVER_OK there,
	// as the source does. Refusing such a state would let a guest make
	// its VM impossible to migrate.
	live := st&virtio.StatusDriverOK != 0 && st&virtio.StatusDeviceNeedsReset == 0
	for i, q := range s.Queues {
		// §2.7: a split ring's size is a power of two; §2.8: a packed
		// ring's any size from 1. A disabled queue may hold size 0.
		if q.Size > maxQueueSize || (q.Size != 0 && !vring.ValidQueueSizeFor(q.Size, s.DriverFeatures)) ||
			(q.Enabled && q.Size == 0) {
			return stateErr(ErrStateInvalid, "queue %d size %d", i, q.Size)
		}
		if !q.Enabled {
			continue
		}
		if live {
			sizes, aligns := ringAreas(q.Size, s.DriverFeatures)
			if q.Desc%aligns[0] != 0 || q.Driver%aligns[1] != 0 || q.Device%aligns[2] != 0 {
				return stateErr(ErrStateInvalid, "queue %d ring addresses misaligned", i)
			}
			if q.Desc+sizes[0] < q.Desc || q.Driver+sizes[1] < q.Driver || q.Device+sizes[2] < q.Device {
				return stateErr(ErrStateInvalid, "queue %d ring addresses overflow", i)
			}
		}
		// The device cannot have used more than it took.
		if packed {
			st := vring.QueueState{NextAvail: q.NextAvail, NextUsed: q.NextUsed}
			if _, ok := st.PackedInFlight(q.Size); !ok {
				return stateErr(ErrStateInvalid, "queue %d packed next avail %#x, next used %#x: not positions of a ring of %d",
					i, q.NextAvail, q.NextUsed, q.Size)
			}
		} else if uint16(q.NextAvail-q.NextUsed) > q.Size {
			return stateErr(ErrStateInvalid, "queue %d next avail %d, next used %d: more than %d in flight",
				i, q.NextAvail, q.NextUsed, q.Size)
		}
	}
	return nil
}

// decoder reads little-endian fields, remembering the first shortfall.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) take(field string, n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.err = stateErr(ErrStateCorrupt, "%s: need %d bytes, %d left", field, n, len(d.b))
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) u8(f string) uint8 {
	if p := d.take(f, 1); p != nil {
		return p[0]
	}
	return 0
}

func (d *decoder) u16(f string) uint16 {
	if p := d.take(f, 2); p != nil {
		return binary.LittleEndian.Uint16(p)
	}
	return 0
}

func (d *decoder) u32(f string) uint32 {
	if p := d.take(f, 4); p != nil {
		return binary.LittleEndian.Uint32(p)
	}
	return 0
}

func (d *decoder) u64(f string) uint64 {
	if p := d.take(f, 8); p != nil {
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

func (d *decoder) bytes(f string, n int) []byte {
	p := d.take(f, n)
	if p == nil {
		return nil
	}
	return append([]byte(nil), p...)
}

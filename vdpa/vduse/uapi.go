package vduse

import (
	"encoding/binary"
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// The VDUSE user API (include/uapi/linux/vduse.h, API version 0, Linux
// 5.15+). Struct layouts are encoded by hand, little-endian (VDUSE exists
// on little-endian hosts vdpakit supports; the fields are native-endian
// __u32/__u64), at the named offsets below. abi_test.go checks every size,
// offset, ioctl number and constant here against the header (compiled with
// gcc where there is one, and against the golden files it printed,
// testdata/abi-*.txt, everywhere).

// ioctl request numbers: _IOC(dir, 0x81, nr, size).
const (
	iocWrite  = 1
	iocRead   = 2
	vduseBase = 0x81
)

func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | vduseBase<<8 | nr }

// Structure sizes (x86-64 and arm64 agree: natural alignment, no packing).
const (
	sizeDevConfig     = 336 // struct vduse_dev_config without the config[] tail
	sizeIOTLBEntry    = 32  // struct vduse_iotlb_entry
	sizeConfigData    = 8   // struct vduse_config_data without buffer[]
	sizeVQConfig      = 32  // struct vduse_vq_config
	sizeVQInfo        = 48  // struct vduse_vq_info
	sizeVQStatePacked = 8   // struct vduse_vq_state_packed
	sizeVQEventfd     = 8   // struct vduse_vq_eventfd
	sizeDevRequest    = 152 // struct vduse_dev_request
	sizeDevResponse   = 152 // struct vduse_dev_response
	nameMax           = 256 // VDUSE_NAME_MAX
)

// Field offsets (offsetof in the header's structures).
const (
	offDevConfigName       = 0   // vduse_dev_config.name
	offDevConfigVendorID   = 256 // .vendor_id
	offDevConfigDeviceID   = 260 // .device_id
	offDevConfigFeatures   = 264 // .features
	offDevConfigVQNum      = 272 // .vq_num
	offDevConfigVQAlign    = 276 // .vq_align
	offDevConfigReserved   = 280 // .reserved[13]
	offDevConfigConfigSize = 332 // .config_size
	offDevConfigConfig     = 336 // .config[]

	offIOTLBOffset = 0  // vduse_iotlb_entry.offset
	offIOTLBStart  = 8  // .start
	offIOTLBLast   = 16 // .last
	offIOTLBPerm   = 24 // .perm

	offConfigDataOffset = 0 // vduse_config_data.offset
	offConfigDataLength = 4 // .length
	offConfigDataBuffer = 8 // .buffer[]

	offVQConfigIndex   = 0 // vduse_vq_config.index
	offVQConfigMaxSize = 4 // .max_size (__u16)

	offVQInfoIndex          = 0  // vduse_vq_info.index
	offVQInfoNum            = 4  // .num
	offVQInfoDescAddr       = 8  // .desc_addr
	offVQInfoDriverAddr     = 16 // .driver_addr
	offVQInfoDeviceAddr     = 24 // .device_addr
	offVQInfoSplitAvailIdx  = 32 // .split.avail_index (__u16)
	offVQInfoPackedAvailCtr = 32 // .packed.last_avail_counter (__u16)
	offVQInfoPackedAvailIdx = 34 // .packed.last_avail_idx (__u16)
	offVQInfoPackedUsedCtr  = 36 // .packed.last_used_counter (__u16)
	offVQInfoPackedUsedIdx  = 38 // .packed.last_used_idx (__u16)
	offVQInfoReady          = 40 // .ready (__u8)
	offVQEventfdIndex       = 0  // vduse_vq_eventfd.index
	offVQEventfdFd          = 4  // .fd
	offRequestType          = 0  // vduse_dev_request.type
	offRequestID            = 4  // .request_id
	offRequestUnion         = 24 // the union: .vq_state, .s, .iova
	offRequestVQStateIndex  = 24 // .vq_state.index
	offRequestStatus        = 24 // .s.status (__u8)
	offRequestIOVAStart     = 24 // .iova.start
	offRequestIOVALast      = 32 // .iova.last
	offResponseID           = 0  // vduse_dev_response.request_id
	offResponseResult       = 4  // .result
	offResponseVQStateIndex = 24 // .vq_state.index
	offResponseVQStateAvail = 28 // .vq_state.split.avail_index (__u16)
	offResponsePackedAvailC = 28 // .vq_state.packed.last_avail_counter (__u16)
	offResponsePackedAvailI = 30 // .vq_state.packed.last_avail_idx (__u16)
	offResponsePackedUsedC  = 32 // .vq_state.packed.last_used_counter (__u16)
	offResponsePackedUsedI  = 34 // .vq_state.packed.last_used_idx (__u16)
)

// eventfdDeassign is VDUSE_EVENTFD_DEASSIGN, a __s32 fd; eventfdDeassignU32
// is its bit pattern as written into struct vduse_vq_eventfd.
const (
	eventfdDeassign    = -1
	eventfdDeassignU32 = uint32(1<<32 + eventfdDeassign)
)

var (
	ioctlGetAPIVersion   = ioc(iocRead, 0x00, 8)
	ioctlSetAPIVersion   = ioc(iocWrite, 0x01, 8)
	ioctlCreateDev       = ioc(iocWrite, 0x02, sizeDevConfig)
	ioctlDestroyDev      = ioc(iocWrite, 0x03, nameMax)
	ioctlIOTLBGetFD      = ioc(iocRead|iocWrite, 0x10, sizeIOTLBEntry)
	ioctlDevGetFeatures  = ioc(iocRead, 0x11, 8)
	ioctlDevSetConfig    = ioc(iocWrite, 0x12, sizeConfigData)
	ioctlInjectConfigIRQ = ioc(0, 0x13, 0)
	ioctlVQSetup         = ioc(iocWrite, 0x14, sizeVQConfig)
	ioctlVQGetInfo       = ioc(iocRead|iocWrite, 0x15, sizeVQInfo)
	ioctlVQSetupKickFD   = ioc(iocWrite, 0x16, sizeVQEventfd)
	ioctlVQInjectIRQ     = ioc(iocWrite, 0x17, 4)
)

// APIVersion is the VDUSE API version this package speaks.
const APIVersion = 0

// Request types (enum vduse_req_type).
const (
	reqGetVQState  = 0 // VDUSE_GET_VQ_STATE
	reqSetStatus   = 1 // VDUSE_SET_STATUS
	reqUpdateIOTLB = 2 // VDUSE_UPDATE_IOTLB
)

// Response results.
const (
	resultOK     = 0 // VDUSE_REQ_RESULT_OK
	resultFailed = 1 // VDUSE_REQ_RESULT_FAILED
)

// IOTLB permissions.
const (
	accessRO = 1 // VDUSE_ACCESS_RO: the device may read
	accessWO = 2 // VDUSE_ACCESS_WO: the device may write
	accessRW = 3
)

// devConfig is struct vduse_dev_config.
type devConfig struct {
	Name       string
	VendorID   uint32
	DeviceID   uint32
	Features   uint64
	VQNum      uint32
	VQAlign    uint32
	ConfigData []byte
}

// encode lays out the struct followed by the config space (config_size
// and config[]).
func (c *devConfig) encode() ([]byte, error) {
	if len(c.Name) == 0 || len(c.Name) >= nameMax {
		return nil, fmt.Errorf("vduse: device name %q: 1..%d bytes", c.Name, nameMax-1)
	}
	for i := 0; i < len(c.Name); i++ {
		if c.Name[i] == 0 || c.Name[i] == '/' {
			return nil, fmt.Errorf("vduse: device name %q: no NUL or '/' allowed", c.Name)
		}
	}
	b := make([]byte, sizeDevConfig+len(c.ConfigData))
	copy(b[offDevConfigName:], c.Name)
	le := binary.LittleEndian
	le.PutUint32(b[offDevConfigVendorID:], c.VendorID)
	le.PutUint32(b[offDevConfigDeviceID:], c.DeviceID)
	le.PutUint64(b[offDevConfigFeatures:], c.Features)
	le.PutUint32(b[offDevConfigVQNum:], c.VQNum)
	le.PutUint32(b[offDevConfigVQAlign:], c.VQAlign)
	// reserved[13] (offDevConfigReserved up to config_size) stays zero.
	le.PutUint32(b[offDevConfigConfigSize:], uint32(len(c.ConfigData)))
	copy(b[offDevConfigConfig:], c.ConfigData)
	return b, nil
}

// iotlbEntry is struct vduse_iotlb_entry.
type iotlbEntry struct {
	Offset uint64
	Start  uint64
	Last   uint64
	Perm   uint8
}

func (e *iotlbEntry) encode(b []byte) {
	le := binary.LittleEndian
	clear(b[:sizeIOTLBEntry])
	le.PutUint64(b[offIOTLBOffset:], e.Offset)
	le.PutUint64(b[offIOTLBStart:], e.Start)
	le.PutUint64(b[offIOTLBLast:], e.Last)
	b[offIOTLBPerm] = e.Perm
}

func decodeIOTLBEntry(b []byte) iotlbEntry {
	le := binary.LittleEndian
	return iotlbEntry{Offset: le.Uint64(b[offIOTLBOffset:]), Start: le.Uint64(b[offIOTLBStart:]),
		Last: le.Uint64(b[offIOTLBLast:]), Perm: b[offIOTLBPerm]}
}

// vqInfo is struct vduse_vq_info. Its union holds the split state
// (split.avail_index) or, with RING_PACKED negotiated, the packed one
// (struct vduse_vq_state_packed); decodeVQInfo reads both views and
// State picks the one the features select.
type vqInfo struct {
	Index      uint32
	Num        uint32
	DescAddr   uint64
	DriverAddr uint64
	DeviceAddr uint64
	AvailIndex uint16 // split.avail_index
	Packed     vring.QueueState
	Ready      bool
}

func decodeVQInfo(b []byte) vqInfo {
	le := binary.LittleEndian
	return vqInfo{
		Index: le.Uint32(b[offVQInfoIndex:]), Num: le.Uint32(b[offVQInfoNum:]),
		DescAddr: le.Uint64(b[offVQInfoDescAddr:]), DriverAddr: le.Uint64(b[offVQInfoDriverAddr:]),
		DeviceAddr: le.Uint64(b[offVQInfoDeviceAddr:]),
		AvailIndex: le.Uint16(b[offVQInfoSplitAvailIdx:]),
		Packed: vring.QueueState{
			NextAvail: packedPos(le.Uint16(b[offVQInfoPackedAvailIdx:]), le.Uint16(b[offVQInfoPackedAvailCtr:])),
			NextUsed:  packedPos(le.Uint16(b[offVQInfoPackedUsedIdx:]), le.Uint16(b[offVQInfoPackedUsedCtr:])),
		},
		Ready: b[offVQInfoReady] != 0,
	}
}

// state is the queue state the info's union holds for features f: the
// split avail index (NextUsed left 0: the used ring holds it) or both
// packed positions.
func (i vqInfo) state(f virtio.Features) vring.QueueState {
	if f.Has(virtio.FRingPacked) {
		return i.Packed
	}
	return vring.QueueState{NextAvail: i.AvailIndex}
}

// packedPos is a packed ring position in vring.QueueState's encoding (bits
// 0..14 the index, bit 15 the wrap counter) from VDUSE's separate index
// and counter fields. The kernel keeps the index to 15 bits and the
// counter to one (vduse_dev.c masks what a device answers), and so does
// this.
func packedPos(idx, counter uint16) uint16 { return idx&0x7fff | (counter&1)<<15 }

// packedFields splits a position in vring.QueueState's packed encoding
// into VDUSE's index and counter fields.
func packedFields(pos uint16) (idx, counter uint16) { return pos & 0x7fff, pos >> 15 }

// request is struct vduse_dev_request, decoded by type.
type request struct {
	Type      uint32
	ID        uint32
	VQIndex   uint32 // GET_VQ_STATE
	Status    uint8  // SET_STATUS
	IOVAStart uint64 // UPDATE_IOTLB
	IOVALast  uint64
}

func decodeRequest(b []byte) (request, error) {
	if len(b) != sizeDevRequest {
		return request{}, fmt.Errorf("vduse: request of %d bytes, want %d", len(b), sizeDevRequest)
	}
	le := binary.LittleEndian
	r := request{Type: le.Uint32(b[offRequestType:]), ID: le.Uint32(b[offRequestID:])}
	switch r.Type {
	case reqGetVQState:
		r.VQIndex = le.Uint32(b[offRequestVQStateIndex:])
	case reqSetStatus:
		r.Status = b[offRequestStatus]
	case reqUpdateIOTLB:
		r.IOVAStart, r.IOVALast = le.Uint64(b[offRequestIOVAStart:]), le.Uint64(b[offRequestIOVALast:])
	}
	return r, nil
}

// encodeResponse fills struct vduse_dev_response. For GET_VQ_STATE the
// union carries struct vduse_vq_state: {index, split.avail_index} (st's
// NextAvail) for a split ring, {index, packed.{last_avail_counter,
// last_avail_idx, last_used_counter, last_used_idx}} for a packed one.
func encodeResponse(b []byte, id, result uint32, vq uint32, st vring.QueueState, packed bool) {
	clear(b[:sizeDevResponse])
	le := binary.LittleEndian
	le.PutUint32(b[offResponseID:], id)
	le.PutUint32(b[offResponseResult:], result)
	le.PutUint32(b[offResponseVQStateIndex:], vq)
	if !packed {
		le.PutUint16(b[offResponseVQStateAvail:], st.NextAvail)
		return
	}
	ai, ac := packedFields(st.NextAvail)
	ui, uc := packedFields(st.NextUsed)
	le.PutUint16(b[offResponsePackedAvailC:], ac)
	le.PutUint16(b[offResponsePackedAvailI:], ai)
	le.PutUint16(b[offResponsePackedUsedC:], uc)
	le.PutUint16(b[offResponsePackedUsedI:], ui)
}

package vduse

import (
	"encoding/binary"
	"fmt"
)

// The VDUSE user API (include/uapi/linux/vduse.h, API version 0, Linux
// 5.15+). Struct layouts are encoded by hand, little-endian (VDUSE exists
// on little-endian hosts vdpakit supports; the fields are native-endian
// __u32/__u64), and their sizes are checked against the header in
// uapi_test.go.

// ioctl request numbers: _IOC(dir, 0x81, nr, size).
const (
	iocWrite  = 1
	iocRead   = 2
	vduseBase = 0x81
)

func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | vduseBase<<8 | nr }

// Structure sizes (x86-64 and arm64 agree: natural alignment, no packing).
const (
	sizeDevConfig   = 336 // struct vduse_dev_config without the config[] tail
	sizeIOTLBEntry  = 32  // struct vduse_iotlb_entry
	sizeConfigData  = 8   // struct vduse_config_data without buffer[]
	sizeVQConfig    = 32  // struct vduse_vq_config
	sizeVQInfo      = 48  // struct vduse_vq_info
	sizeVQEventfd   = 8   // struct vduse_vq_eventfd
	sizeDevRequest  = 152 // struct vduse_dev_request
	sizeDevResponse = 152 // struct vduse_dev_response
	nameMax         = 256 // VDUSE_NAME_MAX
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
	copy(b, c.Name)
	le := binary.LittleEndian
	le.PutUint32(b[256:], c.VendorID)
	le.PutUint32(b[260:], c.DeviceID)
	le.PutUint64(b[264:], c.Features)
	le.PutUint32(b[272:], c.VQNum)
	le.PutUint32(b[276:], c.VQAlign)
	// reserved[13] at 280..332 stays zero.
	le.PutUint32(b[332:], uint32(len(c.ConfigData)))
	copy(b[sizeDevConfig:], c.ConfigData)
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
	le.PutUint64(b[0:], e.Offset)
	le.PutUint64(b[8:], e.Start)
	le.PutUint64(b[16:], e.Last)
	b[24] = e.Perm
}

func decodeIOTLBEntry(b []byte) iotlbEntry {
	le := binary.LittleEndian
	return iotlbEntry{Offset: le.Uint64(b[0:]), Start: le.Uint64(b[8:]), Last: le.Uint64(b[16:]), Perm: b[24]}
}

// vqInfo is struct vduse_vq_info for a split ring.
type vqInfo struct {
	Index      uint32
	Num        uint32
	DescAddr   uint64
	DriverAddr uint64
	DeviceAddr uint64
	AvailIndex uint16 // split.avail_index
	Ready      bool
}

func decodeVQInfo(b []byte) vqInfo {
	le := binary.LittleEndian
	return vqInfo{
		Index: le.Uint32(b[0:]), Num: le.Uint32(b[4:]),
		DescAddr: le.Uint64(b[8:]), DriverAddr: le.Uint64(b[16:]), DeviceAddr: le.Uint64(b[24:]),
		AvailIndex: le.Uint16(b[32:]), Ready: b[40] != 0,
	}
}

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
	r := request{Type: le.Uint32(b[0:]), ID: le.Uint32(b[4:])}
	u := b[24:] // the union, after type, request_id and reserved[4]
	switch r.Type {
	case reqGetVQState:
		r.VQIndex = le.Uint32(u[0:])
	case reqSetStatus:
		r.Status = u[0]
	case reqUpdateIOTLB:
		r.IOVAStart, r.IOVALast = le.Uint64(u[0:]), le.Uint64(u[8:])
	}
	return r, nil
}

// encodeResponse fills struct vduse_dev_response. For GET_VQ_STATE the
// union carries struct vduse_vq_state {index, split.avail_index}.
func encodeResponse(b []byte, id, result uint32, vq uint32, availIndex uint16) {
	clear(b[:sizeDevResponse])
	le := binary.LittleEndian
	le.PutUint32(b[0:], id)
	le.PutUint32(b[4:], result)
	le.PutUint32(b[24:], vq)
	le.PutUint16(b[28:], availIndex)
}

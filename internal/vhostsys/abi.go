// CHECKED KERNEL ABI — every number, struct size and field offset in this
// file is compared with the C headers (linux/vhost.h, linux/vhost_types.h,
// linux/if_tun.h) by TestABIMatchesHeaders in abi_test.go, which compiles a
// C program with gcc. Edit only together with that check; values marked
// "6.12" are absent from the 6.1 system headers and are checked when 6.12
// uapi headers are available (see abi_test.go).

package vhostsys

// Sizes of the scalar ioctl arguments.
const (
	sizeofU8  = 1
	sizeofU16 = 2
	sizeofU32 = 4
	sizeofU64 = 8
	sizeofInt = 4
)

// VringState is struct vhost_vring_state.
type VringState struct {
	Index uint32
	Num   uint32
}

// VringFile is struct vhost_vring_file. Fd -1 (FileUnbind) unbinds.
type VringFile struct {
	Index uint32
	Fd    int32
}

// VringAddr is struct vhost_vring_addr. For vhost-vdpa the three ring
// addresses are IOVAs; for vhost-net they are addresses in this process.
type VringAddr struct {
	Index         uint32
	Flags         uint32
	DescUserAddr  uint64
	UsedUserAddr  uint64
	AvailUserAddr uint64
	LogGuestAddr  uint64
}

// MemoryRegion is struct vhost_memory_region.
type MemoryRegion struct {
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
	FlagsPadding  uint64
}

// memoryHeader is the fixed part of struct vhost_memory; the regions follow.
type memoryHeader struct {
	NRegions uint32
	Padding  uint32
}

// vdpaConfigHeader is the fixed part of struct vhost_vdpa_config; the
// buffer follows.
type vdpaConfigHeader struct {
	Off uint32
	Len uint32
}

// IOVARange is struct vhost_vdpa_iova_range: the inclusive range of I/O
// virtual addresses the device can map.
type IOVARange struct {
	First uint64
	Last  uint64
}

// IOTLBMsg is struct vhost_iotlb_msg. The C struct has no packing
// attribute, so it is 8-aligned: 26 bytes of fields and 6 of tail padding.
type IOTLBMsg struct {
	IOVA  uint64
	Size  uint64
	UAddr uint64
	Perm  uint8
	Type  uint8
	_     [6]byte
}

// MsgV2 is struct vhost_msg_v2: type, asid, then a 64-byte union holding
// the IOTLB message.
type MsgV2 struct {
	Type  uint32
	ASID  uint32
	IOTLB IOTLBMsg
	_     [64 - SizeofIOTLBMsg]byte
}

// Struct sizes (sizeof in C) and the offsets the checker compares.
const (
	SizeofVringState   = 8
	SizeofVringFile    = 8
	SizeofVringAddr    = 40
	SizeofMemoryRegion = 32
	SizeofMemory       = 8 // struct vhost_memory without its flexible array
	SizeofVDPAConfig   = 8 // struct vhost_vdpa_config without its flexible array
	SizeofIOVARange    = 16
	SizeofIOTLBMsg     = 32
	SizeofMsgV2        = 72

	offsetofMsgV2IOTLB = 8
)

// FileUnbind is VHOST_FILE_UNBIND: the fd that detaches an eventfd or
// backend.
const FileUnbind = -1

// Ring flags (struct vhost_vring_addr.flags) and legacy ring byte order.
const (
	VHOST_VRING_F_LOG = 0 // bit number: log_guest_addr is valid, log used-ring writes

	VHOST_PAGE_SIZE = 0x1000 // dirty log granule and memory table alignment
)

// IOTLB message types and permissions (struct vhost_iotlb_msg).
const (
	VHOST_IOTLB_MSG    = 0x1
	VHOST_IOTLB_MSG_V2 = 0x2

	VHOST_IOTLB_MISS        = 1
	VHOST_IOTLB_UPDATE      = 2
	VHOST_IOTLB_INVALIDATE  = 3
	VHOST_IOTLB_ACCESS_FAIL = 4
	VHOST_IOTLB_BATCH_BEGIN = 5
	VHOST_IOTLB_BATCH_END   = 6

	VHOST_ACCESS_RO = 0x1
	VHOST_ACCESS_WO = 0x2
	VHOST_ACCESS_RW = 0x3
)

// vhost feature bits (VHOST_GET_FEATURES) that are not virtio bits.
const (
	VHOST_F_LOG_ALL            = 26
	VHOST_NET_F_VIRTIO_NET_HDR = 27
)

// Backend feature bit numbers (VHOST_GET/SET_BACKEND_FEATURES).
const (
	VHOST_BACKEND_F_IOTLB_MSG_V2           = 0x1
	VHOST_BACKEND_F_IOTLB_BATCH            = 0x2
	VHOST_BACKEND_F_IOTLB_ASID             = 0x3
	VHOST_BACKEND_F_SUSPEND                = 0x4
	VHOST_BACKEND_F_RESUME                 = 0x5 // 6.12
	VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 0x6 // 6.12
	VHOST_BACKEND_F_DESC_ASID              = 0x7 // 6.12
	VHOST_BACKEND_F_IOTLB_PERSIST          = 0x8 // 6.12
)

// ioctl request numbers. Each is built the way linux/vhost.h builds it
// (_IO/_IOR/_IOW/_IOWR with type VHOST_VIRTIO = 0xAF, the command number and
// the argument's size).
const (
	VHOST_GET_FEATURES               = dirRead | vhostType | 0x00<<iocNRShift | sizeofU64<<iocSizeShift
	VHOST_SET_FEATURES               = dirWrite | vhostType | 0x00<<iocNRShift | sizeofU64<<iocSizeShift
	VHOST_SET_OWNER                  = dirNone | vhostType | 0x01<<iocNRShift | 0<<iocSizeShift
	VHOST_RESET_OWNER                = dirNone | vhostType | 0x02<<iocNRShift | 0<<iocSizeShift
	VHOST_SET_MEM_TABLE              = dirWrite | vhostType | 0x03<<iocNRShift | SizeofMemory<<iocSizeShift
	VHOST_SET_LOG_BASE               = dirWrite | vhostType | 0x04<<iocNRShift | sizeofU64<<iocSizeShift
	VHOST_SET_LOG_FD                 = dirWrite | vhostType | 0x07<<iocNRShift | sizeofInt<<iocSizeShift
	VHOST_SET_VRING_NUM              = dirWrite | vhostType | 0x10<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_SET_VRING_ADDR             = dirWrite | vhostType | 0x11<<iocNRShift | SizeofVringAddr<<iocSizeShift
	VHOST_SET_VRING_BASE             = dirWrite | vhostType | 0x12<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_GET_VRING_BASE             = dirReadWrite | vhostType | 0x12<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_SET_VRING_KICK             = dirWrite | vhostType | 0x20<<iocNRShift | SizeofVringFile<<iocSizeShift
	VHOST_SET_VRING_CALL             = dirWrite | vhostType | 0x21<<iocNRShift | SizeofVringFile<<iocSizeShift
	VHOST_SET_VRING_ERR              = dirWrite | vhostType | 0x22<<iocNRShift | SizeofVringFile<<iocSizeShift
	VHOST_SET_VRING_BUSYLOOP_TIMEOUT = dirWrite | vhostType | 0x23<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_GET_VRING_BUSYLOOP_TIMEOUT = dirWrite | vhostType | 0x24<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_SET_BACKEND_FEATURES       = dirWrite | vhostType | 0x25<<iocNRShift | sizeofU64<<iocSizeShift
	VHOST_GET_BACKEND_FEATURES       = dirRead | vhostType | 0x26<<iocNRShift | sizeofU64<<iocSizeShift
	VHOST_NET_SET_BACKEND            = dirWrite | vhostType | 0x30<<iocNRShift | SizeofVringFile<<iocSizeShift
	VHOST_VDPA_GET_DEVICE_ID         = dirRead | vhostType | 0x70<<iocNRShift | sizeofU32<<iocSizeShift
	VHOST_VDPA_GET_STATUS            = dirRead | vhostType | 0x71<<iocNRShift | sizeofU8<<iocSizeShift
	VHOST_VDPA_SET_STATUS            = dirWrite | vhostType | 0x72<<iocNRShift | sizeofU8<<iocSizeShift
	VHOST_VDPA_GET_CONFIG            = dirRead | vhostType | 0x73<<iocNRShift | SizeofVDPAConfig<<iocSizeShift
	VHOST_VDPA_SET_CONFIG            = dirWrite | vhostType | 0x74<<iocNRShift | SizeofVDPAConfig<<iocSizeShift
	VHOST_VDPA_SET_VRING_ENABLE      = dirWrite | vhostType | 0x75<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_VDPA_GET_VRING_NUM         = dirRead | vhostType | 0x76<<iocNRShift | sizeofU16<<iocSizeShift
	VHOST_VDPA_SET_CONFIG_CALL       = dirWrite | vhostType | 0x77<<iocNRShift | sizeofInt<<iocSizeShift
	VHOST_VDPA_GET_IOVA_RANGE        = dirRead | vhostType | 0x78<<iocNRShift | SizeofIOVARange<<iocSizeShift
	VHOST_VDPA_GET_CONFIG_SIZE       = dirRead | vhostType | 0x79<<iocNRShift | sizeofU32<<iocSizeShift
	VHOST_VDPA_GET_AS_NUM            = dirRead | vhostType | 0x7A<<iocNRShift | sizeofInt<<iocSizeShift
	VHOST_VDPA_GET_VRING_GROUP       = dirReadWrite | vhostType | 0x7B<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_VDPA_SET_GROUP_ASID        = dirWrite | vhostType | 0x7C<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_VDPA_SUSPEND               = dirNone | vhostType | 0x7D<<iocNRShift | 0<<iocSizeShift
	VHOST_VDPA_RESUME                = dirNone | vhostType | 0x7E<<iocNRShift | 0<<iocSizeShift
	VHOST_VDPA_GET_VRING_DESC_GROUP  = dirReadWrite | vhostType | 0x7F<<iocNRShift | SizeofVringState<<iocSizeShift
	VHOST_VDPA_GET_VQS_COUNT         = dirRead | vhostType | 0x80<<iocNRShift | sizeofU32<<iocSizeShift
	VHOST_VDPA_GET_GROUP_NUM         = dirRead | vhostType | 0x81<<iocNRShift | sizeofU32<<iocSizeShift
	VHOST_VDPA_GET_VRING_SIZE        = dirReadWrite | vhostType | 0x82<<iocNRShift | SizeofVringState<<iocSizeShift
)

// ioctlTable lists every request number with the header version that
// introduced it when newer than 6.1; the ABI check walks it.
var ioctlTable = []struct {
	name  string
	value uint
	since string
}{
	{"VHOST_GET_FEATURES", VHOST_GET_FEATURES, ""},
	{"VHOST_SET_FEATURES", VHOST_SET_FEATURES, ""},
	{"VHOST_SET_OWNER", VHOST_SET_OWNER, ""},
	{"VHOST_RESET_OWNER", VHOST_RESET_OWNER, ""},
	{"VHOST_SET_MEM_TABLE", VHOST_SET_MEM_TABLE, ""},
	{"VHOST_SET_LOG_BASE", VHOST_SET_LOG_BASE, ""},
	{"VHOST_SET_LOG_FD", VHOST_SET_LOG_FD, ""},
	{"VHOST_SET_VRING_NUM", VHOST_SET_VRING_NUM, ""},
	{"VHOST_SET_VRING_ADDR", VHOST_SET_VRING_ADDR, ""},
	{"VHOST_SET_VRING_BASE", VHOST_SET_VRING_BASE, ""},
	{"VHOST_GET_VRING_BASE", VHOST_GET_VRING_BASE, ""},
	{"VHOST_SET_VRING_KICK", VHOST_SET_VRING_KICK, ""},
	{"VHOST_SET_VRING_CALL", VHOST_SET_VRING_CALL, ""},
	{"VHOST_SET_VRING_ERR", VHOST_SET_VRING_ERR, ""},
	{"VHOST_SET_VRING_BUSYLOOP_TIMEOUT", VHOST_SET_VRING_BUSYLOOP_TIMEOUT, ""},
	{"VHOST_GET_VRING_BUSYLOOP_TIMEOUT", VHOST_GET_VRING_BUSYLOOP_TIMEOUT, ""},
	{"VHOST_SET_BACKEND_FEATURES", VHOST_SET_BACKEND_FEATURES, ""},
	{"VHOST_GET_BACKEND_FEATURES", VHOST_GET_BACKEND_FEATURES, ""},
	{"VHOST_NET_SET_BACKEND", VHOST_NET_SET_BACKEND, ""},
	{"VHOST_VDPA_GET_DEVICE_ID", VHOST_VDPA_GET_DEVICE_ID, ""},
	{"VHOST_VDPA_GET_STATUS", VHOST_VDPA_GET_STATUS, ""},
	{"VHOST_VDPA_SET_STATUS", VHOST_VDPA_SET_STATUS, ""},
	{"VHOST_VDPA_GET_CONFIG", VHOST_VDPA_GET_CONFIG, ""},
	{"VHOST_VDPA_SET_CONFIG", VHOST_VDPA_SET_CONFIG, ""},
	{"VHOST_VDPA_SET_VRING_ENABLE", VHOST_VDPA_SET_VRING_ENABLE, ""},
	{"VHOST_VDPA_GET_VRING_NUM", VHOST_VDPA_GET_VRING_NUM, ""},
	{"VHOST_VDPA_SET_CONFIG_CALL", VHOST_VDPA_SET_CONFIG_CALL, ""},
	{"VHOST_VDPA_GET_IOVA_RANGE", VHOST_VDPA_GET_IOVA_RANGE, ""},
	{"VHOST_VDPA_GET_CONFIG_SIZE", VHOST_VDPA_GET_CONFIG_SIZE, ""},
	{"VHOST_VDPA_GET_AS_NUM", VHOST_VDPA_GET_AS_NUM, ""},
	{"VHOST_VDPA_GET_VRING_GROUP", VHOST_VDPA_GET_VRING_GROUP, ""},
	{"VHOST_VDPA_SET_GROUP_ASID", VHOST_VDPA_SET_GROUP_ASID, ""},
	{"VHOST_VDPA_SUSPEND", VHOST_VDPA_SUSPEND, ""},
	{"VHOST_VDPA_RESUME", VHOST_VDPA_RESUME, "6.12"},
	{"VHOST_VDPA_GET_VRING_DESC_GROUP", VHOST_VDPA_GET_VRING_DESC_GROUP, "6.12"},
	{"VHOST_VDPA_GET_VQS_COUNT", VHOST_VDPA_GET_VQS_COUNT, ""},
	{"VHOST_VDPA_GET_GROUP_NUM", VHOST_VDPA_GET_GROUP_NUM, ""},
	{"VHOST_VDPA_GET_VRING_SIZE", VHOST_VDPA_GET_VRING_SIZE, "6.12"},
}

package vhostsys

import (
	"flag"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/internal/vhostsys/cabi"
)

// The ABI check has two halves:
//
//   - TestABIMatchesHeaders compiles a C program against the kernel uapi
//     headers with gcc and compares its output with the golden files in
//     testdata/ (abi-6.1.txt from the system headers, abi-6.12.txt from the
//     6.12 headers when present). -update rewrites them from gcc.
//   - TestABIMatchesGolden compares every Go constant, struct size and field
//     offset with the golden files. It needs no compiler, so it also runs in
//     the real-kernel harness, whose guest has no gcc.
//
// The golden files hold only what gcc printed; nothing in them comes from
// the Go code under test.

var update = flag.Bool("update", false, "rewrite testdata/abi-*.txt from the C headers")

func goABI() []cabi.Entry {
	var out []cabi.Entry
	for _, e := range ioctlTable {
		out = append(out, cabi.Entry{Name: e.name, Value: uint64(e.value), Since: e.since, Macro: true})
	}
	c := func(name string, v uint64, since string) {
		out = append(out, cabi.Entry{Name: name, Value: v, Since: since, Macro: true})
	}
	unbind := int64(FileUnbind)
	c("VHOST_FILE_UNBIND", uint64(unbind), "")
	c("VHOST_VRING_F_LOG", VHOST_VRING_F_LOG, "")
	c("VHOST_PAGE_SIZE", VHOST_PAGE_SIZE, "")
	c("VHOST_IOTLB_MSG", VHOST_IOTLB_MSG, "")
	c("VHOST_IOTLB_MSG_V2", VHOST_IOTLB_MSG_V2, "")
	c("VHOST_IOTLB_MISS", VHOST_IOTLB_MISS, "")
	c("VHOST_IOTLB_UPDATE", VHOST_IOTLB_UPDATE, "")
	c("VHOST_IOTLB_INVALIDATE", VHOST_IOTLB_INVALIDATE, "")
	c("VHOST_IOTLB_ACCESS_FAIL", VHOST_IOTLB_ACCESS_FAIL, "")
	c("VHOST_IOTLB_BATCH_BEGIN", VHOST_IOTLB_BATCH_BEGIN, "")
	c("VHOST_IOTLB_BATCH_END", VHOST_IOTLB_BATCH_END, "")
	c("VHOST_ACCESS_RO", VHOST_ACCESS_RO, "")
	c("VHOST_ACCESS_WO", VHOST_ACCESS_WO, "")
	c("VHOST_ACCESS_RW", VHOST_ACCESS_RW, "")
	c("VHOST_F_LOG_ALL", VHOST_F_LOG_ALL, "")
	c("VHOST_NET_F_VIRTIO_NET_HDR", VHOST_NET_F_VIRTIO_NET_HDR, "")
	c("VHOST_BACKEND_F_IOTLB_MSG_V2", VHOST_BACKEND_F_IOTLB_MSG_V2, "")
	c("VHOST_BACKEND_F_IOTLB_BATCH", VHOST_BACKEND_F_IOTLB_BATCH, "")
	c("VHOST_BACKEND_F_IOTLB_ASID", VHOST_BACKEND_F_IOTLB_ASID, "")
	c("VHOST_BACKEND_F_SUSPEND", VHOST_BACKEND_F_SUSPEND, "")
	c("VHOST_BACKEND_F_RESUME", VHOST_BACKEND_F_RESUME, "6.12")
	c("VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK", VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK, "6.12")
	c("VHOST_BACKEND_F_DESC_ASID", VHOST_BACKEND_F_DESC_ASID, "6.12")
	c("VHOST_BACKEND_F_IOTLB_PERSIST", VHOST_BACKEND_F_IOTLB_PERSIST, "6.12")
	// tun constants come from x/sys/unix; check them as well.
	c("TUNSETIFF", unix.TUNSETIFF, "")
	c("TUNSETVNETHDRSZ", unix.TUNSETVNETHDRSZ, "")
	c("TUNSETOFFLOAD", unix.TUNSETOFFLOAD, "")
	c("IFF_TAP", unix.IFF_TAP, "")
	c("IFF_NO_PI", unix.IFF_NO_PI, "")
	c("IFF_VNET_HDR", unix.IFF_VNET_HDR, "")

	s := func(ctype string, size uintptr) {
		out = append(out, cabi.Entry{Name: "sizeof(" + ctype + ")", Value: uint64(size)})
	}
	o := func(ctype, field string, off uintptr) {
		out = append(out, cabi.Entry{Name: "offsetof(" + ctype + ", " + field + ")", Value: uint64(off)})
	}
	var vs VringState
	s("struct vhost_vring_state", unsafe.Sizeof(vs))
	o("struct vhost_vring_state", "index", unsafe.Offsetof(vs.Index))
	o("struct vhost_vring_state", "num", unsafe.Offsetof(vs.Num))
	s("struct vhost_vring_state", SizeofVringState)
	var vf VringFile
	s("struct vhost_vring_file", unsafe.Sizeof(vf))
	s("struct vhost_vring_file", SizeofVringFile)
	o("struct vhost_vring_file", "index", unsafe.Offsetof(vf.Index))
	o("struct vhost_vring_file", "fd", unsafe.Offsetof(vf.Fd))
	var va VringAddr
	s("struct vhost_vring_addr", unsafe.Sizeof(va))
	s("struct vhost_vring_addr", SizeofVringAddr)
	o("struct vhost_vring_addr", "index", unsafe.Offsetof(va.Index))
	o("struct vhost_vring_addr", "flags", unsafe.Offsetof(va.Flags))
	o("struct vhost_vring_addr", "desc_user_addr", unsafe.Offsetof(va.DescUserAddr))
	o("struct vhost_vring_addr", "used_user_addr", unsafe.Offsetof(va.UsedUserAddr))
	o("struct vhost_vring_addr", "avail_user_addr", unsafe.Offsetof(va.AvailUserAddr))
	o("struct vhost_vring_addr", "log_guest_addr", unsafe.Offsetof(va.LogGuestAddr))
	var mr MemoryRegion
	s("struct vhost_memory_region", unsafe.Sizeof(mr))
	s("struct vhost_memory_region", SizeofMemoryRegion)
	o("struct vhost_memory_region", "guest_phys_addr", unsafe.Offsetof(mr.GuestPhysAddr))
	o("struct vhost_memory_region", "memory_size", unsafe.Offsetof(mr.MemorySize))
	o("struct vhost_memory_region", "userspace_addr", unsafe.Offsetof(mr.UserspaceAddr))
	o("struct vhost_memory_region", "flags_padding", unsafe.Offsetof(mr.FlagsPadding))
	var mh memoryHeader
	s("struct vhost_memory", unsafe.Sizeof(mh))
	s("struct vhost_memory", SizeofMemory)
	o("struct vhost_memory", "nregions", unsafe.Offsetof(mh.NRegions))
	o("struct vhost_memory", "padding", unsafe.Offsetof(mh.Padding))
	o("struct vhost_memory", "regions", unsafe.Sizeof(mh))
	var vc vdpaConfigHeader
	s("struct vhost_vdpa_config", unsafe.Sizeof(vc))
	s("struct vhost_vdpa_config", SizeofVDPAConfig)
	o("struct vhost_vdpa_config", "off", unsafe.Offsetof(vc.Off))
	o("struct vhost_vdpa_config", "len", unsafe.Offsetof(vc.Len))
	o("struct vhost_vdpa_config", "buf", unsafe.Sizeof(vc))
	var ir IOVARange
	s("struct vhost_vdpa_iova_range", unsafe.Sizeof(ir))
	s("struct vhost_vdpa_iova_range", SizeofIOVARange)
	o("struct vhost_vdpa_iova_range", "first", unsafe.Offsetof(ir.First))
	o("struct vhost_vdpa_iova_range", "last", unsafe.Offsetof(ir.Last))
	var im IOTLBMsg
	s("struct vhost_iotlb_msg", unsafe.Sizeof(im))
	s("struct vhost_iotlb_msg", SizeofIOTLBMsg)
	o("struct vhost_iotlb_msg", "iova", unsafe.Offsetof(im.IOVA))
	o("struct vhost_iotlb_msg", "size", unsafe.Offsetof(im.Size))
	o("struct vhost_iotlb_msg", "uaddr", unsafe.Offsetof(im.UAddr))
	o("struct vhost_iotlb_msg", "perm", unsafe.Offsetof(im.Perm))
	o("struct vhost_iotlb_msg", "type", unsafe.Offsetof(im.Type))
	var m2 MsgV2
	s("struct vhost_msg_v2", unsafe.Sizeof(m2))
	s("struct vhost_msg_v2", SizeofMsgV2)
	o("struct vhost_msg_v2", "type", unsafe.Offsetof(m2.Type))
	o("struct vhost_msg_v2", "asid", unsafe.Offsetof(m2.ASID))
	o("struct vhost_msg_v2", "iotlb", unsafe.Offsetof(m2.IOTLB))
	o("struct vhost_msg_v2", "iotlb", offsetofMsgV2IOTLB)
	// The encoder writes fields by hand: check its offsets too.
	o("struct vhost_msg_v2", "iotlb.iova", offsetofMsgV2IOTLB+0)
	o("struct vhost_msg_v2", "iotlb.size", offsetofMsgV2IOTLB+8)
	o("struct vhost_msg_v2", "iotlb.uaddr", offsetofMsgV2IOTLB+16)
	o("struct vhost_msg_v2", "iotlb.perm", offsetofMsgV2IOTLB+24)
	o("struct vhost_msg_v2", "iotlb.type", offsetofMsgV2IOTLB+25)
	return out
}

const (
	golden61  = "testdata/abi-6.1.txt"
	golden612 = "testdata/abi-6.12.txt"
)

var headers = []string{"linux/vhost.h", "linux/if_tun.h"}

func TestABIMatchesHeaders(t *testing.T) {
	cabi.CheckHeaders(t, headers, goABI(), golden61, golden612, *update)
}

func TestABIMatchesGolden(t *testing.T) {
	cabi.CheckGolden(t, goABI(), golden61, golden612)
}

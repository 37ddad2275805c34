package vhostsys

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// File is an open vhost character device (/dev/vhost-vdpa-N, /dev/vhost-net).
// Its methods are the typed ioctls; each returns an *OpError on failure.
//
// File is safe for concurrent use in the sense that a call racing with
// Close either completes on the original descriptor or fails with
// os.ErrClosed; the kernel serializes the ioctls themselves.
type File struct {
	f  *os.File
	rc syscall.RawConn
}

// Open opens a vhost device read-write and close-on-exec.
func Open(path string) (*File, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &OpError{Op: "open " + path, Err: err}
	}
	return NewFile(fd, path)
}

// NewFile adopts an already open vhost descriptor; File owns it from now on.
func NewFile(fd int, name string) (*File, error) {
	f := os.NewFile(uintptr(fd), name)
	if f == nil {
		return nil, &OpError{Op: "adopt " + name, Err: unix.EBADF}
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, &OpError{Op: "adopt " + name, Err: err}
	}
	return &File{f: f, rc: rc}, nil
}

// Name is the path the File was opened with.
func (f *File) Name() string { return f.f.Name() }

// Close closes the descriptor. The kernel releases the device: vhost-vdpa
// resets it and drops every IOTLB mapping, vhost-net stops its rings.
func (f *File) Close() error { return f.f.Close() }

// control runs fn with the live descriptor.
func (f *File) control(op string, fn func(fd int) error) error {
	var ferr error
	if err := f.rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		// Control fails only once the file is closed (or closing).
		return &OpError{Op: op, Err: os.ErrClosed}
	}
	return opErr(op, ferr)
}

func (f *File) ioctlU64Get(op string, req uint) (uint64, error) {
	var v uint64
	err := f.control(op, func(fd int) error { return ioctlPtrU64(fd, req, &v) })
	return v, err
}

func (f *File) ioctlU64Set(op string, req uint, v uint64) error {
	return f.control(op, func(fd int) error { return ioctlPtrU64(fd, req, &v) })
}

func (f *File) ioctlU32Get(op string, req uint) (uint32, error) {
	var v uint32
	err := f.control(op, func(fd int) error { return ioctlPtrU32(fd, req, &v) })
	return v, err
}

func (f *File) ioctlIntSet(op string, req uint, v int32) error {
	u := uint32(v)
	return f.control(op, func(fd int) error { return ioctlPtrU32(fd, req, &u) })
}

func (f *File) ioctlNone(op string, req uint) error {
	return f.control(op, func(fd int) error { return ioctlNoArg(fd, req) })
}

func (f *File) ioctlState(op string, req uint, s *VringState) error {
	return f.control(op, func(fd int) error { return ioctlPtrState(fd, req, s) })
}

func (f *File) ioctlFile(op string, req uint, idx uint32, fd int) error {
	if fd < FileUnbind || fd > 1<<31-1 {
		return &OpError{Op: op, Err: unix.EBADF}
	}
	vf := VringFile{Index: idx, Fd: int32(fd)}
	return f.control(op, func(dfd int) error { return ioctlPtrFile(dfd, req, &vf) })
}

// GetFeatures is VHOST_GET_FEATURES: the device features (vhost-vdpa) or
// the features vhost-net can handle.
func (f *File) GetFeatures() (uint64, error) {
	return f.ioctlU64Get("VHOST_GET_FEATURES", VHOST_GET_FEATURES)
}

// SetFeatures is VHOST_SET_FEATURES.
func (f *File) SetFeatures(v uint64) error {
	return f.ioctlU64Set("VHOST_SET_FEATURES", VHOST_SET_FEATURES, v)
}

// SetOwner is VHOST_SET_OWNER: makes the calling process the device's owner
// (its memory is the one IOTLB uaddrs and vhost-net ring addresses refer
// to). It must precede every other configuration call.
func (f *File) SetOwner() error { return f.ioctlNone("VHOST_SET_OWNER", VHOST_SET_OWNER) }

// ResetOwner is VHOST_RESET_OWNER.
func (f *File) ResetOwner() error { return f.ioctlNone("VHOST_RESET_OWNER", VHOST_RESET_OWNER) }

// SetMemTable is VHOST_SET_MEM_TABLE.
func (f *File) SetMemTable(regions []MemoryRegion) error {
	const op = "VHOST_SET_MEM_TABLE"
	if len(regions) > 1<<16 {
		return &OpError{Op: op, Err: unix.E2BIG}
	}
	return f.control(op, func(fd int) error { return ioctlMemTable(fd, regions) })
}

// SetLogBase is VHOST_SET_LOG_BASE: addr is the address in this process of
// the dirty log's first byte.
func (f *File) SetLogBase(addr uint64) error {
	return f.ioctlU64Set("VHOST_SET_LOG_BASE", VHOST_SET_LOG_BASE, addr)
}

// SetLogFD is VHOST_SET_LOG_FD: an eventfd signalled after log writes
// (-1 unbinds).
func (f *File) SetLogFD(fd int) error {
	if fd < FileUnbind || fd > 1<<31-1 {
		return &OpError{Op: "VHOST_SET_LOG_FD", Err: unix.EBADF}
	}
	return f.ioctlIntSet("VHOST_SET_LOG_FD", VHOST_SET_LOG_FD, int32(fd))
}

// SetVringNum is VHOST_SET_VRING_NUM.
func (f *File) SetVringNum(idx, num uint32) error {
	s := VringState{Index: idx, Num: num}
	return f.ioctlState("VHOST_SET_VRING_NUM", VHOST_SET_VRING_NUM, &s)
}

// SetVringAddr is VHOST_SET_VRING_ADDR.
func (f *File) SetVringAddr(a VringAddr) error {
	const op = "VHOST_SET_VRING_ADDR"
	return f.control(op, func(fd int) error { return ioctlPtrAddr(fd, VHOST_SET_VRING_ADDR, &a) })
}

// SetVringBase is VHOST_SET_VRING_BASE: the next available index the
// device will consume.
func (f *File) SetVringBase(idx, num uint32) error {
	s := VringState{Index: idx, Num: num}
	return f.ioctlState("VHOST_SET_VRING_BASE", VHOST_SET_VRING_BASE, &s)
}

// GetVringBase is VHOST_GET_VRING_BASE. On vhost-net it stops the ring.
func (f *File) GetVringBase(idx uint32) (uint32, error) {
	s := VringState{Index: idx}
	err := f.ioctlState("VHOST_GET_VRING_BASE", VHOST_GET_VRING_BASE, &s)
	return s.Num, err
}

// SetVringKick is VHOST_SET_VRING_KICK (fd -1 unbinds).
func (f *File) SetVringKick(idx uint32, fd int) error {
	return f.ioctlFile("VHOST_SET_VRING_KICK", VHOST_SET_VRING_KICK, idx, fd)
}

// SetVringCall is VHOST_SET_VRING_CALL (fd -1 unbinds).
func (f *File) SetVringCall(idx uint32, fd int) error {
	return f.ioctlFile("VHOST_SET_VRING_CALL", VHOST_SET_VRING_CALL, idx, fd)
}

// SetVringErr is VHOST_SET_VRING_ERR (fd -1 unbinds).
func (f *File) SetVringErr(idx uint32, fd int) error {
	return f.ioctlFile("VHOST_SET_VRING_ERR", VHOST_SET_VRING_ERR, idx, fd)
}

// SetVringBusyloopTimeout is VHOST_SET_VRING_BUSYLOOP_TIMEOUT (microseconds).
func (f *File) SetVringBusyloopTimeout(idx, usec uint32) error {
	s := VringState{Index: idx, Num: usec}
	return f.ioctlState("VHOST_SET_VRING_BUSYLOOP_TIMEOUT", VHOST_SET_VRING_BUSYLOOP_TIMEOUT, &s)
}

// GetVringBusyloopTimeout is VHOST_GET_VRING_BUSYLOOP_TIMEOUT.
func (f *File) GetVringBusyloopTimeout(idx uint32) (uint32, error) {
	s := VringState{Index: idx}
	err := f.ioctlState("VHOST_GET_VRING_BUSYLOOP_TIMEOUT", VHOST_GET_VRING_BUSYLOOP_TIMEOUT, &s)
	return s.Num, err
}

// GetBackendFeatures is VHOST_GET_BACKEND_FEATURES (a mask of
// 1<<VHOST_BACKEND_F_* bits).
func (f *File) GetBackendFeatures() (uint64, error) {
	return f.ioctlU64Get("VHOST_GET_BACKEND_FEATURES", VHOST_GET_BACKEND_FEATURES)
}

// SetBackendFeatures is VHOST_SET_BACKEND_FEATURES.
func (f *File) SetBackendFeatures(v uint64) error {
	return f.ioctlU64Set("VHOST_SET_BACKEND_FEATURES", VHOST_SET_BACKEND_FEATURES, v)
}

// NetSetBackend is VHOST_NET_SET_BACKEND: attaches ring idx to a tap or
// packet socket fd (-1 detaches and stops the ring).
func (f *File) NetSetBackend(idx uint32, fd int) error {
	return f.ioctlFile("VHOST_NET_SET_BACKEND", VHOST_NET_SET_BACKEND, idx, fd)
}

// VDPAGetDeviceID is VHOST_VDPA_GET_DEVICE_ID.
func (f *File) VDPAGetDeviceID() (uint32, error) {
	return f.ioctlU32Get("VHOST_VDPA_GET_DEVICE_ID", VHOST_VDPA_GET_DEVICE_ID)
}

// VDPAGetStatus is VHOST_VDPA_GET_STATUS.
func (f *File) VDPAGetStatus() (uint8, error) {
	var v uint8
	err := f.control("VHOST_VDPA_GET_STATUS", func(fd int) error { return ioctlPtrU8(fd, VHOST_VDPA_GET_STATUS, &v) })
	return v, err
}

// VDPASetStatus is VHOST_VDPA_SET_STATUS. Status 0 resets the device.
func (f *File) VDPASetStatus(v uint8) error {
	return f.control("VHOST_VDPA_SET_STATUS", func(fd int) error { return ioctlPtrU8(fd, VHOST_VDPA_SET_STATUS, &v) })
}

// maxConfigLen bounds a config access; the kernel itself rejects anything
// past the device's config size.
const maxConfigLen = 1 << 20

// VDPAGetConfig is VHOST_VDPA_GET_CONFIG: reads len(p) bytes of device
// config space at off.
func (f *File) VDPAGetConfig(off uint32, p []byte) error {
	return f.configIoctl("VHOST_VDPA_GET_CONFIG", VHOST_VDPA_GET_CONFIG, off, p, false)
}

// VDPASetConfig is VHOST_VDPA_SET_CONFIG.
func (f *File) VDPASetConfig(off uint32, p []byte) error {
	return f.configIoctl("VHOST_VDPA_SET_CONFIG", VHOST_VDPA_SET_CONFIG, off, p, true)
}

func (f *File) configIoctl(op string, req uint, off uint32, p []byte, write bool) error {
	if len(p) == 0 || len(p) > maxConfigLen {
		return &OpError{Op: op, Err: unix.EINVAL}
	}
	buf := make([]byte, SizeofVDPAConfig+len(p))
	binary.NativeEndian.PutUint32(buf[0:], off)
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(p)))
	if write {
		copy(buf[SizeofVDPAConfig:], p)
	}
	if err := f.control(op, func(fd int) error { return ioctlPtrBytes(fd, req, buf) }); err != nil {
		return err
	}
	if !write {
		copy(p, buf[SizeofVDPAConfig:])
	}
	return nil
}

// VDPASetVringEnable is VHOST_VDPA_SET_VRING_ENABLE.
func (f *File) VDPASetVringEnable(idx uint32, enable bool) error {
	s := VringState{Index: idx}
	if enable {
		s.Num = 1
	}
	return f.ioctlState("VHOST_VDPA_SET_VRING_ENABLE", VHOST_VDPA_SET_VRING_ENABLE, &s)
}

// VDPAGetVringNum is VHOST_VDPA_GET_VRING_NUM: the largest queue size.
func (f *File) VDPAGetVringNum() (uint16, error) {
	var v uint16
	err := f.control("VHOST_VDPA_GET_VRING_NUM", func(fd int) error { return ioctlPtrU16(fd, VHOST_VDPA_GET_VRING_NUM, &v) })
	return v, err
}

// VDPASetConfigCall is VHOST_VDPA_SET_CONFIG_CALL: the eventfd signalled on
// config changes (-1 unbinds).
func (f *File) VDPASetConfigCall(fd int) error {
	if fd < FileUnbind || fd > 1<<31-1 {
		return &OpError{Op: "VHOST_VDPA_SET_CONFIG_CALL", Err: unix.EBADF}
	}
	return f.ioctlIntSet("VHOST_VDPA_SET_CONFIG_CALL", VHOST_VDPA_SET_CONFIG_CALL, int32(fd))
}

// VDPAGetIOVARange is VHOST_VDPA_GET_IOVA_RANGE.
func (f *File) VDPAGetIOVARange() (IOVARange, error) {
	var r IOVARange
	err := f.control("VHOST_VDPA_GET_IOVA_RANGE", func(fd int) error { return ioctlPtrRange(fd, VHOST_VDPA_GET_IOVA_RANGE, &r) })
	return r, err
}

// VDPAGetConfigSize is VHOST_VDPA_GET_CONFIG_SIZE.
func (f *File) VDPAGetConfigSize() (uint32, error) {
	return f.ioctlU32Get("VHOST_VDPA_GET_CONFIG_SIZE", VHOST_VDPA_GET_CONFIG_SIZE)
}

// VDPAGetVQsCount is VHOST_VDPA_GET_VQS_COUNT.
func (f *File) VDPAGetVQsCount() (uint32, error) {
	return f.ioctlU32Get("VHOST_VDPA_GET_VQS_COUNT", VHOST_VDPA_GET_VQS_COUNT)
}

// VDPAGetGroupNum is VHOST_VDPA_GET_GROUP_NUM: the number of virtqueue groups.
func (f *File) VDPAGetGroupNum() (uint32, error) {
	return f.ioctlU32Get("VHOST_VDPA_GET_GROUP_NUM", VHOST_VDPA_GET_GROUP_NUM)
}

// VDPAGetASNum is VHOST_VDPA_GET_AS_NUM: the number of address spaces.
func (f *File) VDPAGetASNum() (uint32, error) {
	return f.ioctlU32Get("VHOST_VDPA_GET_AS_NUM", VHOST_VDPA_GET_AS_NUM)
}

// VDPAGetVringGroup is VHOST_VDPA_GET_VRING_GROUP: the group of queue idx.
func (f *File) VDPAGetVringGroup(idx uint32) (uint32, error) {
	s := VringState{Index: idx}
	err := f.ioctlState("VHOST_VDPA_GET_VRING_GROUP", VHOST_VDPA_GET_VRING_GROUP, &s)
	return s.Num, err
}

// VDPAGetVringDescGroup is VHOST_VDPA_GET_VRING_DESC_GROUP (6.12): the
// group of queue idx's descriptor, driver and device areas.
func (f *File) VDPAGetVringDescGroup(idx uint32) (uint32, error) {
	s := VringState{Index: idx}
	err := f.ioctlState("VHOST_VDPA_GET_VRING_DESC_GROUP", VHOST_VDPA_GET_VRING_DESC_GROUP, &s)
	return s.Num, err
}

// VDPASetGroupASID is VHOST_VDPA_SET_GROUP_ASID: binds group to address
// space asid.
func (f *File) VDPASetGroupASID(group, asid uint32) error {
	s := VringState{Index: group, Num: asid}
	return f.ioctlState("VHOST_VDPA_SET_GROUP_ASID", VHOST_VDPA_SET_GROUP_ASID, &s)
}

// VDPAGetVringSize is VHOST_VDPA_GET_VRING_SIZE (6.12): queue idx's size.
func (f *File) VDPAGetVringSize(idx uint32) (uint32, error) {
	s := VringState{Index: idx}
	err := f.ioctlState("VHOST_VDPA_GET_VRING_SIZE", VHOST_VDPA_GET_VRING_SIZE, &s)
	return s.Num, err
}

// VDPASuspend is VHOST_VDPA_SUSPEND.
func (f *File) VDPASuspend() error { return f.ioctlNone("VHOST_VDPA_SUSPEND", VHOST_VDPA_SUSPEND) }

// VDPAResume is VHOST_VDPA_RESUME (6.12).
func (f *File) VDPAResume() error { return f.ioctlNone("VHOST_VDPA_RESUME", VHOST_VDPA_RESUME) }

// WriteMsgV2 writes one struct vhost_msg_v2 to the device. The kernel
// answers a rejected message with EFAULT whatever the cause (vhost's
// vhost_chr_write_iter folds every handler error into it), except for
// malformed messages, which get EINVAL.
func (f *File) WriteMsgV2(m *MsgV2) error {
	op := msgOp(m)
	var buf [SizeofMsgV2]byte
	m.marshal(buf[:])
	var n int
	err := f.control(op, func(fd int) error {
		var werr error
		n, werr = unix.Write(fd, buf[:])
		return werr
	})
	runtime.KeepAlive(m)
	if err != nil {
		return err
	}
	if n != SizeofMsgV2 {
		return &OpError{Op: op, Err: fmt.Errorf("%w: %d of %d bytes", ErrShortWrite, n, SizeofMsgV2)}
	}
	return nil
}

func msgOp(m *MsgV2) string {
	switch m.IOTLB.Type {
	case VHOST_IOTLB_UPDATE:
		return "VHOST_IOTLB_UPDATE"
	case VHOST_IOTLB_INVALIDATE:
		return "VHOST_IOTLB_INVALIDATE"
	case VHOST_IOTLB_BATCH_BEGIN:
		return "VHOST_IOTLB_BATCH_BEGIN"
	case VHOST_IOTLB_BATCH_END:
		return "VHOST_IOTLB_BATCH_END"
	}
	return fmt.Sprintf("VHOST_IOTLB_MSG_V2 type %d", m.IOTLB.Type)
}

// marshal encodes m in the kernel's layout and native byte order.
func (m *MsgV2) marshal(b []byte) {
	_ = b[SizeofMsgV2-1]
	clear(b)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], m.Type)
	ne.PutUint32(b[4:], m.ASID)
	p := b[offsetofMsgV2IOTLB:]
	ne.PutUint64(p[0:], m.IOTLB.IOVA)
	ne.PutUint64(p[8:], m.IOTLB.Size)
	ne.PutUint64(p[16:], m.IOTLB.UAddr)
	p[24] = m.IOTLB.Perm
	p[25] = m.IOTLB.Type
}

package vhostsys

// Field positions of an ioctl request number (_IOC in linux/ioctl.h).
const (
	iocNRShift   = 0
	iocTypeShift = 8
	iocSizeShift = 16
	iocDirShift  = iocSizeShift + iocSizeBits

	// Direction values shifted into place: _IO, _IOR, _IOW and _IOWR.
	dirNone      = iocNone << iocDirShift
	dirRead      = iocRead << iocDirShift
	dirWrite     = iocWrite << iocDirShift
	dirReadWrite = (iocRead | iocWrite) << iocDirShift

	// The vhost ioctl type (VHOST_VIRTIO in linux/vhost.h).
	vhostType = 0xAF << iocTypeShift
)

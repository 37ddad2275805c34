// Package kernel drives a kernel vDPA device, /dev/vhost-vdpa-N, from Go: the
// vhost-vdpa character device that the vhost_vdpa driver creates for every
// vDPA device bound to it (a vdpa_sim_net simulator, a SmartNIC function,
// a VDUSE device).
//
// Device implements vdpa.Device and vdpa.Suspender. Open makes this process
// the owner (VHOST_SET_OWNER) and negotiates the backend features
// (IOTLB_MSG_V2 is required; IOTLB_BATCH, IOTLB_ASID, SUSPEND, RESUME and
// IOTLB_PERSIST are taken when the kernel offers them). The usual sequence
// then is
//
//	dev.SetStatus(ACKNOWLEDGE|DRIVER)
//	dev.SetFeatures(f)                        // must include ACCESS_PLATFORM on most devices
//	dev.SetStatus(ACKNOWLEDGE|DRIVER|FEATURES_OK)
//	dev.SetMemory(mem)                        // IOTLB v2 updates: IOVA = guest address
//	dev.SetupQueue(q, layout, state, kick, call) // per queue: num, addr, base, kick, call, enable
//	dev.SetStatus(...|DRIVER_OK)
//
// Addresses: with vhost-vdpa every address the device sees is an I/O virtual
// address. SetMemory maps each vring.Region at its guest address (IOVA =
// Region.Base, user address = Region.HostAddr), so ring and descriptor
// addresses are plain vring.GuestAddr values. The memory must be shared and
// file-backed (vring.NewMemfdRegion): the kernel silently skips private
// anonymous memory for devices that use virtual addresses, and SetMemory
// refuses it.
//
// Errors from the kernel are *OpError values naming the ioctl
// ("VHOST_VDPA_SET_STATUS: invalid argument") and wrapping the errno.
// IOTLB rejections come back from the kernel as EFAULT whatever their cause.
package kernel

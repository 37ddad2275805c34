// Package vhostsys is the only place in vdpakit that talks to the vhost,
// vhost-vdpa and tun character devices: ioctl numbers, kernel struct layouts,
// raw system calls and the unsafe code they need.
//
// Everything above it (vdpa/kernel, vdpa/vhostnet) works with the typed
// wrappers here. Every wrapper
//
//   - names the operation in its error (an *OpError whose Op is the ioctl's
//     name as linux/vhost.h spells it, for example "VHOST_VDPA_SET_STATUS"),
//     wrapping the errno so callers can use errors.Is(err, unix.EINVAL) or
//     errors.Is(err, errors.ErrUnsupported);
//   - keeps the memory it hands to the kernel alive for the whole call
//     (runtime.KeepAlive);
//   - goes through the descriptor's syscall.RawConn, so a concurrent Close
//     cannot make a call land on a recycled descriptor number.
//
// The ioctl numbers and struct layouts live in abi.go. They are written by
// hand from linux/vhost.h and linux/vhost_types.h (6.1 for the base set, 6.12
// for VHOST_VDPA_RESUME, VHOST_VDPA_GET_VRING_DESC_GROUP,
// VHOST_VDPA_GET_VRING_SIZE and the newer backend feature bits) and checked
// by TestABIMatchesHeaders, which compiles a C program against the headers
// and compares every number, size and offset.
package vhostsys

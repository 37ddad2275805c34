// Package vdpa is the vhost/vDPA control plane: one Device interface for "a
// virtio device whose data path is processed by someone else", mirroring the
// vhost-vdpa ioctls, with implementations for the kernel (/dev/vhost-vdpa-N,
// including a VDUSE device's, and /dev/vhost-net), for vhost-user peers and
// for an in-process software device. Package vduse works the other way
// round: it serves a Handler to the kernel through VDUSE.
//
// Addresses: every address crossing the Device interface is a vring.GuestAddr
// (guest-physical, or IOVA when ACCESS_PLATFORM is negotiated). Implementations
// that speak host virtual addresses to their peer (vhost-net, vhost-user)
// translate through the vring.Memory given to SetMemory, so callers can never
// mix the two kinds.
package vdpa

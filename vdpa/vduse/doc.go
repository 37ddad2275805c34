// Package vduse serves a vdpa.Handler to the Linux kernel through VDUSE
// (vDPA Device in Userspace): the kernel sees a vDPA device, binds it to
// vhost_vdpa (a /dev/vhost-vdpa-N for a VMM or vdpakit's own kernel
// backend) or to virtio_vdpa (the kernel's own virtio drivers, e.g. a
// virtio_net network interface), and this package processes its rings.
//
// Lifecycle:
//
//	dev, err := vduse.Create(handler, &vduse.Options{Name: "vduse-net0"})
//	go dev.Serve(ctx)                  // answer the kernel's requests
//	// vdpa dev add name vduse-net0 mgmtdev vduse
//	...
//	// vdpa dev del vduse-net0
//	dev.Close()                        // VDUSE_DESTROY_DEV
//
// Create issues VDUSE_CREATE_DEV with the handler's features, queue count
// and configuration space, opens /dev/vduse/NAME and runs VDUSE_VQ_SETUP for
// every queue, which must happen before the device is added to the vDPA bus.
// Serve must run before `vdpa dev add`: binding a driver already sends
// status changes, and the kernel blocks (up to its message timeout) until
// each request is answered. Serve answers every request, with
// VDUSE_REQ_RESULT_FAILED when it cannot honour one.
//
// Requests: VDUSE_SET_STATUS (FEATURES_OK hands the negotiated features to
// the handler; DRIVER_OK maps the IOTLB, reads every ready queue with
// VDUSE_VQ_GET_INFO, wires a kick eventfd with VDUSE_VQ_SETUP_KICKFD and
// starts the queue; 0 resets), VDUSE_GET_VQ_STATE (stops the queue and
// reports its next available index, as vhost's GET_VRING_BASE does) and
// VDUSE_UPDATE_IOTLB (queues stop, mappings in the range are dropped and
// re-fetched with VDUSE_IOTLB_GET_FD, queues restart at their exact
// position). Interrupts the handler signals on its call eventfd become
// VDUSE_VQ_INJECT_IRQ; ConfigChanged pushes the handler's configuration
// with VDUSE_DEV_SET_CONFIG and raises VDUSE_DEV_INJECT_CONFIG_IRQ.
//
// Address space: with VDUSE every buffer address is an IOVA. Under
// virtio_vdpa the kernel's IOVA domain has a bounce-buffer area at IOVA
// [0, bounce_size) that it maps lazily on the first DMA mapping without
// telling userspace; the server maps that area from the domain file up
// front so buffers there are reachable.
//
// Kernel facts this package relies on (Linux 6.12): a net device must offer
// VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM and no control virtqueue
// (softnet.Options{AccessPlatform: true, NoCtrlVQ: true}); opening or
// resetting vhost-vdpa sends a status of 0.
package vduse

// Package hostnet attaches a softnet.Device to a host network: a Linux tap
// device (Tap), or an existing interface through an AF_PACKET socket
// (Packet). Each is the device's softnet.OffloadHandler, so what the driver
// transmits goes to the host with its virtio-net header (checksum and
// segmentation offloads included), and it delivers what the host sends
// with softnet.Device.DeliverHdr, so frames reach the driver's receive
// queues with their offloads, completed or segmented by the device for a
// driver that did not negotiate them.
//
// Both back-ends follow the same rules: writes to the host never block (a
// full host queue is a counted drop, so the driver's transmit queue never
// waits on the host); one goroutine per queue reads from the host into a
// buffer of its own and delivers from there, one copy into the driver's
// buffers, nothing allocated per frame; a frame the driver has no buffer
// for is a counted drop; Close takes a context, closes every file
// descriptor and waits for the goroutines.
//
// The system calls and unsafe code are in sys_linux.go (tap, network
// namespaces) and packet_linux.go (the AF_PACKET ring).
package hostnet

package vring

import "fmt"

// GuestAddr is an address in the device's view of guest memory: a
// guest-physical address (vhost-net, vhost-user, the software device) or an
// I/O virtual address (vhost-vdpa with VIRTIO_F_ACCESS_PLATFORM). Descriptor
// addresses, ring addresses handed to a Queue and the dirty log's index are
// all GuestAddr values.
type GuestAddr uint64

// HostAddr is a virtual address in this process (or, for vhost-user, in the
// front-end process that sent it). It is what vhost-kernel and vhost-user
// ring addresses and memory-table userspace addresses hold. It is never
// dereferenced directly; Memory translates it through a bounds-checked
// region lookup.
type HostAddr uint64

func (a GuestAddr) String() string { return fmt.Sprintf("gpa:%#x", uint64(a)) }
func (a HostAddr) String() string  { return fmt.Sprintf("hva:%#x", uint64(a)) }

// WriteLogger receives every guest-memory write a device-side queue makes:
// used-ring entries, used.idx, avail_event, and the bytes a caller reports as
// written into writable descriptor buffers. A dirty.Bitmap satisfies it, so
// vring never imports dirty (and dirty never imports vring).
//
// LogWrite must be safe for concurrent use by many queues, unless the logger
// is a LogFlusher (below). It returns an error when the range cannot be
// logged (for example it lies outside the log's span); the queue reports that
// error to its caller rather than dropping the mark.
type WriteLogger interface {
	LogWrite(addr uint64, length uint64) error
}

// LogFlusher is implemented by a WriteLogger that holds marks back and
// applies them in bulk (dirty.Cache): one logger per queue, used only by
// the goroutine that drives the queue. A DeviceQueue whose logger is a
// LogFlusher calls FlushLog at the end of every Push, PushChain,
// PushBatch, EnableNotify and DisableNotify that writes to the ring, so
// that marks wait at most until the queue's next publication; the marks of
// LogChain and of Pop (avail_event) wait for the next of those. (A call
// that writes nothing, such as a refused push, may skip the flush.)
// Whoever stops the queue calls DeviceQueue.FlushLog once the queue is no
// longer driven (the servers in package vdpa do, after the handler's
// StopQueue or Reset), so that a log harvested after the device stopped
// holds every write. A FlushLog error breaks the queue with ErrLogWrite.
type LogFlusher interface {
	FlushLog() error
}

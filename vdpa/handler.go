package vdpa

import (
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Handler is the device side of a virtio device: the engine that processes
// virtqueues (the software virtio-net device is one). Servers expose a
// Handler to a driver: NewLocal in-process, the vhost-user back-end over a
// socket, VDUSE to the kernel.
//
// The server owns the control path: it negotiates features, validates the
// driver's ring addresses against guest memory, builds each
// vring.DeviceQueue (with the dirty logger when logging is on) and only then
// calls StartQueue. The Handler owns the data path of a started queue until
// StopQueue returns.
//
// Servers call a Handler's methods from one goroutine at a time; the
// handler's own queue goroutines run concurrently with those calls.
type Handler interface {
	// DeviceID is the virtio device type.
	DeviceID() virtio.DeviceID
	// Features are the features the device offers.
	Features() virtio.Features
	// SetFeatures is called with the negotiated subset before any queue
	// starts.
	SetFeatures(virtio.Features) error
	// ConfigSize, ReadConfig and WriteConfig expose the device
	// configuration space. Reads outside it return zeros; writes to
	// read-only fields are ignored, as the spec requires.
	ConfigSize() int
	ReadConfig(off int, p []byte)
	WriteConfig(off int, p []byte) error
	// NumQueues and MaxQueueSize bound the queues a driver may set up.
	NumQueues() int
	MaxQueueSize() uint16
	// StartQueue hands queue q to the handler. kick is signalled by the
	// driver when it adds buffers (nil: the handler must poll); the handler
	// signals call when the queue's NeedsInterrupt says so (nil: the driver
	// polls).
	StartQueue(q int, dq *vring.DeviceQueue, kick, call *EventFD) error
	// StopQueue stops processing queue q and returns its state. After it
	// returns the handler no longer touches the queue or guest memory
	// through it.
	StopQueue(q int) (vring.QueueState, error)
	// Reset stops every queue and returns the device to its initial state.
	Reset()
}

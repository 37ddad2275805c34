package vdpa

import (
	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// QueueAddr is the guest address of a split virtqueue's three areas.
type QueueAddr struct {
	Desc  vring.GuestAddr // descriptor table, 16-byte aligned
	Avail vring.GuestAddr // available (driver) ring, 2-byte aligned
	Used  vring.GuestAddr // used (device) ring, 4-byte aligned
}

// QueueState is a split virtqueue's device-side position (vring.QueueState:
// the next available index the device will consume and the next used index it
// will publish). vhost's GET/SET_VRING_BASE carries only NextAvail for split
// rings; kernel implementations read NextUsed from the used ring.
type QueueState = vring.QueueState

// Device is a virtio device whose data path is processed outside the caller:
// by the kernel, by hardware, by a vhost-user peer, or by a software engine.
// The method set mirrors the vhost-vdpa ioctls so a kernel device maps onto it
// one to one. The call order follows the virtio initialization sequence:
//
//	SetStatus(ACKNOWLEDGE|DRIVER) -> SetFeatures -> SetStatus(+FEATURES_OK)
//	-> SetMemory -> per queue SetQueueNum/Addr/Base/Kick/Call, EnableQueue
//	-> SetStatus(+DRIVER_OK)
//
// Status 0 resets the device. A Device is not safe for concurrent control
// calls; the data path (kicks and interrupts) runs independently.
type Device interface {
	// DeviceID is the virtio device type.
	DeviceID() (virtio.DeviceID, error)
	// Features are the device features offered.
	Features() (virtio.Features, error)
	// SetFeatures sets the driver-accepted features; it must be a subset.
	SetFeatures(virtio.Features) error
	// Status and SetStatus read and write the device status byte.
	Status() (virtio.Status, error)
	SetStatus(virtio.Status) error
	// ConfigSize is the size of the device-specific configuration space.
	ConfigSize() (int, error)
	// ReadConfig and WriteConfig access the device configuration space.
	ReadConfig(off int, p []byte) error
	WriteConfig(off int, p []byte) error
	// NumQueues is the number of virtqueues the device supports.
	NumQueues() (int, error)
	// MaxQueueSize is the largest ring size a queue accepts.
	MaxQueueSize() (uint16, error)
	// SetMemory hands the device the guest memory its rings and buffers
	// live in (DMA map, memory table, or direct use).
	SetMemory(mem *vring.Memory) error
	// SetQueueNum, SetQueueAddr and SetQueueBase configure queue q before it
	// is enabled.
	SetQueueNum(q int, size uint16) error
	SetQueueAddr(q int, addr QueueAddr) error
	SetQueueBase(q int, st QueueState) error
	// QueueBase reads queue q's position back. On vhost devices this stops
	// the queue (GET_VRING_BASE); call it only after Suspend or before reset.
	QueueBase(q int) (QueueState, error)
	// SetQueueKick and SetQueueCall wire queue q's notification eventfds:
	// the driver signals kick, the device signals call. A nil EventFD unbinds.
	SetQueueKick(q int, kick *EventFD) error
	SetQueueCall(q int, call *EventFD) error
	// EnableQueue enables or disables queue q.
	EnableQueue(q int, enable bool) error
	// Close releases the device. It does not reset a device it did not open.
	Close() error
}

// Suspender is implemented by devices that can stop processing their queues
// without a reset, so that ring state can be read back (VHOST_VDPA_SUSPEND,
// the vhost-user GET_VRING_BASE sequence, the software device's pause).
type Suspender interface {
	Suspend() error
	Resume() error
}

// Logger is implemented by devices that can log their own writes to guest
// memory into a vhost-format dirty bitmap (vhost-net with SET_LOG_BASE,
// vhost-user with LOG_BASE/LOG_SHMFD, the software device). The bitmap is
// indexed by guest address. Passing nil stops logging. Logging is only in
// effect while the virtio.FLogAll feature is negotiated on devices that
// require it (vhost).
type Logger interface {
	SetLog(log *dirty.Bitmap) error
}

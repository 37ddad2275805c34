package kernel

import (
	"errors"
	"fmt"

	"github.com/vdpakit/vdpakit/internal/vhostsys"
	"github.com/vdpakit/vdpakit/vdpa"
)

// OpError is the error of one vhost operation: Op names the ioctl as
// linux/vhost.h does, Err wraps the errno (errors.Is(err, unix.EBUSY)).
type OpError = vhostsys.OpError

var (
	// ErrClosed is returned by every method after Close.
	ErrClosed = vdpa.ErrClosed
	// ErrNotSupported is returned for an operation whose backend feature
	// the kernel did not offer (or Options excluded). It matches
	// errors.ErrUnsupported.
	ErrNotSupported = fmt.Errorf("vdpa/kernel: not supported by this device: %w", errors.ErrUnsupported)
	// ErrQueueIndex is returned for a queue index outside [0, NumQueues).
	ErrQueueIndex = errors.New("vdpa/kernel: queue index out of range")
	// ErrConfigRange is returned for a config access outside the device's
	// configuration space.
	ErrConfigRange = errors.New("vdpa/kernel: config access outside the configuration space")
	// ErrMemoryNotShared is returned by SetMemory for a region that is not
	// backed by a file descriptor (use vring.NewMemfdRegion).
	ErrMemoryNotShared = errors.New("vdpa/kernel: guest memory region is not shared and file-backed")
	// ErrIOVARange is returned for a mapping outside the device's IOVA range.
	ErrIOVARange = errors.New("vdpa/kernel: mapping outside the device's IOVA range")
	// ErrFeatures is returned by SetFeatures for features the device does
	// not offer, and by SetStatus when the device clears FEATURES_OK.
	ErrFeatures = errors.New("vdpa/kernel: features not accepted by the device")
	// ErrQueueLayout is returned by SetQueueAddr for ring areas that are
	// misaligned or not in the memory given to SetMemory, and by
	// SetQueueNum for a size that is not a power of two or is above the
	// device's maximum (that error also matches vdpa.ErrBadQueue, as
	// vdpa.Local's does).
	ErrQueueLayout = errors.New("vdpa/kernel: invalid queue layout")
	// ErrGroupIndex is returned by SetGroupASID for a virtqueue group
	// outside [0, NumGroups).
	ErrGroupIndex = errors.New("vdpa/kernel: virtqueue group index out of range")
	// ErrInFlight is returned by SetQueueBase for a state with buffers in
	// flight (NextUsed != NextAvail): vhost-vdpa restores only the avail
	// index and restarts the used index from it, so those buffers would
	// never complete.
	ErrInFlight = errors.New("vdpa/kernel: queue state has buffers in flight; vhost-vdpa cannot restore them")
	// ErrNoIOTLBv2 is returned by Open when the kernel lacks
	// VHOST_BACKEND_F_IOTLB_MSG_V2.
	ErrNoIOTLBv2 = errors.New("vdpa/kernel: kernel does not offer VHOST_BACKEND_F_IOTLB_MSG_V2")
)

package vring

import "github.com/vdpakit/vdpakit/virtio"

// ValidQueueSizeFor reports whether size is a valid queue size for a queue
// with features f: a power of two for a split ring (ValidQueueSize), any
// size from 1 to MaxPackedQueueSize for a packed one
// (ValidPackedQueueSize, virtio 1.2 §2.8).
func ValidQueueSizeFor(size uint16, f virtio.Features) bool {
	if f.Has(virtio.FRingPacked) {
		return ValidPackedQueueSize(size)
	}
	return ValidQueueSize(size)
}

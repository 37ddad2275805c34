package hostnet

import "github.com/vdpakit/vdpakit/vdpa/softnet"

// ReceiveOne reads and delivers one frame from queue 0 (for tests that
// count allocations without the reader goroutine).
func (t *Tap) ReceiveOne(dev *softnet.Device) error { return t.queues[0].receiveOne(dev) }

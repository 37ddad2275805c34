package hostnet

import "github.com/vdpakit/vdpakit/vdpa/softnet"

// ReceiveOne reads and delivers one frame from queue 0 (for tests that
// count allocations without the reader goroutine).
func (t *Tap) ReceiveOne(dev *softnet.Device) error { return t.queues[0].receiveOne(dev) }

// ReceiveBlock waits for the ring's next block, delivers its frames and
// gives it back (the reader goroutine's loop body, for allocation tests).
func (p *Packet) ReceiveBlock(dev *softnet.Device) error {
	if err := p.rc.Read(p.readFn); err != nil {
		return err
	}
	p.deliverBlock(dev, p.next)
	releaseBlock(p.ring, p.next)
	p.next = (p.next + 1) % ringBlocks
	return nil
}

// ReadersDone is closed when every reader goroutine of the back-end has
// returned.
func (a *attachment) ReadersDone() <-chan struct{} {
	done := make(chan struct{})
	go func() { a.wg.Wait(); close(done) }()
	return done
}

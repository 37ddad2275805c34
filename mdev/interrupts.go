package mdev

import "context"

// RaiseISR sets bits (ISRQueue, ISRConfig) in the ISR status register. A
// VMM delivering the line interrupt (Options.INTx) calls it before asserting
// the line, so the guest's handler, which reads and thereby clears the ISR
// (§4.1.4.5), sees why it was interrupted.
func (d *Device) RaiseISR(bits uint8) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.isr |= bits & (ISRQueue | ISRConfig)
}

// VectorsChanged tells the device that Options.Vector (or Options.INTx)
// now returns different eventfds, for example because the VMM re-registered
// its MSI-X irqfds. While the data path is live every enabled queue's
// interrupt is re-wired to the current eventfd.
func (d *Device) VectorsChanged() error {
	return d.VectorsChangedContext(context.Background())
}

// VectorsChangedContext is VectorsChanged with ctx bounding the wait for a
// back-end operation in progress.
func (d *Device) VectorsChangedContext(ctx context.Context) error {
	if err := d.begin(ctx); err != nil {
		return err
	}
	defer d.end()
	if !d.live || d.closed {
		return nil
	}
	return d.rewireAll()
}

// rewireAll points every enabled queue's interrupt at its current eventfd
// (queueCallFD); a backing device that refuses sets NEEDS_RESET. Caller
// holds d.ops and d.mu, with the data path live.
func (d *Device) rewireAll() error {
	for i := range d.queues {
		if !d.queues[i].enabled {
			continue
		}
		if err := d.rewireCall(i); err != nil {
			d.needsReset(err)
			return err
		}
	}
	return nil
}

// ISRPending returns the ISR status bits without clearing them (a guest read
// clears them). A VMM emulating a level-triggered line keeps the line
// asserted, or re-asserts it after an unmask, while this is non-zero.
func (d *Device) ISRPending() uint8 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.isr
}

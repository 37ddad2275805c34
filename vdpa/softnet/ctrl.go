package softnet

import (
	"errors"
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
)

// ErrCtrlNotNegotiated: a control command whose feature the driver did not
// negotiate (answered VIRTIO_NET_ERR).
var ErrCtrlNotNegotiated = errors.New("softnet: control command of a feature not negotiated")

// ctrlBatch processes up to batchSize control commands.
func (d *Device) ctrlBatch(q *queue) (int, error) {
	batch := d.batchSize(q)
	c := &q.workerChains(1)[0]
	n := 0
	var err error
	for n < batch {
		var ok bool
		ok, err = q.dq.Pop(c)
		if err != nil || !ok {
			break
		}
		written := uint32(0)
		ack := virtio.NetCtrlErr
		if c.ReadableLen <= gatherLen {
			buf := q.gatherBuf(int(c.ReadableLen))
			cmd, perr := virtio.ParseNetCtrl(buf[:c.Gather(buf)])
			if perr == nil && d.applyCtrl(cmd) == nil {
				ack = virtio.NetCtrlOK
			}
		}
		// The ack is the one byte of the device-writable part.
		if c.WritableLen >= 1 {
			scatterAt(c, 0, []byte{ack})
			written = 1
		}
		if ack == virtio.NetCtrlOK {
			d.ctrlOK.Add(1)
		} else {
			d.ctrlEr.Add(1)
		}
		if err = q.dq.PushChain(c, written); err != nil {
			break
		}
		n++
	}
	if n > 0 {
		q.signal()
	}
	return n, err
}

// ApplyCtrl executes a control command as if it came over the control
// queue and returns nil for VIRTIO_NET_OK. Servers without a control queue
// (VDUSE) can use it to apply the same settings out of band.
func (d *Device) ApplyCtrl(cmd virtio.NetCtrl) error { return d.applyCtrl(cmd) }

func (d *Device) applyCtrl(cmd virtio.NetCtrl) error {
	f := d.NegotiatedFeatures()
	need := func(feat virtio.Feature) error {
		if !f.Has(feat) {
			return fmt.Errorf("%w: class %d command %d needs %s", ErrCtrlNotNegotiated,
				cmd.Class, cmd.Command, feat.Name(virtio.DeviceNet))
		}
		return nil
	}
	switch cmd.Class {
	case virtio.NetCtrlRx:
		if err := need(virtio.NetFCtrlRx); err != nil {
			return err
		}
		var bit uint32
		switch cmd.Command {
		case virtio.NetCtrlRxPromisc:
			bit = rxPromisc
		case virtio.NetCtrlRxAllMulti:
			bit = rxAllMulti
		default:
			// ALLUNI, NOMULTI, NOUNI, NOBCAST belong to CTRL_RX_EXTRA,
			// which is not offered.
			return fmt.Errorf("%w: RX command %d needs CTRL_RX_EXTRA", ErrCtrlNotNegotiated, cmd.Command)
		}
		on, err := cmd.OnOff()
		if err != nil {
			return err
		}
		for {
			old := d.rxMode.Load()
			nw := old &^ bit
			if on {
				nw |= bit
			}
			if d.rxMode.CompareAndSwap(old, nw) {
				return nil
			}
		}
	case virtio.NetCtrlMAC:
		switch cmd.Command {
		case virtio.NetCtrlMACAddrSet:
			if err := need(virtio.NetFCtrlMACAddr); err != nil {
				return err
			}
			m, err := cmd.MACAddr()
			if err != nil {
				return err
			}
			d.mac.Store(macToU64(m[:]))
			return nil
		case virtio.NetCtrlMACTableSet:
			if err := need(virtio.NetFCtrlRx); err != nil {
				return err
			}
			uni, multi, err := cmd.MACTable(nil, nil)
			if err != nil {
				return err
			}
			d.tables.Store(newMACTables(uni, multi))
			return nil
		}
	case virtio.NetCtrlMQ:
		if cmd.Command != virtio.NetCtrlMQVQPairsSet {
			break
		}
		if err := need(virtio.NetFMQ); err != nil {
			return err
		}
		n, err := cmd.VQPairs(d.opts.MaxQueuePairs)
		if err != nil {
			return err
		}
		d.setActivePairs(uint32(n))
		return nil
	}
	return fmt.Errorf("%w: class %d command %d", ErrCtrlNotNegotiated, cmd.Class, cmd.Command)
}

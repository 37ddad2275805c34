package vfiousertest

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/vdpakit/vdpakit/mdev/vfiouser"
)

// Feature sends DEVICE_FEATURE and returns the reply's data.
func (c *Client) Feature(ctx context.Context, flags uint32, data []byte, replyRoom int) ([]byte, error) {
	b := make([]byte, 8, 8+len(data))
	binary.LittleEndian.PutUint32(b, uint32(8+max(len(data), replyRoom)))
	binary.LittleEndian.PutUint32(b[4:], flags)
	p, err := c.Call(ctx, vfiouser.CmdDeviceFeature, append(b, data...), nil)
	if err != nil {
		return nil, err
	}
	if len(p) < 8 {
		return nil, fmt.Errorf("vfiousertest: DEVICE_FEATURE reply of %d bytes", len(p))
	}
	return p[8:], nil
}

// SetMigState moves the device's migration state machine (VFIO state
// numbers, as mdev.MigState).
func (c *Client) SetMigState(ctx context.Context, state uint32) error {
	d := make([]byte, 8)
	binary.LittleEndian.PutUint32(d, state)
	binary.LittleEndian.PutUint32(d[4:], ^uint32(0))
	_, err := c.Feature(ctx, vfiouser.FeatureSet|vfiouser.FeatureMigDeviceState, d, 8)
	return err
}

// MigState reads the migration state.
func (c *Client) MigState(ctx context.Context) (uint32, error) {
	d, err := c.Feature(ctx, vfiouser.FeatureGet|vfiouser.FeatureMigDeviceState, nil, 8)
	if err != nil {
		return 0, err
	}
	if len(d) < 4 {
		return 0, fmt.Errorf("vfiousertest: short MIG_DEVICE_STATE")
	}
	return binary.LittleEndian.Uint32(d), nil
}

// ReadMigData reads the whole device state stream in chunks of chunk bytes.
func (c *Client) ReadMigData(ctx context.Context, chunk uint32) ([]byte, error) {
	var out []byte
	for {
		req := make([]byte, 8)
		binary.LittleEndian.PutUint32(req, 8+chunk)
		binary.LittleEndian.PutUint32(req[4:], chunk)
		p, err := c.Call(ctx, vfiouser.CmdMigDataRead, req, nil)
		if err != nil {
			return nil, err
		}
		if len(p) < 8 {
			return nil, fmt.Errorf("vfiousertest: MIG_DATA_READ reply of %d bytes", len(p))
		}
		n := binary.LittleEndian.Uint32(p[4:])
		if int(n) != len(p)-8 || n > chunk {
			return nil, fmt.Errorf("vfiousertest: MIG_DATA_READ size %d with %d bytes", n, len(p)-8)
		}
		out = append(out, p[8:]...)
		if n < chunk {
			return out, nil
		}
	}
}

// WriteMigData writes the device state stream in chunks of chunk bytes.
func (c *Client) WriteMigData(ctx context.Context, data []byte, chunk int) error {
	for len(data) > 0 {
		n := min(chunk, len(data))
		req := make([]byte, 8, 8+n)
		binary.LittleEndian.PutUint32(req, 8)
		binary.LittleEndian.PutUint32(req[4:], uint32(n))
		if _, err := c.Call(ctx, vfiouser.CmdMigDataWrite, append(req, data[:n]...), nil); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// StartDMALogging starts dirty logging of [iova, iova+length).
func (c *Client) StartDMALogging(ctx context.Context, pageSize, iova, length uint64) error {
	d := make([]byte, 32)
	binary.LittleEndian.PutUint64(d, pageSize)
	binary.LittleEndian.PutUint32(d[8:], 1)
	binary.LittleEndian.PutUint64(d[16:], iova)
	binary.LittleEndian.PutUint64(d[24:], length)
	_, err := c.Feature(ctx, vfiouser.FeatureSet|vfiouser.FeatureDMALoggingStart, d, 0)
	return err
}

// StopDMALogging stops dirty logging.
func (c *Client) StopDMALogging(ctx context.Context) error {
	_, err := c.Feature(ctx, vfiouser.FeatureSet|vfiouser.FeatureDMALoggingStop, nil, 0)
	return err
}

// DMALoggingReport returns (and clears) the dirty bitmap of [iova,
// iova+length) at pageSize.
func (c *Client) DMALoggingReport(ctx context.Context, iova, length, pageSize uint64) ([]uint64, error) {
	d := make([]byte, 24)
	binary.LittleEndian.PutUint64(d, iova)
	binary.LittleEndian.PutUint64(d[8:], length)
	binary.LittleEndian.PutUint64(d[16:], pageSize)
	words := (length/pageSize + 63) / 64
	p, err := c.Feature(ctx, vfiouser.FeatureGet|vfiouser.FeatureDMALoggingRep, d, 24+int(words)*8)
	if err != nil {
		return nil, err
	}
	if uint64(len(p)) != 24+words*8 {
		return nil, fmt.Errorf("vfiousertest: report of %d bytes for %d words", len(p), words)
	}
	out := make([]uint64, words)
	for i := range out {
		out[i] = binary.LittleEndian.Uint64(p[24+8*i:])
	}
	return out, nil
}

// Migrate moves the driver to another client whose server serves the same
// kind of device: the source is stopped and its state read, the
// destination maps the same guest memory (shared memory: only the device
// state moves) and the driver's interrupt eventfds, loads the state and
// runs. The driver continues on dst.
func (d *Driver) Migrate(ctx context.Context, dst *Client) error {
	src := d.C
	if err := src.SetMigState(ctx, 3); err != nil { // STOP_COPY
		return fmt.Errorf("source STOP_COPY: %w", err)
	}
	state, err := src.ReadMigData(ctx, 64)
	if err != nil {
		return fmt.Errorf("source MIG_DATA_READ: %w", err)
	}
	if err := src.SetMigState(ctx, 1); err != nil { // STOP
		return fmt.Errorf("source STOP: %w", err)
	}
	if _, err := dst.Negotiate(ctx); err != nil {
		return err
	}
	if err := dst.DMAMap(ctx, 0, GuestMemSize, d.Region.Fd(), 0); err != nil {
		return err
	}
	fds := make([]int, len(d.irqs))
	for i, e := range d.irqs {
		fds[i] = e.Fd()
	}
	index := uint32(vfiouser.IRQMSIX)
	if d.intx {
		index = vfiouser.IRQIntx
	}
	if err := dst.SetIRQEventfds(ctx, index, 0, uint32(len(fds)), fds); err != nil {
		return err
	}
	if err := dst.SetMigState(ctx, 4); err != nil { // RESUMING
		return fmt.Errorf("destination RESUMING: %w", err)
	}
	if err := dst.WriteMigData(ctx, state, 50); err != nil {
		return fmt.Errorf("destination MIG_DATA_WRITE: %w", err)
	}
	if err := dst.SetMigState(ctx, 2); err != nil { // RUNNING
		return fmt.Errorf("destination RUNNING: %w", err)
	}
	d.C = dst
	return nil
}

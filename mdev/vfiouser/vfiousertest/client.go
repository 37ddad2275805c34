// Package vfiousertest is a vfio-user client test kit: it speaks the
// protocol the way QEMU's vfio-user-pci client does (VERSION, device and
// region info, DMA_MAP of memfd-backed guest memory, SET_IRQS with MSI-X or
// INTx eventfds, region reads and writes, posted writes), and it can send
// arbitrary malformed messages for hostile-input tests. Driver, on top of
// Client, brings a virtio-pci device up through the configuration space the
// way Linux's virtio_pci driver does and runs virtio-net traffic.
package vfiousertest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/mdev/vfiouser"
)

// Client is a vfio-user client on one connection. Calls are serialized.
type Client struct {
	mu   sync.Mutex
	conn *net.UnixConn
	id   uint16
	// Timeout bounds each call (default 10 s).
	Timeout time.Duration
}

// Dial connects to a server's socket.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	return NewClient(c.(*net.UnixConn)), nil
}

// NewClient wraps a connected socket.
func NewClient(conn *net.UnixConn) *Client { return &Client{conn: conn, Timeout: 10 * time.Second} }

// Conn returns the connection.
func (c *Client) Conn() *net.UnixConn { return c.conn }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// SendRaw writes b with fds as one message.
func (c *Client) SendRaw(b []byte, fds []int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := c.conn.WriteMsgUnix(b, oob, nil)
	return err
}

// Message builds a command message.
func Message(id uint16, cmd vfiouser.Command, flags uint32, payload []byte) []byte {
	b := make([]byte, vfiouser.HeaderSize+len(payload))
	vfiouser.Header{ID: id, Command: cmd, Size: uint32(len(b)), Flags: flags}.Put(b)
	copy(b[vfiouser.HeaderSize:], payload)
	return b
}

// ReadReply reads one message.
func (c *Client) ReadReply(ctx context.Context) (vfiouser.Header, []byte, error) {
	dl := time.Now().Add(c.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(dl) {
		dl = d
	}
	_ = c.conn.SetReadDeadline(dl)
	defer c.conn.SetReadDeadline(time.Time{})
	var hb [vfiouser.HeaderSize]byte
	if _, err := io.ReadFull(c.conn, hb[:]); err != nil {
		return vfiouser.Header{}, nil, err
	}
	h, err := vfiouser.ParseHeader(hb[:])
	if err != nil {
		return h, nil, err
	}
	p := make([]byte, h.Size-vfiouser.HeaderSize)
	if _, err := io.ReadFull(c.conn, p); err != nil {
		return h, nil, err
	}
	return h, p, nil
}

// Call sends a command and waits for its reply. An error reply is returned
// as a *vfiouser.Error wrapping vfiouser.ErrReply with the server's errno.
func (c *Client) Call(ctx context.Context, cmd vfiouser.Command, payload []byte, fds []int) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.id++
	id := c.id
	if err := c.SendRaw(Message(id, cmd, 0, payload), fds); err != nil {
		return nil, err
	}
	h, p, err := c.ReadReply(ctx)
	if err != nil {
		return nil, err
	}
	if !h.IsReply() || h.ID != id || h.Command != cmd {
		return nil, fmt.Errorf("vfiousertest: reply %+v to %v id %d", h, cmd, id)
	}
	if h.Flags&vfiouser.FlagError != 0 {
		return nil, &vfiouser.Error{Cmd: cmd, Errno: unix.Errno(h.Error), Err: vfiouser.ErrReply}
	}
	return p, nil
}

// Post sends a command with No_reply set.
func (c *Client) Post(cmd vfiouser.Command, payload []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.id++
	return c.SendRaw(Message(c.id, cmd, vfiouser.FlagNoReply, payload), nil)
}

// Negotiate sends VERSION 0.0 with QEMU's capabilities.
func (c *Client) Negotiate(ctx context.Context) (vfiouser.Version, error) {
	fds, xfer := uint64(16), uint64(1<<20)
	v := vfiouser.Version{Caps: vfiouser.Capabilities{MaxMsgFds: &fds, MaxDataXferSize: &xfer}}
	p, err := c.Call(ctx, vfiouser.CmdVersion, v.Marshal(), nil)
	if err != nil {
		return vfiouser.Version{}, err
	}
	return vfiouser.ParseVersion(p)
}

// DeviceInfo queries DEVICE_GET_INFO.
func (c *Client) DeviceInfo(ctx context.Context) (vfiouser.DeviceInfo, error) {
	p, err := c.Call(ctx, vfiouser.CmdDeviceGetInfo, vfiouser.DeviceInfo{Argsz: vfiouser.DeviceInfoSize}.Marshal(), nil)
	if err != nil {
		return vfiouser.DeviceInfo{}, err
	}
	return vfiouser.ParseDeviceInfo(p)
}

// RegionInfo queries DEVICE_GET_REGION_INFO with room for capabilities.
func (c *Client) RegionInfo(ctx context.Context, index uint32) (vfiouser.RegionInfo, error) {
	req := make([]byte, vfiouser.RegionInfoSize)
	putU32(req, 256)
	putU32(req[8:], index)
	p, err := c.Call(ctx, vfiouser.CmdDeviceGetRegionInfo, req, nil)
	if err != nil {
		return vfiouser.RegionInfo{}, err
	}
	return vfiouser.ParseRegionInfo(p)
}

// IRQInfo queries DEVICE_GET_IRQ_INFO.
func (c *Client) IRQInfo(ctx context.Context, index uint32) (vfiouser.IRQInfo, error) {
	p, err := c.Call(ctx, vfiouser.CmdDeviceGetIRQInfo, vfiouser.IRQInfo{Argsz: vfiouser.IRQInfoSz, Index: index}.Marshal(), nil)
	if err != nil {
		return vfiouser.IRQInfo{}, err
	}
	return vfiouser.ParseIRQInfo(p)
}

// SetIRQEventfds registers eventfds as triggers for index from start
// (none: de-assign count sub-indices).
func (c *Client) SetIRQEventfds(ctx context.Context, index, start, count uint32, fds []int) error {
	s := vfiouser.IRQSet{Flags: vfiouser.IRQSetDataEventfd | vfiouser.IRQSetActionTrigger, Index: index, Start: start, Count: count}
	_, err := c.Call(ctx, vfiouser.CmdDeviceSetIRQs, s.Marshal(), fds)
	return err
}

// SetIRQs sends SET_IRQS with DATA_NONE and the given action.
func (c *Client) SetIRQs(ctx context.Context, index, action, start, count uint32) error {
	s := vfiouser.IRQSet{Flags: vfiouser.IRQSetDataNone | action, Index: index, Start: start, Count: count}
	_, err := c.Call(ctx, vfiouser.CmdDeviceSetIRQs, s.Marshal(), nil)
	return err
}

// DMAMap maps [addr, addr+size) of guest memory, backed by fd at offset
// (fd < 0: no descriptor).
func (c *Client) DMAMap(ctx context.Context, addr, size uint64, fd int, offset uint64) error {
	m := vfiouser.DMAMap{Argsz: vfiouser.DMAMapSize, Flags: vfiouser.DMAReadable | vfiouser.DMAWritable, Offset: offset, Address: addr, Size: size}
	var fds []int
	if fd >= 0 {
		fds = []int{fd}
	}
	_, err := c.Call(ctx, vfiouser.CmdDMAMap, m.Marshal(), fds)
	return err
}

// DMAUnmap unmaps a window.
func (c *Client) DMAUnmap(ctx context.Context, addr, size uint64) error {
	_, err := c.Call(ctx, vfiouser.CmdDMAUnmap, vfiouser.DMAUnmap{Argsz: vfiouser.DMAUnmapSize, Address: addr, Size: size}.Marshal(), nil)
	return err
}

// DMAUnmapAll sends DMA_UNMAP with VFIO_DMA_UNMAP_FLAG_ALL: every window
// goes.
func (c *Client) DMAUnmapAll(ctx context.Context) error {
	_, err := c.Call(ctx, vfiouser.CmdDMAUnmap, vfiouser.DMAUnmap{Argsz: vfiouser.DMAUnmapSize, Flags: vfiouser.UnmapAll}.Marshal(), nil)
	return err
}

// Read reads count bytes of a region.
func (c *Client) Read(ctx context.Context, region uint32, off uint64, count int) ([]byte, error) {
	req := make([]byte, vfiouser.RegionAccessSize)
	vfiouser.RegionAccess{Offset: off, Region: region, Count: uint32(count)}.Put(req)
	p, err := c.Call(ctx, vfiouser.CmdRegionRead, req, nil)
	if err != nil {
		return nil, err
	}
	a, _, err := vfiouser.ParseRegionAccess(vfiouser.CmdRegionRead, p[:vfiouser.RegionAccessSize], false)
	if err != nil {
		return nil, err
	}
	if int(a.Count) != count || len(p) != vfiouser.RegionAccessSize+count {
		return nil, fmt.Errorf("vfiousertest: read reply of %d bytes for %d", len(p), count)
	}
	return p[vfiouser.RegionAccessSize:], nil
}

// ReadN reads a little-endian value of size bytes.
func (c *Client) ReadN(ctx context.Context, region uint32, off uint64, size int) (uint64, error) {
	b, err := c.Read(ctx, region, off, size)
	if err != nil {
		return 0, err
	}
	var v uint64
	for i := size - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v, nil
}

func regionWrite(region uint32, off uint64, data []byte) []byte {
	req := make([]byte, vfiouser.RegionAccessSize+len(data))
	vfiouser.RegionAccess{Offset: off, Region: region, Count: uint32(len(data))}.Put(req)
	copy(req[vfiouser.RegionAccessSize:], data)
	return req
}

func le(v uint64, size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
	return b
}

// Write writes data to a region and waits for the reply.
func (c *Client) Write(ctx context.Context, region uint32, off uint64, data []byte) error {
	_, err := c.Call(ctx, vfiouser.CmdRegionWrite, regionWrite(region, off, data), nil)
	return err
}

// WriteN writes a little-endian value of size bytes.
func (c *Client) WriteN(ctx context.Context, region uint32, off uint64, size int, v uint64) error {
	return c.Write(ctx, region, off, le(v, size))
}

// PostWriteN writes with No_reply (a posted write, as QEMU sends doorbells).
func (c *Client) PostWriteN(region uint32, off uint64, size int, v uint64) error {
	return c.Post(vfiouser.CmdRegionWrite, regionWrite(region, off, le(v, size)))
}

// Reset sends DEVICE_RESET.
func (c *Client) Reset(ctx context.Context) error {
	_, err := c.Call(ctx, vfiouser.CmdDeviceReset, nil, nil)
	return err
}

// IsErrno reports whether err is an error reply with errno e.
func IsErrno(err error, e unix.Errno) bool {
	var pe *vfiouser.Error
	return errors.As(err, &pe) && errors.Is(err, vfiouser.ErrReply) && pe.Errno == e
}

func putU32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

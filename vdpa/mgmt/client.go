package mgmt

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"

	"github.com/vdpakit/vdpakit/virtio"
)

// Client speaks the vdpa generic netlink family. It is safe for concurrent
// use; commands are serialized on one socket.
type Client struct {
	mu     sync.Mutex
	c      *genetlink.Conn
	family genetlink.Family
}

// Options configures Dial. A nil *Options means defaults.
type Options struct {
	// NetNS is a network namespace file descriptor to open the socket
	// in; 0 means the caller's namespace.
	NetNS int
}

// Dial opens a generic netlink socket and resolves the vdpa family. It
// returns ErrNotAvailable when the kernel has no vdpa family.
func Dial(opts *Options) (*Client, error) {
	var nc netlink.Config
	if opts != nil {
		nc.NetNS = opts.NetNS
	}
	c, err := genetlink.Dial(&nc)
	if err != nil {
		return nil, &OpError{Op: "dial generic netlink", Err: err}
	}
	cl, err := New(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	return cl, nil
}

// New wraps an existing generic netlink connection (a genltest fake in
// tests) and resolves the vdpa family on it. The Client owns c.
func New(c *genetlink.Conn) (*Client, error) {
	f, err := c.GetFamily(genlName)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, ErrNotAvailable
		}
		return nil, &OpError{Op: "resolve generic netlink family " + genlName, Err: err}
	}
	// The kernel's extended ack carries messages such as "feature
	// negotiation not complete"; fakes do not support the option.
	_ = c.SetOption(netlink.ExtendedAcknowledge, true)
	return &Client{c: c, family: f}, nil
}

// Close closes the socket.
func (c *Client) Close() error { return c.c.Close() }

// exec sends one command and returns the replies. ctx bounds the exchange:
// its deadline becomes the socket's, and cancelling it interrupts a
// pending receive.
func (c *Client) exec(ctx context.Context, op string, cmd uint8, attrs func(*netlink.AttributeEncoder), flags netlink.HeaderFlags) ([]genetlink.Message, error) {
	if err := ctx.Err(); err != nil {
		return nil, &OpError{Op: op, Err: err}
	}
	var data []byte
	if attrs != nil {
		ae := netlink.NewAttributeEncoder()
		attrs(ae)
		var err error
		if data, err = ae.Encode(); err != nil {
			return nil, &OpError{Op: op, Err: err}
		}
	}
	msg := genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: c.family.Version},
		Data:   data,
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if ctx.Done() != nil {
		if dl, ok := ctx.Deadline(); ok {
			_ = c.c.SetDeadline(dl)
		}
		stop := context.AfterFunc(ctx, func() { _ = c.c.SetDeadline(time.Unix(1, 0)) })
		defer func() {
			stop()
			_ = c.c.SetDeadline(time.Time{})
		}()
	}
	msgs, err := c.c.Execute(msg, c.family.ID, flags)
	if err != nil {
		if cerr := ctx.Err(); cerr != nil {
			return nil, &OpError{Op: op, Err: cerr}
		}
		return nil, &OpError{Op: op, Err: err}
	}
	return msgs, nil
}

const (
	flagsDump = netlink.Request | netlink.Dump
	flagsGet  = netlink.Request
	flagsDo   = netlink.Request | netlink.Acknowledge
)

func putMgmtHandle(ae *netlink.AttributeEncoder, h string) {
	bus, name, ok := strings.Cut(h, "/")
	if !ok {
		bus, name = "", h
	}
	if bus != "" {
		ae.String(attrMgmtdevBusName, bus)
	}
	ae.String(attrMgmtdevDevName, name)
}

// ManagementDevices lists every management device.
func (c *Client) ManagementDevices(ctx context.Context) ([]ManagementDevice, error) {
	const op = "VDPA_CMD_MGMTDEV_GET"
	msgs, err := c.exec(ctx, op, cmdMgmtdevGet, nil, flagsDump)
	if err != nil {
		return nil, err
	}
	out := make([]ManagementDevice, 0, len(msgs))
	for _, m := range msgs {
		d, err := decodeMgmtdev(m.Data)
		if err != nil {
			return nil, &OpError{Op: op, Err: err}
		}
		out = append(out, d)
	}
	return out, nil
}

// ManagementDevice looks up one management device by handle ("bus/name" or
// "name").
func (c *Client) ManagementDevice(ctx context.Context, handle string) (ManagementDevice, error) {
	const op = "VDPA_CMD_MGMTDEV_GET"
	msgs, err := c.exec(ctx, op, cmdMgmtdevGet, func(ae *netlink.AttributeEncoder) { putMgmtHandle(ae, handle) }, flagsGet)
	if err != nil {
		return ManagementDevice{}, err
	}
	if len(msgs) != 1 {
		return ManagementDevice{}, &OpError{Op: op, Err: fmt.Errorf("%w: %d replies to a single-device request", ErrMalformed, len(msgs))}
	}
	d, err := decodeMgmtdev(msgs[0].Data)
	if err != nil {
		return ManagementDevice{}, &OpError{Op: op, Err: err}
	}
	return d, nil
}

// Devices lists every vDPA device.
func (c *Client) Devices(ctx context.Context) ([]Device, error) {
	const op = "VDPA_CMD_DEV_GET"
	msgs, err := c.exec(ctx, op, cmdDevGet, nil, flagsDump)
	if err != nil {
		return nil, err
	}
	out := make([]Device, 0, len(msgs))
	for _, m := range msgs {
		d, err := decodeDevice(m.Data)
		if err != nil {
			return nil, &OpError{Op: op, Err: err}
		}
		out = append(out, d)
	}
	return out, nil
}

// Device looks up one vDPA device by name. A missing device is an error
// matching ErrNotFound.
func (c *Client) Device(ctx context.Context, name string) (Device, error) {
	const op = "VDPA_CMD_DEV_GET"
	msgs, err := c.exec(ctx, op, cmdDevGet, func(ae *netlink.AttributeEncoder) { ae.String(attrDevName, name) }, flagsGet)
	if err != nil {
		return Device{}, notFound(err, name)
	}
	if len(msgs) != 1 {
		return Device{}, &OpError{Op: op, Err: fmt.Errorf("%w: %d replies to a single-device request", ErrMalformed, len(msgs))}
	}
	d, err := decodeDevice(msgs[0].Data)
	if err != nil {
		return Device{}, &OpError{Op: op, Err: err}
	}
	return d, nil
}

// notFound adds ErrNotFound to an ENODEV answer.
func notFound(err error, name string) error {
	var oe *OpError
	if errors.As(err, &oe) && isNoDev(oe.Err) {
		return &OpError{Op: oe.Op, Err: fmt.Errorf("%w: %q: %w", ErrNotFound, name, oe.Err)}
	}
	return err
}

// AddDevice creates a vDPA device (VDPA_CMD_DEV_NEW).
func (c *Client) AddDevice(ctx context.Context, spec DeviceSpec) error {
	const op = "VDPA_CMD_DEV_NEW"
	if err := spec.validate(); err != nil {
		return &OpError{Op: op, Err: err}
	}
	_, err := c.exec(ctx, op, cmdDevNew, func(ae *netlink.AttributeEncoder) {
		putMgmtHandle(ae, spec.MgmtDev)
		ae.String(attrDevName, spec.Name)
		if spec.MAC != nil {
			ae.Bytes(attrDevNetCfgMACAddr, []byte(spec.MAC))
		}
		if spec.MTU != 0 {
			ae.Uint16(attrDevNetCfgMTU, spec.MTU)
		}
		if spec.MaxVQPairs != 0 {
			ae.Uint16(attrDevNetCfgMaxVQP, spec.MaxVQPairs)
		}
		if spec.Features != nil {
			ae.Uint64(attrDevFeatures, uint64(*spec.Features))
		}
	}, flagsDo)
	return err
}

// DeleteDevice removes a vDPA device (VDPA_CMD_DEV_DEL). A missing device
// is an error matching ErrNotFound.
func (c *Client) DeleteDevice(ctx context.Context, name string) error {
	const op = "VDPA_CMD_DEV_DEL"
	_, err := c.exec(ctx, op, cmdDevDel, func(ae *netlink.AttributeEncoder) { ae.String(attrDevName, name) }, flagsDo)
	return notFound(err, name)
}

// SetMAC changes a net device's MAC (VDPA_CMD_DEV_ATTR_SET, Linux 6.7+).
func (c *Client) SetMAC(ctx context.Context, name string, mac net.HardwareAddr) error {
	const op = "VDPA_CMD_DEV_ATTR_SET"
	if len(mac) != 6 {
		return &OpError{Op: op, Err: fmt.Errorf("%w: MAC %v is not 6 bytes", ErrInvalidSpec, mac)}
	}
	_, err := c.exec(ctx, op, cmdDevAttrSet, func(ae *netlink.AttributeEncoder) {
		ae.String(attrDevName, name)
		ae.Bytes(attrDevNetCfgMACAddr, []byte(mac))
	}, flagsDo)
	return notFound(err, name)
}

// DeviceConfigs returns the configuration of every vDPA device.
func (c *Client) DeviceConfigs(ctx context.Context) ([]DeviceConfig, error) {
	const op = "VDPA_CMD_DEV_CONFIG_GET"
	msgs, err := c.exec(ctx, op, cmdDevConfigGet, nil, flagsDump)
	if err != nil {
		return nil, err
	}
	out := make([]DeviceConfig, 0, len(msgs))
	for _, m := range msgs {
		cfg, err := decodeConfig(m.Data)
		if err != nil {
			return nil, &OpError{Op: op, Err: err}
		}
		out = append(out, cfg)
	}
	return out, nil
}

// DeviceConfig returns one device's configuration.
func (c *Client) DeviceConfig(ctx context.Context, name string) (DeviceConfig, error) {
	const op = "VDPA_CMD_DEV_CONFIG_GET"
	msgs, err := c.exec(ctx, op, cmdDevConfigGet, func(ae *netlink.AttributeEncoder) { ae.String(attrDevName, name) }, flagsGet)
	if err != nil {
		return DeviceConfig{}, notFound(err, name)
	}
	if len(msgs) != 1 {
		return DeviceConfig{}, &OpError{Op: op, Err: fmt.Errorf("%w: %d replies to a single-device request", ErrMalformed, len(msgs))}
	}
	cfg, err := decodeConfig(msgs[0].Data)
	if err != nil {
		return DeviceConfig{}, &OpError{Op: op, Err: err}
	}
	return cfg, nil
}

// QueueStats returns queue q's vendor statistics. The kernel answers
// EAGAIN until the driver has set FEATURES_OK.
func (c *Client) QueueStats(ctx context.Context, name string, q uint32) (QueueStats, error) {
	const op = "VDPA_CMD_DEV_VSTATS_GET"
	msgs, err := c.exec(ctx, op, cmdDevVstatsGet, func(ae *netlink.AttributeEncoder) {
		ae.String(attrDevName, name)
		ae.Uint32(attrDevQueueIndex, q)
	}, flagsGet)
	if err != nil {
		return QueueStats{}, notFound(err, name)
	}
	if len(msgs) != 1 {
		return QueueStats{}, &OpError{Op: op, Err: fmt.Errorf("%w: %d replies to a single-queue request", ErrMalformed, len(msgs))}
	}
	st, err := decodeStats(msgs[0].Data)
	if err != nil {
		return QueueStats{}, &OpError{Op: op, Err: err}
	}
	return st, nil
}

// classes expands the supported-classes bitmask.
func classes(mask uint64) []virtio.DeviceID {
	var out []virtio.DeviceID
	for i := 1; i < 64; i++ {
		if mask&(1<<i) != 0 {
			out = append(out, virtio.DeviceID(i))
		}
	}
	return out
}

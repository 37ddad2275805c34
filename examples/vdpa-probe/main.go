// Command vdpa-probe lists the machine's vDPA management devices and vDPA
// devices, and for each device its features decoded by name, its
// configuration (MAC, MTU, link status, max queue pairs), its queue count
// and queue sizes.
//
// It reads the kernel's vdpa netlink interface (what iproute2's `vdpa` tool
// shows) and, for devices bound to vhost_vdpa and not in use, opens
// /dev/vhost-vdpa-N for what only the character device tells (queue sizes,
// backend features, IOVA range, groups and address spaces). Opening a
// vhost-vdpa node resets the device, so -no-open skips that step. On a
// machine without vDPA it says so and exits 0.
//
//	vdpa-probe [-no-open]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/vdpa/mgmt"
	"github.com/vdpakit/vdpakit/virtio"
)

func main() {
	noOpen := flag.Bool("no-open", false, "do not open /dev/vhost-vdpa-N nodes (opening resets an idle device)")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := probe(ctx, os.Stdout, !*noOpen); err != nil {
		fmt.Fprintln(os.Stderr, "vdpa-probe:", err)
		os.Exit(1)
	}
}

func probe(ctx context.Context, w io.Writer, open bool) error {
	c, err := mgmt.Dial(nil)
	if errors.Is(err, mgmt.ErrNotAvailable) {
		fmt.Fprintln(w, "No vDPA on this machine: the kernel has no vdpa netlink interface (the vdpa module is not loaded or not built).")
		return nil
	}
	if err != nil {
		return err
	}
	defer c.Close()

	ms, err := c.ManagementDevices(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "management devices: %d\n", len(ms))
	for _, m := range ms {
		fmt.Fprintf(w, "  %s: classes %s, max vqs %d\n", m.Handle(), classNames(m.Classes), m.MaxVQs)
		if m.SupportedFeatures != 0 {
			fmt.Fprintf(w, "    supported features %s\n", m.SupportedFeatures.Format(primaryClass(m.Classes)))
		}
	}

	devs, err := c.Devices(ctx)
	if err != nil {
		return err
	}
	if len(devs) == 0 {
		fmt.Fprintln(w, "vDPA devices: none (add one with e.g. `vdpa dev add name vdpa0 mgmtdev vdpasim_net`)")
		return nil
	}
	fmt.Fprintf(w, "vDPA devices: %d\n", len(devs))
	for _, d := range devs {
		fmt.Fprintf(w, "  %s: %s device on %s, vendor %#x, %d queues of up to %d entries\n",
			d.Name, d.DeviceID, d.MgmtHandle(), d.VendorID, d.MaxVQs, d.MaxVQSize)
		cfg, err := c.DeviceConfig(ctx, d.Name)
		if err != nil {
			fmt.Fprintf(w, "    config: %v\n", err)
		} else {
			printConfig(w, cfg)
		}
		if open {
			probeNode(w, d.Name)
		}
	}
	return nil
}

func printConfig(w io.Writer, cfg mgmt.DeviceConfig) {
	fmt.Fprintf(w, "    features %s\n", cfg.Features.Format(cfg.DeviceID))
	if cfg.HasNegotiated {
		fmt.Fprintf(w, "    negotiated %s\n", cfg.Negotiated.Format(cfg.DeviceID))
	}
	if cfg.DeviceID != virtio.DeviceNet {
		return
	}
	var parts []string
	if cfg.MAC != nil {
		parts = append(parts, "mac "+cfg.MAC.String())
	}
	if cfg.HasStatus {
		parts = append(parts, "link "+map[bool]string{true: "up", false: "down"}[cfg.LinkUp()])
	}
	if cfg.MTU != 0 {
		parts = append(parts, fmt.Sprintf("mtu %d", cfg.MTU))
	}
	if cfg.MaxVQPairs != 0 {
		parts = append(parts, fmt.Sprintf("max queue pairs %d", cfg.MaxVQPairs))
	}
	fmt.Fprintf(w, "    config: %s\n", strings.Join(parts, ", "))
}

// probeNode opens the device's vhost-vdpa node for what only it tells.
func probeNode(w io.Writer, name string) {
	path, err := kernel.DevicePath(name)
	if err != nil {
		fmt.Fprintf(w, "    vhost-vdpa: %v\n", err)
		return
	}
	dev, err := kernel.Open(path, nil)
	if errors.Is(err, unix.EBUSY) {
		fmt.Fprintf(w, "    %s: in use by another process\n", path)
		return
	}
	if err != nil {
		fmt.Fprintf(w, "    %s: %v\n", path, err)
		return
	}
	defer dev.Close()
	fmt.Fprintf(w, "    %s: backend features %v\n", path, dev.OfferedBackendFeatures())
	id, _ := dev.DeviceID()
	if f, err := dev.Features(); err == nil {
		fmt.Fprintf(w, "      device features %s\n", f.Format(id))
	}
	first, last := dev.IOVARange()
	fmt.Fprintf(w, "      iova range [%#x, %#x]\n", uint64(first), uint64(last))
	nq, err := dev.NumQueues()
	if err != nil {
		fmt.Fprintf(w, "      queues: %v\n", err)
		return
	}
	maxq, _ := dev.MaxQueueSize()
	var sizes []string
	for q := range nq {
		s := "?"
		if n, err := dev.QueueSize(q); err == nil {
			s = fmt.Sprint(n)
		} else if errors.Is(err, errors.ErrUnsupported) || errors.Is(err, unix.ENOTTY) {
			s = fmt.Sprint(maxq)
		}
		if g, err := dev.QueueGroup(q); err == nil {
			s += fmt.Sprintf(" (group %d)", g)
		}
		sizes = append(sizes, s)
	}
	fmt.Fprintf(w, "      %d queues, max size %d: %s\n", nq, maxq, strings.Join(sizes, ", "))
	ng, gerr := dev.NumGroups()
	nas, aerr := dev.NumAddressSpaces()
	if gerr == nil && aerr == nil {
		fmt.Fprintf(w, "      %d virtqueue groups, %d address spaces\n", ng, nas)
	}
	if n, err := dev.ConfigSize(); err == nil && n > 0 && id == virtio.DeviceNet {
		raw := make([]byte, n)
		if err := dev.ReadConfig(0, raw); err == nil {
			if cfg, err := virtio.DecodeNetConfig(raw); err == nil {
				fmt.Fprintf(w, "      config space: mac %s, status %#x, max queue pairs %d, mtu %d\n",
					net.HardwareAddr(cfg.MAC[:]), cfg.Status, cfg.MaxVirtqueuePairs, cfg.MTU)
			}
		}
	}
}

func classNames(ids []virtio.DeviceID) string {
	var s []string
	for _, id := range ids {
		s = append(s, id.String())
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ",")
}

func primaryClass(ids []virtio.DeviceID) virtio.DeviceID {
	if len(ids) == 1 {
		return ids[0]
	}
	return 0
}

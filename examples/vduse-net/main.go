// Command vduse-net runs a Go virtio-net device that the Linux kernel sees
// as a network interface, through VDUSE.
//
// It creates a VDUSE device served by vdpakit's software virtio-net device,
// adds it to the vDPA bus with iproute2's vdpa tool (unless -add=false),
// and prints counters every few seconds until interrupted. The device
// answers ARP and ICMP echo for -peer-ip, so after
//
//	# vdpa dev show                       (the device, bound to vhost_vdpa)
//	# echo vduse-net0 > /sys/bus/vdpa/drivers/vhost_vdpa/unbind
//	# echo vduse-net0 > /sys/bus/vdpa/drivers/virtio_vdpa/bind
//	# ip addr add 192.0.2.2/24 dev eth0 && ip link set eth0 up
//	# ping 192.0.2.1
//
// the pings are answered by this process. With -add=false, add the device
// yourself: vdpa dev add name vduse-net0 mgmtdev vduse.
//
// Needs root and the vduse module (modprobe vduse). When VDUSE is not
// available it says so and exits with status 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vduse"
	"github.com/vdpakit/vdpakit/virtio"
)

func main() {
	name := flag.String("name", "vduse-net0", "VDUSE and vDPA device name")
	macStr := flag.String("mac", "02:00:00:00:00:01", "MAC address of the interface")
	peerMAC := flag.String("peer-mac", "02:11:22:33:44:55", "MAC address of the answering peer")
	peerIP := flag.String("peer-ip", "192.0.2.1", "IPv4 address the device answers ARP and ping for")
	loop := flag.Bool("loopback", false, "loop transmitted frames back instead of answering ARP/ping")
	add := flag.Bool("add", true, "add the device with `vdpa dev add` (and delete it on exit)")
	every := flag.Duration("stats", 5*time.Second, "counter print interval")
	verbose := flag.Bool("v", false, "log every VDUSE request")
	flag.Parse()

	if err := vduse.Available(nil); err != nil {
		fmt.Printf("VDUSE is not available on this machine, nothing to do: %v\n", err)
		return
	}
	if err := run(*name, *macStr, *peerMAC, *peerIP, *loop, *add, *every, *verbose); err != nil {
		log.Fatal(err)
	}
}

func run(name, macStr, peerMACStr, peerIPStr string, loop, add bool, every time.Duration, verbose bool) error {
	mac, err := parseMAC(macStr)
	if err != nil {
		return err
	}
	var handler softnet.FrameHandler = softnet.Loopback
	var resp *softnet.Responder
	if !loop {
		pm, err := parseMAC(peerMACStr)
		if err != nil {
			return err
		}
		ip, err := netip.ParseAddr(peerIPStr)
		if err != nil {
			return err
		}
		if resp, err = softnet.NewResponder(pm, ip); err != nil {
			return err
		}
		handler = resp
	}
	var vd *vduse.Device
	dev, err := softnet.New(&softnet.Options{
		MAC: mac, AccessPlatform: true, NoCtrlVQ: true, Handler: handler, MaxQueueSize: 256,
		OnConfigChange: func() {
			if vd != nil {
				_ = vd.ConfigChanged()
			}
		},
	})
	if err != nil {
		return err
	}
	opts := &vduse.Options{Name: name}
	if verbose {
		opts.Logf = log.Printf
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	vd, err = vduse.CreateContext(ctx, dev, opts)
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- vd.Serve(ctx) }()
	fmt.Printf("VDUSE device %s created: virtio-net, MAC %s, features %s\n", name, net.HardwareAddr(mac[:]),
		dev.Features().Format(virtio.DeviceNet))
	if add {
		if out, err := exec.Command("vdpa", "dev", "add", "name", name, "mgmtdev", "vduse").CombinedOutput(); err != nil {
			stop()
			<-served
			vd.Close()
			return fmt.Errorf("vdpa dev add: %v: %s", err, out)
		}
		fmt.Printf("added to the vDPA bus; bind it to virtio_vdpa for a network interface\n")
	}

	tick := time.NewTicker(every)
	defer tick.Stop()
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-served:
			if err != nil && !errors.Is(err, context.Canceled) {
				log.Printf("serve: %v", err)
			}
			break loop
		case <-tick.C:
			s := dev.Stats()
			fmt.Printf("status %v: tx %d frames %d bytes, rx %d frames %d bytes, drops %v",
				vd.Status(), s.Tx().Frames, s.Tx().Bytes, s.Rx().Frames, s.Rx().Bytes, s.Drops)
			if resp != nil {
				r := resp.Stats()
				fmt.Printf(", arp replies %d, echo replies %d", r.ARPReplies, r.EchoReplies)
			}
			fmt.Println()
		}
	}
	stop()
	if add {
		if out, err := exec.Command("vdpa", "dev", "del", name).CombinedOutput(); err != nil {
			log.Printf("vdpa dev del: %v: %s", err, out)
		}
	}
	return vd.Close()
}

func parseMAC(s string) ([6]byte, error) {
	var m [6]byte
	hw, err := net.ParseMAC(s)
	if err != nil || len(hw) != 6 {
		return m, fmt.Errorf("bad MAC %q", s)
	}
	copy(m[:], hw)
	return m, nil
}

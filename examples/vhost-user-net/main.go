// Command vhost-user-net is a vhost-user network back-end built on vdpakit:
// DPDK's virtio-user (net_virtio_user) or QEMU (-netdev vhost-user)
// attaches to it. It prints the negotiated features and traffic counters
// periodically and exits on SIGINT/SIGTERM or after -duration.
//
//	vhost-user-net -socket /tmp/vu.sock                 # server mode, loopback
//	vhost-user-net -socket /tmp/vu.sock -client         # connect to a server-mode front-end
//	vhost-user-net -socket /tmp/vu.sock -handler sink   # count and drop
//
// Handlers: loopback returns every transmitted frame on the receive queue
// (like vdpa_sim_net); sink counts and drops; responder answers ARP requests
// and ICMP echo requests for -ip.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vdpakit/vdpakit/vdpa/vhostuser"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
)

func main() {
	var (
		socket   = flag.String("socket", "/tmp/vhost-user-net.sock", "vhost-user unix socket path")
		client   = flag.Bool("client", false, "connect to the socket (front-end is the server) instead of listening")
		handler  = flag.String("handler", "loopback", "frame handler: loopback, sink or responder")
		macStr   = flag.String("mac", "02:00:00:00:00:01", "device MAC address (config space)")
		ipStr    = flag.String("ip", "10.0.0.1", "IPv4 address the responder answers for")
		interval = flag.Duration("interval", time.Second, "counter print interval (0: never)")
		duration = flag.Duration("duration", 0, "exit after this long (0: run until SIGINT)")
		debug    = flag.Bool("debug", false, "log every vhost-user message")
	)
	flag.Parse()
	if err := run(*socket, *client, *handler, *macStr, *ipStr, *interval, *duration, *debug); err != nil {
		fmt.Fprintln(os.Stderr, "vhost-user-net:", err)
		os.Exit(1)
	}
}

func run(socket string, client bool, handler, macStr, ipStr string, interval, duration time.Duration, debug bool) error {
	hw, err := net.ParseMAC(macStr)
	if err != nil || len(hw) != 6 {
		return fmt.Errorf("bad -mac %q", macStr)
	}
	var mac [6]byte
	copy(mac[:], hw)
	var h *vhostusertest.Handler
	switch handler {
	case "loopback":
		h = vhostusertest.New(vhostusertest.Loopback, mac)
	case "sink":
		h = vhostusertest.New(vhostusertest.Sink, mac)
	case "responder":
		ip := net.ParseIP(ipStr).To4()
		if ip == nil {
			return fmt.Errorf("bad -ip %q", ipStr)
		}
		h = vhostusertest.New(vhostusertest.Responder, mac)
		h.SetIPv4([4]byte(ip))
	default:
		return fmt.Errorf("unknown -handler %q (loopback, sink, responder)", handler)
	}
	level := slog.LevelInfo
	if debug {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	be := vhostuser.NewBackend(h, &vhostuser.BackendOptions{Logger: logger})

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, duration)
		defer cancel()
	}
	done := make(chan error, 1)
	go func() {
		if client {
			done <- be.DialAndServe(ctx, socket)
		} else {
			done <- be.ListenAndServe(ctx, socket)
		}
	}()
	mode := "server"
	if client {
		mode = "client"
	}
	fmt.Printf("vhost-user-net: %s mode on %s, handler %s, offering %s\n", mode, socket, handler,
		h.Features().With(virtio.FProtocolFeat, virtio.FLogAll).Format(virtio.DeviceNet))

	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	var last vhostuser.SessionInfo
	var prev vhostusertest.Counters
	prevT := time.Now()
	for {
		select {
		case err := <-done:
			printCounters(h.Counters(), prev, time.Since(prevT))
			if ctx.Err() != nil {
				return nil
			}
			return err
		case now := <-tick:
			info := be.Info()
			if info.Features != last.Features || info.ProtocolFeatures != last.ProtocolFeatures || info.Connected != last.Connected {
				fmt.Printf("session %d connected=%v features %s protocol %v status %v\n", info.Sessions, info.Connected,
					info.Features.Format(virtio.DeviceNet), info.ProtocolFeatures, info.Status)
				last = info
			}
			c := h.Counters()
			printCounters(c, prev, now.Sub(prevT))
			prev, prevT = c, now
		}
	}
}

func printCounters(c, prev vhostusertest.Counters, dt time.Duration) {
	s := dt.Seconds()
	if s <= 0 {
		s = 1
	}
	fmt.Printf("tx %d frames (%.3f Mpps)  rx %d frames (%.3f Mpps)  rx dropped %d  kicks %d  calls %d\n",
		c.TxFrames, float64(c.TxFrames-prev.TxFrames)/s/1e6, c.RxFrames, float64(c.RxFrames-prev.RxFrames)/s/1e6,
		c.RxDropped, c.Kicks, c.Calls)
}

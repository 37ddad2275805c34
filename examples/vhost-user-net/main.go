// Command vhost-user-net is a vhost-user network back-end built on vdpakit:
// DPDK's virtio-user (net_virtio_user) or QEMU (-netdev vhost-user) attaches
// to it. It prints the negotiated features and traffic counters
// periodically and exits on SIGINT/SIGTERM or after -duration, printing the
// negotiated features and per-pair counters at the end.
//
//	vhost-user-net -socket /tmp/vu.sock                  # server mode, softnet loopback
//	vhost-user-net -socket /tmp/vu.sock -pairs 2         # two queue pairs (QEMU queues=2, DPDK queues=2)
//	vhost-user-net -pairs 8 -poll -poll-workers 2        # busy-poll 8 pairs on 2 goroutines (softnet.PollGroup)
//	vhost-user-net -socket /tmp/vu.sock -client          # connect to a server-mode front-end
//	vhost-user-net -socket /tmp/vu.sock -handler sink    # count and drop
//	vhost-user-net -handler responder -ip 10.0.0.1       # answer ARP and ping
//	vhost-user-net -device simple                        # the small busy-polling test device
//	vhost-user-net -tap vu0                              # frames to and from tap device vu0
//	vhost-user-net -tap vu0 -netns /var/run/netns/test   # the tap in a network namespace
//	vhost-user-net -packet eth1                          # attach to interface eth1 (AF_PACKET)
//
// Devices: softnet is vdpa/softnet, the full software virtio-net device
// (control queue, event-driven or -poll mode); simple is
// vhostuser/vhostusertest's one-pair device that busy-polls with
// notification suppression. Handlers: loopback returns every transmitted
// frame on the receive queue (like vdpa_sim_net); sink counts and drops;
// responder answers ARP requests and ICMP echo requests for -ip.
//
// Host networks: -tap NAME connects the softnet device to a Linux tap device
// (created if it does not exist; one tap queue per pair), -packet IFNAME to
// an existing interface through an AF_PACKET socket (vdpa/hostnet); -netns
// names the network namespace either lives in. The device then offers the
// checksum and segmentation offloads (CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6,
// ECN, USO; -offload=false turns them off), which pass between the guest and
// the host with their virtio-net headers. -tap and -packet replace -handler.
//
// QEMU and DPDK's virtio-user run the virtio-net control queue themselves
// (MQ, receive filters, MAC address), so the softnet device is created with
// softnet.Options.FrontendCtrl: it serves every pair the front-end enables
// and answers each pair's frames on the receive queue of the same pair.
// With QEMU, -pairs N goes with -netdev vhost-user,queues=N and
// -device virtio-net-pci,mq=on.
//
// With QEMU, guest memory must be shareable, for example:
//
//	-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
//	-chardev socket,id=vu,path=/tmp/vu.sock -netdev vhost-user,id=n0,chardev=vu
//	-device virtio-net-pci,netdev=n0
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/hostnet"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
)

type config struct {
	socket, device, handler, mac, ip string
	tap, packet, netns               string
	client, poll, debug, offload     bool
	pairs, pollWorkers               int
	interval, duration               time.Duration
}

func main() {
	var c config
	flag.StringVar(&c.socket, "socket", "/tmp/vhost-user-net.sock", "vhost-user unix socket path")
	flag.BoolVar(&c.client, "client", false, "connect to the socket (the front-end listens) instead of listening")
	flag.StringVar(&c.device, "device", "softnet", "device: softnet or simple")
	flag.StringVar(&c.handler, "handler", "loopback", "frame handler: loopback, sink or responder")
	flag.IntVar(&c.pairs, "pairs", 1, "softnet: queue pairs (max_virtqueue_pairs)")
	flag.StringVar(&c.mac, "mac", "02:00:00:00:00:01", "device MAC address (config space)")
	flag.StringVar(&c.ip, "ip", "10.0.0.1", "IPv4 address the responder answers for")
	flag.BoolVar(&c.poll, "poll", false, "softnet: busy-poll the rings (notifications off) instead of sleeping on kicks")
	flag.IntVar(&c.pollWorkers, "poll-workers", 0, "softnet with -poll: poll every queue on this many goroutines of one softnet.PollGroup (0: a goroutine per queue)")
	flag.DurationVar(&c.interval, "interval", time.Second, "counter print interval (0: never)")
	flag.DurationVar(&c.duration, "duration", 0, "exit after this long (0: run until SIGINT)")
	flag.BoolVar(&c.debug, "debug", false, "log every vhost-user message")
	flag.StringVar(&c.tap, "tap", "", "softnet: exchange frames with this tap device (replaces -handler)")
	flag.StringVar(&c.packet, "packet", "", "softnet: exchange frames with this interface over AF_PACKET (replaces -handler)")
	flag.StringVar(&c.netns, "netns", "", "network namespace path of -tap or -packet (default: this process's)")
	flag.BoolVar(&c.offload, "offload", true, "with -tap or -packet: offer the checksum and segmentation offloads")
	flag.Parse()
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "vhost-user-net:", err)
		os.Exit(1)
	}
}

// counters is what the example prints, whatever the device: totals and,
// per queue pair, frames transmitted by the driver (tx) and delivered to
// it (rx).
type counters struct {
	tx, rx, drops  uint64
	pairTx, pairRx []uint64
	// dropsBy is the drops by reason ("rx_no_buffer 3"), where the
	// device counts them.
	dropsBy []string
}

func newDevice(c config) (vdpa.Handler, func() counters, error) {
	hw, err := net.ParseMAC(c.mac)
	if err != nil || len(hw) != 6 {
		return nil, nil, fmt.Errorf("bad -mac %q", c.mac)
	}
	mac := [6]byte(hw)
	ip, err := netip.ParseAddr(c.ip)
	if err != nil || !ip.Is4() {
		return nil, nil, fmt.Errorf("bad -ip %q", c.ip)
	}
	if c.pairs < 1 || c.pairs > int(virtio.NetCtrlMQPairsMax) {
		return nil, nil, fmt.Errorf("bad -pairs %d", c.pairs)
	}
	if c.tap != "" && c.packet != "" {
		return nil, nil, fmt.Errorf("-tap and -packet exclude each other")
	}
	if (c.tap != "" || c.packet != "") && c.device != "softnet" {
		return nil, nil, fmt.Errorf("-tap and -packet need -device softnet")
	}
	switch c.device {
	case "softnet":
		opts := &softnet.Options{MAC: mac, MaxQueueSize: 1024, MaxQueuePairs: uint16(c.pairs), FrontendCtrl: true,
			Offload: c.offload && (c.tap != "" || c.packet != "")}
		if c.poll {
			opts.Mode = softnet.ModePoll
		}
		if c.pollWorkers < 0 || (c.pollWorkers > 0 && !c.poll) {
			return nil, nil, fmt.Errorf("-poll-workers %d: want 0, or a count with -poll", c.pollWorkers)
		}
		if c.pollWorkers > 0 {
			opts.PollGroup = softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: c.pollWorkers})
		}
		switch c.handler {
		case "loopback":
		case "sink":
			opts.Handler = softnet.FrameHandlerFunc(func(*softnet.Tx, []byte) {})
		case "responder":
			r, err := softnet.NewResponder(mac, ip)
			if err != nil {
				return nil, nil, err
			}
			opts.Handler = r
		default:
			return nil, nil, fmt.Errorf("unknown -handler %q (loopback, sink, responder)", c.handler)
		}
		d, err := softnet.New(opts)
		if err != nil {
			return nil, nil, err
		}
		return d, func() counters {
			s := d.Stats()
			out := counters{pairTx: make([]uint64, c.pairs), pairRx: make([]uint64, c.pairs)}
			for i, q := range s.Queues {
				if i >= 2*c.pairs {
					break // the control queue
				}
				if i%2 == 0 {
					out.rx += q.Frames
					out.pairRx[i/2] = q.Frames
				} else {
					out.tx += q.Frames
					out.pairTx[i/2] = q.Frames
				}
			}
			for r, n := range s.Drops {
				out.drops += n
				if n != 0 {
					out.dropsBy = append(out.dropsBy, fmt.Sprintf("%v %d", softnet.DropReason(r), n))
				}
			}
			return out
		}, nil
	case "simple":
		if c.pairs != 1 {
			return nil, nil, fmt.Errorf("-device simple has one queue pair")
		}
		var h *vhostusertest.Handler
		switch c.handler {
		case "loopback":
			h = vhostusertest.New(vhostusertest.Loopback, mac)
		case "sink":
			h = vhostusertest.New(vhostusertest.Sink, mac)
		case "responder":
			h = vhostusertest.New(vhostusertest.Responder, mac)
			h.SetIPv4(ip.As4())
		default:
			return nil, nil, fmt.Errorf("unknown -handler %q (loopback, sink, responder)", c.handler)
		}
		return h, func() counters {
			k := h.Counters()
			return counters{tx: k.TxFrames, rx: k.RxFrames, drops: k.RxDropped,
				pairTx: []uint64{k.TxFrames}, pairRx: []uint64{k.RxFrames}}
		}, nil
	}
	return nil, nil, fmt.Errorf("unknown -device %q (softnet, simple)", c.device)
}

func run(c config) error {
	if _, _, err := newDevice(c); err != nil {
		return err // before any signal handling
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return serve(ctx, c)
}

// hostBackend is a vdpa/hostnet back-end.
type hostBackend interface {
	Attach(*softnet.Device) error
	Stats() hostnet.Stats
	Close(context.Context) error
}

// attachHost connects the softnet device to -tap or -packet, if given.
func attachHost(c config, h vdpa.Handler) (hostBackend, error) {
	var be hostBackend
	switch {
	case c.tap != "":
		t, err := hostnet.OpenTap(c.tap, &hostnet.TapOptions{Queues: c.pairs, NetNS: c.netns, NoOffload: !c.offload})
		if err != nil {
			return nil, err
		}
		fmt.Printf("tap %s: %d queue(s), USO %v\n", t.Name(), c.pairs, t.USO())
		be = t
	case c.packet != "":
		p, err := hostnet.OpenPacket(c.packet, &hostnet.PacketOptions{NetNS: c.netns, NoOffload: !c.offload})
		if err != nil {
			return nil, err
		}
		fmt.Printf("AF_PACKET on %s\n", c.packet)
		be = p
	default:
		return nil, nil
	}
	if err := be.Attach(h.(*softnet.Device)); err != nil {
		_ = be.Close(context.Background())
		return nil, err
	}
	return be, nil
}

// serve runs the back-end until ctx ends or -duration passed.
func serve(ctx context.Context, c config) error {
	h, count, err := newDevice(c)
	if err != nil {
		return err
	}
	host, err := attachHost(c, h)
	if err != nil {
		return err
	}
	if host != nil {
		defer func() {
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = host.Close(cctx)
			fmt.Printf("host back-end: %+v\n", host.Stats())
		}()
	}
	level := slog.LevelInfo
	if c.debug {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	be := vhostuser.NewBackend(h, &vhostuser.BackendOptions{Logger: logger})
	if c.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.duration)
		defer cancel()
	}
	done := make(chan error, 1)
	go func() {
		if c.client {
			done <- be.DialAndServe(ctx, c.socket)
		} else {
			done <- be.ListenAndServe(ctx, c.socket)
		}
	}()
	mode := "server"
	if c.client {
		mode = "client"
	}
	handler := c.handler
	switch {
	case c.tap != "":
		handler = "tap " + c.tap
	case c.packet != "":
		handler = "packet " + c.packet
	}
	fmt.Printf("vhost-user-net: %s mode on %s, device %s, handler %s, %d queue pair(s)\n  offering %s\n  protocol %v\n",
		mode, c.socket, c.device, handler, c.pairs,
		h.Features().With(virtio.FProtocolFeat, virtio.FLogAll).Format(virtio.DeviceNet), vhostuser.SupportedProtocolFeatures)

	var tick <-chan time.Time
	if c.interval > 0 {
		t := time.NewTicker(c.interval)
		defer t.Stop()
		tick = t.C
	}
	var last vhostuser.SessionInfo
	prev, prevT := count(), time.Now()
	for {
		select {
		case err := <-done:
			k := count()
			printCounters(k, prev, time.Since(prevT))
			printSummary(be.Info(), k)
			if ctx.Err() != nil {
				return nil
			}
			return err
		case now := <-tick:
			info := be.Info()
			if info.Features != last.Features || info.ProtocolFeatures != last.ProtocolFeatures ||
				info.Connected != last.Connected || info.Sessions != last.Sessions {
				fmt.Printf("session %d connected=%v\n  features %s\n  protocol %v\n  status %v\n", info.Sessions,
					info.Connected, info.Features.Format(virtio.DeviceNet), info.ProtocolFeatures, info.Status)
				last = info
			}
			k := count()
			printCounters(k, prev, now.Sub(prevT))
			prev, prevT = k, now
		}
	}
}

func printCounters(c, prev counters, dt time.Duration) {
	s := dt.Seconds()
	if s <= 0 {
		s = 1
	}
	fmt.Printf("tx %d frames (%.3f Mpps)  rx %d frames (%.3f Mpps)  dropped %d\n",
		c.tx, float64(c.tx-prev.tx)/s/1e6, c.rx, float64(c.rx-prev.rx)/s/1e6, c.drops)
}

// printSummary prints the negotiated features of the last session and the
// per-pair counters.
func printSummary(info vhostuser.SessionInfo, c counters) {
	fmt.Printf("summary: %d session(s)\n  negotiated features %s\n  protocol %v\n",
		info.Sessions, info.Features.Format(virtio.DeviceNet), info.ProtocolFeatures)
	for p := range c.pairTx {
		fmt.Printf("  pair %d: tx %d rx %d\n", p, c.pairTx[p], c.pairRx[p])
	}
	fmt.Printf("  total: tx %d rx %d dropped %d\n", c.tx, c.rx, c.drops)
	if len(c.dropsBy) > 0 {
		fmt.Printf("  dropped by reason: %s\n", strings.Join(c.dropsBy, ", "))
	}
}

// Command vfio-user-net serves a mediated virtio-net device (package mdev,
// backed by the software device vdpa/softnet) over vfio-user, so a VMM such
// as QEMU >= 10.1 attaches it with -device vfio-user-pci. It prints traffic
// counters periodically and exits on SIGINT/SIGTERM.
//
//	vfio-user-net -socket /tmp/vfu.sock                      # loopback
//	vfio-user-net -socket /tmp/vfu.sock -handler responder   # answer ARP and ping for -ip
//	vfio-user-net -socket /tmp/vfu.sock -pairs 2             # multi-queue
//
// QEMU 11.1 (guest memory must be shareable; only the JSON -device form
// works):
//
//	-object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem
//	-device '{"driver":"vfio-user-pci","id":"n0","socket":{"path":"/tmp/vfu.sock","type":"unix"}}'
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
	"syscall"
	"time"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
)

func main() {
	socket := flag.String("socket", "/tmp/vfio-user-net.sock", "unix socket to listen on")
	handler := flag.String("handler", "loopback", "loopback or responder")
	pairs := flag.Int("pairs", 1, "queue pairs")
	macS := flag.String("mac", "52:54:00:12:34:56", "MAC address")
	mtu := flag.Int("mtu", 1500, "MTU")
	ipS := flag.String("ip", "10.0.2.2", "responder IPv4 address")
	interval := flag.Duration("interval", 5*time.Second, "stats interval (0: none)")
	debug := flag.Bool("debug", false, "log every rejected message")
	flag.Parse()
	if err := run(*socket, *handler, *pairs, *macS, *mtu, *ipS, *interval, *debug); err != nil {
		fmt.Fprintln(os.Stderr, "vfio-user-net:", err)
		os.Exit(1)
	}
}

func run(socket, handler string, pairs int, macS string, mtu int, ipS string, interval time.Duration, debug bool) error {
	hw, err := net.ParseMAC(macS)
	if err != nil || len(hw) != 6 {
		return fmt.Errorf("bad -mac %q", macS)
	}
	if pairs < 1 || pairs > 16 {
		return fmt.Errorf("bad -pairs %d", pairs)
	}
	var mac [6]byte
	copy(mac[:], hw)
	var srv *vfiouser.Server
	opts := &softnet.Options{MAC: mac, MTU: uint16(mtu), MaxQueuePairs: uint16(pairs),
		OnConfigChange: func() {
			if srv != nil {
				srv.Device().ConfigChanged()
			}
		}}
	switch handler {
	case "loopback":
	case "responder":
		ip, err := netip.ParseAddr(ipS)
		if err != nil {
			return fmt.Errorf("bad -ip: %w", err)
		}
		// The responder answers as the host: a MAC of its own.
		r, err := softnet.NewResponder([6]byte{0x02, 0, 0, 0, 0, 0x02}, ip)
		if err != nil {
			return err
		}
		opts.Handler = r
	default:
		return fmt.Errorf("bad -handler %q", handler)
	}
	sn, err := softnet.New(opts)
	if err != nil {
		return err
	}
	backing := vdpa.NewLocal(sn, nil)
	defer backing.Close()
	level := slog.LevelInfo
	if debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	srv, err = vfiouser.New(backing, &vfiouser.Options{Device: mdev.Options{Backend: "software"}, Logger: log})
	if err != nil {
		return err
	}
	defer srv.Close()
	_ = os.Remove(socket)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if interval > 0 {
		go func() {
			t := time.NewTicker(interval)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					st := sn.Stats()
					var tx, rx uint64
					for i, q := range st.Queues {
						if i%2 == 0 {
							rx += q.Frames
						} else {
							tx += q.Frames
						}
					}
					log.Info("stats", "status", srv.Device().Status(), "guest_tx", tx, "guest_rx", rx)
				}
			}
		}()
	}
	log.Info("serving", "socket", socket, "handler", handler, "pairs", pairs, "mac", hw.String())
	err = srv.Serve(ctx, ln)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// Command migrate is vdpakit's live-migration demo: a guest-side virtio-net
// driver sends frames through a mediated virtio-net device (package mdev)
// while dirtying guest memory; the guest is migrated, by iterative pre-copy
// and stop-and-copy, to a destination that resumes it with traffic still
// flowing; then every frame is checked to have been received exactly once
// and guest memory on both sides to have been byte-identical at the
// switchover.
//
// By default the source and the destination are separate processes (the
// program re-executes itself as the destination) connected over TCP on
// loopback, and the mediated device is backed by the embedded software
// virtio-net device. -inproc runs both in one process. -backend selects a
// kernel vDPA device (vdpa:/dev/vhost-vdpa-0, e.g. vdpa_sim_net) or a
// vhost-user back-end (vhost-user:/path/to/socket) that loops frames back
// unchanged; -dest-backend gives the destination's (default: the same
// spec, which only works for the software device).
//
//	go run ./examples/migrate
//	go run ./examples/migrate -guest-mem 1GiB -dirty-rate 5000
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

type config struct {
	guestMem     uint64
	dirtyRate    float64
	frames       uint64
	after        time.Duration
	inproc       bool
	backend      string
	destBackend  string
	mode         string
	target       time.Duration
	bandwidth    float64
	verifyMemory bool
	role         string
	addr         string
}

func main() {
	var c config
	var mem string
	flag.StringVar(&mem, "guest-mem", "256MiB", "guest memory size (e.g. 256MiB, 1GiB)")
	flag.Float64Var(&c.dirtyRate, "dirty-rate", 20000, "pages per second the guest's vCPU dirties")
	flag.Uint64Var(&c.frames, "frames", 1500000, "frames the guest sends in total (before and after the migration)")
	flag.DurationVar(&c.after, "migrate-after", 200*time.Millisecond, "traffic time before the migration starts")
	flag.BoolVar(&c.inproc, "inproc", false, "run source and destination in one process")
	flag.StringVar(&c.backend, "backend", "software", "backing device: software, vdpa:/dev/vhost-vdpa-N or vhost-user:/path")
	flag.StringVar(&c.destBackend, "dest-backend", "", "destination backing device (default: -backend)")
	flag.StringVar(&c.mode, "mode", "auto", "dirty tracking: auto, device-log or relay")
	flag.DurationVar(&c.target, "downtime-target", 5*time.Millisecond, "downtime the pre-copy aims for")
	flag.Float64Var(&c.bandwidth, "bandwidth", 1e9, "migration link bandwidth estimate, bytes/s")
	flag.BoolVar(&c.verifyMemory, "verify-memory", true, "hash guest memory on both sides at the switchover")
	flag.StringVar(&c.role, "role", "source", "internal: source or dest")
	flag.StringVar(&c.addr, "addr", "", "internal: the source's address for the destination")
	flag.Parse()
	var err error
	if c.guestMem, err = parseSize(mem); err != nil {
		fatal(err)
	}
	if c.destBackend == "" {
		c.destBackend = c.backend
	}
	if c.role == "dest" {
		err = runDestProcess(c)
	} else {
		err = runSource(c)
	}
	if err != nil {
		fatal(err)
	}
}

// guestOptions lays out the guest driver's memory: one counter byte per
// frame, the vCPU dirtier writes above them.
func (c config) guestOptions() *mdevtest.Options {
	return &mdevtest.Options{MaxFrames: c.frames}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "migrate:", err)
	os.Exit(1)
}

func parseSize(s string) (uint64, error) {
	mult := uint64(1)
	for _, u := range []struct {
		suf string
		m   uint64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"G", 1 << 30}, {"M", 1 << 20}} {
		if strings.HasSuffix(s, u.suf) {
			s, mult = strings.TrimSuffix(s, u.suf), u.m
			break
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}

func dirtyMode(s string) (mdev.DirtyMode, error) {
	switch s {
	case "auto":
		return mdev.DirtyAuto, nil
	case "device-log":
		return mdev.DirtyDeviceLog, nil
	case "relay":
		return mdev.DirtyRelay, nil
	}
	return 0, fmt.Errorf("unknown -mode %q", s)
}

// machine is one side's guest memory and mediated device.
type machine struct {
	mem     *vring.Memory
	backing vdpa.Device
	dev     *mdev.Device
}

func newMachine(c config, spec string) (*machine, error) {
	r, err := vring.NewMemfdRegion(0, c.guestMem, &vring.RegionOptions{Name: "guest"})
	if err != nil {
		return nil, err
	}
	mem, err := vring.NewMemory(r)
	if err != nil {
		_ = r.Close()
		return nil, err
	}
	var backing vdpa.Device
	kind := "software"
	switch {
	case spec == "software":
		sn, err := softnet.New(nil)
		if err != nil {
			return nil, err
		}
		backing = vdpa.NewLocal(sn, nil)
	case strings.HasPrefix(spec, "vdpa:"):
		kind = "vhost-vdpa"
		if backing, err = kernel.Open(strings.TrimPrefix(spec, "vdpa:"), nil); err != nil {
			return nil, err
		}
	case strings.HasPrefix(spec, "vhost-user:"):
		kind = "vhost-user"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		// The virtio-net configuration is what the guest reads; vhost-user
		// does not say how large the back-end's is.
		opts := &vhostuser.FrontendOptions{ConfigSize: virtio.NetConfigSize}
		if backing, err = vhostuser.Dial(ctx, strings.TrimPrefix(spec, "vhost-user:"), opts); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown backend %q", spec)
	}
	mode, err := dirtyMode(c.mode)
	if err != nil {
		return nil, err
	}
	dev, err := mdev.NewDevice(backing, &mdev.Options{Memory: mem, Backend: kind, DirtyMode: mode})
	if err != nil {
		_ = backing.Close()
		return nil, err
	}
	return &machine{mem: mem, backing: backing, dev: dev}, nil
}

func (m *machine) close() {
	_ = m.dev.Close()
	_ = m.backing.Close()
	_ = m.mem.Close()
}

// vcpus runs the guest driver and the memory-dirtying vCPU until stopped.
type vcpus struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startVCPUs(g *mdevtest.Guest, d *mdevtest.Dirtier) *vcpus {
	ctx, cancel := context.WithCancel(context.Background())
	v := &vcpus{cancel: cancel}
	v.wg.Add(2)
	go func() { defer v.wg.Done(); _ = g.Run(ctx) }()
	go func() { defer v.wg.Done(); d.Run(ctx) }()
	return v
}

func (v *vcpus) stop() error { v.cancel(); v.wg.Wait(); return nil }

func memHash(mem *vring.Memory) string {
	h := sha256.New()
	for _, r := range mem.Regions() {
		h.Write(r.Bytes())
	}
	return hex.EncodeToString(h.Sum(nil))
}

// destResult is what the destination reports back after its traffic ends.
type destResult struct {
	MemHash    string        `json:"mem_hash"`
	HashTime   time.Duration `json:"hash_time"`
	Sent       uint64        `json:"sent"`
	Received   uint64        `json:"received"`
	AtResume   uint64        `json:"sent_at_resume"`
	Verify     string        `json:"verify"`
	Rounds     int           `json:"rounds"`
	PageBytes  uint64        `json:"page_bytes"`
	StateBytes int           `json:"state_bytes"`
	Restart    time.Duration `json:"restart"`
	StartGuest time.Duration `json:"start_guest"`
	Err        string        `json:"error,omitempty"`
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func runSource(c config) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	where := "separate processes"
	if c.inproc {
		where = "in-process"
	}
	fmt.Printf("vdpakit live migration: %s backend, %.0f MiB guest, vCPU dirtying %.0f pages/s, %s over TCP %s\n",
		c.backend, mib(c.guestMem), c.dirtyRate, where, ln.Addr())

	var child *exec.Cmd
	destDone := make(chan error, 1)
	if c.inproc {
		go func() { destDone <- runDest(c, ln.Addr().String()) }()
	} else {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		child = exec.Command(exe, "-role", "dest", "-addr", ln.Addr().String(),
			"-guest-mem", strconv.FormatUint(c.guestMem, 10), "-dirty-rate", fmt.Sprint(c.dirtyRate),
			"-frames", strconv.FormatUint(c.frames, 10), "-backend", c.destBackend, "-mode", c.mode, fmt.Sprintf("-verify-memory=%v", c.verifyMemory))
		child.Stdout, child.Stderr = os.Stdout, os.Stderr
		if err := child.Start(); err != nil {
			return fmt.Errorf("start destination process: %w", err)
		}
		go func() { destDone <- child.Wait() }()
	}
	connc := make(chan net.Conn, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			close(connc)
			return
		}
		connc <- conn
	}()
	var conn net.Conn
	select {
	case conn = <-connc:
	case err := <-destDone:
		return fmt.Errorf("destination exited before connecting: %v", err)
	}
	if conn == nil {
		return errors.New("accept failed")
	}
	defer conn.Close()

	src, err := newMachine(c, c.backend)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	defer src.close()
	g, err := mdevtest.Boot(src.dev, src.mem, c.frames, c.guestOptions())
	if err != nil {
		return fmt.Errorf("guest boot: %w", err)
	}
	dirtier, err := mdevtest.NewDirtier(src.mem, mdevtest.Layout(c.guestOptions()), c.guestMem, c.dirtyRate, 1)
	if err != nil {
		return err
	}
	// Shared (memfd-backed), so a vhost-user back-end can map it
	// (VHOST_USER_SET_LOG_BASE).
	log, err := dirty.New(c.guestMem, &dirty.Options{Shared: true, Name: "guest-dirty-log"})
	if err != nil {
		return err
	}
	defer log.Close()
	g.SetLog(log)
	dirtier.SetLog(log)
	v := startVCPUs(g, dirtier)
	time.Sleep(c.after)
	sent, recv, _, _ := g.Stats()
	fmt.Printf("source: guest running, %d frames sent, %d received; starting migration\n", sent, recv)

	rep, err := mdev.MigrateSource(context.Background(), conn, mdev.SourceOptions{
		Device: src.dev, Memory: src.mem, Log: log,
		Tracker:   dirty.TrackerOptions{Bandwidth: c.bandwidth, DowntimeTarget: c.target, MaxRounds: 30},
		StopGuest: v.stop,
		OnRound: func(r mdev.RoundReport) {
			if r.N == 0 && !r.Final && r.Interval == 0 {
				fmt.Printf("  round 0: %7d pages %8.1f MiB in %v (full copy)\n", r.Pages, mib(r.Sent), r.SendTime.Round(time.Microsecond))
				return
			}
			fmt.Printf("  round %d: %7d pages %8.1f MiB in %v, dirty rate %.0f pages/s (%.1f MiB/s), est. downtime %v\n",
				r.N, r.Pages, mib(r.Sent), r.SendTime.Round(time.Microsecond), r.PageRate, r.ByteRate/(1<<20), r.Downtime.Round(time.Microsecond))
		},
	})
	if err != nil {
		v.stop()
		return fmt.Errorf("migration: %w", err)
	}
	sentAtStop, _, _, _ := g.Stats()
	fmt.Printf("  stop-and-copy: %d pages (%.2f MiB) + %d bytes of device state\n", rep.Final.Sent/log.PageSize(), mib(rep.Final.Sent), rep.StateBytes)
	fmt.Printf("dirty tracking: %s; %d pre-copy rounds, %.1f MiB sent in total\n", rep.Mode, len(rep.Rounds), mib(rep.TotalBytes))

	var srcHash string
	if c.verifyMemory {
		srcHash = memHash(src.mem) // the source is stopped: this is the memory it handed over
	}
	var res destResult
	err = json.NewDecoder(bufio.NewReader(conn)).Decode(&res)
	conn.Close() // lets the destination finish
	if err != nil {
		return fmt.Errorf("destination report: %w", err)
	}
	if res.Err != "" {
		return fmt.Errorf("destination: %s", res.Err)
	}
	// Each part is measured where it happens: stopping on the source,
	// resuming on the destination. The last pages and state take the rest:
	// the source's harvest and send and the destination's receive. (Taking
	// the destination's part from the source's clock instead subtracts the
	// destination's hashing from an interval the source may have begun
	// after it: on a loaded machine that came out negative.)
	down := rep.Downtime - res.HashTime
	destResume := res.Restart + res.StartGuest
	lastCopy := down - rep.StopGuest - rep.StopDevice - destResume
	fmt.Printf("downtime: %v (stop guest %v, stop device %v, last pages+state %v, destination resume %v)\n",
		down.Round(time.Microsecond), rep.StopGuest.Round(time.Microsecond), rep.StopDevice.Round(time.Microsecond),
		lastCopy.Round(time.Microsecond), destResume.Round(time.Microsecond))
	fmt.Printf("          destination: device restart %v, guest start %v\n", res.Restart.Round(time.Microsecond), res.StartGuest.Round(time.Microsecond))
	if res.HashTime > 0 {
		fmt.Printf("          (the destination's %v of verification hashing is excluded)\n", res.HashTime.Round(time.Microsecond))
	}
	fmt.Printf("destination: traffic continued from frame %d to %d; %d frames sent, %d received\n",
		sentAtStop, res.Sent, res.Sent, res.Received)
	ok := true
	if res.Verify == "" {
		fmt.Println("check: every frame received exactly once: OK")
	} else {
		fmt.Println("check: frames:", res.Verify)
		ok = false
	}
	if c.verifyMemory {
		if srcHash == res.MemHash {
			fmt.Printf("check: guest memory identical at switchover (sha256 %s…): OK\n", srcHash[:16])
		} else {
			fmt.Printf("check: guest memory DIFFERS: source %s, destination %s\n", srcHash, res.MemHash)
			ok = false
		}
	}
	if err := <-destDone; err != nil {
		return fmt.Errorf("destination: %w", err)
	}
	if !ok {
		return errors.New("verification failed")
	}
	return nil
}

func runDestProcess(c config) error { return runDest(c, c.addr) }

// runDest is the destination: it connects to the source, receives the
// migration, runs the guest until its traffic ends and reports.
func runDest(c config, addr string) error {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	report := func(r destResult) error { return json.NewEncoder(conn).Encode(r) }
	m, err := newMachine(c, c.destBackend)
	if err != nil {
		_ = report(destResult{Err: err.Error()})
		return err
	}
	defer m.close()
	var res destResult
	var g *mdevtest.Guest
	var v *vcpus
	drep, err := mdev.MigrateDestination(context.Background(), conn, mdev.DestOptions{
		Device: m.dev, Memory: m.mem,
		Loaded: func() error {
			if c.verifyMemory {
				t := time.Now()
				res.MemHash = memHash(m.mem)
				res.HashTime = time.Since(t)
			}
			return nil
		},
		StartGuest: func() error {
			var err error
			if g, err = mdevtest.Attach(m.dev, m.mem); err != nil {
				return err
			}
			d, err := mdevtest.NewDirtier(m.mem, mdevtest.Layout(c.guestOptions()), c.guestMem, c.dirtyRate, 2)
			if err != nil {
				return err
			}
			v = startVCPUs(g, d)
			return nil
		},
	})
	if err != nil {
		return err
	}
	res.AtResume, _, _, _ = g.Stats()
	res.Rounds, res.PageBytes, res.StateBytes = drep.Rounds, drep.PageBytes, drep.StateBytes
	res.Restart, res.StartGuest = drep.Restart, drep.StartGuest
	deadline := time.Now().Add(2 * time.Minute)
	for !g.Done() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	_ = v.stop()
	res.Sent, res.Received, _, _ = g.Stats()
	if err := g.Verify(); err != nil {
		res.Verify = err.Error()
	}
	if err := report(res); err != nil {
		return err
	}
	// Wait for the source to close the connection.
	_, _ = io.Copy(io.Discard, conn)
	return nil
}

// Command bench measures vdpakit's rings, dirty tracking and migration, and
// compares them in the same run with real peers: the Linux kernel's own
// split-ring benchmark (tools/virtio/ringtest) and DPDK's testpmd with its
// net_vhost back-end. It is a separate module so that its peer-only
// dependencies (a plotting library) never reach a program embedding vdpakit.
//
// Usage (from the repository root):
//
//	go -C bench run . [all|rings|dirty|migrate|peers] [flags]
//	(cd bench && go run . all -short -json /tmp/bench.json)
//
// The summary table goes to stdout, progress to stderr. -json FILE writes
// every result with its parameters and a description of the machine; -plot
// DIR draws throughput against batch size, harvest time against guest size
// and downtime against dirty rate as SVG and PNG.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Config holds every knob of a run; it is recorded in the JSON report.
type Config struct {
	Suites         []string `json:"suites"`
	Duration       string   `json:"duration"`
	Short          bool     `json:"short"`
	Peers          []string `json:"peers"`
	RingSize       int      `json:"ring_size"`
	Batches        []int    `json:"batches"`
	ScanSizes      []string `json:"scan_sizes"`
	GuestSizes     []string `json:"migrate_guest_sizes"`
	DirtyRates     []string `json:"migrate_dirty_rates"`
	DowntimeTarget string   `json:"downtime_target"`
	HostCPU        int      `json:"host_cpu"`
	GuestCPU       int      `json:"guest_cpu"`
	PeerRounds     int      `json:"peer_rounds"`
	QueuePairs     []int    `json:"queue_pairs"`
	LoopbackFrames []int    `json:"loopback_frames"`
	VhostPollGroup bool     `json:"vhost_poll_group,omitempty"`
	ScaleDevices   []int    `json:"scale_devices"`
	ScaleSessions  []int    `json:"scale_sessions"`
	ScalePairs     []int    `json:"scale_pairs"`
	ScaleRxSlots   int      `json:"scale_rx_buffers"`
	CacheDir       string   `json:"cache_dir"`
	JSONPath       string   `json:"-"`
	PlotDir        string   `json:"-"`
	MarkdownPath   string   `json:"-"`
	ProfileDir     string   `json:"-"`

	duration  time.Duration
	scanSizes []uint64
	guestSize []uint64
	rates     []float64 // MiB/s
	downtime  time.Duration

	scaleDevices, scaleSessions, scalePairs []int
}

var suites = []string{"rings", "dirty", "migrate", "peers", "scale"}

const usage = `usage: bench [all|rings|dirty|migrate|peers|scale ...] [flags]

Subcommands select suites (default all):
  rings    vring device-side pop+push, driver-side add+reclaim; same goroutine,
           cross-goroutine (pinned threads) and cross-process (shared memfd)
  dirty    Mark cost, harvest scan speed against guest size, logging overhead
  migrate  pre-copy migration: downtime and total time against dirty rate and
           guest size, relay mode against device logging
  peers    the kernel's tools/virtio/ringtest and DPDK testpmd, as ratios
  scale    per-device cost (time, goroutines, fds, memory, leaks after close)
           of softnet devices and vhost-user sessions, 1 to thousands; frames/s
           of one device across N queue pairs against one pair per core

Flags:
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run parses args, runs the selected suites and prints the summary. It
// returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	if isRingChild() {
		return ringChildMain()
	}
	if isVhostChild() {
		return vhostChildMain()
	}
	cfg, err := parseArgs(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	prog := NewProgress(stderr, stderrIsTTY(), false)
	rep := &Report{
		Schema:  reportSchema,
		Tool:    "vdpakit bench",
		Command: "bench " + strings.Join(args, " "),
		Started: time.Now().UTC(),
		Machine: DescribeMachine(),
		Config:  *cfg,
	}
	h := &Harness{cfg: cfg, prog: prog}
	for _, s := range cfg.Suites {
		if ctx.Err() != nil {
			break
		}
		stopProf, err := startSuiteProfile(cfg.ProfileDir, s)
		if err != nil {
			fmt.Fprintln(stderr, "bench:", err)
			return 1
		}
		switch s {
		case "rings":
			h.Rings(ctx)
		case "dirty":
			h.Dirty(ctx)
		case "migrate":
			h.Migrate(ctx)
		case "peers":
			h.Peers(ctx)
		case "scale":
			h.Scale(ctx)
		}
		stopProf()
	}
	prog.Done()
	rep.Finished = time.Now().UTC()
	rep.LoadAvgEnd = loadAvg()
	rep.Results = h.results

	fmt.Fprintf(stdout, "vdpakit bench — %s, %d cores, %s, %s, load %s -> %s\n\n", rep.Machine.CPUModel, rep.Machine.Cores,
		kernelRelease(rep.Machine.Kernel), rep.Machine.GoVersion, rep.Machine.LoadAvg, rep.LoadAvgEnd)
	if err := WriteTable(stdout, h.results); err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	code := 0
	if cfg.JSONPath != "" {
		if err := rep.WriteJSONFile(cfg.JSONPath); err != nil {
			fmt.Fprintln(stderr, "bench:", err)
			code = 1
		}
	}
	if cfg.MarkdownPath != "" {
		if err := writeMarkdownFile(cfg.MarkdownPath, rep); err != nil {
			fmt.Fprintln(stderr, "bench:", err)
			code = 1
		}
	}
	if cfg.PlotDir != "" {
		files, err := WritePlots(cfg.PlotDir, h.results)
		if err != nil {
			fmt.Fprintln(stderr, "bench: plot:", err)
			code = 1
		}
		for _, f := range files {
			fmt.Fprintln(stderr, "bench: wrote", f)
		}
	}
	if ctx.Err() != nil {
		fmt.Fprintln(stderr, "bench: interrupted")
		return 130
	}
	if h.failed > 0 {
		fmt.Fprintf(stderr, "bench: %d measurement(s) failed (see table)\n", h.failed)
		code = 1
	}
	return code
}

func kernelRelease(k string) string {
	f := strings.Fields(k)
	if len(f) >= 2 {
		return f[0] + " " + f[1]
	}
	return k
}

func writeMarkdownFile(path string, rep *Report) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := WriteMarkdown(f, rep.Results); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// parseArgs accepts suites and flags in any order ("all -short" and
// "-short all" both work).
func parseArgs(args []string, stderr io.Writer) (*Config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	cfg := &Config{}
	home, _ := os.UserHomeDir()
	defCache := filepath.Join(home, ".cache", "vdpakit-vmtest")
	if v := os.Getenv("VDPAKIT_CACHE"); v != "" {
		defCache = v
	}
	fs.DurationVar(&cfg.duration, "duration", 300*time.Millisecond, "target run time of each measurement")
	fs.BoolVar(&cfg.Short, "short", false, "CI smoke mode: tiny durations and sizes, finishes in well under a minute")
	peers := fs.String("peers", "ringtest,dpdk", "peers to compare against (ringtest, dpdk; empty for none)")
	fs.IntVar(&cfg.RingSize, "ring-size", 256, "queue size for ring benchmarks (ringtest's default is 256)")
	batches := fs.String("batches", "1,8,32", "batch sizes for ring benchmarks")
	scan := fs.String("scan-sizes", "1GiB,16GiB,256GiB,1TiB", "guest sizes for the harvest scan")
	gsizes := fs.String("guest-sizes", "256MiB,1GiB", "guest sizes for migration")
	rates := fs.String("dirty-rates", "0,64,256", "guest dirty rates for migration, MiB/s")
	fs.DurationVar(&cfg.downtime, "downtime-target", 5*time.Millisecond, "pre-copy stops when the remaining pages fit in this downtime")
	fs.IntVar(&cfg.HostCPU, "host-cpu", 0, "CPU for the device (host) side of cross-thread benchmarks")
	fs.IntVar(&cfg.GuestCPU, "guest-cpu", min(1, runtime.NumCPU()-1), "CPU for the driver (guest) side of cross-thread benchmarks")
	fs.IntVar(&cfg.PeerRounds, "peer-rounds", 5, "interleaved rounds of each peer comparison (median and range reported)")
	qps := fs.String("queue-pairs", "1,2", "queue pairs for the DPDK testpmd comparisons")
	lbFrames := fs.String("loopback-frames", "32", "DPDK testpmd macswap loopback: frames in circulation per queue pair, 1..256 (testpmd's --burst, which --tx-first sends once; 32 is testpmd's default); several values run the loopback once for each")
	fs.BoolVar(&cfg.VhostPollGroup, "vhost-poll-group", false, "DPDK comparisons: the vdpakit back-end polls all its queues on one softnet.PollGroup worker (as net_vhost's one lcore does) instead of a goroutine per queue")
	scaleDevs := fs.String("scale-devices", "1,64,1024,4096", "scale: softnet device counts")
	scaleSess := fs.String("scale-sessions", "1,64,512,2048", "scale: vhost-user session counts")
	scalePairs := fs.String("scale-pairs", "1,2,16,64,256", "scale: queue pair counts of the frames/s comparison")
	fs.IntVar(&cfg.ScaleRxSlots, "scale-rx-buffers", 256, "scale: receive buffers (512 bytes) each pair's driver cycles through (1..256)")
	fs.StringVar(&cfg.CacheDir, "cache", defCache, "cache for the linux-source package and the built ringtest ($VDPAKIT_CACHE)")
	fs.StringVar(&cfg.JSONPath, "json", "", "write all results and the machine description to this JSON file")
	fs.StringVar(&cfg.PlotDir, "plot", "", "write charts (SVG and PNG) into this directory")
	fs.StringVar(&cfg.MarkdownPath, "markdown", "", "write the summary table as Markdown to this file")
	fs.StringVar(&cfg.ProfileDir, "profile", "", "write CPU profiles into this directory: one per suite of this process (SUITE.pprof) and one per run of the vhost-user back-end child")

	var pos []string
	rest := args
	for {
		if err := fs.Parse(rest); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	for _, p := range pos {
		switch p {
		case "all":
			cfg.Suites = append(cfg.Suites, suites...)
		case "rings", "dirty", "migrate", "peers", "scale":
			cfg.Suites = append(cfg.Suites, p)
		default:
			return nil, fmt.Errorf("unknown subcommand %q (want all, rings, dirty, migrate, peers or scale)", p)
		}
	}
	if len(cfg.Suites) == 0 {
		cfg.Suites = append(cfg.Suites, suites...)
	}
	cfg.Suites = dedup(cfg.Suites)

	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if cfg.Short {
		if !set["duration"] {
			cfg.duration = 40 * time.Millisecond
		}
		if !set["scan-sizes"] {
			*scan = "1GiB,64GiB"
		}
		if !set["guest-sizes"] {
			*gsizes = "64MiB"
		}
		if !set["dirty-rates"] {
			*rates = "0,256"
		}
		if !set["peer-rounds"] {
			cfg.PeerRounds = 1
		}
		if !set["batches"] {
			*batches = "1,32"
		}
		if !set["queue-pairs"] {
			*qps = "1"
		}
		if !set["scale-devices"] {
			*scaleDevs = "1,64"
		}
		if !set["scale-sessions"] {
			*scaleSess = "1,16"
		}
		if !set["scale-pairs"] {
			*scalePairs = "2,16"
		}
	}
	if cfg.duration <= 0 {
		return nil, fmt.Errorf("-duration must be positive")
	}
	cfg.Duration = cfg.duration.String()
	if cfg.downtime <= 0 {
		return nil, fmt.Errorf("-downtime-target must be positive")
	}
	cfg.DowntimeTarget = cfg.downtime.String()
	if cfg.RingSize < 2 || cfg.RingSize > 32768 || cfg.RingSize&(cfg.RingSize-1) != 0 {
		return nil, fmt.Errorf("-ring-size %d: want a power of two from 2 to 32768", cfg.RingSize)
	}
	if cfg.PeerRounds < 1 {
		return nil, fmt.Errorf("-peer-rounds must be at least 1")
	}
	var err error
	if cfg.Batches, err = parseInts(*batches); err != nil {
		return nil, fmt.Errorf("-batches: %w", err)
	}
	for _, b := range cfg.Batches {
		if b < 1 || b > cfg.RingSize {
			return nil, fmt.Errorf("-batches: %d outside 1..ring size %d", b, cfg.RingSize)
		}
	}
	if cfg.QueuePairs, err = parseInts(*qps); err != nil {
		return nil, fmt.Errorf("-queue-pairs: %w", err)
	}
	for _, q := range cfg.QueuePairs {
		if q < 1 || q > 8 {
			return nil, fmt.Errorf("-queue-pairs: %d outside 1..8", q)
		}
	}
	if cfg.LoopbackFrames, err = parseInts(*lbFrames); err != nil {
		return nil, fmt.Errorf("-loopback-frames: %w", err)
	}
	for i, n := range cfg.LoopbackFrames {
		// No more than the front-end's ring holds (virtio-user's default
		// queue_size, 256; testpmd's --burst itself goes to 512): a
		// larger burst is not all sent, and the count recorded would be
		// wrong.
		if n < 1 || n > 256 {
			return nil, fmt.Errorf("-loopback-frames: %d outside 1..256 (the front-end's ring)", n)
		}
		if slices.Contains(cfg.LoopbackFrames[:i], n) {
			return nil, fmt.Errorf("-loopback-frames: %d twice", n)
		}
	}
	for _, sc := range []struct {
		flag string
		in   *string
		out  *[]int
	}{{"-scale-devices", scaleDevs, &cfg.ScaleDevices}, {"-scale-sessions", scaleSess, &cfg.ScaleSessions}, {"-scale-pairs", scalePairs, &cfg.ScalePairs}} {
		if *sc.out, err = parseInts(*sc.in); err != nil {
			return nil, fmt.Errorf("%s: %w", sc.flag, err)
		}
		for _, v := range *sc.out {
			if v < 1 || v > 0x8000 {
				return nil, fmt.Errorf("%s: %d outside 1..32768", sc.flag, v)
			}
		}
	}
	cfg.scaleDevices, cfg.scaleSessions, cfg.scalePairs = cfg.ScaleDevices, cfg.ScaleSessions, cfg.ScalePairs
	if cfg.ScaleRxSlots < 1 || cfg.ScaleRxSlots > 256 {
		return nil, fmt.Errorf("-scale-rx-buffers %d: want 1..256", cfg.ScaleRxSlots)
	}
	if cfg.scanSizes, cfg.ScanSizes, err = parseSizes(*scan); err != nil {
		return nil, fmt.Errorf("-scan-sizes: %w", err)
	}
	if cfg.guestSize, cfg.GuestSizes, err = parseSizes(*gsizes); err != nil {
		return nil, fmt.Errorf("-guest-sizes: %w", err)
	}
	if cfg.rates, err = parseFloats(*rates); err != nil {
		return nil, fmt.Errorf("-dirty-rates: %w", err)
	}
	for _, r := range cfg.rates {
		cfg.DirtyRates = append(cfg.DirtyRates, formatValue(r)+" MiB/s")
	}
	cfg.Peers = nil
	for _, p := range splitList(*peers) {
		switch p {
		case "ringtest", "dpdk":
			cfg.Peers = append(cfg.Peers, p)
		default:
			return nil, fmt.Errorf("-peers: unknown peer %q (want ringtest, dpdk)", p)
		}
	}
	return cfg, nil
}

func dedup(s []string) []string {
	seen := map[string]bool{}
	out := s[:0]
	for _, v := range s {
		if !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	return out
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range splitList(s) {
		v, err := strconv.Atoi(f)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("empty list")
	}
	return out, nil
}

func parseFloats(s string) ([]float64, error) {
	var out []float64
	for _, f := range splitList(s) {
		v, err := strconv.ParseFloat(f, 64)
		if err != nil {
			return nil, err
		}
		if v < 0 {
			return nil, fmt.Errorf("negative value %v", v)
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("empty list")
	}
	return out, nil
}

// parseSize parses "4096", "64KiB", "1GiB", "1TiB" (binary units; "G" and
// "GB" are accepted as binary too, as guest sizes always are).
func parseSize(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	i := 0
	for i < len(s) && (s[i] >= '0' && s[i] <= '9') {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q: no number", s)
	}
	n, err := strconv.ParseUint(s[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	var shift uint
	switch strings.ToLower(strings.TrimSpace(s[i:])) {
	case "", "b":
	case "k", "kb", "kib":
		shift = 10
	case "m", "mb", "mib":
		shift = 20
	case "g", "gb", "gib":
		shift = 30
	case "t", "tb", "tib":
		shift = 40
	default:
		return 0, fmt.Errorf("size %q: unknown unit", s)
	}
	if n == 0 || n > (^uint64(0))>>shift {
		return 0, fmt.Errorf("size %q: out of range", s)
	}
	return n << shift, nil
}

// formatSize prints a byte count with the largest exact binary unit.
func formatSize(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	u := 0
	for u < len(units)-1 && n >= 1024 && n%1024 == 0 {
		n /= 1024
		u++
	}
	return fmt.Sprintf("%d%s", n, units[u])
}

func parseSizes(s string) ([]uint64, []string, error) {
	var out []uint64
	var names []string
	for _, f := range splitList(s) {
		v, err := parseSize(f)
		if err != nil {
			return nil, nil, err
		}
		out = append(out, v)
		names = append(names, formatSize(v))
	}
	if len(out) == 0 {
		return nil, nil, fmt.Errorf("empty list")
	}
	return out, names, nil
}

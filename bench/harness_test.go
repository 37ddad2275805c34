package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The testpmd transcripts in testdata were recorded on this machine with
// DPDK 22.11 (dpdk-testpmd --stats-period 1, stopped with SIGINT); the
// expected numbers below were read off them by hand.
func TestParseTestpmdTxonly(t *testing.T) {
	out, err := os.ReadFile("testdata/testpmd_txonly_virtio_user.txt")
	require.NoError(t, err)
	st := ParseTestpmd(out)
	assert.Equal(t, []float64{0, 2109779}, st.TxPPS)
	assert.Equal(t, []float64{0, 0}, st.RxPPS)
	require.True(t, st.HaveFwd)
	assert.Equal(t, uint64(0), st.FwdRx)
	assert.Equal(t, uint64(14183616), st.FwdTx)
	assert.Equal(t, uint64(56009504), st.FwdTxDropped)
}

func TestParseTestpmdMacswap(t *testing.T) {
	out, err := os.ReadFile("testdata/testpmd_macswap_virtio_user.txt")
	require.NoError(t, err)
	st := ParseTestpmd(out)
	assert.Equal(t, []float64{0, 4102781, 1729184}, st.RxPPS)
	assert.Equal(t, []float64{0, 4102765, 1729200}, st.TxPPS)
	require.True(t, st.HaveFwd)
	assert.Equal(t, uint64(12774304), st.FwdRx)
	assert.Equal(t, uint64(0), st.FwdRxDropped)
	assert.Equal(t, uint64(12774336), st.FwdTx)
}

func TestParseTestpmdWithoutFinalStats(t *testing.T) {
	st := ParseTestpmd([]byte("EAL: Detected CPU lcores: 2\n  Rx-pps:   12   Rx-bps: 0\n"))
	assert.False(t, st.HaveFwd, "a transcript cut before the final statistics has none")
	assert.Equal(t, []float64{12}, st.RxPPS)
	assert.Empty(t, st.TxPPS)
}

func TestSteadyRate(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []float64
		want float64
	}{
		{"no samples", nil, 0},
		{"link never came up", []float64{0, 0, 0}, 0},
		{"one traffic period is all there is", []float64{0, 5}, 5},
		{"two traffic periods: median of both", []float64{0, 4, 6}, 5},
		{"first traffic period is partial and dropped", []float64{0, 1, 10, 12, 11}, 11},
		{"leading zeros dropped", []float64{0, 0, 0, 2, 8, 9, 10}, 9},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, SteadyRate(tc.in))
		})
	}
}

func TestTestpmdArgvQueues(t *testing.T) {
	a := TestpmdArgs{CPU: 0, FilePrefix: "fp", Vdev: "net_vhost0,iface=/s,queues=2", Forward: "io", Queues: 2}
	argv := a.Argv()
	assert.Equal(t, []string{"--rxq=2", "--txq=2"}, argv[len(argv)-2:], "both queue counts follow the vdev's")
	a.Queues = 1
	assert.NotContains(t, a.Argv(), "--rxq=1", "one queue is testpmd's default")
}

func TestTestpmdArgv(t *testing.T) {
	a := TestpmdArgs{CPU: 1, FilePrefix: "fp", Vdev: "net_vhost0,iface=/s,queues=1", Forward: "macswap", TxFirst: true}
	assert.Equal(t, []string{
		"--lcores", "0@1,1@1", "--no-pci", "--no-huge", "-m", "256", "--file-prefix=fp",
		"--vdev", "net_vhost0,iface=/s,queues=1", "--",
		"--nb-cores=1", "--no-mlockall", "--total-num-mbufs=16384", "--forward-mode=macswap",
		"--stats-period", "1", "--tx-first",
	}, a.Argv())
}

func TestTestpmdArgvBurst(t *testing.T) {
	a := TestpmdArgs{CPU: 1, FilePrefix: "fp", Vdev: "v", Forward: "macswap", TxFirst: true, Burst: 64}
	argv := a.Argv()
	assert.Equal(t, []string{"--tx-first", "--burst=64"}, argv[len(argv)-2:])
	a.Burst = 0
	for _, arg := range a.Argv() {
		assert.NotContains(t, arg, "--burst", "0 leaves testpmd's default")
	}
}

// The peers suite's runs: txonly and one loopback per frame count for each
// queue-pair count on split rings, then the same for one pair on packed
// rings. Names keep the default loopback's (32 frames) as before the
// option, so results compare across runs.
func TestPeerScenarios(t *testing.T) {
	for _, tc := range []struct {
		name   string
		qps    []int
		frames []int
		want   []string
	}{
		{"default", []int{1, 2}, []int{32}, []string{
			"txonly/1", "macswap loopback/1", "txonly/2", "macswap loopback/2",
			"txonly packed/1", "macswap loopback packed/1",
		}},
		{"frame sweep", []int{1}, []int{16, 32, 128}, []string{
			"txonly/1", "macswap loopback 16 frames/1", "macswap loopback/1", "macswap loopback 128 frames/1",
			"txonly packed/1", "macswap loopback 16 frames packed/1", "macswap loopback packed/1", "macswap loopback 128 frames packed/1",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, sc := range peerScenarios(tc.qps, tc.frames) {
				got = append(got, fmt.Sprintf("%s/%d", sc.mode(), sc.queues))
				if !sc.loopback {
					assert.Zero(t, sc.frames, "txonly keeps no frames in circulation")
				}
			}
			assert.Equal(t, tc.want, got)
		})
	}
}

// ringtest's main.c option names: --host-affinity, --guest-affinity,
// --ring-size, --batch, --run-cycles.
func TestRingtestArgv(t *testing.T) {
	a := RingtestArgs{HostCPU: 0, GuestCPU: 1, RingSize: 256, Batch: 32, RunCycles: 1000000}
	assert.Equal(t, []string{
		"--host-affinity", "0", "--guest-affinity", "1", "--ring-size", "256",
		"--batch", "32", "--run-cycles", "1000000",
	}, a.Argv())
}

func TestFindLinuxSource(t *testing.T) {
	dir := t.TempDir()
	assert.Empty(t, findLinuxSource(dir), "empty cache")
	small := filepath.Join(dir, "linux-source-6.12_6.12.1-1_all.deb")
	require.NoError(t, os.WriteFile(small, []byte("partial"), 0o644))
	assert.Empty(t, findLinuxSource(dir), "a truncated download is not a package")

	sub := filepath.Join(dir, "bench-dl")
	require.NoError(t, os.MkdirAll(sub, 0o755))
	deb := filepath.Join(sub, "linux-source-6.12_6.12.95-1~bpo12+1_all.deb")
	f, err := os.Create(deb)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(2<<20))
	require.NoError(t, f.Close())
	assert.Equal(t, deb, findLinuxSource(dir))
}

func TestAptConfigIsPrivate(t *testing.T) {
	c := aptConfig("/cache/bench-apt")
	for _, key := range []string{"Dir::Etc::SourceList", "Dir::Etc::SourceParts", "Dir::State", "Dir::State::Lists", "Dir::State::status", "Dir::Cache", "Dir::Cache::Archives"} {
		assert.Contains(t, c, key+` "/cache/bench-apt/`, key)
	}
	assert.NotContains(t, c, "/var/lib", "the system's apt and dpkg state is never used")
	assert.NotContains(t, c, "/etc/apt", "the system's sources are never read")
}

func TestParseCPUModel(t *testing.T) {
	in := "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
	assert.Equal(t, "AMD EPYC 7B13", parseCPUModel([]byte(in)))
	assert.Equal(t, "unknown", parseCPUModel([]byte("processor : 0\n")))
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
	}{
		{"4096", 4096}, {"64KiB", 64 << 10}, {"1GiB", 1 << 30}, {"1TiB", 1 << 40}, {"16g", 16 << 30}, {"256 MiB", 256 << 20},
	} {
		got, err := parseSize(tc.in)
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
	}
	for _, bad := range []string{"", "GiB", "1PiB", "0", "-1GiB", "99999999999TiB"} {
		_, err := parseSize(bad)
		assert.Error(t, err, bad)
	}
}

func TestFormatSize(t *testing.T) {
	assert.Equal(t, "1TiB", formatSize(1<<40))
	assert.Equal(t, "256MiB", formatSize(256<<20))
	assert.Equal(t, "1536MiB", formatSize(1536<<20))
	assert.Equal(t, "1000B", formatSize(1000))
}

func TestFormatValue(t *testing.T) {
	for in, want := range map[float64]string{
		0: "0", 1234.5: "1234", 42.25: "42.2", 7.012: "7.01", 0.0023: "0.0023", -3.5: "-3.50", 2: "2", 64: "64",
	} {
		assert.Equal(t, want, formatValue(in), "%v", in)
	}
	assert.Equal(t, "NaN", formatValue(math.NaN()))
}

func sampleResults() []Result {
	return []Result{
		{Suite: "rings", Name: "device pop+push, 1-desc, batch 8, same goroutine",
			Params:  map[string]any{"kind": "device, same goroutine", "descs": 1, "batch": 8},
			Metrics: []Metric{{Name: "ns_per_chain", Value: 12.34, Unit: "ns/chain"}, {Name: "mpps", Value: 81.04, Unit: "Mpps"}}},
		{Suite: "rings", Name: "device pop+push, 1-desc, batch 32, same goroutine",
			Params:  map[string]any{"kind": "device, same goroutine", "descs": 1, "batch": 32},
			Metrics: []Metric{{Name: "ns_per_chain", Value: 10, Unit: "ns/chain"}, {Name: "mpps", Value: 100, Unit: "Mpps"}}},
		{Suite: "peers", Name: "ratio vdpakit / kernel", Metrics: []Metric{{Name: "ratio", Value: 1.5, Unit: "x"}}, Note: "same cores"},
		{Suite: "peers", Name: "testpmd | odd", Skipped: true, Reason: "dpdk-testpmd not installed"},
		{Suite: "migrate", Name: "pre-copy", Metrics: []Metric{{Name: "downtime", Value: 3.2, Unit: "ms"}, {Name: "rounds", Value: 2, Unit: ""}}},
	}
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, WriteTable(&b, sampleResults()))
	want := `SUITE    CASE                                               RESULT
-------  -------------------------------------------------  ------
rings    device pop+push, 1-desc, batch 8, same goroutine   12.3 ns/chain, 81.0 Mpps
rings    device pop+push, 1-desc, batch 32, same goroutine  10 ns/chain, 100 Mpps

peers    ratio vdpakit / kernel                             1.50x  (same cores)
peers    testpmd | odd                                      skipped: dpdk-testpmd not installed

migrate  pre-copy                                           downtime 3.20 ms, rounds 2
`
	assert.Equal(t, want, b.String())
}

func TestWriteMarkdownEscapesPipes(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, WriteMarkdown(&b, sampleResults()))
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	require.Len(t, lines, 2+5)
	assert.Equal(t, "| suite | case | result |", lines[0])
	assert.Equal(t, `| peers | testpmd \| odd | skipped: dpdk-testpmd not installed |`, lines[5])
}

func TestReportJSONShape(t *testing.T) {
	rep := &Report{Schema: reportSchema, Tool: "vdpakit bench", Command: "bench all -short",
		Started: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Finished: time.Date(2026, 1, 2, 3, 5, 5, 0, time.UTC),
		Machine: Machine{CPUModel: "cpu", Cores: 2, Kernel: "Linux 6.1", GoVersion: "go1.26"},
		Config:  Config{Suites: []string{"rings"}, Duration: "40ms", Short: true},
		Results: sampleResults()}
	var b bytes.Buffer
	require.NoError(t, rep.WriteJSON(&b))
	var doc map[string]any
	require.NoError(t, json.Unmarshal(b.Bytes(), &doc))
	assert.EqualValues(t, 1, doc["schema"])
	m := doc["machine"].(map[string]any)
	for _, k := range []string{"cpu_model", "cores", "kernel", "go_version"} {
		assert.Contains(t, m, k)
	}
	cfg := doc["config"].(map[string]any)
	assert.Equal(t, "40ms", cfg["duration"])
	assert.NotContains(t, cfg, "JSONPath", "output paths are not part of the recorded configuration")
	rs := doc["results"].([]any)
	require.Len(t, rs, 5)
	r0 := rs[0].(map[string]any)
	assert.Equal(t, "rings", r0["suite"])
	assert.EqualValues(t, 8, r0["params"].(map[string]any)["batch"])
	met := r0["metrics"].([]any)[1].(map[string]any)
	assert.Equal(t, map[string]any{"name": "mpps", "value": 81.04, "unit": "Mpps"}, met)
	assert.NotContains(t, r0, "skipped", "a measured result carries no skip flag")
	r3 := rs[3].(map[string]any)
	assert.Equal(t, true, r3["skipped"])
	assert.Equal(t, "dpdk-testpmd not installed", r3["reason"])
	assert.NotContains(t, r3, "metrics", "a skipped result carries no number")
}

func TestParseArgs(t *testing.T) {
	cfg, err := parseArgs([]string{"all", "-short", "-json", "/tmp/x.json"}, io.Discard)
	require.NoError(t, err)
	assert.Equal(t, []string{"rings", "dirty", "migrate", "peers", "scale"}, cfg.Suites)
	assert.True(t, cfg.Short)
	assert.Equal(t, "/tmp/x.json", cfg.JSONPath)
	assert.Equal(t, 40*time.Millisecond, cfg.duration, "-short shortens the default duration")
	assert.Equal(t, 1, cfg.PeerRounds)

	cfg, err = parseArgs([]string{"-duration", "1s", "peers", "-peers", "ringtest", "rings", "-short"}, io.Discard)
	require.NoError(t, err)
	assert.Equal(t, []string{"peers", "rings"}, cfg.Suites, "flags and subcommands in any order")
	assert.Equal(t, time.Second, cfg.duration, "an explicit -duration wins over -short")
	assert.Equal(t, []string{"ringtest"}, cfg.Peers)

	cfg, err = parseArgs(nil, io.Discard)
	require.NoError(t, err)
	assert.Equal(t, []string{"rings", "dirty", "migrate", "peers", "scale"}, cfg.Suites, "no subcommand means all")
	assert.Equal(t, []uint64{1 << 30, 16 << 30, 256 << 30, 1 << 40}, cfg.scanSizes)
	assert.Equal(t, []int{1, 8, 32}, cfg.Batches)
	assert.Equal(t, 5, cfg.PeerRounds, "at least 5 interleaved rounds by default")
	assert.Equal(t, []int{1, 2}, cfg.QueuePairs)
	assert.Equal(t, []int{32}, cfg.LoopbackFrames, "testpmd's default burst")
	assert.Equal(t, []int{1, 64, 1024, 4096}, cfg.scaleDevices)
	assert.Equal(t, []int{1, 64, 512, 2048}, cfg.scaleSessions)
	assert.Equal(t, 256, cfg.ScaleRxSlots)

	cfg, err = parseArgs([]string{"peers", "-peers", ""}, io.Discard)
	require.NoError(t, err)
	assert.Empty(t, cfg.Peers)

	cfg, err = parseArgs([]string{"peers", "-loopback-frames", "16,64,256"}, io.Discard)
	require.NoError(t, err)
	assert.Equal(t, []int{16, 64, 256}, cfg.LoopbackFrames)

	for _, bad := range [][]string{
		{"bogus"}, {"-ring-size", "300"}, {"-batches", "0"}, {"-batches", "512"}, {"-peers", "qemu"},
		{"-scan-sizes", "1XB"}, {"-dirty-rates", "-5"}, {"-duration", "0s"}, {"-peer-rounds", "0"},
		{"-queue-pairs", "0"}, {"-queue-pairs", "9"}, {"-loopback-frames", "0"}, {"-loopback-frames", "257"}, {"-loopback-frames", "x"}, {"-loopback-frames", "32,64,32"},
		{"-scale-devices", "0"}, {"-scale-sessions", "40000"}, {"-scale-pairs", "x"}, {"-scale-rx-buffers", "0"},
	} {
		_, err := parseArgs(bad, io.Discard)
		assert.Error(t, err, "%q", bad)
	}
}

func TestBuildCharts(t *testing.T) {
	rs := append(sampleResults(),
		Result{Suite: "dirty", Name: "h", Params: map[string]any{"guest_bytes": uint64(1 << 40), "dirty_fraction": 0.01}, Metrics: []Metric{{Name: "ms", Value: 2.5, Unit: "ms/scan"}}},
		Result{Suite: "dirty", Name: "h", Params: map[string]any{"guest_bytes": float64(1 << 30), "dirty_fraction": 0.01}, Metrics: []Metric{{Name: "ms", Value: 0.01, Unit: "ms/scan"}}},
		Result{Suite: "migrate", Name: "m", Params: map[string]any{"dirty_rate_mibs": 64.0, "mode": "relay", "guest_size": "1GiB"}, Metrics: []Metric{{Name: "downtime", Value: 4, Unit: "ms"}}},
		Result{Suite: "rings", Name: "skipped", Skipped: true, Params: map[string]any{"kind": "x", "descs": 1, "batch": 1}},
	)
	charts := buildCharts(rs)
	require.Len(t, charts, 3)
	thr := charts[0]
	assert.Equal(t, []string{"device, same goroutine, 1-desc"}, thr.order, "skipped results are not plotted")
	pts := thr.series["device, same goroutine, 1-desc"]
	require.Len(t, pts, 2)
	assert.Equal(t, [2]float64{8, 81.04}, [2]float64{pts[0].X, pts[0].Y})
	scan := charts[1].series["1% dirty"]
	require.Len(t, scan, 2)
	assert.Equal(t, 1024.0, scan[0].X, "guest size in GiB")
	down := charts[2].series["relay, 1GiB guest"]
	require.Len(t, down, 1)
	assert.Equal(t, [2]float64{64, 4}, [2]float64{down[0].X, down[0].Y})
}

func TestWritePlotsDrawsFiles(t *testing.T) {
	dir := t.TempDir()
	files, err := WritePlots(dir, sampleResults())
	require.NoError(t, err)
	require.Equal(t, []string{filepath.Join(dir, "ring_throughput_vs_batch.svg"), filepath.Join(dir, "ring_throughput_vs_batch.png")}, files)
	png, err := os.ReadFile(files[1])
	require.NoError(t, err)
	assert.True(t, bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")), "a PNG file")
	svg, err := os.ReadFile(files[0])
	require.NoError(t, err)
	assert.Contains(t, string(svg), "<svg")
}

func TestDirtyPattern(t *testing.T) {
	const pages = 64*1000 + 10 // a partial last word
	size := (pages + 63) / 64 * 8
	for _, frac := range []float64{0, 0.01, 0.5} {
		p := dirtyPattern(size, pages, frac)
		require.Len(t, p, size)
		var n int
		for _, c := range p {
			for ; c != 0; c &= c - 1 {
				n++
			}
		}
		got := float64(n) / pages
		assert.InDelta(t, frac, got, 0.01+frac*0.05, "fraction %v", frac)
		for pg := pages; pg < size*8; pg++ {
			require.Zero(t, p[pg/8]&(1<<(pg%8)), "bit past the last page set")
		}
	}
}

func TestMedianAndRatio(t *testing.T) {
	assert.Equal(t, 2.0, median([]float64{3, 1, 2}))
	assert.Equal(t, 2.5, median([]float64{4, 1, 2, 3}))
	assert.True(t, math.IsNaN(median(nil)))
	assert.True(t, math.IsNaN(ratio(1, 0)))
	assert.Equal(t, 0.5, ratio(1, 2))
}

func TestNextN(t *testing.T) {
	assert.Equal(t, 120, nextN(10, time.Millisecond, 10*time.Millisecond), "linear prediction plus 20%")
	assert.Equal(t, 1000, nextN(10, time.Nanosecond, time.Second), "at most 100x per step")
	assert.Equal(t, 11, nextN(10, time.Second, time.Millisecond), "always grows")
}

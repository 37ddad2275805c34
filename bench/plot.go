package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// chart is one figure: named series of (x, y) points.
type chart struct {
	file           string // base name without extension
	title          string
	xLabel, yLabel string
	logX, logY     bool
	dataTicksX     bool // label the x axis at the data's x values
	series         map[string]plotter.XYs
	order          []string
}

func (c *chart) add(series string, x, y float64) {
	if c.series == nil {
		c.series = map[string]plotter.XYs{}
	}
	if _, ok := c.series[series]; !ok {
		c.order = append(c.order, series)
	}
	c.series[series] = append(c.series[series], plotter.XY{X: x, Y: y})
}

// num converts a parameter value (an int, uint64 or float64 in memory, a
// float64 after a JSON round trip) to float64.
func num(v any) (float64, bool) {
	switch x := v.(type) {
	case int:
		return float64(x), true
	case int64:
		return float64(x), true
	case uint64:
		return float64(x), true
	case float64:
		return x, true
	}
	return 0, false
}

// buildCharts picks the plotted series out of the results: ring
// throughput against batch size, harvest time against guest size, and
// migration downtime against dirty rate.
func buildCharts(results []Result) []*chart {
	thr := &chart{file: "ring_throughput_vs_batch", title: "vdpakit split ring: throughput vs batch size",
		xLabel: "batch size (chains per publish)", yLabel: "Mpps (million chains/s)", logX: true, dataTicksX: true}
	scan := &chart{file: "harvest_time_vs_guest_size", title: "dirty bitmap harvest: scan time vs guest size",
		xLabel: "guest size (GiB, 4 KiB pages)", yLabel: "ms per harvest", logX: true, logY: true, dataTicksX: true}
	down := &chart{file: "downtime_vs_dirty_rate", title: "pre-copy migration: downtime vs guest dirty rate",
		xLabel: "guest dirty rate (MiB/s)", yLabel: "downtime (ms)"}
	for _, r := range results {
		if r.Skipped {
			continue
		}
		switch r.Suite {
		case "rings":
			kind, _ := r.Params["kind"].(string)
			b, ok1 := num(r.Params["batch"])
			d, ok2 := num(r.Params["descs"])
			m, ok3 := r.Metric("mpps")
			if kind != "" && ok1 && ok2 && ok3 {
				thr.add(fmt.Sprintf("%s, %s", kind, chainLabel(int(d))), b, m.Value)
			}
		case "dirty":
			g, ok1 := num(r.Params["guest_bytes"])
			f, ok2 := num(r.Params["dirty_fraction"])
			m, ok3 := r.Metric("ms")
			if ok1 && ok2 && ok3 && m.Value > 0 {
				scan.add(fracLabel(f), g/(1<<30), m.Value)
			}
		case "migrate":
			rate, ok1 := num(r.Params["dirty_rate_mibs"])
			mode, _ := r.Params["mode"].(string)
			size, _ := r.Params["guest_size"].(string)
			m, ok2 := r.Metric("downtime")
			if ok1 && ok2 && mode != "" {
				down.add(fmt.Sprintf("%s, %s guest", mode, size), rate, m.Value)
			}
		}
	}
	var out []*chart
	for _, c := range []*chart{thr, scan, down} {
		if len(c.series) > 0 {
			out = append(out, c)
		}
	}
	return out
}

// render draws c into a gonum plot.
func (c *chart) render() (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = c.title
	p.X.Label.Text = c.xLabel
	p.Y.Label.Text = c.yLabel
	p.Add(plotter.NewGrid())
	if c.logX {
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	p.Legend.Top = true
	p.Legend.Left = true
	var args []any
	xs := map[float64]bool{}
	var maxY, minY float64
	first := true
	for _, name := range c.order {
		pts := c.series[name]
		sort.Slice(pts, func(i, j int) bool { return pts[i].X < pts[j].X })
		args = append(args, name, pts)
		for _, pt := range pts {
			xs[pt.X] = true
			if first || pt.Y > maxY {
				maxY = pt.Y
			}
			if first || pt.Y < minY {
				minY = pt.Y
			}
			first = false
		}
	}
	if err := plotutil.AddLinePoints(p, args...); err != nil {
		return nil, err
	}
	// Leave the top of the plot to the legend: about 1.2 lines per series.
	room := 1 + 0.09*float64(len(c.order))
	if c.logY {
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		if minY > 0 {
			p.Y.Min = minY / 2
			p.Y.Max = maxY * math.Pow(maxY/minY*2, room-1) * 1.5
		}
	} else {
		p.Y.Min = 0
		p.Y.Max = maxY * (room + 0.1)
	}
	if c.dataTicksX {
		var ticks []plot.Tick
		for x := range xs {
			ticks = append(ticks, plot.Tick{Value: x, Label: strconv.FormatFloat(x, 'g', -1, 64)})
		}
		sort.Slice(ticks, func(i, j int) bool { return ticks[i].Value < ticks[j].Value })
		p.X.Tick.Marker = plot.ConstantTicks(ticks)
		if len(ticks) > 0 && c.logX {
			p.X.Min = ticks[0].Value / 1.3
			p.X.Max = ticks[len(ticks)-1].Value * 1.3
		}
	}
	return p, nil
}

// WritePlots draws every chart the results support into dir as SVG and PNG
// and returns the files written.
func WritePlots(dir string, results []Result) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var files []string
	for _, c := range buildCharts(results) {
		p, err := c.render()
		if err != nil {
			return files, fmt.Errorf("%s: %w", c.file, err)
		}
		for _, ext := range []string{".svg", ".png"} {
			f := filepath.Join(dir, c.file+ext)
			if err := p.Save(20*vg.Centimeter, 12*vg.Centimeter, f); err != nil {
				return files, fmt.Errorf("%s: %w", f, err)
			}
			files = append(files, f)
		}
	}
	if rp := peerRatios(results); rp.Len() > 0 {
		p, err := renderRatios(rp)
		if err != nil {
			return files, fmt.Errorf("peer_ratios: %w", err)
		}
		for _, ext := range []string{".svg", ".png"} {
			f := filepath.Join(dir, "peer_ratios"+ext)
			if err := p.Save(20*vg.Centimeter, 12*vg.Centimeter, f); err != nil {
				return files, fmt.Errorf("%s: %w", f, err)
			}
			files = append(files, f)
		}
		// The numbers on the x axis name the comparisons in this list.
		var legend strings.Builder
		for i, n := range rp.names {
			fmt.Fprintf(&legend, "%d. %s: %sx [%s–%s]\n", i+1, n, formatValue(rp.med[i]), formatValue(rp.lo[i]), formatValue(rp.hi[i]))
		}
		f := filepath.Join(dir, "peer_ratios.txt")
		if err := os.WriteFile(f, []byte(legend.String()), 0o644); err != nil {
			return files, err
		}
		files = append(files, f)
	}
	return files, nil
}

// ratioPoints are the per-round ratios of the peer comparisons, one point
// per comparison at x = 1, 2, ...: the median with the min–max range as an
// error bar.
type ratioPoints struct {
	names        []string
	med, lo, hi  []float64
	inconclusive []bool
}

func (r *ratioPoints) Len() int                    { return len(r.med) }
func (r *ratioPoints) XY(i int) (float64, float64) { return float64(i + 1), r.med[i] }
func (r *ratioPoints) YError(i int) (float64, float64) {
	return r.med[i] - r.lo[i], r.hi[i] - r.med[i]
}

// peerRatios collects the ratio results of the peers suite.
func peerRatios(results []Result) *ratioPoints {
	rp := &ratioPoints{}
	for _, r := range results {
		if r.Skipped || r.Suite != "peers" {
			continue
		}
		m, ok := r.Metric("ratio")
		if !ok || m.N == 0 || math.IsNaN(m.Value) {
			continue
		}
		inc, _ := r.Params["inconclusive"].(bool)
		rp.names = append(rp.names, r.Name)
		rp.med = append(rp.med, m.Value)
		rp.lo = append(rp.lo, m.Min)
		rp.hi = append(rp.hi, m.Max)
		rp.inconclusive = append(rp.inconclusive, inc)
	}
	return rp
}

// renderRatios draws the peer comparisons: each ratio's median and the
// range of its rounds, a line at 1.0 (parity), and the comparisons listed
// below the x axis by number (inconclusive ones marked "?").
func renderRatios(rp *ratioPoints) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "vdpakit / peer, per interleaved round: median and min–max"
	p.Y.Label.Text = "ratio (x)"
	p.X.Label.Text = "comparison (? = inconclusive)"
	p.Add(plotter.NewGrid())
	sc, err := plotter.NewScatter(rp)
	if err != nil {
		return nil, err
	}
	eb, err := plotter.NewYErrorBars(rp)
	if err != nil {
		return nil, err
	}
	parity, err := plotter.NewLine(plotter.XYs{{X: 0.5, Y: 1}, {X: float64(rp.Len()) + 0.5, Y: 1}})
	if err != nil {
		return nil, err
	}
	parity.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(parity, eb, sc)
	var ticks []plot.Tick
	maxY := 1.0
	for i := range rp.med {
		l := strconv.Itoa(i + 1)
		if rp.inconclusive[i] {
			l += "?"
		}
		ticks = append(ticks, plot.Tick{Value: float64(i + 1), Label: l})
		maxY = math.Max(maxY, rp.hi[i])
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	p.X.Min, p.X.Max = 0.5, float64(rp.Len())+0.5
	p.Y.Min, p.Y.Max = 0, maxY*1.1
	return p, nil
}

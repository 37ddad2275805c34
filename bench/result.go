package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Metric is one measured quantity of a result, with its unit
// ("ns/chain", "Mpps", "GB/s", "ms", "x" for ratios, ...).
//
// A metric taken over several rounds has N > 1: Value is then the median
// of the rounds and Min and Max their range.
type Metric struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
	N     int     `json:"rounds,omitempty"`
	Min   float64 `json:"min,omitempty"`
	Max   float64 `json:"max,omitempty"`
}

// Result is one measurement: which suite and case it belongs to, the
// parameters it ran with, and what was measured. A skipped measurement has
// Skipped set, a Reason, and no metrics: a number is never invented.
type Result struct {
	Suite   string         `json:"suite"`
	Name    string         `json:"name"`
	Params  map[string]any `json:"params,omitempty"`
	Metrics []Metric       `json:"metrics,omitempty"`
	Skipped bool           `json:"skipped,omitempty"`
	Reason  string         `json:"reason,omitempty"`
	Note    string         `json:"note,omitempty"`
}

// Metric returns the named metric and whether it exists.
func (r Result) Metric(name string) (Metric, bool) {
	for _, m := range r.Metrics {
		if m.Name == name {
			return m, true
		}
	}
	return Metric{}, false
}

// Machine describes where a run happened.
type Machine struct {
	CPUModel  string `json:"cpu_model"`
	Cores     int    `json:"cores"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"go_version"`
	GOOS      string `json:"goos"`
	GOARCH    string `json:"goarch"`
	Hostname  string `json:"hostname,omitempty"`
	MemTotal  string `json:"mem_total,omitempty"`
	LoadAvg   string `json:"load_avg_at_start,omitempty"`
}

// Report is the whole JSON document -json writes.
type Report struct {
	Schema   int       `json:"schema"`
	Tool     string    `json:"tool"`
	Command  string    `json:"command"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
	Machine  Machine   `json:"machine"`
	// LoadAvgEnd is /proc/loadavg when the run finished: with the start
	// value in Machine it tells how busy the machine was.
	LoadAvgEnd string   `json:"load_avg_at_end,omitempty"`
	Config     Config   `json:"config"`
	Results    []Result `json:"results"`
}

// reportSchema is bumped when the JSON shape changes incompatibly.
const reportSchema = 1

// DescribeMachine reads the CPU model, core count, kernel release and Go
// version of the running machine.
func DescribeMachine() Machine {
	m := Machine{
		Cores:     runtime.NumCPU(),
		GoVersion: runtime.Version(),
		GOOS:      runtime.GOOS,
		GOARCH:    runtime.GOARCH,
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		m.CPUModel = parseCPUModel(b)
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		m.MemTotal = parseMemTotal(b)
	}
	m.LoadAvg = loadAvg()
	var u unix.Utsname
	if err := unix.Uname(&u); err == nil {
		m.Kernel = strings.TrimSpace(unix.ByteSliceToString(u.Sysname[:]) + " " +
			unix.ByteSliceToString(u.Release[:]) + " " + unix.ByteSliceToString(u.Version[:]))
	}
	if h, err := os.Hostname(); err == nil {
		m.Hostname = h
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.GoVersion != "" {
		m.GoVersion = bi.GoVersion
	}
	return m
}

// loadAvg returns the 1, 5 and 15 minute load averages.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// parseCPUModel returns the first "model name" of a /proc/cpuinfo text.
func parseCPUModel(cpuinfo []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(cpuinfo))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func parseMemTotal(meminfo []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(meminfo))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && k == "MemTotal" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteJSONFile writes the report to path.
func (r *Report) WriteJSONFile(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("bench: json: %w", err)
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("bench: json: %w", err)
	}
	if err := r.WriteJSON(f); err != nil {
		f.Close()
		return fmt.Errorf("bench: json: %w", err)
	}
	return f.Close()
}

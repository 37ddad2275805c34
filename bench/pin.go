package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strings"
)

// startPinned starts cmd with every thread it will ever have confined to
// cpu: the child is forked from a thread whose CPU mask is {cpu} and
// inherits it, so its first instruction already runs there and every thread
// it creates (DPDK's control threads, the Go runtime's threads) inherits the
// mask too. Both back-ends and the front-end of the DPDK comparison are
// started this way, so they are pinned identically whatever each program
// does with its own affinity afterwards (testpmd's --lcores only narrows it).
func startPinned(cmd *exec.Cmd, cpu int) error {
	unpin, err := pinThread(cpu)
	if err != nil {
		return err
	}
	defer unpin()
	return cmd.Start()
}

// cpusAllowed returns the Cpus_allowed_list of every thread of process pid
// (task id -> list), to check and print where a peer's threads may run.
func cpusAllowed(pid int) (map[string]string, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, e := range ents {
		b, err := os.ReadFile(dir + "/" + e.Name() + "/status")
		if err != nil {
			continue // the thread exited
		}
		if v := statusField(b, "Cpus_allowed_list"); v != "" {
			out[e.Name()] = v
		}
	}
	return out, nil
}

// statusField returns a field of a /proc/.../status text.
func statusField(status []byte, name string) string {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && k == name {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// pinSummary describes the CPU masks of a process's threads in one phrase:
// "all 7 threads on CPU 0", or the distinct masks when they differ.
func pinSummary(masks map[string]string) string {
	if len(masks) == 0 {
		return "no threads seen"
	}
	count := map[string]int{}
	for _, m := range masks {
		count[m]++
	}
	if len(count) == 1 {
		for m := range count {
			return fmt.Sprintf("all %d threads on CPU %s", len(masks), m)
		}
	}
	var parts []string
	for m, n := range count {
		parts = append(parts, fmt.Sprintf("%d on CPU %s", n, m))
	}
	sort.Strings(parts)
	return "threads " + strings.Join(parts, ", ")
}

// startSuiteProfile starts a CPU profile of this process into
// dir/suite.pprof and returns the function that stops it; with no dir it
// does nothing.
func startSuiteProfile(dir, suite string) (stop func(), err error) {
	if dir == "" {
		return func() {}, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.Create(filepath.Join(dir, suite+".pprof"))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}

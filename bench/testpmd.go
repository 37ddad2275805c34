package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// TestpmdStats is what the harness reads from dpdk-testpmd's output: the
// per-period throughput lines of --stats-period ("Rx-pps:", "Tx-pps:") and
// the accumulated forward statistics printed when it stops.
type TestpmdStats struct {
	RxPPS []float64
	TxPPS []float64
	// Accumulated forward statistics for all ports (zero if not printed).
	FwdRx, FwdRxDropped, FwdTx, FwdTxDropped uint64
	HaveFwd                                  bool
}

var (
	rePPS    = regexp.MustCompile(`(Rx|Tx)-pps:\s+(\d+)`)
	reFwdRow = regexp.MustCompile(`(RX|TX)-packets:\s+(\d+)\s+(?:RX|TX)-dropped:\s+(\d+)`)
)

// ParseTestpmd extracts throughput samples and forward statistics from
// testpmd's output.
func ParseTestpmd(out []byte) TestpmdStats {
	var st TestpmdStats
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	inAccum := false
	for sc.Scan() {
		line := sc.Text()
		for _, m := range rePPS.FindAllStringSubmatch(line, -1) {
			v, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				continue
			}
			if m[1] == "Rx" {
				st.RxPPS = append(st.RxPPS, v)
			} else {
				st.TxPPS = append(st.TxPPS, v)
			}
		}
		if strings.Contains(line, "Accumulated forward statistics") {
			inAccum = true
			continue
		}
		if inAccum {
			if m := reFwdRow.FindStringSubmatch(line); m != nil {
				n, _ := strconv.ParseUint(m[2], 10, 64)
				d, _ := strconv.ParseUint(m[3], 10, 64)
				if m[1] == "RX" {
					st.FwdRx, st.FwdRxDropped = n, d
				} else {
					st.FwdTx, st.FwdTxDropped = n, d
					inAccum = false
				}
				st.HaveFwd = true
			}
		}
	}
	return st
}

// SteadyRate returns the median of the per-period samples after traffic
// started: leading zeros (link not up yet) and the first non-zero sample
// (a partial period) are dropped; so is a trailing partial period. It
// returns 0 when no traffic was seen.
func SteadyRate(samples []float64) float64 {
	i := 0
	for i < len(samples) && samples[i] == 0 {
		i++
	}
	s := samples[i:]
	if len(s) == 0 {
		return 0
	}
	if len(s) >= 3 {
		s = s[1:]
	}
	return median(s)
}

// testpmdProc is one running dpdk-testpmd.
type testpmdProc struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	out    bytes.Buffer
	prefix string
	done   chan error
}

func (p *testpmdProc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

func (p *testpmdProc) output() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]byte(nil), p.out.Bytes()...)
}

// TestpmdArgs are the options of one testpmd instance: the invocation that
// works without hugepages on these machines.
type TestpmdArgs struct {
	CPU        int    // both lcores (main and forwarding), and every other thread, on this CPU
	FilePrefix string // distinct per instance
	Vdev       string
	Forward    string // txonly, rxonly, io, macswap
	TxFirst    bool
	Queues     int // receive and transmit queues per port; 0 means 1
	// Burst is testpmd's --burst: the most frames a forwarding loop
	// receives or sends at a time, and with TxFirst the frames sent first,
	// which a loopback then keeps in circulation. 0 leaves testpmd's
	// default (32).
	Burst int
}

// Argv renders the EAL and application arguments.
func (a TestpmdArgs) Argv() []string {
	argv := []string{
		"--lcores", fmt.Sprintf("0@%d,1@%d", a.CPU, a.CPU),
		"--no-pci", "--no-huge", "-m", "256",
		"--file-prefix=" + a.FilePrefix,
		"--vdev", a.Vdev,
		"--",
		"--nb-cores=1", "--no-mlockall", "--total-num-mbufs=16384",
		"--forward-mode=" + a.Forward,
		"--stats-period", "1",
	}
	if a.TxFirst {
		argv = append(argv, "--tx-first")
	}
	if a.Burst > 0 {
		argv = append(argv, fmt.Sprintf("--burst=%d", a.Burst))
	}
	if a.Queues > 1 {
		argv = append(argv, fmt.Sprintf("--rxq=%d", a.Queues), fmt.Sprintf("--txq=%d", a.Queues))
	}
	return argv
}

func startTestpmd(bin string, a TestpmdArgs) (*testpmdProc, error) {
	p := &testpmdProc{prefix: a.FilePrefix, done: make(chan error, 1)}
	p.cmd = exec.Command(bin, a.Argv()...)
	p.cmd.Stdout = p
	p.cmd.Stderr = p
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := startPinned(p.cmd, a.CPU); err != nil {
		return nil, err
	}
	go func() { p.done <- p.cmd.Wait() }()
	return p, nil
}

// exited reports whether the process ended, and how.
func (p *testpmdProc) exited() (bool, error) {
	select {
	case err := <-p.done:
		p.done <- err
		return true, err
	default:
		return false, nil
	}
}

// stop interrupts testpmd (it prints its final statistics on SIGINT), waits
// for it, kills it if it hangs, and removes its runtime directory.
func (p *testpmdProc) stop(grace time.Duration) []byte {
	if ok, _ := p.exited(); !ok {
		p.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-p.done:
		case <-time.After(grace):
			p.cmd.Process.Kill()
			<-p.done
		}
	}
	os.RemoveAll(filepath.Join("/var/run/dpdk", p.prefix))
	return p.output()
}

// waitForSocket waits until path exists as a socket, the process dies or
// the context ends.
func waitForSocket(ctx context.Context, path string, timeout time.Duration, alive func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
			return nil
		}
		if err := alive(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("socket %s did not appear within %v", path, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// tailLines returns the last n lines of b, for error messages.
func tailLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vring"
)

// The cross-process ring benchmark re-executes this binary as the device:
// the child maps the parent's memfd (passed as fd 3), serves the ring, and
// the parent drives it. The child's parameters travel in an environment
// variable as JSON.
const ringChildEnv = "VDPAKIT_BENCH_RING_CHILD"

type ringChildParams struct {
	crossOptions
	MemSize  uint64       `json:"mem_size"`
	Layout   vring.Layout `json:"layout"`
	Written  uint32       `json:"written"`
	Deadline time.Time    `json:"deadline"`
}

func isRingChild() bool { return os.Getenv(ringChildEnv) != "" }

// ringChildMain is the child's main: it reports "ready" on stdout once its
// queue is set up, serves the chains, and exits 0 after the last one.
func ringChildMain() int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "ring child:", err)
		return 1
	}
	var p ringChildParams
	if err := json.Unmarshal([]byte(os.Getenv(ringChildEnv)), &p); err != nil {
		return fail(err)
	}
	r, err := vring.NewFdRegion(0, p.MemSize, 3, 0, nil)
	if err != nil {
		return fail(err)
	}
	mem, err := vring.NewMemory(r)
	if err != nil {
		return fail(err)
	}
	defer mem.Close()
	dev, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: p.Layout})
	if err != nil {
		return fail(err)
	}
	dev.DisableNotify()
	if _, err := pinThread(p.HostCPU); err != nil {
		return fail(err)
	}
	fmt.Println("ready")
	if err := serveChains(dev, p.Batch, p.Chains, p.Written, nil, p.Deadline); err != nil {
		return fail(err)
	}
	return 0
}

// libCrossProcess runs o.Chains chains between a driver in this process
// (pinned to GuestCPU) and a device in a child process (pinned to HostCPU)
// over a shared memfd, and returns the driver's wall time.
func libCrossProcess(ctx context.Context, o crossOptions) (time.Duration, error) {
	e, err := newRingEnv(o.RingSize)
	if err != nil {
		return 0, err
	}
	defer e.Close()
	drv, err := vring.NewDriverQueue(e.mem, vring.DriverQueueOptions{Layout: e.layout})
	if err != nil {
		return 0, err
	}
	drv.DisableInterrupts()
	bufs := chainBuffers(o.Descs)
	deadline := crossDeadline(o.Chains)
	params, err := json.Marshal(ringChildParams{crossOptions: o, MemSize: ringMemSize, Layout: e.layout, Written: writtenFor(bufs), Deadline: deadline})
	if err != nil {
		return 0, err
	}
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	// Pass a duplicate: the *os.File closes its fd when collected, and the
	// region owns the original.
	dup, err := unix.FcntlInt(uintptr(e.region.Fd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	memf := os.NewFile(uintptr(dup), "guest-memory")
	defer memf.Close()
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), ringChildEnv+"="+string(params))
	cmd.ExtraFiles = []*os.File{memf}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	childDone := make(chan error, 1)
	readyc := make(chan bool, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		readyc <- strings.TrimSpace(line) == "ready"
	}()
	var abort atomic.Bool
	ok := false
	select {
	case ok = <-readyc:
	case <-time.After(30 * time.Second):
	case <-ctx.Done():
	}
	if !ok {
		cmd.Process.Kill()
		cmd.Wait()
		return 0, fmt.Errorf("ring child did not start: %s", strings.TrimSpace(stderr.String()))
	}
	go func() {
		err := cmd.Wait()
		if err != nil {
			abort.Store(true)
		}
		childDone <- err
	}()
	stop := context.AfterFunc(ctx, func() { abort.Store(true) })
	defer stop()
	type res struct {
		el  time.Duration
		err error
	}
	rc := make(chan res, 1)
	go func() {
		unpin, err := pinThread(o.GuestCPU)
		if err != nil {
			rc <- res{err: err}
			return
		}
		defer unpin()
		start := time.Now()
		err = driveChains(drv, bufs, o.Batch, o.Chains, &abort, deadline)
		rc <- res{time.Since(start), err}
	}()
	r := <-rc
	if r.err != nil {
		cmd.Process.Kill()
	}
	cerr := <-childDone
	if cerr != nil {
		msg := strings.TrimSpace(stderr.String())
		if r.err != nil && !errors.Is(r.err, errAborted) {
			return 0, fmt.Errorf("driver: %w (child: %s)", r.err, msg)
		}
		return 0, fmt.Errorf("ring child: %v: %s", cerr, msg)
	}
	if r.err != nil {
		return 0, fmt.Errorf("driver: %w", r.err)
	}
	return r.el, nil
}

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser"
)

// The library's vhost-user back-end runs in a child process (this binary
// re-executed) whose every thread is pinned to one CPU, like the testpmd
// net_vhost instance it is compared with. Its parameters travel as JSON in
// an environment variable; on SIGTERM it prints its device counters as JSON
// on stdout and exits.
const vhostChildEnv = "VDPAKIT_BENCH_VHOST_CHILD"

type vhostChildParams struct {
	Sock     string `json:"sock"`
	Loopback bool   `json:"loopback"`
	Queues   int    `json:"queues"`
	// Profile, when set, is a file the child writes its CPU profile to.
	Profile string `json:"profile,omitempty"`
	CPU     int    `json:"cpu"`
	// PollGroup polls every queue on one softnet.PollGroup worker
	// instead of a goroutine per queue.
	PollGroup bool `json:"poll_group,omitempty"`
}

type vhostChildStats struct {
	Rx, Tx  uint64
	Drops   uint64
	Session int
}

func isVhostChild() bool { return os.Getenv(vhostChildEnv) != "" }

// pinProcess pins every thread of this process to cpu. Threads created
// later are cloned from pinned threads and inherit the mask; the walk is
// repeated until no new thread appears.
func pinProcess(cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	seen := map[int]bool{}
	for pass := 0; pass < 10; pass++ {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		fresh := 0
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || seen[tid] {
				continue
			}
			if err := unix.SchedSetaffinity(tid, &set); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("pin thread %d to cpu %d: %w", tid, cpu, err)
			}
			seen[tid] = true
			fresh++
		}
		if fresh == 0 {
			return nil
		}
	}
	return nil
}

// vhostChildMain serves the software virtio-net device over vhost-user until
// SIGTERM or SIGINT.
func vhostChildMain() int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "vhost-user child:", err)
		return 1
	}
	var p vhostChildParams
	if err := json.Unmarshal([]byte(os.Getenv(vhostChildEnv)), &p); err != nil {
		return fail(err)
	}
	if err := pinProcess(p.CPU); err != nil {
		return fail(err)
	}
	if p.Profile != "" {
		f, err := os.Create(p.Profile)
		if err != nil {
			return fail(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fail(err)
		}
		defer pprof.StopCPUProfile()
	}
	// The sink copies every frame out of guest memory, as testpmd's rxonly
	// receives each one into an mbuf; loopback replies straight from the
	// transmit buffer into a receive buffer (one copy; DPDK's io forward
	// makes two, through an mbuf).
	var sink [softnet.MaxFrame]byte
	var handler softnet.FrameHandler = softnet.FrameHandlerFunc(func(_ *softnet.Tx, frame []byte) { copy(sink[:], frame) })
	if p.Loopback {
		handler = softnet.Loopback
	}
	// FrontendCtrl: testpmd's virtio-user runs the control queue itself
	// and enables the queue pairs it uses, as for DPDK's net_vhost.
	// PollNoSleep: the back-end has CPU H to itself and polls it
	// continuously, as net_vhost's forwarding lcore does; sleeping when
	// idle lets the front-end fill the ring meanwhile.
	// InOrder: DPDK's vhost library offers VIRTIO_F_IN_ORDER and
	// virtio-user accepts it by default, so against net_vhost testpmd runs
	// its in-order transmit and receive paths. Offering it here too keeps
	// the front-end's code the same for both back-ends; without it, split
	// txonly compared testpmd's generic path on our side with its in-order
	// path on DPDK's (0.70x against 0.99x with it, same minutes).
	var group *softnet.PollGroup
	if p.PollGroup {
		group = softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 1, PollNoSleep: true})
	}
	dev, err := softnet.New(&softnet.Options{Handler: handler, Mode: softnet.ModePoll, PollNoSleep: true, MaxQueueSize: 1024,
		MaxQueuePairs: uint16(max(1, p.Queues)), FrontendCtrl: true, PollGroup: group, InOrder: true})
	if err != nil {
		return fail(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	be := vhostuser.NewBackend(dev, nil)
	err = be.ListenAndServe(ctx, p.Sock)
	st := dev.Stats()
	var drops uint64
	for _, d := range st.Drops {
		drops += d
	}
	out, _ := json.Marshal(vhostChildStats{Rx: st.Tx().Frames, Tx: st.Rx().Frames, Drops: drops, Session: be.Info().Sessions})
	fmt.Println(string(out))
	if err != nil && !errors.Is(err, context.Canceled) {
		return fail(err)
	}
	return 0
}

// libVhost runs the library's back-end (vdpa/vhostuser serving
// vdpa/softnet) in a pinned child process.
type libVhost struct {
	self string
	// profileDir, when set, receives a CPU profile of every run
	// (vhost-<mode>-<pairs>q-<n>.pprof, n counting runs).
	profileDir string
	// pollGroup: the child polls every queue on one PollGroup worker.
	pollGroup bool
	runs      int
	cmd       *exec.Cmd
	mu        sync.Mutex
	stdout    strings.Builder
	stderr    strings.Builder
	done      chan error
}

func newLibVhost(profileDir string) (*libVhost, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return &libVhost{self: self, profileDir: profileDir}, nil
}

func (l *libVhost) Name() string { return "vdpakit vhost-user" }

type lockedWriter struct {
	mu *sync.Mutex
	b  *strings.Builder
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (l *libVhost) Pid() int { return l.cmd.Process.Pid }

func (l *libVhost) Start(ctx context.Context, sock string, sc scenario, cpu int) error {
	l.runs++
	cp := vhostChildParams{Sock: sock, Loopback: sc.loopback, Queues: sc.queues, CPU: cpu, PollGroup: l.pollGroup}
	if l.profileDir != "" {
		// vhost-<mode>-<pairs>q-<run>.pprof, the mode as the results
		// name it: txonly, macswap-loopback, txonly-packed, ...
		mode := strings.ReplaceAll(sc.mode(), " ", "-")
		cp.Profile = filepath.Join(l.profileDir, fmt.Sprintf("vhost-%s-%dq-%d.pprof", mode, sc.queues, l.runs))
	}
	params, err := json.Marshal(cp)
	if err != nil {
		return err
	}
	l.stdout.Reset()
	l.stderr.Reset()
	l.cmd = exec.Command(l.self)
	l.cmd.Env = append(os.Environ(), vhostChildEnv+"="+string(params), "GOMAXPROCS=1")
	l.cmd.Stdout = lockedWriter{&l.mu, &l.stdout}
	l.cmd.Stderr = lockedWriter{&l.mu, &l.stderr}
	l.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := startPinned(l.cmd, cpu); err != nil {
		return err
	}
	l.done = make(chan error, 1)
	go func() { l.done <- l.cmd.Wait() }()
	return nil
}

func (l *libVhost) Alive() error {
	select {
	case err := <-l.done:
		l.done <- err
		l.mu.Lock()
		defer l.mu.Unlock()
		return fmt.Errorf("vdpakit back-end exited (%v): %s", err, strings.TrimSpace(l.stderr.String()))
	default:
		return nil
	}
}

func (l *libVhost) Stop() (uint64, uint64, error) {
	select {
	case <-l.done:
	default:
		l.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-l.done:
			l.done <- err
		case <-time.After(10 * time.Second):
			l.cmd.Process.Kill()
		}
	}
	err := <-l.done
	l.done <- err
	l.mu.Lock()
	defer l.mu.Unlock()
	var st vhostChildStats
	sc := bufio.NewScanner(strings.NewReader(l.stdout.String()))
	found := false
	for sc.Scan() {
		if json.Unmarshal([]byte(sc.Text()), &st) == nil {
			found = true
		}
	}
	if err != nil {
		return st.Rx, st.Tx, fmt.Errorf("vdpakit back-end: %v: %s", err, strings.TrimSpace(l.stderr.String()))
	}
	if !found {
		return 0, 0, fmt.Errorf("vdpakit back-end printed no counters: %s", strings.TrimSpace(l.stderr.String()))
	}
	return st.Rx, st.Tx, nil
}

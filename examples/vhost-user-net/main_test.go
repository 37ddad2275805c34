package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestPairsWithDPDK runs the example as a user would (-pairs 2, server and
// client mode, -handler sink, -duration; client mode with -poll
// -poll-workers 1) against DPDK's virtio-user with
// two queue pairs, and checks the summary it prints at the end: the
// negotiated features and frames on every pair. It runs where
// dpdk-testpmd is installed (not with -short).
func TestPairsWithDPDK(t *testing.T) {
	bin, err := exec.LookPath("dpdk-testpmd")
	if err != nil || os.Getenv("VDPAKIT_DPDK") == "0" {
		t.Skip("needs dpdk-testpmd (Debian's dpdk package)")
	}
	if testing.Short() {
		t.Skip("DPDK interop: skipped with -short")
	}
	for _, client := range []bool{false, true} {
		name := "server"
		if client {
			name = "client"
		}
		t.Run(name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "vu.sock")
			vdev := "net_virtio_user0,path=" + sock + ",queues=2"
			if client {
				vdev += ",server=1"
			}
			cmd := exec.Command(bin, "--lcores", "0@0,1@0", "--no-pci", "--no-huge", "-m", "256",
				"--file-prefix=vun-"+name+"-"+strconv.Itoa(os.Getpid()), "--vdev", vdev,
				"--", "-i", "--rxq=2", "--txq=2", "--nb-cores=1", "--no-mlockall", "--total-num-mbufs=16384",
				"--forward-mode=txonly")
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			pmdOut := &lockedBuffer{}
			cmd.Stdout, cmd.Stderr = pmdOut, pmdOut
			stdin, err := cmd.StdinPipe()
			require.NoError(t, err)
			c := config{socket: sock, client: client, device: "softnet", handler: "sink", mac: "02:00:00:00:00:01",
				ip: "10.0.0.1", pairs: 2, duration: 60 * time.Second}
			if client {
				// Client mode also busy-polls both pairs on one
				// softnet.PollGroup goroutine.
				c.poll, c.pollWorkers = true, 1
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var runErr error
			outCh := make(chan string, 1)
			go func() { outCh <- captureStdout(func() { runErr = serve(ctx, c) }) }()
			if !client {
				// testpmd connects to our server once it listens.
				deadline := time.Now().Add(10 * time.Second)
				for {
					if _, err := os.Stat(sock); err == nil {
						break
					}
					require.True(t, time.Now().Before(deadline), "the example did not listen")
					time.Sleep(10 * time.Millisecond)
				}
			}
			require.NoError(t, cmd.Start())
			defer func() {
				_ = stdin.Close()
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				_ = cmd.Wait()
			}()
			// testpmd prompts once the port is up (slow on a loaded machine).
			deadline := time.Now().Add(40 * time.Second)
			for !strings.Contains(pmdOut.String(), "testpmd>") {
				require.True(t, time.Now().Before(deadline), "testpmd did not come up:\n%s", pmdOut.String())
				time.Sleep(20 * time.Millisecond)
			}
			_, _ = io.WriteString(stdin, "start\n")
			time.Sleep(3 * time.Second)
			cancel()
			out := <-outCh
			require.NoError(t, runErr)
			t.Logf("example output:\n%s", out)
			assert.Contains(t, out, "2 queue pair(s)")
			assert.Regexp(t, `negotiated features 0x[0-9a-f]+ \([^)]*MQ[^)]*\)`, out)
			for p := 0; p < 2; p++ {
				m := regexp.MustCompile(`pair ` + strconv.Itoa(p) + `: tx (\d+)`).FindStringSubmatch(out)
				require.NotNil(t, m, "pair %d counters", p)
				n, _ := strconv.ParseUint(m[1], 10, 64)
				assert.Positive(t, n, "pair %d carried frames", p)
			}
			if t.Failed() {
				t.Logf("testpmd:\n%s", pmdOut.String())
			}
		})
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// captureStdout runs f with os.Stdout redirected and returns what it
// printed.
func captureStdout(f func()) string {
	r, w, err := os.Pipe()
	if err != nil {
		return err.Error()
	}
	old := os.Stdout
	os.Stdout = w
	done := make(chan string)
	go func() {
		var b strings.Builder
		_, _ = io.Copy(&b, r)
		done <- b.String()
	}()
	defer func() { os.Stdout = old }()
	f()
	w.Close()
	os.Stdout = old
	s := <-done
	r.Close()
	return s
}

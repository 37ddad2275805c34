package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Progress prints what the harness is doing to stderr: one rewritten status
// line on a terminal, one line per step otherwise (CI logs).
type Progress struct {
	mu    sync.Mutex
	w     io.Writer
	tty   bool
	quiet bool
	start time.Time
	step  int
	last  int // length of the last status line on a tty
}

// NewProgress returns a progress display on w. isTTY selects in-place
// updates; quiet suppresses everything but warnings.
func NewProgress(w io.Writer, isTTY, quiet bool) *Progress {
	return &Progress{w: w, tty: isTTY, quiet: quiet, start: time.Now()}
}

// stderrIsTTY reports whether fd 2 is a terminal.
func stderrIsTTY() bool {
	_, err := unix.IoctlGetTermios(int(os.Stderr.Fd()), unix.TCGETS)
	return err == nil
}

// Step announces the start of a measurement.
func (p *Progress) Step(format string, args ...any) {
	if p == nil || p.quiet {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.step++
	msg := fmt.Sprintf("[%3d %6.1fs] %s", p.step, time.Since(p.start).Seconds(), fmt.Sprintf(format, args...))
	if p.tty {
		pad := ""
		if n := p.last - len(msg); n > 0 {
			pad = fmt.Sprintf("%*s", n, "")
		}
		fmt.Fprintf(p.w, "\r%s%s", msg, pad)
		p.last = len(msg)
		return
	}
	fmt.Fprintln(p.w, msg)
}

// Warn prints a line that stays visible (a skip reason, a peer failure).
func (p *Progress) Warn(format string, args ...any) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty && p.last > 0 {
		fmt.Fprint(p.w, "\n")
		p.last = 0
	}
	fmt.Fprintf(p.w, "bench: "+format+"\n", args...)
}

// Done ends the status line.
func (p *Progress) Done() {
	if p == nil || p.quiet {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty && p.last > 0 {
		fmt.Fprint(p.w, "\n")
	}
	fmt.Fprintf(p.w, "bench: %d measurements in %.1fs\n", p.step, time.Since(p.start).Seconds())
}

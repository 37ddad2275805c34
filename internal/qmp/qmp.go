// Package qmp is a small client of QEMU's machine protocol (QMP: JSON
// lines on a unix socket), for the tests that drive a QEMU's lifecycle
// (stop, cont, migrate, system_reset, quit) the way a management stack
// does.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// ErrCommand is the error a command QEMU refused wraps (its class and
// description follow).
var ErrCommand = errors.New("QMP command failed")

// Client is one QMP session. It is not safe for concurrent use.
type Client struct {
	c  net.Conn
	rd *bufio.Reader
}

// Dial connects to the QMP socket at path, retrying until it answers or
// ctx ends (QEMU creates the socket as it starts), reads the greeting and
// leaves capabilities negotiation mode. The context's deadline, if any,
// becomes the connection's.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	var c net.Conn
	var err error
	for {
		if c, err = d.DialContext(ctx, "unix", path); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("QMP %s: %w (last: %v)", path, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	q := &Client{c: c, rd: bufio.NewReader(c)}
	// The greeting should come first, but an event can come before it:
	// QEMU 7.2 wrote an incoming migration's MIGRATION "setup" event to a
	// connection before greeting it (an event emitted while the monitor
	// was taking the new connection). Events before the greeting are
	// skipped; anything else is not QMP.
	for {
		line, err := q.rd.ReadBytes('\n')
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("QMP greeting: %w", err)
		}
		var greeting struct {
			QMP   *json.RawMessage `json:"QMP"`
			Event string           `json:"event"`
		}
		if err := json.Unmarshal(line, &greeting); err == nil && greeting.QMP == nil && greeting.Event != "" {
			continue
		}
		if err != nil || greeting.QMP == nil {
			c.Close()
			return nil, fmt.Errorf("QMP greeting %q: not a QMP server", line)
		}
		break
	}
	if _, err := q.Do("qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

// Do runs one command (args nil for none) and returns its "return" value.
// Events that arrive meanwhile are skipped. A command QEMU refuses returns
// an error wrapping ErrCommand.
func (q *Client) Do(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		line, err := q.rd.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("QMP %s: reply %q: %w", cmd, line, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("%w: %s: %s: %s", ErrCommand, cmd, resp.Error.Class, resp.Error.Desc)
		case resp.Return == nil:
			return nil, fmt.Errorf("QMP %s: reply %q has neither return nor error", cmd, line)
		}
		return resp.Return, nil
	}
}

// Status is query-status's run state ("running", "paused", "postmigrate"...).
func (q *Client) Status() (string, error) {
	r, err := q.Do("query-status", nil)
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(r, &st); err != nil {
		return "", fmt.Errorf("QMP query-status: %w", err)
	}
	return st.Status, nil
}

// Close ends the session.
func (q *Client) Close() error { return q.c.Close() }

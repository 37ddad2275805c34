package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeQEMU serves one QMP session on a socket: the greeting, then for each
// command the lines reply returns (events before the answer, say).
func fakeQEMU(t *testing.T, greeting string, reply func(cmd string) []string) (string, <-chan []string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	got := make(chan []string, 1)
	go func() {
		var cmds []string
		defer func() { got <- cmds }()
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if _, err := c.Write([]byte(greeting + "\n")); err != nil {
			return
		}
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			var req struct {
				Execute   string         `json:"execute"`
				Arguments map[string]any `json:"arguments"`
			}
			if json.Unmarshal(sc.Bytes(), &req) != nil {
				return
			}
			cmds = append(cmds, sc.Text())
			for _, line := range reply(req.Execute) {
				if _, err := c.Write([]byte(line + "\n")); err != nil {
					return
				}
			}
		}
	}()
	return path, got
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 11}}, "capabilities": []}}`

func TestClient(t *testing.T) {
	path, got := fakeQEMU(t, greeting, func(cmd string) []string {
		switch cmd {
		case "qmp_capabilities":
			return []string{`{"return": {}}`}
		case "stop":
			// An event before the answer is skipped.
			return []string{`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}`, `{"return": {}}`}
		case "query-status":
			return []string{`{"return": {"status": "paused", "running": false}}`}
		case "migrate":
			return []string{`{"error": {"class": "GenericError", "desc": "no such URI"}}`}
		}
		return []string{`{"error": {"class": "CommandNotFound", "desc": "The command ` + cmd + ` has not been found"}}`}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := Dial(ctx, path)
	require.NoError(t, err)
	r, err := q.Do("stop", nil)
	require.NoError(t, err)
	assert.JSONEq(t, `{}`, string(r))
	st, err := q.Status()
	require.NoError(t, err)
	assert.Equal(t, "paused", st)
	_, err = q.Do("migrate", map[string]any{"uri": "unix:/nowhere"})
	require.ErrorIs(t, err, ErrCommand)
	assert.Contains(t, err.Error(), "no such URI")
	_, err = q.Do("bogus", nil)
	require.ErrorIs(t, err, ErrCommand)
	require.NoError(t, q.Close())
	cmds := <-got
	require.Len(t, cmds, 5)
	assert.JSONEq(t, `{"execute": "qmp_capabilities"}`, cmds[0])
	assert.JSONEq(t, `{"execute": "migrate", "arguments": {"uri": "unix:/nowhere"}}`, cmds[3])
}

func TestDialRefusesWhatIsNotQMP(t *testing.T) {
	path, _ := fakeQEMU(t, `{"hello": 1}`, func(string) []string { return nil })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Dial(ctx, path)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not a QMP server")
}

// QEMU can write an event to a new connection before its greeting (see
// Dial): Dial skips it.
func TestDialSkipsEventsBeforeTheGreeting(t *testing.T) {
	early := `{"timestamp": {"seconds": 1796619213, "microseconds": 290201}, "event": "MIGRATION", "data": {"status": "setup"}}`
	path, got := fakeQEMU(t, early+"\n"+greeting, func(cmd string) []string {
		if cmd == "query-status" {
			return []string{`{"return": {"status": "inmigrate", "running": false}}`}
		}
		return []string{`{"return": {}}`}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := Dial(ctx, path)
	require.NoError(t, err)
	st, err := q.Status()
	require.NoError(t, err)
	assert.Equal(t, "inmigrate", st)
	require.NoError(t, q.Close())
	cmds := <-got
	require.Len(t, cmds, 2)
	assert.JSONEq(t, `{"execute": "qmp_capabilities"}`, cmds[0])
}

func TestDialEndsWithTheContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, filepath.Join(t.TempDir(), "absent.sock"))
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

// QEMU creates its QMP socket as it starts: Dial retries until it exists.
func TestDialWaitsForTheSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "late.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		time.Sleep(150 * time.Millisecond)
		l, err := net.Listen("unix", path)
		if err != nil {
			return
		}
		defer l.Close()
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = c.Write([]byte(greeting + "\n"))
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			_, _ = c.Write([]byte(`{"return": {}}` + "\n"))
		}
	}()
	q, err := Dial(ctx, path)
	require.NoError(t, err)
	require.NoError(t, q.Close())
}

func TestReplyWithNeitherReturnNorError(t *testing.T) {
	path, _ := fakeQEMU(t, greeting, func(cmd string) []string {
		if cmd == "qmp_capabilities" {
			return []string{`{"return": {}}`}
		}
		return []string{`{"id": 3}`}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := Dial(ctx, path)
	require.NoError(t, err)
	defer q.Close()
	_, err = q.Do("query-status", nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "neither return nor error")
}

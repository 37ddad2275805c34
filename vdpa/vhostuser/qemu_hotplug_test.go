package vhostuser

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/qmp"
)

// TestQEMUMemoryHotplug plugs two DIMMs into the guest, one after the
// other (QMP object-add and device_add pc-dimm), as a VMM growing a guest
// does: the first while the VM runs, the second while it is stopped (stop,
// plug, cont). QEMU sends a new SET_MEM_TABLE for each: at the plug, with
// the rings running, and at cont, before the stopped rings start again.
// The back-end must map the new table (one region more each time), keep
// every ring where it was and serve on. The guest pings throughout:
// nothing may be lost, duplicated or corrupt, and no ring may restart
// anywhere but where it stopped. (Unplugging is not tested: the guest's
// initramfs runs no ACPI eject handling that releases a DIMM, so QEMU
// keeps it: query-acpi-ospm-status shows no eject answered.)
func TestQEMUMemoryHotplug(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q qemuPeer, helper string) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		start := time.Now()
		dir := t.TempDir()
		g := buildGuestEnv(t, ctx, helper, dir, "serve")
		rig := startRig(t, ctx, dir, rigOptions{name: "a"})
		qmpPath := filepath.Join(dir, "qmp.sock")
		vm := bootServe(t, ctx, q, g, rig, qemuConfig{name: q.name, qmp: qmpPath, maxmem: "1G"}, 1)
		qm, err := qmp.Dial(ctx, qmpPath)
		require.NoError(t, err)
		defer qm.Close()

		// tables lists the region count of every SET_MEM_TABLE so far.
		tables := func() []int {
			msgs, _ := rig.rec.snapshot()
			var n []int
			for _, m := range msgs {
				if m.Req == ReqSetMemTable {
					n = append(n, m.Fds)
				}
			}
			return n
		}
		before := tables()
		require.NotEmpty(t, before, "QEMU sent a memory table at boot")
		regions := before[len(before)-1]
		// newTable waits for a SET_MEM_TABLE after the first seen of
		// tables and returns its region count.
		newTable := func(seen int, what string) int {
			t.Helper()
			require.Eventually(t, func() bool { return len(tables()) > seen }, 60*time.Second, 20*time.Millisecond,
				"%s: no new SET_MEM_TABLE (tables %v)", what, tables())
			n := tables()
			return n[len(n)-1]
		}
		traffic := func(what string) {
			t.Helper()
			e := echoes(rig)
			took, err := waitEchoes(ctx, e+20, 20*time.Second, rig)
			require.NoError(t, err, "%s: traffic", what)
			t.Logf("%s: traffic went on (%v for 20 echo replies)", what, took.Round(time.Millisecond))
		}
		mark := len(rig.ring.snapshot())

		// Two DIMMs, one after the other: each is a new table with one
		// region more. The first is plugged while the rings run, the
		// second while the VM is stopped (its rings stopped by
		// GET_VRING_BASE), and the VM then continues.
		for i := 1; i <= 2; i++ {
			paused := i == 2
			if paused {
				_, err = qm.Do("stop", nil)
				require.NoError(t, err)
			}
			seen := len(tables())
			id := fmt.Sprintf("hp%d", i)
			rig.mark("plug %s", id)
			_, err = qm.Do("object-add", map[string]any{"qom-type": "memory-backend-memfd", "id": id, "size": 128 << 20, "share": true})
			require.NoError(t, err)
			_, err = qm.Do("device_add", map[string]any{"driver": "pc-dimm", "id": "dimm" + id, "memdev": id})
			require.NoError(t, err)
			if paused {
				// A stopped vhost device gets its table when it starts
				// again (QEMU sends SET_MEM_TABLE at cont, not at the
				// plug).
				_, err = qm.Do("cont", nil)
				require.NoError(t, err)
			}
			assert.Equal(t, regions+i, newTable(seen, id), "%s: the plugged DIMM is a region of the table", id)
			traffic(fmt.Sprintf("%s plugged (paused %v)", id, paused))
		}
		r, err := qm.Do("query-memory-devices", nil)
		require.NoError(t, err)
		var devs []json.RawMessage
		require.NoError(t, json.Unmarshal(r, &devs))
		assert.Len(t, devs, 2, "QEMU's DIMMs: %s", r)

		p := stopPingers(t, ctx, vm, g.nonce, "final")
		noWarnings(t, rig)
		checkPingRound(t, q.name+" memory hotplug", p, false, rig)
		ev := rig.ring.snapshot()[mark:]
		checkRingContinuity(t, "memory hotplug", ev)
		t.Logf("memory tables (regions): %v; rings: %v", tables(), ev)
		_, _ = qm.Do("quit", nil)
		t.Logf("RESULT %s memory hotplug: two 128 MiB DIMMs plugged, running and stopped, under traffic; run time %v", q.name, time.Since(start).Round(time.Millisecond))
	})
}

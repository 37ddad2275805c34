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
// plug, cont). QEMU sends the new memory for each: at the plug, with the
// rings running, and at cont, before the stopped rings start again. It
// does so region by region (ADD_MEM_REG) when the back-end offers
// CONFIGURE_MEM_SLOTS, as it does by default, and as a whole table
// (SET_MEM_TABLE) when it does not: both are run. The back-end must map
// the new memory (one region more each time), keep every ring where it
// was and serve on. The guest pings throughout: nothing may be lost,
// duplicated or corrupt, and no ring may restart anywhere but where it
// stopped. (Unplugging is not tested: the guest's initramfs runs no ACPI
// eject handling that releases a DIMM, so QEMU keeps it:
// query-acpi-ospm-status shows no eject answered.)
func TestQEMUMemoryHotplug(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto ProtocolFeatures
		req   Request // how QEMU sends the plugged DIMM
	}{
		{"add-mem-reg", 0, ReqAddMemReg},
		{"set-mem-table", SupportedProtocolFeatures &^ (1 << PFConfigureMemSlots), ReqSetMemTable},
	} {
		t.Run(tc.name, func(t *testing.T) { testQEMUMemoryHotplug(t, tc.proto, tc.req) })
	}
}

func testQEMUMemoryHotplug(t *testing.T, proto ProtocolFeatures, req Request) {
	forEachQEMU(t, func(t *testing.T, q qemuPeer, helper string) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		start := time.Now()
		dir := t.TempDir()
		g := buildGuestEnv(t, ctx, helper, dir, "serve")
		rig := startRig(t, ctx, dir, rigOptions{name: "a", proto: proto})
		qmpPath := filepath.Join(dir, "qmp.sock")
		vm := bootServe(t, ctx, q, g, rig, qemuConfig{name: q.name, qmp: qmpPath, maxmem: "1G"}, 1)
		qm, err := qmp.Dial(ctx, qmpPath)
		require.NoError(t, err)
		defer qm.Close()

		// regions is the region count of the memory the front-end has
		// sent so far (SET_MEM_TABLE sets it, ADD_MEM_REG and
		// REM_MEM_REG move it), and the requests that carried it.
		regions := func() (n int, reqs []Request) {
			msgs, _ := rig.rec.snapshot()
			for _, m := range msgs {
				switch m.Req {
				case ReqSetMemTable:
					n = m.Fds
				case ReqAddMemReg:
					n++
				case ReqRemMemReg:
					n--
				default:
					continue
				}
				reqs = append(reqs, m.Req)
			}
			return n, reqs
		}
		boot, bootReqs := regions()
		require.Positive(t, boot, "QEMU sent its memory at boot")
		assert.Contains(t, bootReqs, req, "the form of QEMU's memory updates")
		traffic := func(what string) {
			t.Helper()
			e := echoes(rig)
			took, err := waitEchoes(ctx, e+20, 60*time.Second, rig)
			require.NoError(t, err, "%s: traffic", what)
			t.Logf("%s: traffic went on (%v for 20 echo replies)", what, took.Round(time.Millisecond))
		}
		mark := len(rig.ring.snapshot())

		// Two DIMMs, one after the other. The first is plugged while the
		// rings run, the second while the VM is stopped (its rings
		// stopped by GET_VRING_BASE), and the VM then continues: a
		// stopped vhost device gets its memory when it starts again.
		for i := 1; i <= 2; i++ {
			paused := i == 2
			if paused {
				_, err = qm.Do("stop", nil)
				require.NoError(t, err)
			}
			id := fmt.Sprintf("hp%d", i)
			rig.mark("plug %s", id)
			_, err = qm.Do("object-add", map[string]any{"qom-type": "memory-backend-memfd", "id": id, "size": 128 << 20, "share": true})
			require.NoError(t, err)
			_, err = qm.Do("device_add", map[string]any{"driver": "pc-dimm", "id": "dimm" + id, "memdev": id})
			require.NoError(t, err)
			if paused {
				_, err = qm.Do("cont", nil)
				require.NoError(t, err)
			}
			require.Eventually(t, func() bool { n, _ := regions(); return n == boot+i }, 60*time.Second, 20*time.Millisecond,
				"%s: the plugged DIMM never became a region (%d regions at boot)", id, boot)
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
		n, reqs := regions()
		t.Logf("memory: %d regions, sent as %v; protocol features %v; rings: %v", n, reqs, rig.be.Info().ProtocolFeatures, ev)
		_, _ = qm.Do("quit", nil)
		t.Logf("RESULT %s memory hotplug (%v): two 128 MiB DIMMs plugged, running and stopped, under traffic; run time %v",
			q.name, req, time.Since(start).Round(time.Millisecond))
	})
}

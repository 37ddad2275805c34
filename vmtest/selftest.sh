#!/usr/bin/env bash
# Self-test of the real-kernel harness: runs vmtest/run.sh on the fixture
# package (vmtest/internal/fixture) in each way a run can end and checks the
# exit status and the verdict lines. A harness that reported success for a
# failing, skipping-by-testenv, crashing or hanging run would be worse than
# none. Warm cache: about 5 minutes at load ~6 (one boot per case, two or
# three for the boot-retry cases, two cases wait for a timeout).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PKG=./vmtest/internal/fixture
IP=github.com/vdpakit/vdpakit/vmtest/internal/fixture
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
failures=0

# check NAME WANT_RC PATTERN... -- RUN.SH ARGS: run the harness, then require
# its exit status (0 or "nonzero") and each extended regex in its output; a
# PATTERN starting with ! must NOT match.
check() {
	local name=$1 want=$2
	shift 2
	local pats=()
	while [ "$1" != -- ]; do pats+=("$1"); shift; done
	shift
	echo "=== selftest: $name"
	local rc=0
	vmtest/run.sh "$@" >"$LOG" 2>&1 || rc=$?
	local ok=1
	if [ "$want" = 0 ] && [ "$rc" != 0 ]; then ok=0; fi
	if [ "$want" = nonzero ] && [ "$rc" = 0 ]; then ok=0; fi
	local p
	for p in "${pats[@]}"; do
		if [[ $p == !* ]]; then
			! grep -q -E -e "${p#!}" "$LOG" || { echo "selftest: $name: output has /${p#!}/"; ok=0; }
		else
			grep -q -E -e "$p" "$LOG" || { echo "selftest: $name: output lacks /$p/"; ok=0; }
		fi
	done
	if [ "$ok" = 1 ]; then
		echo "--- PASS: $name (exit $rc)"
	else
		echo "--- FAIL: $name (exit $rc, want $want); harness output:"
		sed 's/^/    | /' "$LOG" | tail -40
		failures=$((failures + 1))
	fi
}

check "passing package" 0 \
	"^ok  	$IP	" '^vmtest: 1 passed, 0 failed$' -- -timeout 120 "$PKG"
check "failing test" nonzero \
	"^FAIL	$IP	.*exit=1" 'failing on purpose' '^vmtest: 0 passed, 1 failed$' -- -timeout 120 -env VMTEST_FIXTURE=fail "$PKG"
check "testenv requirement fails inside the VM" nonzero \
	"^FAIL	$IP	" 'nothing may skip' -- -timeout 120 -env VMTEST_FIXTURE=require "$PKG"
check "plain skip is reported" 0 \
	'skipped inside the VM' 'skipping on purpose' -- -timeout 120 -env VMTEST_FIXTURE=skip "$PKG"
check "plain skip fails the run with -strict" nonzero \
	'skipping on purpose' 'plain skip\(s\) inside the VM with -strict' '^vmtest: 1 passed, 1 failed$' \
	-- -strict -timeout 120 -env VMTEST_FIXTURE=skip "$PKG"
check "-test.skip leaves a test out; -strict passes" 0 \
	'no tests to run' "^ok  	$IP	" '!--- SKIP' '!skipping on purpose' \
	-- -strict -timeout 120 -env VMTEST_FIXTURE=skip "$PKG" -- -test.skip '^TestFixture$'
check "-run selects no test" 0 \
	'no tests to run' -- -timeout 120 -run '^TestNothing$' "$PKG"
# A panic while a test runs (after TESTS-START) is a failure, never retried.
check "kernel panic in a test is not retried" nonzero \
	"^FAIL	$IP	\(no result" 'kernel panic/oops' '!retrying boot' '!before any test ran' \
	-- -timeout 120 -env VMTEST_FIXTURE=panic "$PKG"
# A panic before any test binary started (the TCG boot race) boots again:
# VDPAKIT_VMTEST_SELFTEST_EARLY_PANIC=N (test-only) crashes init before
# TESTS-START on the first N boots.
VDPAKIT_VMTEST_SELFTEST_EARLY_PANIC=1 check "kernel oops before the tests: boot retried" 0 \
	'sysrq triggered crash' 'retrying boot 2/3' '!retrying boot 3/3' '1 boot\(s\) oopsed before any test ran and were retried' \
	"^ok  	$IP	" '^vmtest: 1 passed, 0 failed$' -- -timeout 120 "$PKG"
VDPAKIT_VMTEST_SELFTEST_EARLY_PANIC=9 check "kernel oops before the tests on every boot: gives up after 3" nonzero \
	'retrying boot 2/3' 'retrying boot 3/3' '!retrying boot 4' 'kernel oops before any test ran on all 3 boots' \
	"^FAIL	$IP	\(no result" -- -timeout 120 "$PKG"
check "hung test hits -test.timeout" nonzero \
	'panic: test timed out' "^FAIL	$IP	.*exit=2" -- -timeout 90 -env VMTEST_FIXTURE=hang "$PKG"
check "hung guest hits the VM timeout" nonzero \
	'timed out after 45s' "^FAIL	$IP	\(no result" -- -timeout 45 -env VMTEST_FIXTURE=hang "$PKG" -- -test.timeout=0
check "package that does not build" nonzero \
	'FAIL	.*\[build failed\]' -- -timeout 120 ./vmtest/internal/fixture/nonexistent "$PKG"

if [ "$failures" -gt 0 ]; then
	echo "selftest: $failures case(s) failed"
	exit 1
fi
echo "selftest: all cases passed"

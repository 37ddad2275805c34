#!/usr/bin/env bash
# Self-test of the real-kernel harness: runs vmtest/run.sh on the fixture
# package (vmtest/internal/fixture) in each way a run can end and checks the
# exit status and the verdict lines. A harness that reported success for a
# failing, skipping-by-testenv, crashing or hanging run would be worse than
# none. Warm cache: about 2 minutes (one boot per case, one of them waits
# for a timeout).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PKG=./vmtest/internal/fixture
IP=github.com/vdpakit/vdpakit/vmtest/internal/fixture
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
failures=0

# check NAME WANT_RC PATTERN... -- RUN.SH ARGS: run the harness, then require
# its exit status (0 or "nonzero") and each extended regex in its output.
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
		grep -q -E "$p" "$LOG" || { echo "selftest: $name: output lacks /$p/"; ok=0; }
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
check "-run selects no test" 0 \
	'no tests to run' -- -timeout 120 -run '^TestNothing$' "$PKG"
check "kernel panic" nonzero \
	"^FAIL	$IP	\(no result" 'kernel panic' -- -timeout 120 -env VMTEST_FIXTURE=panic "$PKG"
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

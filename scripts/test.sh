#!/usr/bin/env bash
# Every test: host unit tests, then smoke boots whose serial logs are
# checked line by line. Ends with "N passed, N failed"; exits non-zero if
# anything failed. Set-up is included (idempotent), so on a fresh machine
# this one command is enough.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1

passed=0
failed=0
ok()  { passed=$((passed + 1)); echo "PASS: $*"; }
bad() { failed=$((failed + 1)); echo "FAIL: $*"; }

# --- host-side unit tests (hvcore, boot) ----------------------------------
echo "== cargo test (host) =="
if cargo test 2>&1 | tee target/cargo-test.log | grep -E '^test result|FAILED|panicked'; then :; fi
if [ "${PIPESTATUS[0]}" = 0 ] && grep -q '^test result: ok' target/cargo-test.log; then
    ok "cargo test: $(grep -o '[0-9]* passed' target/cargo-test.log | awk '{s+=$1} END {print s}') host tests"
else
    bad "cargo test (see target/cargo-test.log)"
fi

# Build the bare-metal crates once, so the boots below time only the boot.
if ! cargo run --quiet -- build --name default >/dev/null; then
    bad "building the kernel and images"
fi

# expect_in_order LOG PATTERN... : each extended regex must match a line
# after the line the previous one matched.
expect_in_order() {
    local log=$1 from=0 n pat
    shift
    for pat in "$@"; do
        n=$(tr -d '\r' <"$log" | tail -n +$((from + 1)) | grep -a -n -m1 -E -- "$pat" | cut -d: -f1)
        if [ -z "$n" ]; then
            echo "   missing (after line $from): $pat"
            return 1
        fi
        from=$((from + n))
    done
}

# smoke NAME EMULATOR FIRMWARE STATUS TIMEOUT "OPTIONS" PATTERN...
# Boots headless, asserts the runner's exit status (see `cargo run -- --help`)
# and that the patterns appear in the serial log in this order.
smoke() {
    local name=$1 emu=$2 fw=$3 want=$4 timeout=$5 options=$6
    shift 6
    local out=target/smoke-$name.out status
    echo "== smoke: $name ($emu, $fw) =="
    cargo run --quiet -- --name "$name" --emulator "$emu" --firmware "$fw" \
        --timeout "$timeout" --options "$options" --quiet >"$out" 2>&1
    status=$?
    grep -E '^boot: .*(kernel says|killed|stopped)' "$out" | sed 's/^/   /'
    local serial=target/runs/$name-$emu-$fw/serial.log
    if [ "$status" != "$want" ]; then
        bad "$name: runner exit status $status, expected $want"
        tail -n 25 "$out" | sed 's/^/   | /'
        return
    fi
    if expect_in_order "$serial" "$@"; then
        ok "$name: $# serial lines in order, exit status $status"
    else
        bad "$name: serial log (${serial})"
        tr -d '\r' <"$serial" | tail -n 25 | sed 's/^/   | /'
    fi
}

# The boot summary, around its line of CPU features (which differs per machine).
summary_head=(
    '^\[INFO \] hv [0-9.]+ starting'
    '^\[INFO \] == boot summary =='
    '^\[INFO \] cpu: [A-Za-z]+ family'
)
summary_tail=(
    '^\[INFO \] memory: [0-9]+ MiB usable'
    '^\[INFO \] ramdisk: [0-9]+ bytes, 2 files'
    '^\[INFO \] == end of boot summary =='
)

# (a) Bochs: the VMX-capable machine.
smoke bochs bochs bios 0 120 "" "${summary_head[@]}" \
    'cpu features: vmx=yes' "${summary_tail[@]}" \
    '^HV-EXIT: 0x10 success'

# (b), (c) QEMU without VMX: BIOS and UEFI boot paths.
for fw in bios uefi; do
    smoke "qemu-$fw" qemu "$fw" 0 60 "" "${summary_head[@]}" \
        'cpu features: vmx=no' "${summary_tail[@]}" \
        '^HV-EXIT: 0x10 success'
done

# Bad input and failure paths.
smoke fault-test qemu bios 1 60 "fault-test=1" \
    'fault-test: reading an unmapped address' \
    'EXCEPTION #PF page fault \(vector 14\) error code 0x[0-9a-f]+ at RIP 0x[0-9a-f]+ \(CR2 0x7fffdead0000\)' \
    '^HV-EXIT: 0x11 failure'
smoke bad-option qemu bios 1 60 "log=loud" \
    "boot failed: bad value 'loud' for boot option 'log'" \
    '^HV-EXIT: 0x11 failure'
smoke hang-test qemu bios 4 8 "hang-test=1" \
    'hang-test: spinning forever'

echo
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]

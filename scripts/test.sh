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
skipped=0
ok()  { passed=$((passed + 1)); echo "PASS: $*"; }
bad() { failed=$((failed + 1)); echo "FAIL: $*"; }

# --- host-side unit tests (hvcore, boot) ----------------------------------
mkdir -p target   # a fresh clone has none yet; logs go there
echo "== cargo test (host) =="
if cargo test 2>&1 | tee target/cargo-test.log | grep -E '^test result|FAILED|panicked'; then :; fi
if [ "${PIPESTATUS[0]}" = 0 ] && grep -q '^test result: ok' target/cargo-test.log; then
    ok "cargo test: $(grep -o '[0-9]* passed' target/cargo-test.log | awk '{s+=$1} END {print s}') host tests"
else
    bad "cargo test (see target/cargo-test.log)"
fi

# Lints: the host crates (tests and the benchmark too) and the bare-metal
# ones, with the pinned toolchain's clippy; any warning fails.
echo "== cargo clippy =="
if cargo clippy --quiet --all-targets -p hvcore -p boot -- -D warnings >target/clippy.log 2>&1 \
    && cargo clippy --quiet --release --target x86_64-unknown-none -p kernel -p guest -- -D warnings >>target/clippy.log 2>&1; then
    ok "cargo clippy: no warnings (host and bare-metal crates)"
else
    bad "cargo clippy (see target/clippy.log)"
    grep -E '^(warning|error)' -A5 target/clippy.log | head -40
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
# and that the patterns appear in the serial log in this order. More
# runner arguments (--vm ...) go in the array `vm_args`, reset after.
vm_args=()
smoke() {
    local name=$1 emu=$2 fw=$3 want=$4 timeout=$5 options=$6
    shift 6
    local out=target/smoke-$name.out status
    echo "== smoke: $name ($emu, $fw) =="
    cargo run --quiet -- --name "$name" --emulator "$emu" --firmware "$fw" \
        --timeout "$timeout" --options "$options" --quiet "${vm_args[@]}" >"$out" 2>&1
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

# Lines every run with guests must show, in any order (VMs interleave).
expect_all() {
    local log=$1 pat missing=0
    shift
    for pat in "$@"; do
        # No `grep -q`: it would stop reading early, and under pipefail the
        # writer's SIGPIPE would fail the check at random.
        if ! tr -d '\r' <"$log" | grep -a -E -- "$pat" >/dev/null; then
            echo "   missing: $pat"
            missing=1
        fi
    done
    return $missing
}

# expect_count LOG N PATTERN: exactly N lines match.
expect_count() {
    local n
    n=$(tr -d '\r' <"$1" | grep -a -c -E -- "$3")
    [ "$n" = "$2" ] || { echo "   $n lines (not $2): $3"; return 1; }
}

# check NAME COMMAND...: one more assertion on a finished smoke boot.
check() {
    local name=$1
    shift
    if "$@"; then ok "$name"; else bad "$name"; fi
}

# (a) Bochs, the VMX-capable machine: every guest scenario at once. Two
# DEDUPE guests fill 256 pages each (64 zero, 16 groups of 4 equal pages,
# 64 pages equal across the VMs, 64 unique; hvcore::hypercall::dedupe_layout),
# so at convergence: zero_pages = 2*64 = 128, pages_shared = 2*16 + 64 = 96,
# pages_sharing = 2*16*3 + 64 = 160, pages_unshared = 2*64 = 128.
all_vms="vms=hello,hello,wild-access,vmxon,bad-hypercall,triple-fault,dedupe,dedupe,exit-cost,bad-vmcs,devices"
smoke bochs bochs bios 0 180 "$all_vms" "${summary_head[@]}" \
    'cpu features: vmx=yes' "${summary_tail[@]}" \
    '^\[INFO \] vmx caps: basic=0x[0-9a-f]+ ' \
    '^\[INFO \] vmx: on \(VMCS revision 0x[0-9a-f]+\)' \
    '^\[INFO \] vm0 \(hello\): created: program, ' \
    '^\[INFO \] vm10 \(devices\): created: program, ' \
    '^\[INFO \] == run report ==' \
    '^\[INFO \] vm0 +hello +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] vm1 +hello +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] vm2 +wild-access +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  stopped: guest-physical access at 0x30000000 outside its memory' \
    '^\[INFO \] vm3 +vmxon +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 1 checks passed, 0 failed' \
    '^\[INFO \] vm4 +bad-hypercall +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 1 checks passed, 0 failed' \
    '^\[INFO \] vm5 +triple-fault +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  stopped: triple fault' \
    '^\[INFO \] vm6 +dedupe +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] vm7 +dedupe +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] vm8 +exit-cost +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 2 checks passed, 0 failed' \
    '^\[INFO \] vm9 +bad-vmcs +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  stopped: VM entry failed: VM-instruction error 7: VM entry with invalid control field\(s\)' \
    '^\[INFO \] vm10 +devices +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 5 checks passed, 0 failed' \
    '^\[INFO \] vm10 exits: HLT=1, VMCALL=[0-9]+, control-register access=1, I/O instruction=[0-9]+, RDMSR=1, EPT violation=[0-9]+(, VMX-preemption timer expired=[0-9]+)?$' \
    '^\[INFO \] vm10 resources: .*; unknown ports 1, ' \
    '^\[INFO \] warnings: 0 WARN hits' \
    '^\[INFO \] run: [0-9]+ VM exits in [0-9]+ TSC ticks' \
    '^\[INFO \] 11 VMs in [0-9]+ time slices; all ended as expected' \
    '^HV-EXIT: 0x10 success'
log=target/runs/bochs-bochs-bios/serial.log
check "bochs: guest serial output and hypercalls reach the log, named per VM" expect_all "$log" \
    '^\[INFO \] \[vm0\] hello from the guest$' \
    '^\[INFO \] \[vm1\] hello from the guest, via the PRINT hypercall$' \
    '^\[INFO \] \[vm0\] tick 3$' '^\[INFO \] \[vm1\] tick 3$' \
    '^\[INFO \] vm0: check 1 passed' '^\[INFO \] vm0: check 2 passed' '^\[INFO \] vm0: check 3 passed' \
    '^\[INFO \] \[vm8\] exit-cost: [0-9]+ TSC ticks per NOP hypercall round trip' \
    '^\[INFO \] \[vm8\] exit-cost: [0-9]+ TSC ticks per CPUID exit'
check "bochs: two guests interleave (round-robin)" expect_in_order "$log" \
    '\[vm0\] tick 1' '\[vm1\] tick 1' '\[vm0\] tick 2' '\[vm1\] tick 2'
check "bochs: bad guests are stopped or refused with a reason, the rest go on" expect_all "$log" \
    '^\[WARN \] vm2: stopped: guest-physical access at 0x30000000 outside its memory' \
    '^\[INFO \] vm3: VMXON in the guest: injecting #UD' '^\[INFO \] vm3: check 10 passed' \
    '^\[INFO \] vm4: refused hypercall: unknown hypercall number 0xdead' '^\[INFO \] vm4: check 20 passed' \
    '^\[WARN \] vm5: stopped: triple fault'
# One line each: an exception the hypervisor injects is re-injected, not
# lost, when its delivery hits an EPT violation (the guest's handler page).
check "bochs: an injected exception is delivered once (re-injected after an EPT violation)" expect_count "$log" 2 \
    '^\[INFO \] vm(3: VMXON in the guest: injecting #UD|10: RDMSR of unknown MSR 0x4b564d00: injecting #GP)$'
check "bochs: every exit reason counted" expect_all "$log" \
    '^\[INFO \] vm0 exits: CPUID=2, VMCALL=[0-9]+, I/O instruction=[0-9]+, EPT violation=[0-9]+' \
    '^\[INFO \] vm5 exits: triple fault=1' \
    '^\[INFO \] vm6 exits: .*VMX-preemption timer expired=[0-9]+'
check "bochs: dedupe converges to the expected counts" expect_count "$log" 1 \
    '^\[INFO \] dedupe converged: pages_shared=96 pages_sharing=160 pages_unshared=128 pages_volatile=0 zero_pages=128 '
check "bochs: re-reading merged memory takes zero EPT violations (change_pte)" expect_count "$log" 2 \
    '^\[INFO \] vm[67]: re-read after merge: 0 EPT violations$'
check "bochs: one COW break per written merged page" expect_count "$log" 2 \
    '^\[INFO \] vm[67]: writes to 10 pages merged before: 10 COW breaks$'
check "bochs: no WARN line" expect_count "$log" 0 '^\[WARN \] WARNING:'

# The same guests with Linux's behaviour (invalidate zaps, change_pte finds
# nothing): every merged page costs one EPT violation on the next read.
smoke linux-zap bochs bios 0 120 "vms=dedupe,dedupe notifier=linux-zap" \
    '^\[INFO \] dedupe converged: pages_shared=96 pages_sharing=160 pages_unshared=128 pages_volatile=0 zero_pages=128 ' \
    '^\[INFO \] 2 VMs in [0-9]+ time slices; all ended as expected' '^HV-EXIT: 0x10 success'
check "linux-zap: re-read after merge takes EPT violations" expect_count target/runs/linux-zap-bochs-bios/serial.log 2 \
    '^\[INFO \] vm[01]: re-read after merge: [1-9][0-9]* EPT violations$'

# Sharing confined to each VM (merging across VMs is a side channel):
# the cross-VM pages stay apart, each VM has its own zero frame, and only
# the intra-VM pages among the written ones (2 per VM) were merged.
smoke share-same-vm bochs bios 0 120 "vms=dedupe,dedupe share=same-vm" \
    '^\[INFO \] dedupe converged: pages_shared=32 pages_sharing=96 pages_unshared=256 pages_volatile=0 zero_pages=128 ' \
    '^\[INFO \] 2 VMs in [0-9]+ time slices; all ended as expected' '^HV-EXIT: 0x10 success'
check "share-same-vm: writes break only same-VM sharing" expect_count target/runs/share-same-vm-bochs-bios/serial.log 2 \
    '^\[INFO \] vm[01]: writes to 10 pages merged before: 2 COW breaks$'
smoke share-off bochs bios 0 120 "vms=dedupe,dedupe share=off" \
    '^\[INFO \] dedupe converged: pages_shared=0 pages_sharing=0 pages_unshared=0 pages_volatile=0 zero_pages=0 ' \
    '^\[INFO \] notifier: invalidate_range_start=0 change_pte=0 ' \
    '^\[INFO \] 2 VMs in [0-9]+ time slices; all ended as expected' '^HV-EXIT: 0x10 success'

# Isolation: guests that try to reach outside themselves, each in its own
# VM beside well-behaved ones (hvcore::hypercall::scenario documents each
# check). Three `isolation` VMs set every piece of CPU state to their own
# values, yield to each other and read them back; the hostile ones loop
# #DB deliveries, flood the log and the check list, forge verdict lines
# and take more memory than their quota. Only they end; the rest pass.
iso_vms="vms=isolation,isolation,isolation,ring3,single-step,db-loop,mwait,cpu-checks,forge,flood,memhog,hello:2048"
smoke isolation bochs bios 0 300 "$iso_vms" \
    '^\[INFO \] vcpu state: (XSAVE|FXSAVE) area of [0-9]+ bytes, XCR0 0x[0-9a-f]+; DR0-3/DR6, [56] MSRs and CR2 switched per VM' \
    '^\[INFO \] == run report ==' \
    '^\[INFO \] vm0 +isolation +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; [0-9]+ checks passed, 0 failed' \
    '^\[INFO \] vm1 +isolation +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; [0-9]+ checks passed, 0 failed' \
    '^\[INFO \] vm2 +isolation +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; [0-9]+ checks passed, 0 failed' \
    '^\[INFO \] vm3 +ring3 +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 9 checks passed, 0 failed' \
    '^\[INFO \] vm4 +single-step +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 7 checks passed, 0 failed' \
    '^\[INFO \] vm5 +db-loop +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  stopped: debug-exception loop: vector 1 at RIP 0x[0-9a-f]+ 10000 times in a row with no progress' \
    '^\[INFO \] vm6 +mwait +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] vm7 +cpu-checks +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 8 checks passed, 0 failed' \
    '^\[INFO \] vm8 +forge +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 1 checks passed, 0 failed' \
    '^\[INFO \] vm9 +flood +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 256 checks passed, 0 failed' \
    '^\[INFO \] vm10 +memhog +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  stopped: frame quota of 1024 frames exceeded' \
    '^\[INFO \] vm11 +hello +program +yes +[0-9]+ +[0-9]+/[0-9]+/2048  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] vm5 exits: exception or NMI=[0-9]{5,}' \
    '^\[INFO \] vm6 exits: .*MWAIT=1, MONITOR=1' \
    '^\[INFO \] vm9 resources: .*refused hypercalls 44, guest log lines dropped [1-9][0-9]+; 256 checks kept \(cap 256\)$' \
    '^\[INFO \] heap: [0-9]+ KiB in use, high-water mark [0-9]+ KiB of 16384 KiB$' \
    '^\[INFO \] 12 VMs in [0-9]+ time slices; all ended as expected' '^HV-EXIT: 0x10 success'
log=target/runs/isolation-bochs-bios/serial.log
check "isolation: hostile guests are stopped by name, the others go on" expect_all "$log" \
    '^\[WARN \] vm5: stopped: debug-exception loop' \
    '^\[WARN \] vm10: stopped: frame quota of 1024 frames exceeded' \
    '^\[INFO \] vm3: refused hypercall: hypercall from CPL 3$'
check "isolation: a CPL 3 PRINT never reaches the log" expect_count "$log" 0 'FORBIDDEN'
# A guest's copy of the verdict line stays behind its [vmN] prefix, and
# nothing but the kernel's own line starts with the marker.
check "isolation: forged verdict lines are prefixed and escaped" expect_all "$log" \
    '^\[INFO \] \[vm8\] HV-EXIT: 0x10 success$' \
    '^\[INFO \] \[vm8\] .*\\x1b\['
check "isolation: one verdict line, the kernel's" expect_count "$log" 1 '^HV-EXIT:'

# The forger beside a VM that fails: the run fails, whatever was printed.
smoke forged-verdict bochs bios 1 120 "vms=forge,fail" \
    '^\[INFO \] \[vm0\] HV-EXIT: 0x10 success$' \
    '^\[INFO \] vm1 +fail +program +NO +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 1; 0 checks passed, 1 failed; NOT as expected' \
    '^\[INFO \] 2 VMs in [0-9]+ time slices; some did NOT end as expected' \
    '^HV-EXIT: 0x11 failure'

# A guest image that cannot be loaded is refused with the reason; the
# other VMs run.
smoke bad-image bochs bios 0 120 "vms=hello bad-image-test=1" \
    '^\[INFO \] vm0 \(hello\): created: program, ' \
    '^\[INFO \] bad-image-test: vm1 \(hello\): refused: guest image program header table lies outside the file' \
    '^\[INFO \] vm0 +hello +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] 1 VMs in [0-9]+ time slices; all ended as expected' '^HV-EXIT: 0x10 success'

# Out of host frames during a COW break: only that VM is stopped; the
# other, which shares pages with it, writes and re-checks all its memory.
smoke oom-test bochs bios 0 120 "vms=dedupe,dedupe,hello oom-test=1" \
    '^\[INFO \] oom-test: vm[01] will find the host out of frames when it writes' \
    '^\[WARN \] vm[01]: stopped: out of host memory' \
    '^\[INFO \] vm2 +hello +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] warnings: 0 WARN hits' \
    '^\[INFO \] 3 VMs in [0-9]+ time slices; all ended as expected' '^HV-EXIT: 0x10 success'
# Which of the two dedupe VMs is starved depends on which reports first.
log=target/runs/oom-test-bochs-bios/serial.log
check "oom-test: only the starved VM stops; the other writes and re-checks all its memory" expect_all "$log" \
    '^\[INFO \] vm[01] +dedupe +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  stopped: out of host memory' \
    '^\[INFO \] vm[01] +dedupe +program +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  exited with code 0; 3 checks passed, 0 failed' \
    '^\[INFO \] vm[01]: check 31 passed'
check "oom-test: one VM out of memory" expect_count "$log" 1 '^\[WARN \] vm[0-9]+: stopped: out of host memory'

# Guests from files (--vm): the guest program named as one, beside files
# that are no multiboot kernel (a text file, an ELF64 without the header):
# those are refused by name, the others run; refusals fail the run.
guest_elf=${CARGO_TARGET_DIR:-target}/x86_64-unknown-none/release/guest
vm_args=(--vm guest:hello --vm README.md --vm "$guest_elf" --label elf64 --vm guest:devices)
smoke guests-from-files bochs bios 1 120 "" \
    '^\[INFO \] vm0 \(hello\): created: program, ' \
    '^\[ERROR\] vm1 \(README.md\): refused: multiboot: (no multiboot header|kernel is not an ELF)' \
    '^\[ERROR\] vm1 \(elf64\): refused: multiboot: no multiboot header \(magic 0x1BADB002\) in the first 8 KiB' \
    '^\[INFO \] vm1 \(devices\): created: program, ' \
    '^HV-VM: vm0 hello exited=0$' \
    '^\[INFO \] vm1 +devices +program +yes +[0-9]+ ' \
    '^\[INFO \] 2 VMs in [0-9]+ time slices; all ended as expected' '^HV-EXIT: 0x11 failure'
vm_args=()

# kvm-unit-tests (../shared/peers, built by the runner): a fast subset,
# each test its own multiboot VM, must keep its results
# (scripts/kvm-unit-tests.py FAST_EXPECT; the full run is its own command).
echo "== kvm-unit-tests (fast subset) =="
kut_out=target/kvm-unit-tests-fast.out
python3 scripts/kvm-unit-tests.py --fast --no-qemu --expect fast >"$kut_out" 2>&1
kut_status=$?
if grep -q '^kvm-unit-tests: skipped' "$kut_out"; then
    skipped=$((skipped + 1))
    echo "skipped: $(grep '^kvm-unit-tests: skipped' "$kut_out")"
elif [ "$kut_status" = 0 ] && grep -q -E '^ours: [0-9]+ passed, 0 failed' "$kut_out"; then
    ok "kvm-unit-tests fast subset: $(grep -E '^ours: ' "$kut_out")"
else
    bad "kvm-unit-tests fast subset (exit status $kut_status, see $kut_out)"
    tail -n 30 "$kut_out" | sed 's/^/   | /'
fi
# A segment outside the VM's memory: kvm-unit-tests kernels load at 4 MiB.
kut_dummy=target/kvm-unit-tests/src/kvm-unit-tests/x86/dummy.flat
if [ -f "$kut_dummy" ]; then
    vm_args=(--vm "$kut_dummy" --mem 2M --label small --vm "$kut_dummy" --mem 32M --label dummy)
    smoke multiboot-bounds bochs bios 1 120 "" \
        '^\[ERROR\] vm0 \(small\): refused: multiboot: segment 0x40[0-9a-f]{4}\+0x[0-9a-f]+ lies outside the VM.s memory' \
        '^\[INFO \] vm0 \(dummy\): created: multiboot, 32 MiB, entry 0x[0-9a-f]+' \
        '^\[INFO \] \[vm0\] Dummy Hello World!$' \
        '^HV-VM: vm0 dummy debug-exit=0$' \
        '^\[INFO \] vm0 +dummy +multiboot +yes +[0-9]+ +[0-9]+/[0-9]+/[0-9]+  debug-exit status 0$' \
        '^HV-EXIT: 0x11 failure'
    vm_args=()
fi

# Linux guests (scripts/linux-guest.sh put Debian's cloud kernel and a
# busybox initramfs in target/linux): three identical VMs run their init's
# workload while the dedupe merges what they share, and a fourth, whose
# init exits at once, panics and resets alone; the others finish. A fifth
# is too small for the kernel and is refused by name. The panicked VM is
# not as expected, and a VM was refused, so the run fails (status 1).
linux_kernel=target/linux/vmlinuz
linux_initrd=target/linux/initramfs.cpio.gz
if [ -f "$linux_kernel" ] && [ -f "$linux_initrd" ]; then
    linux_cmdline="console=ttyS0 quiet cryptomgr.notests hv.hold=5"
    vm_args=()
    for label in linux-a linux-b linux-c; do
        vm_args+=(--vm "$linux_kernel" --initrd "$linux_initrd" --cmdline "$linux_cmdline" --label "$label")
    done
    vm_args+=(--vm "$linux_kernel" --initrd "$linux_initrd" --cmdline "$linux_cmdline hv.panic=1 panic=-1" --label linux-panic)
    # Debian's kernel needs 0x3378000 bytes (init_size) from 16 MiB: 48 MiB is too small.
    vm_args+=(--vm "$linux_kernel" --initrd "$linux_initrd" --mem 48M --label linux-small)
    linux_t0=$(date +%s)
    smoke linux bochs bios 1 1500 "" \
        '^\[INFO \] vm0 \(linux-a\): created: linux, 128 MiB, entry 0x1000000' \
        '^\[INFO \] vm3 \(linux-panic\): created: linux, 128 MiB' \
        '^\[ERROR\] vm4 \(linux-small\): refused: linux: kernel loaded at 0x1000000 needs memory up to 0x[0-9a-f]+ \(init_size\), the VM has 0x3000000$' \
        '^\[INFO \] vm0 +linux-a +linux +yes ' \
        '^\[INFO \] vm1 +linux-b +linux +yes ' \
        '^\[INFO \] vm2 +linux-c +linux +yes ' \
        '^\[INFO \] vm3 +linux-panic +linux +NO .*reset \(reboot\)' \
        '^\[INFO \] dedupe: pages_shared=[1-9][0-9]* pages_sharing=[1-9][0-9]* ' \
        '^\[INFO \] notifier: .* warnings=0$' \
        '^HV-EXIT: 0x11 failure'
    echo "   the Linux boot took $(($(date +%s) - linux_t0)) s"
    linux_log=target/runs/linux-bochs-bios/serial.log
    for n in 0 1 2; do
        check "linux: vm$n reached its init, ran its workload and ended cleanly" expect_in_order "$linux_log" \
            "^\[INFO \] \[vm$n\] HV-LINUX: init started" \
            "^\[INFO \] \[vm$n\] HV-LINUX: workload same=16MiB unique=4MiB same-md5=a5e7ace722514f074e0c7f6fd1520319 " \
            "^\[INFO \] \[vm$n\] HV-LINUX: done" \
            "^HV-VM: vm$n linux-[abc] debug-exit=0$"
    done
    check "linux: the broken init panics and its VM alone resets" expect_in_order "$linux_log" \
        '^\[INFO \] \[vm3\] .*Kernel panic - not syncing: Attempted to kill init!' \
        '^HV-VM: vm3 linux-panic reset$'
    check "linux: no re-read of a merged page faulted" expect_all "$linux_log" \
        '^\[INFO \] memory: ept_violations=[0-9]+ \(not_present=[0-9]+ refaults=0 '
    vm_args=()
else
    skipped=$((skipped + 1))
    echo "skipped: Linux guests ($linux_kernel or $linux_initrd missing: run bash scripts/linux-guest.sh)"
fi

# The negative test of the notifier contract: change_pte outside a bracket
# once. Exactly one WARN line, the counter at 1, and every guest still fine.
smoke warn-test bochs bios 0 120 "vms=hello,dedupe,dedupe warn-test=1" \
    '^\[INFO \] warn-test: change_pte on vm0 gpa 0x200000 with no invalidation in flight' \
    '^\[WARN \] WARNING: kernel/core/src/mmu_notifier.rs:[0-9]+: change_pte\(gfn 0x200\) with no invalidation in flight' \
    '^\[INFO \] dedupe converged: pages_shared=96 pages_sharing=160 ' \
    '^\[INFO \] notifier: .* warnings=1$' \
    '^\[INFO \] warnings: 1 WARN hits' \
    '^\[INFO \] 3 VMs in [0-9]+ time slices; all ended as expected' '^HV-EXIT: 0x10 success'
check "warn-test: exactly one WARN line" expect_count target/runs/warn-test-bochs-bios/serial.log 1 '^\[WARN \] WARNING:'

# (b), (c) QEMU without VMX: both boot paths, and the "no VMX" report.
for fw in bios uefi; do
    smoke "qemu-$fw" qemu "$fw" 3 120 "" "${summary_head[@]}" \
        'cpu features: vmx=no' "${summary_tail[@]}" \
        '^\[ERROR\] cannot run guests: the CPU has no VMX \(CPUID.1:ECX.VMX\[bit 5\] is 0\)' \
        '^HV-EXIT: 0x12 no-vmx'
done

# QEMU with KVM where the host gives VMX to its guests (nested).
kvm_out=target/smoke-qemu-kvm.out
if cargo run --quiet -- --name qemu-kvm --emulator qemu-kvm --timeout 120 --options "$all_vms" --quiet >"$kvm_out" 2>&1; then
    ok "qemu-kvm: nested VMX run"
elif grep -q -E "no nested VMX|/dev/kvm|vmx flag|kvm_intel" "$kvm_out"; then
    skipped=$((skipped + 1))
    echo "skipped: no nested VMX on this host ($(grep -o -E '(/dev/kvm|the host CPU|kvm_intel)[^;]*' "$kvm_out" | head -1))"
else
    bad "qemu-kvm: nested VMX run"
    tail -n 25 "$kvm_out" | sed 's/^/   | /'
fi

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
smoke panic-test qemu bios 1 60 "panic-test=1" \
    '^\[PANIC\] panic-test: panicking on purpose at kernel/src/main.rs:[0-9]+:[0-9]+' \
    '^HV-EXIT: 0x11 failure'

# A missing emulator is named, with the command that installs it.
out=target/smoke-missing-emulator.out
PATH="$(dirname "$(command -v cargo)")" cargo run --quiet -- --emulator qemu >"$out" 2>&1
status=$?
if [ "$status" = 2 ] && grep -q 'qemu-system-x86_64 not found: install it with `apt-get install qemu-system-x86`' "$out"; then
    ok "missing-emulator: named with its install command, exit status 2"
else
    bad "missing-emulator: exit status $status"
    sed 's/^/   | /' "$out"
fi

echo
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]

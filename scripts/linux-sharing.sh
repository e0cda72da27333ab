#!/usr/bin/env bash
# What KSM saves on identical Linux VMs, measured in Bochs: boots of 1 and
# N VMs (default 3), with the kernel's default KASLR and with nokaslr, and
# the N-VM boot with share=off beside them. Prints, per boot, the host
# frames in use at the end (every VM has run its workload: see
# scripts/linux-guest/init) and the saving, then what each VM after the
# first costs. Needs target/linux/ (bash scripts/linux-guest.sh).
#   bash scripts/linux-sharing.sh [N]
# A measurement, not a test: it prints numbers and fails only if a boot
# does not end as expected.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3}
kernel=target/linux/vmlinuz
initrd=target/linux/initramfs.cpio.gz
[ -f "$kernel" ] && [ -f "$initrd" ] || { echo "linux-sharing: run bash scripts/linux-guest.sh first" >&2; exit 2; }
base="console=ttyS0 quiet cryptomgr.notests hv.hold=5"

# boot NAME VMS OPTIONS EXTRA-CMDLINE: one Bochs boot of VMS identical VMs.
boot() {
    local name=$1 vms=$2 options=$3 extra=$4 args=() i
    for ((i = 0; i < vms; i++)); do
        args+=(--vm "$kernel" --initrd "$initrd" --cmdline "$base $extra" --label "linux-$i")
    done
    local t0=$SECONDS
    if ! cargo run --quiet -- --name "$name" --emulator bochs --timeout 2400 --quiet \
        --options "$options" "${args[@]}" >"target/$name.out" 2>&1; then
        echo "linux-sharing: boot $name failed (target/$name.out)" >&2
        tail -n 20 "target/$name.out" >&2
        exit 1
    fi
    echo "$name: $((SECONDS - t0)) s of wall time" >&2
}

# frames NAME: the host frames in use at the end of that boot.
frames() {
    tr -d '\r' <"target/runs/$1-bochs-bios/serial.log" |
        sed -n -E 's/^\[INFO \] sharing: host frames in use ([0-9]+) .*/\1/p'
}
saved() {
    tr -d '\r' <"target/runs/$1-bochs-bios/serial.log" |
        sed -n -E 's/^\[INFO \] sharing: .* saved ([0-9]+) frames.*/\1/p'
}

boot lxs-kaslr-1 1 "" ""
boot lxs-kaslr-n "$n" "" ""
boot lxs-nokaslr-1 1 "" nokaslr
boot lxs-nokaslr-n "$n" "" nokaslr
boot lxs-off-n "$n" "share=off" ""

mib() { echo "$(($1 / 256)).$(($1 % 256 * 10 / 256))"; }
off=$(frames lxs-off-n)
printf '%-16s %6s %12s %12s %10s\n' boot VMs "frames used" "saved" "of share=off"
for b in lxs-kaslr-1 lxs-kaslr-n lxs-nokaslr-1 lxs-nokaslr-n lxs-off-n; do
    vms=$n
    [ "${b: -1}" = 1 ] && vms=1
    f=$(frames "$b")
    printf '%-16s %6s %8s MiB %8s MiB %9s%%\n' "$b" "$vms" "$(mib "$f")" "$(mib "$(saved "$b")")" \
        "$(( (f * 100 + off / 2) / off ))"
done
for k in kaslr nokaslr; do
    one=$(frames "lxs-$k-1")
    all=$(frames "lxs-$k-n")
    echo "$k: the first VM $(mib "$one") MiB; each further VM $(mib $(( (all - one) / (n - 1) ))) MiB"
done

#!/usr/bin/env bash
# Fetches and builds what the hypervisor's Linux guests run, and checks it
# under QEMU TCG as the reference. Everything goes under target/linux/;
# nothing is installed on the host (apt-get download + dpkg-deb, no root).
#
#   scripts/linux-guest.sh            # build (idempotent; quick when done):
#       target/linux/vmlinuz            Debian's linux-image-cloud-amd64 kernel
#       target/linux/initramfs.cpio.gz  busybox-static + scripts/linux-guest/init
#       target/linux/versions.txt       the package versions used
#       target/linux/config             the kernel's .config
#   scripts/linux-guest.sh --update   # download the newest packages again
#   scripts/linux-guest.sh --cmdline  # print the kernel command line
#                                     # recommended for the hypervisor
#   scripts/linux-guest.sh --qemu [BOOT...]
#       build, then boot under QEMU TCG (all of these, or the ones named),
#       checking the HV-LINUX lines and QEMU's exit status; logs in
#       target/linux/qemu-BOOT.log:
#       pc       -M pc, the whole PC (ACPI, IOAPIC, HPET): the reference
#       hvlike   -M pc without ACPI tables, HPET, VGA, disks: the nearest to
#                the hypervisor's virtual PC, with the recommended command line
#       pic      the same with acpi=off: no local APIC either (8259 + PIT)
#       microvm  -M microvm: no PCI, no i8042, no port 0x61 either
#       panic    hvlike with hv.panic=1: /init exits, the kernel panics
#   --append "hv.same=64 hv.hold=0"   # extra kernel command line words
#   --timeout SECONDS                 # per QEMU boot (default 60)
#   --mem SIZE                        # guest memory (default 256M; 128M fits
#                                     # the default workload, 72M boots)
#
# The guest's /init (scripts/linux-guest/init) reads hv.same=MiB (16),
# hv.unique=MiB (4), hv.hold=seconds (5) and hv.panic=1 from the kernel
# command line, prints "HV-LINUX: ..." lines on the console and ends the VM
# through isa-debug-exit at port 0xf4 (status 0 = success, 1 = failure).
# Exit status: 0 success, 1 failure, 2 bad usage or a missing tool.
set -euo pipefail
cd "$(dirname "$0")/.."

# The kernel command line recommended for the hypervisor's virtual PC (no
# ACPI, IOAPIC, MP table, HPET or PCI device). Not acpi=off: in this kernel
# it also turns the local APIC off (see boot_pic below). noapic changes
# nothing (no IOAPIC is found anyway). pci=off skips probing an empty bus.
HV_CMDLINE="console=ttyS0 earlyprintk=serial,ttyS0,115200 pci=off"

here=scripts/linux-guest
out=target/linux
debs=$out/debs
meta_pkg=linux-image-cloud-amd64
bb_pkg=busybox-static

say() { echo "linux-guest: $*"; }
die() { echo "linux-guest: error: $*" >&2; exit 1; }
usage() {
    local text
    text=$(sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//')
    if [ "${1:-0}" = 0 ]; then echo "$text"; else echo "$text" >&2; fi
    exit "${1:-0}"
}

all_boots=(pc hvlike pic microvm panic)
qemu=0 update=0 append="" timeout=60 mem=256M boots=()
while (($#)); do
    case "$1" in
        --qemu) qemu=1 ;;
        --cmdline) echo "$HV_CMDLINE"; exit 0 ;;
        --update) update=1 ;;
        --append) (($# >= 2)) || usage 2; append=$2; shift ;;
        --timeout) (($# >= 2)) || usage 2; timeout=$2; shift ;;
        --mem) (($# >= 2)) || usage 2; mem=$2; shift ;;
        -h|--help) usage 0 ;;
        pc|hvlike|pic|microvm|panic) ((qemu)) || usage 2; boots+=("$1") ;;
        *) echo "linux-guest: unknown argument '$1'" >&2; usage 2 ;;
    esac
    shift
done

need() {
    command -v "$1" >/dev/null ||
        { echo "linux-guest: $1 not found (Debian: apt-get install $2)" >&2; exit 2; }
}
need apt-get apt
need dpkg-deb dpkg
need tar tar
need python3 python3

# deb_of DIR PACKAGE [VERSION]: the .deb of PACKAGE (at VERSION) in DIR, or "".
deb_of() {
    local f
    for f in "$1/$2"_*_amd64.deb; do
        [ -e "$f" ] || continue
        [ "$(dpkg-deb -f "$f" Package)" = "$2" ] || continue
        [ -z "${3:-}" ] || [ "$(dpkg-deb -f "$f" Version)" = "$3" ] || continue
        echo "$f"
        return
    done
}

# apt_download DIR PACKAGE[=VERSION]...
apt_download() {
    local dir=$1
    shift
    say "downloading $* into $dir"
    if ! (cd "$dir" && apt-get -q -o APT::Sandbox::User="$(id -un)" download "$@") \
        >"$dir/apt.log" 2>&1; then
        sed 's/^/    /' "$dir/apt.log" >&2
        die "apt-get download $* failed (are the package lists there? as root: apt-get update)"
    fi
}

# kernel_dep META_DEB: "PACKAGE VERSION" of the real kernel the metapackage names.
kernel_dep() {
    local dep
    dep=$(dpkg-deb -f "$1" Depends)
    # e.g. "linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)"
    [[ $dep =~ ^(linux-image-[^ ,]+)\ \(=\ ([^\)]+)\)$ ]] ||
        die "unexpected Depends of $1: '$dep'"
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
}

# complete DIR: are the three .debs there?
complete() {
    local meta kpkg kver
    meta=$(deb_of "$1" "$meta_pkg")
    [ -n "$meta" ] && [ -n "$(deb_of "$1" "$bb_pkg")" ] || return 1
    read -r kpkg kver < <(kernel_dep "$meta")
    [ -n "$(deb_of "$1" "$kpkg" "$kver")" ]
}

fetch() {
    local new=$out/debs.new meta kpkg kver
    rm -rf "$new"
    mkdir -p "$new"
    apt_download "$new" "$meta_pkg" "$bb_pkg"
    meta=$(deb_of "$new" "$meta_pkg")
    [ -n "$meta" ] || die "apt-get download $meta_pkg left no .deb in $new"
    read -r kpkg kver < <(kernel_dep "$meta")
    apt_download "$new" "$kpkg=$kver"
    complete "$new" || die "downloaded .debs in $new are incomplete"
    rm -f "$new/apt.log"
    rm -rf "$debs"
    mv "$new" "$debs"
}

mkdir -p "$out"
if ((update)) || ! complete "$debs" 2>/dev/null; then
    fetch
fi
meta=$(deb_of "$debs" "$meta_pkg")
read -r kpkg kver < <(kernel_dep "$meta")
kdeb=$(deb_of "$debs" "$kpkg" "$kver")
bdeb=$(deb_of "$debs" "$bb_pkg")
bver=$(dpkg-deb -f "$bdeb" Version)
krel=${kpkg#linux-image-}

# Unpack only what is needed (the kernel package is 107 MB unpacked, mostly
# modules that an initramfs-only guest does not load).
kdir=$out/unpack/$kpkg-$kver
if [ ! -e "$kdir/.done" ]; then
    say "unpacking $kdeb"
    rm -rf "$kdir"
    mkdir -p "$kdir"
    dpkg-deb --fsys-tarfile "$kdeb" | tar -xf - -C "$kdir" ./boot ||
        die "unpacking ./boot of $kdeb failed"
    touch "$kdir/.done"
fi
bdir=$out/unpack/$bb_pkg-${bver//:/_}
if [ ! -e "$bdir/.done" ]; then
    say "unpacking $bdeb"
    rm -rf "$bdir"
    mkdir -p "$bdir"
    dpkg-deb -x "$bdeb" "$bdir" || die "dpkg-deb -x $bdeb failed"
    touch "$bdir/.done"
fi
for f in "$kdir/boot/vmlinuz-$krel" "$bdir/bin/busybox"; do
    [ -f "$f" ] || die "$f missing after unpacking"
done

# install_if_changed SRC DST: copy only when different (keeps DST's mtime).
built=0
install_if_changed() { cmp -s "$1" "$2" || { cp "$1" "$2" && built=1; }; }
install_if_changed "$kdir/boot/vmlinuz-$krel" "$out/vmlinuz"
install_if_changed "$kdir/boot/config-$krel" "$out/config"

initrd=$out/initramfs.cpio.gz
if [ ! -e "$initrd" ] || [ "$here/init" -nt "$initrd" ] ||
   [ "$here/mkinitramfs.py" -nt "$initrd" ] || [ "$bdir/bin/busybox" -nt "$initrd" ]; then
    python3 "$here/mkinitramfs.py" "$bdir/bin/busybox" "$here/init" "$initrd" ||
        die "building $initrd failed"
    touch "$initrd"
    built=1
fi

versions="kernel $kpkg $kver, busybox $bver"
echo "$versions" >"$out/versions.txt.tmp"
install_if_changed "$out/versions.txt.tmp" "$out/versions.txt"
rm -f "$out/versions.txt.tmp"
say "$versions"
((built == 0)) ||
    say "built $out/vmlinuz ($(stat -c %s "$out/vmlinuz") bytes), $initrd ($(stat -c %s "$initrd") bytes)"

((qemu)) || exit 0
((${#boots[@]})) || boots=("${all_boots[@]}")

need qemu-system-x86_64 qemu-system-x86
need timeout coreutils

# boot NAME WANT_STATUS "MACHINE OPTIONS" "KERNEL COMMAND LINE" PATTERN...
# Boots under QEMU TCG with a timeout; passes if QEMU exits with WANT_STATUS
# and every PATTERN (an extended regex) is a line of the serial log.
failed=0
boot() {
    local name=$1 want=$2 machine=$3 cmdline=${4% } log=$out/qemu-$1.log
    shift 4
    local t0 t1 rc=0 missing=() p
    echo "linux-guest: qemu $name: -append \"$cmdline\""
    t0=$(date +%s%N)
    # shellcheck disable=SC2086 # $machine is a list of options
    timeout "$timeout" qemu-system-x86_64 $machine -accel tcg -cpu qemu64 -m "$mem" \
        -nographic -no-reboot -kernel "$out/vmlinuz" -initrd "$initrd" \
        -append "$cmdline" -device isa-debug-exit,iobase=0xf4,iosize=4 \
        </dev/null 2>&1 | tr -d '\r' >"$log" || rc=${PIPESTATUS[0]}
    t1=$(date +%s%N)
    for p in "$@"; do
        grep -Eq "$p" "$log" || missing+=("$p")
    done
    local wall uptime
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    uptime=$(sed -n 's/^HV-LINUX: meminfo .*uptime=\([0-9.]*\)s.*/\1/p' "$log" | head -1)
    if [ "$rc" = "$want" ] && ((${#missing[@]} == 0)); then
        say "qemu $name: PASS (exit $rc, wall ${wall}s, guest uptime at init ${uptime:-n/a}${uptime:+s}; $log)"
    else
        failed=1
        say "qemu $name: FAIL (exit $rc, want $want$( ((rc == 124)) && echo ": timeout ${timeout}s"); wall ${wall}s; $log)"
        for p in "${missing[@]}"; do say "    missing line: $p"; done
        tail -n 15 "$log" | sed 's/^/    | /'
    fi
    grep '^HV-LINUX:' "$log" | sed 's/^/    /' || true
}

ok=('^HV-LINUX: init started$' '^HV-LINUX: meminfo MemTotal=[0-9]+ kB MemFree=[0-9]+ kB'
    '^HV-LINUX: workload same=[0-9]+MiB unique=[0-9]+MiB same-md5=[0-9a-f]{32} .*done$'
    '^HV-LINUX: done')
# The machines. hvlike is the nearest QEMU has to the hypervisor's virtual PC:
# no ACPI tables, no HPET, no VGA, no disks, no USB/SMBus; the IOAPIC that
# remains is described only by SeaBIOS's MP table, which this kernel cannot
# read (CONFIG_X86_MPPARSE is not set), so it is not used. microvm has in
# addition no PCI, no i8042 and no port 0x61 (so no TSC calibration).
pc="-M pc"
hvlike="-M pc,acpi=off,hpet=off,smbus=off,sata=off,usb=off -nodefaults -vga none -serial stdio"
microvm="-M microvm,acpi=off,pcie=off,x-option-roms=off"
# isa-debug-exit: status 0 -> QEMU exits with (0 << 1) | 1 = 1.
boot_pc() { boot pc 1 "$pc" "console=ttyS0 hv.hold=1 $append" "${ok[@]}"; }
boot_hvlike() { boot hvlike 1 "$hvlike" "$HV_CMDLINE hv.hold=1 $append" "${ok[@]}"; }
# acpi=off also turns the local APIC off in this kernel (no MP-table code:
# "MPS support code is not built-in"): the 8259 and the PIT alone. The kernel
# then never touches the local APIC, so the 8259's interrupts reach the CPU
# only if LINT0 is ExtINT and unmasked at entry, as SeaBIOS leaves it on -M
# pc (on -M microvm, whose firmware leaves LINT0 masked, this boot hangs
# before "Calibrating delay loop": no timer interrupt ever arrives).
boot_pic() { boot pic 1 "$hvlike" "$HV_CMDLINE acpi=off hv.hold=1 $append" "${ok[@]}"; }
boot_microvm() { boot microvm 1 "$microvm" "$HV_CMDLINE hv.hold=1 $append" "${ok[@]}"; }
# Negative test: init exits, the kernel panics; panic=-1 reboots at once (the
# i8042 reset) and -no-reboot makes QEMU exit 0.
boot_panic() {
    boot panic 0 "$hvlike" "$HV_CMDLINE panic=-1 hv.panic=1 $append" \
        '^HV-LINUX: init started$' '^HV-LINUX: hv.panic=1: init exits$' \
        'Kernel panic - not syncing: Attempted to kill init!'
}
for b in "${boots[@]}"; do "boot_$b"; done
exit "$failed"

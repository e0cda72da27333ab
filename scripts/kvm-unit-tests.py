#!/usr/bin/env python3
"""Conformance runner: kvm-unit-tests' x86_64 tests under our hypervisor
(in Bochs) next to QEMU TCG, with kvm-unit-tests' own verdicts.

    python3 scripts/kvm-unit-tests.py [--source PATH] [--tests a,b | --fast]
        [--per-boot N] [--no-qemu] [--no-bochs] [--jobs N] [--timeout S]
        [--expect FILE|fast] [--write-expect FILE] [--selftest]

See docs/kvm-unit-tests.md. Python 3 standard library only.

kvm-unit-tests (GPLv2) is not part of this project: this script reads its
unittests.cfg and runs its test kernels; it copies none of its code. Every
place where a rule of kvm-unit-tests is reproduced names the file and the
function it comes from (commit 1da1819e).
"""

import argparse
import concurrent.futures
import glob
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path("target/kvm-unit-tests")          # relative to the repository root

OURS = "ours"
QEMU = "qemu-tcg"
COLUMNS = (OURS, QEMU)
RESULTS = ("PASS", "FAIL", "SKIP", "ABORT", "TIMEOUT")
NOT_RUN = "not run"

# --- what is selected ---------------------------------------------------------

# Tests that unittests.cfg lists with smp > 1 but that are worth running on
# one CPU (our VMs have one vCPU); they run with "-smp 1" in both columns.
#   xapic, x2apic: x86/apic.c checks cpu_count() < 2 before each test that
#     needs a second CPU and reports it as skipped; the rest (APIC ID,
#     enable/disable, self-IPI, timer modes, TSC deadline) is the local
#     APIC of the platform (docs: DESIGN.md "The virtual platform").
#   vmexit_cr0_wp, vmexit_cr4_pge: x86/vmexit.c runs them with on_cpus(),
#     which on one CPU is the plain loop: the cost of a CR0/CR4 write exit.
# Not here: smptest/smptest3 (they test the second CPU and nothing else),
# vmexit_ipi/ipi_halt (skipped by vmexit.c's is_smp() on one CPU), and the
# svm/vmx/hyperv/kvmclock/cet/ioapic/intel_iommu entries (see EXCLUDED).
ONE_CPU = {
    "xapic": "one CPU: apic.c skips its SMP cases itself",
    "x2apic": "one CPU: apic.c skips its SMP cases itself",
    "vmexit_cr0_wp": "one CPU: on_cpus() is a plain loop",
    "vmexit_cr4_pge": "one CPU: on_cpus() is a plain loop",
}

# Tests that need a device, firmware table or host interface that the
# platform will not have (DESIGN.md: a 16550, isa-debug-exit, fw_cfg,
# empty PCI config space, a local APIC, PIC/PIT; no ACPI, no IOAPIC, no
# QEMU test devices, no KVM or Hyper-V paravirtual interfaces). Checked
# before the smp rule, so these name their real reason.
EXCLUDED = {
    "s3": "needs ACPI (FADT/FACS) and an RTC alarm to wake from S3",
    "vmexit_inl_pmtimer": "needs the ACPI PM timer (found through the FADT)",
    "ioapic": "needs an IOAPIC and pc-testdev's IRQ lines (port 0x2000)",
    "intel_iommu": "needs the intel-iommu and edu devices on q35",
    "hyperv_synic": "needs Hyper-V enlightenments and hyperv-testdev",
    "hyperv_connections": "needs Hyper-V enlightenments and hyperv-testdev",
    "hyperv_stimer": "needs Hyper-V enlightenments (synthetic timers)",
    "hyperv_stimer_direct": "needs Hyper-V enlightenments (synthetic timers)",
    "hyperv_clock": "needs the Hyper-V reference TSC page",
    "kvmclock_test": "needs KVM's paravirtual clock (kvmclock MSRs)",
    "asyncpf": "needs KVM's paravirtual async page faults (-cpu host: KVM only)",
    "vmware_backdoors": "needs the VMware backdoor port (vmport) and KVM",
}

# Test kernels that are not in unittests.cfg but run like one of its
# entries (x86/dummy.c: the canary scripts/runtime.bash uses for EFI).
EXTRA_TESTS = [
    {"name": "dummy", "file": "dummy.flat"},
]

# The quick subset the test command runs (scripts/test.sh): tests that take
# seconds in Bochs and cover the boot path, the CPU the guest is shown,
# exceptions, MSRs and the local APIC. The vmexit_* tests loop for 2^30
# TSC cycles (x86/vmexit.c GOAL): minutes in Bochs, so only in the full
# run; sieve likewise. The expected results are what the tests' sources ask
# of a VMX hypervisor on Intel that shows a consistent CPU (DESIGN.md "The
# vCPU"), and what our column gives (docs/kvm-unit-tests.md).
FAST = ["dummy", "setjmp", "tsc", "xsave", "memory", "syscall", "hypercall", "idt_test", "umip", "smap",
        "rmap_chain", "msr64", "xapic"]
FAST_EXPECT = {
    "dummy": "PASS",         # x86/dummy.c: prints a line, returns 0
    "setjmp": "PASS",        # setjmp/longjmp inside the guest only
    "tsc": "PASS",           # RDTSC/WRMSR TSC, RDTSCP with TSC_AUX (switched per VM)
    "xsave": "PASS",         # XSETBV/XGETBV and XCR0 as CPUID shows them
    "memory": "PASS",        # CLFLUSH, fences, and what else CPUID shows
    "syscall": "PASS",       # SYSCALL/SYSRET MSRs; the TF case is skipped on
                             # Intel without pc-testdev (x86/syscall.c)
    "hypercall": "PASS",     # VMCALL returns, VMMCALL is #UD on Intel, and a
                             # VMCALL at 0x7ffffffffffd returns to an exception
                             # at the non-canonical 0x800000000000 (test_edge
                             # in x86/hypercall.c), not a failed VM entry
    "idt_test": "PASS",      # #GP (an injected one: RF set) and #UD
    "umip": "PASS",          # UMIP where shown, else its checks skip inside
    "smap": "PASS",          # SMAP/SMEP page walks in the guest
    "rmap_chain": "PASS",    # many mappings of one page (EPT, lazy backing)
    "msr64": "PASS",         # the MSRs a CPU has, #GP for the rest, x2APIC MSRs
    "xapic": "PASS",         # x86/apic.c on one CPU: the local APIC model
}

# --- our hypervisor -----------------------------------------------------------

# Largest guest memory the runner accepts for one VM (kernel/core/src/
# manifest.rs MAX_MEM, 3 GiB); a larger -m would make the runner refuse the
# whole boot, so such a test is "not run" in our column.
OURS_MAX_MEM_MIB = 3 << 10
# Boot overhead added to the sum of the VMs' timeouts (the VMs of one boot
# share one CPU, so their times add up).
BOOT_OVERHEAD_S = 60
# Bochs emulates every instruction: a test's cfg timeout (made for KVM or
# TCG) is multiplied by this in our column. Measured: x86/vmexit.c's
# cpuid test (2^30 TSC cycles of loop) took 5 min in Bochs on a loaded
# 2-vCPU Xeon, 2.2 s in TCG.
BOCHS_TIMEOUT_FACTOR = 5
# What kvm-unit-tests' lib/x86/fwcfg.c read_cfg_override() takes from the
# environment instead of fw_cfg: one CPU, the RAM size in MiB, and
# TEST_DEVICE=0 because the platform has no pc-testdev (with it 0,
# x86/eventinj.c skips the pc-testdev page-flush port 0xe4 and io.c's exit()
# prints "--- DONE" if port 0xf4 did not end the VM).
OURS_HAS_PC_TESTDEV = False
# Tests that get a Bochs boot of their own, and why. Bochs 2.7 (Debian 12's)
# keeps the virtual-NMI blocking of the last VM it ran across VM entries: its
# VM entry sets the blocking when the VMCS says "blocked by NMI" but never
# clears it, and VM exit leaves it as it is (bochs/cpu/vmx.cc; SF bug #1456,
# fixed upstream in bd51ec5f8, 2023, after 2.7). A VM preempted inside its
# NMI handler thus blocks NMIs in the next VM entered, and from there (each
# VM exit saves the blocking Bochs has) in every VM, until each runs an
# IRET. eventinj sends itself an NMI right after its nested handler's IRET
# and expects it at once; next to other VMs it can find the blocking back.
# apic.c (xapic, x2apic) sends itself NMIs too (test_pending_nmi): x2apic
# hung there next to xapic in one boot. A real CPU loads the blocking from
# the VMCS on every entry (SDM Vol. 3C 27.3.1.5), so alone each runs as it
# would on hardware. (The tests of the selection that send NMIs: grep
# APIC_DM_NMI x86/*.c.)
NMI_LEAK = "Bochs 2.7 carries virtual-NMI blocking across VM entries (SF #1456)"
ALONE = {"eventinj": NMI_LEAK, "xapic": NMI_LEAK, "x2apic": NMI_LEAK}


def hv_command(boot_name, timeout_s, vms):
    """The runner's command line for one boot of several VMs (the contract
    of `cargo run -- --vm`, docs/kvm-unit-tests.md). Each modifier follows
    its --vm. Only this function knows the syntax.

    `vms`: dicts with kernel (path), mem_mib, cmdline, label, env (path).
    The guest's multiboot command line is the program name, a space and
    `cmdline` (as QEMU passes it; x86/cstart64.S takes argv[0] from its
    first word), so `cmdline` is only what QEMU's -append would get.
    """
    prefix = shlex.split(os.environ.get("KUT_HV_RUNNER", "cargo run --quiet --"))
    cmd = prefix + ["--name", boot_name, "--emulator", "bochs",
                    "--timeout", str(int(timeout_s)), "--quiet"]
    for vm in vms:
        cmd += ["--vm", str(vm["kernel"]), "--mem", "%dM" % vm["mem_mib"]]
        if vm["cmdline"]:
            cmd += ["--cmdline", vm["cmdline"]]
        cmd += ["--label", vm["label"]]
        if vm.get("env"):
            cmd += ["--module", str(vm["env"])]
    return cmd


def serial_log_path(root, boot_name):
    return Path(root) / "target/runs" / ("%s-bochs-bios" % boot_name) / "serial.log"


def vm_label(name):
    """A label the manifest accepts: [A-Za-z0-9._-], 1..=32 bytes
    (kernel/core/src/manifest.rs valid_label); long names are cut and made
    unique with a hash."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "t"
    if len(clean) <= 32 and clean == name:
        return clean
    return clean[:24] + "-" + hashlib.sha1(name.encode()).hexdigest()[:7]


# --- kvm-unit-tests' verdicts -------------------------------------------------

def qemu_exit_status(value):
    """QEMU's isa-debug-exit: a guest write of V to its port ends QEMU with
    exit((V << 1) | 1); the shell sees the low 8 bits."""
    return ((value << 1) | 1) & 0xFF


def qemu_fixup_return_code(ret, errors):
    """scripts/vmm.bash qemu_fixup_return_code(): 0 from QEMU (no
    debug-exit, or a signal named on stderr) is a failure; 1 (the guest
    wrote 0) is success unless stderr holds a line without "warning"."""
    sig = None
    if errors:
        for line in errors.splitlines():
            m = re.search(r"terminating on signal ([0-9]+)", line)
            if m:
                sig = int(m.group(1))
                break
    if ret == 0:
        return sig + 128 if sig is not None else 1
    if ret == 1:
        if errors:
            # `grep -qvi warning <<<"$errors"`: some line lacks "warning"
            # ($(...) dropped the trailing newlines; <<< adds one back).
            lines = errors.rstrip("\n").split("\n")
            if not any("warning" not in l.lower() for l in lines):
                return 0
            return 1
        return 0
    return ret


def kut_verdict(ret):
    """scripts/runtime.bash run(): 0 PASS, 77 SKIP, 124 "FAIL (timeout;
    duration=...)" -- our TIMEOUT --, 127 the TAP output's "aborted" (the
    guest called abort(): lib/abort.c exits with 63, QEMU makes it 127) --
    our ABORT --, > 127 "FAIL (terminated on SIG...)", anything else FAIL."""
    if ret == 0:
        return "PASS", ""
    if ret == 77:
        return "SKIP", ""
    if ret == 124:
        return "TIMEOUT", ""
    if ret == 127:
        return "ABORT", "guest called abort()"
    if ret > 127:
        return "FAIL", "status %d (kvm-unit-tests reads a signal %d)" % (ret, ret - 128)
    return "FAIL", ""


def verdict_from_debug_exit(value):
    """Our column: the value V the guest wrote to port 0xF4 becomes the
    status QEMU would have exited with, then kvm-unit-tests' mapping (no
    stderr: the hypervisor's own messages are not the guest's)."""
    return kut_verdict(qemu_fixup_return_code(qemu_exit_status(value), ""))


def summary_of(lines):
    """scripts/runtime.bash extract_summary(): the SUMMARY: line among the
    last 5 lines of output, shown as "(...)"."""
    for line in lines[-5:]:
        if line.startswith("SUMMARY: "):
            return "(" + line[len("SUMMARY: "):].rstrip("\r") + ")"
    return ""


# --- unittests.cfg ------------------------------------------------------------

def parse_cfg(text):
    """scripts/common.bash for_each_unittest(): [name] starts an entry;
    keys file, smp, test_args, qemu_params|extra_params (also a
    triple-quoted value over several lines), groups, arch, machine, check,
    disabled_if, accel, timeout. Returns a list of dicts in file order."""
    entries = []
    cur = None
    lines = text.split("\n")
    i = 0
    keyre = re.compile(r"^(file|smp|test_args|qemu_params|extra_params|groups|arch|"
                       r"machine|check|disabled_if|accel|timeout) *= *(.*)$")
    while i < len(lines):
        line = lines[i].strip()     # `read -r line` trims IFS whitespace
        i += 1
        m = re.match(r"^\[(.*)\]$", line)
        if m:
            cur = {"name": m.group(1)}
            entries.append(cur)
            continue
        m = keyre.match(line)
        if not m or cur is None:
            continue
        key, value = m.group(1), m.group(2)
        if key in ("qemu_params", "extra_params"):
            key = "opts"
            if value.startswith('"""'):
                value = value[3:]
                if value.rstrip().endswith('"""'):
                    value = value.rstrip()[:-3]
                else:
                    parts = [value]
                    while i < len(lines):
                        reply = lines[i]
                        i += 1
                        if parts[-1].endswith("\\"):    # backslash-newline
                            parts[-1] = parts[-1][:-1]
                        m2 = re.match(r'^(.*)"""\s*$', reply)
                        if m2:
                            parts.append(m2.group(1))
                            break
                        parts.append(reply)
                    value = "\n".join(parts)
        cur[key] = value
    return [e for e in entries if e["name"]]


def shell_words(text):
    """The words bash's eval makes of a cfg value (runtime.bash run() evals
    the command line). Backticks and $(...) are not expanded here."""
    if "`" in text or "$(" in text:
        raise ValueError("needs shell expansion: %s" % text)
    return shlex.split(text, comments=False, posix=True)


def parse_duration(text, default=90.0):
    """timeout(1)'s DURATION: a number with an optional s/m/h/d suffix."""
    m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*$", text or "")
    if not m:
        return default
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_mem_mib(opts_words):
    """QEMU's -m: a size with an optional k/M/G/T suffix, MiB when there is
    none (also "size=..."); the last -m wins. None when there is no -m."""
    mem = None
    for i, w in enumerate(opts_words):
        if w == "-m" and i + 1 < len(opts_words):
            v = opts_words[i + 1].split(",")[0]
            if v.startswith("size="):
                v = v[5:]
            m = re.match(r"^([0-9]+(?:\.[0-9]+)?)([kKmMgGtT]?)[bB]?$", v)
            if m:
                n = float(m.group(1))
                unit = m.group(2).lower()
                mem = int(n * {"": 1, "m": 1, "k": 1 / 1024, "g": 1024, "t": 1 << 20}[unit])
    return mem


# x86/run passes no -m and no -cpu, so QEMU's defaults apply: 128 MiB
# (QEMU's default RAM size for the pc machine) and its default CPU model.
DEFAULT_MEM_MIB = 128
DEFAULT_TIMEOUT = "90s"      # scripts/runtime.bash run(): ${11:-90s}


def make_test(entry, tree, timeout_override=None):
    """A selected entry, with everything both columns need."""
    smp = entry.get("smp", "1").strip()
    if entry["name"] in ONE_CPU:
        smp = "1"
    append_words = shell_words("-append " + entry["test_args"]) if "test_args" in entry else []
    opts_words = shell_words(entry.get("opts", ""))
    timeout = timeout_override or entry.get("timeout") or DEFAULT_TIMEOUT
    mem = parse_mem_mib(opts_words)
    cpu = None
    for i, w in enumerate(opts_words):
        if w == "-cpu" and i + 1 < len(opts_words):
            cpu = opts_words[i + 1]
    return {
        "name": entry["name"],
        "file": entry["file"],
        "kernel": Path(tree) / "x86" / entry["file"],
        "smp": smp,
        "append_words": append_words,
        "cmdline": " ".join(append_words[1:]),
        "opts_words": opts_words,
        "timeout": timeout,
        "timeout_s": parse_duration(timeout),
        "mem_mib": mem if mem is not None else DEFAULT_MEM_MIB,
        "cpu": cpu,
        "groups": entry.get("groups", "").split(),
    }


def exclusion(entry):
    """Why an entry is not run at all (both columns), or None. Order:
    arch, nodefault, devices (EXCLUDED), accel, smp, check, disabled_if,
    shell expansion."""
    name = entry["name"]
    arch = entry.get("arch", "")
    if arch and arch != "x86_64":
        return "arch %s only" % arch
    if "nodefault" in entry.get("groups", "").split():
        return "group nodefault (kvm-unit-tests runs it by hand only)"
    if name in EXCLUDED:
        return EXCLUDED[name]
    if entry.get("accel"):
        return "accel=%s only (the host's PMU through KVM)" % entry["accel"]
    smp = entry.get("smp", "1").strip()
    if smp != "1" and name not in ONE_CPU:
        return "smp %s: needs %s CPUs, our VMs have one" % (smp, smp)
    if entry.get("check"):
        return "check %s: a host KVM setting, no meaning here" % entry["check"]
    if entry.get("disabled_if"):
        return "disabled_if %s" % entry["disabled_if"]
    if not entry.get("file"):
        return "no file"
    for key in ("test_args", "opts"):
        try:
            shell_words(entry.get(key, ""))
        except ValueError as e:
            return str(e)
    return None


def ours_exclusion(test):
    """Why our column cannot run a selected test, or None."""
    if test["mem_mib"] > OURS_MAX_MEM_MIB:
        return "-m %d MiB is over the runner's %d MiB per VM" % (test["mem_mib"], OURS_MAX_MEM_MIB)
    return None


# --- serial log of a boot -----------------------------------------------------

# The kernel logs a guest's line as `[INFO ] [vm<N>] text` (the log level
# first); the prefix up to `[vm<N>] ` is the kernel's, the rest escaped.
GUEST_RE = re.compile(r"^(?:\[INFO \] )?\[vm([0-9]{1,6})\] ?(.*)$")
END_RE = re.compile(r"^HV-VM: vm([0-9]{1,6}) (\S+) (?:debug-exit=([0-9]{1,20})|stopped: (.*))$")


def parse_serial(text):
    """Split a boot's serial log into the VMs' output and ends.

    Returns {"out": {N: [lines]}, "ends": {label: (N, kind, value)}, "notes":
    [...]} where kind is "exit" (value: int) or "stopped" (value: cause).
    Only lines that start with `[INFO ] [vm<N>] ` are guest output (the hypervisor
    escapes what a guest writes, so a guest cannot start a line) and only
    lines that start with `HV-VM: ` are ends; the first end of a label counts.
    """
    out, ends, notes = {}, {}, []
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        m = GUEST_RE.match(line)
        if m:
            out.setdefault(int(m.group(1)), []).append(m.group(2))
            continue
        m = END_RE.match(line)
        if m:
            n, label = int(m.group(1)), m.group(2)
            if m.group(3) is not None:
                end = (n, "exit", int(m.group(3)))
            else:
                end = (n, "stopped", m.group(4))
            if label in ends:
                notes.append("second end line for %s ignored: %s" % (label, line))
            else:
                ends[label] = end
    return {"out": out, "ends": ends, "notes": notes}


def results_of_boot(parsed, vms, runner_status=None, runner_err=""):
    """Each VM's (result, note, output lines) from a parsed serial log.
    A VM is found by its label in the end lines; one without an end line
    is TIMEOUT (its output: the vm<N> at its position)."""
    res = []
    for pos, vm in enumerate(vms):
        end = parsed["ends"].get(vm["label"])
        if end is None:
            lines = parsed["out"].get(pos, [])
            if runner_status not in (None, 0, 1, 3, 4) and not parsed["ends"]:
                note = "runner failed (exit %s)%s" % (runner_status, ": " + runner_err if runner_err else "")
                res.append(("ABORT", note, lines))
            else:
                note = "no HV-VM line (boot ended or timed out first)"
                if runner_status is not None:
                    note += ", runner exit %s" % runner_status
                res.append(("TIMEOUT", note, lines))
            continue
        n, kind, value = end
        lines = parsed["out"].get(n, [])
        if kind == "stopped":
            res.append(("ABORT", "stopped: " + value, lines))
            continue
        if value > 0xFFFFFFFF:
            res.append(("FAIL", "debug-exit=%d is not a 32-bit value" % value, lines))
            continue
        verdict, why = verdict_from_debug_exit(value)
        note = " ".join(x for x in (summary_of(lines), why) if x)
        res.append((verdict, note, lines))
    return res


# --- vmexit costs -------------------------------------------------------------

def exit_costs(test, lines):
    """x86/vmexit.c do_test(): "<name> <cycles>" per measured test, then
    "  ipi <name> <cycles>" / "  eoi <name> <cycles>" when those were
    counted; "<name> (skipped)" when it could not run. Cycles are TSC
    ticks per iteration. Names are the words of the entry's -append."""
    names = set(test["cmdline"].split())
    costs = []
    for line in lines:
        m = re.match(r"^(?:  (ipi|eoi) )?(\S+) (-?[0-9]+)\s*$", line)
        if m and m.group(2) in names:
            metric = m.group(2) if not m.group(1) else "%s %s" % (m.group(1), m.group(2))
            costs.append((metric, int(m.group(3))))
        m = re.match(r"^(\S+) \(skipped\)\s*$", line)
        if m and m.group(1) in names:
            costs.append((m.group(1), "skipped"))
    return costs


# --- the source tree ----------------------------------------------------------

def find_source(arg):
    if arg:
        return Path(arg).resolve()
    cands = sorted(glob.glob(str(REPO.parent / "shared/peers/kvm-unit-tests-*.tar.gz")))
    return Path(cands[-1]) if cands else None


def is_built(tree):
    tree = Path(tree)
    return ((tree / "config.mak").is_file() and (tree / "x86/unittests.cfg").is_file()
            and any(tree.glob("x86/*.flat"))
            and "ARCH=x86_64" in (tree / "config.mak").read_text(errors="replace"))


def digest_dir(path):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for f in sorted(filenames):
            if re.search(r"\.(o|d|a|elf|flat|efi|so)$", f):
                continue
            p = Path(dirpath) / f
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(("%s %d %d\n" % (p.relative_to(path), st.st_size, st.st_mtime_ns)).encode())
    return h.hexdigest()


def digest_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_tree(source, work):
    """A built x86_64 tree for `source`: a built tree is used in place
    (read only); a tarball or an unbuilt tree is built in work/src, unless
    the stamp says that build is of this very source."""
    source = Path(source)
    if source.is_dir() and is_built(source):
        return source
    if source.is_dir():
        digest = "dir " + digest_dir(source)
    elif source.is_file():
        digest = "tar " + digest_file(source)
    else:
        raise RuntimeError("no such source: %s" % source)
    src = work / "src"
    tree = src / "kvm-unit-tests"
    stamp = work / "build.stamp"
    if stamp.is_file() and stamp.read_text().strip() == digest and is_built(tree):
        return tree
    print("kvm-unit-tests: building %s in %s" % (source, tree), flush=True)
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    if source.is_dir():
        shutil.copytree(source, tree, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    else:
        with tarfile.open(source) as tf:
            for member in tf.getmembers():
                p = Path(member.name)
                if p.is_absolute() or ".." in p.parts or member.issym() and os.path.isabs(member.linkname):
                    raise RuntimeError("unsafe path in %s: %s" % (source, member.name))
            tf.extractall(src)
        tops = [p for p in src.iterdir() if p.is_dir()]
        if not (tree.is_dir()) and len(tops) == 1:
            tops[0].rename(tree)
    log = work / "build.log"
    with open(log, "w") as lf:
        r = subprocess.run("./configure --arch=x86_64 && make -j2", shell=True, cwd=tree,
                           stdout=lf, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not is_built(tree):
        raise RuntimeError("build failed (exit %d), see %s" % (r.returncode, log))
    stamp.write_text(digest + "\n")
    return tree


# --- QEMU TCG column ----------------------------------------------------------

class Qemu:
    """x86/run and scripts/arch-run.bash for ACCEL=tcg, one QEMU per test."""

    def __init__(self, binary, env_path):
        self.binary = binary
        self.env_path = env_path
        devices = subprocess.run([binary, "-device", "?"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 text=True, errors="replace").stdout
        # x86/run: pc-testdev and isa-debug-exit when QEMU has pc-testdev,
        # else the old testdev chardev; pci-testdev when QEMU has it.
        if '"pc-testdev"' in devices:
            self.pc_testdev = ["-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"]
        else:
            self.pc_testdev = ["-device", "testdev,chardev=testlog", "-chardev", "file,id=testlog,path=msr.out"]
        self.pci_testdev = ["-device", "pci-testdev"] if "pci-testdev" in devices else []
        self.version = subprocess.run([binary, "-h"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      text=True, errors="replace").stdout.split("\n")[0]

    def env_text(self):
        """scripts/arch-run.bash env_params() + env_errata() for ACCEL=tcg:
        TARGET (empty: qemu), QEMU_ACCEL, QEMU's version, the host kernel's
        version, and ERRATA_FORCE=y (TCG)."""
        words = re.split(r"[ .]", self.version)
        major, minor, micro = (words[3:6] + ["", "", ""])[:3]
        rel = os.uname().release
        parts = rel.split(".", 2)
        kv, kp = parts[0], parts[1] if len(parts) > 1 else ""
        rest = parts[2] if len(parts) > 2 else ""
        sub, _, extra = rest.partition("-")
        sub = re.match(r"^[0-9]*", sub).group(0)
        extra = re.match(r"^[0-9]*", extra).group(0)
        lines = ["TARGET=", "QEMU_ACCEL=tcg", "QEMU_VERSION_STRING=" + self.version,
                 "QEMU_MAJOR=" + major, "QEMU_MINOR=" + minor, "QEMU_MICRO=" + micro,
                 "KERNEL_VERSION_STRING=" + rel, "KERNEL_VERSION=" + kv,
                 "KERNEL_PATCHLEVEL=" + kp, "KERNEL_SUBLEVEL=" + sub,
                 "KERNEL_EXTRAVERSION=" + extra, "ERRATA_FORCE=y"]
        return "\n".join(lines) + "\n"

    def command(self, test, kernel):
        """x86/run's command for ACCEL=tcg, then runtime.bash get_cmdline()'s
        "$kernel -smp N -append ARGS OPTS", then arch-run.bash run_test()'s
        "-initrd ENV"; timeout_cmd() in front."""
        return (["timeout", "-k", "1s", "--foreground", test["timeout"], self.binary,
                 "--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard"]
                + self.pc_testdev + ["-display", "none", "-serial", "stdio"] + self.pci_testdev
                + ["-machine", "accel=tcg", "-kernel", kernel, "-smp", test["smp"]]
                + test["append_words"] + test["opts_words"] + ["-initrd", str(self.env_path)])

    def run(self, test, tree):
        # scripts/runtime.bash premature_failure(): QEMU started on a kernel
        # that does not exist must complain about that kernel; anything else
        # (a CPU model or option TCG refuses) makes the test SKIP with the
        # last line QEMU printed.
        pre = subprocess.run(self.command(test, "_NO_FILE_4Uhere_"), cwd=tree, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="backslashreplace", timeout=test["timeout_s"] + 30)
        if not premature_ok(pre.stdout):
            last = (pre.stdout.rstrip("\n").split("\n") or [""])[-1]
            return "SKIP", last, pre.stdout.split("\n"), 0.0
        cmd = self.command(test, "x86/" + test["file"])
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=tree, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=test["timeout_s"] + 30)
            ret, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            ret, out, err = 124, e.stdout or b"", e.stderr or b""
        dt = time.monotonic() - t0
        out = out.decode("utf-8", "backslashreplace").replace("\r", "")
        err = err.decode("utf-8", "backslashreplace")
        if ret < 0:                   # killed by a signal: the shell's 128+N
            ret = 128 - ret
        if ret == 134:
            err += "QEMU Aborted\n"   # vmm.bash prints this for 134
        lines = out.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        fixed = qemu_fixup_return_code(ret, err.rstrip("\n"))
        verdict, why = kut_verdict(fixed)
        note = " ".join(x for x in (summary_of(lines), why) if x)
        if verdict == "TIMEOUT":
            note = ("timeout; duration=%s " % test["timeout"] + note).strip()
        errlines = [l for l in err.rstrip("\n").split("\n") if l]
        if "-enable-kvm" in test["opts_words"]:
            # The cfg's -enable-kvm beats -machine accel=tcg (QEMU 7.2 then
            # reports query-kvm enabled): not a TCG result.
            note = (note + " (-enable-kvm in the cfg: QEMU used KVM)").strip()
        if ret == 1 and fixed == 1 and errlines:
            # The guest passed but QEMU complained: vmm.bash calls it FAIL.
            note = (note + " stderr: " + errlines[-1]).strip()
        header = "# " + " ".join(shlex.quote(str(c)) for c in cmd) + " " + shlex.quote("# exit %d" % ret)
        return verdict, note, [header] + lines + ["# stderr: " + l for l in errlines], dt


def premature_ok(log):
    """scripts/vmm.bash qemu_parse_premature_failure(): true when a line
    names the missing kernel with "[Cc]ould not (load|open) kernel",
    "error loading" or "failed to load"."""
    for line in log.split("\n"):
        if "_NO_FILE_4Uhere_" in line and re.search(
                r"[Cc]ould not (load|open) kernel|error loading|failed to load", line):
            return True
    return False


# --- running ------------------------------------------------------------------

def write_log(root, column, name, lines):
    d = Path(root) / WORK / "logs" / column
    d.mkdir(parents=True, exist_ok=True)
    p = d / ("%s.log" % name)
    p.write_text("\n".join(lines) + ("\n" if lines else ""), errors="backslashreplace")
    return p


def ours_env_text(test):
    lines = ["NR_CPUS=1", "MEMSIZE=%d" % test["mem_mib"],
             "TEST_DEVICE=%d" % (1 if OURS_HAS_PC_TESTDEV else 0)]
    return "\n".join(lines) + "\n"


def boot_groups(tests, per_boot):
    """The tests of each boot: those in ALONE one per boot, the others
    `per_boot` at a time, in their order."""
    shared = [t for t in tests if t["name"] not in ALONE]
    return ([shared[i:i + per_boot] for i in range(0, len(shared), per_boot)]
            + [[t] for t in tests if t["name"] in ALONE])


def run_ours(root, tests, per_boot, jobs, results, progress, dry=False):
    """Our column: `per_boot` VMs per boot, `jobs` boots at a time. With
    `dry`, only writes the env files and returns the commands."""
    envdir = Path(root) / WORK / "env"
    envdir.mkdir(parents=True, exist_ok=True)
    boots = boot_groups(tests, per_boot)
    commands = []
    if not dry and boots:
        # Build the kernel and images once, so that no boot's timeout runs
        # during a build (a first build of the bootloader takes minutes).
        prefix = shlex.split(os.environ.get("KUT_HV_RUNNER", "cargo run --quiet --"))
        subprocess.run(prefix + ["build", "--name", "kut-build"], cwd=root, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)

    def one(k, group):
        name = "kut-%d" % k
        vms = []
        for t in group:
            env = envdir / ("%s.env" % t["name"])
            env.write_text(ours_env_text(t))
            vms.append({"kernel": t["kernel"], "mem_mib": t["mem_mib"], "cmdline": t["cmdline"],
                        "label": vm_label(t["name"]), "env": env, "test": t})
        timeout = BOOT_OVERHEAD_S + BOCHS_TIMEOUT_FACTOR * sum(t["timeout_s"] for t in group)
        cmd = hv_command(name, timeout, vms)
        commands.append((k, cmd))
        if dry:
            return
        log = serial_log_path(root, name)
        if log.exists():
            log.unlink()                       # never read a stale boot
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=timeout + 120)
            status, err = p.returncode, p.stderr.decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            status, err = None, "killed after %d s" % (timeout + 120)
        except OSError as e:
            status, err = 127, str(e)
        dt = time.monotonic() - t0
        text = log.read_bytes().decode("utf-8", "backslashreplace") if log.exists() else ""
        parsed = parse_serial(text)
        errtail = [l for l in err.strip().split("\n") if l][-1:] if err.strip() else []
        per_vm = results_of_boot(parsed, vms, status, errtail[0] if errtail else "")
        for vm, (verdict, note, lines) in zip(vms, per_vm):
            t = vm["test"]
            header = [("# boot %s (%s), vm label %s, %.1f s for the boot; serial log %s"
                       % (name, " ".join(shlex.quote(str(c)) for c in cmd), vm["label"], dt,
                          log.relative_to(root) if str(log).startswith(str(root)) else log))
                      .replace("\n", "\\n")]
            for n in parsed["notes"]:
                header.append("# " + n)
            path = write_log(root, OURS, t["name"], header + lines)
            results[(OURS, t["name"])] = {"result": verdict, "note": note, "log": path,
                                          "lines": lines, "time": None, "boot": name}
            progress(OURS, t["name"], verdict)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        list(ex.map(lambda kg: one(*kg), enumerate(boots)))
    return sorted(commands)


def run_qemu(root, tree, tests, jobs, results, progress, qemu):
    envdir = Path(root) / WORK / "env"
    envdir.mkdir(parents=True, exist_ok=True)
    qemu.env_path.write_text(qemu.env_text())

    def one(t):
        try:
            verdict, note, lines, dt = qemu.run(t, tree)
        except subprocess.TimeoutExpired:
            verdict, note, lines, dt = "TIMEOUT", "premature-failure probe hung", [], 0.0
        path = write_log(root, QEMU, t["name"], lines)
        results[(QEMU, t["name"])] = {"result": verdict, "note": note, "log": path,
                                      "lines": [l for l in lines if not l.startswith("# ")], "time": dt}
        progress(QEMU, t["name"], verdict)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        list(ex.map(one, tests))


# --- report -------------------------------------------------------------------

def read_expect(spec):
    if spec == "fast":
        return dict(FAST_EXPECT)
    exp = {}
    for n, line in enumerate(Path(spec).read_text().split("\n"), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) != 2 or words[1] not in RESULTS:
            raise ValueError("%s:%d: want `test RESULT` (RESULT one of %s)" % (spec, n, " ".join(RESULTS)))
        exp[words[0]] = words[1]
    return exp


def table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(len(widths))] + [r[-1]]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="kvm-unit-tests under our hypervisor (Bochs) and QEMU TCG")
    ap.add_argument("--source", help="kvm-unit-tests: a tree (built or not) or its .tar.gz")
    sel = ap.add_mutually_exclusive_group()
    sel.add_argument("--tests", help="comma-separated test names (default: every selected test)")
    sel.add_argument("--fast", action="store_true", help="the quick subset: " + ",".join(FAST))
    ap.add_argument("--per-boot", type=int, default=6, help="VMs per Bochs boot (default 6)")
    ap.add_argument("--no-qemu", action="store_true", help="no QEMU TCG column")
    ap.add_argument("--no-bochs", action="store_true", help="no column for our hypervisor")
    ap.add_argument("--jobs", type=int, default=2, help="QEMUs (and boots) at a time (default 2)")
    ap.add_argument("--timeout", type=int, help="seconds per test, instead of the cfg's (default 90)")
    ap.add_argument("--expect", help="file of `test RESULT` lines for our column, or `fast`")
    ap.add_argument("--write-expect", help="write our column's results as an expect file")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the selection and our hypervisor's boot commands, run nothing")
    ap.add_argument("--selftest", action="store_true", help="check the parsers and mappings, run nothing")
    args = ap.parse_args(argv)

    if args.selftest:
        return selftest()
    if args.per_boot < 1 or args.jobs < 1 or (args.timeout is not None and args.timeout < 1):
        ap.error("--per-boot, --jobs and --timeout must be at least 1")

    root = REPO
    work = root / WORK
    source = find_source(args.source)
    if source is None or not source.exists():
        print("kvm-unit-tests: skipped (no source tree; pass --source PATH)")
        return 0
    expect = {}
    if args.expect:
        try:
            expect = read_expect(args.expect)
        except (OSError, ValueError) as e:
            print("kvm-unit-tests: --expect: %s" % e, file=sys.stderr)
            return 2
    work.mkdir(parents=True, exist_ok=True)
    try:
        tree = prepare_tree(source, work)
    except (RuntimeError, OSError, tarfile.TarError) as e:
        print("kvm-unit-tests: %s" % e, file=sys.stderr)
        return 2

    entries = parse_cfg((tree / "x86/unittests.cfg").read_text(errors="replace"))
    entries += [dict(e) for e in EXTRA_TESTS if e["name"] not in {x["name"] for x in entries}]
    byname = {e["name"]: e for e in entries}
    if args.fast:
        wanted = FAST
    elif args.tests:
        wanted = [w.strip() for w in args.tests.split(",") if w.strip()]
    else:
        wanted = [e["name"] for e in entries]
    unknown = [w for w in wanted if w not in byname]
    if unknown:
        print("kvm-unit-tests: unknown test(s): %s" % ", ".join(unknown), file=sys.stderr)
        return 2

    timeout_override = "%ds" % args.timeout if args.timeout else None
    selected, excluded = [], {}
    for w in wanted:
        e = byname[w]
        why = exclusion(e)
        if why is None and not (tree / "x86" / e["file"]).is_file():
            why = "test file %s not built" % e["file"]
        if why:
            excluded[w] = why
        else:
            selected.append(make_test(e, tree, timeout_override))

    results = {}
    lock = threading.Lock()
    done = {c: 0 for c in COLUMNS}

    def progress(column, name, verdict):
        with lock:
            done[column] += 1
            print("  [%s %d] %s: %s" % (column, done[column], name, verdict), file=sys.stderr, flush=True)

    walls = {}
    commands = []
    if args.no_bochs:
        ours_skip = "--no-bochs"
    elif not os.environ.get("KUT_HV_RUNNER") and not shutil.which("cargo"):
        ours_skip = "cargo not found"
    else:
        ours_skip = None
    ours_tests = []
    for t in selected:
        why = ours_skip or ours_exclusion(t)
        if why:
            results[(OURS, t["name"])] = {"result": NOT_RUN, "note": why, "log": None, "lines": []}
        else:
            ours_tests.append(t)
    if args.dry_run:
        for w in wanted:
            print("%-44s %s" % (w, "not run: " + excluded[w] if w in excluded else
                                "ours: " + results[(OURS, w)]["note"] if (OURS, w) in results else "selected"))
        for k, cmd in run_ours(root, ours_tests, args.per_boot, args.jobs, {}, None, dry=True):
            print("kut-%d: %s" % (k, " ".join(shlex.quote(str(c)) for c in cmd)))
        return 0
    if ours_tests:
        print("kvm-unit-tests: %d tests under our hypervisor in Bochs, %d per boot"
              % (len(ours_tests), args.per_boot), file=sys.stderr, flush=True)
        t0 = time.monotonic()
        commands = run_ours(root, ours_tests, args.per_boot, args.jobs, results, progress)
        walls[OURS] = time.monotonic() - t0

    qemu_bin = shutil.which("qemu-system-x86_64")
    qemu_skip = "--no-qemu" if args.no_qemu else (None if qemu_bin else "qemu-system-x86_64 not found")
    if qemu_skip:
        for t in selected:
            results[(QEMU, t["name"])] = {"result": NOT_RUN, "note": qemu_skip, "log": None, "lines": []}
    elif selected:
        print("kvm-unit-tests: %d tests under QEMU TCG, %d at a time" % (len(selected), args.jobs),
              file=sys.stderr, flush=True)
        qemu = Qemu(qemu_bin, work / "env" / "qemu-tcg.env")
        t0 = time.monotonic()
        run_qemu(root, tree, selected, args.jobs, results, progress, qemu)
        walls[QEMU] = time.monotonic() - t0

    # The table, in the order asked for.
    column_off = {OURS: ours_skip, QEMU: qemu_skip}
    rows = [("test", OURS, QEMU, "note")]
    for w in wanted:
        if w in excluded:
            rows.append((w, NOT_RUN, NOT_RUN, excluded[w]))
            continue
        r = {c: results[(c, w)] for c in COLUMNS}
        notes = []
        for c in COLUMNS:
            if r[c]["note"] and r[c]["note"] != column_off.get(c):
                notes.append("%s: %s" % (c, r[c]["note"]))
        if r[QEMU].get("time"):
            notes.append("qemu %.1fs" % r[QEMU]["time"])
        if w in ONE_CPU:
            notes.append("(one CPU)")
        rows.append((w, r[OURS]["result"], r[QEMU]["result"], "; ".join(notes)))
    print(table(rows))
    print()
    for c in COLUMNS:
        if column_off[c]:
            print("%s: not run (%s)" % (c, column_off[c]))
            continue
        got = [results[(c, t["name"])]["result"] for t in selected]
        extra = ", ".join("%d %s" % (got.count(v), v.lower()) for v in ("ABORT", "TIMEOUT") if got.count(v))
        print("%s: %d passed, %d failed, %d skipped%s%s" % (
            c, got.count("PASS"), got.count("FAIL"), got.count("SKIP"),
            (", " + extra) if extra else "",
            (", %d not run" % (got.count(NOT_RUN) + len(excluded))) if got.count(NOT_RUN) + len(excluded) else ""))
    for c in COLUMNS:
        if c in walls:
            print("%s wall time: %.1f s" % (c, walls[c]))

    # Exit costs of the vmexit_* tests.
    cost_rows = []
    for t in selected:
        if not t["name"].startswith("vmexit_"):
            continue
        per = {c: dict(exit_costs(t, results[(c, t["name"])]["lines"])) for c in COLUMNS}
        metrics = []
        for c in COLUMNS:
            for m in per[c]:
                if m not in metrics:
                    metrics.append(m)
        for m in metrics:
            cost_rows.append((t["name"], m, str(per[OURS].get(m, "-")), str(per[QEMU].get(m, "-")), ""))
    if cost_rows:
        print()
        print("exit costs (x86/vmexit.c: TSC cycles per iteration)")
        print(table([("test", "measured", OURS, QEMU, "")] + cost_rows))

    if commands:
        print()
        print("our hypervisor's boots:")
        for k, cmd in commands:
            print("  kut-%d: %s" % (k, " ".join(shlex.quote(str(c)) for c in cmd)))
    print()
    print("logs: %s/logs/{%s}/<test>.log" % (WORK, ",".join(COLUMNS)))

    if args.write_expect:
        with open(args.write_expect, "w") as f:
            f.write("# kvm-unit-tests.py expectations for our column: test RESULT\n")
            for t in selected:
                r = results[(OURS, t["name"])]["result"]
                if r in RESULTS:
                    f.write("%s %s\n" % (t["name"], r))
        print("wrote %s" % args.write_expect)

    status = 0
    if expect:
        asked = set(wanted)
        bad = []
        for name, want in expect.items():
            if name not in asked:
                continue
            got = NOT_RUN if name in excluded else results[(OURS, name)]["result"]
            if got != want:
                bad.append("%s: expected %s, got %s" % (name, want, got))
        ignored = len([n for n in expect if n not in asked])
        print()
        if bad:
            print("expectations: %d not met" % len(bad))
            for b in bad:
                print("  " + b)
            status = 1
        else:
            print("expectations: all %d met" % (len(expect) - ignored))
        if ignored:
            print("expectations: %d entries for tests not asked for, ignored" % ignored)
    return status


# --- selftest -----------------------------------------------------------------

SAMPLE_CFG = '''
# comment
[one]
file = a.flat
smp = 2
test_args = 'cpuid'
qemu_params = -cpu max,+vmx -m 4g
arch = x86_64
groups = vmexit nodefault
timeout = 30

[two]
file = b.flat
test_args = "-x -y  z"
extra_params = """-cpu qemu64 \\
  -m 2048"""

[three]
file = c.flat
'''

SAMPLE_SERIAL = (
    "INFO : bootloader line\n"
    "[INFO ] vm0: refused hypercall: not guest output, a log line\n"
    "[INFO ] [vm0] enabling apic\r\n"
    "[INFO ] [vm1] hello\n"
    "[INFO ] [vm0] PASS: thing\n"
    "[INFO ] [vm0] SUMMARY: 3 tests\n"
    "[INFO ] [vm1] HV-VM: vm1 b debug-exit=0\n"          # forged by a guest: output
    "[INFO ] [vm1] bytes \\x1b[0m kept\n"
    "[INFO ] [vm2] \n"
    "HV-VM: vm0 a debug-exit=0\n"
    "HV-VM: vm1 b debug-exit=1\n"
    "HV-VM: vm2 c stopped: triple fault\n"
    "HV-VM: vm3 d debug-exit=38\n"
    "HV-VM: vm3 d debug-exit=0\n"                # a second end: ignored
    "HV-VM: vm4 e debug-exit=63\n"
    "HV-VM: vm5 f debug-exit=2147483686\n"       # 0x80000026: low bits 77
    "HV-VM: vm7 h debug-exit=99999999999\n"
)

FAKE_RUNNER = r'''
import sys, os
a = sys.argv[1:]
name = a[a.index("--name") + 1]
labels = [a[i + 1] for i, w in enumerate(a) if w == "--label"]
d = os.path.join("target", "runs", name + "-bochs-bios")
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, "serial.log"), "w") as f:
    for n, l in enumerate(labels):
        f.write("[vm%d] argv %s\n" % (n, l))
        v = {"pass": "debug-exit=0", "fail": "debug-exit=1", "skip": "debug-exit=38",
             "stop": "stopped: unemulated instruction"}.get(l)
        if v:
            f.write("HV-VM: vm%d %s %s\n" % (n, l, v))
sys.exit(4 if "hang" in labels else 0)
'''


def selftest():
    failures = []

    def check(what, got, want):
        if got != want:
            failures.append("%s: got %r, want %r" % (what, got, want))

    # QEMU's isa-debug-exit, then vmm.bash's fixup, then runtime.bash run().
    check("exit status of 0", qemu_exit_status(0), 1)
    check("exit status of 1", qemu_exit_status(1), 3)
    check("exit status of 38", qemu_exit_status(38), 77)
    check("exit status of 63", qemu_exit_status(63), 127)
    check("exit status of 0x80000026", qemu_exit_status(0x80000026), 77)
    check("verdict of V=0", verdict_from_debug_exit(0)[0], "PASS")
    check("verdict of V=1", verdict_from_debug_exit(1)[0], "FAIL")
    check("verdict of V=38 (77 >> 1)", verdict_from_debug_exit(38)[0], "SKIP")
    check("verdict of V=63 (abort)", verdict_from_debug_exit(63)[0], "ABORT")
    check("verdict of V=64 (status 129)", verdict_from_debug_exit(64)[0], "FAIL")
    check("verdict of V=128 (status 1 again)", verdict_from_debug_exit(128)[0], "PASS")
    check("fixup 0, no stderr", qemu_fixup_return_code(0, ""), 1)
    check("fixup 0, signal", qemu_fixup_return_code(0, "qemu: terminating on signal 15 from pid 1"), 143)
    check("fixup 1, no stderr", qemu_fixup_return_code(1, ""), 0)
    check("fixup 1, warnings only", qemu_fixup_return_code(1, "qemu: warning: a\nWARNING: b"), 0)
    check("fixup 1, an error", qemu_fixup_return_code(1, "qemu: warning: a\nqemu: oops"), 1)
    check("fixup 3", qemu_fixup_return_code(3, ""), 3)
    check("verdict 124", kut_verdict(124)[0], "TIMEOUT")
    check("verdict 77", kut_verdict(77)[0], "SKIP")
    check("verdict 3", kut_verdict(3)[0], "FAIL")
    check("verdict 2", kut_verdict(2)[0], "FAIL")
    check("verdict 137", kut_verdict(137)[0], "FAIL")
    check("premature ok", premature_ok("qemu: could not load kernel '_NO_FILE_4Uhere_': No such file"), True)
    check("premature failure", premature_ok("qemu: CPU model 'host' requires KVM or HVF"), False)
    check("summary", summary_of(["a", "SUMMARY: 3 tests, 1 unexpected failures\r", "b"]),
          "(3 tests, 1 unexpected failures)")
    check("summary only in the last 5", summary_of(["SUMMARY: x"] + ["l"] * 5), "")

    # unittests.cfg
    cfg = parse_cfg(SAMPLE_CFG)
    check("cfg names", [e["name"] for e in cfg], ["one", "two", "three"])
    one, two, three = cfg
    check("cfg smp", one.get("smp"), "2")
    check("cfg opts", one.get("opts"), "-cpu max,+vmx -m 4g")
    check("cfg groups", one.get("groups"), "vmexit nodefault")
    check("cfg multi-line opts", shell_words(two["opts"]), ["-cpu", "qemu64", "-m", "2048"])
    check("exclusion nodefault", exclusion(one), "group nodefault (kvm-unit-tests runs it by hand only)")
    check("exclusion none", exclusion(two), None)
    check("exclusion smp", exclusion({"name": "x", "file": "x.flat", "smp": "2"}),
          "smp 2: needs 2 CPUs, our VMs have one")
    check("exclusion one-CPU list", exclusion({"name": "xapic", "file": "apic.flat", "smp": "2"}), None)
    check("exclusion i386", exclusion({"name": "x", "file": "x.flat", "arch": "i386"}), "arch i386 only")
    check("exclusion device", exclusion({"name": "s3", "file": "s3.flat"}), EXCLUDED["s3"])
    check("exclusion backticks", exclusion({"name": "k", "file": "k.flat", "test_args": '"1 `date`"'}),
          'needs shell expansion: "1 `date`"')
    t1 = make_test(dict(one, name="xapic"), "/t")
    check("one-CPU smp", t1["smp"], "1")
    check("append words", t1["append_words"], ["-append", "cpuid"])
    check("cmdline", t1["cmdline"], "cpuid")
    check("mem 4g", t1["mem_mib"], 4096)
    check("timeout 30", t1["timeout_s"], 30.0)
    check("ours mem cap", ours_exclusion(t1) is not None, True)
    t2 = make_test(two, "/t")
    check("quoted append", t2["append_words"], ["-append", "-x -y  z"])
    check("mem 2048", t2["mem_mib"], 2048)
    t3 = make_test(three, "/t")
    check("default mem", t3["mem_mib"], 128)
    check("default timeout", (t3["timeout"], t3["timeout_s"]), ("90s", 90.0))
    check("no append", (t3["append_words"], t3["cmdline"]), ([], ""))
    check("override timeout", make_test(three, "/t", "5s")["timeout_s"], 5.0)
    check("duration 2m", parse_duration("2m"), 120.0)
    check("mem size=", parse_mem_mib(["-m", "size=1G,slots=2"]), 1024)
    check("label short", vm_label("pcid-enabled"), "pcid-enabled")
    long = vm_label("svm_unsupported_instruction_intercept_test")
    check("label long", (len(long), bool(re.match(r"^[A-Za-z0-9._-]+$", long))), (32, True))
    check("labels differ", vm_label("vmx_pf_exception_test_reduced_maxphyaddr")
          != vm_label("vmx_pf_exception_test_reduced_maxphyaddr2"), True)

    # A boot's serial log.
    p = parse_serial(SAMPLE_SERIAL)
    check("vm0 output", p["out"][0], ["enabling apic", "PASS: thing", "SUMMARY: 3 tests"])
    check("vm1 output keeps escapes and forged lines",
          p["out"][1], ["hello", "HV-VM: vm1 b debug-exit=0", "bytes \\x1b[0m kept"])
    check("vm2 empty line", p["out"][2], [""])
    check("ends", sorted(p["ends"]), ["a", "b", "c", "d", "e", "f", "h"])
    check("second end ignored", p["ends"]["d"], (3, "exit", 38))
    check("notes", len(p["notes"]), 1)
    vms = [{"label": l} for l in "abcdefgh"]
    res = results_of_boot(p, vms, 0)
    check("boot verdicts", [r[0] for r in res],
          ["PASS", "FAIL", "ABORT", "SKIP", "ABORT", "SKIP", "TIMEOUT", "FAIL"])
    check("pass note has the summary", res[0][1], "(3 tests)")
    check("stopped cause", res[2][1], "stopped: triple fault")
    check("vm1 output by label", res[1][2][0], "hello")
    res = results_of_boot(parse_serial(""), vms[:2], 2, "unknown argument '--vm'")
    check("runner failure", [r[0] for r in res], ["ABORT", "ABORT"])
    check("runner failure note", res[0][1], "runner failed (exit 2): unknown argument '--vm'")
    res = results_of_boot(parse_serial("[vm0] still going\n"), vms[:1], 4)
    check("boot timeout", (res[0][0], res[0][2]), ("TIMEOUT", ["still going"]))

    # vmexit.c's lines.
    t = {"cmdline": "cpuid tscdeadline"}
    check("exit costs", exit_costs(t, ["enabling apic", "cpuid 1523", "  ipi cpuid 12", "vmcall 99",
                                       "tscdeadline (skipped)", "cr4 = 20"]),
          [("cpuid", 1523), ("ipi cpuid", 12), ("tscdeadline", "skipped")])

    names = lambda groups: [[t["name"] for t in g] for g in groups]
    check("boot groups", names(boot_groups([{"name": n} for n in "a b eventinj c d e".split()], 2)),
          [["a", "b"], ["c", "d"], ["e"], ["eventinj"]])
    check("boot groups, none shared", names(boot_groups([{"name": "eventinj"}], 6)), [["eventinj"]])

    # The command line for our hypervisor.
    cmd = hv_command("kut-0", 150, [
        {"kernel": "/k/x86/vmexit.flat", "mem_mib": 128, "cmdline": "cpuid", "label": "vmexit_cpuid", "env": "/e/a.env"},
        {"kernel": "/k/x86/dummy.flat", "mem_mib": 2048, "cmdline": "", "label": "dummy", "env": "/e/b.env"}])
    if not os.environ.get("KUT_HV_RUNNER"):
        check("hv command", cmd, [
            "cargo", "run", "--quiet", "--", "--name", "kut-0", "--emulator", "bochs", "--timeout", "150",
            "--quiet", "--vm", "/k/x86/vmexit.flat", "--mem", "128M", "--cmdline", "cpuid",
            "--label", "vmexit_cpuid", "--module", "/e/a.env",
            "--vm", "/k/x86/dummy.flat", "--mem", "2048M", "--label", "dummy", "--module", "/e/b.env"])
    check("ours env", ours_env_text({"mem_mib": 128}), "NR_CPUS=1\nMEMSIZE=128\nTEST_DEVICE=0\n")

    # Our column end to end, with a fake runner writing the serial log.
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.environ.get("KUT_HV_RUNNER")
        os.environ["KUT_HV_RUNNER"] = "%s -c %s" % (shlex.quote(sys.executable), shlex.quote(FAKE_RUNNER))
        try:
            tests = [make_test({"name": n, "file": "dummy.flat"}, tmp)
                     for n in ("pass", "fail", "skip", "stop", "hang")]
            results = {}
            run_ours(tmp, tests, 3, 2, results, lambda *a: None)
        finally:
            if saved is None:
                del os.environ["KUT_HV_RUNNER"]
            else:
                os.environ["KUT_HV_RUNNER"] = saved
        got = [results[(OURS, n)]["result"] for n in ("pass", "fail", "skip", "stop", "hang")]
        check("fake boots", got, ["PASS", "FAIL", "SKIP", "ABORT", "TIMEOUT"])
        check("fake stop note", results[(OURS, "stop")]["note"], "stopped: unemulated instruction")
        log = (Path(tmp) / WORK / "logs" / OURS / "hang.log").read_text().split("\n")
        check("fake log body", log[1:], ["argv hang", ""])
        check("fake env", (Path(tmp) / WORK / "env" / "pass.env").read_text(),
              "NR_CPUS=1\nMEMSIZE=128\nTEST_DEVICE=0\n")

    if failures:
        for f in failures:
            print("selftest FAIL: " + f)
        print("selftest: %d failed" % len(failures))
        return 1
    print("selftest: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

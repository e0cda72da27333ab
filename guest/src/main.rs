//! The guest program the hypervisor runs.
//!
//! `hvcore::loader::program` loads it at 2 MiB and enters [`_start`] in 64-bit
//! mode with paging on (the first GiB identity-mapped), RSP at the top of
//! the boot stack and RDI = `scenario | (vm_index << 8)` (see
//! `hvcore::hypercall::guest_arg`). It talks over the serial port (COM1,
//! transmit only) and reports results with hypercalls
//! (`hvcore::hypercall`). The scenarios and the check ids they REPORT are
//! listed in `hvcore::hypercall::scenario` and `hvcore::hypercall::check`.
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

#[macro_use]
mod serial;
#[macro_use]
mod trap;
mod cpu;
mod cpu_checks;
mod db_loop;
mod dedupe;
mod fail;
mod flood;
mod forge;
mod hv;
mod idt;
mod isolation;
mod memhog;
mod mwait;
mod ring3;
mod single_step;

use core::arch::{asm, global_asm};
use core::panic::PanicInfo;
use hvcore::hypercall::{self as hc, check, scenario};

// The entry: align the stack as a call would leave it, then call
// `guest_main(rdi)`, which never returns.
global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call {main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    main = sym guest_main,
);

extern "sysv64" fn guest_main(arg: u64) -> ! {
    let s = hc::arg_scenario(arg);
    let vm = hc::arg_vm_index(arg);
    println!("guest: scenario {} ({}), vm {vm}", s, scenario::name(s).unwrap_or("unknown"));
    idt::install();
    trap::install();
    match s {
        scenario::HELLO => hello(),
        scenario::WILD_ACCESS => wild_access(),
        scenario::VMXON => vmxon(),
        scenario::BAD_HYPERCALL => bad_hypercall(),
        scenario::TRIPLE_FAULT => triple_fault(),
        scenario::DEDUPE => dedupe::run(vm),
        scenario::EXIT_COST => exit_cost(),
        scenario::DEVICES => devices(),
        scenario::BAD_VMCS => {
            println!("guest: bad-vmcs: this VM's entry should have failed");
            hv::exit(1)
        }
        scenario::ISOLATION => isolation::run(vm),
        scenario::RING3 => ring3::run(),
        scenario::SINGLE_STEP => single_step::run(),
        scenario::DB_LOOP => db_loop::run(),
        scenario::MWAIT => mwait::run(),
        scenario::CPU_CHECKS => cpu_checks::run(),
        scenario::FORGE => forge::run(),
        scenario::FLOOD => flood::run(),
        scenario::FAIL => fail::run(),
        scenario::MEMHOG => memhog::run(),
        _ => {
            println!("guest: unknown scenario {s}");
            hv::exit(1)
        }
    }
}

/// Average TSC ticks of `f` over `n` runs.
/// TSC ticks per call of `f`: the fastest of fifty rounds of `n / 50`
/// calls. The TSC runs on while the hypervisor gives the CPU to other VMs
/// and scans memory between time slices; a round that a slice boundary
/// fell into measures that too, and the fastest round measures the exit.
fn ticks_per(n: u64, mut f: impl FnMut() -> bool) -> (u64, bool) {
    const ROUNDS: u64 = 50;
    let per_round = (n / ROUNDS).max(1);
    let mut ok = true;
    let mut best = u64::MAX;
    for _ in 0..ROUNDS {
        let t0 = unsafe { core::arch::x86_64::_rdtsc() };
        for _ in 0..per_round {
            ok &= f();
        }
        best = best.min((unsafe { core::arch::x86_64::_rdtsc() } - t0) / per_round);
    }
    (best, ok)
}

fn exit_cost() -> ! {
    const N: u64 = 1000;
    let (vmcall, ok) = ticks_per(N, || hv::raw(hc::NOP, 0, 0, 0) == 0);
    println!("exit-cost: {vmcall} TSC ticks per NOP hypercall round trip");
    let mut ok = hv::report(check::VMCALL_COST, ok, vmcall);
    let (cpuid_ticks, _) = ticks_per(N, || cpu::cpuid(0, 0).0 > 0);
    println!("exit-cost: {cpuid_ticks} TSC ticks per CPUID exit");
    ok &= hv::report(check::CPUID_COST, true, cpuid_ticks);
    hv::exit(!ok as u64)
}

fn devices() -> ! {
    let port: u8;
    // SAFETY: port 0x5658 (VMware's backdoor, which we do not emulate) is
    // no device of this VM: the read must be all ones.
    unsafe { asm!("in al, dx", out("al") port, in("dx") 0x5658u16, options(nomem, nostack)) };
    let mut ok = hv::report(check::UNKNOWN_PORT_ONES, port == 0xff, port as u64);

    // MSR 0x4b56_4d00 does not exist: #GP.
    let r = cpu::rdmsr(0x4b56_4d00);
    ok &= hv::report(check::UNKNOWN_MSR_GP, matches!(r, Err(e) if e.vector == trap::GP), 0);

    let cr4 = cpu::cr4();
    ok &= hv::report(check::CR4_VMXE_HIDDEN, cr4 & cpu::CR4_VMXE == 0, cr4);
    // VMX is hidden from the guest, so VMXE is a bit it may not set:
    // #GP(0), and CR4 stays as it was.
    let (gp, detail) = trap::expect_gp0(cpu::set_cr4(cr4 | cpu::CR4_VMXE));
    let after = cpu::cr4();
    if after != cr4 {
        let _ = cpu::set_cr4(cr4);
    }
    ok &= hv::report(check::CR4_WRITE, gp && after == cr4, if after != cr4 { after } else { detail });

    // SAFETY: no interrupt source is enabled; the hypervisor treats HLT
    // with IF=1 as "idle" and resumes us after the next round.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    ok &= hv::report(check::HLT_RETURNS, true, 0);
    hv::exit(!ok as u64)
}

fn hello() -> ! {
    println!("hello from the guest");
    let (_, _, ecx, _) = cpu::cpuid(1, 0);
    let mut ok = hv::report(check::CPUID_VMX_HIDDEN, ecx & (1 << 5) == 0, ecx as u64);
    ok &= hv::report(check::CPUID_HYPERVISOR_BIT, ecx & (1 << 31) != 0, ecx as u64);
    let (_, ebx, ecx, edx) = cpu::cpuid(hc::CPUID_HV_LEAF, 0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&ecx.to_le_bytes());
    vendor[8..12].copy_from_slice(&edx.to_le_bytes());
    ok &= hv::report(check::CPUID_VENDOR, &vendor == hc::CPUID_VENDOR, ebx as u64);
    hv::print("hello from the guest, via the PRINT hypercall");
    for n in 1..=3 {
        println!("tick {n}");
        hv::yield_now();
    }
    hv::exit(!ok as u64)
}

fn wild_access() -> ! {
    println!("reading {:#x}, beyond this VM's memory: the hypervisor must stop me", hc::WILD_GPA);
    // SAFETY: deliberately wild; the page tables map it, the EPT does not.
    let v = unsafe { core::ptr::read_volatile(hc::WILD_GPA as *const u64) };
    hv::report(check::WILD_ACCESS_CONTINUED, false, v);
    hv::exit(1)
}

extern "x86-interrupt" fn vmxon_ud(frame: idt::Frame) {
    hv::report(check::VMXON_UD, true, frame.rip);
    hv::exit(0)
}

/// A VMXON region for the operand (its content does not matter: the
/// instruction must fault before it is read).
#[repr(C, align(4096))]
struct VmxonRegion([u8; 4096]);
static VMXON_REGION: VmxonRegion = VmxonRegion([0; 4096]);

fn vmxon() -> ! {
    idt::set_invalid_opcode(vmxon_ud);
    println!("executing VMXON: the hypervisor must inject #UD");
    // The operand is a u64 in memory holding the region's address.
    let operand: u64 = &VMXON_REGION as *const _ as u64;
    // SAFETY: must raise #UD in a guest; the handler EXITs.
    unsafe { asm!("vmxon qword ptr [{}]", in(reg) &operand, options(nostack)) };
    hv::report(check::VMXON_UD, false, 0);
    hv::exit(1)
}

fn bad_hypercall() -> ! {
    let r = hv::raw(hc::BAD_NUMBER, 1, 2, 3);
    let ok = hv::report(check::BAD_HYPERCALL, r == hc::ERROR, r);
    hv::exit(!ok as u64)
}

fn triple_fault() -> ! {
    println!("loading an empty IDT and executing ud2: a triple fault");
    idt::load_empty();
    // SAFETY: deliberately faults; there is no way back.
    unsafe { asm!("ud2", options(nomem, nostack)) };
    hv::report(check::TRIPLE_FAULT_CONTINUED, false, 0);
    hv::exit(1)
}

/// hvcore links `alloc`; the guest never allocates, so every allocation
/// fails (and would end in the panic handler).
struct NoAlloc;

// SAFETY: returning null is always a valid "allocation failed".
unsafe impl core::alloc::GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _: *mut u8, _: core::alloc::Layout) {}
}

#[global_allocator]
static ALLOCATOR: NoAlloc = NoAlloc;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("guest panic: {info}");
    hv::exit(2)
}

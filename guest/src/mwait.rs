//! MWAIT: MONITOR is hidden from CPUID but harmless, and MWAIT with
//! interrupts on behaves like HLT: it returns once the hypervisor has let
//! the other VMs run (see `hvcore::hypercall::scenario::MWAIT`).

use crate::cpu::cpuid;
use crate::hv;
use core::sync::atomic::AtomicU64;
use hvcore::hypercall::check;

/// What MONITOR arms on (never written).
static WATCHED: AtomicU64 = AtomicU64::new(0);

/// The detail of a probe that should not fault: 0, or the exception.
fn outcome(r: Result<(), crate::trap::Fault>) -> (bool, u64) {
    match r {
        Ok(()) => (true, 0),
        Err(f) => {
            crate::println!("mwait: exception {} (error code {:#x}) at {:#x}", f.vector, f.code, f.rip);
            (false, f.detail())
        }
    }
}

pub fn run() -> ! {
    let (_, _, ecx, _) = cpuid(1, 0);
    let mut ok = hv::report(check::MWAIT_HIDDEN, ecx & (1 << 3) == 0, ecx as u64);

    // MONITOR: RAX = the address, ECX = extensions, EDX = hints (0F 01 C8).
    // SAFETY: arms a monitor on our own variable; a fault is caught.
    let r = unsafe {
        crate::probe!(".byte 0x0f, 0x01, 0xc8"; in("rax") WATCHED.as_ptr(), in("ecx") 0, in("edx") 0, options(nostack))
    };
    let (pass, detail) = outcome(r);
    ok &= hv::report(check::MONITOR_RETURNS, pass, detail);

    // MWAIT: EAX = hints, ECX = extensions (0F 01 C9), right after STI so
    // it runs with IF=1 (STI's shadow covers MWAIT itself).
    crate::println!("mwait: MWAIT with IF=1");
    // SAFETY: no interrupt source is enabled; the hypervisor resumes us
    // after the next round; a fault is caught.
    let r = unsafe { crate::probe!("sti", ".byte 0x0f, 0x01, 0xc9", "cli"; in("eax") 0, in("ecx") 0, options(nostack)) };
    // SAFETY: should MWAIT fault, the recovery point skips the CLI above.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    let (pass, detail) = outcome(r);
    ok &= hv::report(check::MWAIT_RETURNS, pass, detail);
    hv::exit(!ok as u64)
}

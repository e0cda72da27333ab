//! SINGLE_STEP: debug exceptions around instructions the hypervisor
//! emulates must reach the guest as they would on bare metal (see
//! `hvcore::hypercall::scenario::SINGLE_STEP`).
//!
//! Each test arms one debug condition, runs one instruction, and compares
//! what the #DB handler saw with the label the test places where the CPU
//! must report it.

use crate::cpu::*;
use crate::hv;
use crate::idt::{self, Frame};
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use hvcore::hypercall::{self as hc, check};

/// A port no device claims.
const UNKNOWN_PORT: u16 = 0x1230;

static DB_COUNT: AtomicU64 = AtomicU64::new(0);
static DB_RIP: AtomicU64 = AtomicU64::new(0);
static DB_DR6: AtomicU64 = AtomicU64::new(0);

/// #DB: note the first one (RIP, DR6), then clear DR6 (its bits are
/// sticky, SDM Vol. 3B 18.2.3), turn the breakpoints off and clear TF in
/// the frame so nothing fires again.
extern "x86-interrupt" fn debug(mut frame: Frame) {
    let dr6 = dr(6);
    if DB_COUNT.fetch_add(1, SeqCst) == 0 {
        DB_RIP.store(frame.rip, SeqCst);
        DB_DR6.store(dr6, SeqCst);
    }
    let _ = set_dr(6, DR6_CLEAR);
    let _ = set_dr(7, DR7_OFF);
    // SAFETY: the frame the CPU pushed; IRETQ restores RFLAGS from it.
    unsafe { core::ptr::write_volatile(&mut frame.rflags, frame.rflags & !RFLAGS_TF) };
}

fn reset() {
    DB_COUNT.store(0, SeqCst);
    DB_RIP.store(0, SeqCst);
    DB_DR6.store(0, SeqCst);
}

/// REPORTs a test that wants exactly one #DB at `want_rip` with the DR6
/// bits `want_dr6` set.
fn verdict(id: u64, what: &str, want_rip: u64, want_dr6: u64) -> bool {
    let (count, rip, dr6) = (DB_COUNT.load(SeqCst), DB_RIP.load(SeqCst), DB_DR6.load(SeqCst));
    let detail = if count != 1 {
        count
    } else if rip != want_rip {
        rip
    } else {
        dr6
    };
    let pass = count == 1 && rip == want_rip && dr6 & want_dr6 == want_dr6;
    if !pass {
        crate::println!(
            "single-step: {what}: {count} #DB, first at {rip:#x} with DR6 {dr6:#x}; want one at {want_rip:#x} with DR6 bits {want_dr6:#x}"
        );
    }
    hv::report(id, pass, detail)
}

// The TF tests: POPFQ sets TF, so the trap comes after the instruction
// that follows it (SDM Vol. 3B 18.3.1.4), at label 2; the handler clears
// TF. The last POPFQ clears TF too, should the handler never have run.
macro_rules! set_tf {
    () => {
        "pushfq; or qword ptr [rsp], 0x100; popfq"
    };
}
macro_rules! clear_tf {
    () => {
        "pushfq; and qword ptr [rsp], -0x101; popfq"
    };
}

fn tf_nop() -> u64 {
    let want: u64;
    // SAFETY: only RFLAGS.TF changes, and the handler clears it.
    unsafe { asm!(set_tf!(), "nop", "2:", "lea {w}, [rip + 2b]", clear_tf!(), w = out(reg) want) };
    want
}

fn tf_cpuid() -> u64 {
    let want: u64;
    // SAFETY: as above; RBX (which asm! may not name) is saved around CPUID.
    unsafe {
        asm!("mov {b}, rbx", set_tf!(), "cpuid", "2:", "mov rbx, {b}", "lea {w}, [rip + 2b]", clear_tf!(),
            b = out(reg) _, w = out(reg) want, inout("eax") 0 => _, inout("ecx") 0 => _, out("edx") _);
    }
    want
}

fn tf_vmcall() -> u64 {
    let want: u64;
    // SAFETY: as above; a NOP hypercall does nothing.
    unsafe {
        asm!(set_tf!(), "vmcall", "2:", "lea {w}, [rip + 2b]", clear_tf!(), w = out(reg) want,
            inout("rax") hc::NOP => _, inout("rdi") 0u64 => _, inout("rsi") 0u64 => _, inout("rdx") 0u64 => _);
    }
    want
}

fn tf_in() -> u64 {
    let want: u64;
    // SAFETY: as above; no device answers the port.
    unsafe {
        asm!(set_tf!(), "in al, dx", "2:", "lea {w}, [rip + 2b]", clear_tf!(), w = out(reg) want,
            in("dx") UNKNOWN_PORT, out("al") _);
    }
    want
}

/// TF, then `mov ss`: the trap that would follow `mov ss` is held until
/// after the next instruction (SDM Vol. 3A 6.8.3), here CPUID, which
/// exits to the hypervisor inside that MOV-SS shadow.
fn mov_ss_cpuid() -> u64 {
    let want: u64;
    // SAFETY: as in `tf_cpuid`; SS is reloaded with its own value.
    unsafe {
        asm!("mov {b}, rbx", "mov {s:e}, ss", set_tf!(), "mov ss, {s:e}", "cpuid", "2:", "mov rbx, {b}",
            "lea {w}, [rip + 2b]", clear_tf!(),
            b = out(reg) _, s = out(reg) _, w = out(reg) want, inout("eax") 0 => _, inout("ecx") 0 => _, out("edx") _);
    }
    want
}

/// ICEBP (0xF1): a #DB trap, RIP after it.
fn icebp() -> u64 {
    let want: u64;
    // SAFETY: the handler returns to the next instruction.
    unsafe { asm!(".byte 0xf1", "2:", "lea {w}, [rip + 2b]", w = out(reg) want) };
    want
}

/// An instruction breakpoint (DR7.L0, R/W0 = 00, LEN0 = 00) on the NOP at
/// label 2: a fault, RIP at the NOP, DR6.B0 (SDM Vol. 3B 18.2.4, 18.3.1.1).
/// The handler turns DR7 off, so the NOP then runs.
fn dr0_exec() -> u64 {
    let want: u64;
    // SAFETY: the breakpoint is on our own NOP; DR7 ends up off.
    unsafe {
        asm!("lea {w}, [rip + 2f]", "mov dr0, {w}", "mov {t}, {dr7}", "mov dr7, {t}", "2: nop",
            w = out(reg) want, t = out(reg) _, dr7 = const DR7_OFF | 1, options(nostack));
    }
    let _ = set_dr(7, DR7_OFF);
    want
}

/// (check id, what, the test (returns where the #DB must point), DR6 bits
/// it must set).
type Test = (u64, &'static str, fn() -> u64, u64);

pub fn run() -> ! {
    idt::set_handler(1, debug, 0);
    let _ = set_dr(6, DR6_CLEAR);
    let tests: [Test; 7] = [
        (check::SS_TF_NOP, "TF over NOP", tf_nop, DR6_BS),
        (check::SS_TF_CPUID, "TF over CPUID", tf_cpuid, DR6_BS),
        (check::SS_TF_VMCALL, "TF over VMCALL", tf_vmcall, DR6_BS),
        (check::SS_TF_IN, "TF over IN", tf_in, DR6_BS),
        (check::SS_MOV_SS_CPUID, "TF, MOV SS, CPUID", mov_ss_cpuid, DR6_BS),
        (check::SS_ICEBP, "ICEBP", icebp, 0),
        (check::SS_DR0_EXEC, "instruction breakpoint", dr0_exec, DR6_B0),
    ];
    let mut ok = true;
    for (id, what, test, want_dr6) in tests {
        reset();
        let want_rip = test();
        ok &= verdict(id, what, want_rip, want_dr6);
    }
    hv::exit(!ok as u64)
}

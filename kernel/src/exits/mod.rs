//! VM-exit dispatch: one file per exit reason that needs more than a line.
//! A handler tells the scheduler what to do next.
//!
//! Every exit the VMCS controls can produce (`vmx::vmcs::controls`) has a
//! handler below or a named stop; an exit reason nobody expected stops
//! its VM with the reason's name.

mod apic;
mod cpuid;
pub mod cr_access;
mod ept_violation;
mod exception;
pub mod interrupts;
mod io;
mod msr;
mod vmcall;
mod xsetbv;

use crate::hypervisor::Host;
use crate::vm::{Cause, Vm};
use crate::vmx::vmcs::{read, set};
use hvcore::vmx::event::{self, Event};
use hvcore::vmx::exit::{exit_reason_name, is_vmx_instruction, reason};
use x86::vmx::vmcs::{control, guest, ro};

pub const UD: u8 = 6;
pub const GP: u8 = 13;

pub enum Next {
    /// Re-enter the same VM.
    Resume,
    /// Give the CPU to the next VM.
    Yield,
    /// The VM has ended (`vm.end` says how).
    Ended,
}

pub fn handle(vm: &mut Vm, host: &mut Host) -> Next {
    let raw = read(ro::EXIT_REASON) as u32;
    let basic = raw as u16;
    if let Some(n) = vm.exits.get_mut(basic as usize) {
        *n += 1;
    }
    // Bit 31: the VM entry itself failed (SDM Vol. 3C 27.8).
    if raw & (1 << 31) != 0 {
        vm.stop(Cause::EntryFailed(alloc::format!("{} (exit reason {:#x})", exit_reason_name(basic), raw)));
        return Next::Ended;
    }
    if basic != reason::EXCEPTION_OR_NMI {
        vm.exception_loop.progress();
    }
    restore_nmi_blocking(basic);
    reinject_interrupted_event();
    match basic {
        reason::EXCEPTION_OR_NMI => exception::handle(vm),
        reason::CPUID => cpuid::handle(vm, host),
        reason::VMCALL => vmcall::handle(vm, host),
        reason::IO_INSTRUCTION => io::handle(vm),
        reason::RDMSR => msr::read(vm),
        reason::WRMSR => msr::write(vm, host),
        reason::CR_ACCESS => cr_access::handle(vm, host),
        reason::XSETBV => xsetbv::handle(vm, host),
        reason::EPT_VIOLATION => ept_violation::handle(vm, host),
        reason::EPT_MISCONFIG => {
            let gpa = read(ro::GUEST_PHYSICAL_ADDR_FULL);
            vm.stop(Cause::Unhandled(alloc::format!("EPT misconfiguration at {gpa:#x} (a hypervisor bug)")));
            Next::Ended
        }
        // MWAIT would put the CPU to sleep with no wake-up for the host;
        // it idles like HLT instead, and MONITOR arms nothing (CPUID does
        // not show MONITOR/MWAIT; this is for guests that try anyway).
        reason::HLT | reason::MWAIT => halt(vm, exit_reason_name(basic)),
        reason::MONITOR => skip_instruction(vm),
        // The caches are coherent for a VM's memory: INVD and WBINVD have
        // nothing to do, and must not flush what the other VMs cached
        // (INVD would even drop the host's dirty lines).
        reason::INVD | reason::WBINVD => skip_instruction(vm),
        // No PMU is shown: RDPMC faults as on a CPU without counters.
        reason::RDPMC => inject(Event::exception(GP, true), 0),
        reason::GETSEC => inject(Event::exception(UD, false), 0),
        // The slice is up (the scheduler sees it) or the VM's timer is due
        // (the next entry injects its interrupt).
        reason::PREEMPTION_TIMER => Next::Resume,
        // The event that waited goes in at the next entry
        // (`interrupts::deliver`); the TPR dropped below a pending
        // interrupt's class: the same.
        reason::INTERRUPT_WINDOW | reason::NMI_WINDOW | reason::TPR_BELOW_THRESHOLD => Next::Resume,
        reason::EXTERNAL_INTERRUPT => {
            let info = read(ro::VMEXIT_INTERRUPTION_INFO);
            log::debug!("{}: external interrupt, vector {}", vm.name, info & 0xff);
            Next::Resume
        }
        reason::TRIPLE_FAULT => {
            vm.stop(Cause::TripleFault);
            Next::Ended
        }
        // One vCPU and no virtual APIC that could send INIT or SIPI; a
        // task switch cannot happen in IA-32e mode (SDM Vol. 3A 7.7).
        reason::INIT_SIGNAL | reason::STARTUP_IPI | reason::TASK_SWITCH => {
            vm.stop(Cause::Unhandled(alloc::format!("{} is not emulated", exit_reason_name(basic))));
            Next::Ended
        }
        r if is_vmx_instruction(r) => {
            guest_log!(vm, info, "{}: {} in the guest: injecting #UD", vm.name, exit_reason_name(r));
            inject(Event::exception(UD, false), 0)
        }
        r => {
            vm.stop(Cause::Unhandled(alloc::format!("unhandled exit reason {r} ({})", exit_reason_name(r))));
            Next::Ended
        }
    }
}

/// An IRET that faulted (an exception or an EPT violation) had already
/// unblocked NMIs; it runs again after the exit and will unblock them then,
/// so the blocking is put back meanwhile (SDM Vol. 3C 28.2.3 bit 12 of the
/// exit qualification, 28.2.2 for the interruption information: with
/// virtual NMIs the VMM sets blocking by NMI again before resuming).
/// Without this an NMI could nest inside the guest's NMI handler.
fn restore_nmi_blocking(basic: u16) {
    const NMI_UNBLOCKED_BY_IRET: u64 = 1 << 12;
    let bit = match basic {
        reason::EPT_VIOLATION => read(ro::EXIT_QUALIFICATION) & NMI_UNBLOCKED_BY_IRET,
        reason::EXCEPTION_OR_NMI => read(ro::VMEXIT_INTERRUPTION_INFO) & NMI_UNBLOCKED_BY_IRET,
        _ => 0,
    };
    // Undefined when the exit came during an event's delivery.
    if bit != 0 && read(ro::IDT_VECTORING_INFO) as u32 & event::VALID == 0 {
        set(guest::INTERRUPTIBILITY_STATE, read(guest::INTERRUPTIBILITY_STATE) | event::BLOCKING_BY_NMI as u64);
    }
}

/// An exit during event delivery (say, an EPT violation on the page of
/// the guest's exception handler) leaves the event in the IDT-vectoring
/// field; it must be delivered again on the next entry or the guest loses
/// it (SDM Vol. 3C 28.2.4, 27.6.1). A handler that injects an event of its
/// own replaces it.
fn reinject_interrupted_event() {
    let Some(e) = Event::decode(read(ro::IDT_VECTORING_INFO) as u32) else { return };
    set(control::VMENTRY_INTERRUPTION_INFO_FIELD, e.encode() as u64);
    if e.error_code {
        set(control::VMENTRY_EXCEPTION_ERR_CODE, read(ro::IDT_VECTORING_ERR_CODE));
    }
    set(control::VMENTRY_INSTRUCTION_LEN, read(ro::VMEXIT_INSTRUCTION_LEN));
}

/// Ends an instruction the hypervisor emulated, as the CPU would have:
/// RIP past it, the STI/MOV-SS shadow over (it covered this instruction),
/// and with RFLAGS.TF a single-step #DB after it (DR6.BS set).
pub fn skip_instruction(vm: &mut Vm) -> Next {
    advance_rip(vm, read(ro::VMEXIT_INSTRUCTION_LEN))
}

/// [`skip_instruction`] for an instruction of `len` bytes the exit did not
/// measure (an EPT violation gives no instruction length).
pub fn advance_rip(_vm: &mut Vm, len: u64) -> Next {
    let rip = read(guest::RIP);
    set(guest::RIP, rip + len);
    let before = read(guest::INTERRUPTIBILITY_STATE) as u32;
    let after = event::after_emulated(before, read(guest::RFLAGS));
    if after.interruptibility != before {
        set(guest::INTERRUPTIBILITY_STATE, after.interruptibility as u64);
    }
    if after.single_step {
        // The guest's DR6 is live during its slice (`vcpu`).
        crate::vcpu::write_dr6(crate::vcpu::read_dr6() | event::DR6_BS);
        return inject(Event::exception(exception::DB, false), 0);
    }
    Next::Resume
}

/// Queues `e` for the next VM entry (SDM Vol. 3C 27.6.1), with
/// `error_code` where it has one.
pub fn inject(e: Event, error_code: u32) -> Next {
    if e.kind == event::kind::HARDWARE_EXCEPTION && event::is_fault(e.vector) {
        set(guest::RFLAGS, read(guest::RFLAGS) | event::RFLAGS_RF);
    }
    if e.error_code {
        set(control::VMENTRY_EXCEPTION_ERR_CODE, error_code as u64);
    }
    set(control::VMENTRY_INTERRUPTION_INFO_FIELD, e.encode() as u64);
    Next::Resume
}

/// `#GP(0)`, the answer to most bad writes.
pub fn inject_gp() -> Next {
    inject(Event::exception(GP, true), 0)
}

/// HLT (and MWAIT). A VM with the virtual APIC sleeps until an interrupt
/// it accepts or an NMI arrives (SDM Vol. 2A, HLT: "an enabled interrupt
/// (including NMI ...) will resume execution"); the scheduler skips it
/// meanwhile and the other VMs run. One
/// without: with interrupts off nothing can ever wake it, so it is
/// finished; otherwise it idles and the other VMs run.
fn halt(vm: &mut Vm, what: &str) -> Next {
    // Resume or a queued single-step #DB: either way the VM stays.
    let _ = skip_instruction(vm);
    if vm.platform.lapic.is_some() {
        vm.halted = true;
        vm.halted_with_if = read(guest::RFLAGS) & event::RFLAGS_IF != 0;
        return Next::Yield;
    }
    if read(guest::RFLAGS) & event::RFLAGS_IF == 0 {
        vm.stop(Cause::Unhandled(alloc::format!("{what} with interrupts disabled: the guest can never wake")));
        return Next::Ended;
    }
    Next::Yield
}

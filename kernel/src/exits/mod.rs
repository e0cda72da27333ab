//! VM-exit dispatch: one file per exit reason that needs more than a line.
//! A handler tells the scheduler what to do next.

mod cpuid;
mod cr_access;
mod ept_violation;
mod io;
mod msr;
mod vmcall;

use crate::hypervisor::Host;
use crate::vm::{Cause, Vm};
use crate::vmx::vmcs::{read, write};
use hvcore::vmx::exit::{exit_reason_name, is_vmx_instruction, reason};
use x86::vmx::vmcs::{control, guest, ro};

/// Bits of the event-information format shared by the VM-entry
/// interruption-information and IDT-vectoring fields (SDM Vol. 3C 25.8.3).
const EVENT_VALID: u64 = 1 << 31;
const EVENT_DELIVERS_ERROR_CODE: u64 = 1 << 11;

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
    reinject_interrupted_event();
    match basic {
        reason::CPUID => cpuid::handle(vm),
        reason::VMCALL => vmcall::handle(vm, host),
        reason::IO_INSTRUCTION => io::handle(vm),
        reason::RDMSR => msr::read(vm),
        reason::WRMSR => msr::write(vm),
        reason::CR_ACCESS => cr_access::handle(vm, host),
        reason::EPT_VIOLATION => ept_violation::handle(vm, host),
        reason::EPT_MISCONFIG => {
            let gpa = read(ro::GUEST_PHYSICAL_ADDR_FULL);
            vm.stop(Cause::Unhandled(alloc::format!("EPT misconfiguration at {gpa:#x} (a hypervisor bug)")));
            Next::Ended
        }
        reason::HLT => hlt(vm),
        reason::PREEMPTION_TIMER => Next::Yield,
        reason::EXTERNAL_INTERRUPT => {
            let info = read(ro::VMEXIT_INTERRUPTION_INFO);
            log::debug!("{}: external interrupt, vector {}", vm.name, info & 0xff);
            Next::Resume
        }
        reason::TRIPLE_FAULT => {
            vm.stop(Cause::TripleFault);
            Next::Ended
        }
        r if is_vmx_instruction(r) => {
            log::info!("{}: {} in the guest: injecting #UD", vm.name, exit_reason_name(r));
            inject_exception(vm, 6, None)
        }
        r => {
            vm.stop(Cause::Unhandled(alloc::format!("unhandled exit reason {r} ({})", exit_reason_name(r))));
            Next::Ended
        }
    }
}

/// An exit during event delivery (say, an EPT violation on the page of
/// the guest's exception handler) leaves the event in the IDT-vectoring
/// field; it must be delivered again on the next entry or the guest loses
/// it (SDM Vol. 3C 28.2.4, 27.6.1). A handler that injects an event of its
/// own replaces it.
fn reinject_interrupted_event() {
    let info = read(ro::IDT_VECTORING_INFO);
    if info & EVENT_VALID == 0 {
        return;
    }
    // Bit 12 of the vectoring information is undefined; entry wants it 0.
    let _ = write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info & !(1 << 12));
    if info & EVENT_DELIVERS_ERROR_CODE != 0 {
        let _ = write(control::VMENTRY_EXCEPTION_ERR_CODE, read(ro::IDT_VECTORING_ERR_CODE));
    }
    let _ = write(control::VMENTRY_INSTRUCTION_LEN, read(ro::VMEXIT_INSTRUCTION_LEN));
}

/// Moves the guest past the instruction that exited.
pub fn skip_instruction() {
    let rip = read(guest::RIP);
    let len = read(ro::VMEXIT_INSTRUCTION_LEN);
    let _ = write(guest::RIP, rip + len);
}

/// Queues a hardware exception for the next VM entry (SDM Vol. 3C 27.6.1).
pub fn inject_exception(vm: &mut Vm, vector: u8, error_code: Option<u32>) -> Next {
    const HARDWARE_EXCEPTION: u64 = 3 << 8;
    let mut info = vector as u64 | HARDWARE_EXCEPTION | EVENT_VALID;
    if let Some(code) = error_code {
        info |= EVENT_DELIVERS_ERROR_CODE;
        let _ = write(control::VMENTRY_EXCEPTION_ERR_CODE, code as u64);
    }
    match write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info) {
        Ok(()) => Next::Resume,
        Err(_) => {
            vm.stop(Cause::Unhandled("could not inject an exception".into()));
            Next::Ended
        }
    }
}

/// HLT: with interrupts off nothing can ever wake the guest (no virtual
/// interrupts are delivered yet): it is finished. Otherwise it idles.
fn hlt(vm: &mut Vm) -> Next {
    skip_instruction();
    if read(guest::RFLAGS) & (1 << 9) == 0 {
        vm.stop(Cause::Unhandled("HLT with interrupts disabled: the guest can never wake".into()));
        return Next::Ended;
    }
    Next::Yield
}

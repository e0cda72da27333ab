//! Exceptions that exit (`vmx::vmcs::EXCEPTION_BITMAP`: #DB and #AC) and
//! NMIs. #DB and #AC are reflected into the guest one at a time, which is
//! the point of intercepting them: a delivery that raises the same
//! exception again is a series of exits, not a CPU stuck in microcode
//! (XSA-156). One that repeats without end is stopped by name.

use super::{inject, Next};
use crate::vm::{Cause, Vm};
use crate::vmx::vmcs::{read, set};
use hvcore::vmx::event::{self, kind, Event};
use x86::vmx::vmcs::{control, guest, ro};

pub const DB: u8 = 1;
const BLOCKING_STI: u64 = event::BLOCKING_BY_STI as u64;
const BLOCKING_MOV_SS: u64 = event::BLOCKING_BY_MOV_SS as u64;
pub const AC: u8 = 17;

pub fn handle(vm: &mut Vm) -> Next {
    let Some(e) = Event::decode(read(ro::VMEXIT_INTERRUPTION_INFO) as u32) else {
        vm.stop(Cause::Unhandled("exception exit without exit interruption information".into()));
        return Next::Ended;
    };
    if e.kind == kind::NMI {
        // The host's NMI (NMI exiting): nothing of the guest's.
        log::debug!("{}: NMI while the guest ran", vm.name);
        return Next::Resume;
    }
    let (rip, rsp) = (read(guest::RIP), read(guest::RSP));
    if vm.exception_loop.exception(e.vector, rip, rsp) {
        let rounds = vm.exception_loop.rounds();
        vm.stop(Cause::ExceptionLoop { vector: e.vector, rip, rounds });
        return Next::Ended;
    }
    match e.vector {
        DB => {
            let mut qual = read(ro::EXIT_QUALIFICATION);
            let icebp = e.kind == kind::PRIVILEGED_SOFTWARE_EXCEPTION;
            if icebp {
                // ICEBP's #DB sets no DR6 status bit; a single step that
                // coincides with it is subsumed (it has the higher
                // priority). Bochs reports BS here; Intel CPUs and KVM
                // (kvm-unit-tests' debug checks DR6 == 0xffff0ff0) do not.
                qual = 0;
            }
            let deferred_step = qual & event::DR6_BD != 0 && qual & event::DR6_BS != 0;
            if deferred_step {
                // General detect is a fault: the MOV DR runs again after
                // it, and the single step that was due with it follows
                // that instruction, as a pending debug exception.
                qual &= !event::DR6_BS;
                set(guest::PENDING_DBG_EXCEPTIONS, read(guest::PENDING_DBG_EXCEPTIONS) | event::DR6_BS);
            }
            // The guest's DR6 is live in the CPU during its slice.
            crate::vcpu::write_dr6(event::dr6_for_db(crate::vcpu::read_dr6(), qual));
            if qual & event::DR6_BD != 0 {
                // General detect: the CPU clears DR7.GD as it delivers.
                set(guest::DR7, read(guest::DR7) & !event::DR7_GD);
            }
            if read(ro::IDT_VECTORING_INFO) as u32 & event::VALID != 0 {
                // The #DB came up while another event was being delivered,
                // which `reinject_interrupted_event` queued again: the #DB
                // waits as a pending debug exception and follows that
                // delivery (SDM 27.7.3). The field has B0-B3, "enabled
                // breakpoint" (bit 12) and BS; bit 13 is reserved there
                // (SDM 25.4.2), and BD is a fault, never pending.
                let mut pending = read(guest::PENDING_DBG_EXCEPTIONS) | (qual & (event::DR6_B0_B3 | event::DR6_BS));
                if qual & event::DR6_B0_B3 != 0 {
                    pending |= 1 << 12;
                }
                set(guest::PENDING_DBG_EXCEPTIONS, pending);
                return Next::Resume;
            }
            let blocking = read(guest::INTERRUPTIBILITY_STATE);
            if icebp {
                // ICEBP (INT1): the exit is an instruction intercept, taken
                // on the ICEBP itself. Complete it as the CPU would: RIP
                // past it (which ends STI/MOV-SS blocking), then its
                // trap-like #DB, as a hardware exception so that nothing
                // of the blocking it ended is checked again at VM entry
                // (KVM's handle_exception_nmi does the same).
                set(guest::RIP, read(guest::RIP) + read(ro::VMEXIT_INSTRUCTION_LEN));
                set(guest::INTERRUPTIBILITY_STATE, blocking & !(BLOCKING_STI | BLOCKING_MOV_SS));
                return inject(Event::exception(DB, false), 0);
            }
            if read(guest::RFLAGS) & event::RFLAGS_TF != 0 && blocking & (BLOCKING_STI | BLOCKING_MOV_SS) != 0 {
                // A single step the STI/MOV-SS shadow deferred is still
                // owed after this #DB; the CPU does not record it on a #DB
                // exit (it does on every other exit), and VM entry insists
                // on it with TF set in a shadow (SDM Vol. 3C 27.3.1.5).
                set(guest::PENDING_DBG_EXCEPTIONS, read(guest::PENDING_DBG_EXCEPTIONS) | event::DR6_BS);
            }
        }
        AC => {}
        v => {
            vm.stop(Cause::Unhandled(alloc::format!("exception {v} exited, but only #DB and #AC are intercepted")));
            return Next::Ended;
        }
    }
    if e.needs_instruction_length() {
        // ICEBP: the pushed RIP points after the instruction.
        set(control::VMENTRY_INSTRUCTION_LEN, read(ro::VMEXIT_INSTRUCTION_LEN));
    }
    let code = if e.error_code { read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32 } else { 0 };
    inject(e, code)
}

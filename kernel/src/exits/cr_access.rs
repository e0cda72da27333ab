//! MOV to CR0/CR4 that touches a bit VMX fixes (the guest/host masks):
//! the guest keeps the value it wrote in the read shadow, the real
//! register keeps the fixed bits (SDM Vol. 3C 26.3, Table 28-3).

use super::{skip_instruction, Next};
use crate::hypervisor::Host;
use crate::vm::{Cause, Vm};
use crate::vmx::vmcs::{read, write};
use x86::vmx::vmcs::{control, guest, ro};

pub fn handle(vm: &mut Vm, host: &Host) -> Next {
    let q = read(ro::EXIT_QUALIFICATION);
    let (cr, access, gpr) = (q & 0xf, (q >> 4) & 3, ((q >> 8) & 0xf) as usize);
    if access != 0 {
        vm.stop(Cause::Unhandled(alloc::format!("control-register access type {access} to CR{cr} is not emulated")));
        return Next::Ended;
    }
    let value = gpr_value(vm, gpr);
    let caps = &host.caps;
    let done = match cr {
        0 => write(guest::CR0, caps.fix_cr0(value)).and(write(control::CR0_READ_SHADOW, value)),
        4 => write(guest::CR4, caps.fix_cr4(value)).and(write(control::CR4_READ_SHADOW, value)),
        _ => {
            vm.stop(Cause::Unhandled(alloc::format!("MOV to CR{cr} is not emulated")));
            return Next::Ended;
        }
    };
    if done.is_err() {
        vm.stop(Cause::Unhandled(alloc::format!("could not update CR{cr}")));
        return Next::Ended;
    }
    skip_instruction();
    Next::Resume
}

/// General-purpose register `n` in the encoding of Table 28-3.
fn gpr_value(vm: &Vm, n: usize) -> u64 {
    let r = &vm.regs;
    [
        r.rax, r.rcx, r.rdx, r.rbx, read(guest::RSP), r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
        r.r14, r.r15,
    ][n]
}

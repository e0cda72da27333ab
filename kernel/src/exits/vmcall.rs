//! VMCALL: the hypercall ABI of `hvcore::hypercall`. Only the guest's
//! kernel may call (CPL 0: KVM refuses user-mode hypercalls the same way).
//! A refused call (CPL above 0, unknown number, bad argument, too many
//! checks) returns ERROR in RAX and is counted; the guest goes on. Every
//! log line a guest causes here is rate-limited, and guest bytes are
//! escaped and prefixed with the VM's name.

use super::{skip_instruction, Next};
use crate::hypervisor::Host;
use crate::vm::{Check, End, Vm, MAX_CHECKS};
use crate::vmx::vmcs::read;
use hvcore::hypercall::{decode, Hypercall, ERROR, PRINT_MAX};
use hvcore::serial_device::escape_guest_text;
use x86::vmx::vmcs::guest;

pub fn handle(vm: &mut Vm, host: &mut Host) -> Next {
    let _ = skip_instruction(vm);
    // CPL is SS.DPL (access rights bits 6:5) in the guest-state area
    // (SDM Vol. 3C 25.4.1).
    let cpl = (read(guest::SS_ACCESS_RIGHTS) >> 5) & 3;
    let r = &vm.vcpu.regs;
    let call = match decode(r.rax, r.rdi, r.rsi, r.rdx) {
        Ok(_) if cpl != 0 => Err(alloc::format!("hypercall from CPL {cpl}")),
        Ok(call) => Ok(call),
        Err(e) => Err(alloc::format!("{e}")),
    };
    let call = match call {
        Ok(call) => call,
        Err(why) => return refuse(vm, &why),
    };
    vm.vcpu.regs.rax = 0;
    match call {
        Hypercall::Print { gpa, len } => {
            let mut buf = [0u8; PRINT_MAX as usize];
            let buf = &mut buf[..len as usize];
            match host.pm.read_gpa(vm.id, gpa, buf) {
                Ok(()) => guest_log!(vm, info, "[{}] {}", vm.name, escape_guest_text(buf)),
                Err(e) => {
                    guest_log!(vm, info, "{}: PRINT of {len} bytes at {gpa:#x} refused: {e:?}", vm.name);
                    vm.vcpu.regs.rax = ERROR;
                }
            }
            Next::Resume
        }
        Hypercall::Yield => Next::Yield,
        Hypercall::Nop => Next::Resume,
        Hypercall::Report { .. } if vm.checks.len() >= MAX_CHECKS => {
            refuse(vm, &alloc::format!("more than {MAX_CHECKS} checks reported"))
        }
        Hypercall::Report { check, failed, detail } => {
            guest_log!(
                vm, info, "{}: check {} {} (detail {:#x})",
                vm.name, check, if failed { "FAILED" } else { "passed" }, detail
            );
            vm.checks.push(Check { id: check, failed, detail });
            host.on_report(vm, check);
            Next::Resume
        }
        Hypercall::Exit { code } => {
            guest_log!(vm, info, "{}: exit hypercall, code {}", vm.name, code);
            vm.end = Some(End::Exited(code));
            Next::Ended
        }
        Hypercall::DedupeStatus => {
            vm.vcpu.regs.rax = host.dedupe_converged_for(vm) as u64;
            Next::Yield
        }
    }
}

fn refuse(vm: &mut Vm, why: &str) -> Next {
    // An unmodified guest does not know our hypercalls: its VMCALLs (KVM's
    // ABI, kvm-unit-tests' vmexit loop) are refused and counted, not
    // logged one by one (a line costs the host the UART time of one).
    if matches!(vm.kind, crate::vm::Kind::Program { .. }) {
        guest_log!(vm, info, "{}: refused hypercall: {}", vm.name, why);
    }
    vm.refused_hypercalls += 1;
    vm.vcpu.regs.rax = ERROR;
    Next::Resume
}

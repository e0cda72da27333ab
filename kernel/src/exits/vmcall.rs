//! VMCALL: the hypercall ABI of `hvcore::hypercall`. A refused call
//! (unknown number, bad argument) returns ERROR in RAX and is counted;
//! the guest goes on.

use super::{skip_instruction, Next};
use crate::hypervisor::Host;
use crate::vm::{Check, End, Vm};
use hvcore::hypercall::{decode, Hypercall, ERROR, PRINT_MAX};

pub fn handle(vm: &mut Vm, host: &mut Host) -> Next {
    let r = &vm.regs;
    skip_instruction();
    let call = match decode(r.rax, r.rdi, r.rsi, r.rdx) {
        Ok(call) => call,
        Err(e) => {
            log::info!("{}: refused hypercall: {}", vm.name, e);
            vm.refused_hypercalls += 1;
            vm.regs.rax = ERROR;
            return Next::Resume;
        }
    };
    vm.regs.rax = 0;
    match call {
        Hypercall::Print { gpa, len } => {
            let mut buf = [0u8; PRINT_MAX as usize];
            let buf = &mut buf[..len as usize];
            match host.pm.read_gpa(vm.id, gpa, buf) {
                Ok(()) => log::info!("[{}] {}", vm.name, core::str::from_utf8(buf).unwrap_or("(not UTF-8)")),
                Err(e) => {
                    log::info!("{}: PRINT of {len} bytes at {gpa:#x} refused: {e:?}", vm.name);
                    vm.regs.rax = ERROR;
                }
            }
            Next::Resume
        }
        Hypercall::Yield => Next::Yield,
        Hypercall::Nop => Next::Resume,
        Hypercall::Report { check, failed, detail } => {
            log::info!(
                "{}: check {} {} (detail {:#x})",
                vm.name, check, if failed { "FAILED" } else { "passed" }, detail
            );
            vm.checks.push(Check { id: check, failed, detail });
            host.on_report(vm, check);
            Next::Resume
        }
        Hypercall::Exit { code } => {
            log::info!("{}: exit hypercall, code {}", vm.name, code);
            vm.end = Some(End::Exited(code));
            Next::Ended
        }
        Hypercall::DedupeStatus => {
            vm.regs.rax = host.dedupe_converged_for(vm) as u64;
            Next::Yield
        }
    }
}

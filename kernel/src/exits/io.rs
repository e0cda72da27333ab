//! Port I/O (every IN/OUT exits): COM1 is the emulated 16550; any other
//! port reads as all ones and ignores writes, and is counted.

use super::{skip_instruction, Next};
use crate::vm::{Cause, Vm};
use crate::vmx::vmcs::read;
use hvcore::serial_device::SerialDevice;
use hvcore::vmx::IoQual;
use x86::vmx::vmcs::ro;

pub fn handle(vm: &mut Vm) -> Next {
    let q = IoQual::decode(read(ro::EXIT_QUALIFICATION));
    if q.string {
        vm.stop(Cause::Unhandled(alloc::format!("string I/O (INS/OUTS) on port {:#x} is not emulated", q.port)));
        return Next::Ended;
    }
    let mask = match q.size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    };
    if SerialDevice::claims(q.port) {
        if q.is_in {
            vm.regs.rax = (vm.regs.rax & !mask) | vm.serial.read(q.port) as u64;
        } else if let Some(line) = vm.serial.write(q.port, vm.regs.rax as u8) {
            log::info!("[{}] {}", vm.name, line);
        }
    } else {
        vm.unknown_ports += 1;
        log::debug!("{}: {} unknown port {:#x}", vm.name, if q.is_in { "IN from" } else { "OUT to" }, q.port);
        if q.is_in {
            vm.regs.rax |= mask;
        }
    }
    skip_instruction();
    Next::Resume
}

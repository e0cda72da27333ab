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
    if q.is_in {
        let value = if SerialDevice::claims(q.port) { vm.serial.read(q.port) as u64 } else { unknown(vm, q.port, "IN from") };
        vm.vcpu.regs.rax = merge_in(vm.vcpu.regs.rax, value, q.size);
    } else if SerialDevice::claims(q.port) {
        if let Some(line) = vm.serial.write(q.port, vm.vcpu.regs.rax as u8) {
            // The device hands out lines with every byte that is not
            // printable ASCII escaped; the prefix names the VM.
            guest_log!(vm, info, "[{}] {}", vm.name, line);
        }
    } else {
        unknown(vm, q.port, "OUT to");
    }
    skip_instruction(vm)
}

/// An unknown port: reads as all ones.
fn unknown(vm: &mut Vm, port: u16, what: &str) -> u64 {
    vm.unknown_ports += 1;
    log::debug!("{}: {what} unknown port {port:#x}", vm.name);
    u64::MAX
}

/// RAX after IN of `size` bytes: an 8- or 16-bit IN leaves the rest of
/// RAX alone, a 32-bit one writes EAX and so clears bits 63:32, as every
/// 32-bit register write does in 64-bit mode (SDM Vol. 1 3.4.1.1).
fn merge_in(rax: u64, value: u64, size: u8) -> u64 {
    match size {
        1 => (rax & !0xff) | (value & 0xff),
        2 => (rax & !0xffff) | (value & 0xffff),
        _ => value & 0xffff_ffff,
    }
}

//! Port I/O (every IN/OUT exits): the VM's platform (`hvcore::platform`)
//! answers; a port no device claims reads as all ones, ignores writes and
//! is counted there.

use super::{skip_instruction, Next};
use crate::vm::{Cause, End, Vm};
use crate::vmx::vmcs::read;
use hvcore::platform::IoEffect;
use hvcore::vmx::IoQual;
use x86::vmx::vmcs::ro;

pub fn handle(vm: &mut Vm) -> Next {
    let q = IoQual::decode(read(ro::EXIT_QUALIFICATION));
    if q.string {
        vm.stop(Cause::Unhandled(alloc::format!("string I/O (INS/OUTS) on port {:#x} is not emulated", q.port)));
        return Next::Ended;
    }
    // The PIT counts in guest time: it reads what the guest would read now.
    vm.platform.poll(crate::vcpu::guest_tsc(vm));
    if q.is_in {
        let value = vm.platform.io_read(q.port, q.size);
        vm.vcpu.regs.rax = merge_in(vm.vcpu.regs.rax, value as u64, q.size);
        return skip_instruction(vm);
    }
    match vm.platform.io_write(q.port, q.size, vm.vcpu.regs.rax as u32) {
        IoEffect::None => {}
        // The device hands out lines with every byte that is not
        // printable ASCII escaped; the prefix names the VM.
        IoEffect::Line(line) => guest_log!(vm, info, "[{}] {}", vm.name, line),
        IoEffect::Exit(status) => {
            vm.end = Some(End::DebugExit(status));
            return Next::Ended;
        }
        IoEffect::Reset => {
            vm.end = Some(End::Reset);
            return Next::Ended;
        }
    }
    skip_instruction(vm)
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

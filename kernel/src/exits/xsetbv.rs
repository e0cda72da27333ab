//! XSETBV (it always exits, SDM Vol. 3C 26.1.2): the guest's XCR0 is
//! checked against what its CPUID shows and then loaded for the rest of
//! its slice; the vCPU keeps it across slices (`vcpu`). A value the CPU
//! would refuse gets the #GP the CPU would raise.

use super::{inject_gp, skip_instruction, Next};
use crate::hypervisor::Host;
use crate::vm::Vm;
use hvcore::control_regs::check_xsetbv;

pub fn handle(vm: &mut Vm, host: &Host) -> Next {
    let r = &vm.vcpu.regs;
    let value = (r.rdx << 32) | (r.rax & 0xffff_ffff);
    if check_xsetbv(r.rcx as u32, value, host.cpu.xcr0).is_err() {
        return inject_gp();
    }
    crate::vcpu::xsetbv(value);
    vm.vcpu.xcr0 = value;
    skip_instruction(vm)
}

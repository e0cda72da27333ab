//! CPUID: the host's answer through `hvcore::cpuid::guest_cpuid`, which
//! shows only what works under this hypervisor.

use super::{skip_instruction, Next};
use crate::hypervisor::Host;
use crate::vm::Vm;
use hvcore::cpuid::guest_cpuid;

pub fn handle(vm: &mut Vm, host: &Host) -> Next {
    let (leaf, subleaf) = (vm.vcpu.regs.rax as u32, vm.vcpu.regs.rcx as u32);
    let view = hvcore::cpuid::GuestView {
        xcr0: vm.vcpu.xcr0,
        ..host.guest_view(crate::exits::cr_access::guest_cr4(), vm.platform.lapic.as_ref())
    };
    let g = guest_cpuid(leaf, subleaf, &crate::vcpu::host_cpuid, &view);
    let r = &mut vm.vcpu.regs;
    r.rax = g.eax as u64;
    r.rbx = g.ebx as u64;
    r.rcx = g.ecx as u64;
    r.rdx = g.edx as u64;
    skip_instruction(vm)
}

//! CPUID: the host's answer through `hvcore::cpuid::filter`.

use super::{skip_instruction, Next};
use crate::vm::Vm;
use hvcore::cpuid::{filter, Regs};

pub fn handle(vm: &mut Vm) -> Next {
    let (leaf, subleaf) = (vm.regs.rax as u32, vm.regs.rcx as u32);
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    let g = filter(leaf, Regs { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx });
    vm.regs.rax = g.eax as u64;
    vm.regs.rbx = g.ebx as u64;
    vm.regs.rcx = g.ecx as u64;
    vm.regs.rdx = g.edx as u64;
    skip_instruction();
    Next::Resume
}

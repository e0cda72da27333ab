//! RDMSR/WRMSR: every MSR access exits (the bitmap is all ones). The few
//! MSRs a 64-bit guest needs are virtualized; any other raises #GP in the
//! guest, as a CPU does for an MSR it does not have.

use super::{inject_exception, skip_instruction, Next};
use crate::vm::Vm;
use crate::vmx::vmcs::{read as vmread, write as vmwrite};
use x86::vmx::vmcs::guest;

const IA32_APIC_BASE: u32 = 0x1b;
const IA32_EFER: u32 = 0xc000_0080;
const IA32_FS_BASE: u32 = 0xc000_0100;
const IA32_GS_BASE: u32 = 0xc000_0101;
const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
const IA32_TSC: u32 = 0x10;
/// xAPIC enabled at the default base, bootstrap processor.
const APIC_BASE_DEFAULT: u64 = 0xfee0_0900;

pub fn read(vm: &mut Vm) -> Next {
    let msr = vm.regs.rcx as u32;
    let value = match msr {
        IA32_EFER => vmread(guest::IA32_EFER_FULL),
        IA32_FS_BASE => vmread(guest::FS_BASE),
        IA32_GS_BASE => vmread(guest::GS_BASE),
        IA32_KERNEL_GS_BASE => vm.kernel_gs_base,
        IA32_APIC_BASE => APIC_BASE_DEFAULT,
        IA32_TSC => unsafe { core::arch::x86_64::_rdtsc() },
        _ => return unknown(vm, "RDMSR", msr),
    };
    vm.regs.rax = value & 0xffff_ffff;
    vm.regs.rdx = value >> 32;
    skip_instruction();
    Next::Resume
}

pub fn write(vm: &mut Vm) -> Next {
    let msr = vm.regs.rcx as u32;
    let value = (vm.regs.rdx << 32) | (vm.regs.rax & 0xffff_ffff);
    let ok = match msr {
        // LME/LMA must stay as they are while paging is on; NXE/SCE may change.
        IA32_EFER => vmwrite(guest::IA32_EFER_FULL, value | 0x500).is_ok(),
        IA32_FS_BASE => vmwrite(guest::FS_BASE, value).is_ok(),
        IA32_GS_BASE => vmwrite(guest::GS_BASE, value).is_ok(),
        IA32_KERNEL_GS_BASE => {
            vm.kernel_gs_base = value;
            true
        }
        _ => false,
    };
    if !ok {
        return unknown(vm, "WRMSR", msr);
    }
    skip_instruction();
    Next::Resume
}

fn unknown(vm: &mut Vm, what: &str, msr: u32) -> Next {
    log::info!("{}: {} of unknown MSR {:#x}: injecting #GP", vm.name, what, msr);
    inject_exception(vm, 13, Some(0))
}

//! RDMSR/WRMSR of the MSRs the bitmap does not pass through (those are
//! switched per VM by `vcpu`). The ones a guest of the CPU we show needs
//! are virtualized; any other raises #GP in the guest, as a CPU does for
//! an MSR it does not have.

use super::{inject_gp, skip_instruction, Next};
use crate::hypervisor::Host;
use crate::vm::Vm;
use crate::vmx::vmcs::{read as vmread, set as vmset};
use hvcore::control_regs::check_efer_write;
use hvcore::msrs;
use x86::vmx::vmcs::{control, guest};

const IA32_TSC: u32 = 0x10;
const IA32_TSC_ADJUST: u32 = 0x3b;
const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;
const IA32_PAT: u32 = 0x277;
const IA32_EFER: u32 = 0xc000_0080;
const IA32_FS_BASE: u32 = 0xc000_0100;
const IA32_GS_BASE: u32 = 0xc000_0101;
/// xAPIC enabled at the default base, bootstrap processor.
const APIC_BASE_DEFAULT: u64 = 0xfee0_0900;

pub fn read(vm: &mut Vm) -> Next {
    let msr = vm.vcpu.regs.rcx as u32;
    let value = match super::apic::rdmsr(vm, msr) {
        Some(Ok(v)) => v,
        Some(Err(_)) => return inject_gp(),
        None => match msr {
        // The guest's TSC is the host's plus its offset (SDM Vol. 3C 26.6.5).
        IA32_TSC => crate::vcpu::guest_tsc(vm),
        IA32_TSC_ADJUST => vm.vcpu.tsc_adjust,
        // Without the virtual APIC: xAPIC at the default base, as after reset.
        hvcore::devices::lapic::MSR_APIC_BASE => APIC_BASE_DEFAULT,
        IA32_SYSENTER_CS => vmread(guest::IA32_SYSENTER_CS),
        IA32_SYSENTER_ESP => vmread(guest::IA32_SYSENTER_ESP),
        IA32_SYSENTER_EIP => vmread(guest::IA32_SYSENTER_EIP),
        IA32_PAT => vmread(guest::IA32_PAT_FULL),
        IA32_EFER => vmread(guest::IA32_EFER_FULL),
        IA32_FS_BASE => vmread(guest::FS_BASE),
        IA32_GS_BASE => vmread(guest::GS_BASE),
        msrs::IA32_MISC_ENABLE => vm.vcpu.misc_enable,
        msrs::IA32_BIOS_SIGN_ID => msrs::MICROCODE_REVISION,
        _ => match msrs::mcg_read(msr) {
            Some(v) => v,
            None => return unknown(vm, "RDMSR", msr),
        },
        },
    };
    vm.vcpu.regs.rax = value & 0xffff_ffff;
    vm.vcpu.regs.rdx = value >> 32;
    skip_instruction(vm)
}

pub fn write(vm: &mut Vm, host: &Host) -> Next {
    let msr = vm.vcpu.regs.rcx as u32;
    let value = (vm.vcpu.regs.rdx << 32) | (vm.vcpu.regs.rax & 0xffff_ffff);
    match super::apic::wrmsr(vm, msr, value) {
        Some(Ok(())) => return skip_instruction(vm),
        Some(Err(_)) => return inject_gp(),
        None => {}
    }
    let field = match msr {
        // A write to the TSC moves TSC_ADJUST by the same amount, and a
        // write to TSC_ADJUST moves the TSC (SDM Vol. 3B 18.17.3).
        IA32_TSC => {
            let step = value.wrapping_sub(crate::vcpu::guest_tsc(vm));
            vm.vcpu.tsc_adjust = vm.vcpu.tsc_adjust.wrapping_add(step);
            set_tsc_offset(vm, vm.vcpu.tsc_offset.wrapping_add(step));
            return skip_instruction(vm);
        }
        IA32_TSC_ADJUST => {
            let step = value.wrapping_sub(vm.vcpu.tsc_adjust);
            vm.vcpu.tsc_adjust = value;
            set_tsc_offset(vm, vm.vcpu.tsc_offset.wrapping_add(step));
            return skip_instruction(vm);
        }
        IA32_EFER => {
            // SCE and NXE only where CPUID shows them (0x8000_0001:EDX bits
            // 11, 20); LME/LMA are checked against paging (SDM Vol. 3A 2.2.1).
            let shown = hvcore::cpuid::guest_cpuid(0x8000_0001, 0, &crate::vcpu::host_cpuid, &host.guest_view(0, None));
            let (syscall, nx) = (shown.edx & (1 << 11) != 0, shown.edx & (1 << 20) != 0);
            let Ok(efer) = check_efer_write(&super::cr_access::cr_state(), value, nx, syscall) else {
                return inject_gp();
            };
            vmset(guest::IA32_EFER_FULL, efer);
            return skip_instruction(vm);
        }
        IA32_SYSENTER_CS => guest::IA32_SYSENTER_CS,
        IA32_SYSENTER_ESP | IA32_SYSENTER_EIP | IA32_FS_BASE | IA32_GS_BASE if !canonical(value) => return inject_gp(),
        IA32_SYSENTER_ESP => guest::IA32_SYSENTER_ESP,
        IA32_SYSENTER_EIP => guest::IA32_SYSENTER_EIP,
        IA32_FS_BASE => guest::FS_BASE,
        IA32_GS_BASE => guest::GS_BASE,
        IA32_PAT if !valid_pat(value) => return inject_gp(),
        IA32_PAT => guest::IA32_PAT_FULL,
        msrs::IA32_BIOS_SIGN_ID => return skip_instruction(vm),
        msrs::IA32_MISC_ENABLE => {
            let Ok(v) = msrs::misc_enable_write(vm.vcpu.misc_enable, value) else { return inject_gp() };
            vm.vcpu.misc_enable = v;
            return skip_instruction(vm);
        }
        _ => match msrs::mcg_write(msr, value) {
            Some(Ok(())) => return skip_instruction(vm),
            Some(Err(_)) => return inject_gp(),
            None => return unknown(vm, "WRMSR", msr),
        },
    };
    vmset(field, value);
    skip_instruction(vm)
}

fn set_tsc_offset(vm: &mut Vm, offset: u64) {
    vm.vcpu.tsc_offset = offset;
    vmset(control::TSC_OFFSET_FULL, offset);
}

/// A 48-bit canonical address (bits 63:47 all equal).
fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// Every PAT entry a memory type: UC 0, WC 1, WT 4, WP 5, WB 6, UC- 7
/// (2 and 3 are reserved: #GP, SDM Vol. 3A 13.12.2).
fn valid_pat(v: u64) -> bool {
    v.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7))
}

fn unknown(vm: &mut Vm, what: &str, msr: u32) -> Next {
    guest_log!(vm, info, "{}: {} of unknown MSR {:#x}: injecting #GP", vm.name, what, msr);
    inject_gp()
}

//! Turning VMX on: detection with errors that name what is missing, the
//! fixed CR0/CR4 bits, and VMXON (SDM Vol. 3C 24.7, 24.8; Vol. 3D A).

pub mod instructions;
pub mod vmcs;

use crate::memory::Page;
use alloc::boxed::Box;
use core::fmt;
use hvcore::vmx::{FeatureControl, Missing, VmxCaps};
use x86::msr::{rdmsr, wrmsr};
use x86_64::registers::control::{Cr0, Cr4, Cr4Flags};

pub enum VmxError {
    NoVmx,
    DisabledInFirmware,
    Missing(Missing),
    VmxonFailed,
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmxError::NoVmx => f.write_str("the CPU has no VMX (CPUID.1:ECX.VMX[bit 5] is 0)"),
            VmxError::DisabledInFirmware => f.write_str(
                "VT-x is disabled in firmware (IA32_FEATURE_CONTROL is locked with VMX off): enable \
                 Intel Virtualization Technology in the firmware setup",
            ),
            VmxError::Missing(m) => write!(f, "{m}"),
            VmxError::VmxonFailed => f.write_str("VMXON failed"),
        }
    }
}

/// VMX operation, on. Holds the VMXON region for as long as it lasts.
pub struct Vmx {
    pub caps: VmxCaps,
    _vmxon_region: Box<Page>,
}

pub fn enable() -> Result<Vmx, VmxError> {
    if !x86::cpuid::CpuId::new().get_feature_info().is_some_and(|f| f.has_vmx()) {
        return Err(VmxError::NoVmx);
    }
    // SAFETY: the MSRs exist on every CPU with VMX (SDM Vol. 4 table 2-2).
    match FeatureControl::decide(unsafe { rdmsr(x86::msr::IA32_FEATURE_CONTROL) }) {
        FeatureControl::Enabled => {}
        FeatureControl::DisabledInFirmware => return Err(VmxError::DisabledInFirmware),
        FeatureControl::Write(v) => {
            log::info!("vmx: IA32_FEATURE_CONTROL was unlocked; locking it with VMX on ({v:#x})");
            unsafe { wrmsr(x86::msr::IA32_FEATURE_CONTROL, v) };
        }
    }
    let caps = VmxCaps::read(|m| unsafe { rdmsr(m) });
    log_caps(&caps);
    caps.check_required().map_err(VmxError::Missing)?;

    // SAFETY: setting the bits VMX requires (and VMXE) in CR0/CR4; the
    // kernel runs with paging and protection on, which these keep.
    unsafe {
        Cr0::write_raw(caps.fix_cr0(Cr0::read_raw()));
        Cr4::write_raw(caps.fix_cr4(Cr4::read_raw() | Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits()));
    }
    let region = Page::with_revision(caps.revision_id());
    // SAFETY: a page-aligned region with the revision id, CR0/CR4 fixed.
    unsafe { x86::bits64::vmx::vmxon(region.phys()) }.map_err(|_| VmxError::VmxonFailed)?;
    log::info!("vmx: on (VMCS revision {:#x})", caps.revision_id());
    Ok(Vmx { caps, _vmxon_region: region })
}

fn log_caps(c: &VmxCaps) {
    log::info!(
        "vmx caps: basic={:#x} pin={:#x} proc={:#x} proc2={:#x} exit={:#x} entry={:#x}",
        c.basic, c.pinbased, c.procbased, c.procbased2, c.exit, c.entry
    );
    log::info!(
        "vmx caps: ept_vpid={:#x} misc={:#x} cr0_fixed={:#x}/{:#x} cr4_fixed={:#x}/{:#x}",
        c.ept_vpid, c.misc, c.cr0_fixed.0, c.cr0_fixed.1, c.cr4_fixed.0, c.cr4_fixed.1
    );
    log::info!(
        "vmx caps: vpid={} unrestricted-guest={} ept-2MiB={} preemption-timer-rate=2^{}",
        c.has_vpid(), c.has_unrestricted_guest(), c.has_ept_2m(), c.preemption_timer_rate()
    );
}

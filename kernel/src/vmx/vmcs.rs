//! One VMCS per vCPU: its region, and the host, guest and control fields
//! for a 64-bit guest (SDM Vol. 3C 25, 27.2-27.3 for the entry checks).

use crate::memory::Page;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use hvcore::guest_boot::{self as boot, BootState};
use hvcore::vmx::caps::adjust_controls;
use hvcore::vmx::VmxCaps;
use x86::bits64::vmx;
use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};
use x86::vmx::vmcs::{control, guest, host};

pub struct Vmcs {
    region: Box<Page>,
}

/// A field that could not be written: a hypervisor bug or a CPU without
/// the field; ends the VM being set up.
#[derive(Debug)]
pub struct FieldError(pub u32);

pub fn write(field: u32, value: u64) -> Result<(), FieldError> {
    // SAFETY: a VMCS is current whenever the VM code calls this.
    unsafe { vmx::vmwrite(field, value) }.map_err(|_| FieldError(field))
}

pub fn read(field: u32) -> u64 {
    // SAFETY: as for `write`; a failed read (no such field) reads as 0.
    unsafe { vmx::vmread(field) }.unwrap_or(0)
}

/// The VMX-preemption timer value of one time slice.
pub const SLICE: u64 = 20_000;

impl Vmcs {
    pub fn new(revision: u32) -> Vmcs {
        let vmcs = Vmcs { region: Page::with_revision(revision) };
        // SAFETY: a fresh region; VMCLEAR puts it in the clear state.
        let _ = unsafe { vmx::vmclear(vmcs.region.phys()) };
        vmcs
    }

    /// Makes this the current VMCS.
    pub fn load(&self) {
        // SAFETY: a VMCS region of ours with the right revision.
        unsafe { vmx::vmptrld(self.region.phys()) }.expect("VMPTRLD of our own VMCS failed");
    }

    pub fn clear(&self) {
        let _ = unsafe { vmx::vmclear(self.region.phys()) };
    }
}

pub struct Setup<'a> {
    pub caps: &'a VmxCaps,
    pub boot: &'a BootState,
    pub eptp: u64,
    pub vpid: Option<u16>,
    pub msr_bitmap: u64,
}

/// Fills the current VMCS: controls, host state, guest state.
pub fn setup(s: &Setup<'_>) -> Result<(), String> {
    controls(s)?;
    host_state().map_err(|e| format!("host field {:#x} not writable", e.0))?;
    guest_state(s).map_err(|e| format!("guest field {:#x} not writable", e.0))
}

fn controls(s: &Setup<'_>) -> Result<(), String> {
    let c = s.caps;
    let field = |e: FieldError| format!("control field {:#x} not writable", e.0);
    // Each control value from its capability MSR, refusals named.
    let set = |f: u32, name: &str, cap: u64, want: u32| {
        let v = adjust_controls(cap, want).map_err(|bits| format!("the CPU refuses {name} controls {bits:#x}"))?;
        write(f, v as u64).map_err(field)
    };

    let pin = PinbasedControls::EXTERNAL_INTERRUPT_EXITING | PinbasedControls::VMX_PREEMPTION_TIMER;
    set(control::PINBASED_EXEC_CONTROLS, "pin-based", c.pinbased, pin.bits())?;

    let primary = PrimaryControls::HLT_EXITING
        | PrimaryControls::UNCOND_IO_EXITING
        | PrimaryControls::USE_MSR_BITMAPS
        | PrimaryControls::SECONDARY_CONTROLS;
    set(control::PRIMARY_PROCBASED_EXEC_CONTROLS, "primary processor-based", c.procbased, primary.bits())?;

    let mut secondary = SecondaryControls::ENABLE_EPT;
    if s.vpid.is_some() {
        secondary |= SecondaryControls::ENABLE_VPID;
    }
    set(control::SECONDARY_PROCBASED_EXEC_CONTROLS, "secondary", c.procbased2, secondary.bits())?;

    // Keep the preemption timer's remaining count across exits when the
    // CPU can, so a VM that exits often still gets a fair slice.
    let mut exit = ExitControls::HOST_ADDRESS_SPACE_SIZE
        | ExitControls::ACK_INTERRUPT_ON_EXIT
        | ExitControls::SAVE_IA32_EFER
        | ExitControls::LOAD_IA32_EFER;
    if (c.exit >> 32) as u32 & ExitControls::SAVE_VMX_PREEMPTION_TIMER.bits() != 0 {
        exit |= ExitControls::SAVE_VMX_PREEMPTION_TIMER;
    }
    set(control::VMEXIT_CONTROLS, "VM-exit", c.exit, exit.bits())?;
    let entry = EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_IA32_EFER;
    set(control::VMENTRY_CONTROLS, "VM-entry", c.entry, entry.bits())?;

    let mut fields = [
        (control::EXCEPTION_BITMAP, 0),
        (control::MSR_BITMAPS_ADDR_FULL, s.msr_bitmap),
        (control::EPTP_FULL, s.eptp),
        // CR0/CR4 bits VMX fixes are owned by the host: the guest reads its
        // own values from the shadows and a write that changes them exits.
        (control::CR0_GUEST_HOST_MASK, c.cr0_fixed.0 | !c.cr0_fixed.1),
        (control::CR4_GUEST_HOST_MASK, c.cr4_fixed.0 | !c.cr4_fixed.1),
        (control::CR0_READ_SHADOW, s.boot.cr0),
        (control::CR4_READ_SHADOW, s.boot.cr4),
        (control::CR3_TARGET_COUNT, 0),
    ]
    .to_vec();
    if let Some(vpid) = s.vpid {
        fields.push((control::VPID, vpid as u64));
    }
    fields.into_iter().try_for_each(|(f, v)| write(f, v).map_err(field))
}

fn host_state() -> Result<(), FieldError> {
    use x86_64::registers::control::{Cr0, Cr3, Cr4};
    use x86_64::registers::model_specific::{Efer, FsBase, GsBase};
    let sel = crate::gdt::selectors();
    write(host::CR0, Cr0::read_raw())?;
    write(host::CR3, Cr3::read_raw().0.start_address().as_u64())?;
    write(host::CR4, Cr4::read_raw())?;
    write(host::CS_SELECTOR, sel.code.0 as u64)?;
    write(host::SS_SELECTOR, sel.data.0 as u64)?;
    write(host::DS_SELECTOR, sel.data.0 as u64)?;
    write(host::ES_SELECTOR, sel.data.0 as u64)?;
    write(host::FS_SELECTOR, 0)?;
    write(host::GS_SELECTOR, 0)?;
    write(host::TR_SELECTOR, sel.tss.0 as u64)?;
    write(host::FS_BASE, FsBase::read().as_u64())?;
    write(host::GS_BASE, GsBase::read().as_u64())?;
    write(host::TR_BASE, crate::gdt::tss_base())?;
    write(host::GDTR_BASE, crate::gdt::gdt_base())?;
    write(host::IDTR_BASE, x86_64::instructions::tables::sidt().base.as_u64())?;
    write(host::IA32_SYSENTER_CS, 0)?;
    write(host::IA32_SYSENTER_ESP, 0)?;
    write(host::IA32_SYSENTER_EIP, 0)?;
    write(host::IA32_EFER_FULL, Efer::read_raw())
}

/// The "unusable" bit of a segment's access rights (SDM Vol. 3C 25.4.1),
/// for LDTR; the others come from the boot protocol (`hvcore::guest_boot`).
const AR_UNUSABLE: u64 = 1 << 16;

fn guest_state(s: &Setup<'_>) -> Result<(), FieldError> {
    let b = s.boot;
    write(guest::CR0, s.caps.fix_cr0(b.cr0))?;
    write(guest::CR3, b.cr3)?;
    write(guest::CR4, s.caps.fix_cr4(b.cr4))?;
    write(guest::DR7, 0x400)?;
    write(guest::RSP, b.rsp)?;
    write(guest::RIP, b.rip)?;
    write(guest::RFLAGS, boot::INITIAL_RFLAGS)?;
    write(guest::IA32_EFER_FULL, b.efer)?;

    write(guest::CS_SELECTOR, b.code_selector as u64)?;
    write(guest::CS_BASE, 0)?;
    write(guest::CS_LIMIT, 0xffff_ffff)?;
    write(guest::CS_ACCESS_RIGHTS, boot::CODE_ACCESS_RIGHTS as u64)?;
    for (sel, base, limit, ar) in [
        (guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS),
        (guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS),
        (guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS),
        (guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS),
        (guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS),
    ] {
        write(sel, b.data_selector as u64)?;
        write(base, 0)?;
        write(limit, 0xffff_ffff)?;
        write(ar, boot::DATA_ACCESS_RIGHTS as u64)?;
    }
    write(guest::TR_SELECTOR, b.tss_selector as u64)?;
    write(guest::TR_BASE, b.tss_base)?;
    write(guest::TR_LIMIT, boot::TSS_LIMIT as u64)?;
    write(guest::TR_ACCESS_RIGHTS, boot::TSS_ACCESS_RIGHTS as u64)?;
    write(guest::LDTR_SELECTOR, 0)?;
    write(guest::LDTR_BASE, 0)?;
    write(guest::LDTR_LIMIT, 0)?;
    write(guest::LDTR_ACCESS_RIGHTS, AR_UNUSABLE)?;
    write(guest::GDTR_BASE, b.gdt_base)?;
    write(guest::GDTR_LIMIT, b.gdt_limit as u64)?;
    write(guest::IDTR_BASE, 0)?;
    write(guest::IDTR_LIMIT, 0)?;

    write(guest::IA32_SYSENTER_CS, 0)?;
    write(guest::IA32_SYSENTER_ESP, 0)?;
    write(guest::IA32_SYSENTER_EIP, 0)?;
    write(guest::IA32_DEBUGCTL_FULL, 0)?;
    write(guest::INTERRUPTIBILITY_STATE, 0)?;
    write(guest::ACTIVITY_STATE, 0)?;
    write(guest::PENDING_DBG_EXCEPTIONS, 0)?;
    // No VMCS shadowing: the link pointer must be all ones (SDM 27.3.1.5).
    write(guest::LINK_PTR_FULL, u64::MAX)?;
    write(guest::VMX_PREEMPTION_TIMER_VALUE, SLICE)
}

//! One VMCS per vCPU: its region, and the host, guest and control fields
//! for a 64-bit guest (SDM Vol. 3C 25, 27.2-27.3 for the entry checks).

use crate::memory::Page;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use hvcore::loader::program::{self as boot, BootState};
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

/// VMWRITE in an exit handler: the field exists and the VMCS is current,
/// so a VMfail is a hypervisor bug and stops the run with its reason.
pub fn set(field: u32, value: u64) {
    if write(field, value).is_err() {
        panic!("VMWRITE of field {field:#x} failed (VM-instruction error {})", vm_instruction_error());
    }
}

/// VMREAD; a VMfail (no such field, no current VMCS) is a hypervisor bug
/// and stops the run with its reason.
pub fn read(field: u32) -> u64 {
    // SAFETY: as for `write`.
    match unsafe { vmx::vmread(field) } {
        Ok(v) => v,
        Err(_) => panic!("VMREAD of field {field:#x} failed"),
    }
}

fn vm_instruction_error() -> u64 {
    // SAFETY: as for `write`.
    unsafe { vmx::vmread(x86::vmx::vmcs::ro::VM_INSTRUCTION_ERROR) }.unwrap_or(0)
}

/// The VMX-preemption timer value of one time slice.
pub const SLICE: u64 = 20_000;

impl Vmcs {
    pub fn new(revision: u32) -> Vmcs {
        let vmcs = Vmcs { region: Page::with_revision(revision) };
        // A fresh region; VMCLEAR puts it in the clear state.
        vmcs.clear();
        vmcs
    }

    /// Makes this the current VMCS.
    pub fn load(&self) {
        // SAFETY: a VMCS region of ours with the right revision.
        unsafe { vmx::vmptrld(self.region.phys()) }.expect("VMPTRLD of our own VMCS failed");
    }

    /// VMCLEAR: the CPU writes any VMCS data it caches back to the region
    /// and, if it was current, there is no current VMCS any more (SDM Vol.
    /// 3C 25.11.3). Required before the region's memory is used for
    /// anything else.
    pub fn clear(&self) {
        // SAFETY: a VMCS region of ours, page aligned, not the VMXON region.
        if unsafe { vmx::vmclear(self.region.phys()) }.is_err() {
            panic!("VMCLEAR of our own VMCS at {:#x} failed", self.region.phys());
        }
    }
}

impl Drop for Vmcs {
    /// The region goes back to the heap only after VMCLEAR, so the CPU can
    /// never write a cached VMCS into memory that is someone else's.
    fn drop(&mut self) {
        self.clear();
    }
}

/// How a vCPU starts.
pub enum Start<'a> {
    /// The project's guest program: already in 64-bit mode, with the
    /// tables `hvcore::loader::program` built.
    Long64(&'a BootState),
    /// A multiboot kernel: 32-bit protected mode with paging off, flat
    /// segments, EAX = the loader's magic, EBX = the info structure
    /// (Multiboot 0.6.96, 3.2 "Machine state"); or Linux's 32-bit entry,
    /// the same with ESI = the zero page and a GDT that has the segments
    /// the selectors name (boot.rst "32-bit boot protocol"). `gdt`: GDTR's
    /// base and limit ((0, 0) for multiboot, which gives the guest none).
    /// Needs unrestricted guest.
    Protected32 { eip: u32, gdt: (u64, u16) },
}

pub struct Setup<'a> {
    pub caps: &'a VmxCaps,
    pub start: Start<'a>,
    pub eptp: u64,
    pub vpid: Option<u16>,
    pub msr_bitmap: u64,
    /// The vCPU's virtual-APIC page (TPR shadow).
    pub vapic: u64,
    /// CR4 bits the guest may set ([`hvcore::control_regs::cr4_allowed`]
    /// of the CPU it is shown, within what VMX allows).
    pub cr4_allowed: u64,
}

/// Exceptions that always exit, whatever the guest's IDT says: #DB (1)
/// and #AC (17). A guest can make the delivery of either raise the same
/// exception again, and the CPU would then loop inside one delivery
/// without an instruction boundary for the preemption timer (XSA-156,
/// CVE-2015-8104 and CVE-2015-5307); as exits they are reflected one at a
/// time (`exits::exception`).
pub const EXCEPTION_BITMAP: u64 = (1 << 1) | (1 << 17);

/// The secondary controls this CPU allows and the guest can use:
/// RDTSCP/RDPID, INVPCID (their CPUID bits are shown only with these on)
/// and WBINVD exiting (a guest's WBINVD would flush the caches the other
/// VMs use; it is a no-op for a VM's coherent memory).
pub fn optional_secondary(caps: &VmxCaps) -> SecondaryControls {
    let may = SecondaryControls::from_bits_truncate((caps.procbased2 >> 32) as u32);
    may & (SecondaryControls::ENABLE_RDTSCP | SecondaryControls::ENABLE_INVPCID | SecondaryControls::WBINVD_EXITING)
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

    // NMIs exit: the host's NMI never reaches a guest's IDT. Virtual NMIs:
    // the CPU tracks the guest's NMI blocking (until its IRET) for the
    // NMIs we inject, and NMI-window exiting becomes available (SDM Vol.
    // 3C 25.6.1, 26.7.5).
    let pin = PinbasedControls::EXTERNAL_INTERRUPT_EXITING
        | PinbasedControls::NMI_EXITING
        | PinbasedControls::VIRTUAL_NMIS
        | PinbasedControls::VMX_PREEMPTION_TIMER;
    set(control::PINBASED_EXEC_CONTROLS, "pin-based", c.pinbased, pin.bits())?;

    // MONITOR/MWAIT exit (a guest's MWAIT could put the CPU into a deep
    // C-state with no wake-up for us); RDPMC exits (the host's counters
    // are not the guest's to read); the TPR shadow keeps CR8 in the VM.
    let primary = PrimaryControls::HLT_EXITING
        | PrimaryControls::UNCOND_IO_EXITING
        | PrimaryControls::USE_MSR_BITMAPS
        | PrimaryControls::SECONDARY_CONTROLS
        | PrimaryControls::USE_TPR_SHADOW
        | PrimaryControls::USE_TSC_OFFSETTING
        | PrimaryControls::MWAIT_EXITING
        | PrimaryControls::MONITOR_EXITING
        | PrimaryControls::RDPMC_EXITING;
    set(control::PRIMARY_PROCBASED_EXEC_CONTROLS, "primary processor-based", c.procbased, primary.bits())?;

    let mut secondary = SecondaryControls::ENABLE_EPT | optional_secondary(c);
    if matches!(s.start, Start::Protected32 { .. }) {
        // Paging off in VMX non-root operation (SDM Vol. 3C 26.6.2).
        secondary |= SecondaryControls::UNRESTRICTED_GUEST;
    }
    if s.vpid.is_some() {
        secondary |= SecondaryControls::ENABLE_VPID;
    }
    set(control::SECONDARY_PROCBASED_EXEC_CONTROLS, "secondary", c.procbased2, secondary.bits())?;

    // Keep the preemption timer's remaining count across exits when the
    // CPU can (the slice is bounded in host time either way). DR7,
    // DEBUGCTL and PAT are the guest's own: saved on exit, loaded on entry.
    let mut exit = ExitControls::HOST_ADDRESS_SPACE_SIZE
        | ExitControls::ACK_INTERRUPT_ON_EXIT
        | ExitControls::SAVE_DEBUG_CONTROLS
        | ExitControls::SAVE_IA32_PAT
        | ExitControls::LOAD_IA32_PAT
        | ExitControls::SAVE_IA32_EFER
        | ExitControls::LOAD_IA32_EFER;
    if (c.exit >> 32) as u32 & ExitControls::SAVE_VMX_PREEMPTION_TIMER.bits() != 0 {
        exit |= ExitControls::SAVE_VMX_PREEMPTION_TIMER;
    }
    set(control::VMEXIT_CONTROLS, "VM-exit", c.exit, exit.bits())?;
    let mut entry = EntryControls::LOAD_DEBUG_CONTROLS
        | EntryControls::LOAD_IA32_PAT
        | EntryControls::LOAD_IA32_EFER;
    if matches!(s.start, Start::Long64(_)) {
        entry |= EntryControls::IA32E_MODE_GUEST;
    }
    set(control::VMENTRY_CONTROLS, "VM-entry", c.entry, entry.bits())?;

    let mut fields = [
        (control::EXCEPTION_BITMAP, EXCEPTION_BITMAP),
        (control::MSR_BITMAPS_ADDR_FULL, s.msr_bitmap),
        (control::EPTP_FULL, s.eptp),
        (control::VIRT_APIC_ADDR_FULL, s.vapic),
        (control::TPR_THRESHOLD, 0),
        (control::TSC_OFFSET_FULL, 0),
        // CR0/CR4 bits VMX fixes are owned by the host: the guest reads its
        // own values from the shadows and a write that changes them exits.
        // So is every CR4 bit the guest may not set, so that such a write
        // exits and gets its #GP (`exits::cr_access`).
        (control::CR0_GUEST_HOST_MASK, c.cr0_fixed.0 | !c.cr0_fixed.1),
        (control::CR4_GUEST_HOST_MASK, cr4_mask(c, s.cr4_allowed)),
        (control::CR0_READ_SHADOW, s.initial().cr0),
        (control::CR4_READ_SHADOW, s.initial().cr4),
        (control::CR3_TARGET_COUNT, 0),
    ]
    .to_vec();
    if let Some(vpid) = s.vpid {
        fields.push((control::VPID, vpid as u64));
    }
    fields.into_iter().try_for_each(|(f, v)| write(f, v).map_err(field))
}

/// The CR4 bits the host owns: those VMX fixes and those the guest may
/// not set.
pub fn cr4_mask(c: &VmxCaps, allowed: u64) -> u64 {
    c.cr4_fixed.0 | !c.cr4_fixed.1 | !allowed
}

/// IA32_PAT after reset (SDM Vol. 3A 13.12.4): WB, WT, UC-, UC, twice.
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;

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
    write(host::IA32_EFER_FULL, Efer::read_raw())?;
    // SAFETY: IA32_PAT exists on every CPU with VMX's PAT controls.
    write(host::IA32_PAT_FULL, unsafe { x86::msr::rdmsr(x86::msr::IA32_PAT) })
}

/// The "unusable" bit of a segment's access rights (SDM Vol. 3C 25.4.1),
/// for LDTR; the others come from the boot protocol (`hvcore::loader::program`).
const AR_UNUSABLE: u64 = 1 << 16;

/// The first guest state of a vCPU, whatever its kind.
pub struct Initial {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub rip: u64,
    pub rsp: u64,
    /// CS, the data segments and TR: (selector, limit, access rights);
    /// every base is 0.
    pub code: (u16, u32, u32),
    pub data: (u16, u32, u32),
    pub tr: (u16, u64, u32, u32),
    pub gdt: (u64, u16),
}

/// CR0 of a multiboot entry: PE and ET (bit 4 reads 1 on every CPU since
/// the 486), paging off.
const CR0_PE_ET: u64 = 0x11;
/// Flat 4 GiB 32-bit segments: code execute/read accessed (type 11), data
/// read/write accessed (type 3), present, DPL 0, D/B and G set; a busy
/// 32-bit TSS (type 11) for TR, which VM entry requires to be usable
/// (SDM Vol. 3C 27.3.1.2) even though no task switch will use it.
const CODE32_AR: u32 = 0xC09B;
const DATA32_AR: u32 = 0xC093;
const TSS32_BUSY_AR: u32 = 0x008B;

impl Setup<'_> {
    pub fn initial(&self) -> Initial {
        match self.start {
            Start::Long64(b) => Initial {
                cr0: b.cr0,
                cr3: b.cr3,
                cr4: b.cr4,
                efer: b.efer,
                rip: b.rip,
                rsp: b.rsp,
                code: (b.code_selector, 0xffff_ffff, boot::CODE_ACCESS_RIGHTS),
                data: (b.data_selector, 0xffff_ffff, boot::DATA_ACCESS_RIGHTS),
                tr: (b.tss_selector, b.tss_base, boot::TSS_LIMIT, boot::TSS_ACCESS_RIGHTS),
                gdt: (b.gdt_base, b.gdt_limit),
            },
            Start::Protected32 { eip, gdt } => Initial {
                cr0: CR0_PE_ET,
                cr3: 0,
                cr4: 0,
                efer: 0,
                rip: eip as u64,
                rsp: 0,
                code: (0x10, 0xffff_ffff, CODE32_AR),
                data: (0x18, 0xffff_ffff, DATA32_AR),
                tr: (0, 0, 0xffff, TSS32_BUSY_AR),
                gdt,
            },
        }
    }
}

fn guest_state(s: &Setup<'_>) -> Result<(), FieldError> {
    let b = s.initial();
    let cr0 = match s.start {
        Start::Long64(_) => s.caps.fix_cr0(b.cr0),
        Start::Protected32 { .. } => s.caps.fix_cr0_unrestricted(b.cr0),
    };
    write(guest::CR0, cr0)?;
    write(guest::CR3, b.cr3)?;
    write(guest::CR4, s.caps.fix_cr4(b.cr4))?;
    write(guest::DR7, 0x400)?;
    write(guest::RSP, b.rsp)?;
    write(guest::RIP, b.rip)?;
    write(guest::RFLAGS, boot::INITIAL_RFLAGS)?;
    write(guest::IA32_EFER_FULL, b.efer)?;

    write(guest::CS_SELECTOR, b.code.0 as u64)?;
    write(guest::CS_BASE, 0)?;
    write(guest::CS_LIMIT, b.code.1 as u64)?;
    write(guest::CS_ACCESS_RIGHTS, b.code.2 as u64)?;
    for (sel, base, limit, ar) in [
        (guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS),
        (guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS),
        (guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS),
        (guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS),
        (guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS),
    ] {
        write(sel, b.data.0 as u64)?;
        write(base, 0)?;
        write(limit, b.data.1 as u64)?;
        write(ar, b.data.2 as u64)?;
    }
    write(guest::TR_SELECTOR, b.tr.0 as u64)?;
    write(guest::TR_BASE, b.tr.1)?;
    write(guest::TR_LIMIT, b.tr.2 as u64)?;
    write(guest::TR_ACCESS_RIGHTS, b.tr.3 as u64)?;
    write(guest::LDTR_SELECTOR, 0)?;
    write(guest::LDTR_BASE, 0)?;
    write(guest::LDTR_LIMIT, 0)?;
    write(guest::LDTR_ACCESS_RIGHTS, AR_UNUSABLE)?;
    write(guest::GDTR_BASE, b.gdt.0)?;
    write(guest::GDTR_LIMIT, b.gdt.1 as u64)?;
    write(guest::IDTR_BASE, 0)?;
    write(guest::IDTR_LIMIT, 0)?;

    write(guest::IA32_SYSENTER_CS, 0)?;
    write(guest::IA32_SYSENTER_ESP, 0)?;
    write(guest::IA32_SYSENTER_EIP, 0)?;
    write(guest::IA32_DEBUGCTL_FULL, 0)?;
    write(guest::IA32_PAT_FULL, PAT_RESET)?;
    write(guest::INTERRUPTIBILITY_STATE, 0)?;
    write(guest::ACTIVITY_STATE, 0)?;
    write(guest::PENDING_DBG_EXCEPTIONS, 0)?;
    // No VMCS shadowing: the link pointer must be all ones (SDM 27.3.1.5).
    write(guest::LINK_PTR_FULL, u64::MAX)?;
    write(guest::VMX_PREEMPTION_TIMER_VALUE, SLICE)
}

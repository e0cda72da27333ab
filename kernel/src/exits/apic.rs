//! The virtual local APIC's two doors: the xAPIC page at 0xFEE00000 (not
//! guest memory, so every access is an EPT violation; the instruction is
//! decoded to emulate it) and the x2APIC MSRs (RDMSR/WRMSR exits). The
//! model itself is `hvcore::devices::lapic`; the host's APIC is never
//! touched.

use super::{advance_rip, inject, Next};
use crate::hypervisor::Host;
use crate::vm::{Cause, Vm};
use crate::vmx::vmcs::read;
use hvcore::devices::lapic::{Fault, MSR_APIC_BASE, MSR_TSC_DEADLINE, X2APIC_MSR_FIRST, X2APIC_MSR_LAST};
use hvcore::emulate::mmio::{self, MmioOp};
use hvcore::emulate::paging::{self, Access, WalkError};
use hvcore::vmx::event::Event;
use hvcore::vmx::EptQual;
use x86::vmx::vmcs::guest;

/// Whether `gpa` is on the xAPIC page of a VM with the virtual APIC: at
/// the base IA32_APIC_BASE names (0xFEE00000 after reset; a guest may move
/// it, and it works wherever that is not its RAM, which EPT maps first).
/// In x2APIC or disabled mode the model answers such accesses itself.
pub fn claims(vm: &Vm, gpa: u64) -> bool {
    const BASE_FIELD: u64 = 0x000f_ffff_ffff_f000;
    vm.platform.lapic.as_ref().is_some_and(|l| gpa & !0xfff == l.apic_base() & BASE_FIELD)
}

const PF: u8 = 14;

/// An access to the xAPIC page: decode the instruction at RIP, do its
/// read or write on the model, move RIP past it.
pub fn mmio(vm: &mut Vm, host: &Host, gpa: u64, q: EptQual) -> Next {
    let state = super::cr_access::cr_state();
    let cs_ar = read(guest::CS_ACCESS_RIGHTS);
    let bitness = if hvcore::control_regs::in_64bit_mode(&state) {
        64
    } else if cs_ar & (1 << 14) != 0 {
        32
    } else {
        16
    };
    let mut rip = read(guest::CS_BASE).wrapping_add(read(guest::RIP));
    if bitness != 64 {
        rip &= 0xffff_ffff;
    }
    let cpl0 = (cs_ar >> 5) & 3 == 0;
    let access = Access { write: false, user: !cpl0, fetch: true };
    let insn = match fetch_and_decode(vm, host, &state, rip, access, bitness) {
        Ok(insn) => insn,
        Err(Fetch::Fault(e)) => return fault(vm, e),
        Err(Fetch::Decode(e)) => {
            vm.stop(Cause::Unhandled(alloc::format!("local APIC access at {gpa:#x} by an instruction not emulated: {e}")));
            return Next::Ended;
        }
    };
    let offset = (gpa & 0xfff) as u32;
    let now = crate::vcpu::guest_tsc(vm);
    let mut regs = crate::vcpu::RegFile(&mut vm.vcpu.regs);
    let lapic = vm.platform.lapic.as_mut().expect("claims() checked it");
    match insn.op {
        MmioOp::Read { .. } => {
            // Registers are 32 bits wide on 16-byte boundaries; a narrower
            // read takes its bytes of the aligned dword (SDM Vol. 3A 11.4.1;
            // `complete_read` keeps the low `size` of them).
            let dword = lapic.mmio_read(offset & !3, now) as u64;
            mmio::complete_read(&mut regs, &insn, dword >> ((offset & 3) * 8));
        }
        MmioOp::Write { .. } => {
            let value = mmio::write_value(&regs, &insn) as u32;
            if !q.write {
                // The exit says read but the instruction writes: the guest
                // changed the code under us; retry it.
                return Next::Resume;
            }
            lapic.mmio_write(offset & !3, value, now);
            crate::vcpu::sync_tpr_to_shadow(vm);
        }
    }
    advance_rip(vm, insn.len as u64)
}

enum Fetch {
    Fault(WalkError),
    Decode(mmio::DecodeError),
}

/// The instruction at `rip`: first the bytes up to the end of its page,
/// and only if the instruction runs on, the next page too (a fetch there
/// could fault where the instruction itself does not reach).
fn fetch_and_decode(
    vm: &Vm,
    host: &Host,
    s: &hvcore::control_regs::CrState,
    rip: u64,
    access: Access,
    bitness: u32,
) -> Result<mmio::MmioInsn, Fetch> {
    let (id, pm) = (vm.id, &host.pm);
    let mut bytes = [0u8; 15];
    let in_page = ((0x1000 - (rip & 0xfff)) as usize).min(bytes.len());
    let read = |buf: &mut [u8]| {
        let mut phys = |gpa: u64| {
            let mut b = [0u8; 8];
            pm.read_gpa(id, gpa, &mut b).ok().map(|()| u64::from_le_bytes(b))
        };
        paging::read_linear(s.cr0, s.cr4, s.efer, s.cr3, rip, access, buf, &mut phys, &mut |gpa, dst| {
            pm.read_gpa(id, gpa, dst).ok()
        })
    };
    read(&mut bytes[..in_page]).map_err(Fetch::Fault)?;
    match mmio::decode(&bytes[..in_page], bitness) {
        Err(mmio::DecodeError::Truncated) if in_page < bytes.len() => {
            read(&mut bytes).map_err(Fetch::Fault)?;
            mmio::decode(&bytes, bitness).map_err(Fetch::Decode)
        }
        r => r.map_err(Fetch::Decode),
    }
}

/// A fetch that faulted: the guest takes the #PF (or #GP) it would have
/// taken; a page table outside its memory stops it.
fn fault(vm: &mut Vm, e: WalkError) -> Next {
    match e {
        WalkError::PageFault { error_code, address } => {
            crate::vcpu::set_cr2(vm, address);
            inject(Event::exception(PF, true), error_code)
        }
        WalkError::NonCanonical { .. } => inject(Event::exception(super::GP, true), 0),
        WalkError::NotMemory { gpa } => {
            vm.stop(Cause::WildAccess(gpa));
            Next::Ended
        }
    }
}

/// RDMSR of an APIC MSR (APIC_BASE, x2APIC 0x800-0x8FF, TSC_DEADLINE).
/// `None`: not an APIC MSR (or no APIC): the caller goes on.
pub fn rdmsr(vm: &mut Vm, msr: u32) -> Option<Result<u64, Fault>> {
    let now = crate::vcpu::guest_tsc(vm);
    let lapic = vm.platform.lapic.as_mut()?;
    Some(match msr {
        MSR_APIC_BASE => Ok(lapic.apic_base()),
        MSR_TSC_DEADLINE => Ok(lapic.tsc_deadline(now)),
        X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => lapic.msr_read(msr, now),
        _ => return None,
    })
}

/// WRMSR of an APIC MSR; `None` as for [`rdmsr`], `Some(Err)` means #GP.
pub fn wrmsr(vm: &mut Vm, msr: u32, value: u64) -> Option<Result<(), Fault>> {
    let now = crate::vcpu::guest_tsc(vm);
    let lapic = vm.platform.lapic.as_mut()?;
    let r = match msr {
        MSR_APIC_BASE => lapic.set_apic_base(value, maxphyaddr()),
        MSR_TSC_DEADLINE => {
            lapic.set_tsc_deadline(value, now);
            Ok(())
        }
        X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => lapic.msr_write(msr, value, now),
        _ => return None,
    };
    crate::vcpu::sync_tpr_to_shadow(vm);
    Some(r)
}

/// The physical-address width CPUID 0x8000_0008 shows the guest (the
/// host's): APIC_BASE bits above it are reserved.
fn maxphyaddr() -> u8 {
    crate::vcpu::host_cpuid(0x8000_0008, 0).eax as u8
}

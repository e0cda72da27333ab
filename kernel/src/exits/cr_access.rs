//! MOV to CR0/CR4 that touches a bit the host owns (the guest/host masks:
//! the bits VMX fixes, and every CR4 bit the guest may not set). The
//! write is checked as the CPU would check it (`hvcore::control_regs`):
//! a bad one gets #GP(0) and changes nothing; a good one goes to the read
//! shadow as written and to the real register with the fixed bits
//! applied (SDM Vol. 3C 26.3, Table 28-3).

use super::{inject_gp, skip_instruction, Next};
use crate::hypervisor::Host;
use crate::vm::{Cause, Vm};
use crate::vmx::vmcs::{read, set};
use hvcore::control_regs::{check_cr0_write, check_cr4_write, cr0_paging_change, cr0_value, mov_cr_operand, CrState, CR0_PE, CR0_PG};
use x86::vmx::vmcs::{control, guest, ro};

pub fn handle(vm: &mut Vm, host: &Host) -> Next {
    let q = read(ro::EXIT_QUALIFICATION);
    let (cr, access, gpr) = (q & 0xf, (q >> 4) & 3, ((q >> 8) & 0xf) as usize);
    if access != 0 {
        vm.stop(Cause::Unhandled(alloc::format!("control-register access type {access} to CR{cr} is not emulated")));
        return Next::Ended;
    }
    let state = cr_state();
    let value = mov_cr_operand(&state, gpr_value(vm, gpr));
    let caps = &host.caps;
    match cr {
        0 => {
            if check_cr0_write(&state, value).is_err() {
                return inject_gp();
            }
            // Bits CR0 does not have are ignored, ET reads 1.
            let value = cr0_value(value);
            let unrestricted = read(control::SECONDARY_PROCBASED_EXEC_CONTROLS) & UNRESTRICTED_GUEST != 0;
            // Without "unrestricted guest" the real CR0 keeps PE and PG.
            if !unrestricted && value & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG {
                vm.stop(Cause::Unhandled("the guest turned off paging or protection (needs unrestricted guest)".into()));
                return Next::Ended;
            }
            let change = cr0_paging_change(&state, value);
            if change.load_pdptes && !load_pdptes(vm, host, state.cr3) {
                return Next::Ended;
            }
            if change.efer != state.efer {
                set(guest::IA32_EFER_FULL, change.efer);
            }
            let entry = read(control::VMENTRY_CONTROLS);
            let ia32e = x86::vmx::vmcs::control::EntryControls::IA32E_MODE_GUEST.bits() as u64;
            set(control::VMENTRY_CONTROLS, if change.ia32e { entry | ia32e } else { entry & !ia32e });
            set(guest::CR0, if unrestricted { caps.fix_cr0_unrestricted(value) } else { caps.fix_cr0(value) });
            set(control::CR0_READ_SHADOW, value);
        }
        4 => {
            if check_cr4_write(&state, value, host.cr4_allowed).is_err() {
                return inject_gp();
            }
            set(guest::CR4, caps.fix_cr4(value));
            set(control::CR4_READ_SHADOW, value);
        }
        _ => {
            vm.stop(Cause::Unhandled(alloc::format!("MOV to CR{cr} is not emulated")));
            return Next::Ended;
        }
    }
    skip_instruction(vm)
}

/// Secondary processor-based control bit 7 (SDM Vol. 3C 25.6.2).
const UNRESTRICTED_GUEST: u64 = 1 << 7;

/// PAE paging outside IA-32e mode: the CPU would load the four PDPTEs
/// from the 32-byte table at CR3 on this MOV to CR0; with EPT, VM entry
/// takes them from the VMCS (SDM Vol. 3C 27.3.2.4), so they go there.
/// A table outside the VM's memory stops it.
fn load_pdptes(vm: &mut Vm, host: &Host, cr3: u64) -> bool {
    let table = cr3 & 0xffff_ffe0;
    let mut bytes = [0u8; 32];
    if host.pm.read_gpa(vm.id, table, &mut bytes).is_err() {
        vm.stop(Cause::WildAccess(table));
        return false;
    }
    for (i, field) in [guest::PDPTE0_FULL, guest::PDPTE1_FULL, guest::PDPTE2_FULL, guest::PDPTE3_FULL].into_iter().enumerate() {
        set(field, u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()));
    }
    true
}

/// A control register as the guest sees it: its own bits from the real
/// register, the host's from the read shadow (SDM 25.6.6).
fn guest_view(real: u32, shadow: u32, mask: u32) -> u64 {
    let mask = read(mask);
    (read(real) & !mask) | (read(shadow) & mask)
}

pub fn guest_cr4() -> u64 {
    guest_view(guest::CR4, control::CR4_READ_SHADOW, control::CR4_GUEST_HOST_MASK)
}

/// What the CR and EFER checks need of the guest, as it sees itself.
pub fn cr_state() -> CrState {
    const CS_L: u64 = 1 << 13; // access rights: 64-bit code segment
    CrState {
        cr0: guest_view(guest::CR0, control::CR0_READ_SHADOW, control::CR0_GUEST_HOST_MASK),
        cr3: read(guest::CR3),
        cr4: guest_cr4(),
        efer: read(guest::IA32_EFER_FULL),
        cs_long: read(guest::CS_ACCESS_RIGHTS) & CS_L != 0,
    }
}

/// General-purpose register `n` in the encoding of Table 28-3.
fn gpr_value(vm: &Vm, n: usize) -> u64 {
    let r = &vm.vcpu.regs;
    [
        r.rax, r.rcx, r.rdx, r.rbx, read(guest::RSP), r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
        r.r14, r.r15,
    ][n]
}

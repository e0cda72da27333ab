//! Which guest writes to CR0, CR4, IA32_EFER and XCR0 are legal: the
//! checks the processor makes (SDM Vol. 2B "MOV—Move to/from Control
//! Registers", Vol. 3A 2.2.1 and 2.5, Vol. 4 IA32_EFER, Vol. 2D XSETBV and
//! Vol. 1 13.3), made here because the writes exit to the hypervisor. A
//! write that fails raises #GP(0) in the guest; the kernel injects it.
//!
//! The state is what the guest sees (CR0/CR4 read shadows, its EFER), not
//! the real registers with the bits VMX fixes. What the guest may set in
//! CR4 follows from the CPUID it is shown ([`cr4_allowed`]), so a feature
//! that is hidden cannot be turned on either.

use crate::cpuid::{Regs, XCR0_AVX, XCR0_AVX512, XCR0_SSE, XCR0_X87};

pub const CR0_PE: u64 = 1; // bit 0
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
/// The CR0 bits that exist (PE MP EM TS ET NE WP AM NW CD PG); writes to the
/// other bits of 31:0 are ignored (SDM Vol. 3A 2.5), bits 63:32 must be 0.
pub const CR0_DEFINED: u64 = 0xE005_003F;
const _: () = assert!(
    CR0_DEFINED == CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_NW | CR0_CD | CR0_PG
);

pub const CR4_VME: u64 = 1; // bit 0
pub const CR4_PVI: u64 = 1 << 1;
pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_DE: u64 = 1 << 3;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_UMIP: u64 = 1 << 11;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_VMXE: u64 = 1 << 13;
pub const CR4_SMXE: u64 = 1 << 14;
pub const CR4_FSGSBASE: u64 = 1 << 16;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_KL: u64 = 1 << 19;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;
pub const CR4_PKE: u64 = 1 << 22;
pub const CR4_CET: u64 = 1 << 23;
pub const CR4_PKS: u64 = 1 << 24;
pub const CR4_UINTR: u64 = 1 << 25;

pub const EFER_SCE: u64 = 1; // bit 0
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
/// The EFER bits a guest may ever have: SCE, LME, LMA, NXE (SCE and NXE
/// only when shown).
pub const EFER_KNOWN: u64 = 0xD01;
const _: () = assert!(EFER_KNOWN == EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE);

/// The guest state the checks depend on (the values the guest sees: read
/// shadows, not the VMX-fixed real registers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// CS.L: 64-bit code (meaningful only with EFER.LMA).
    pub cs_long: bool,
}

/// The write raises #GP(0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gp;

fn has(value: u64, bit: u64) -> bool {
    value & bit != 0
}

fn gp_if(fault: bool) -> Result<(), Gp> {
    if fault {
        Err(Gp)
    } else {
        Ok(())
    }
}

/// The guest runs 64-bit code: IA-32e mode and CS.L.
pub fn in_64bit_mode(s: &CrState) -> bool {
    has(s.efer, EFER_LMA) && s.cs_long
}

/// The value a MOV to CR0/CR4 writes, from the full general register:
/// outside 64-bit mode the operand is its low 32 bits (SDM Vol. 2B MOV CR,
/// "Operation"). Pass this to the checks and to the load.
pub fn mov_cr_operand(s: &CrState, reg: u64) -> u64 {
    if in_64bit_mode(s) {
        reg
    } else {
        reg & 0xFFFF_FFFF
    }
}

/// The CR0 a legal write of `new` leaves: bits that do not exist are
/// dropped (writes to them are ignored) and ET reads 1 (hardwired since the
/// P6 family; SDM Vol. 3A 2.5).
pub fn cr0_value(new: u64) -> u64 {
    (new & CR0_DEFINED) | CR0_ET
}

/// CR4 bits a guest may set, from the CPUID the guest is shown (`cpuid` =
/// guest view, e.g. `|l, s| guest_cpuid(l, s, host, view)`). Never VMXE,
/// SMXE, LA57, KL, CET, PKS, UINTR or reserved bits (SDM Vol. 3A 2.5 names
/// the CPUID bit behind each).
pub fn cr4_allowed(cpuid: &dyn Fn(u32, u32) -> Regs) -> u64 {
    let l1 = cpuid(1, 0);
    let l7 = if cpuid(0, 0).eax >= 7 { cpuid(7, 0) } else { Regs::default() };
    let bit = |word: u32, n: u32| word & 1 << n != 0;
    let rules = [
        (bit(l1.edx, 1), CR4_VME), // VME covers PVI too
        (bit(l1.edx, 1), CR4_PVI),
        (bit(l1.edx, 4), CR4_TSD),
        (bit(l1.edx, 2), CR4_DE),
        (bit(l1.edx, 3), CR4_PSE),
        (bit(l1.edx, 6), CR4_PAE),
        (bit(l1.edx, 7), CR4_MCE),
        (bit(l1.edx, 13), CR4_PGE),
        (true, CR4_PCE),
        (bit(l1.edx, 24), CR4_OSFXSR),
        (bit(l1.edx, 25), CR4_OSXMMEXCPT),
        (bit(l7.ecx, 2), CR4_UMIP),
        (bit(l7.ebx, 0), CR4_FSGSBASE),
        (bit(l1.ecx, 17), CR4_PCIDE),
        (bit(l1.ecx, 26), CR4_OSXSAVE),
        (bit(l7.ebx, 7), CR4_SMEP),
        (bit(l7.ebx, 20), CR4_SMAP),
        (bit(l7.ecx, 3), CR4_PKE),
    ];
    // Distinct bits: the sum is their union.
    rules.iter().filter(|r| r.0).map(|r| r.1).sum()
}

/// MOV to CR0 with `new` (see [`mov_cr_operand`]). #GP(0) for: bits 63:32
/// set; PG without PE; NW without CD; setting PG with EFER.LME=1 and
/// CR4.PAE=0; clearing PG while CR4.PCIDE=1; clearing PG in 64-bit mode;
/// clearing WP while CR4.CET=1.
pub fn check_cr0_write(s: &CrState, new: u64) -> Result<(), Gp> {
    let pg = has(new, CR0_PG);
    gp_if(
        new >> 32 != 0
            || (pg && !has(new, CR0_PE))
            || (has(new, CR0_NW) && !has(new, CR0_CD))
            // Activating IA-32e mode needs PAE paging (Vol. 3A 9.8.5). With
            // PG already 1, LME=1 means LMA=1 and so PAE=1: only a real
            // activation can get here.
            || (pg && has(s.efer, EFER_LME) && !has(s.cr4, CR4_PAE))
            || (!pg && has(s.cr4, CR4_PCIDE))
            // Leaving IA-32e mode is only possible from compatibility mode.
            || (!pg && in_64bit_mode(s))
            || (!has(new, CR0_WP) && has(s.cr4, CR4_CET)),
    )
}

/// What a good MOV to CR0 does to the paging mode (SDM Vol. 3A 9.8.5,
/// 10.8.5 "Initializing IA-32e Mode"): setting PG with EFER.LME activates
/// IA-32e mode (the processor sets EFER.LMA), clearing it deactivates it;
/// setting PG with PAE outside IA-32e mode loads the four PDPTEs from CR3
/// (4.4.1), which under EPT the VMM must put into the VMCS itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagingChange {
    /// EFER after the write (only LMA can differ).
    pub efer: u64,
    /// The "IA-32e mode guest" VM-entry control must equal EFER.LMA.
    pub ia32e: bool,
    /// PAE paging starts: load the PDPTEs at CR3.
    pub load_pdptes: bool,
}

/// `new` has passed [`check_cr0_write`] against `s`.
pub fn cr0_paging_change(s: &CrState, new: u64) -> PagingChange {
    let (was, now) = (has(s.cr0, CR0_PG), has(new, CR0_PG));
    let mut efer = s.efer;
    if !was && now && has(efer, EFER_LME) {
        efer |= EFER_LMA;
    } else if was && !now {
        efer &= !EFER_LMA;
    }
    let lma = has(efer, EFER_LMA);
    PagingChange { efer, ia32e: lma, load_pdptes: !was && now && !lma && has(s.cr4, CR4_PAE) }
}

/// MOV to CR4 with `new` (see [`mov_cr_operand`]); `allowed` is
/// [`cr4_allowed`]. #GP(0) for: any bit outside `allowed`; clearing PAE
/// while EFER.LMA; PCIDE 0->1 while CR3[11:0] != 0 or outside IA-32e mode;
/// changing LA57 in IA-32e mode; CET set while CR0.WP=0.
pub fn check_cr4_write(s: &CrState, new: u64, allowed: u64) -> Result<(), Gp> {
    let lma = has(s.efer, EFER_LMA);
    let pcide_rising = has(new, CR4_PCIDE) && !has(s.cr4, CR4_PCIDE);
    gp_if(
        new & !allowed != 0
            || (!has(new, CR4_PAE) && lma)
            // Vol. 3A 4.10.1: PCIDE only in IA-32e mode, and only with PCID 0.
            || (pcide_rising && (s.cr3 & 0xFFF != 0 || !lma))
            || (has(s.cr4 ^ new, CR4_LA57) && lma)
            || (has(new, CR4_CET) && !has(s.cr0, CR0_WP)),
    )
}

/// WRMSR IA32_EFER with `new`: #GP(0) for bits outside SCE (if `syscall`
/// is shown: CPUID.8000_0001:EDX[11]), LME, LMA, NXE (if `nx` is shown:
/// EDX[20]), and for changing LME while CR0.PG=1. Returns the EFER to load:
/// LMA is read-only (the processor sets it on CR0.PG), so it is kept from
/// `s.efer` whatever `new` says.
pub fn check_efer_write(s: &CrState, new: u64, nx: bool, syscall: bool) -> Result<u64, Gp> {
    gp_if(
        new & !EFER_KNOWN != 0
            || (has(new, EFER_SCE) && !syscall)
            || (has(new, EFER_NXE) && !nx)
            || (has(new ^ s.efer, EFER_LME) && has(s.cr0, CR0_PG)),
    )?;
    Ok(if has(s.efer, EFER_LMA) { new | EFER_LMA } else { new & !EFER_LMA })
}

/// XSETBV with ECX = `index`, EDX:EAX = `value`; `allowed` is
/// [`crate::cpuid::xcr0_allowed`] (what the guest is shown in CPUID.(0xD,0)).
/// #GP(0) for: index != 0, bits outside `allowed`, x87 (bit 0) clear, AVX
/// without SSE, the AVX-512 bits (5-7) not all equal, AVX-512 without AVX.
/// CPL > 0 and CR4.OSXSAVE = 0 fault (#GP, #UD) before the VM exit.
pub fn check_xsetbv(index: u32, value: u64, allowed: u64) -> Result<(), Gp> {
    let avx512 = value & XCR0_AVX512;
    gp_if(
        index != 0
            || value & !allowed != 0
            || !has(value, XCR0_X87)
            || (has(value, XCR0_AVX) && !has(value, XCR0_SSE))
            || (avx512 != 0 && avx512 != XCR0_AVX512)
            || (avx512 != 0 && !has(value, XCR0_AVX)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid::{guest_cpuid, xcr0_allowed, GuestView};
    use proptest::prelude::*;

    /// A 64-bit guest as loader::program leaves it: CR0 = PE|MP|ET|NE|WP|PG,
    /// CR4 = PAE, EFER = LME|LMA, CS.L.
    const LONG: CrState = CrState { cr0: 0x8001_0033, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LME | EFER_LMA, cs_long: true };
    /// The same in compatibility mode.
    const COMPAT: CrState = CrState { cs_long: false, ..LONG };
    /// Protected mode, paging off.
    const PROT: CrState = CrState { cr0: CR0_PE | CR0_ET | CR0_NE, cr3: 0, cr4: 0, efer: 0, cs_long: false };
    /// 32-bit paging.
    const PAGED32: CrState = CrState { cr0: CR0_PE | CR0_ET | CR0_PG, ..PROT };
    /// What a guest with the usual features may set.
    const CR4_OK: u64 = CR4_VME | CR4_PVI | CR4_TSD | CR4_DE | CR4_PSE | CR4_PAE | CR4_PGE | CR4_PCE | CR4_OSFXSR
        | CR4_OSXMMEXCPT | CR4_UMIP | CR4_FSGSBASE | CR4_PCIDE | CR4_OSXSAVE | CR4_SMEP | CR4_SMAP | CR4_PKE;

    /// The names are the architectural bits (SDM Vol. 3A 2.5, figure 2-7;
    /// Vol. 4 IA32_EFER).
    #[test]
    fn constants_are_the_architectural_bits() {
        let cr0 = [CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_NW, CR0_CD, CR0_PG];
        assert_eq!(cr0.map(u64::trailing_zeros), [0, 1, 2, 3, 4, 5, 16, 18, 29, 30, 31]);
        let cr4 = [
            CR4_VME, CR4_PVI, CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE, CR4_MCE, CR4_PGE, CR4_PCE, CR4_OSFXSR, CR4_OSXMMEXCPT,
            CR4_UMIP, CR4_LA57, CR4_VMXE, CR4_SMXE, CR4_FSGSBASE, CR4_PCIDE, CR4_OSXSAVE, CR4_KL, CR4_SMEP, CR4_SMAP,
            CR4_PKE, CR4_CET, CR4_PKS, CR4_UINTR,
        ];
        let cr4_bits: Vec<u32> = (0..=14).chain(16..=25).collect();
        assert_eq!(cr4.map(u64::trailing_zeros).to_vec(), cr4_bits);
        assert!(cr0.iter().chain(&cr4).all(|b| b.is_power_of_two()));
        let efer = [EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE];
        assert_eq!(efer, [1, 1 << 8, 1 << 10, 1 << 11]);
    }

    #[test]
    fn cr0_legal_writes_pass() {
        for s in [LONG, COMPAT] {
            assert_eq!(check_cr0_write(&s, s.cr0), Ok(()));
            for bit in [CR0_MP, CR0_EM, CR0_TS, CR0_NE, CR0_AM, CR0_CD, CR0_CD | CR0_NW] {
                assert_eq!(check_cr0_write(&s, s.cr0 ^ bit), Ok(()), "{bit:#x}");
            }
        }
        // Leaving IA-32e mode from compatibility mode.
        assert_eq!(check_cr0_write(&COMPAT, COMPAT.cr0 & !CR0_PG), Ok(()));
        // Real mode <-> protected mode, 32-bit paging on and off.
        assert_eq!(check_cr0_write(&PROT, CR0_ET), Ok(()));
        assert_eq!(check_cr0_write(&PROT, PROT.cr0 | CR0_PG), Ok(()));
        assert_eq!(check_cr0_write(&PAGED32, PROT.cr0), Ok(()));
        // Activating IA-32e mode with PAE on.
        let pre_long = CrState { cr4: CR4_PAE, efer: EFER_LME, ..PROT };
        assert_eq!(check_cr0_write(&pre_long, LONG.cr0), Ok(()));
        // Reserved bits of 31:0 are ignored, not faulted.
        assert_eq!(check_cr0_write(&LONG, LONG.cr0 | 1 << 6 | 1 << 17 | 1 << 28), Ok(()));
    }

    #[test]
    fn cr0_upper_half_faults() {
        for bit in [32, 33, 47, 63] {
            assert_eq!(check_cr0_write(&LONG, LONG.cr0 | 1 << bit), Err(Gp), "bit {bit}");
            assert_eq!(check_cr0_write(&PROT, PROT.cr0 | 1 << bit), Err(Gp), "bit {bit}");
        }
    }

    #[test]
    fn cr0_pg_needs_pe() {
        assert_eq!(check_cr0_write(&PROT, CR0_ET | CR0_PG), Err(Gp));
        assert_eq!(check_cr0_write(&PAGED32, PAGED32.cr0 & !CR0_PE), Err(Gp));
        assert_eq!(check_cr0_write(&COMPAT, COMPAT.cr0 & !CR0_PE), Err(Gp));
        assert_eq!(check_cr0_write(&PROT, CR0_ET | CR0_PE | CR0_PG), Ok(()));
    }

    #[test]
    fn cr0_nw_needs_cd() {
        assert_eq!(check_cr0_write(&LONG, LONG.cr0 | CR0_NW), Err(Gp));
        assert_eq!(check_cr0_write(&PROT, CR0_NW), Err(Gp));
        assert_eq!(check_cr0_write(&PROT, CR0_NW | CR0_CD), Ok(()));
        assert_eq!(check_cr0_write(&PROT, CR0_CD), Ok(()));
    }

    #[test]
    fn cr0_long_mode_activation_needs_pae() {
        let s = CrState { efer: EFER_LME, ..PROT };
        assert_eq!(check_cr0_write(&s, s.cr0 | CR0_PG), Err(Gp));
        assert_eq!(check_cr0_write(&s, s.cr0), Ok(())); // PG stays 0: fine
        assert_eq!(check_cr0_write(&CrState { cr4: CR4_PAE, ..s }, s.cr0 | CR0_PG), Ok(()));
        assert_eq!(check_cr0_write(&PROT, PROT.cr0 | CR0_PG), Ok(())); // no LME: 32-bit paging
    }

    #[test]
    fn cr0_pg_stays_while_pcide() {
        let s = CrState { cr4: CR4_PAE | CR4_PCIDE, ..COMPAT };
        assert_eq!(check_cr0_write(&s, s.cr0 & !CR0_PG), Err(Gp));
        assert_eq!(check_cr0_write(&s, s.cr0 & !CR0_PG & !CR0_PE), Err(Gp));
        assert_eq!(check_cr0_write(&s, s.cr0), Ok(()));
        assert_eq!(check_cr0_write(&s, s.cr0 ^ CR0_TS), Ok(()));
    }

    #[test]
    fn cr0_pg_stays_in_64bit_mode() {
        assert_eq!(check_cr0_write(&LONG, LONG.cr0 & !CR0_PG), Err(Gp));
        assert_eq!(check_cr0_write(&LONG, CR0_PE | CR0_ET), Err(Gp));
        assert_eq!(check_cr0_write(&COMPAT, COMPAT.cr0 & !CR0_PG), Ok(()));
        // CS.L means nothing outside IA-32e mode.
        let legacy = CrState { cs_long: true, ..PAGED32 };
        assert_eq!(check_cr0_write(&legacy, PROT.cr0), Ok(()));
    }

    #[test]
    fn cr0_wp_stays_while_cet() {
        let s = CrState { cr4: CR4_PAE | CR4_CET, ..LONG };
        assert_eq!(check_cr0_write(&s, s.cr0 & !CR0_WP), Err(Gp));
        assert_eq!(check_cr0_write(&s, s.cr0), Ok(()));
        assert_eq!(check_cr0_write(&LONG, LONG.cr0 & !CR0_WP), Ok(()));
    }

    #[test]
    fn cr4_legal_writes_pass() {
        for bit in [CR4_PGE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, CR4_SMEP, CR4_SMAP, CR4_PKE, CR4_FSGSBASE, CR4_TSD] {
            assert_eq!(check_cr4_write(&LONG, LONG.cr4 | bit, CR4_OK), Ok(()), "{bit:#x}");
        }
        assert_eq!(check_cr4_write(&LONG, CR4_OK, CR4_OK), Ok(()));
        assert_eq!(check_cr4_write(&PROT, CR4_OK & !CR4_PCIDE, CR4_OK), Ok(()));
        assert_eq!(check_cr4_write(&PROT, 0, CR4_OK), Ok(()));
        assert_eq!(check_cr4_write(&PAGED32, CR4_PSE, CR4_OK), Ok(())); // PAE may change without LMA
    }

    #[test]
    fn cr4_bits_outside_allowed_fault() {
        for bit in [CR4_VMXE, CR4_SMXE, CR4_LA57, CR4_KL, CR4_CET, CR4_PKS, CR4_UINTR, CR4_MCE, 1 << 15, 1 << 26, 1 << 32, 1 << 63] {
            assert_eq!(check_cr4_write(&LONG, LONG.cr4 | bit, CR4_OK), Err(Gp), "{bit:#x}");
        }
        assert_eq!(check_cr4_write(&LONG, LONG.cr4 | CR4_SMEP, CR4_PAE), Err(Gp));
        assert_eq!(check_cr4_write(&LONG, LONG.cr4 | CR4_SMEP, CR4_PAE | CR4_SMEP), Ok(()));
    }

    #[test]
    fn cr4_pae_stays_in_ia32e_mode() {
        assert_eq!(check_cr4_write(&LONG, 0, CR4_OK), Err(Gp));
        assert_eq!(check_cr4_write(&COMPAT, CR4_PGE, CR4_OK), Err(Gp));
        assert_eq!(check_cr4_write(&CrState { cr4: CR4_PAE, ..PROT }, 0, CR4_OK), Ok(()));
    }

    #[test]
    fn cr4_pcide_needs_ia32e_mode_and_pcid_0() {
        let on = CR4_PAE | CR4_PCIDE;
        assert_eq!(check_cr4_write(&LONG, on, CR4_OK), Ok(()));
        assert_eq!(check_cr4_write(&CrState { cr3: 0x1001, ..LONG }, on, CR4_OK), Err(Gp));
        assert_eq!(check_cr4_write(&CrState { cr3: 0x1800, ..LONG }, on, CR4_OK), Err(Gp));
        assert_eq!(check_cr4_write(&CrState { cr3: 0xf000, ..LONG }, on, CR4_OK), Ok(()));
        assert_eq!(check_cr4_write(&CrState { cr4: CR4_PAE, ..PAGED32 }, on, CR4_OK), Err(Gp));
        assert_eq!(check_cr4_write(&CrState { cr4: CR4_PAE, ..PROT }, on, CR4_OK), Err(Gp));
        // Already on: CR3[11:0] is the PCID now, and may be anything.
        let pcid = CrState { cr3: 0x1005, cr4: on, ..LONG };
        assert_eq!(check_cr4_write(&pcid, on | CR4_PGE, CR4_OK), Ok(()));
        assert_eq!(check_cr4_write(&pcid, CR4_PAE, CR4_OK), Ok(()));
        // Not set at all: CR3 does not matter.
        assert_eq!(check_cr4_write(&CrState { cr3: 0x1001, ..LONG }, CR4_PAE | CR4_PGE, CR4_OK), Ok(()));
    }

    #[test]
    fn cr4_la57_stays_in_ia32e_mode() {
        let allowed = CR4_OK | CR4_LA57;
        assert_eq!(check_cr4_write(&LONG, CR4_PAE | CR4_LA57, allowed), Err(Gp));
        let five = CrState { cr4: CR4_PAE | CR4_LA57, ..LONG };
        assert_eq!(check_cr4_write(&five, CR4_PAE, allowed), Err(Gp));
        assert_eq!(check_cr4_write(&five, CR4_PAE | CR4_LA57 | CR4_PGE, allowed), Ok(()));
        assert_eq!(check_cr4_write(&LONG, CR4_PAE | CR4_PGE, allowed), Ok(()));
        assert_eq!(check_cr4_write(&CrState { cr4: CR4_PAE, ..PROT }, CR4_PAE | CR4_LA57, allowed), Ok(()));
    }

    #[test]
    fn cr4_cet_needs_wp() {
        let allowed = CR4_OK | CR4_CET;
        let no_wp = CrState { cr0: LONG.cr0 & !CR0_WP, ..LONG };
        assert_eq!(check_cr4_write(&no_wp, CR4_PAE | CR4_CET, allowed), Err(Gp));
        assert_eq!(check_cr4_write(&no_wp, CR4_PAE | CR4_PGE, allowed), Ok(()));
        assert_eq!(check_cr4_write(&LONG, CR4_PAE | CR4_CET, allowed), Ok(()));
    }

    #[test]
    fn efer_legal_writes_and_lma() {
        let all = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
        assert_eq!(check_efer_write(&LONG, all, true, true), Ok(all));
        // LMA is kept from the state, whatever the write says.
        assert_eq!(check_efer_write(&LONG, EFER_LME | EFER_NXE, true, false), Ok(EFER_LME | EFER_LMA | EFER_NXE));
        assert_eq!(check_efer_write(&PROT, EFER_LMA | EFER_SCE, false, true), Ok(EFER_SCE));
        assert_eq!(check_efer_write(&PROT, EFER_LME, false, false), Ok(EFER_LME));
        assert_eq!(check_efer_write(&PROT, 0, false, false), Ok(0));
        // PG=0: LME may change either way.
        let lme = CrState { efer: EFER_LME, ..PROT };
        assert_eq!(check_efer_write(&lme, 0, false, false), Ok(0));
        assert_eq!(check_efer_write(&PAGED32, EFER_NXE, true, false), Ok(EFER_NXE));
    }

    #[test]
    fn efer_unshown_and_reserved_bits_fault() {
        assert_eq!(check_efer_write(&LONG, LONG.efer | EFER_NXE, false, true), Err(Gp));
        assert_eq!(check_efer_write(&LONG, LONG.efer | EFER_SCE, true, false), Err(Gp));
        assert_eq!(check_efer_write(&LONG, LONG.efer | EFER_NXE, true, false), Ok(LONG.efer | EFER_NXE));
        assert_eq!(check_efer_write(&LONG, LONG.efer | EFER_SCE, false, true), Ok(LONG.efer | EFER_SCE));
        for bit in [1, 7, 9, 12, 13, 14, 15, 32, 63] {
            assert_eq!(check_efer_write(&LONG, LONG.efer | 1 << bit, true, true), Err(Gp), "bit {bit}");
        }
    }

    #[test]
    fn efer_lme_stays_while_paging() {
        assert_eq!(check_efer_write(&LONG, EFER_LMA, true, true), Err(Gp));
        assert_eq!(check_efer_write(&COMPAT, 0, true, true), Err(Gp));
        assert_eq!(check_efer_write(&PAGED32, EFER_LME, true, true), Err(Gp));
        assert_eq!(check_efer_write(&PAGED32, 0, true, true), Ok(0));
    }

    #[test]
    fn xsetbv_legal_values_pass() {
        for v in [0x1, 0x3, 0x7, 0xe7, 0x203, 0x2e7] {
            assert_eq!(check_xsetbv(0, v, 0x2e7), Ok(()), "{v:#x}");
        }
        assert_eq!(check_xsetbv(0, 0x3, 0x3), Ok(()));
    }

    #[test]
    fn xsetbv_bad_values_fault() {
        assert_eq!(check_xsetbv(1, 0x7, 0x2e7), Err(Gp)); // XINUSE is read-only
        assert_eq!(check_xsetbv(u32::MAX, 0x7, 0x2e7), Err(Gp));
        assert_eq!(check_xsetbv(0, 0x207, 0xe7), Err(Gp)); // not allowed
        assert_eq!(check_xsetbv(0, 0x7, 0x3), Err(Gp));
        assert_eq!(check_xsetbv(0, 1 << 63 | 0x7, 0x2e7), Err(Gp));
        assert_eq!(check_xsetbv(0, 0x2, 0x2e7), Err(Gp)); // no x87
        assert_eq!(check_xsetbv(0, 0x6, 0x2e7), Err(Gp));
        assert_eq!(check_xsetbv(0, 0x0, 0x2e7), Err(Gp));
        assert_eq!(check_xsetbv(0, 0x5, 0x2e7), Err(Gp)); // AVX without SSE
        for part in [0x20, 0x40, 0x80, 0x60, 0xa0, 0xc0] {
            assert_eq!(check_xsetbv(0, 0x7 | part, 0x2e7), Err(Gp), "{part:#x}");
        }
        assert_eq!(check_xsetbv(0, 0xe3, 0x2e7), Err(Gp)); // AVX-512 without AVX
        assert_eq!(check_xsetbv(0, 0xe3, u64::MAX), Err(Gp));
    }

    #[test]
    fn operand_and_cr0_value() {
        let reg = 0xdead_0000_8001_0033;
        assert_eq!(mov_cr_operand(&LONG, reg), reg);
        assert_eq!(mov_cr_operand(&COMPAT, reg), 0x8001_0033);
        assert_eq!(mov_cr_operand(&PAGED32, reg), 0x8001_0033);
        assert_eq!(mov_cr_operand(&CrState { cs_long: true, ..PAGED32 }, reg), 0x8001_0033);
        assert!(in_64bit_mode(&LONG) && !in_64bit_mode(&COMPAT) && !in_64bit_mode(&CrState { cs_long: true, ..PROT }));
        assert_eq!(cr0_value(0x8001_0033), 0x8001_0033);
        assert_eq!(cr0_value(CR0_PE), CR0_PE | CR0_ET);
        assert_eq!(cr0_value(0xffff_ffff), CR0_DEFINED);
        assert_eq!(cr0_value(0), CR0_ET);
        assert_eq!(CR0_DEFINED, 0xe005_003f);
    }

    /// CPUID answering `bit` set in (leaf, register) alone; leaf 0 says 7.
    fn only(leaf: u32, reg: usize, bit: u32) -> impl Fn(u32, u32) -> Regs {
        move |l, _| {
            let mut r = [0u32; 4];
            if l == leaf {
                r[reg] = 1 << bit;
            }
            if l == 0 {
                r[0] = 7;
            }
            Regs { eax: r[0], ebx: r[1], ecx: r[2], edx: r[3] }
        }
    }

    #[test]
    fn cr4_allowed_follows_each_cpuid_bit() {
        const EBX: usize = 1;
        const ECX: usize = 2;
        const EDX: usize = 3;
        let cases = [
            (1, EDX, 1, CR4_VME | CR4_PVI),
            (1, EDX, 4, CR4_TSD),
            (1, EDX, 2, CR4_DE),
            (1, EDX, 3, CR4_PSE),
            (1, EDX, 6, CR4_PAE),
            (1, EDX, 7, CR4_MCE),
            (1, EDX, 13, CR4_PGE),
            (1, EDX, 24, CR4_OSFXSR),
            (1, EDX, 25, CR4_OSXMMEXCPT),
            (7, ECX, 2, CR4_UMIP),
            (7, EBX, 0, CR4_FSGSBASE),
            (1, ECX, 17, CR4_PCIDE),
            (1, ECX, 26, CR4_OSXSAVE),
            (7, EBX, 7, CR4_SMEP),
            (7, EBX, 20, CR4_SMAP),
            (7, ECX, 3, CR4_PKE),
        ];
        for (leaf, reg, bit, cr4) in cases {
            assert_eq!(cr4_allowed(&only(leaf, reg, bit)), CR4_PCE | cr4, "leaf {leaf} reg {reg} bit {bit}");
        }
        // Nothing shown: only PCE. Bits that map to nothing: nothing more.
        assert_eq!(cr4_allowed(&|_, _| Regs::default()), CR4_PCE);
        for (leaf, reg, bit) in [(1, ECX, 5), (1, ECX, 6), (7, EBX, 1), (7, ECX, 16), (7, EDX, 20), (1, EDX, 9)] {
            assert_eq!(cr4_allowed(&only(leaf, reg, bit)), CR4_PCE, "leaf {leaf} reg {reg} bit {bit}");
        }
        // No leaf 7: its bits are not read.
        let all = |l: u32, _: u32| if l == 0 { Regs { eax: 6, ..Regs::default() } } else { Regs { eax: !0, ebx: !0, ecx: !0, edx: !0 } };
        assert_eq!(cr4_allowed(&all), CR4_OK & !(CR4_UMIP | CR4_FSGSBASE | CR4_SMEP | CR4_SMAP | CR4_PKE) | CR4_MCE);
        let all7 = |l: u32, _: u32| if l == 0 { Regs { eax: 7, ..Regs::default() } } else { Regs { eax: !0, ebx: !0, ecx: !0, edx: !0 } };
        assert_eq!(cr4_allowed(&all7), CR4_OK | CR4_MCE);
    }

    #[test]
    fn cr4_allowed_from_the_guest_view_never_has_the_forbidden_bits() {
        let host = |_: u32, _: u32| Regs { eax: !0, ebx: !0, ecx: !0, edx: !0 };
        let view = GuestView { cr4_osxsave: true, cr4_pke: true, xcr0_allowed: xcr0_allowed(&host), rdtscp: true, invpcid: true, lapic: false, apic_enabled: false, tsc_hz: 0, xcr0: 0 };
        let allowed = cr4_allowed(&|l, s| guest_cpuid(l, s, &host, &view));
        assert_eq!(allowed, CR4_OK); // MCE is hidden from guests, so CR4.MCE too
        let none = cr4_allowed(&|l, s| guest_cpuid(l, s, &host, &GuestView::default()));
        assert_eq!(none, CR4_OK & !(CR4_OSXSAVE | CR4_PKE));
        // What xcr0_allowed gives is a legal XCR0.
        assert_eq!(check_xsetbv(0, view.xcr0_allowed, view.xcr0_allowed), Ok(()));
    }

    proptest! {
        /// Whatever the host: the guest's CR4 can never get the bits it must
        /// not have, and the allowed XCR0 is itself a legal XCR0.
        #[test]
        fn never_forbidden_bits(words in proptest::collection::vec(any::<u32>(), 16), top in 0u32..0x30, pke in any::<bool>()) {
            let host = |l: u32, s: u32| {
                let i = (l as usize * 3 + s as usize) % 4 * 4;
                let r = Regs { eax: words[i], ebx: words[i + 1], ecx: words[i + 2], edx: words[i + 3] };
                if l == 0 { Regs { eax: top, ..r } } else { r }
            };
            let allowed_x = xcr0_allowed(&host);
            let view = GuestView { cr4_osxsave: true, cr4_pke: pke, xcr0_allowed: allowed_x, rdtscp: true, invpcid: true, lapic: false, apic_enabled: false, tsc_hz: 0, xcr0: 0 };
            let allowed = cr4_allowed(&|l, s| guest_cpuid(l, s, &host, &view));
            let never = CR4_VMXE | CR4_SMXE | CR4_LA57 | CR4_KL | CR4_CET | CR4_PKS | CR4_UINTR | CR4_MCE | !0xff_ffff;
            prop_assert_eq!(allowed & never, 0);
            prop_assert_eq!(allowed & !CR4_OK, 0);
            if allowed_x != 0 {
                prop_assert_eq!(check_xsetbv(0, allowed_x, allowed_x), Ok(()));
            }
        }
    }

    #[test]
    fn pg_with_lme_activates_ia32e_mode_and_clearing_it_leaves() {
        let off = CrState { cr0: CR0_PE | CR0_ET, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LME, cs_long: false };
        let on = cr0_paging_change(&off, CR0_PE | CR0_ET | CR0_PG);
        assert_eq!(on, PagingChange { efer: EFER_LME | EFER_LMA, ia32e: true, load_pdptes: false });
        let in_compat = CrState { cr0: CR0_PE | CR0_PG, efer: EFER_LME | EFER_LMA, ..off };
        assert_eq!(
            cr0_paging_change(&in_compat, CR0_PE),
            PagingChange { efer: EFER_LME, ia32e: false, load_pdptes: false }
        );
        // Other bits change nothing about the mode.
        assert_eq!(cr0_paging_change(&in_compat, CR0_PE | CR0_PG | CR0_WP).efer, EFER_LME | EFER_LMA);
        assert!(cr0_paging_change(&in_compat, CR0_PE | CR0_PG | CR0_WP).ia32e);
    }

    #[test]
    fn pae_paging_without_lme_loads_pdptes_and_plain_paging_does_not() {
        let pae = CrState { cr0: CR0_PE, cr3: 0x1000, cr4: CR4_PAE, efer: 0, cs_long: false };
        assert_eq!(cr0_paging_change(&pae, CR0_PE | CR0_PG), PagingChange { efer: 0, ia32e: false, load_pdptes: true });
        let plain = CrState { cr4: 0, ..pae };
        assert!(!cr0_paging_change(&plain, CR0_PE | CR0_PG).load_pdptes);
        // Already paging: nothing to load.
        let paging = CrState { cr0: CR0_PE | CR0_PG, ..pae };
        assert!(!cr0_paging_change(&paging, CR0_PE | CR0_PG | CR0_WP).load_pdptes);
        // Paging off with PAE set: no walk, no PDPTEs, no LMA.
        assert_eq!(cr0_paging_change(&paging, CR0_PE), PagingChange { efer: 0, ia32e: false, load_pdptes: false });
    }

}

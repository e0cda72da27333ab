//! The guest's page walk: linear address to guest-physical address, for
//! every mode a guest can be in (Intel SDM Vol. 3A, chapter 4).
//!
//! | CR0.PG | CR4.PAE | EFER.LMA | CR4.LA57 | mode                                        |
//! |--------|---------|----------|----------|---------------------------------------------|
//! | 0      | -       | -        | -        | none: linear = physical (32 bits)           |
//! | 1      | 0       | -        | -        | 32-bit paging, 4 KiB and (CR4.PSE) 4 MiB    |
//! | 1      | 1       | 0        | -        | PAE paging, 4 KiB and 2 MiB                 |
//! | 1      | 1       | 1        | 0        | 4-level paging, 4 KiB, 2 MiB and 1 GiB      |
//! | 1      | 1       | 1        | 1        | 5-level paging, the same page sizes         |
//!
//! A failed walk is a [`WalkError::PageFault`] with the error code of
//! SDM 4.7, so that the kernel can inject #PF (CR2 = the address), or a
//! [`WalkError::NonCanonical`] (the CPU raises #GP or #SS there, not
//! #PF), or [`WalkError::NotMemory`] when a paging structure lies outside
//! guest memory.
//!
//! What is checked: present bits; reserved bits that do not depend on
//! MAXPHYADDR (PS in a PML4E/PML5E, the bits between bit 13 and the
//! page size in large-page entries, PAE's PDPTE bits 1, 2, 5-8 and 63,
//! XD when EFER.NXE = 0); U/S, R/W (with CR0.WP for supervisor writes),
//! XD (with EFER.NXE) and CR4.SMEP, each combined over all levels as
//! SDM 4.6 says.
//!
//! Left out, deliberately:
//! * Reserved physical-address bits above MAXPHYADDR (the guest's
//!   MAXPHYADDR is not known here): bits 12..51 are taken as address; an
//!   address beyond guest memory then fails in `read_phys`.
//! * CR4.SMAP (needs EFLAGS.AC and whether the access is implicit; an
//!   instruction fetch, this walk's use, is never subject to SMAP),
//!   protection keys (CR4.PKE/PKS), CET shadow stacks, HLAT.
//! * PAE paging reads the PDPTEs from memory at CR3, while the CPU uses
//!   the copies it loaded with the last MOV to CR3 (the VMCS holds
//!   them). They differ only if the guest changed its PDPT without
//!   reloading CR3.
//! * 1-GiB pages are accepted whether or not the guest's CPUID shows
//!   them.
//! * Accessed and dirty bits are not set: the walk only serves to fetch
//!   the bytes of an instruction that already ran up to its exit (the
//!   CPU set the bits then), and to read guest memory for emulation.
//! * The TLB: the walk sees the tables as they are in memory, which may
//!   be newer than what the guest's TLB holds.

/// One access, as the CPU would make it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    /// A user-mode access (CPL 3), rather than supervisor-mode.
    pub user: bool,
    /// An instruction fetch (a read; `write` is then ignored).
    pub fetch: bool,
}

impl Access {
    pub const READ: Access = Access { write: false, user: false, fetch: false };
    pub const WRITE: Access = Access { write: true, user: false, fetch: false };
    pub const FETCH: Access = Access { write: false, user: false, fetch: true };
}

/// Why a walk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// Inject #PF with this error code and CR2 = `address`.
    PageFault { error_code: u32, address: u64 },
    /// The address is not canonical for the paging mode (#GP or #SS).
    NonCanonical { address: u64 },
    /// A paging structure or the data lies outside guest memory (where
    /// `read_phys` / `read_bytes` said None).
    NotMemory { gpa: u64 },
}

/// #PF error code bits (SDM 4.7).
pub const PF_PRESENT: u32 = 1 << 0;
pub const PF_WRITE: u32 = 1 << 1;
pub const PF_USER: u32 = 1 << 2;
pub const PF_RSVD: u32 = 1 << 3;
pub const PF_FETCH: u32 = 1 << 4;

pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_SMEP: u64 = 1 << 20;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Paging-structure entry bits.
pub const PTE_P: u64 = 1 << 0;
pub const PTE_RW: u64 = 1 << 1;
pub const PTE_US: u64 = 1 << 2;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_XD: u64 = 1 << 63;
/// Bits 51:12: the next table or the 4 KiB page.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Rights accumulated over the levels of one walk (SDM 4.6.1).
#[derive(Clone, Copy)]
struct Rights {
    writable: bool,
    user: bool,
    no_exec: bool,
}

/// Translates `linear` for `access` in the paging mode that the control
/// registers select. `read_phys(gpa)` reads 8 bytes of guest-physical
/// memory (little-endian; `gpa` is 8-byte aligned), None where there is
/// no memory.
pub fn translate(
    cr0: u64,
    cr4: u64,
    efer: u64,
    cr3: u64,
    linear: u64,
    access: Access,
    read_phys: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<u64, WalkError> {
    if cr0 & CR0_PG == 0 {
        return Ok(linear & 0xFFFF_FFFF);
    }
    let nxe = cr4 & CR4_PAE != 0 && efer & EFER_NXE != 0;
    // I/D is reported only with SMEP, or with NX in effect (SDM 4.7).
    let fetch_bit = access.fetch && (cr4 & CR4_SMEP != 0 || nxe);
    let fault = |present: bool, rsvd: bool, address: u64| WalkError::PageFault {
        error_code: (present as u32 * PF_PRESENT)
            | ((access.write && !access.fetch) as u32 * PF_WRITE)
            | (access.user as u32 * PF_USER)
            | (rsvd as u32 * PF_RSVD)
            | (fetch_bit as u32 * PF_FETCH),
        address,
    };
    let (gpa, rights) = if cr4 & CR4_PAE == 0 {
        walk32(cr4, cr3, linear & 0xFFFF_FFFF, read_phys, &fault)?
    } else if efer & EFER_LMA == 0 {
        walk64(cr3, linear & 0xFFFF_FFFF, nxe, Levels::Pae, read_phys, &fault)?
    } else {
        let la57 = cr4 & CR4_LA57 != 0;
        let bits = if la57 { 57 } else { 48 };
        // Canonical: bits 63:bits-1 all equal.
        if ((linear as i64) << (64 - bits) >> (64 - bits)) as u64 != linear {
            return Err(WalkError::NonCanonical { address: linear });
        }
        let levels = if la57 { Levels::Five } else { Levels::Four };
        walk64(cr3, linear, nxe, levels, read_phys, &fault)?
    };
    let linear = if cr4 & CR4_PAE == 0 || efer & EFER_LMA == 0 { linear & 0xFFFF_FFFF } else { linear };
    check_rights(cr0, cr4, rights, access, nxe).map_err(|()| fault(true, false, linear))?;
    Ok(gpa)
}

/// SDM 4.6.1: what the accumulated rights allow.
fn check_rights(cr0: u64, cr4: u64, r: Rights, a: Access, nxe: bool) -> Result<(), ()> {
    if a.user && !r.user {
        return Err(());
    }
    if a.fetch {
        if nxe && r.no_exec {
            return Err(());
        }
        // SMEP: supervisor fetches from user-mode pages fault.
        if !a.user && r.user && cr4 & CR4_SMEP != 0 {
            return Err(());
        }
    } else if a.write && !r.writable && (a.user || cr0 & CR0_WP != 0) {
        return Err(());
    }
    Ok(())
}

/// 32-bit paging (SDM 4.3): 4-byte entries, two levels.
fn walk32(
    cr4: u64,
    cr3: u64,
    linear: u64,
    read_phys: &mut dyn FnMut(u64) -> Option<u64>,
    fault: &dyn Fn(bool, bool, u64) -> WalkError,
) -> Result<(u64, Rights), WalkError> {
    let mut read32 = |gpa: u64| -> Result<u64, WalkError> {
        let q = read_phys(gpa & !7).ok_or(WalkError::NotMemory { gpa })?;
        Ok(if gpa & 4 != 0 { q >> 32 } else { q & 0xFFFF_FFFF })
    };
    let pde_addr = (cr3 & 0xFFFF_F000) | (linear >> 22) << 2;
    let pde = read32(pde_addr)?;
    if pde & PTE_P == 0 {
        return Err(fault(false, false, linear));
    }
    let mut rights = Rights { writable: pde & PTE_RW != 0, user: pde & PTE_US != 0, no_exec: false };
    if pde & PTE_PS != 0 && cr4 & CR4_PSE != 0 {
        // A 4 MiB page: bits 31:22 of the address, 39:32 in bits 20:13
        // (PSE-36), bit 21 reserved (SDM table 4-4).
        if pde & (1 << 21) != 0 {
            return Err(fault(true, true, linear));
        }
        let base = (pde & 0xFFC0_0000) | ((pde >> 13) & 0xFF) << 32;
        return Ok((base | (linear & 0x3F_FFFF), rights));
    }
    let pte = read32((pde & 0xFFFF_F000) | ((linear >> 12) & 0x3FF) << 2)?;
    if pte & PTE_P == 0 {
        return Err(fault(false, false, linear));
    }
    rights.writable &= pte & PTE_RW != 0;
    rights.user &= pte & PTE_US != 0;
    Ok(((pte & 0xFFFF_F000) | (linear & 0xFFF), rights))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Levels {
    Pae,
    Four,
    Five,
}

/// PAE, 4-level and 5-level paging (SDM 4.4, 4.5): 8-byte entries.
fn walk64(
    cr3: u64,
    linear: u64,
    nxe: bool,
    levels: Levels,
    read_phys: &mut dyn FnMut(u64) -> Option<u64>,
    fault: &dyn Fn(bool, bool, u64) -> WalkError,
) -> Result<(u64, Rights), WalkError> {
    let mut rights = Rights { writable: true, user: true, no_exec: false };
    // XD is a reserved bit unless NX is on (SDM 4.5.4, tables 4-14ff).
    let xd_reserved = if nxe { 0 } else { PTE_XD };
    let (mut table, top_shift) = match levels {
        // The PDPT is 32-byte aligned; its four entries select by bits 31:30.
        Levels::Pae => {
            let pdpte_addr = (cr3 & 0xFFFF_FFE0) | ((linear >> 30) & 3) << 3;
            let pdpte = read_phys(pdpte_addr).ok_or(WalkError::NotMemory { gpa: pdpte_addr })?;
            if pdpte & PTE_P == 0 {
                return Err(fault(false, false, linear));
            }
            // Bits 2:1, 8:5 and 63 are reserved; a PDPTE has no rights.
            if pdpte & (0x1E6 | PTE_XD) != 0 {
                return Err(fault(true, true, linear));
            }
            (pdpte & ADDR_MASK, 21)
        }
        Levels::Four => (cr3 & ADDR_MASK, 39),
        Levels::Five => (cr3 & ADDR_MASK, 48),
    };
    let mut shift = top_shift;
    loop {
        let addr = table | ((linear >> shift) & 0x1FF) << 3;
        let e = read_phys(addr).ok_or(WalkError::NotMemory { gpa: addr })?;
        if e & PTE_P == 0 {
            return Err(fault(false, false, linear));
        }
        let large = shift != 12 && e & PTE_PS != 0;
        let mut reserved = e & xd_reserved;
        if large {
            // PS is reserved in PML4Es and PML5Es; a large page's address
            // bits below its size (13 up, bit 12 is PAT) are reserved.
            if shift > 30 {
                reserved |= PTE_PS;
            } else {
                reserved |= e & ((1 << shift) - 1) & !0x1FFF;
            }
        }
        if reserved != 0 {
            return Err(fault(true, true, linear));
        }
        rights.writable &= e & PTE_RW != 0;
        rights.user &= e & PTE_US != 0;
        rights.no_exec |= e & PTE_XD != 0;
        if shift == 12 || large {
            let page_mask = (1u64 << shift) - 1;
            return Ok(((e & ADDR_MASK & !page_mask) | (linear & page_mask), rights));
        }
        table = e & ADDR_MASK;
        shift -= 9;
    }
}

/// Reads `buf.len()` bytes at `linear`, translating each page on its
/// own (an instruction fetch of up to 15 bytes may cross a page).
/// `read_bytes(gpa, dst)` fills `dst` from guest-physical memory (never
/// across a 4 KiB boundary), None where there is no memory. A fault in a
/// later page reports the address of that page's first byte read.
#[allow(clippy::too_many_arguments)]
pub fn read_linear(
    cr0: u64,
    cr4: u64,
    efer: u64,
    cr3: u64,
    linear: u64,
    access: Access,
    buf: &mut [u8],
    read_phys: &mut dyn FnMut(u64) -> Option<u64>,
    read_bytes: &mut dyn FnMut(u64, &mut [u8]) -> Option<()>,
) -> Result<(), WalkError> {
    let mut done = 0;
    while done < buf.len() {
        let la = linear.wrapping_add(done as u64);
        let in_page = (0x1000 - (la & 0xFFF)) as usize;
        let n = in_page.min(buf.len() - done);
        let gpa = translate(cr0, cr4, efer, cr3, la, access, read_phys)?;
        read_bytes(gpa, &mut buf[done..done + n]).ok_or(WalkError::NotMemory { gpa })?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec;
    use alloc::vec::Vec;

    const MEM_END: u64 = 1 << 32;
    const P: u64 = PTE_P;
    const RW: u64 = PTE_RW;
    const US: u64 = PTE_US;
    const PS: u64 = PTE_PS;
    const XD: u64 = PTE_XD;
    const PG: u64 = CR0_PG | 1; // PG and PE
    const WP: u64 = CR0_WP;
    const LONG: u64 = EFER_LMA | (1 << 8);
    const NX: u64 = EFER_NXE;

    /// Sparse guest memory of 8-byte words below 4 GiB.
    #[derive(Default)]
    struct Mem(BTreeMap<u64, u64>);

    impl Mem {
        fn set(&mut self, gpa: u64, v: u64) {
            assert_eq!(gpa % 8, 0);
            self.0.insert(gpa, v);
        }
        /// A 4-byte entry of 32-bit paging.
        fn set32(&mut self, gpa: u64, v: u32) {
            let q = self.0.get(&(gpa & !7)).copied().unwrap_or(0);
            let q = if gpa & 4 != 0 { (q & 0xFFFF_FFFF) | (v as u64) << 32 } else { (q & !0xFFFF_FFFF) | v as u64 };
            self.0.insert(gpa & !7, q);
        }
        fn read(&self, gpa: u64) -> Option<u64> {
            assert_eq!(gpa % 8, 0, "read_phys gets aligned addresses");
            (gpa < MEM_END).then(|| self.0.get(&gpa).copied().unwrap_or(0))
        }
        fn walk(&self, cr0: u64, cr4: u64, efer: u64, cr3: u64, la: u64, a: Access) -> Result<u64, WalkError> {
            translate(cr0, cr4, efer, cr3, la, a, &mut |g| self.read(g))
        }
    }

    fn pf(error_code: u32, address: u64) -> Result<u64, WalkError> {
        Err(WalkError::PageFault { error_code, address })
    }

    const R: Access = Access::READ;
    const W: Access = Access::WRITE;
    const X: Access = Access::FETCH;
    const UR: Access = Access { write: false, user: true, fetch: false };
    const UW: Access = Access { write: true, user: true, fetch: false };
    const UX: Access = Access { write: false, user: true, fetch: true };

    #[test]
    fn paging_off_is_identity_in_32_bits() {
        let m = Mem::default();
        assert_eq!(m.walk(1, 0, 0, 0, 0x1234_5678, W), Ok(0x1234_5678));
        assert_eq!(m.walk(0, CR4_PAE, LONG, 0, 0x1_0000_0010, R), Ok(0x10));
    }

    /// 32-bit paging: PD at 0x1000, PT at 0x2000; 0x0040_3000 -> 0x7000.
    fn mem32(pde_flags: u32, pte_flags: u32) -> Mem {
        let mut m = Mem::default();
        m.set32(0x1000 + 4, 0x2000 | pde_flags); // PDE 1: 4 MiB..8 MiB
        m.set32(0x2000 + 3 * 4, 0x7000 | pte_flags); // PTE 3
        m
    }

    #[test]
    fn paging_32bit_4k() {
        let m = mem32(0x7, 0x7);
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3abc, UW), Ok(0x7abc));
        // CR3 bits 11:0 are not address bits; linear bits 63:32 do not count.
        assert_eq!(m.walk(PG, 0, 0, 0x1018, 0xFFFF_FFFF_0040_3ABC, R), Ok(0x7abc));
        // Not present: the PTE next to it, the PDE next to it.
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_4000, R), pf(0, 0x0040_4000));
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0080_3000, UW), pf(PF_WRITE | PF_USER, 0x0080_3000));
        // The bits of the PTE above its odd/even neighbour are its own.
        let mut m = mem32(0x7, 0x7);
        m.set32(0x2000 + 2 * 4, 0x9000 | 1);
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_2001, R), Ok(0x9001));
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3001, R), Ok(0x7001));
    }

    #[test]
    fn paging_32bit_rights() {
        // Supervisor page: user access faults with P=1.
        let m = mem32(0x7, 0x3);
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3000, UR), pf(PF_PRESENT | PF_USER, 0x0040_3000));
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3000, W), Ok(0x7000));
        // The PDE's U/S counts as much as the PTE's.
        let m = mem32(0x3, 0x7);
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3000, UR), pf(PF_PRESENT | PF_USER, 0x0040_3000));
        // Read-only (in the PDE): user writes fault, supervisor writes
        // only with CR0.WP.
        let m = mem32(0x5, 0x7);
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3000, UR), Ok(0x7000));
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3000, UW), pf(PF_PRESENT | PF_WRITE | PF_USER, 0x0040_3000));
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3000, W), Ok(0x7000));
        assert_eq!(m.walk(PG | WP, 0, 0, 0x1000, 0x0040_3000, W), pf(PF_PRESENT | PF_WRITE, 0x0040_3000));
        // A fetch is a read, and without SMEP or NX its I/D bit is 0.
        let m = mem32(0x7, 0x5);
        let x = Access { write: true, ..X };
        assert_eq!(m.walk(PG | WP, 0, 0, 0x1000, 0x0040_3000, x), Ok(0x7000));
        let m = mem32(0x7, 0x3);
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0040_3000, UX), pf(PF_PRESENT | PF_USER, 0x0040_3000));
        // EFER.NXE means nothing without PAE.
        assert_eq!(m.walk(PG, 0, NX, 0x1000, 0x0040_3000, UX), pf(PF_PRESENT | PF_USER, 0x0040_3000));
        // SMEP: supervisor fetch from a user page, I/D reported.
        let m = mem32(0x7, 0x7);
        assert_eq!(m.walk(PG, CR4_SMEP, 0, 0x1000, 0x0040_3000, X), pf(PF_PRESENT | PF_FETCH, 0x0040_3000));
        assert_eq!(m.walk(PG, CR4_SMEP, 0, 0x1000, 0x0040_3000, R), Ok(0x7000));
        assert_eq!(m.walk(PG, CR4_SMEP, 0, 0x1000, 0x0040_3000, UX), Ok(0x7000));
        assert_eq!(m.walk(PG, CR4_SMEP, 0, 0x1000, 0x0040_4000, X), pf(PF_FETCH, 0x0040_4000));
        // SMEP leaves supervisor pages alone.
        let m = mem32(0x7, 0x3);
        assert_eq!(m.walk(PG, CR4_SMEP, 0, 0x1000, 0x0040_3000, X), Ok(0x7000));
        // The fault address is the 32-bit linear address.
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0xFFFF_0000_0040_3000, UR), pf(PF_PRESENT | PF_USER, 0x0040_3000));
    }

    #[test]
    fn paging_32bit_4m_pages() {
        let mut m = Mem::default();
        // PDE 2 (8 MiB..12 MiB): PS, page at 0x0C00_0000 plus PSE-36
        // bits 34:32 = 0b101 in PDE bits 15:13.
        m.set32(0x1000 + 8, 0x0C00_0000 | 0b101 << 13 | 0x83);
        assert_eq!(m.walk(PG, CR4_PSE, 0, 0x1000, 0x0089_abcd, R), Ok(0x5_0C09_ABCD));
        // Bit 21 is reserved.
        m.set32(0x1000 + 8, 0x0C20_0000 | 0x83);
        assert_eq!(m.walk(PG, CR4_PSE, 0, 0x1000, 0x0089_abcd, R), pf(PF_PRESENT | PF_RSVD, 0x0089_abcd));
        // Without CR4.PSE, PS is ignored: the PDE points to a table.
        m.set32(0x1000 + 8, 0x0000_3000 | 0x83);
        m.set32(0x3000 + 0x9A * 4, 0x5000 | 1);
        assert_eq!(m.walk(PG, 0, 0, 0x1000, 0x0089_abcd, R), Ok(0x5bcd));
    }

    /// PAE: PDPT at 0x1020 (32-byte aligned), PD at 0x2000, PT at 0x3000.
    fn mem_pae(pdpte: u64, pde: u64, pte: u64) -> Mem {
        let mut m = Mem::default();
        m.set(0x1020 + 8, 0x2000 | pdpte); // 1 GiB..2 GiB
        m.set(0x2000 + 8 * 2, 0x3000 | pde); // +4 MiB..+6 MiB
        m.set(0x3000 + 8 * 5, 0x8000 | pte);
        m
    }
    const PAE_LA: u64 = 0x4040_5123;

    #[test]
    fn paging_pae() {
        let m = mem_pae(P, P | RW | US, P | RW | US);
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA, UW), Ok(0x8123));
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, 0xFFFF_FFFF_0000_0000 | PAE_LA, R), Ok(0x8123));
        // Other PDPTEs are absent.
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, 0xC040_5123, W), pf(PF_WRITE, 0xC040_5123));
        // Rights and their fault address (32 bits) in PAE mode.
        let m = mem_pae(P, P | RW | US, P | RW);
        assert_eq!(
            m.walk(PG, CR4_PAE, 0, 0x1020, 0xFFFF_FFFF_0000_0000 | PAE_LA, UR),
            pf(PF_PRESENT | PF_USER, PAE_LA)
        );
        let m = mem_pae(P, P | US, P | RW | US);
        assert_eq!(m.walk(PG | WP, CR4_PAE, 0, 0x1020, PAE_LA, W), pf(PF_PRESENT | PF_WRITE, PAE_LA));
        // PDPTE reserved bits: 1, 2, 5..8, 63 (it has no rights bits).
        for bit in [1, 2, 5, 6, 7, 8, 63] {
            let m = mem_pae(P | 1 << bit, P | RW | US, P | RW | US);
            assert_eq!(m.walk(PG, CR4_PAE, NX, 0x1020, PAE_LA, R), pf(PF_PRESENT | PF_RSVD, PAE_LA), "bit {bit}");
        }
        for bit in [3, 4, 9, 10, 11] {
            let m = mem_pae(P | 1 << bit, P | RW | US, P | RW | US);
            assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA, R), Ok(0x8123), "bit {bit}");
        }
        // 2 MiB page in the PD, with PAT (bit 12) allowed and bit 13 reserved.
        let mut m = mem_pae(P, 0, 0);
        m.set(0x2000 + 8 * 2, 0x0160_0000 | 1 << 12 | P | PS);
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA, R), Ok(0x0160_5123));
        m.set(0x2000 + 8 * 2, 0x0160_0000 | 1 << 13 | P | PS);
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA, R), pf(PF_PRESENT | PF_RSVD, PAE_LA));
        m.set(0x2000 + 8 * 2, 0x0160_0000 | 1 << 20 | P | PS);
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA, R), pf(PF_PRESENT | PF_RSVD, PAE_LA));
    }

    #[test]
    fn pae_no_execute() {
        // XD in the PTE: a fault with NXE (I/D set), reserved without it.
        let m = mem_pae(P, P | RW, P | RW | XD);
        assert_eq!(m.walk(PG, CR4_PAE, NX, 0x1020, PAE_LA, X), pf(PF_PRESENT | PF_FETCH, PAE_LA));
        assert_eq!(m.walk(PG, CR4_PAE, NX, 0x1020, PAE_LA, W), Ok(0x8123));
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA, R), pf(PF_PRESENT | PF_RSVD, PAE_LA));
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA, X), pf(PF_PRESENT | PF_RSVD, PAE_LA));
        // XD in the PDE counts for the whole range.
        let m = mem_pae(P, P | RW | XD, P | RW);
        assert_eq!(m.walk(PG, CR4_PAE, NX, 0x1020, PAE_LA, X), pf(PF_PRESENT | PF_FETCH, PAE_LA));
        // With NX on, a not-present fetch reports I/D too.
        assert_eq!(m.walk(PG, CR4_PAE, NX, 0x1020, PAE_LA + 0x1000, X), pf(PF_FETCH, PAE_LA + 0x1000));
        // Without NX, XD in the PDE is reserved even where the PTE is absent.
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA + 0x1000, X), pf(PF_PRESENT | PF_RSVD, PAE_LA + 0x1000));
        let m = mem_pae(P, P | RW, P | RW);
        assert_eq!(m.walk(PG, CR4_PAE, 0, 0x1020, PAE_LA + 0x1000, X), pf(0, PAE_LA + 0x1000));
    }

    /// 4-level: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000, for
    /// the linear address `LA4` (indices 0x1FF, 0x1FE, 0x3, 0x7).
    const LA4: u64 = 0xFFFF_FFFF_8060_7ABC;
    fn mem4(flags: [u64; 4]) -> Mem {
        let mut m = Mem::default();
        m.set(0x1000 + 8 * 0x1FF, 0x2000 | flags[0]);
        m.set(0x2000 + 8 * 0x1FE, 0x3000 | flags[1]);
        m.set(0x3000 + 8 * 3, 0x4000 | flags[2]);
        m.set(0x4000 + 8 * 7, 0x0009_0000_0000_5000 | flags[3]);
        m
    }
    const ALL: u64 = P | RW | US;

    #[test]
    fn four_level_4k() {
        let m = mem4([ALL; 4]);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, UW), Ok(0x0009_0000_0000_5abc));
        // CR3's PCID bits (11:0) are no address bits.
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1fff, LA4, R), Ok(0x0009_0000_0000_5abc));
        // Bits 62:52 of an entry are ignored.
        let mut m = mem4([ALL; 4]);
        m.set(0x4000 + 8 * 7, 0x7FF0_0000_0000_5000 | ALL);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), Ok(0x5abc));
        // Not present at each level, with W/U in the error code.
        for level in 0..4 {
            let mut f = [ALL; 4];
            f[level] = RW | US;
            let m = mem4(f);
            assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, UW), pf(PF_WRITE | PF_USER, LA4), "level {level}");
            // U/S and R/W clear at one level.
            f[level] = P | RW;
            let m = mem4(f);
            assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, UR), pf(PF_PRESENT | PF_USER, LA4), "level {level}");
            assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, W), Ok(0x0009_0000_0000_5abc));
            f[level] = P | US;
            let m = mem4(f);
            assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, UW), pf(PF_PRESENT | PF_WRITE | PF_USER, LA4));
            assert_eq!(m.walk(PG | WP, CR4_PAE, LONG, 0x1000, LA4, W), pf(PF_PRESENT | PF_WRITE, LA4));
            assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, W), Ok(0x0009_0000_0000_5abc));
            // XD at one level.
            f[level] = ALL | XD;
            let m = mem4(f);
            assert_eq!(m.walk(PG, CR4_PAE, LONG | NX, 0x1000, LA4, UX), pf(PF_PRESENT | PF_USER | PF_FETCH, LA4));
            assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), pf(PF_PRESENT | PF_RSVD, LA4));
            assert_eq!(m.walk(PG, CR4_PAE, LONG | NX, 0x1000, LA4, UR), Ok(0x0009_0000_0000_5abc));
        }
    }

    #[test]
    fn four_level_large_pages_and_reserved_bits() {
        // 1 GiB page in the PDPTE: bits 29:0 from the address.
        let mut m = mem4([ALL; 4]);
        m.set(0x2000 + 8 * 0x1FE, 0x0000_0040_0000_0000 | 1 << 12 | ALL | PS);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), Ok(0x0000_0040_0060_7abc));
        for bit in [13, 20, 29] {
            m.set(0x2000 + 8 * 0x1FE, 0x0000_0040_0000_0000 | 1 << bit | ALL | PS);
            assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, UW), pf(PF_PRESENT | PF_RSVD | PF_WRITE | PF_USER, LA4));
        }
        // 2 MiB page in the PDE.
        let mut m = mem4([ALL; 4]);
        m.set(0x3000 + 8 * 3, 0x1240_0000 | ALL | PS);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), Ok(0x1240_7abc));
        m.set(0x3000 + 8 * 3, 0x1240_0000 | 1 << 13 | ALL | PS);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), pf(PF_PRESENT | PF_RSVD, LA4));
        // Bit 21 is an address bit of a 2 MiB page, not of a 1 GiB page.
        m.set(0x3000 + 8 * 3, 0x1260_0000 | ALL | PS);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), Ok(0x1260_7abc));
        // PS in a PML4E is reserved.
        let mut m = mem4([ALL; 4]);
        m.set(0x1000 + 8 * 0x1FF, 0x2000 | ALL | PS);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), pf(PF_PRESENT | PF_RSVD, LA4));
        // PS in a PTE is PAT: no large page, no reserved bit.
        let mut m = mem4([ALL; 4]);
        m.set(0x4000 + 8 * 7, 0x5000 | ALL | PS);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), Ok(0x5abc));
        // A reserved bit below a not-present entry does not matter; above
        // it, it does.
        let mut m = mem4([ALL, P | 1 << 13 | PS, 0, ALL]);
        m.set(0x3000 + 8 * 3, 0);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, LA4, R), pf(PF_PRESENT | PF_RSVD, LA4));
    }

    #[test]
    fn canonical_addresses_and_five_levels() {
        let m = mem4([ALL; 4]);
        for la in [0x0000_8000_0000_0000u64, 0xFFFF_7FFF_FFFF_FFFF, 0x8000_0000_0000_0000] {
            assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, la, R), Err(WalkError::NonCanonical { address: la }));
        }
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, 0x0000_7FFF_FFFF_F000, R), pf(0, 0x0000_7FFF_FFFF_F000));
        // 5-level: PML5 at 0x6000, entry 0x1FF (bits 56:48 all ones) -> the
        // PML4 above.
        let mut m = mem4([ALL; 4]);
        m.set(0x6000 + 8 * 0x1FF, 0x1000 | ALL);
        let la5 = 0xFFFF_FFFF_8060_7ABC;
        assert_eq!(m.walk(PG, CR4_PAE | CR4_LA57, LONG, 0x6000, la5, R), Ok(0x0009_0000_0000_5abc));
        // An address canonical only for 57 bits.
        let la = 0xFF7F_FFFF_8060_7ABC;
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, la, R), Err(WalkError::NonCanonical { address: la }));
        assert_eq!(m.walk(PG, CR4_PAE | CR4_LA57, LONG, 0x6000, la, R), pf(0, la));
        let la = 0xFEFF_FFFF_8060_7ABC;
        assert_eq!(m.walk(PG, CR4_PAE | CR4_LA57, LONG, 0x6000, la, R), Err(WalkError::NonCanonical { address: la }));
        // PS in a PML5E is reserved.
        m.set(0x6000 + 8 * 0x1FF, 0x1000 | ALL | PS);
        assert_eq!(m.walk(PG, CR4_PAE | CR4_LA57, LONG, 0x6000, la5, R), pf(PF_PRESENT | PF_RSVD, la5));
    }

    #[test]
    fn tables_outside_memory() {
        let mut m = Mem::default();
        m.set(0x1000, 0x1_0000_0000 | ALL);
        assert_eq!(m.walk(PG, CR4_PAE, LONG, 0x1000, 0x1000, R), Err(WalkError::NotMemory { gpa: 0x1_0000_0000 }));
        assert_eq!(
            m.walk(PG, CR4_PAE, LONG, 0x2_0000_0000, 0x1000, R),
            Err(WalkError::NotMemory { gpa: 0x2_0000_0000 })
        );
    }

    /// A byte-addressed memory for `read_linear`: page frames by number.
    fn read_bytes(frames: &BTreeMap<u64, Vec<u8>>, gpa: u64, dst: &mut [u8]) -> Option<()> {
        let f = frames.get(&(gpa >> 12))?;
        let off = (gpa & 0xFFF) as usize;
        assert!(off + dst.len() <= 0x1000, "read_bytes crosses a page");
        dst.copy_from_slice(&f[off..off + dst.len()]);
        Some(())
    }

    #[test]
    fn read_linear_crosses_pages_to_separate_frames() {
        // 0x0040_3000 -> frame 0x7000, 0x0040_4000 -> frame 0x9000.
        let mut m = mem32(0x7, 0x7);
        m.set32(0x2000 + 4 * 4, 0x9000 | 0x7);
        let mut frames = BTreeMap::new();
        frames.insert(7, (0..0x1000u32).map(|i| i as u8).collect::<Vec<u8>>());
        frames.insert(9, vec![0xEE; 0x1000]);
        let mut buf = [0u8; 15];
        let r = read_linear(PG, 0, 0, 0x1000, 0x0040_3ff8, X, &mut buf, &mut |g| m.read(g), &mut |g, d| {
            read_bytes(&frames, g, d)
        });
        assert_eq!(r, Ok(()));
        assert_eq!(buf, [0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF, 0xEE, 0xEE, 0xEE, 0xEE, 0xEE, 0xEE, 0xEE]);
        // The second page absent: #PF at its first byte, with the access.
        let m = mem32(0x7, 0x7);
        let r = read_linear(PG, CR4_SMEP, 0, 0x1000, 0x0040_3ff8, UX, &mut buf, &mut |g| m.read(g), &mut |g, d| {
            read_bytes(&frames, g, d)
        });
        assert_eq!(r, Err(WalkError::PageFault { error_code: PF_USER | PF_FETCH, address: 0x0040_4000 }));
        // A frame that is not memory.
        let mut m = mem32(0x7, 0x7);
        m.set32(0x2000 + 4 * 4, 0xA000 | 0x7);
        let r = read_linear(PG, 0, 0, 0x1000, 0x0040_3ff8, R, &mut buf, &mut |g| m.read(g), &mut |g, d| {
            read_bytes(&frames, g, d)
        });
        assert_eq!(r, Err(WalkError::NotMemory { gpa: 0xA000 }));
        // Inside one page: a single read; an empty buffer reads nothing.
        let mut one = [0u8; 4];
        let mut calls = 0;
        let r = read_linear(PG, 0, 0, 0x1000, 0x0040_3010, R, &mut one, &mut |g| m.read(g), &mut |g, d| {
            calls += 1;
            read_bytes(&frames, g, d)
        });
        assert_eq!((r, one, calls), (Ok(()), [0x10, 0x11, 0x12, 0x13], 1));
        let r = read_linear(PG, 0, 0, 0x1000, 0xdead_0000, R, &mut [], &mut |_| None, &mut |_, _| None);
        assert_eq!(r, Ok(()));
        // Paging off: across a page, identity.
        frames.insert(8, vec![0; 0x1000]);
        let mut two = [0u8; 2];
        let r = read_linear(0, 0, 0, 0, 0x7fff, R, &mut two, &mut |_| None, &mut |g, d| read_bytes(&frames, g, d));
        assert_eq!((r, two), (Ok(()), [0xFF, 0x00]));
    }
}

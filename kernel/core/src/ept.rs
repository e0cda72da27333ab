//! Intel EPT paging structures (SDM Vol. 3C 29.3 "The extended
//! page-table mechanism"): four levels of 512 eight-byte entries, PML4 ->
//! PDPT -> PD -> PT, in frames from the [`FrameAllocator`], reached through
//! [`PhysMem`]. Everything Intel-specific about guest-physical translation
//! is in this file; the rest of the core uses the [`Stage2`] trait.

use crate::frame::FrameAllocator;
use crate::phys::{PhysAddr, PhysMem};
use crate::stage2::{Leaf, MapError, Perms, Stage2};
use core::ops::Range;

bitflags::bitflags! {
    /// The flag bits of an EPT entry (SDM 29.3.2, tables 29-1 to 29-6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EptFlags: u64 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        /// Execute (supervisor execute when mode-based control is on).
        const EXEC = 1 << 2;
        /// Memory type, bits 5:3, leaves only (SDM 29.3.7).
        const MEMTYPE = 7 << 3;
        /// Ignore the guest's PAT memory type (leaves only).
        const IGNORE_PAT = 1 << 6;
        /// In a PDPTE or PDE: this entry maps 1 GiB or 2 MiB itself.
        const LARGE = 1 << 7;
        /// Set by the CPU when EPTP bit 6 enables accessed/dirty flags.
        const ACCESSED = 1 << 8;
        /// Leaves only, likewise.
        const DIRTY = 1 << 9;
    }
}

/// Write-back, the memory type for RAM (SDM 29.3.7, 11.3).
pub const MEMTYPE_WB: u64 = 6;
const MEMTYPE_SHIFT: u32 = 3;
/// Physical-address bits 51:12 of an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const RIGHTS: u64 = 0b111;
/// Four levels translate 48 bits of guest-physical address.
pub const GPA_LIMIT: u64 = 1 << 48;
const ENTRIES: usize = 512;

/// The EPT pointer for the VMCS (SDM 24.6.11): memory type WB for the
/// paging structures, page-walk length 4 (encoded as 3 in bits 5:3),
/// optionally accessed/dirty flags (bit 6), and the PML4 frame.
pub fn eptp(pml4: PhysAddr, accessed_dirty: bool) -> u64 {
    debug_assert!(pml4.is_page_aligned());
    pml4.0 | MEMTYPE_WB | (3 << 3) | ((accessed_dirty as u64) << 6)
}

/// Bits 2:0 say whether an entry is present (SDM 29.3.2: an entry is
/// "not present" when bits 2:0 are all 0; we never use mode-based execute).
fn present(e: u64) -> bool {
    e & RIGHTS != 0
}

fn is_leaf(e: u64, level: u32) -> bool {
    level == 1 || e & EptFlags::LARGE.bits() != 0
}

/// Bits of the guest-physical address below an entry at `level` (1 = PT).
const fn shift(level: u32) -> u32 {
    12 + 9 * (level - 1)
}

const fn span(level: u32) -> u64 {
    1 << shift(level)
}

fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> shift(level)) as usize) & (ENTRIES - 1)
}

fn rights(perms: Perms) -> u64 {
    let mut r = 0;
    if perms.contains(Perms::READ) {
        r |= EptFlags::READ.bits();
    }
    if perms.contains(Perms::WRITE) {
        r |= EptFlags::WRITE.bits();
    }
    if perms.contains(Perms::EXEC) {
        r |= EptFlags::EXEC.bits();
    }
    r
}

fn perms_of(e: u64) -> Perms {
    let f = EptFlags::from_bits_truncate(e);
    let mut p = Perms::empty();
    p.set(Perms::READ, f.contains(EptFlags::READ));
    p.set(Perms::WRITE, f.contains(EptFlags::WRITE));
    p.set(Perms::EXEC, f.contains(EptFlags::EXEC));
    p
}

/// A non-leaf entry: all rights, so the leaf alone decides (rights are
/// ANDed down the walk, SDM 29.3.3.2).
fn table_entry(table: PhysAddr) -> u64 {
    table.0 | RIGHTS
}

/// A leaf for RAM: write-back, guest PAT ignored (as KVM does for RAM
/// without non-coherent DMA), so the guest cannot make its RAM uncached.
pub fn leaf_entry(hpa: PhysAddr, perms: Perms, large: bool) -> u64 {
    // Write without read is a misconfiguration (SDM 29.3.3.1).
    debug_assert!(!perms.contains(Perms::WRITE) || perms.contains(Perms::READ));
    let large = if large { EptFlags::LARGE.bits() } else { 0 };
    hpa.0 | rights(perms) | (MEMTYPE_WB << MEMTYPE_SHIFT) | EptFlags::IGNORE_PAT.bits() | large
}

/// What a range operation does to a leaf entry.
#[derive(Clone, Copy)]
enum RangeOp {
    Unmap,
    Protect(Perms),
}

impl RangeOp {
    fn apply(self, e: u64) -> u64 {
        match self {
            RangeOp::Unmap => 0,
            RangeOp::Protect(keep) => {
                let mut r = e & rights(keep);
                if r & EptFlags::READ.bits() == 0 {
                    r &= !EptFlags::WRITE.bits(); // never leave write-only
                }
                if r == 0 {
                    0
                } else {
                    (e & !RIGHTS) | r
                }
            }
        }
    }
}

/// One VM's EPT paging structures.
pub struct EptTables {
    pml4: PhysAddr,
    tables: usize,
    /// The EPTP enables accessed/dirty flags (bit 6, SDM 29.3.5).
    accessed_dirty: bool,
}

impl EptTables {
    /// The EPTP value for these tables.
    pub fn eptp(&self, accessed_dirty: bool) -> u64 {
        eptp(self.pml4, accessed_dirty)
    }

    /// The raw entry that translates `gpa` and the level it sits at.
    pub fn raw_entry<M: PhysMem>(&self, mem: &M, gpa: u64) -> Option<(u64, u32)> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let mut table = self.pml4;
        for level in (1..=4).rev() {
            let e = mem.table_mut(table)[index(gpa, level)];
            if !present(e) {
                return None;
            }
            if is_leaf(e, level) {
                return Some((e, level));
            }
            table = PhysAddr(e & ADDR_MASK);
        }
        unreachable!("level 1 entries are leaves")
    }

    /// The 4 KiB leaf slot that translates `gpa`, present or not, if the
    /// walk reaches a page table: `Err(true)` when a large leaf maps it
    /// instead, `Err(false)` when a table on the way is missing (or `gpa` is
    /// out of range). One walk, no recursion: the common case of the
    /// single-page operations of every merge and every look.
    #[allow(clippy::mut_from_ref)]
    fn slot_4k<'m, M: PhysMem>(&self, mem: &'m M, gpa: u64) -> Result<&'m mut u64, bool> {
        let pt = self.table_of_4k(mem, gpa)?;
        Ok(&mut mem.table_mut(pt)[index(gpa, 1)])
    }

    /// The page table holding `gpa`'s 4 KiB entry; the errors of
    /// [`Self::slot_4k`].
    #[inline]
    fn table_of_4k<M: PhysMem>(&self, mem: &M, gpa: u64) -> Result<PhysAddr, bool> {
        if gpa >= GPA_LIMIT {
            return Err(false);
        }
        let mut table = self.pml4;
        for level in (2..=4).rev() {
            let e = mem.table_mut(table)[index(gpa, level)];
            if !present(e) {
                return Err(false);
            }
            if is_leaf(e, level) {
                return Err(true);
            }
            table = PhysAddr(e & ADDR_MASK);
        }
        Ok(table)
    }

    /// `op` on the range: one walk for a single page mapped by a 4 KiB
    /// leaf (or not mapped), the general walk otherwise (large leaves may
    /// have to be split).
    fn apply_range<M: PhysMem>(&mut self, mem: &M, frames: &mut FrameAllocator, range: Range<u64>, op: RangeOp) -> usize {
        let r = Self::check_range(&range);
        if r.end.saturating_sub(r.start) == span(1) {
            match self.slot_4k(mem, r.start) {
                Ok(slot) if !present(*slot) => return 0,
                Ok(slot) => {
                    let new = op.apply(*slot);
                    let changed = new != *slot;
                    *slot = new;
                    return changed as usize;
                }
                Err(false) => return 0,
                Err(true) => {} // a large leaf: split by the general walk
            }
        }
        let root = self.pml4;
        self.range_op(mem, frames, root, 4, 0, &r, op)
    }

    fn alloc_table<M: PhysMem>(&mut self, mem: &M, frames: &mut FrameAllocator) -> Result<PhysAddr, MapError> {
        let t = frames.alloc().ok_or(MapError::OutOfFrames)?;
        mem.zero_page(t);
        self.tables += 1;
        Ok(t)
    }

    /// A table at `level - 1` whose 512 entries together translate exactly
    /// what the large leaf `e` at `level` did (same rights, memory type and
    /// A/D bits).
    fn split<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        e: u64,
        level: u32,
    ) -> Result<PhysAddr, MapError> {
        let t = self.alloc_table(mem, frames)?;
        let child = level - 1;
        let large = if child > 1 { EptFlags::LARGE.bits() } else { 0 };
        let keep = e & !ADDR_MASK & !EptFlags::LARGE.bits();
        let base = e & ADDR_MASK;
        let tab = mem.table_mut(t);
        for (k, slot) in tab.iter_mut().enumerate() {
            *slot = (base + k as u64 * span(child)) | keep | large;
        }
        Ok(t)
    }

    /// The table at `target` level on the way to `gpa`, creating missing
    /// tables and splitting large leaves above it.
    fn walk_create<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        gpa: u64,
        target: u32,
    ) -> Result<PhysAddr, MapError> {
        let mut table = self.pml4;
        for level in (target + 1..=4).rev() {
            let i = index(gpa, level);
            let e = mem.table_mut(table)[i];
            table = if !present(e) {
                let t = self.alloc_table(mem, frames)?;
                mem.table_mut(table)[i] = table_entry(t);
                t
            } else if is_leaf(e, level) {
                let t = self.split(mem, frames, e, level)?;
                mem.table_mut(table)[i] = table_entry(t);
                t
            } else {
                PhysAddr(e & ADDR_MASK)
            };
        }
        Ok(table)
    }

    fn free_subtree<M: PhysMem>(&mut self, mem: &M, frames: &mut FrameAllocator, table: PhysAddr, level: u32) {
        if level > 1 {
            for i in 0..ENTRIES {
                let e = mem.table_mut(table)[i];
                if present(e) && !is_leaf(e, level) {
                    self.free_subtree(mem, frames, PhysAddr(e & ADDR_MASK), level - 1);
                }
            }
        }
        frames.free(table).expect("EPT table frame was allocated by us");
        self.tables -= 1;
    }

    /// Applies `op` to the leaves of `table` (at `level`, translating from
    /// `base`) that overlap `range`; returns how many present entries
    /// changed.
    #[allow(clippy::too_many_arguments)]
    fn range_op<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        table: PhysAddr,
        level: u32,
        base: u64,
        range: &Range<u64>,
        op: RangeOp,
    ) -> usize {
        let sp = span(level);
        let end = range.end.min(base + sp * ENTRIES as u64);
        let mut lo = base + (range.start.max(base) - base) / sp * sp;
        let mut changed = 0;
        while lo < end {
            let i = ((lo - base) / sp) as usize;
            let hi = lo + sp;
            let e = mem.table_mut(table)[i];
            if present(e) {
                if !is_leaf(e, level) {
                    changed += self.range_op(mem, frames, PhysAddr(e & ADDR_MASK), level - 1, lo, range, op);
                } else if range.start <= lo && hi <= range.end {
                    let new = op.apply(e);
                    if new != e {
                        mem.table_mut(table)[i] = new;
                        changed += 1;
                    }
                } else {
                    // Part of a large mapping changes: split it, or if no
                    // frame is left for the table, drop all of it (the guest
                    // faults the rest back in at 4 KiB).
                    match self.split(mem, frames, e, level) {
                        Ok(t) => {
                            mem.table_mut(table)[i] = table_entry(t);
                            changed += self.range_op(mem, frames, t, level - 1, lo, range, op);
                        }
                        Err(_) => {
                            mem.table_mut(table)[i] = 0;
                            changed += 1;
                        }
                    }
                }
            }
            lo = hi;
        }
        changed
    }

    fn check_range(range: &Range<u64>) -> Range<u64> {
        debug_assert!(range.start.is_multiple_of(4096) && range.end.is_multiple_of(4096), "unaligned range {range:#x?}");
        range.start.min(GPA_LIMIT)..range.end.min(GPA_LIMIT)
    }
}

impl Stage2 for EptTables {
    fn new<M: PhysMem>(mem: &M, frames: &mut FrameAllocator) -> Result<Self, MapError> {
        let mut t = EptTables { pml4: PhysAddr(0), tables: 0, accessed_dirty: false };
        t.pml4 = t.alloc_table(mem, frames)?;
        Ok(t)
    }

    fn map_4k<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        gpa: u64,
        hpa: PhysAddr,
        perms: Perms,
    ) -> Result<Option<Leaf>, MapError> {
        if gpa >= GPA_LIMIT {
            return Err(MapError::OutOfRange);
        }
        if !gpa.is_multiple_of(span(1)) || !hpa.is_page_aligned() {
            return Err(MapError::Unaligned);
        }
        let old = self.lookup(mem, gpa);
        // The same frame again (rights given back after a write-protect
        // fault): keep its accessed and dirty flags, so a guest write the
        // dirty flag recorded is not forgotten.
        let keep = match self.raw_entry(mem, gpa) {
            Some((e, 1)) if e & ADDR_MASK == hpa.0 => e & (EptFlags::ACCESSED | EptFlags::DIRTY).bits(),
            _ => 0,
        };
        let t = self.walk_create(mem, frames, gpa, 1)?;
        mem.table_mut(t)[index(gpa, 1)] = leaf_entry(hpa, perms, false) | keep;
        Ok(old)
    }

    fn map_2m<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        gpa: u64,
        hpa: PhysAddr,
        perms: Perms,
    ) -> Result<(), MapError> {
        if gpa >= GPA_LIMIT {
            return Err(MapError::OutOfRange);
        }
        if !gpa.is_multiple_of(span(2)) || !hpa.0.is_multiple_of(span(2)) {
            return Err(MapError::Unaligned);
        }
        let t = self.walk_create(mem, frames, gpa, 2)?;
        let i = index(gpa, 2);
        let old = mem.table_mut(t)[i];
        if present(old) && !is_leaf(old, 2) {
            self.free_subtree(mem, frames, PhysAddr(old & ADDR_MASK), 1);
        }
        mem.table_mut(t)[i] = leaf_entry(hpa, perms, true);
        Ok(())
    }

    fn replace_if_present<M: PhysMem>(&mut self, mem: &M, gpa: u64, hpa: PhysAddr, perms: Perms) -> Option<Leaf> {
        let slot = self.slot_4k(mem, gpa).ok()?;
        let e = *slot;
        if !present(e) {
            return None;
        }
        *slot = leaf_entry(hpa, perms, false);
        Some(Leaf { hpa: PhysAddr(e & ADDR_MASK), perms: perms_of(e), size: span(1) })
    }

    fn unmap_range<M: PhysMem>(&mut self, mem: &M, frames: &mut FrameAllocator, range: Range<u64>) -> usize {
        self.apply_range(mem, frames, range, RangeOp::Unmap)
    }

    fn protect_range<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        range: Range<u64>,
        keep: Perms,
    ) -> usize {
        self.apply_range(mem, frames, range, RangeOp::Protect(keep))
    }

    fn lookup<M: PhysMem>(&self, mem: &M, gpa: u64) -> Option<Leaf> {
        let (e, level) = self.raw_entry(mem, gpa)?;
        let offset = gpa & (span(level) - 1) & !(span(1) - 1);
        Some(Leaf { hpa: PhysAddr((e & ADDR_MASK) + offset), perms: perms_of(e), size: span(level) })
    }

    fn enable_accessed_dirty(&mut self) -> bool {
        self.accessed_dirty = true;
        true
    }

    fn accessed_dirty(&self) -> bool {
        self.accessed_dirty
    }

    fn prefetch_entry<M: PhysMem>(&self, mem: &M, gpa: u64) {
        if let Ok(pt) = self.table_of_4k(mem, gpa) {
            crate::prefetch::prefetch(&mem.table_mut(pt)[index(gpa, 1)]);
        }
    }

    /// SDM 29.3.5: with EPTP bit 6 set, the processor sets bit 9 (dirty)
    /// of the leaf that maps a page on every guest write to it. Software
    /// may clear it, but a translation cached in the TLB with the flag set
    /// lets later writes go by without setting it again, so the caller
    /// must INVEPT (single-context) before it relies on the flag (SDM
    /// 29.4.3.4, "clearing bit 9 ... if accessed and dirty flags for EPT
    /// will be enabled").
    fn test_and_clear_dirty<M: PhysMem>(&mut self, mem: &M, gpa: u64) -> Option<bool> {
        if !self.accessed_dirty {
            return None;
        }
        // Absent, or a large page: no per-page flag.
        let slot = self.slot_4k(mem, gpa).ok()?;
        if !present(*slot) {
            return None;
        }
        let dirty = *slot & EptFlags::DIRTY.bits() != 0;
        if dirty {
            // A locked AND, as the processor sets the flags with locked
            // operations (SDM 29.3.5) and a plain store could lose one set
            // by a vCPU running at the same time.
            // SAFETY: `slot` is a valid, aligned u64 of a table we own.
            let a = unsafe { &*(slot as *mut u64 as *const core::sync::atomic::AtomicU64) };
            a.fetch_and(!EptFlags::DIRTY.bits(), core::sync::atomic::Ordering::SeqCst);
        }
        Some(dirty)
    }

    /// SDM 29.3.5: the accessed flag of every entry used by the walk, and
    /// for a write the dirty flag of the entry that maps the page.
    fn hw_access<M: PhysMem>(&mut self, mem: &M, gpa: u64, write: bool) -> bool {
        if !self.accessed_dirty || gpa >= GPA_LIMIT {
            return false;
        }
        let mut table = self.pml4;
        for level in (1..=4).rev() {
            let t = mem.table_mut(table);
            let i = index(gpa, level);
            let e = t[i];
            if !present(e) {
                return false;
            }
            t[i] |= EptFlags::ACCESSED.bits();
            if is_leaf(e, level) {
                if write {
                    t[i] |= EptFlags::DIRTY.bits();
                }
                return t[i] & EptFlags::DIRTY.bits() != 0;
            }
            table = PhysAddr(e & ADDR_MASK);
        }
        false
    }

    fn destroy<M: PhysMem>(mut self, mem: &M, frames: &mut FrameAllocator) {
        let root = self.pml4;
        self.free_subtree(mem, frames, root, 4);
        debug_assert_eq!(self.tables, 0);
    }

    fn root(&self) -> PhysAddr {
        self.pml4
    }

    fn table_frames(&self) -> usize {
        self.tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::Arena;

    const MB2: u64 = 2 << 20;

    fn setup(frames: usize) -> (Arena, FrameAllocator) {
        // 2 MiB-aligned base so 2 MiB mappings of arena frames are possible.
        let a = Arena::new(64 * MB2, frames);
        let fa = FrameAllocator::new([a.range()]);
        (a, fa)
    }

    #[test]
    fn eptp_encodes_wb_walk_length_and_ad() {
        let root = PhysAddr(0x1234_5000);
        assert_eq!(eptp(root, false), 0x1234_5000 | 6 | (3 << 3));
        assert_eq!(eptp(root, true), 0x1234_5000 | 6 | (3 << 3) | (1 << 6));
    }

    #[test]
    fn leaf_format_has_rights_wb_and_ipat() {
        let e = leaf_entry(PhysAddr(0xabc000), Perms::RX, false);
        assert_eq!(e & 7, 0b101);
        assert_eq!((e >> 3) & 7, 6);
        assert_ne!(e & (1 << 6), 0);
        assert_eq!(e & (1 << 7), 0);
        assert_eq!(e & ADDR_MASK, 0xabc000);
        assert_ne!(leaf_entry(PhysAddr(0x20_0000), Perms::RWX, true) & (1 << 7), 0);
    }

    #[test]
    fn map_lookup_unmap_4k() {
        let (m, mut fa) = setup(64);
        let free0 = fa.free_frames();
        let mut t = EptTables::new(&m, &mut fa).unwrap();
        let f = fa.alloc().unwrap();
        let gpa = 0x1_2345_6000;
        assert_eq!(t.lookup(&m, gpa), None);
        assert_eq!(t.map_4k(&m, &mut fa, gpa, f, Perms::RWX), Ok(None));
        assert_eq!(t.table_frames(), 4, "PML4, PDPT, PD, PT");
        let l = t.lookup(&m, gpa).unwrap();
        assert_eq!(l, Leaf { hpa: f, perms: Perms::RWX, size: 4096 });
        assert_eq!(t.lookup(&m, gpa + 4096), None);
        assert_eq!(t.lookup(&m, gpa - 4096), None);
        // The raw walk finds the leaf at level 1 with the address in 51:12.
        let (e, level) = t.raw_entry(&m, gpa).unwrap();
        assert_eq!((e & ADDR_MASK, level), (f.0, 1));
        // Remapping returns the old leaf.
        let g = fa.alloc().unwrap();
        assert_eq!(t.map_4k(&m, &mut fa, gpa, g, Perms::RX).unwrap(), Some(l));
        assert_eq!(t.unmap_range(&m, &mut fa, gpa..gpa + 4096), 1);
        assert_eq!(t.lookup(&m, gpa), None);
        assert_eq!(t.unmap_range(&m, &mut fa, gpa..gpa + 4096), 0, "nothing live any more");
        t.destroy(&m, &mut fa);
        fa.free(f).unwrap();
        fa.free(g).unwrap();
        assert_eq!(fa.free_frames(), free0);
    }

    #[test]
    fn protect_write_protects_and_restores() {
        let (m, mut fa) = setup(64);
        let mut t = EptTables::new(&m, &mut fa).unwrap();
        let f = fa.alloc().unwrap();
        for k in 0..4 {
            t.map_4k(&m, &mut fa, k * 4096, f, Perms::RWX).unwrap();
        }
        assert_eq!(t.protect_range(&m, &mut fa, 4096..3 * 4096, Perms::RX), 2);
        assert_eq!(t.lookup(&m, 0).unwrap().perms, Perms::RWX);
        assert_eq!(t.lookup(&m, 4096).unwrap().perms, Perms::RX);
        assert_eq!(t.lookup(&m, 2 * 4096).unwrap().perms, Perms::RX);
        assert_eq!(t.lookup(&m, 3 * 4096).unwrap().perms, Perms::RWX);
        // Already read-only: nothing changes, so no flush would be needed.
        assert_eq!(t.protect_range(&m, &mut fa, 4096..3 * 4096, Perms::RX), 0);
        // Taking read away removes write too; no rights left = not present.
        assert_eq!(t.protect_range(&m, &mut fa, 0..4096, Perms::WRITE | Perms::EXEC), 1);
        assert_eq!(t.lookup(&m, 0).unwrap().perms, Perms::EXEC);
        assert_eq!(t.protect_range(&m, &mut fa, 0..4096, Perms::READ), 1);
        assert_eq!(t.lookup(&m, 0), None);
        // replace_if_present only touches present 4 KiB entries.
        let g = fa.alloc().unwrap();
        assert_eq!(t.replace_if_present(&m, 0, g, Perms::RX), None);
        assert_eq!(t.lookup(&m, 0), None);
        let old = t.replace_if_present(&m, 4096, g, Perms::RWX).unwrap();
        assert_eq!((old.hpa, old.perms), (f, Perms::RX));
        assert_eq!(t.lookup(&m, 4096).unwrap(), Leaf { hpa: g, perms: Perms::RWX, size: 4096 });
        assert_eq!(t.replace_if_present(&m, 1 << 40, g, Perms::RX), None);
        t.destroy(&m, &mut fa);
    }

    #[test]
    fn large_pages_translate_and_split_when_part_changes() {
        let (m, mut fa) = setup(1024);
        let free0 = fa.free_frames();
        let mut t = EptTables::new(&m, &mut fa).unwrap();
        let gpa = 3 * MB2;
        let hpa = PhysAddr(65 * MB2); // inside the arena, 2 MiB-aligned
        assert_eq!(t.map_2m(&m, &mut fa, gpa + 4096, hpa, Perms::RWX), Err(MapError::Unaligned));
        t.map_2m(&m, &mut fa, gpa, hpa, Perms::RWX).unwrap();
        assert_eq!(t.table_frames(), 3, "no PT for a 2 MiB leaf");
        let l = t.lookup(&m, gpa + 5 * 4096).unwrap();
        assert_eq!(l, Leaf { hpa: PhysAddr(hpa.0 + 5 * 4096), perms: Perms::RWX, size: MB2 });
        // Protecting all of it keeps it large.
        assert_eq!(t.protect_range(&m, &mut fa, gpa..gpa + MB2, Perms::RX), 1);
        assert_eq!(t.lookup(&m, gpa).unwrap().size, MB2);
        t.protect_range(&m, &mut fa, gpa..gpa + MB2, Perms::RWX); // can't add rights
        assert_eq!(t.lookup(&m, gpa).unwrap().perms, Perms::RX);
        t.map_2m(&m, &mut fa, gpa, hpa, Perms::RWX).unwrap();

        // Remapping one 4 KiB page splits it into 512 entries; the other 511
        // keep their translation.
        let f = fa.alloc().unwrap();
        t.map_4k(&m, &mut fa, gpa + 7 * 4096, f, Perms::RX).unwrap();
        assert_eq!(t.table_frames(), 4);
        for k in 0..512u64 {
            let l = t.lookup(&m, gpa + k * 4096).unwrap();
            assert_eq!(l.size, 4096);
            if k == 7 {
                assert_eq!((l.hpa, l.perms), (f, Perms::RX));
            } else {
                assert_eq!((l.hpa, l.perms), (PhysAddr(hpa.0 + k * 4096), Perms::RWX));
            }
        }
        // Mapping 2 MiB over the split range frees the page table again.
        t.map_2m(&m, &mut fa, gpa, hpa, Perms::RWX).unwrap();
        assert_eq!(t.table_frames(), 3);
        // Unmapping part of a large page splits it, the rest stays.
        assert_eq!(t.unmap_range(&m, &mut fa, gpa + MB2 - 8192..gpa + MB2 + 8192), 2);
        assert_eq!(t.lookup(&m, gpa + MB2 - 8192), None);
        assert_eq!(t.lookup(&m, gpa + MB2 - 3 * 4096).unwrap().hpa, PhysAddr(hpa.0 + MB2 - 3 * 4096));
        // Write-protect part of a large page.
        t.map_2m(&m, &mut fa, gpa + MB2, PhysAddr(hpa.0 + MB2), Perms::RWX).unwrap();
        assert_eq!(t.protect_range(&m, &mut fa, gpa + MB2..gpa + MB2 + 4096, Perms::RX), 1);
        assert_eq!(t.lookup(&m, gpa + MB2).unwrap().perms, Perms::RX);
        assert_eq!(t.lookup(&m, gpa + MB2 + 4096).unwrap().perms, Perms::RWX);
        t.destroy(&m, &mut fa);
        fa.free(f).unwrap();
        assert_eq!(fa.free_frames(), free0, "every table frame freed");
    }

    #[test]
    fn split_without_a_frame_drops_the_large_mapping() {
        let (m, mut fa) = setup(8);
        let mut t = EptTables::new(&m, &mut fa).unwrap();
        t.map_2m(&m, &mut fa, 0, PhysAddr(64 * MB2), Perms::RWX).unwrap();
        let mut hoard = alloc::vec::Vec::new();
        while let Some(f) = fa.alloc() {
            hoard.push(f);
        }
        assert_eq!(t.protect_range(&m, &mut fa, 0..4096, Perms::RX), 1);
        assert_eq!(t.lookup(&m, 8192), None, "whole 2 MiB gone rather than half-changed");
        // Mapping needs tables too and fails cleanly.
        assert_eq!(t.map_4k(&m, &mut fa, 1 << 39, hoard[0], Perms::RWX), Err(MapError::OutOfFrames));
        assert_eq!(t.map_4k(&m, &mut fa, GPA_LIMIT, hoard[0], Perms::RWX), Err(MapError::OutOfRange));
        for f in hoard {
            fa.free(f).unwrap();
        }
        t.destroy(&m, &mut fa);
        assert_eq!(fa.free_frames(), 8);
    }

    #[test]
    fn dirty_flags_set_by_writes_cleared_by_software_kept_by_protect() {
        let (m, mut fa) = setup(64);
        let mut t = EptTables::new(&m, &mut fa).unwrap();
        let f = fa.alloc().unwrap();
        t.map_4k(&m, &mut fa, 0, f, Perms::RWX).unwrap();
        // Without A/D (EPTP bit 6 clear) the processor sets nothing.
        assert!(!t.accessed_dirty());
        assert!(!t.hw_access(&m, 0, true));
        assert_eq!(t.test_and_clear_dirty(&m, 0), None);
        assert_eq!(t.raw_entry(&m, 0).unwrap().0 & (3 << 8), 0);
        assert!(t.enable_accessed_dirty());
        // A read sets accessed along the walk, a write also dirty (leaf).
        assert!(!t.hw_access(&m, 0, false));
        let (e, _) = t.raw_entry(&m, 0).unwrap();
        assert_eq!(e & (3 << 8), EptFlags::ACCESSED.bits());
        assert_ne!(m.table_mut(t.root())[0] & EptFlags::ACCESSED.bits(), 0, "PML4E accessed");
        assert!(t.hw_access(&m, 0, true));
        assert_eq!(t.test_and_clear_dirty(&m, 0), Some(true));
        assert_eq!(t.test_and_clear_dirty(&m, 0), Some(false));
        assert_ne!(t.raw_entry(&m, 0).unwrap().0 & EptFlags::ACCESSED.bits(), 0, "only dirty is cleared");
        // Write-protection keeps the flag; giving the rights back to the
        // same frame keeps it too; a new frame starts clean.
        t.hw_access(&m, 0, true);
        assert_eq!(t.protect_range(&m, &mut fa, 0..4096, Perms::RX), 1);
        assert_eq!(t.map_4k(&m, &mut fa, 0, f, Perms::RWX).unwrap().unwrap().perms, Perms::RX);
        assert_eq!(t.test_and_clear_dirty(&m, 0), Some(true));
        t.hw_access(&m, 0, true);
        let g = fa.alloc().unwrap();
        t.map_4k(&m, &mut fa, 0, g, Perms::RWX).unwrap();
        assert_eq!(t.test_and_clear_dirty(&m, 0), Some(false));
        t.hw_access(&m, 0, true);
        t.replace_if_present(&m, 0, f, Perms::RX);
        assert_eq!(t.test_and_clear_dirty(&m, 0), Some(false));
        // Not mapped, or mapped by a large page: cannot tell.
        assert_eq!(t.test_and_clear_dirty(&m, 4096), None);
        t.map_2m(&m, &mut fa, MB2, PhysAddr(64 * MB2), Perms::RWX).unwrap();
        assert!(t.hw_access(&m, MB2 + 4096, true), "the large leaf takes the flag");
        assert_eq!(t.test_and_clear_dirty(&m, MB2 + 4096), None);
        t.destroy(&m, &mut fa);
    }

    /// The one-walk path for single pages does what the general walk does
    /// on every kind of entry: a 4 KiB leaf, a hole in a table, no table at
    /// all, a page inside a large leaf (split), out of range; its prefetch
    /// of an entry changes nothing on any of them.
    #[test]
    fn single_page_ops_match_the_general_walk() {
        let (m, mut fa) = setup(4096);
        let f = fa.alloc().unwrap();
        let build = |fa: &mut FrameAllocator| {
            let mut t = EptTables::new(&m, fa).unwrap();
            for k in [0u64, 1, 3, 511] {
                t.map_4k(&m, fa, k * 4096, f, Perms::RWX).unwrap();
            }
            t.map_2m(&m, fa, MB2, PhysAddr(65 * MB2), Perms::RWX).unwrap();
            t
        };
        let (mut fast, mut slow) = (build(&mut fa), build(&mut fa));
        let pages = [0u64, 1, 2, 3, 511, 512, 513, 1023, 1024, 1 << 27, (GPA_LIMIT >> 12) - 1];
        let ops = [RangeOp::Protect(Perms::RX), RangeOp::Protect(Perms::READ), RangeOp::Unmap, RangeOp::Protect(Perms::RX)];
        for op in ops {
            for &p in &pages {
                let r = p * 4096..(p + 1) * 4096;
                // A prefetch of the entry first: a hint that changes
                // nothing (the lookups below compare) and never panics.
                fast.prefetch_entry(&m, r.start);
                let a = fast.apply_range(&m, &mut fa, r.clone(), op);
                let root = slow.pml4;
                let b = slow.range_op(&m, &mut fa, root, 4, 0, &r, op);
                assert_eq!(a, b, "changed count for page {p:#x}");
                for q in pages.iter().flat_map(|&q| [q.saturating_sub(1), q, q + 1]) {
                    assert_eq!(fast.lookup(&m, q * 4096), slow.lookup(&m, q * 4096), "page {q:#x} after page {p:#x}");
                }
            }
        }
        fast.prefetch_entry(&m, GPA_LIMIT);
        fast.prefetch_entry(&m, !0xfff);
        assert_eq!(fast.table_frames(), slow.table_frames(), "the split happened once on both");
        fast.destroy(&m, &mut fa);
        slow.destroy(&m, &mut fa);
    }

    #[test]
    fn ranges_skip_holes_and_cross_tables() {
        let (m, mut fa) = setup(64);
        let mut t = EptTables::new(&m, &mut fa).unwrap();
        let f = fa.alloc().unwrap();
        let pages = [0u64, MB2 - 4096, MB2, 1 << 30, (1 << 39) + 4096];
        for &p in &pages {
            t.map_4k(&m, &mut fa, p, f, Perms::RWX).unwrap();
        }
        assert_eq!(t.protect_range(&m, &mut fa, 0..1 << 40, Perms::RX), 5);
        assert_eq!(t.unmap_range(&m, &mut fa, 4096..(1 << 39) + 8192), 4);
        assert!(t.lookup(&m, 0).is_some());
        for &p in &pages[1..] {
            assert_eq!(t.lookup(&m, p), None);
        }
        t.destroy(&m, &mut fa);
        fa.free(f).unwrap();
        assert_eq!(fa.free_frames(), 64);
    }
}

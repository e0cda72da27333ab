//! A simulated guest CPU for tests and benchmarks: it reads and writes
//! guest memory the way the processor does, through the VM's second-stage
//! tables, and takes an EPT violation (calls the page manager) whenever a
//! translation is missing or lacks the right, then tries again.
//!
//! When the tables keep accessed/dirty flags (EPTP bit 6), each access
//! sets them as the processor does (SDM 29.3.5): the accessed flag on
//! every entry of the walk, and for a write the dirty flag of the leaf.
//! The TLB is modelled only as far as the dirty flag needs it, in the
//! worst case the SDM allows (29.4.3.4): once a translation with the
//! dirty flag set is cached, later writes through it do not set the flag
//! again until the VM's TLB is flushed (INVEPT) or the page faults.

use crate::page_manager::{Access, Outcome, PageManager, VmId};
use crate::phys::{PhysAddr, PhysMem, PAGE_SHIFT, PAGE_SIZE};
use crate::stage2::Stage2;
use alloc::collections::BTreeSet;

/// One vCPU's view of guest memory.
#[derive(Debug)]
pub struct SimGuest {
    pub vm: VmId,
    /// EPT violations this vCPU took.
    pub violations: u64,
    /// Guest frames whose cached translation says "dirty": a write to them
    /// leaves the dirty flag in the tables alone.
    tlb_dirty: BTreeSet<u64>,
    /// The VM's flush count when `tlb_dirty` was last emptied.
    tlb_epoch: u64,
}

impl SimGuest {
    pub fn new(vm: VmId) -> SimGuest {
        SimGuest { vm, violations: 0, tlb_dirty: BTreeSet::new(), tlb_epoch: 0 }
    }

    /// The processor's accessed/dirty updates for an access the tables
    /// allowed, through the modelled TLB.
    fn access_flags<P: PhysMem, S: Stage2>(&mut self, pm: &PageManager<P, S>, gfn: u64, write: bool) {
        let Ok(mmu) = pm.mmu(self.vm) else { return };
        if !mmu.accessed_dirty() {
            return;
        }
        let flushes = mmu.stats().tlb_flushes;
        if flushes != self.tlb_epoch {
            self.tlb_dirty.clear(); // INVEPT dropped every cached translation
            self.tlb_epoch = flushes;
        }
        if write && self.tlb_dirty.contains(&gfn) {
            return; // cached as dirty: the processor need not set it again
        }
        if mmu.hw_access(pm.mem(), gfn, write) {
            self.tlb_dirty.insert(gfn);
        }
    }

    /// The host frame the hardware would use for `access` at `gpa`,
    /// faulting as often as needed (an error after a few tries or when
    /// the page manager gives up). The access counts as done: the
    /// accessed/dirty flags are set as for one.
    pub fn translate<P: PhysMem, S: Stage2>(
        &mut self,
        pm: &mut PageManager<P, S>,
        gpa: u64,
        access: Access,
    ) -> Result<PhysAddr, Outcome> {
        for _ in 0..4 {
            let mmu = pm.mmu(self.vm).map_err(|_| Outcome::OutsideMemory)?;
            if let Some(l) = mmu.lookup(pm.mem(), gpa >> PAGE_SHIFT) {
                if l.perms.contains(access.perms()) {
                    self.access_flags(pm, gpa >> PAGE_SHIFT, access == Access::Write);
                    return Ok(l.hpa);
                }
            }
            // The fault drops what the TLB held for the page; the access
            // walks the tables again.
            self.tlb_dirty.remove(&(gpa >> PAGE_SHIFT));
            self.violations += 1;
            match pm.handle_ept_violation(self.vm, gpa, access) {
                Outcome::Resolved | Outcome::Retry => {}
                o => return Err(o),
            }
        }
        Err(Outcome::Retry)
    }

    pub fn read<P: PhysMem, S: Stage2>(&mut self, pm: &mut PageManager<P, S>, gpa: u64, buf: &mut [u8]) -> Result<(), Outcome> {
        let mut done = 0;
        while done < buf.len() {
            let a = gpa + done as u64;
            let off = a as usize % PAGE_SIZE;
            let n = (PAGE_SIZE - off).min(buf.len() - done);
            let f = self.translate(pm, a, Access::Read)?;
            buf[done..done + n].copy_from_slice(&pm.mem().page(f)[off..off + n]);
            done += n;
        }
        Ok(())
    }

    pub fn write<P: PhysMem, S: Stage2>(&mut self, pm: &mut PageManager<P, S>, gpa: u64, data: &[u8]) -> Result<(), Outcome> {
        let mut done = 0;
        while done < data.len() {
            let a = gpa + done as u64;
            let off = a as usize % PAGE_SIZE;
            let n = (PAGE_SIZE - off).min(data.len() - done);
            let f = self.translate(pm, a, Access::Write)?;
            pm.mem().page_mut(f)[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Fills the page at `gpa` (page-aligned) with `byte`.
    pub fn fill_page<P: PhysMem, S: Stage2>(&mut self, pm: &mut PageManager<P, S>, gpa: u64, byte: u8) -> Result<(), Outcome> {
        self.write(pm, gpa, &[byte; PAGE_SIZE])
    }
}

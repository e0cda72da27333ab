//! A simulated guest CPU for tests and benchmarks: it reads and writes
//! guest memory the way the processor does, through the VM's second-stage
//! tables, and takes an EPT violation (calls the page manager) whenever a
//! translation is missing or lacks the right, then tries again.

use crate::page_manager::{Access, Outcome, PageManager, VmId};
use crate::phys::{PhysAddr, PhysMem, PAGE_SHIFT, PAGE_SIZE};
use crate::stage2::Stage2;

/// One vCPU's view of guest memory.
#[derive(Debug)]
pub struct SimGuest {
    pub vm: VmId,
    /// EPT violations this vCPU took.
    pub violations: u64,
}

impl SimGuest {
    pub fn new(vm: VmId) -> SimGuest {
        SimGuest { vm, violations: 0 }
    }

    /// The host frame the hardware would use for `access` at `gpa`,
    /// faulting as often as needed (an error after a few tries or when
    /// the page manager gives up).
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
                    return Ok(l.hpa);
                }
            }
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

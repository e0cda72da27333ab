//! The page manager: the primary MMU of guest memory.
//!
//! Per VM it keeps memory slots (guest-physical ranges, each flagged
//! mergeable or not) with one small [`PageEntry`] per guest page, saying
//! which host frame backs it. Frames are allocated on first touch. It is
//! the only code that changes a guest's memory map, and every change
//! reaches the VM's second-stage tables through the notifier calls of
//! [`Mmu`] (start / change_pte / end). Merged frames are shared across VMs;
//! their reference counts live in the dedupe engine's stable records
//! ([`crate::dedupe`]), a private frame's count is implicitly one.
//!
//! # Frame quotas
//!
//! Each VM may hold at most [`VmConfig::frame_quota`] frames
//! ([`DEFAULT_FRAME_QUOTA`] unless its config says otherwise). Charged to
//! a VM are the private frames behind its pages (first touch, copy on
//! write, pages written by [`PageManager::write_gpa`]) and the table
//! frames of its second-stage tables (the root from [`PageManager::create_vm`]
//! on, and every table an install creates). Every such allocation is
//! preceded by one compare against the quota, so a VM at its quota takes
//! no frame from the pool: the fault ends in [`Outcome::QuotaExceeded`]
//! (the kernel stops the VM), a hypervisor write in
//! [`PmError::QuotaExceeded`], and the other VMs never notice. Frames
//! given back (discard, teardown, a private page merged away) are
//! uncharged at once.
//!
//! A merged frame (and a zero frame) belongs to the dedupe engine and is
//! charged to no VM: merging lowers the charge of every VM whose private
//! page it replaces, and a copy-on-write break charges the new copy to
//! the writer. What the dedupe holds is still bounded by the VMs' memory
//! slots: every merged frame is mapped by at least one guest page (two
//! when it is made; it is freed with its last), so there are never more
//! merged frames than guest pages mapped to them, and a VM's pages can
//! keep at most as many merged frames alive as its slots have pages.

use crate::dedupe::{DedupeConfig, Ksm};
use crate::ept::EptTables;
use crate::frame::FrameAllocator;
use crate::mmu_notifier::{GfnRange, Install, InvalidateEvent, Mmu, NotifierMode, TlbFlush};
use crate::phys::{PhysAddr, PhysMem, PAGE_SHIFT, PAGE_SIZE};
use crate::stage2::{MapError, Perms, Stage2};
use crate::stats::{self, Stats, VmStats};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// A VM of this page manager (an index; never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(pub u16);

/// The access that caused an EPT violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Exec,
}

impl Access {
    pub fn perms(self) -> Perms {
        match self {
            Access::Read => Perms::READ,
            Access::Write => Perms::WRITE,
            Access::Exec => Perms::EXEC,
        }
    }
}

/// What the kernel does after an EPT violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The translation is there: resume the guest.
    Resolved,
    /// An invalidation raced with the fault: resume the guest, it will
    /// fault again (Linux's RET_PF_RETRY).
    Retry,
    /// The address is in no memory slot (MMIO or a guest bug).
    OutsideMemory,
    /// No host frame for the page or a table: stop this VM.
    OutOfMemory,
    /// The page or a table would take the VM past its frame quota
    /// ([`VmConfig::frame_quota`]): stop this VM. No frame was taken for
    /// what was refused; the host has frames (that is [`Outcome::OutOfMemory`]).
    QuotaExceeded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmError {
    NoSuchVm,
    /// An address is in no memory slot.
    OutsideMemory(u64),
    OutOfMemory,
    /// A slot that is unaligned, empty, too high or overlapping another.
    BadSlot,
    TooManyVms,
    /// The VM would go past its frame quota (a guest image bigger than the
    /// quota, say); nothing was written or allocated.
    QuotaExceeded,
}

/// The frame quota of a VM whose config sets none: 4096 frames, 16 MiB.
/// That is twice what one of the kernel's guests needs (8 MiB of RAM and
/// a handful of EPT tables: one root, and a PDPT, a PD and one page table
/// per 2 MiB below 1 GiB), so a well-behaved guest never meets it.
pub const DEFAULT_FRAME_QUOTA: usize = 4096;

/// How a VM is set up.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub mode: NotifierMode,
    /// For [`crate::dedupe::SharingPolicy::Groups`]: VMs with the same group
    /// name may share frames; a VM with none shares only with itself.
    pub share_group: Option<String>,
    /// Host frames this VM may hold: its private guest frames and its
    /// second-stage table frames (merged frames are charged to no VM; see
    /// the module documentation). [`DEFAULT_FRAME_QUOTA`] by default.
    pub frame_quota: usize,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig { mode: NotifierMode::ChangePte, share_group: None, frame_quota: DEFAULT_FRAME_QUOTA }
    }
}

/// No host frame behind the page yet.
pub(crate) const NO_FRAME: u32 = u32::MAX;
/// The frame is a merged (stable) frame; `aux` is still the content's
/// checksum, by which (with the frame) its record is found.
pub(crate) const F_SHARED: u8 = 1;
/// `aux` holds the page's checksum from the last scan.
pub(crate) const F_CSUM: u8 = 2;
/// The page went into the unstable index (counts in `pages_unshared`
/// until the scanner next looks at it, as in KSM).
pub(crate) const F_UNSTABLE: u8 = 4;
/// Dirty tracking ([`crate::dedupe::DedupeConfig::track_dirty`]): the
/// checksum was recorded with the page's EPT dirty flag cleared, so while
/// the flag stays clear the page is unchanged and the checksum holds.
/// Any hypervisor write to the page drops it (the EPT does not see those).
pub(crate) const F_TRACKED: u8 = 8;

/// What the page manager and the dedupe engine keep per guest page:
/// 8 bytes (Linux's `rmap_item` alone is 64): the host frame, and one
/// 32-bit word with the flags in its low 4 bits and above them the
/// [`PageEntry::aux`] value: the page's 28-bit checksum ([`F_CSUM`],
/// [`crate::dedupe`]'s content hash, which is also its index key, so an
/// unchanged page need not be hashed again; a merged page, [`F_SHARED`],
/// keeps it to find its merged frame's record). 28 bits, where Linux
/// keeps 32 (`rmap_item.oldchecksum`): a checksum only tells a changed
/// page and nominates candidates, the byte compare decides every merge,
/// and the indexes try every entry under a key, so two contents with
/// one checksum cost a compare, never a merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct PageEntry {
    /// Host frame number, or [`NO_FRAME`].
    pub frame: u32,
    word: u32,
}

const _: () = assert!(core::mem::size_of::<PageEntry>() == 8);

const FLAG_BITS: u32 = 4;
const FLAG_MASK: u32 = (1 << FLAG_BITS) - 1;
/// The widest value [`PageEntry::aux`] holds.
pub(crate) const AUX_BITS: u32 = 32 - FLAG_BITS;

impl PageEntry {
    pub const EMPTY: PageEntry = PageEntry::new(NO_FRAME, 0, 0);

    /// `aux` must fit in [`AUX_BITS`], `flags` in the four flag bits.
    pub const fn new(frame: u32, aux: u64, flags: u8) -> PageEntry {
        debug_assert!(aux >> AUX_BITS == 0 && (flags as u32) & !FLAG_MASK == 0);
        PageEntry { frame, word: ((aux as u32) << FLAG_BITS) | (flags as u32 & FLAG_MASK) }
    }
    pub fn flags(&self) -> u8 {
        (self.word & FLAG_MASK) as u8
    }
    pub fn add_flags(&mut self, f: u8) {
        self.word |= f as u32 & FLAG_MASK;
    }
    pub fn clear_flags(&mut self, f: u8) {
        self.word &= !(f as u32 & FLAG_MASK);
    }
    /// The checksum.
    pub fn aux(&self) -> u64 {
        (self.word >> FLAG_BITS) as u64
    }
    pub fn set_aux(&mut self, aux: u64) {
        debug_assert!(aux >> AUX_BITS == 0);
        self.word = ((aux as u32) << FLAG_BITS) | (self.word & FLAG_MASK);
    }
    pub fn pa(&self) -> PhysAddr {
        PhysAddr((self.frame as u64) << PAGE_SHIFT)
    }
    pub fn shared(&self) -> bool {
        self.flags() & F_SHARED != 0
    }
}

pub(crate) fn frame_number(pa: PhysAddr) -> u32 {
    let n = pa.frame_number();
    assert!(n < NO_FRAME as u64, "host frame {:#x} beyond 16 TiB", pa.0);
    n as u32
}

/// A guest-physical range backed by the page manager.
pub(crate) struct MemSlot {
    pub base_gfn: u64,
    pub mergeable: bool,
    pub pages: Vec<PageEntry>,
    /// One bit a page: the guest's fault has installed a translation for
    /// it at least once. Tells a refault (the translation was there and
    /// went) from a first touch of a page merged before the guest came.
    pub faulted_in: Vec<u64>,
}

impl MemSlot {
    fn was_faulted_in(&self, idx: usize) -> bool {
        self.faulted_in[idx / 64] >> (idx % 64) & 1 != 0
    }
    fn mark_faulted_in(&mut self, idx: usize) {
        self.faulted_in[idx / 64] |= 1 << (idx % 64);
    }
}

pub(crate) struct Vm<S: Stage2> {
    pub mmu: Mmu<S>,
    pub slots: Vec<MemSlot>,
    /// Who this VM may share frames with (None: merging off).
    pub domain: Option<u32>,
    /// The scanner trusts the EPT dirty flags of this VM's pages
    /// ([`crate::dedupe::DedupeConfig::track_dirty`], and the tables keep
    /// them).
    pub track_dirty: bool,
    /// Most frames the VM may hold ([`VmConfig::frame_quota`]).
    pub quota: usize,
    /// Pages backed by a private frame (not merged): the part of the
    /// VM's charge that is not its tables. The dedupe engine lowers it
    /// when it merges a private page away.
    pub private_frames: usize,
    pub stats: VmStats,
}

impl<S: Stage2> Vm<S> {
    /// Frames charged to the VM now: its private frames and its tables.
    pub fn frames_held(&self) -> usize {
        self.private_frames + self.mmu.table_frames()
    }

    /// The quota check, done before every allocation charged to the VM:
    /// whether one more frame keeps it within its quota (a refusal is
    /// counted).
    fn may_take_one(&mut self) -> bool {
        let ok = self.frames_held() < self.quota;
        if !ok {
            self.stats.quota_refusals += 1;
        }
        ok
    }

    /// Records the charge in `frames_peak` (after it grew).
    fn note_peak(&mut self) {
        self.stats.frames_peak = self.stats.frames_peak.max(self.frames_held() as u64);
    }

    /// (slot, index) of `gfn`.
    pub fn find(&self, gfn: u64) -> Option<(usize, usize)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            let off = gfn.checked_sub(s.base_gfn)?;
            ((off as usize) < s.pages.len()).then_some((i, off as usize))
        })
    }
}

/// Guest memory of all VMs, the host frames behind it and the dedupe engine.
pub struct PageManager<P: PhysMem, S: Stage2 = EptTables> {
    pub(crate) mem: P,
    pub(crate) frames: FrameAllocator,
    pub(crate) vms: Vec<Option<Vm<S>>>,
    pub(crate) ksm: Ksm,
    pub(crate) groups: Vec<String>,
}

impl<P: PhysMem, S: Stage2> PageManager<P, S> {
    /// A page manager over host memory `mem`, taking frames from `frames`
    /// (for guest pages, tables and merged frames alike).
    pub fn new(mem: P, frames: FrameAllocator, dedupe: DedupeConfig) -> Self {
        PageManager { mem, frames, vms: Vec::new(), ksm: Ksm::new(dedupe), groups: Vec::new() }
    }

    pub fn mem(&self) -> &P {
        &self.mem
    }

    pub fn frames(&self) -> &FrameAllocator {
        &self.frames
    }

    /// Takes every free frame out of the pool (and [`Self::give_back`]
    /// returns them): lets a test make the host run out of memory at a
    /// chosen moment, as it would when other VMs used the frames.
    pub fn take_all_free(&mut self) -> Vec<PhysAddr> {
        core::iter::from_fn(|| self.frames.alloc()).collect()
    }

    pub fn give_back(&mut self, held: Vec<PhysAddr>) {
        for f in held {
            self.frames.free(f).expect("a frame taken by take_all_free");
        }
    }

    pub fn create_vm(&mut self, config: VmConfig, flusher: Box<dyn TlbFlush>) -> Result<VmId, PmError> {
        let index = self.vms.len();
        if index > u16::MAX as usize {
            return Err(PmError::TooManyVms);
        }
        // The root table is the VM's first charged frame.
        if config.frame_quota == 0 {
            return Err(PmError::QuotaExceeded);
        }
        let mut mmu = Mmu::new(&self.mem, &mut self.frames, flusher, config.mode).map_err(|_| PmError::OutOfMemory)?;
        let track_dirty = self.ksm.config.track_dirty && mmu.enable_accessed_dirty();
        let group = config.share_group.map(|name| match self.groups.iter().position(|g| *g == name) {
            Some(i) => i as u32,
            None => {
                self.groups.push(name);
                (self.groups.len() - 1) as u32
            }
        });
        let domain = self.ksm.config.policy.domain(index as u32, group);
        let mut v =
            Vm { mmu, slots: Vec::new(), domain, track_dirty, quota: config.frame_quota, private_frames: 0, stats: VmStats::default() };
        v.note_peak();
        self.vms.push(Some(v));
        Ok(VmId(index as u16))
    }

    /// Adds `size` bytes of guest memory at `base_gpa` (both page-aligned).
    pub fn add_slot(&mut self, vm: VmId, base_gpa: u64, size: u64, mergeable: bool) -> Result<(), PmError> {
        let v = self.vm_mut(vm)?;
        let page = PAGE_SIZE as u64;
        let end = base_gpa.checked_add(size).ok_or(PmError::BadSlot)?;
        if !base_gpa.is_multiple_of(page) || !size.is_multiple_of(page) || size == 0 || end > crate::ept::GPA_LIMIT {
            return Err(PmError::BadSlot);
        }
        let (g0, g1) = (base_gpa >> PAGE_SHIFT, end >> PAGE_SHIFT);
        if v.slots.iter().any(|s| g0 < s.base_gfn + s.pages.len() as u64 && s.base_gfn < g1) {
            return Err(PmError::BadSlot);
        }
        let n = (g1 - g0) as usize;
        v.slots.push(MemSlot { base_gfn: g0, mergeable, pages: vec![PageEntry::EMPTY; n], faulted_in: vec![0; n.div_ceil(64)] });
        Ok(())
    }

    pub(crate) fn vm(&self, vm: VmId) -> Result<&Vm<S>, PmError> {
        self.vms.get(vm.0 as usize).and_then(|v| v.as_ref()).ok_or(PmError::NoSuchVm)
    }

    pub(crate) fn vm_mut(&mut self, vm: VmId) -> Result<&mut Vm<S>, PmError> {
        self.vms.get_mut(vm.0 as usize).and_then(|v| v.as_mut()).ok_or(PmError::NoSuchVm)
    }

    /// The VM's frame quota ([`VmConfig::frame_quota`]).
    pub fn frame_quota(&self, vm: VmId) -> Result<usize, PmError> {
        Ok(self.vm(vm)?.quota)
    }

    /// The VM's second-stage tables and notifier state (the kernel takes
    /// the EPTP from it; tests walk it like the hardware).
    pub fn mmu(&self, vm: VmId) -> Result<&Mmu<S>, PmError> {
        Ok(&self.vm(vm)?.mmu)
    }

    /// The single entry point for EPT violations (nested page faults).
    ///
    /// The fault path of DESIGN.md rule 4: first the page manager makes
    /// the page ready for the access (allocate on first touch, copy on a
    /// write to a merged page, both through the notifier), then, with
    /// the sequence snapshotted before the frame is read, the translation
    /// is installed unless an invalidation got in between.
    pub fn handle_ept_violation(&mut self, vm: VmId, gpa: u64, access: Access) -> Outcome {
        let PageManager { mem, frames, vms, ksm, .. } = self;
        let Some(Some(v)) = vms.get_mut(vm.0 as usize) else {
            return Outcome::OutsideMemory;
        };
        v.stats.ept_violations += 1;
        let gfn = gpa >> PAGE_SHIFT;
        let Some((si, idx)) = v.find(gfn) else {
            v.stats.outside += 1;
            return Outcome::OutsideMemory;
        };
        let e = v.slots[si].pages[idx];
        if e.frame == NO_FRAME {
            v.stats.not_present += 1;
            if !v.may_take_one() {
                return Outcome::QuotaExceeded;
            }
            if populate(mem, frames, v, si, idx).is_err() {
                v.stats.out_of_memory += 1;
                return Outcome::OutOfMemory;
            }
        } else if e.shared() && access == Access::Write {
            v.stats.write_shared += 1;
            if !v.may_take_one() {
                return Outcome::QuotaExceeded;
            }
            if cow_break(mem, frames, ksm, v, si, idx).is_err() {
                v.stats.out_of_memory += 1;
                return Outcome::OutOfMemory;
            }
        } else if v.mmu.lookup(mem, gfn).is_some() {
            v.stats.write_protected += 1;
        } else if e.shared() && v.slots[si].was_faulted_in(idx) {
            v.stats.refaults += 1;
        } else {
            v.stats.not_present += 1;
        }
        // Snapshot, then ask the page manager which frame backs the page.
        let seq = v.mmu.invalidate_seq();
        let e = v.slots[si].pages[idx];
        let perms = if e.shared() { Perms::RX } else { Perms::RWX };
        match install_charged(mem, frames, v, gfn, e.pa(), perms, seq) {
            Some(Install::Installed | Install::AlreadyPresent) => {
                v.slots[si].mark_faulted_in(idx);
                Outcome::Resolved
            }
            Some(Install::Retry) => {
                v.stats.retries += 1;
                Outcome::Retry
            }
            Some(Install::OutOfFrames) => {
                v.stats.out_of_memory += 1;
                Outcome::OutOfMemory
            }
            None => Outcome::QuotaExceeded,
        }
    }

    /// Copies guest memory at `gpa` into `buf`, as the hypervisor sees it
    /// (pages never touched read as zero and stay unallocated).
    pub fn read_gpa(&self, vm: VmId, gpa: u64, buf: &mut [u8]) -> Result<(), PmError> {
        let v = self.vm(vm)?;
        let mut done = 0;
        while done < buf.len() {
            let a = gpa + done as u64;
            let (si, idx) = v.find(a >> PAGE_SHIFT).ok_or(PmError::OutsideMemory(a))?;
            let off = (a as usize) % PAGE_SIZE;
            let n = (PAGE_SIZE - off).min(buf.len() - done);
            let e = v.slots[si].pages[idx];
            if e.frame == NO_FRAME {
                buf[done..done + n].fill(0);
            } else {
                buf[done..done + n].copy_from_slice(&self.mem.page(e.pa())[off..off + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` into guest memory at `gpa` for the hypervisor (loading
    /// an image, answering a hypercall). Allocates pages on first touch and
    /// breaks sharing of merged pages first. Checks the whole range, and
    /// that the frames it needs fit in the VM's quota, before writing
    /// anything; on the host running out of frames, part may be written.
    /// The write does not go through the EPT, so no dirty flag records
    /// it: the page's checksum stops being tracked and the scanner hashes
    /// it again at its next look.
    pub fn write_gpa(&mut self, vm: VmId, gpa: u64, data: &[u8]) -> Result<(), PmError> {
        let PageManager { mem, frames, vms, ksm, .. } = self;
        let v = vms.get_mut(vm.0 as usize).and_then(|v| v.as_mut()).ok_or(PmError::NoSuchVm)?;
        let end = gpa.checked_add(data.len() as u64).ok_or(PmError::OutsideMemory(gpa))?;
        let mut a = gpa;
        // Frames the write takes: a fresh one for each page not backed
        // yet, a copy for each merged page.
        let mut need = 0;
        while a < end {
            let (si, idx) = v.find(a >> PAGE_SHIFT).ok_or(PmError::OutsideMemory(a))?;
            let e = v.slots[si].pages[idx];
            need += usize::from(e.frame == NO_FRAME || e.shared());
            a = ((a >> PAGE_SHIFT) + 1) << PAGE_SHIFT;
        }
        if v.frames_held() + need > v.quota {
            v.stats.quota_refusals += 1;
            return Err(PmError::QuotaExceeded);
        }
        let mut done = 0;
        while done < data.len() {
            let a = gpa + done as u64;
            let (si, idx) = v.find(a >> PAGE_SHIFT).expect("checked above");
            let e = v.slots[si].pages[idx];
            if e.frame == NO_FRAME {
                populate(mem, frames, v, si, idx).map_err(|_| PmError::OutOfMemory)?;
            } else if e.shared() {
                cow_break(mem, frames, ksm, v, si, idx).map_err(|_| PmError::OutOfMemory)?;
            }
            let off = (a as usize) % PAGE_SIZE;
            let n = (PAGE_SIZE - off).min(data.len() - done);
            let e = &mut v.slots[si].pages[idx];
            e.clear_flags(F_TRACKED);
            mem.page_mut(e.pa())[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Gives the pages of `gpa..gpa+len` back (as `MADV_DONTNEED`): their
    /// translations are zapped, their frames freed or unshared, and they
    /// read as zero until touched again.
    pub fn discard(&mut self, vm: VmId, gpa: u64, len: u64) -> Result<(), PmError> {
        let PageManager { mem, frames, vms, ksm, .. } = self;
        let v = vms.get_mut(vm.0 as usize).and_then(|v| v.as_mut()).ok_or(PmError::NoSuchVm)?;
        let page = PAGE_SIZE as u64;
        if !gpa.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(PmError::BadSlot);
        }
        let range = GfnRange { start: gpa >> PAGE_SHIFT, end: (gpa + len) >> PAGE_SHIFT };
        for gfn in range.start..range.end {
            v.find(gfn).ok_or(PmError::OutsideMemory(gfn << PAGE_SHIFT))?;
        }
        v.mmu.invalidate_range_start(mem, frames, range, InvalidateEvent::Clear);
        let mut freed = Vec::new();
        for gfn in range.start..range.end {
            let (si, idx) = v.find(gfn).expect("checked above");
            let e = core::mem::replace(&mut v.slots[si].pages[idx], PageEntry::EMPTY);
            if e.frame != NO_FRAME {
                freed.push(e);
            }
        }
        v.mmu.invalidate_range_end(range);
        // Frames go back only after the end (the TLB was flushed at start).
        for e in freed {
            if !e.shared() {
                v.private_frames -= 1;
            }
            release(frames, ksm, v.domain, e);
        }
        Ok(())
    }

    /// Tears a VM down: every page unshared or freed, the tables freed.
    pub fn destroy_vm(&mut self, vm: VmId) -> Result<(), PmError> {
        let v = self.vms.get_mut(vm.0 as usize).and_then(|v| v.take()).ok_or(PmError::NoSuchVm)?;
        for s in &v.slots {
            for e in &s.pages {
                if e.frame != NO_FRAME {
                    release(&mut self.frames, &mut self.ksm, v.domain, *e);
                }
            }
        }
        v.mmu.destroy(&self.mem, &mut self.frames);
        Ok(())
    }

    /// The host frame behind `gpa` in the page manager's map.
    pub fn backing_frame(&self, vm: VmId, gpa: u64) -> Option<PhysAddr> {
        let v = self.vm(vm).ok()?;
        let (si, idx) = v.find(gpa >> PAGE_SHIFT)?;
        let e = v.slots[si].pages[idx];
        (e.frame != NO_FRAME).then(|| e.pa())
    }

    /// Whether the page at `gpa` is mapped to a merged (or zero) frame.
    pub fn is_merged(&self, vm: VmId, gpa: u64) -> bool {
        let Ok(v) = self.vm(vm) else { return false };
        v.find(gpa >> PAGE_SHIFT).is_some_and(|(si, idx)| v.slots[si].pages[idx].shared())
    }

    pub fn vm_stats(&self, vm: VmId) -> Result<(VmStats, crate::mmu_notifier::MmuStats), PmError> {
        let v = self.vm(vm)?;
        Ok((vm_counters(v), v.mmu.stats()))
    }

    /// All counters, summed over the live VMs.
    pub fn stats(&self) -> Stats {
        let mut s = Stats { ksm: self.ksm_stats(), ..Stats::default() };
        for v in self.vms.iter().flatten() {
            s.vm.add(&vm_counters(v));
            stats::add_mmu(&mut s.mmu, &v.mmu.stats());
        }
        s
    }
}

/// Backs a never-touched page with a fresh zeroed frame, charged to the VM
/// (the caller checked its quota). No translation exists yet, so no
/// invalidation is needed.
fn populate<P: PhysMem, S: Stage2>(
    mem: &P,
    frames: &mut FrameAllocator,
    v: &mut Vm<S>,
    si: usize,
    idx: usize,
) -> Result<(), MapError> {
    let f = frames.alloc().ok_or(MapError::OutOfFrames)?;
    mem.zero_page(f);
    v.slots[si].pages[idx] = PageEntry::new(frame_number(f), 0, 0);
    v.stats.pages_allocated += 1;
    v.private_frames += 1;
    v.note_peak();
    Ok(())
}

/// The VM's counters, with `frames_held` as it is now.
fn vm_counters<S: Stage2>(v: &Vm<S>) -> VmStats {
    VmStats { frames_held: v.frames_held() as u64, ..v.stats }
}

/// [`Mmu::install`] with the table frames it creates charged to the VM,
/// each checked against the quota before it is taken. None: a table
/// would take the VM past its quota (counted), and no frame was taken
/// for it; tables made before that stay (linked in and charged).
///
/// The first try gets no frames at all: almost every install finds its
/// tables there (one page table serves 512 pages) and takes nothing. One
/// that needs a table fails without changing anything, and the tables are
/// then handed over one frame at a time, each after the quota check: a
/// walk takes a frame for the first level it lacks and stops at the next.
fn install_charged<P: PhysMem, S: Stage2>(
    mem: &P,
    frames: &mut FrameAllocator,
    v: &mut Vm<S>,
    gfn: u64,
    hpa: PhysAddr,
    perms: Perms,
    seq: u64,
) -> Option<Install> {
    let mut pool = FrameAllocator::new(None::<core::ops::Range<u64>>);
    loop {
        let r = v.mmu.install(mem, &mut pool, gfn, hpa, perms, seq);
        if r != Install::OutOfFrames {
            debug_assert_eq!(pool.free_frames(), 0, "a table frame handed over and not used");
            v.note_peak();
            return Some(r);
        }
        v.note_peak();
        if !v.may_take_one() {
            return None;
        }
        let Some(f) = frames.alloc() else { return Some(Install::OutOfFrames) };
        pool = FrameAllocator::new(Some(f.0..f.0 + PAGE_SIZE as u64));
    }
}

/// Copy-on-write: the merged page gets a private copy, mapped writable
/// through start(change) / change_pte / end, and the merged frame loses a
/// reference (freed when none is left). Out of frames: nothing changes.
/// The copy is charged to the VM (the caller checked its quota).
pub(crate) fn cow_break<P: PhysMem, S: Stage2>(
    mem: &P,
    frames: &mut FrameAllocator,
    ksm: &mut Ksm,
    v: &mut Vm<S>,
    si: usize,
    idx: usize,
) -> Result<PhysAddr, MapError> {
    let e = v.slots[si].pages[idx];
    debug_assert!(e.shared());
    let new = frames.alloc().ok_or(MapError::OutOfFrames)?;
    mem.copy_page(e.pa(), new);
    let gfn = v.slots[si].base_gfn + idx as u64;
    let r = GfnRange::one(gfn);
    v.mmu.invalidate_range_start(mem, frames, r, InvalidateEvent::Change);
    v.mmu.change_pte(mem, gfn, new, Perms::RWX);
    v.slots[si].pages[idx] = PageEntry::new(frame_number(new), 0, 0);
    v.mmu.invalidate_range_end(r);
    ksm.put(frames, v.domain.expect("a merged page's VM merges"), &e);
    v.stats.cow_breaks += 1;
    v.private_frames += 1;
    v.note_peak();
    Ok(new)
}

/// Drops a page's hold on its frame (after its translation is gone).
fn release(frames: &mut FrameAllocator, ksm: &mut Ksm, domain: Option<u32>, e: PageEntry) {
    if e.shared() {
        ksm.put(frames, domain.expect("a merged page's VM merges"), &e);
    } else {
        frames.free(e.pa()).expect("a private guest frame is ours");
    }
}

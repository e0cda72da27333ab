//! KSM-style dedupe (DESIGN.md "Dedupe"), the hypervisor's ksmd.
//!
//! [`PageManager::scan`] looks at a batch of mergeable guest pages, in
//! KSM's order for each page:
//! 1. the stable index (merged frames, by content hash): a match with room
//!    for one more sharer is write-protected, byte-compared and merged;
//! 2. a page whose checksum changed since the last look is volatile and
//!    waits for the next pass (with [`DedupeConfig::track_dirty`], a page
//!    whose EPT dirty flag stayed clear since the last look keeps its
//!    checksum without being hashed again);
//! 3. an all-zero page goes to its domain's zero frame;
//! 4. the unstable index (unchanged pages of this pass, by content hash):
//!    a match is write-protected and compared, and both pages become one
//!    new merged frame (the older page's frame is kept).
//!
//! Every merge is one notifier bracket per merged page: start with a
//! `Change` event (which write-protects the entry), the byte compare,
//! change_pte only if equal, end; the old frame is freed after the end.
//! A failed compare ends the bracket without change_pte and leaves the
//! entry write-protected (the guest's next write faults and gets it back
//! writable). A new merged frame from two unstable pages also
//! write-protects the twin whose frame it keeps (one WriteProtect
//! bracket). The unstable index is emptied at the start of each pass, as
//! KSM rebuilds its unstable tree.
//!
//! Who may share with whom is [`SharingPolicy`]; pages of different
//! sharing domains never meet, because the domain is mixed into the
//! index key and checked on every match.
//!
//! Memory: 8 bytes per guest page in the page manager (frame, flags and
//! the page's 28-bit checksum, kept for merged pages too); while a page is
//! in the unstable index, one 16-byte slot there; per merged frame one
//! 16-byte slot in the stable index, which is its record: key, frame and
//! sharer count. A merged page finds its record by its key (checksum and
//! domain) and its frame; frames with the same content that filled up
//! (`max_page_sharing`) are further slots with the same key.

use crate::content_index::ContentIndex;
use crate::frame::FrameAllocator;
use crate::mmu_notifier::{GfnRange, InvalidateEvent, Mmu};
use crate::page_manager::{frame_number, PageEntry, PageManager, Vm, AUX_BITS, F_CSUM, F_SHARED, F_TRACKED, F_UNSTABLE, NO_FRAME};
use crate::phys::{PhysAddr, PhysMem, PAGE_SHIFT, PAGE_SIZE};
use crate::stage2::{Perms, Stage2};
use crate::stats::KsmStats;
use alloc::vec::Vec;

/// Who may share frames with whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharingPolicy {
    /// No merging at all.
    Off,
    /// Any VM with any VM.
    AllVms,
    /// Only pages of the same VM.
    SameVm,
    /// VMs of the same named group (ESXi's "salting"); a VM without a
    /// group shares only with itself.
    Groups,
}

/// [`PageManager::vm_sharing`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmSharing {
    /// Pages mapped to a merged (non-zero) frame.
    pub merged: u64,
    /// Pages mapped to a zero frame.
    pub zero: u64,
}

impl SharingPolicy {
    /// The sharing domain of a VM: pages merge only within one domain.
    pub(crate) fn domain(self, vm_index: u32, group: Option<u32>) -> Option<u32> {
        match self {
            SharingPolicy::Off => None,
            SharingPolicy::AllVms => Some(0),
            SharingPolicy::SameVm => Some(1 + vm_index),
            SharingPolicy::Groups => Some(match group {
                Some(g) => 0x8000_0000 | g,
                None => 1 + vm_index,
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeConfig {
    pub policy: SharingPolicy,
    /// Most guest pages per merged frame (Linux's `max_page_sharing`);
    /// when a frame is full the next equal pages start a new one.
    pub max_page_sharing: u32,
    /// All-zero pages share one zero frame per domain, without the cap
    /// (Linux's `use_zero_pages`, counted in `zero_pages`). Off: they merge
    /// like any other content.
    pub use_zero_pages: bool,
    /// Change tracking with EPT dirty flags instead of re-hashing (DESIGN.md
    /// "Dedupe"): the VMs' tables keep accessed/dirty flags (SDM 29.3.5),
    /// and a page whose translation is present and not dirty since the
    /// scanner last looked keeps its stored checksum without being hashed
    /// again. Turn on only when the CPU has EPT A/D
    /// (`vmx::caps::ept_cap::ACCESSED_DIRTY`) and the VMCS gets
    /// `mmu.eptp(mmu.accessed_dirty())`; off, every look hashes the page
    /// (KSM's checksum rule). Same merges either way.
    pub track_dirty: bool,
    /// With `track_dirty`: merge at the first look, as ESX does
    /// (Waldspurger, OSDI 2002): a page just hashed enters the unstable
    /// index at once, and a page matching it is compared and merged in the
    /// same pass if the candidate's dirty flag says it has not changed
    /// since its hash. Off (or without dirty flags for the page): KSM's
    /// two-look rule, a page is a candidate only once its checksum held
    /// between two looks. The byte compare decides every merge either way.
    pub merge_at_first_look: bool,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            policy: SharingPolicy::AllVms,
            max_page_sharing: 256,
            use_zero_pages: true,
            track_dirty: false,
            merge_at_first_look: true,
        }
    }
}

/// What one call of [`PageManager::scan`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// Page slots of mergeable memory visited (touched or not).
    pub visited: usize,
    /// Pages that became merged.
    pub merged: usize,
    /// Passes over all mergeable memory that ended in this call.
    pub full_scans_completed: usize,
}

/// What one full pass saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    pub merged: u64,
    /// Pages seen for the first time or changed since the last look.
    pub changed: u64,
}

/// A merged frame's record is its stable-index slot: the key, and as the
/// value its host frame (low 32 bits) and its sharer count (high 32).
fn record(frame: u32, sharers: u32) -> u64 {
    frame as u64 | (sharers as u64) << 32
}

fn rec_frame(v: u64) -> u32 {
    v as u32
}

fn rec_sharers(v: u64) -> u32 {
    (v >> 32) as u32
}

/// A domain's zero frame (`use_zero_pages`): all-zero pages of the domain
/// share it without a cap, outside the stable index.
#[derive(Clone, Copy, Debug)]
struct ZeroFrame {
    domain: u32,
    frame: u32,
    sharers: u32,
}

/// What a page is merged into: a stable-index slot (a position, valid
/// until the index next changes) or a zero frame (its place in the list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Stable(usize),
    Zero(usize),
}

/// The dedupe engine's state, kept by the page manager.
pub(crate) struct Ksm {
    pub config: DedupeConfig,
    /// Key -> [`record`] of each merged frame, newest first among equal keys.
    stable: ContentIndex,
    /// Key -> page ref ([`page_ref`]) of an unchanged page of this pass.
    unstable: ContentIndex,
    zero_frames: Vec<ZeroFrame>,
    zero_hash: u64,
    /// (vm, slot, page) to look at next.
    cursor: (usize, usize, usize),
    visited_this_pass: u64,
    pass: PassStats,
    last_pass: Option<PassStats>,
    full_scans: u64,
    merges: u64,
    mismatches: u64,
    scanned: u64,
    /// Looks that reused the stored checksum (dirty flag clear).
    checksums_reused: u64,
    /// Looks that hashed the page.
    hashed: u64,
    /// Looks that made a changed page a candidate at once (first look).
    first_look: u64,
    /// Private frames merged away during a `scan` call: freed at its end,
    /// after the one TLB flush per VM that covers them (at most one per
    /// page of the batch; the capacity is kept).
    retired: Vec<PhysAddr>,
}

/// The index key of content `hash` in sharing domain `domain`; never 0
/// (the index's empty mark). Equal keys only nominate candidates: every
/// merge is decided by a byte compare.
pub(crate) fn key_of(hash: u64, domain: u32) -> u64 {
    // The checksum's bits back where the hash had them: the index takes a
    // key's home slot from its top bits, which must be spread.
    ((hash << (64 - AUX_BITS)) ^ (domain as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// A page's checksum: the top [`AUX_BITS`] (28) bits of its xxh3-64 hash,
/// what its page entry holds.
pub(crate) fn checksum(page: &[u8; PAGE_SIZE]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page) >> (64 - AUX_BITS)
}

fn page_ref(vm: usize, gfn: u64) -> u64 {
    ((vm as u64) << 40) | gfn
}

/// The (VM index, gfn) of a [`page_ref`].
fn ref_parts(q: u64) -> (usize, u64) {
    ((q >> 40) as usize, q & ((1 << 40) - 1))
}

fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    page.as_chunks::<64>().0.iter().all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl Ksm {
    pub fn new(config: DedupeConfig) -> Ksm {
        assert!(config.max_page_sharing >= 2, "max_page_sharing below 2 would never share");
        Ksm {
            config,
            stable: ContentIndex::new(),
            unstable: ContentIndex::new(),
            zero_frames: Vec::new(),
            zero_hash: checksum(&[0u8; PAGE_SIZE]),
            cursor: (0, 0, 0),
            visited_this_pass: 0,
            pass: PassStats::default(),
            last_pass: None,
            full_scans: 0,
            merges: 0,
            mismatches: 0,
            scanned: 0,
            checksums_reused: 0,
            hashed: 0,
            first_look: 0,
            retired: Vec::new(),
        }
    }

    /// The host frame a page merged into `t` gets.
    fn frame_of(&self, t: Target) -> PhysAddr {
        let f = match t {
            Target::Stable(pos) => rec_frame(self.stable.value_at(pos)),
            Target::Zero(z) => self.zero_frames[z].frame,
        };
        PhysAddr((f as u64) << PAGE_SHIFT)
    }

    fn sharers(&self, t: Target) -> u32 {
        match t {
            Target::Stable(pos) => rec_sharers(self.stable.value_at(pos)),
            Target::Zero(z) => self.zero_frames[z].sharers,
        }
    }

    fn set_sharers(&mut self, t: Target, n: u32) {
        match t {
            Target::Stable(pos) => {
                let frame = rec_frame(self.stable.value_at(pos));
                self.stable.set_value_at(pos, record(frame, n));
            }
            Target::Zero(z) => self.zero_frames[z].sharers = n,
        }
    }

    /// A new merged frame for content `key` with `sharers` pages, first
    /// among the frames with that key; its position.
    fn new_stable(&mut self, frame: u32, key: u64, sharers: u32) -> usize {
        self.stable.insert_dup(key, record(frame, sharers))
    }

    fn zero_frame<P: PhysMem>(&mut self, mem: &P, frames: &mut FrameAllocator, domain: u32) -> Option<usize> {
        if let Some(z) = self.zero_frames.iter().position(|z| z.domain == domain) {
            return Some(z);
        }
        let f = frames.alloc()?;
        mem.zero_page(f);
        self.zero_frames.push(ZeroFrame { domain, frame: frame_number(f), sharers: 0 });
        Some(self.zero_frames.len() - 1)
    }

    /// What the merged page `e` of sharing domain `domain` is mapped to:
    /// its domain's zero frame, or the stable record with its key (its
    /// checksum) and its frame.
    pub(crate) fn target_of(&self, domain: u32, e: &PageEntry) -> Option<Target> {
        debug_assert!(e.shared());
        if let Some(z) = self.zero_frames.iter().position(|z| z.domain == domain && z.frame == e.frame) {
            return Some(Target::Zero(z));
        }
        let frame = e.frame;
        self.stable.find(key_of(e.aux(), domain), |v| rec_frame(v) == frame).map(Target::Stable)
    }

    /// Drops the merged page `e`'s reference to its merged frame (the page
    /// belongs to sharing domain `domain`); the frame is freed and leaves
    /// the index when none is left.
    pub fn put(&mut self, frames: &mut FrameAllocator, domain: u32, e: &PageEntry) {
        let t = self.target_of(domain, e).expect("a merged page's frame is in the index");
        let n = self.sharers(t);
        assert!(n > 0, "reference to a merged frame with no sharers");
        if n > 1 {
            self.set_sharers(t, n - 1);
        } else {
            self.remove(frames, t);
        }
    }

    fn remove(&mut self, frames: &mut FrameAllocator, t: Target) {
        let f = self.frame_of(t);
        match t {
            Target::Stable(pos) => {
                self.stable.remove_at(pos);
            }
            Target::Zero(z) => {
                self.zero_frames.swap_remove(z);
            }
        }
        frames.free(f).expect("a merged frame is ours");
    }

    fn finish_pass(&mut self) {
        self.full_scans += 1;
        self.last_pass = Some(self.pass);
        self.pass = PassStats::default();
        // KSM rebuilds the unstable tree every pass. What this pass left in
        // it (plus an eighth) is what the next one will want: the table is
        // emptied and cut to that in place (it peaked mid-pass, when pages
        // waited for their twins), or grown in place to it.
        let want = self.unstable.len();
        self.unstable.clear();
        self.unstable.shrink_to(want + want / 8);
        self.unstable.reserve(want + want / 8);
        self.visited_this_pass = 0;
    }
}

/// Takes write access away from one guest page (start / end).
fn write_protect<P: PhysMem, S: Stage2>(mem: &P, frames: &mut FrameAllocator, mmu: &Mmu<S>, gfn: u64) {
    let r = GfnRange::one(gfn);
    mmu.invalidate_range_start(mem, frames, r, InvalidateEvent::WriteProtect);
    mmu.invalidate_range_end(r);
}

/// Inside a `Change` bracket of the page: points it at merged frame `t`
/// with change_pte; the page entry keeps `sum`, the content's checksum,
/// by which (with the frame) it finds the frame's record again. Returns
/// its old frame, which the caller frees after the bracket's end (the end
/// flushes the TLB first).
fn install_merged<P: PhysMem, S: Stage2>(mem: &P, ksm: &mut Ksm, v: &mut Vm<S>, si: usize, pi: usize, t: Target, sum: u64) -> PhysAddr {
    let old = v.slots[si].pages[pi];
    let gfn = v.slots[si].base_gfn + pi as u64;
    let target = ksm.frame_of(t);
    v.mmu.change_pte(mem, gfn, target, Perms::RX);
    v.slots[si].pages[pi] = PageEntry::new(frame_number(target), sum, F_SHARED);
    v.private_frames -= 1; // its frame is freed: no longer charged to the VM
    ksm.set_sharers(t, ksm.sharers(t) + 1);
    ksm.merges += 1;
    old.pa()
}

/// Merges the page into merged frame `t` if their bytes are equal, in one
/// notifier bracket: start(Change) write-protects the entry (zaps it with
/// `notifier=linux-zap`), the byte compare runs on the protected page,
/// change_pte installs the merged frame only if equal, and the end closes
/// the bracket either way. After a failed compare the entry stays
/// write-protected: the guest's next write takes a write-protect EPT
/// violation, which the page manager resolves by mapping the page writable
/// again (counted in `write_protected`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_into<P: PhysMem, S: Stage2>(
    mem: &P,
    frames: &mut FrameAllocator,
    ksm: &mut Ksm,
    v: &mut Vm<S>,
    si: usize,
    pi: usize,
    t: Target,
    sum: u64,
) -> bool {
    let r = GfnRange::one(v.slots[si].base_gfn + pi as u64);
    v.mmu.invalidate_range_start(mem, frames, r, InvalidateEvent::Change);
    let page = mem.page(v.slots[si].pages[pi].pa());
    let equal = match t {
        Target::Zero(_) => is_zero(page),
        Target::Stable(_) => page == mem.page(ksm.frame_of(t)),
    };
    let old = equal.then(|| install_merged(mem, ksm, v, si, pi, t, sum));
    v.mmu.invalidate_range_end(r);
    match old {
        // Freed by `scan` after the flush (the flushes of a scan batch
        // are one, at its end).
        Some(old) => ksm.retired.push(old),
        None => ksm.mismatches += 1,
    }
    equal
}

impl<P: PhysMem, S: Stage2> PageManager<P, S> {
    /// Looks at up to `batch` page slots of mergeable memory, going on where
    /// the last call stopped (call it between guest time slices).
    pub fn scan(&mut self, batch: usize) -> ScanResult {
        let mut res = ScanResult::default();
        if self.ksm.config.policy == SharingPolicy::Off {
            return res;
        }
        let PageManager { mem, frames, vms, ksm, .. } = self;
        for v in vms.iter().flatten() {
            v.mmu.defer_flushes();
        }
        // A pipeline over the pages of the batch ([`LOOK_AHEAD`]): each
        // page is looked at (dirty flag, hash, index lines prefetched) a few
        // pages before it is decided, its partner's record or page entry
        // and then its lines are prefetched on the way, so the misses
        // of a merge overlap with the work on the pages before it. Pages
        // are looked at only within the batch and the pass: the ring is
        // empty when `scan` returns and when a pass ends.
        let mut ring = Ring::default();
        let mut wrapped = false;
        loop {
            while ring.len < LOOK_AHEAD && res.visited < batch && seek(ksm, vms) {
                let (vi, si, pi) = ksm.cursor;
                ksm.cursor.2 += 1;
                ksm.visited_this_pass += 1;
                res.visited += 1;
                if let Some(l) = look(mem, vms, ksm, vi, si, pi) {
                    ring.push(l);
                }
            }
            if ring.len > 0 {
                ring.advance(mem, vms, ksm);
                let l = ring.pop();
                res.merged += decide(mem, frames, vms, ksm, l);
                continue;
            }
            if seek(ksm, vms) {
                break; // the batch is used up in the middle of a pass
            }
            // Past the last page: the pass ends with its last page.
            if ksm.visited_this_pass > 0 {
                ksm.finish_pass();
                res.full_scans_completed += 1;
            } else if wrapped || vms.is_empty() {
                ksm.cursor = (0, 0, 0);
                break; // nothing mergeable anywhere
            }
            ksm.cursor = (0, 0, 0);
            wrapped = true;
            if res.visited >= batch {
                break;
            }
        }
        // One TLB flush per VM for the whole batch, then the frames merged
        // away are freed. Every flush the batch's invalidations called
        // for (write-protects and frame replacements, Mmu::defer_flushes)
        // was deferred to here, and so was the one that dirty tracking
        // needs: `look` cleared the dirty flag of each page it looked at,
        // and a translation the guest's TLB cached while the flag was set
        // lets later writes go by without setting it again (SDM
        // 29.4.3.4). Both are sound because no guest runs while the page
        // manager is borrowed for `scan` (a vCPU can use no stale
        // translation before this flush), and no frame is freed before it
        // (the notifier contract). Every write after the flush sets the
        // flag, so the next look sees it. (Were vCPUs to run during a
        // scan, each merge would need its flushes at once and each page
        // clear, flush, then hash, in that order.)
        for v in vms.iter().flatten() {
            v.mmu.flush_deferred();
        }
        for f in ksm.retired.drain(..) {
            frames.free(f).expect("a private guest frame is ours");
        }
        res
    }

    /// True once a full pass merged nothing and saw no page change: more
    /// scanning finds nothing new until the guests change memory.
    pub fn scan_converged(&self) -> bool {
        self.ksm.last_pass.is_some_and(|p| p.merged == 0 && p.changed == 0)
    }

    /// What the last complete pass saw.
    pub fn last_pass(&self) -> Option<PassStats> {
        self.ksm.last_pass
    }

    pub fn ksm_stats(&self) -> KsmStats {
        let k = &self.ksm;
        let mut s = KsmStats {
            full_scans: k.full_scans,
            merges: k.merges,
            compare_mismatches: k.mismatches,
            pages_scanned: k.scanned,
            checksums_reused: k.checksums_reused,
            pages_hashed: k.hashed,
            first_looks: k.first_look,
            ..KsmStats::default()
        };
        for (_, v) in k.stable.iter() {
            s.pages_shared += 1;
            s.pages_sharing += rec_sharers(v) as u64 - 1;
        }
        s.zero_pages = k.zero_frames.iter().map(|z| z.sharers as u64).sum();
        for v in self.vms.iter().flatten() {
            for slot in &v.slots {
                for e in &slot.pages {
                    if e.flags() & F_UNSTABLE != 0 {
                        s.pages_unshared += 1;
                    } else if e.flags() & (F_CSUM | F_SHARED) == F_CSUM {
                        s.pages_volatile += 1;
                    }
                }
            }
        }
        s
    }

    /// A VM's part in the sharing: its pages mapped to a merged frame and
    /// those mapped to a zero frame. (`pages_shared`/`pages_sharing` are
    /// not per VM: one merged frame may serve several VMs.)
    pub fn vm_sharing(&self, vm: crate::page_manager::VmId) -> Option<VmSharing> {
        let v = self.vms.get(vm.0 as usize)?.as_ref()?;
        let mut s = VmSharing::default();
        for e in v.slots.iter().flat_map(|slot| &slot.pages).filter(|e| e.shared()) {
            match v.domain.and_then(|d| self.ksm.target_of(d, e)) {
                Some(Target::Zero(_)) => s.zero += 1,
                _ => s.merged += 1,
            }
        }
        Some(s)
    }

    /// Checks the dedupe bookkeeping against the page map (for tests):
    /// every merged frame's count equals the pages mapped to it.
    pub fn check_consistency(&self) -> Result<(), &'static str> {
        // Pages mapped to each merged frame, by (key, frame) or zero frame.
        let mut counts = alloc::collections::BTreeMap::<(u64, u32), u32>::new();
        let mut zero_counts = alloc::vec![0u32; self.ksm.zero_frames.len()];
        for v in self.vms.iter().flatten() {
            for slot in &v.slots {
                for e in &slot.pages {
                    if e.shared() {
                        if e.flags() & F_TRACKED != 0 {
                            return Err("merged page with a tracked checksum");
                        }
                        let d = v.domain.ok_or("merged page in a VM that does not merge")?;
                        match self.ksm.target_of(d, e) {
                            Some(Target::Zero(z)) => zero_counts[z] += 1,
                            Some(Target::Stable(_)) => *counts.entry((key_of(e.aux(), d), e.frame)).or_default() += 1,
                            None => return Err("page mapped to a merged frame missing from the index"),
                        }
                    } else if e.frame != NO_FRAME && !self.frames.is_allocated(e.pa()) {
                        return Err("private page on a free frame");
                    }
                }
            }
        }
        // The unstable index holds every marked page behind the cursor,
        // each under its own key (and may hold pages discarded since).
        for (key, r) in unstable_members(&self.vms, self.ksm.cursor) {
            if self.ksm.unstable.find(key, |v| v == r).is_none() {
                return Err("a marked page missing from the unstable index");
            }
        }
        let mut records = 0;
        for (key, v) in self.ksm.stable.iter() {
            let (f, n) = (rec_frame(v), rec_sharers(v));
            if n == 0 || counts.get(&(key, f)) != Some(&n) {
                return Err("merged frame count differs from its mappings");
            }
            if n > self.ksm.config.max_page_sharing {
                return Err("merged frame over max_page_sharing");
            }
            if !self.frames.is_allocated(PhysAddr((f as u64) << PAGE_SHIFT)) {
                return Err("merged frame not allocated");
            }
            records += 1;
        }
        if records != counts.len() {
            return Err("two records for one merged frame");
        }
        if self.ksm.zero_frames.iter().zip(&zero_counts).any(|(z, &c)| z.sharers == 0 || z.sharers != c) {
            return Err("zero frame count differs from its mappings");
        }
        Ok(())
    }
}

/// Pages looked at (dirty flag, hash) before the one being decided: the
/// look of page k+LOOK_AHEAD prefetches its index lines; at
/// [`PEEK_AT`] pages before its decision its index is read and the
/// candidate partner's record or page entry prefetched; at
/// [`PARTNER_AT`] the partner's frame is read from them, and from then on
/// each page before the decision prefetches a third of its lines. Each
/// page takes a few hundred ns, a miss a hundred or more (this VM: a
/// two-dimensional page walk first) (docs/dedupe-performance.md).
const LOOK_AHEAD: usize = 8;
const PEEK_AT: usize = 4;
const PARTNER_AT: usize = 3;
/// A look prefetches the pages it will look at next, each in
/// [`NEXT_PAGES`] chunks over as many looks, the first chunk
/// [`NEXT_PAGES`] pages ahead (see `look`).
///
/// Why chunks: a page's 64 misses at once fill the line-fill buffers,
/// and the loads behind them wait; a chunk per page keeps a few pages'
/// lines in flight instead (AMD EPYC, 1 GiB: the partner's first 8 lines
/// at one page -> all 64 in three chunks, and the next pages in halves
/// over two looks -> quarters over four, together 0.115 -> 0.088 s
/// default and 0.129 -> 0.099 s pairs).
const NEXT_PAGES: usize = 4;

/// The lines of chunk `chunk` of `parts` (each a part of a page's 64 cache
/// lines, the last one shorter if they do not divide it).
fn lines_of(chunk: usize, parts: usize) -> core::ops::Range<usize> {
    let n = (PAGE_SIZE / 64).div_ceil(parts);
    (chunk * n).min(PAGE_SIZE / 64)..((chunk + 1) * n).min(PAGE_SIZE / 64)
}

/// Prefetches chunk `chunk` of `parts` of `page`'s lines.
fn prefetch_chunk(page: &[u8; PAGE_SIZE], chunk: usize, parts: usize) {
    for line in &page.as_chunks::<64>().0[lines_of(chunk, parts)] {
        crate::prefetch::prefetch(line);
    }
}

/// What was learnt about the merge partner of a looked-at page before its
/// decision (only to prefetch: the decision looks again).
#[derive(Clone, Copy, Debug)]
enum Hint {
    None,
    /// The frame of the first merged frame with the page's key.
    Stable(u32),
    Twin(u64),
}

/// A page looked at and not yet decided: its hash is taken and its dirty
/// flag cleared, and no guest runs before the decision (both happen in
/// the same `scan` call).
#[derive(Clone, Copy, Debug)]
struct Looked {
    vi: usize,
    si: usize,
    pi: usize,
    hash: u64,
    key: u64,
    dirty: Option<bool>,
    hint: Hint,
    /// The partner's frame once the hint gave it (to prefetch from).
    partner: u32,
}

/// The pages looked at ahead of the decision, oldest first.
#[derive(Default)]
struct Ring {
    slots: [Option<Looked>; LOOK_AHEAD],
    head: usize,
    len: usize,
}

impl Ring {
    fn push(&mut self, l: Looked) {
        debug_assert!(self.len < LOOK_AHEAD);
        self.slots[(self.head + self.len) % LOOK_AHEAD] = Some(l);
        self.len += 1;
    }

    fn pop(&mut self) -> Looked {
        let l = self.slots[self.head].take().expect("a looked-at page");
        self.head = (self.head + 1) % LOOK_AHEAD;
        self.len -= 1;
        l
    }

    /// The prefetch stages for the pages `PEEK_AT` to 1 before the next
    /// decision (position 0).
    fn advance<P: PhysMem, S: Stage2>(&mut self, mem: &P, vms: &[Option<Vm<S>>], ksm: &Ksm) {
        if self.len > PEEK_AT {
            if let Some(l) = &mut self.slots[(self.head + PEEK_AT) % LOOK_AHEAD] {
                peek_partner(vms, ksm, l);
            }
        }
        for at in (1..=PARTNER_AT).rev() {
            if self.len > at {
                if let Some(l) = &mut self.slots[(self.head + at) % LOOK_AHEAD] {
                    if at == PARTNER_AT {
                        find_partner(mem, vms, l);
                    }
                    prefetch_partner(mem, l, PARTNER_AT - at);
                }
            }
        }
    }
}

/// The page entry behind an unstable-index page ref, if any.
fn entry_of<S: Stage2>(vms: &[Option<Vm<S>>], q: u64) -> Option<&PageEntry> {
    let (vi, gfn) = ref_parts(q);
    let v = vms.get(vi)?.as_ref()?;
    let (si, pi) = v.find(gfn)?;
    Some(&v.slots[si].pages[pi])
}

fn entry_of_mut<S: Stage2>(vms: &mut [Option<Vm<S>>], q: u64) -> Option<&mut PageEntry> {
    let (vi, gfn) = ref_parts(q);
    let v = vms.get_mut(vi)?.as_mut()?;
    let (si, pi) = v.find(gfn)?;
    Some(&mut v.slots[si].pages[pi])
}

/// The pages in the unstable index: those marked [`F_UNSTABLE`] that this
/// pass has already passed (behind the cursor; the ones after it are
/// last pass's, left in no index by `finish_pass`, and keep the mark
/// until their next look, as KSM counts them in `pages_unshared`).
fn unstable_members<S: Stage2>(vms: &[Option<Vm<S>>], cursor: (usize, usize, usize)) -> impl Iterator<Item = (u64, u64)> + '_ {
    vms.iter().enumerate().take(cursor.0 + 1).flat_map(move |(vi, v)| {
        let v = v.as_ref().filter(|v| v.domain.is_some());
        v.into_iter().flat_map(move |v| {
            let domain = v.domain.unwrap_or(0);
            v.slots.iter().enumerate().flat_map(move |(si, s)| {
                s.pages.iter().enumerate().filter(move |&(pi, e)| (vi, si, pi) < cursor && e.flags() & F_UNSTABLE != 0).map(
                    move |(pi, e)| (key_of(e.aux(), domain), page_ref(vi, s.base_gfn + pi as u64)),
                )
            })
        })
    })
}

/// Reads the index lines (prefetched by the look) for the partner a
/// decision would try first, and prefetches the twin's page entry (a
/// merged frame's record is in the index line itself).
fn peek_partner<S: Stage2>(vms: &[Option<Vm<S>>], ksm: &Ksm, l: &mut Looked) {
    if let Some(v) = ksm.stable.get(l.key) {
        // The record is the index slot: its frame is known at once.
        l.hint = Hint::Stable(rec_frame(v));
    } else if let Some(q) = ksm.unstable.get(l.key) {
        if let Some(e) = entry_of(vms, q) {
            crate::prefetch::prefetch(e);
            l.hint = Hint::Twin(q);
        }
    }
}

/// The partner's frame from the hint (a twin's page entry was prefetched
/// by the peek), and for a twin the prefetch of its EPT entry: its
/// decision write-protects it.
fn find_partner<P: PhysMem, S: Stage2>(mem: &P, vms: &[Option<Vm<S>>], l: &mut Looked) {
    l.partner = match l.hint {
        Hint::None => NO_FRAME,
        Hint::Stable(frame) => frame,
        Hint::Twin(q) => {
            let (vi, gfn) = ref_parts(q);
            if let Some(Some(v)) = vms.get(vi) {
                v.mmu.prefetch_entry(mem, gfn);
            }
            entry_of(vms, q).map_or(NO_FRAME, |e| e.frame)
        }
    };
}

/// Prefetches chunk `chunk` of [`PARTNER_AT`] of the partner's frame.
fn prefetch_partner<P: PhysMem>(mem: &P, l: &Looked, chunk: usize) {
    if l.partner != NO_FRAME {
        prefetch_chunk(mem.page(PhysAddr((l.partner as u64) << PAGE_SHIFT)), chunk, PARTNER_AT);
    }
}

/// Moves the cursor to the next mergeable page slot of this pass; false
/// when it is past the last VM (the end of the pass).
fn seek<S: Stage2>(ksm: &mut Ksm, vms: &[Option<Vm<S>>]) -> bool {
    loop {
        let (vi, si, pi) = ksm.cursor;
        if vi >= vms.len() {
            return false;
        }
        match &vms[vi] {
            Some(v) if v.domain.is_some() && si < v.slots.len() => {
                if v.slots[si].mergeable && pi < v.slots[si].pages.len() {
                    return true;
                }
                ksm.cursor = (vi, si + 1, 0);
            }
            _ => ksm.cursor = (vi + 1, 0, 0),
        }
    }
}

/// The first half of a look at a page: its dirty flag (tested and
/// cleared) and its hash (kept if the flag says it still holds), and the
/// prefetch of its index lines. None: nothing to look at (no frame, or
/// merged already).
fn look<P: PhysMem, S: Stage2>(mem: &P, vms: &mut [Option<Vm<S>>], ksm: &mut Ksm, vi: usize, si: usize, pi: usize) -> Option<Looked> {
    ksm.scanned += 1;
    let v = vms[vi].as_mut().expect("scanned VM exists");
    let domain = v.domain.expect("scanned VM merges");
    let gfn = v.slots[si].base_gfn + pi as u64;
    let e = v.slots[si].pages[pi];
    if e.frame == NO_FRAME || e.shared() {
        return None;
    }
    // Dirty tracking: Some(false) if the EPT maps the page and the guest
    // has not written it since the flag was last cleared; the flag is
    // clear now either way (flushed at the end of `scan`). None: not
    // mapped (or no tracking), so nothing tells whether it changed.
    let dirty = if v.track_dirty { v.mmu.test_and_clear_dirty(mem, gfn) } else { None };
    let e = &mut v.slots[si].pages[pi];
    e.clear_flags(F_UNSTABLE); // it left last pass's unstable index
    let tracked = F_CSUM | F_TRACKED;
    let unchanged = dirty == Some(false) && e.flags() & tracked == tracked;
    let hash = if unchanged {
        // Unchanged since the checksum was taken: it still holds.
        ksm.checksums_reused += 1;
        e.aux()
    } else {
        ksm.hashed += 1;
        checksum(mem.page(e.pa()))
    };
    // From now on the checksum (kept or stored below) is the content the
    // page has while its dirty flag stays clear, if it has one.
    if dirty.is_some() {
        e.add_flags(F_TRACKED);
    } else {
        e.clear_flags(F_TRACKED);
    }
    let key = key_of(hash, domain);
    ksm.stable.prefetch(key);
    ksm.unstable.prefetch(key);
    // The next pages to look at (usually the next frames): their lines
    // stream in while the pages before them are decided, so their hashes
    // read from cache. Each look asks for a chunk of each of the next
    // NEXT_PAGES pages, the first chunk of the farthest and the last of
    // the next, so every page is fetched whole over as many looks. Not after a page
    // whose checksum held: its neighbours are likely unchanged too (a
    // pass over idle memory), and their lines would be read for nothing.
    if !unchanged {
        let pages = &v.slots[si].pages;
        let ahead = |d: usize| pages.get(pi + d).filter(|n| n.frame != NO_FRAME && !n.shared()).map(|n| mem.page(n.pa()));
        for d in 1..=NEXT_PAGES {
            if let Some(page) = ahead(d) {
                prefetch_chunk(page, NEXT_PAGES - d, NEXT_PAGES);
            }
        }
    }
    Some(Looked { vi, si, pi, hash, key, dirty, hint: Hint::None, partner: NO_FRAME })
}

/// The second half: the page in KSM's order (see the module comment).
/// Returns how many pages became merged.
fn decide<P: PhysMem, S: Stage2>(mem: &P, frames: &mut FrameAllocator, vms: &mut [Option<Vm<S>>], ksm: &mut Ksm, l: Looked) -> usize {
    let Looked { vi, si, pi, hash, key, dirty, .. } = l;
    let v = vms[vi].as_mut().expect("scanned VM exists");
    let domain = v.domain.expect("scanned VM merges");
    let gfn = v.slots[si].base_gfn + pi as u64;
    // The hash is fresh or kept by a clean dirty flag, and the flag is
    // clear now: while it stays clear the page holds this content, which is
    // what the two-look rule waits a pass to learn.
    let first_look = dirty.is_some() && ksm.config.merge_at_first_look;

    // 1. A merged frame with this content and room for one more. A key
    // only nominates: two contents can share one (a checksum has 28 bits),
    // so each frame under it with room is compared in turn (a failed
    // compare changes no index, so the positions hold).
    let max = ksm.config.max_page_sharing;
    let mut n = 0;
    while let Some(pos) = ksm.stable.nth(key, n) {
        if rec_sharers(ksm.stable.value_at(pos)) < max && merge_into(mem, frames, ksm, v, si, pi, Target::Stable(pos), hash) {
            ksm.pass.merged += 1;
            return 1;
        }
        n += 1;
    }
    // 2. Changed since the last look: not a candidate yet (KSM), unless
    // its dirty flag tracks it from now on (first look).
    let e = &mut v.slots[si].pages[pi];
    let sum = hash;
    if e.flags() & F_CSUM == 0 || e.aux() != sum {
        e.set_aux(sum);
        e.add_flags(F_CSUM);
        ksm.pass.changed += 1;
        if !first_look {
            return 0;
        }
        ksm.first_look += 1;
    }
    // 3. All zero: the domain's zero frame.
    if ksm.config.use_zero_pages && hash == ksm.zero_hash {
        if let Some(z) = ksm.zero_frame(mem, frames, domain) {
            if merge_into(mem, frames, ksm, v, si, pi, Target::Zero(z), hash) {
                ksm.pass.merged += 1;
                return 1;
            }
            if ksm.zero_frames[z].sharers == 0 {
                ksm.remove(frames, Target::Zero(z));
            }
        }
        return 0;
    }
    // 4. An unchanged twin seen earlier in this pass: each page under the
    // key in turn (a collision puts pages of other content there too).
    // Entries whose page changed, merged or left since are dropped.
    let me = page_ref(vi, gfn);
    let (mut kept, mut listed) = (0, false);
    while let Some(pos) = ksm.unstable.nth(key, kept) {
        let q = ksm.unstable.value_at(pos);
        if q == me {
            (kept, listed) = (kept + 1, true);
            continue;
        }
        let Some(twin) = valid_twin(mem, vms, q, domain, sum, ksm.config.merge_at_first_look) else {
            ksm.unstable.remove_at(pos);
            if let Some(e) = entry_of_mut(vms, q) {
                e.clear_flags(F_UNSTABLE);
            }
            continue;
        };
        if merge_twin(mem, frames, vms, ksm, (vi, si, pi), twin, pos, sum) {
            ksm.pass.merged += 2;
            return 2;
        }
        kept += 1;
    }
    if !listed {
        ksm.unstable.insert_dup(key, me);
        vms[vi].as_mut().unwrap().slots[si].pages[pi].add_flags(F_UNSTABLE);
    }
    0
}

/// Merges page `(vi, si, pi)` with its twin, the page of unstable-index
/// entry `pos`, if their bytes are equal. The twin's frame becomes the
/// merged frame: it is only write-protected (its own bracket; its
/// translation stays, read-only). The page gets one Change bracket around
/// the compare, as in `merge_into`.
#[allow(clippy::too_many_arguments)]
fn merge_twin<P: PhysMem, S: Stage2>(
    mem: &P,
    frames: &mut FrameAllocator,
    vms: &mut [Option<Vm<S>>],
    ksm: &mut Ksm,
    (vi, si, pi): (usize, usize, usize),
    (qvi, qsi, qpi): (usize, usize, usize),
    pos: usize,
    sum: u64,
) -> bool {
    let gfn = vms[vi].as_ref().unwrap().slots[si].base_gfn + pi as u64;
    let qgfn = vms[qvi].as_ref().unwrap().slots[qsi].base_gfn + qpi as u64;
    write_protect(mem, frames, &vms[qvi].as_ref().unwrap().mmu, qgfn);
    let r = GfnRange::one(gfn);
    vms[vi].as_ref().unwrap().mmu.invalidate_range_start(mem, frames, r, InvalidateEvent::Change);
    let qe = vms[qvi].as_ref().unwrap().slots[qsi].pages[qpi];
    let pe = vms[vi].as_ref().unwrap().slots[si].pages[pi];
    if mem.page(qe.pa()) != mem.page(pe.pa()) {
        vms[vi].as_ref().unwrap().mmu.invalidate_range_end(r);
        ksm.mismatches += 1;
        return false;
    }
    let key = ksm.unstable.remove_at(pos).0;
    let new = ksm.new_stable(qe.frame, key, 1);
    ksm.merges += 1;
    let q = vms[qvi].as_mut().unwrap();
    q.slots[qsi].pages[qpi] = PageEntry::new(qe.frame, sum, F_SHARED);
    q.private_frames -= 1; // the frame is the dedupe's now, charged to no VM
    let v = vms[vi].as_mut().unwrap();
    let old = install_merged(mem, ksm, v, si, pi, Target::Stable(new), sum);
    v.mmu.invalidate_range_end(r);
    ksm.retired.push(old);
    true
}

/// The page behind an unstable-index entry, if it is still an unmerged,
/// unchanged page of the same domain. With `first_look`, a candidate whose
/// checksum is tracked must also still have a clear dirty flag: it may have
/// entered the index at its first look, and only the flag tells that it
/// held still since (a set flag is cleared here and the page loses its
/// tracked mark, so its next look hashes it again).
fn valid_twin<P: PhysMem, S: Stage2>(
    mem: &P,
    vms: &mut [Option<Vm<S>>],
    q: u64,
    domain: u32,
    sum: u64,
    first_look: bool,
) -> Option<(usize, usize, usize)> {
    let (qvi, gfn) = ref_parts(q);
    let v = vms.get_mut(qvi)?.as_mut()?;
    if v.domain != Some(domain) {
        return None;
    }
    let (si, pi) = v.find(gfn)?;
    let e = v.slots[si].pages[pi];
    let ok = v.slots[si].mergeable && e.frame != NO_FRAME && e.flags() & (F_SHARED | F_CSUM) == F_CSUM && e.aux() == sum;
    if ok && first_look && v.track_dirty && e.flags() & F_TRACKED != 0 && v.mmu.test_and_clear_dirty(mem, gfn) != Some(false) {
        v.slots[si].pages[pi].clear_flags(F_TRACKED);
        return None;
    }
    ok.then_some((qvi, si, pi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks of a page that the prefetches take in turn cover each of
    /// its 64 lines once, in order, for any number of parts.
    #[test]
    fn prefetch_chunks_cover_the_page_once() {
        let page = [0u8; PAGE_SIZE / 64];
        for parts in 1..=PAGE_SIZE / 64 {
            // Each is a range a page's lines can be sliced by (the
            // prefetches do), even where the chunks run out before the parts.
            let lens: alloc::vec::Vec<usize> = (0..parts).map(|c| page[lines_of(c, parts)].len()).collect();
            assert_eq!(lens.iter().sum::<usize>(), PAGE_SIZE / 64, "{parts} parts");
            let lines: alloc::vec::Vec<usize> = (0..parts).flat_map(|c| lines_of(c, parts)).collect();
            assert_eq!(lines, (0..PAGE_SIZE / 64).collect::<alloc::vec::Vec<_>>(), "{parts} parts");
            let longest = lens.iter().copied().max().unwrap();
            assert_eq!(longest, (PAGE_SIZE / 64).div_ceil(parts), "{parts} parts: even chunks");
        }
        assert_eq!((lines_of(0, 3), lines_of(2, 3)), (0..22, 44..64));
    }
}

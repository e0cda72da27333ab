//! The EPT side of the MMU-notifier contract (DESIGN.md "The notifier
//! contract"), named as in Linux's `virt/kvm/kvm_main.c`.
//!
//! The page manager (the primary MMU) brackets every change to a guest's
//! memory map with [`Mmu::invalidate_range_start`] and
//! [`Mmu::invalidate_range_end`], with [`Mmu::change_pte`] in between when
//! a page gets a new frame. The EPT-violation path snapshots
//! [`Mmu::invalidate_seq`] before it asks the page manager for a frame and
//! installs it with [`Mmu::install`], which refuses ("retry") if an
//! invalidation overlapping the page is in flight or has ended since.
//!
//! Beyond Linux: a range carries an [`InvalidateEvent`]; for
//! [`InvalidateEvent::Change`] the entries are write-protected instead of
//! zapped and `change_pte` installs the new frame, so the guest takes no
//! extra EPT violation. [`NotifierMode::LinuxZap`] keeps Linux's behaviour
//! (zap, `change_pte` finds nothing) for comparison.

use crate::ept::EptTables;
use crate::frame::FrameAllocator;
use crate::phys::{PhysAddr, PhysMem, PAGE_SHIFT};
use crate::stage2::{Leaf, MapError, Perms, Stage2};
use crate::warn::{warn_at, WarnSite};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Flushes the guest's cached translations. The kernel implements it with
/// INVEPT (single-context, the VM's EPTP); tests count calls.
pub trait TlbFlush: Send {
    fn flush_guest_tlb(&mut self);
}

/// A [`TlbFlush`] that only counts, for tests and benchmarks.
#[derive(Clone, Default)]
pub struct CountingFlush(pub alloc::sync::Arc<core::sync::atomic::AtomicU64>);

impl CountingFlush {
    pub fn count(&self) -> u64 {
        self.0.load(core::sync::atomic::Ordering::Relaxed)
    }
}

impl TlbFlush for CountingFlush {
    fn flush_guest_tlb(&mut self) {
        self.0.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    }
}

/// Guest frame numbers `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GfnRange {
    pub start: u64,
    pub end: u64,
}

impl GfnRange {
    pub const fn one(gfn: u64) -> GfnRange {
        GfnRange { start: gfn, end: gfn + 1 }
    }
    pub const fn contains(&self, gfn: u64) -> bool {
        self.start <= gfn && gfn < self.end
    }
    fn bytes(&self) -> core::ops::Range<u64> {
        (self.start << PAGE_SHIFT)..(self.end << PAGE_SHIFT)
    }
}

/// Why a range is invalidated (Linux: `mmu_notifier_range.event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidateEvent {
    /// The translations go away (unmap, free, teardown). Linux: UNMAP/CLEAR.
    Clear,
    /// Write access goes away, the frames stay. Linux: PROTECTION_PAGE.
    WriteProtect,
    /// `change_pte` follows for pages of the range with a new frame: the
    /// entries are write-protected, not zapped, and `change_pte` replaces
    /// them.
    Change,
}

/// How a [`InvalidateEvent::Change`] range is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifierMode {
    /// Ours: write-protect at start, `change_pte` installs the new frame.
    ChangePte,
    /// Linux's: zap at start, so `change_pte` finds nothing and the guest
    /// faults once more.
    LinuxZap,
}

/// What [`Mmu::install`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Install {
    Installed,
    /// Not installed because of an invalidation, but the entry there
    /// already maps that frame with those rights (a `change_pte` put it
    /// there): the guest can go on.
    AlreadyPresent,
    /// An invalidation overlapping the page is in flight or ended since
    /// the snapshot: let the guest fault again (`mmu_invalidate_retry_gfn`).
    Retry,
    OutOfFrames,
}

/// Per-VM counters of the notifier and the EPT side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuStats {
    pub invalidate_range_start: u64,
    pub change_pte: u64,
    /// `change_pte` calls that replaced a present entry.
    pub change_pte_installed: u64,
    pub invalidate_range_end: u64,
    pub tlb_flushes: u64,
    pub installs: u64,
    /// Installs refused by [`Mmu::install`].
    pub retries: u64,
    /// Contract violations seen (each also counted at its [`WarnSite`]).
    pub warnings: u64,
    /// Dirty flags the dedupe scanner found set and cleared.
    pub dirty_cleared: u64,
    /// Flushes owed inside a [`Mmu::defer_flushes`] batch, done as one at
    /// its end (each batch that owed any counts one in `tlb_flushes`).
    pub tlb_flushes_deferred: u64,
}

/// `change_pte` with no invalidation in flight (DESIGN.md rule 2; Linux
/// commit c13fda237f08).
pub static CHANGE_PTE_WITHOUT_INVALIDATE: WarnSite = WarnSite::new(file!(), line!());
/// `change_pte` for a page outside every in-flight `Change` range.
pub static CHANGE_PTE_OUTSIDE_CHANGE_RANGE: WarnSite = WarnSite::new(file!(), line!());
/// `invalidate_range_end` with the count already zero.
pub static INVALIDATE_END_UNDERFLOW: WarnSite = WarnSite::new(file!(), line!());
/// `invalidate_range_end` for a range no start announced.
pub static INVALIDATE_END_UNMATCHED: WarnSite = WarnSite::new(file!(), line!());

struct MmuState<S> {
    tables: S,
    mmu_invalidate_in_progress: u64,
    mmu_invalidate_seq: u64,
    /// Union of the in-flight ranges (meaningful while the count is > 0).
    mmu_invalidate_range_start: u64,
    mmu_invalidate_range_end: u64,
    /// The in-flight ranges themselves, with their events.
    in_flight: Vec<(GfnRange, InvalidateEvent)>,
    /// A `change_pte` replaced a frame: flush at the end of the bracket.
    flush_pending: bool,
    /// A dirty flag was cleared: flush before the guest runs again
    /// ([`Mmu::flush_cleared_dirty`]).
    dirty_flush_pending: bool,
    /// Between [`Mmu::defer_flushes`] and [`Mmu::flush_deferred`]: a flush
    /// the contract calls for is owed (`owed`), done once at the end.
    defer: bool,
    owed: bool,
    flusher: Box<dyn TlbFlush>,
    stats: MmuStats,
}

impl<S> MmuState<S> {
    fn flush(&mut self) {
        self.flush_pending = false;
        self.dirty_flush_pending = false;
        if self.defer {
            self.owed = true;
            self.stats.tlb_flushes_deferred += 1;
            return;
        }
        self.flusher.flush_guest_tlb();
        self.stats.tlb_flushes += 1;
    }

    fn recompute_union(&mut self) {
        let (mut lo, mut hi) = (u64::MAX, 0);
        for (r, _) in &self.in_flight {
            lo = lo.min(r.start);
            hi = hi.max(r.end);
        }
        self.mmu_invalidate_range_start = lo;
        self.mmu_invalidate_range_end = hi;
    }

    /// Linux's `mmu_invalidate_retry_gfn`.
    fn retry_gfn(&self, seq: u64, gfn: u64) -> bool {
        if self.mmu_invalidate_in_progress > 0
            && self.mmu_invalidate_range_start <= gfn
            && gfn < self.mmu_invalidate_range_end
        {
            return true;
        }
        self.mmu_invalidate_seq != seq
    }
}

/// One VM's second-stage tables and notifier state, under its MMU lock.
pub struct Mmu<S: Stage2 = EptTables> {
    state: spin::Mutex<MmuState<S>>,
    mode: NotifierMode,
    root: PhysAddr,
    /// The tables keep accessed/dirty flags ([`Mmu::enable_accessed_dirty`]).
    accessed_dirty: bool,
}

impl<S: Stage2> Mmu<S> {
    pub fn new<M: PhysMem>(
        mem: &M,
        frames: &mut FrameAllocator,
        flusher: Box<dyn TlbFlush>,
        mode: NotifierMode,
    ) -> Result<Self, MapError> {
        let tables = S::new(mem, frames)?;
        let root = tables.root();
        let state = MmuState {
            tables,
            mmu_invalidate_in_progress: 0,
            mmu_invalidate_seq: 0,
            mmu_invalidate_range_start: u64::MAX,
            mmu_invalidate_range_end: 0,
            in_flight: Vec::with_capacity(4),
            flush_pending: false,
            dirty_flush_pending: false,
            defer: false,
            owed: false,
            flusher,
            stats: MmuStats::default(),
        };
        Ok(Mmu { state: spin::Mutex::new(state), mode, root, accessed_dirty: false })
    }

    pub fn mode(&self) -> NotifierMode {
        self.mode
    }

    /// The root table (the kernel builds the EPTP / nCR3 from it).
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// Has the tables keep accessed/dirty flags (for EPT: the VMCS must
    /// then get `eptp(true)`, SDM 29.3.5). False if the tables cannot.
    /// The page manager calls it before the VM first runs.
    pub fn enable_accessed_dirty(&mut self) -> bool {
        self.accessed_dirty = self.state.get_mut().tables.enable_accessed_dirty();
        self.accessed_dirty
    }

    /// Whether the tables keep accessed/dirty flags (the kernel passes this
    /// to [`Mmu::eptp`]).
    pub fn accessed_dirty(&self) -> bool {
        self.accessed_dirty
    }

    /// For the dedupe scanner: whether the guest wrote `gfn` since its dirty
    /// flag was last cleared (None: no 4 KiB translation, or no dirty
    /// flags; the caller cannot tell), and clears the flag. A cleared flag
    /// needs a TLB flush before the guest runs again (SDM 29.4.3.4):
    /// [`Mmu::flush_cleared_dirty`] does one for all the pages cleared
    /// since the last flush.
    pub fn test_and_clear_dirty<M: PhysMem>(&self, mem: &M, gfn: u64) -> Option<bool> {
        let mut s = self.state.lock();
        let d = s.tables.test_and_clear_dirty(mem, gfn << PAGE_SHIFT);
        if d == Some(true) {
            s.stats.dirty_cleared += 1;
            s.dirty_flush_pending = true;
        }
        d
    }

    /// Starts loading the EPT entry of guest page `gfn` into the cache
    /// (the dedupe scanner, a few pages before it write-protects a twin).
    pub fn prefetch_entry<M: PhysMem>(&self, mem: &M, gfn: u64) {
        self.state.lock().tables.prefetch_entry(mem, gfn << PAGE_SHIFT);
    }

    /// Flushes the guest TLB if a dirty flag was cleared since the last
    /// flush (a flag that was already clear needs none: no translation
    /// with it set can be cached).
    pub fn flush_cleared_dirty(&self) {
        let mut s = self.state.lock();
        if s.dirty_flush_pending {
            s.flush();
        }
    }

    /// Starts a batch of invalidations whose TLB flushes are owed and done
    /// once, by [`Mmu::flush_deferred`]. For the dedupe scanner, and only
    /// under two promises of the caller: no vCPU of this VM runs (or
    /// uses its TLB) until `flush_deferred` returns, so a stale writable
    /// or stale-frame translation cannot be used in between; and no frame
    /// unmapped or replaced in the batch is freed before then (DESIGN.md,
    /// "The notifier contract": a frame is freed only after the flush that
    /// covers it). Everything else of the contract is unchanged: counts,
    /// ranges, sequence numbers, and the entries themselves are changed
    /// at once.
    pub fn defer_flushes(&self) {
        self.state.lock().defer = true;
    }

    /// Ends a [`Mmu::defer_flushes`] batch: one flush if any was owed (or
    /// a dirty flag was cleared since the last flush).
    pub fn flush_deferred(&self) {
        let mut s = self.state.lock();
        s.defer = false;
        if core::mem::take(&mut s.owed) || s.dirty_flush_pending {
            s.flush();
        }
    }

    /// What the processor does to the tables when a guest access to `gfn`
    /// completes (accessed flags, and the dirty flag for a write), if
    /// they keep those flags; returns whether the page's leaf is dirty
    /// after it. For the simulated guest ([`crate::sim`]).
    pub fn hw_access<M: PhysMem>(&self, mem: &M, gfn: u64, write: bool) -> bool {
        self.accessed_dirty && self.state.lock().tables.hw_access(mem, gfn << PAGE_SHIFT, write)
    }

    /// Rule 1: count += 1, remember the range, zap or write-protect its
    /// entries, flush the TLB if a live entry changed.
    pub fn invalidate_range_start<M: PhysMem>(
        &self,
        mem: &M,
        frames: &mut FrameAllocator,
        range: GfnRange,
        event: InvalidateEvent,
    ) {
        let mut s = self.state.lock();
        s.stats.invalidate_range_start += 1;
        // kvm_mmu_invalidate_begin + _range_add.
        s.mmu_invalidate_in_progress += 1;
        if s.mmu_invalidate_in_progress == 1 {
            s.in_flight.clear();
        }
        s.in_flight.push((range, event));
        if s.mmu_invalidate_in_progress == 1 {
            s.mmu_invalidate_range_start = range.start;
            s.mmu_invalidate_range_end = range.end;
        } else {
            s.mmu_invalidate_range_start = s.mmu_invalidate_range_start.min(range.start);
            s.mmu_invalidate_range_end = s.mmu_invalidate_range_end.max(range.end);
        }
        let zap = match event {
            InvalidateEvent::Clear => true,
            InvalidateEvent::WriteProtect => false,
            InvalidateEvent::Change => self.mode == NotifierMode::LinuxZap,
        };
        let changed = if zap {
            s.tables.unmap_range(mem, frames, range.bytes())
        } else {
            s.tables.protect_range(mem, frames, range.bytes(), Perms::RX)
        };
        if changed > 0 {
            s.flush();
        }
    }

    /// Rule 2: replaces the (write-protected) entry of `gfn` with `new`, if
    /// one is present; does not bump the sequence. Outside a bracket, or
    /// outside every `Change` range, it WARNs (once per boot and site),
    /// counts a warning, and zaps the entry instead, so the EPT never holds
    /// a translation no invalidation covered; the guest faults it back in.
    pub fn change_pte<M: PhysMem>(&self, mem: &M, gfn: u64, new: PhysAddr, perms: Perms) {
        let mut s = self.state.lock();
        s.stats.change_pte += 1;
        let gpa = gfn << PAGE_SHIFT;
        let no_bracket = s.mmu_invalidate_in_progress == 0;
        if warn_at(
            &CHANGE_PTE_WITHOUT_INVALIDATE,
            no_bracket,
            format_args!("change_pte(gfn {gfn:#x}) with no invalidation in flight"),
        ) {
            s.stats.warnings += 1;
            Self::zap_one(&mut s, mem, gpa);
            // Stands in for the end that never comes: a fault that read
            // the old frame must not install it.
            s.mmu_invalidate_seq += 1;
            return;
        }
        let covered = s.in_flight.iter().any(|(r, e)| *e == InvalidateEvent::Change && r.contains(gfn));
        if warn_at(
            &CHANGE_PTE_OUTSIDE_CHANGE_RANGE,
            !covered,
            format_args!("change_pte(gfn {gfn:#x}) outside every in-flight change range"),
        ) {
            s.stats.warnings += 1;
            Self::zap_one(&mut s, mem, gpa);
            return;
        }
        if let Some(old) = s.tables.replace_if_present(mem, gpa, new, perms) {
            s.stats.change_pte_installed += 1;
            if old.hpa != new {
                // The old frame may be cached; flush before the bracket
                // ends (the caller frees old frames only after the end).
                s.flush_pending = true;
            }
        }
    }

    fn zap_one<M: PhysMem>(s: &mut MmuState<S>, mem: &M, gpa: u64) {
        // A 4 KiB zap of a 4 KiB entry never needs a table frame; a large
        // entry is not split here (no allocator), it is dropped whole by
        // the frameless allocator below.
        let mut none = FrameAllocator::new(core::iter::empty::<core::ops::Range<u64>>());
        if s.tables.unmap_range(mem, &mut none, gpa..gpa + (1 << PAGE_SHIFT)) > 0 {
            s.flush();
        }
    }

    /// Rule 3: seq += 1, count -= 1 (WARN instead of going below zero).
    pub fn invalidate_range_end(&self, range: GfnRange) {
        let mut s = self.state.lock();
        s.stats.invalidate_range_end += 1;
        if s.flush_pending {
            s.flush();
        }
        s.mmu_invalidate_seq += 1;
        let underflow = s.mmu_invalidate_in_progress == 0;
        if warn_at(
            &INVALIDATE_END_UNDERFLOW,
            underflow,
            format_args!("invalidate_range_end({:#x}..{:#x}) with no invalidation in flight", range.start, range.end),
        ) {
            s.stats.warnings += 1;
            return;
        }
        s.mmu_invalidate_in_progress -= 1;
        let pos = s.in_flight.iter().position(|(r, _)| *r == range);
        if warn_at(
            &INVALIDATE_END_UNMATCHED,
            pos.is_none(),
            format_args!("invalidate_range_end({:#x}..{:#x}) for a range never started", range.start, range.end),
        ) {
            s.stats.warnings += 1;
        }
        if s.mmu_invalidate_in_progress == 0 {
            s.in_flight.clear();
        } else if let Some(i) = pos {
            s.in_flight.swap_remove(i);
            s.recompute_union();
        }
    }

    /// Rule 4, first half: the sequence to pass to [`Mmu::install`].
    pub fn invalidate_seq(&self) -> u64 {
        self.state.lock().mmu_invalidate_seq
    }

    /// How many invalidations are in flight.
    pub fn invalidate_in_progress(&self) -> u64 {
        self.state.lock().mmu_invalidate_in_progress
    }

    /// Rule 4, second half: maps `gfn` to `hpa` unless an invalidation
    /// overlapping it is in flight or the sequence moved since `seq`.
    pub fn install<M: PhysMem>(
        &self,
        mem: &M,
        frames: &mut FrameAllocator,
        gfn: u64,
        hpa: PhysAddr,
        perms: Perms,
        seq: u64,
    ) -> Install {
        let mut s = self.state.lock();
        let gpa = gfn << PAGE_SHIFT;
        if s.retry_gfn(seq, gfn) {
            if matches!(s.tables.lookup(mem, gpa), Some(l) if l.hpa == hpa && l.perms.contains(perms)) {
                return Install::AlreadyPresent;
            }
            s.stats.retries += 1;
            return Install::Retry;
        }
        match s.tables.map_4k(mem, frames, gpa, hpa, perms) {
            Ok(old) => {
                s.stats.installs += 1;
                // Adding rights needs no flush (a stale entry with fewer
                // rights faults and is re-walked); a different frame does.
                if matches!(old, Some(l) if l.hpa != hpa) {
                    s.flush();
                }
                Install::Installed
            }
            Err(MapError::OutOfFrames) => Install::OutOfFrames,
            Err(e) => panic!("install of gfn {gfn:#x}: {e:?}"),
        }
    }

    /// The translation the hardware would use for `gfn`.
    pub fn lookup<M: PhysMem>(&self, mem: &M, gfn: u64) -> Option<Leaf> {
        self.state.lock().tables.lookup(mem, gfn << PAGE_SHIFT)
    }

    pub fn stats(&self) -> MmuStats {
        self.state.lock().stats
    }

    /// The tables, under the lock (tests look at raw entries).
    #[cfg(test)]
    pub(crate) fn with_tables<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.state.lock().tables)
    }

    pub fn table_frames(&self) -> usize {
        self.state.lock().tables.table_frames()
    }

    /// Frees the tables (the VM is gone; its frames are the caller's).
    pub fn destroy<M: PhysMem>(self, mem: &M, frames: &mut FrameAllocator) {
        self.state.into_inner().tables.destroy(mem, frames);
    }
}

impl Mmu<EptTables> {
    /// The EPTP for the VMCS; `accessed_dirty` sets bit 6 (SDM 24.6.11,
    /// 29.3.5). Pass [`Mmu::accessed_dirty`]: the CPU must set the dirty
    /// flags the dedupe scanner relies on when the tables track them.
    pub fn eptp(&self, accessed_dirty: bool) -> u64 {
        assert!(
            accessed_dirty || !self.accessed_dirty,
            "the tables track dirty flags: the EPTP must enable them (eptp(mmu.accessed_dirty()))"
        );
        crate::ept::eptp(self.root, accessed_dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::Arena;

    struct Rig {
        mem: Arena,
        frames: FrameAllocator,
        flushes: CountingFlush,
    }

    fn rig(mode: NotifierMode) -> (Rig, Mmu) {
        let mem = Arena::new(0x100_0000, 64);
        let mut frames = FrameAllocator::new([mem.range()]);
        let flushes = CountingFlush::default();
        let mmu = Mmu::new(&mem, &mut frames, Box::new(flushes.clone()), mode).unwrap();
        (Rig { mem, frames, flushes }, mmu)
    }

    fn map(r: &mut Rig, mmu: &Mmu, gfn: u64, perms: Perms) -> PhysAddr {
        let f = r.frames.alloc().unwrap();
        let seq = mmu.invalidate_seq();
        assert_eq!(mmu.install(&r.mem, &mut r.frames, gfn, f, perms, seq), Install::Installed);
        f
    }

    #[test]
    fn bracket_counts_sequences_and_flushes_only_live_entries() {
        let (mut r, mmu) = rig(NotifierMode::ChangePte);
        let f = map(&mut r, &mmu, 5, Perms::RWX);
        // Nothing live in the range: no flush.
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange { start: 10, end: 20 }, InvalidateEvent::Clear);
        assert_eq!(mmu.invalidate_in_progress(), 1);
        assert_eq!(r.flushes.count(), 0);
        // A second, overlapping one: the union grows.
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange { start: 4, end: 6 }, InvalidateEvent::WriteProtect);
        assert_eq!(mmu.invalidate_in_progress(), 2);
        assert_eq!(r.flushes.count(), 1, "a writable entry lost write access");
        assert_eq!(mmu.lookup(&r.mem, 5).unwrap().perms, Perms::RX);
        {
            let s = mmu.state.lock();
            assert_eq!((s.mmu_invalidate_range_start, s.mmu_invalidate_range_end), (4, 20));
        }
        mmu.invalidate_range_end(GfnRange { start: 10, end: 20 });
        {
            let s = mmu.state.lock();
            assert_eq!((s.mmu_invalidate_range_start, s.mmu_invalidate_range_end), (4, 6));
            assert_eq!(s.mmu_invalidate_seq, 1);
        }
        mmu.invalidate_range_end(GfnRange { start: 4, end: 6 });
        assert_eq!(mmu.invalidate_in_progress(), 0);
        assert_eq!(mmu.invalidate_seq(), 2);
        // Clear zaps.
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange::one(5), InvalidateEvent::Clear);
        assert_eq!(mmu.lookup(&r.mem, 5), None);
        mmu.invalidate_range_end(GfnRange::one(5));
        assert_eq!(r.flushes.count(), 2);
        let st = mmu.stats();
        assert_eq!((st.invalidate_range_start, st.invalidate_range_end, st.warnings), (3, 3, 0));
        mmu.destroy(&r.mem, &mut r.frames);
        r.frames.free(f).unwrap();
        assert_eq!(r.frames.free_frames(), 64);
    }

    #[test]
    fn change_pte_installs_inside_a_change_bracket_without_bumping_seq() {
        let (mut r, mmu) = rig(NotifierMode::ChangePte);
        let old = map(&mut r, &mmu, 7, Perms::RWX);
        let new = r.frames.alloc().unwrap();
        let g = GfnRange::one(7);
        mmu.invalidate_range_start(&r.mem, &mut r.frames, g, InvalidateEvent::Change);
        assert_eq!(mmu.lookup(&r.mem, 7).unwrap(), Leaf { hpa: old, perms: Perms::RX, size: 4096 });
        let seq = mmu.invalidate_seq();
        mmu.change_pte(&r.mem, 7, new, Perms::RX);
        assert_eq!(mmu.invalidate_seq(), seq, "change_pte leaves the sequence alone");
        assert_eq!(mmu.lookup(&r.mem, 7).unwrap(), Leaf { hpa: new, perms: Perms::RX, size: 4096 });
        let flushes = r.flushes.count();
        mmu.invalidate_range_end(g);
        assert_eq!(r.flushes.count(), flushes + 1, "old frame flushed before the end returns");
        assert_eq!(mmu.invalidate_seq(), seq + 1);
        let st = mmu.stats();
        assert_eq!((st.change_pte, st.change_pte_installed, st.warnings), (1, 1, 0));
    }

    #[test]
    fn linux_zap_mode_leaves_change_pte_nothing_to_change() {
        let (mut r, mmu) = rig(NotifierMode::LinuxZap);
        map(&mut r, &mmu, 7, Perms::RWX);
        let new = r.frames.alloc().unwrap();
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange::one(7), InvalidateEvent::Change);
        assert_eq!(mmu.lookup(&r.mem, 7), None);
        mmu.change_pte(&r.mem, 7, new, Perms::RX);
        assert_eq!(mmu.lookup(&r.mem, 7), None);
        mmu.invalidate_range_end(GfnRange::one(7));
        let st = mmu.stats();
        assert_eq!((st.change_pte, st.change_pte_installed, st.warnings), (1, 0, 0));
    }

    #[test]
    fn contract_violations_warn_count_and_leave_a_consistent_state() {
        let (mut r, mmu) = rig(NotifierMode::ChangePte);
        let old = map(&mut r, &mmu, 3, Perms::RWX);
        let new = r.frames.alloc().unwrap();
        // Outside any bracket: zapped (not installed), seq moves, no panic.
        let seq = mmu.invalidate_seq();
        mmu.change_pte(&r.mem, 3, new, Perms::RX);
        assert_eq!(mmu.lookup(&r.mem, 3), None);
        assert_eq!(mmu.stats().warnings, 1);
        assert!(mmu.invalidate_seq() > seq);
        assert_eq!(mmu.invalidate_in_progress(), 0);
        // Inside a bracket but for a page of no Change range.
        map(&mut r, &mmu, 4, Perms::RWX);
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange::one(3), InvalidateEvent::Change);
        mmu.change_pte(&r.mem, 4, new, Perms::RX);
        assert_eq!(mmu.lookup(&r.mem, 4), None);
        mmu.invalidate_range_end(GfnRange::one(3));
        assert_eq!(mmu.stats().warnings, 2);
        // End without start.
        mmu.invalidate_range_end(GfnRange::one(3));
        assert_eq!(mmu.invalidate_in_progress(), 0, "no underflow");
        assert_eq!(mmu.stats().warnings, 3);
        // End of a range never started, while another is in flight.
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange::one(9), InvalidateEvent::Clear);
        mmu.invalidate_range_end(GfnRange::one(8));
        assert_eq!(mmu.invalidate_in_progress(), 0);
        assert_eq!(mmu.stats().warnings, 4);
        // Still usable.
        let seq = mmu.invalidate_seq();
        assert_eq!(mmu.install(&r.mem, &mut r.frames, 3, old, Perms::RWX, seq), Install::Installed);
        assert_eq!(mmu.lookup(&r.mem, 3).unwrap().hpa, old);
    }

    #[test]
    fn fault_path_retries_across_overlapping_invalidations() {
        let (mut r, mmu) = rig(NotifierMode::ChangePte);
        let f = r.frames.alloc().unwrap();
        // Snapshot, then an overlapping invalidation starts: retry.
        let seq = mmu.invalidate_seq();
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange { start: 0, end: 8 }, InvalidateEvent::Clear);
        assert_eq!(mmu.install(&r.mem, &mut r.frames, 2, f, Perms::RWX, seq), Install::Retry);
        // A page outside the in-flight range with an unchanged sequence is fine.
        assert_eq!(mmu.install(&r.mem, &mut r.frames, 9, f, Perms::RWX, seq), Install::Installed);
        mmu.invalidate_range_end(GfnRange { start: 0, end: 8 });
        // Ended since the snapshot: still retry.
        assert_eq!(mmu.install(&r.mem, &mut r.frames, 2, f, Perms::RWX, seq), Install::Retry);
        assert_eq!(mmu.lookup(&r.mem, 2), None);
        // A fresh snapshot installs.
        let seq = mmu.invalidate_seq();
        assert_eq!(mmu.install(&r.mem, &mut r.frames, 2, f, Perms::RWX, seq), Install::Installed);
        assert_eq!(mmu.stats().retries, 2);
        // A stale snapshot whose mapping is already there: nothing to do.
        assert_eq!(mmu.install(&r.mem, &mut r.frames, 2, f, Perms::RX, seq - 1), Install::AlreadyPresent);
    }

    #[test]
    fn install_reports_out_of_frames() {
        let (mut r, mmu) = rig(NotifierMode::ChangePte);
        let mut hoard = Vec::new();
        while let Some(f) = r.frames.alloc() {
            hoard.push(f);
        }
        let seq = mmu.invalidate_seq();
        assert_eq!(mmu.install(&r.mem, &mut r.frames, 1 << 30, hoard[0], Perms::RWX, seq), Install::OutOfFrames);
    }

    #[test]
    fn cleared_dirty_flags_are_flushed_once() {
        let (mut r, mut mmu) = rig(NotifierMode::ChangePte);
        map(&mut r, &mmu, 1, Perms::RWX);
        map(&mut r, &mmu, 2, Perms::RWX);
        assert!(!mmu.hw_access(&r.mem, 1, true), "no A/D yet");
        assert!(mmu.enable_accessed_dirty() && mmu.accessed_dirty());
        assert!(mmu.hw_access(&r.mem, 1, true));
        assert!(mmu.hw_access(&r.mem, 2, true));
        assert_eq!(mmu.test_and_clear_dirty(&r.mem, 1), Some(true));
        assert_eq!(mmu.test_and_clear_dirty(&r.mem, 2), Some(true));
        assert_eq!(mmu.test_and_clear_dirty(&r.mem, 3), None);
        assert_eq!(r.flushes.count(), 0, "the flush waits for the batch");
        mmu.flush_cleared_dirty();
        mmu.flush_cleared_dirty();
        assert_eq!(r.flushes.count(), 1);
        // Clean pages need no flush.
        assert_eq!(mmu.test_and_clear_dirty(&r.mem, 1), Some(false));
        mmu.flush_cleared_dirty();
        assert_eq!(r.flushes.count(), 1);
        // Any flush (here a write-protect bracket's) covers a pending one.
        mmu.hw_access(&r.mem, 2, true);
        assert_eq!(mmu.test_and_clear_dirty(&r.mem, 2), Some(true));
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange::one(1), InvalidateEvent::WriteProtect);
        mmu.invalidate_range_end(GfnRange::one(1));
        assert_eq!(r.flushes.count(), 2);
        mmu.flush_cleared_dirty();
        assert_eq!(r.flushes.count(), 2);
        assert_eq!(mmu.stats().dirty_cleared, 3);
        assert_ne!(mmu.eptp(true) & (1 << 6), 0);
    }

    #[test]
    fn deferred_flushes_are_one_at_the_end_of_the_batch() {
        let (mut r, mmu) = rig(NotifierMode::ChangePte);
        let old = map(&mut r, &mmu, 7, Perms::RWX);
        map(&mut r, &mmu, 8, Perms::RWX);
        let new = r.frames.alloc().unwrap();
        mmu.defer_flushes();
        for gfn in [7, 8] {
            let g = GfnRange::one(gfn);
            mmu.invalidate_range_start(&r.mem, &mut r.frames, g, InvalidateEvent::Change);
            // The entry is write-protected at once; only the flush waits.
            assert_eq!(mmu.lookup(&r.mem, gfn).unwrap().perms, Perms::RX);
            mmu.change_pte(&r.mem, gfn, new, Perms::RX);
            assert_eq!(mmu.lookup(&r.mem, gfn).unwrap().hpa, new);
            mmu.invalidate_range_end(g);
        }
        assert_eq!(r.flushes.count(), 0, "owed, not done");
        assert_eq!(mmu.invalidate_seq(), 2);
        mmu.flush_deferred();
        assert_eq!(r.flushes.count(), 1, "one flush for the batch");
        let st = mmu.stats();
        assert_eq!((st.tlb_flushes, st.tlb_flushes_deferred), (1, 4));
        // Nothing owed: no flush; and after the batch flushes are immediate.
        mmu.defer_flushes();
        mmu.flush_deferred();
        assert_eq!(r.flushes.count(), 1);
        mmu.invalidate_range_start(&r.mem, &mut r.frames, GfnRange::one(7), InvalidateEvent::Clear);
        assert_eq!(r.flushes.count(), 2);
        mmu.invalidate_range_end(GfnRange::one(7));
        r.frames.free(old).unwrap();
    }

    #[test]
    #[should_panic(expected = "EPTP must enable them")]
    fn an_eptp_without_a_d_for_tracked_tables_is_refused() {
        let (_r, mut mmu) = rig(NotifierMode::ChangePte);
        mmu.enable_accessed_dirty();
        mmu.eptp(false);
    }

    #[test]
    fn eptp_points_at_the_root() {
        let (_r, mmu) = rig(NotifierMode::ChangePte);
        assert_eq!(mmu.eptp(false) & crate::ept::ADDR_MASK, mmu.root().0);
        assert_eq!(mmu.eptp(false) & 0x3f, 0x1e);
    }
}

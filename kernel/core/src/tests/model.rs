//! Model-based test: random guest reads and writes (through the EPT, with
//! the simulated guest taking EPT violations), hypervisor accesses, scans
//! (merges), COW breaks and discards, over the real page manager, EPT and
//! notifier on an arena, against a flat reference memory. The VMs have
//! frame quotas, often small enough to be met, and every VM's charge is
//! checked against a walk of its page map and its EPT tables.

use super::*;
use crate::dedupe::SharingPolicy;
use crate::ept::{EptFlags, ADDR_MASK};
use crate::page_manager::{Outcome, PmError, DEFAULT_FRAME_QUOTA, F_CSUM, F_TRACKED, NO_FRAME};
use crate::phys::{PhysAddr, PhysMem};
use crate::sim::SimGuest;
use crate::stage2::Perms;
use alloc::vec;
use alloc::vec::Vec;
use proptest::prelude::*;

const VMS: usize = 3;
const PAGES: u64 = 10;

#[derive(Clone, Debug)]
enum Op {
    /// The guest fills a page with one of a few contents (0 = zero page),
    /// so that equal pages are common.
    Fill { vm: usize, page: u64, byte: u8 },
    /// The guest writes one byte.
    Poke { vm: usize, page: u64, off: u16, byte: u8 },
    /// The guest reads a page and checks it.
    Read { vm: usize, page: u64 },
    /// The hypervisor writes or reads guest memory.
    HvPoke { vm: usize, page: u64, off: u16, byte: u8 },
    HvRead { vm: usize, page: u64 },
    Scan { batch: u8 },
    Discard { vm: usize, page: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..VMS;
    let page = 0..PAGES;
    prop_oneof![
        4 => (vm.clone(), page.clone(), 0u8..4).prop_map(|(vm, page, byte)| Op::Fill { vm, page, byte }),
        2 => (vm.clone(), page.clone(), 0u16..4096, any::<u8>()).prop_map(|(vm, page, off, byte)| Op::Poke { vm, page, off, byte }),
        3 => (vm.clone(), page.clone()).prop_map(|(vm, page)| Op::Read { vm, page }),
        1 => (vm.clone(), page.clone(), 0u16..4096, any::<u8>()).prop_map(|(vm, page, off, byte)| Op::HvPoke { vm, page, off, byte }),
        1 => (vm.clone(), page.clone()).prop_map(|(vm, page)| Op::HvRead { vm, page }),
        4 => (1u8..40).prop_map(|batch| Op::Scan { batch }),
        1 => (vm, page).prop_map(|(vm, page)| Op::Discard { vm, page }),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    mode: NotifierMode,
    policy: SharingPolicy,
    max_page_sharing: u32,
    use_zero_pages: bool,
    /// Dirty tracking (EPT A/D flags) instead of re-hashing every look.
    track_dirty: bool,
    /// With tracking: merge at the first look (else KSM's two looks).
    first_look: bool,
    frames: usize,
    /// Each VM's frame quota.
    quotas: [usize; VMS],
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(NotifierMode::ChangePte), Just(NotifierMode::LinuxZap)],
        prop_oneof![Just(SharingPolicy::AllVms), Just(SharingPolicy::SameVm), Just(SharingPolicy::Groups)],
        2u32..5,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        // Enough for everything, or tight enough to run out now and then.
        prop_oneof![3 => Just(64usize), 1 => 30usize..44],
        // A VM needs up to PAGES + 4 (root, PDPT, PD, PT): the default, or
        // a quota it meets (1: the root only, no page at all).
        [quota(), quota(), quota()],
    )
        .prop_map(|(mode, policy, max_page_sharing, use_zero_pages, track_dirty, first_look, frames, quotas)| Setup {
            mode,
            policy,
            max_page_sharing,
            use_zero_pages,
            track_dirty,
            first_look,
            frames,
            quotas,
        })
}

fn quota() -> impl Strategy<Value = usize> {
    prop_oneof![2 => Just(DEFAULT_FRAME_QUOTA), 2 => 1usize..(PAGES as usize + 4)]
}

/// Table frames reachable from the root of the VM's EPT, by walking the
/// entries as the processor does (not the tables' own count).
fn ept_tables_walked(pm: &PageManager<Arena>, v: VmId) -> usize {
    fn walk(mem: &Arena, table: PhysAddr, level: u32) -> usize {
        let mut n = 1;
        if level > 1 {
            for &e in mem.table_mut(table).iter() {
                if e & 0b111 != 0 && e & EptFlags::LARGE.bits() == 0 {
                    n += walk(mem, PhysAddr(e & ADDR_MASK), level - 1);
                }
            }
        }
        n
    }
    walk(pm.mem(), pm.mmu(v).unwrap().root(), 4)
}

/// The charge of every VM is exactly its private frames (pages whose entry
/// holds a frame that is not merged) plus its EPT table frames, and never
/// above its quota; and every frame taken from the pool (`total` frames) is
/// charged to a VM or is a merged frame.
fn check_charges(pm: &PageManager<Arena>, vms: &[VmId], quotas: &[usize], total: usize) -> Result<(), TestCaseError> {
    let mut merged = alloc::collections::BTreeSet::new();
    let mut charged = 0;
    for (i, &v) in vms.iter().enumerate() {
        let vmr = pm.vm(v).unwrap();
        let private = vmr.slots.iter().flat_map(|s| &s.pages).filter(|e| e.frame != NO_FRAME && !e.shared()).count();
        let tables = ept_tables_walked(pm, v);
        prop_assert_eq!(tables, pm.mmu(v).unwrap().table_frames());
        let (st, _) = pm.vm_stats(v).unwrap();
        prop_assert_eq!(st.frames_held, (private + tables) as u64, "vm {} charge", i);
        prop_assert!(st.frames_held <= quotas[i] as u64, "vm {} over its quota", i);
        prop_assert!(st.frames_held <= st.frames_peak);
        prop_assert!(st.frames_peak <= quotas[i] as u64);
        charged += st.frames_held;
        merged.extend(vmr.slots.iter().flat_map(|s| &s.pages).filter(|e| e.shared()).map(|e| e.frame));
    }
    prop_assert_eq!((total - pm.frames().free_frames()) as u64, charged + merged.len() as u64, "a frame is nobody's");
    prop_assert_eq!(pm.stats().vm.frames_held, charged);
    Ok(())
}

/// Invariants that hold between any two operations.
fn check(pm: &PageManager<Arena>, vms: &[VmId], last_seq: &mut [u64]) -> Result<(), TestCaseError> {
    pm.check_consistency().map_err(TestCaseError::fail)?;
    for (i, &v) in vms.iter().enumerate() {
        let mmu = pm.mmu(v).unwrap();
        let (_, st) = pm.vm_stats(v).unwrap();
        prop_assert_eq!(mmu.invalidate_in_progress(), 0);
        prop_assert_eq!(st.warnings, 0);
        prop_assert_eq!(st.invalidate_range_start, st.invalidate_range_end);
        // Every end bumped the sequence once, nothing else did.
        let seq = mmu.invalidate_seq();
        prop_assert_eq!(seq, st.invalidate_range_end);
        prop_assert!(seq >= last_seq[i]);
        last_seq[i] = seq;
        // Dirty tracking: a page whose checksum is tracked and whose leaf
        // is present and clean still has the content it was hashed with
        // (else the scanner would take a changed page for unchanged).
        let vmr = pm.vm(v).unwrap();
        prop_assert_eq!(vmr.track_dirty, mmu.accessed_dirty());
        for slot in &vmr.slots {
            for (k, e) in slot.pages.iter().enumerate() {
                let tracked = F_CSUM | F_TRACKED;
                if e.shared() || e.flags() & tracked != tracked {
                    continue;
                }
                prop_assert!(vmr.track_dirty);
                let raw = mmu.with_tables(|t| t.raw_entry(pm.mem(), (slot.base_gfn + k as u64) << 12));
                if let Some((leaf, 1)) = raw {
                    if leaf & EptFlags::DIRTY.bits() == 0 {
                        let now = crate::dedupe::checksum(pm.mem().page(e.pa()));
                        prop_assert_eq!(now, e.aux(), "vm {} page {} changed behind a clean dirty flag", i, k);
                    }
                }
            }
        }
        // The EPT never holds a translation the page manager disagrees
        // with, and never lets the guest write a merged frame.
        for p in 0..PAGES {
            if let Some(l) = mmu.lookup(pm.mem(), gpa(p) >> 12) {
                prop_assert_eq!(Some(l.hpa), pm.backing_frame(v, gpa(p)), "stale EPT entry vm {} page {}", i, p);
                if pm.is_merged(v, gpa(p)) {
                    prop_assert!(!l.perms.contains(Perms::WRITE), "merged page writable");
                }
            }
        }
    }
    Ok(())
}

/// How a model run ends, after its operations.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// Three scans of all memory, so whatever can merge has merged.
    Scans,
    /// The guests read every page (so each is mapped), the scanner moves
    /// on to the start of a pass, and then exactly one full pass runs:
    /// with merging at the first look, after it no two unmerged pages of
    /// a sharing domain hold the same bytes.
    OnePass,
}

fn run(s: Setup, ops: Vec<Op>) -> Result<crate::stats::Stats, TestCaseError> {
    run_with(s, ops, Finish::Scans)
}

fn run_with(s: Setup, ops: Vec<Op>, finish: Finish) -> Result<crate::stats::Stats, TestCaseError> {
    let mut pm = pm(
        s.frames,
        DedupeConfig {
            policy: s.policy,
            max_page_sharing: s.max_page_sharing,
            use_zero_pages: s.use_zero_pages,
            track_dirty: s.track_dirty,
            merge_at_first_look: s.first_look,
        },
    );
    let total = pm.frames().free_frames();
    let groups = [Some("g"), Some("g"), None];
    let vms: Vec<VmId> = (0..VMS).map(|i| vm_with_quota(&mut pm, PAGES, true, s.mode, groups[i], s.quotas[i]).0).collect();
    let mut guests: Vec<SimGuest> = vms.iter().map(|&v| SimGuest::new(v)).collect();
    let mut reference = vec![vec![[0u8; 4096]; PAGES as usize]; VMS];
    let mut last_seq = [0u64; VMS];
    let mut buf = [0u8; 4096];
    for op in ops {
        let held = |pm: &PageManager<Arena>| -> Vec<u64> { vms.iter().map(|&v| pm.vm_stats(v).unwrap().0.frames_held).collect() };
        let (held0, free0) = (held(&pm), pm.frames().free_frames());
        // Which VM a refusal (if any) belongs to.
        let mut refused = None;
        let mut guest = |vm: usize, r: Result<(), Outcome>, pm: &PageManager<Arena>| -> Result<bool, TestCaseError> {
            match r {
                Ok(()) => return Ok(true),
                Err(Outcome::QuotaExceeded) => {
                    refused = Some(vm);
                    // Refused at the quota, never above it.
                    prop_assert_eq!(pm.vm_stats(vms[vm]).unwrap().0.frames_held, s.quotas[vm] as u64);
                }
                Err(Outcome::OutOfMemory) => prop_assert_eq!(pm.frames().free_frames(), 0),
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
            Ok(false)
        };
        match op {
            Op::Fill { vm, page, byte } => {
                let r = guests[vm].fill_page(&mut pm, gpa(page), byte);
                if guest(vm, r, &pm)? {
                    reference[vm][page as usize] = [byte; 4096];
                }
            }
            Op::Poke { vm, page, off, byte } => {
                let r = guests[vm].write(&mut pm, gpa(page) + off as u64, &[byte]);
                if guest(vm, r, &pm)? {
                    reference[vm][page as usize][off as usize] = byte;
                }
            }
            Op::Read { vm, page } => {
                let r = guests[vm].read(&mut pm, gpa(page), &mut buf);
                if guest(vm, r, &pm)? {
                    prop_assert!(buf == reference[vm][page as usize], "guest read vm {} page {}", vm, page);
                }
            }
            Op::HvPoke { vm, page, off, byte } => match pm.write_gpa(vms[vm], gpa(page) + off as u64, &[byte]) {
                Ok(()) => reference[vm][page as usize][off as usize] = byte,
                Err(PmError::QuotaExceeded) => {
                    // Refused before anything was taken or written.
                    prop_assert_eq!(held(&pm), held0.clone());
                    prop_assert_eq!(pm.frames().free_frames(), free0);
                    prop_assert_eq!(held0[vm], s.quotas[vm] as u64);
                }
                Err(e) => prop_assert_eq!(e, PmError::OutOfMemory),
            },
            Op::HvRead { vm, page } => {
                pm.read_gpa(vms[vm], gpa(page), &mut buf).unwrap();
                prop_assert!(buf == reference[vm][page as usize], "hypervisor read vm {} page {}", vm, page);
            }
            Op::Scan { batch } => {
                pm.scan(batch as usize);
            }
            Op::Discard { vm, page } => {
                pm.discard(vms[vm], gpa(page), PAGE).unwrap();
                reference[vm][page as usize] = [0; 4096];
            }
        }
        if let Some(r) = refused {
            // What the refused access took (a page, or tables below the
            // quota) is charged to its VM (check_charges); the other VMs
            // lost nothing.
            let now = held(&pm);
            for (i, (a, b)) in held0.iter().zip(&now).enumerate() {
                if i != r {
                    prop_assert_eq!(a, b, "vm {} changed by vm {}'s refusal", i, r);
                }
            }
        }
        check(&pm, &vms, &mut last_seq)?;
        check_charges(&pm, &vms, &s.quotas, total)?;
    }
    match finish {
        // Merge whatever can be merged, then everything reads back right.
        Finish::Scans => {
            for _ in 0..3 {
                pm.scan(VMS * PAGES as usize);
            }
        }
        Finish::OnePass => {
            for (i, g) in guests.iter_mut().enumerate() {
                for p in 0..PAGES {
                    // A refusal (quota, no frames) leaves the page unbacked.
                    if g.read(&mut pm, gpa(p), &mut buf).is_ok() {
                        prop_assert!(buf == reference[i][p as usize]);
                    }
                }
            }
            let mut n = 0;
            while pm.scan(1).full_scans_completed == 0 {
                n += 1;
                prop_assert!(n <= VMS * PAGES as usize, "no pass ended");
            }
            prop_assert_eq!(pm.scan(VMS * PAGES as usize).full_scans_completed, 1);
            let mut unmerged: Vec<(u32, PhysAddr)> = Vec::new();
            for &v in &vms {
                let vmr = pm.vm(v).unwrap();
                // Only pages the EPT maps have a dirty flag to watch (a page
                // the guest could not map, at its quota, waits for a second
                // look, as without tracking).
                let mapped = |p: u64| pm.mmu(v).unwrap().lookup(pm.mem(), gpa(p) >> 12).is_some();
                let pages = vmr.slots[0].pages.iter().enumerate();
                for (_, e) in pages.filter(|&(p, e)| e.frame != NO_FRAME && !e.shared() && mapped(p as u64)) {
                    let domain = vmr.domain.unwrap();
                    let twin = unmerged.iter().find(|&&(d, f)| d == domain && pm.mem().page(f) == pm.mem().page(e.pa()));
                    prop_assert!(twin.is_none(), "two equal unmerged pages after one pass at the first look");
                    unmerged.push((domain, e.pa()));
                }
            }
        }
    }
    check(&pm, &vms, &mut last_seq)?;
    check_charges(&pm, &vms, &s.quotas, total)?;
    for (i, &v) in vms.iter().enumerate() {
        for p in 0..PAGES {
            pm.read_gpa(v, gpa(p), &mut buf).unwrap();
            prop_assert!(buf == reference[i][p as usize], "final read vm {} page {}", i, p);
        }
    }
    if s.policy == SharingPolicy::SameVm {
        // No frame is shared between VMs.
        for p in 0..PAGES {
            for q in 0..PAGES {
                let (a, b) = (pm.backing_frame(vms[0], gpa(p)), pm.backing_frame(vms[1], gpa(q)));
                prop_assert!(a.is_none() || a != b);
            }
        }
    }
    let stats = pm.stats();
    for v in vms {
        pm.destroy_vm(v).unwrap();
    }
    prop_assert_eq!(pm.frames().free_frames(), total, "frames leaked");
    Ok(stats)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn page_manager_matches_a_flat_memory(s in setup(), ops in proptest::collection::vec(op(), 1..120)) {
        run(s, ops)?;
    }
}

/// A fixed pseudo-random run of the most merge-prone operations
/// (xorshift), with discards and hypervisor writes if `all`.
fn fixed_ops(n: usize, all: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut x = 12345u64;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let vm = (x % VMS as u64) as usize;
        let page = (x >> 8) % PAGES;
        let off = ((x >> 32) % 4096) as u16;
        ops.push(match (x >> 20) % if all { 8 } else { 6 } {
            0 | 1 => Op::Fill { vm, page, byte: ((x >> 30) % 3) as u8 },
            2 => Op::Read { vm, page },
            3 => Op::Poke { vm, page, off, byte: 1 },
            6 => Op::Discard { vm, page },
            7 => Op::HvPoke { vm, page, off, byte: 2 },
            _ => Op::Scan { batch: 13 },
        });
    }
    ops
}

/// The same model with no limits on frames and long runs of the most
/// merge-prone operations: equal pages get merged and broken many times.
#[test]
fn a_long_fixed_run_merges_and_breaks_a_lot() {
    let ops = fixed_ops(3000, false);
    let mut outcome = Vec::new();
    for (track_dirty, first_look) in [(false, true), (true, false), (true, true)] {
        let s = Setup {
            mode: NotifierMode::ChangePte,
            policy: SharingPolicy::AllVms,
            max_page_sharing: 3,
            use_zero_pages: true,
            track_dirty,
            first_look,
            frames: 64,
            quotas: [DEFAULT_FRAME_QUOTA; VMS],
        };
        let st = run(s, ops.clone()).unwrap();
        assert!(st.ksm.merges > 200, "{st:?}");
        assert!(st.vm.cow_breaks > 100, "{st:?}");
        assert!(st.ksm.full_scans > 50, "{st:?}");
        assert_eq!(st.mmu.warnings, 0);
        assert_eq!(st.ksm.checksums_reused > 0, track_dirty, "{st:?}");
        assert_eq!(st.mmu.dirty_cleared > 0, track_dirty, "{st:?}");
        assert_eq!(st.ksm.first_looks > 0, track_dirty && first_look, "{st:?}");
        outcome.push((st.ksm.merges, st.ksm.pages_shared, st.ksm.pages_sharing, st.ksm.zero_pages, st.vm.cow_breaks));
    }
    assert_eq!(outcome[0], outcome[1], "dirty tracking (two looks) changes no merge");
    assert!(outcome[2].0 > outcome[1].0, "merging at the first look merges sooner, so more often in a run that keeps breaking merges: {outcome:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Dirty tracking on and off merge exactly the same pages for the
    /// same operations (with KSM's two looks): a page is found unchanged
    /// by its dirty flag only when re-hashing would have found the same
    /// checksum.
    #[test]
    fn dirty_tracking_merges_exactly_what_checksums_do(
        s in setup(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let off = run(Setup { track_dirty: false, ..s.clone() }, ops.clone())?;
        let on = run(Setup { track_dirty: true, first_look: false, ..s }, ops)?;
        prop_assert_eq!(on.ksm.merges, off.ksm.merges);
        prop_assert_eq!((on.ksm.pages_shared, on.ksm.pages_sharing, on.ksm.zero_pages), (off.ksm.pages_shared, off.ksm.pages_sharing, off.ksm.zero_pages));
        prop_assert_eq!((on.ksm.pages_unshared, on.ksm.pages_volatile), (off.ksm.pages_unshared, off.ksm.pages_volatile));
        prop_assert_eq!(on.vm.cow_breaks, off.vm.cow_breaks);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Merging at the first look (ESX's rule; DedupeConfig::merge_at_first_look):
    /// with dirty tracking, one pass over quiescent, mapped memory merges
    /// every page that has an equal unmerged page in its domain, whatever
    /// the history of merges, breaks and discards before it. (Zero frames
    /// are left out: making one needs a free frame, which may be short.)
    #[test]
    fn at_the_first_look_one_pass_merges_every_equal_page(
        s in setup(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let s = Setup { track_dirty: true, first_look: true, use_zero_pages: false, ..s };
        let st = run_with(s, ops, Finish::OnePass)?;
        prop_assert_eq!(st.mmu.warnings, 0);
    }
}

/// A long run at quotas the VMs keep meeting (one below what a VM's pages
/// and tables need, about half of it, and the root and a few pages),
/// with discards that give frames back: refusals, merges and COW breaks
/// all happen many times, and after every operation each VM's charge is
/// exactly its private frames and tables, never above its quota, and no
/// refusal moved another VM's charge.
#[test]
fn a_long_fixed_run_at_small_quotas() {
    let ops = fixed_ops(3000, true);
    for mode in [NotifierMode::ChangePte, NotifierMode::LinuxZap] {
        let s = Setup {
            mode,
            policy: SharingPolicy::AllVms,
            max_page_sharing: 3,
            use_zero_pages: true,
            track_dirty: true,
            first_look: true,
            frames: 64,
            quotas: [PAGES as usize + 3, 8, 5],
        };
        let st = run(s, ops.clone()).unwrap();
        assert!(st.vm.quota_refusals > 100, "{st:?}");
        assert!(st.ksm.merges > 100, "{st:?}");
        assert!(st.vm.cow_breaks > 50, "{st:?}");
        assert_eq!(st.vm.out_of_memory, 0, "the quotas, not the host, set the limits: {st:?}");
    }
}

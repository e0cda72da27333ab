use super::*;
use crate::dedupe::{SharingPolicy, VmSharing};
use crate::page_manager::{Access, Outcome};
use crate::phys::PhysMem;
use crate::sim::SimGuest;
use crate::stage2::Perms;

fn cfg(policy: SharingPolicy) -> DedupeConfig {
    DedupeConfig { policy, ..DedupeConfig::default() }
}

/// Fills pages of `v` with the given bytes, as its guest would.
fn fill(pm: &mut PageManager<Arena>, v: VmId, bytes: &[u8]) -> SimGuest {
    let mut g = SimGuest::new(v);
    for (p, &b) in bytes.iter().enumerate() {
        g.fill_page(pm, gpa(p as u64), b).unwrap();
    }
    g
}

fn page_bytes(pm: &PageManager<Arena>, v: VmId, p: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    pm.read_gpa(v, gpa(p), &mut b).unwrap();
    b
}

#[test]
fn equal_pages_merge_into_one_read_only_frame() {
    let mut pm = pm(128, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[7, 7, 9, 7]);
    let free = pm.frames().free_frames();
    // First pass: checksums only (KSM merges only pages that held still).
    let r = pm.scan(4);
    assert_eq!((r.merged, r.full_scans_completed), (0, 1));
    assert_eq!((pm.ksm_stats().pages_volatile, pm.ksm_stats().pages_scanned), (4, 4));
    // Second pass merges, third finds nothing new.
    assert_eq!(scan_until_converged(&mut pm), 2);
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (1, 2, 1));
    assert_eq!(s.merges, 3);
    assert_eq!(pm.frames().free_frames(), free + 2);
    let f0 = pm.backing_frame(v, gpa(0)).unwrap();
    assert_eq!(pm.backing_frame(v, gpa(1)), Some(f0));
    assert_eq!(pm.backing_frame(v, gpa(3)), Some(f0));
    assert_ne!(pm.backing_frame(v, gpa(2)), Some(f0));
    for p in [0, 1, 3] {
        let l = pm.mmu(v).unwrap().lookup(pm.mem(), gpa(p) >> 12).unwrap();
        assert_eq!((l.hpa, l.perms), (f0, Perms::RX));
    }
    assert_eq!(page_bytes(&pm, v, 3), [7; 4096]);
    pm.check_consistency().unwrap();
    let (_, mmu) = pm.vm_stats(v).unwrap();
    assert_eq!(mmu.warnings, 0);
    assert_eq!(mmu.invalidate_range_start, mmu.invalidate_range_end);
    assert!(mmu.change_pte >= 2);
}

#[test]
fn a_write_after_a_cross_vm_merge_never_shows_in_the_other_vm() {
    let mut pm = pm(128, DedupeConfig::default());
    let (a, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
    let (b, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
    let mut ga = fill(&mut pm, a, &[0x11, 0x22]);
    let mut gb = fill(&mut pm, b, &[0x11, 0x33]);
    scan_until_converged(&mut pm);
    assert_eq!(pm.backing_frame(a, gpa(0)), pm.backing_frame(b, gpa(0)));
    let one = VmSharing { merged: 1, zero: 0 };
    assert_eq!((pm.vm_sharing(a), pm.vm_sharing(b)), (Some(one), Some(one)));
    let shared = pm.backing_frame(a, gpa(0)).unwrap();
    let before = ga.violations;
    ga.write(&mut pm, gpa(0) + 10, b"A wrote this").unwrap();
    assert_eq!(ga.violations, before + 1, "one write violation for the copy");
    assert_ne!(pm.backing_frame(a, gpa(0)), Some(shared));
    let mut buf = [0u8; 12];
    gb.read(&mut pm, gpa(0) + 10, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 12]);
    assert_eq!(page_bytes(&pm, b, 0), [0x11; 4096]);
    ga.read(&mut pm, gpa(0) + 10, &mut buf).unwrap();
    assert_eq!(&buf, b"A wrote this");
    let (sa, _) = pm.vm_stats(a).unwrap();
    assert_eq!((sa.cow_breaks, sa.write_shared), (1, 1));
    // B still maps the old merged frame; it has one sharer left.
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 0));
    // B's write frees the merged frame.
    let free = pm.frames().free_frames();
    gb.write(&mut pm, gpa(0), &[1]).unwrap();
    assert_eq!(pm.frames().free_frames(), free, "one new frame, the merged one freed");
    assert_eq!(pm.ksm_stats().pages_shared, 0);
    assert!(!pm.frames().is_allocated(shared));
    pm.check_consistency().unwrap();
}

#[test]
fn zero_pages_share_one_zero_frame_without_a_cap() {
    let mut pm = pm(128, DedupeConfig { max_page_sharing: 2, ..DedupeConfig::default() });
    let (v, _) = vm(&mut pm, 10, true, NotifierMode::ChangePte, None);
    let mut g = fill(&mut pm, v, &[0, 0, 0, 0, 0, 0, 0, 0, 5, 5]);
    assert_eq!(pm.scan(10).merged, 0);
    assert_eq!(pm.scan(10).merged, 10);
    // The pass's own count (convergence waits for a pass that merged none).
    assert_eq!(pm.last_pass(), Some(crate::dedupe::PassStats { merged: 10, changed: 0 }));
    assert_eq!(scan_until_converged(&mut pm), 1, "one pass that changes nothing");
    let s = pm.ksm_stats();
    assert_eq!(s.zero_pages, 8);
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 1));
    let z = pm.backing_frame(v, gpa(0)).unwrap();
    for p in 0..8 {
        assert_eq!(pm.backing_frame(v, gpa(p)), Some(z));
    }
    assert!(pm.mem().page(z).iter().all(|&b| b == 0));
    // COW from the zero frame.
    g.write(&mut pm, gpa(3) + 1, &[9]).unwrap();
    assert_eq!(page_bytes(&pm, v, 3)[..3], [0, 9, 0]);
    assert_eq!(page_bytes(&pm, v, 4), [0; 4096]);
    assert_eq!(pm.ksm_stats().zero_pages, 7);
    assert_eq!(pm.vm_sharing(v), Some(VmSharing { merged: 2, zero: 7 }));
    assert_eq!(pm.vm_sharing(VmId(9)), None);
    pm.check_consistency().unwrap();
}

#[test]
fn without_use_zero_pages_zero_pages_merge_like_others() {
    let mut pm = pm(128, DedupeConfig { use_zero_pages: false, ..DedupeConfig::default() });
    let (v, _) = vm(&mut pm, 6, true, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[0; 6]);
    scan_until_converged(&mut pm);
    let s = pm.ksm_stats();
    assert_eq!((s.zero_pages, s.pages_shared, s.pages_sharing), (0, 1, 5));
}

#[test]
fn policy_off_merges_nothing() {
    let mut pm = pm(128, cfg(SharingPolicy::Off));
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[1, 1, 0, 0]);
    for _ in 0..4 {
        assert_eq!(pm.scan(100).visited, 0);
    }
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.zero_pages, s.full_scans), (0, 0, 0, 0));
}

#[test]
fn non_mergeable_slots_are_left_alone() {
    let mut pm = pm(128, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, false, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[1, 1, 0, 0]);
    let r = pm.scan(100);
    assert_eq!(r.visited, 0);
    assert_eq!(pm.ksm_stats().merges, 0);
}

#[test]
fn same_vm_only_keeps_vms_apart() {
    let mut pm = pm(128, cfg(SharingPolicy::SameVm));
    let (a, _) = vm(&mut pm, 3, true, NotifierMode::ChangePte, None);
    let (b, _) = vm(&mut pm, 3, true, NotifierMode::ChangePte, None);
    fill(&mut pm, a, &[4, 4, 0]);
    fill(&mut pm, b, &[4, 4, 0]);
    scan_until_converged(&mut pm);
    let (fa, fb) = (pm.backing_frame(a, gpa(0)).unwrap(), pm.backing_frame(b, gpa(0)).unwrap());
    assert_ne!(fa, fb);
    assert_eq!(pm.backing_frame(a, gpa(1)), Some(fa));
    assert_eq!(pm.backing_frame(b, gpa(1)), Some(fb));
    assert_ne!(pm.backing_frame(a, gpa(2)), pm.backing_frame(b, gpa(2)), "a zero frame per VM");
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.zero_pages), (2, 2, 2));
}

#[test]
fn named_groups_share_only_inside_a_group() {
    let mut pm = pm(128, cfg(SharingPolicy::Groups));
    let (a, _) = vm(&mut pm, 1, true, NotifierMode::ChangePte, Some("red"));
    let (b, _) = vm(&mut pm, 1, true, NotifierMode::ChangePte, Some("red"));
    let (c, _) = vm(&mut pm, 1, true, NotifierMode::ChangePte, Some("blue"));
    let (d, _) = vm(&mut pm, 1, true, NotifierMode::ChangePte, None);
    for v in [a, b, c, d] {
        fill(&mut pm, v, &[8]);
    }
    scan_until_converged(&mut pm);
    assert_eq!(pm.backing_frame(a, gpa(0)), pm.backing_frame(b, gpa(0)));
    assert!(pm.is_merged(a, gpa(0)));
    assert!(!pm.is_merged(c, gpa(0)));
    assert!(!pm.is_merged(d, gpa(0)));
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (1, 1, 2));
}

#[test]
fn max_page_sharing_starts_new_frames_with_linux_counts() {
    // 9 equal pages with a cap of 4: 4 + 4 merged, the ninth waits in the
    // unstable index for a twin (KSM's stable_node chains behave so).
    let mut pm = pm(128, DedupeConfig { max_page_sharing: 4, ..DedupeConfig::default() });
    let (v, _) = vm(&mut pm, 9, true, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[3; 9]);
    scan_until_converged(&mut pm);
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 6, 1));
    pm.check_consistency().unwrap();
    // A tenth equal page pairs with the ninth: a third frame.
    pm.add_slot(v, gpa(100), PAGE, true).unwrap();
    let mut g = SimGuest::new(v);
    g.fill_page(&mut pm, gpa(100), 3).unwrap();
    scan_until_converged(&mut pm);
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (3, 7, 0));
    // A COW frees room in a full frame; the next equal page fills it.
    g.write(&mut pm, gpa(0), &[1]).unwrap();
    g.fill_page(&mut pm, gpa(0), 3).unwrap();
    scan_until_converged(&mut pm);
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (3, 7, 0));
    pm.check_consistency().unwrap();
}

#[test]
fn default_cap_is_256_sharers() {
    let mut pm = pm(400, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 300, true, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[0xab; 300]);
    scan_until_converged(&mut pm);
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 298, 0));
    let f0 = pm.backing_frame(v, gpa(0)).unwrap();
    assert_eq!((0..300).filter(|&p| pm.backing_frame(v, gpa(p)) == Some(f0)).count(), 256);
}

#[test]
fn out_of_frames_during_cow_stops_only_that_write() {
    let mut pm = pm(64, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    let mut g = fill(&mut pm, v, &[6, 6, 6, 6]);
    scan_until_converged(&mut pm);
    let shared = pm.backing_frame(v, gpa(0)).unwrap();
    let mut hoard = alloc::vec::Vec::new();
    while let Some(f) = pm.frames.alloc() {
        hoard.push(f);
    }
    assert_eq!(g.write(&mut pm, gpa(1), &[0]), Err(Outcome::OutOfMemory));
    assert_eq!(pm.handle_ept_violation(v, gpa(1), Access::Write), Outcome::OutOfMemory);
    assert_eq!(pm.write_gpa(v, gpa(1), &[0]), Err(crate::page_manager::PmError::OutOfMemory));
    // Nothing changed: still merged, still readable, counts intact.
    assert_eq!(pm.backing_frame(v, gpa(1)), Some(shared));
    assert_eq!(page_bytes(&pm, v, 1), [6; 4096]);
    let mut b = [0u8; 1];
    g.read(&mut pm, gpa(1), &mut b).unwrap();
    assert_eq!(b, [6]);
    pm.check_consistency().unwrap();
    assert_eq!(pm.ksm_stats().pages_sharing, 3);
    let (st, mmu) = pm.vm_stats(v).unwrap();
    assert_eq!(st.out_of_memory, 2);
    assert_eq!(mmu.invalidate_range_start, mmu.invalidate_range_end);
    // With a frame back, the write goes through.
    pm.frames.free(hoard.pop().unwrap()).unwrap();
    g.write(&mut pm, gpa(1), &[0]).unwrap();
    assert_eq!(page_bytes(&pm, v, 1)[0], 0);
    assert_eq!(page_bytes(&pm, v, 2)[0], 6);
}

/// Fills 8 pages with two contents, merges, and returns the violations
/// the guest takes reading all 8 again.
fn rereads_after_merge(mode: NotifierMode) -> (u64, u64) {
    let mut pm = pm(128, DedupeConfig::default());
    let (v, flush) = vm(&mut pm, 8, true, mode, None);
    let mut g = fill(&mut pm, v, &[1, 1, 1, 1, 2, 2, 2, 2]);
    let mut b = [0u8; 8];
    for p in 0..8 {
        g.read(&mut pm, gpa(p), &mut b).unwrap(); // all mapped before the merge
    }
    scan_until_converged(&mut pm);
    let merged = (0..8).filter(|&p| pm.is_merged(v, gpa(p))).count() as u64;
    assert_eq!(merged, 8);
    let before = g.violations;
    for p in 0..8 {
        g.read(&mut pm, gpa(p), &mut b).unwrap();
        assert_eq!(b, [if p < 4 { 1 } else { 2 }; 8]);
        g.read(&mut pm, gpa(p), &mut b).unwrap();
    }
    assert!(flush.count() > 0);
    let refaults = pm.vm_stats(v).unwrap().0.refaults;
    assert_eq!(refaults, g.violations - before, "each fault on a re-read is counted as a refault");
    (g.violations - before, merged)
}

/// Pages the hypervisor wrote (a loaded kernel) and merged before the guest
/// came: the guest's first read of each is a first touch, not a refault.
#[test]
fn a_first_touch_of_a_page_merged_unmapped_is_no_refault() {
    for mode in [NotifierMode::ChangePte, NotifierMode::LinuxZap] {
        let mut pm = pm(64, DedupeConfig::default());
        let (a, _) = vm(&mut pm, 2, true, mode, None);
        let (b, _) = vm(&mut pm, 2, true, mode, None);
        for v in [a, b] {
            pm.write_gpa(v, gpa(0), &[7; 4096]).unwrap();
        }
        scan_until_converged(&mut pm);
        assert!(pm.is_merged(a, gpa(0)) && pm.is_merged(b, gpa(0)));
        let mut g = SimGuest::new(a);
        let mut buf = [0u8; 8];
        g.read(&mut pm, gpa(0), &mut buf).unwrap();
        assert_eq!((buf, g.violations), ([7; 8], 1));
        let st = pm.vm_stats(a).unwrap().0;
        assert_eq!((st.not_present, st.refaults), (1, 0), "{mode:?}");
    }
}

#[test]
fn change_pte_gives_zero_violations_on_reread_linux_zap_one_per_merged_page() {
    let (ours, merged) = rereads_after_merge(NotifierMode::ChangePte);
    assert_eq!(ours, 0);
    // Linux zaps at start; the kept frame of each new merged frame was
    // only write-protected, every page that was replaced takes one fault.
    let (linux, merged_l) = rereads_after_merge(NotifierMode::LinuxZap);
    assert_eq!(merged_l, merged);
    assert_eq!(linux, merged - 2, "one per replaced page (2 kept their frame)");
}

#[test]
fn scan_converges_and_unconverges_when_memory_changes() {
    let mut pm = pm(64, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    let mut g = fill(&mut pm, v, &[1, 2, 3, 4]);
    assert!(!pm.scan_converged());
    scan_until_converged(&mut pm);
    assert!(pm.scan_converged());
    assert_eq!(pm.ksm_stats().pages_unshared, 4);
    g.write(&mut pm, gpa(0), &[9]).unwrap();
    pm.scan(4);
    assert!(!pm.scan_converged(), "the page changed");
    assert_eq!(pm.ksm_stats().pages_volatile, 1);
    scan_until_converged(&mut pm);
    assert!(pm.ksm_stats().full_scans >= 4);
}

#[test]
fn one_change_bracket_per_merge() {
    let mut pm = pm(128, DedupeConfig::default());
    let (v, flush) = vm(&mut pm, 3, true, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[7, 7, 7]);
    pm.scan(3); // checksums only
    let before = pm.vm_stats(v).unwrap().1;
    // Page 0 waits in the unstable index, page 1 pairs with it (the twin is
    // write-protected, page 1 is merged in one Change bracket), page 2
    // joins the new merged frame (one Change bracket).
    pm.scan(3);
    let after = pm.vm_stats(v).unwrap().1;
    assert_eq!(pm.ksm_stats().merges, 3);
    assert_eq!(after.invalidate_range_start - before.invalidate_range_start, 3);
    assert_eq!(after.invalidate_range_end - before.invalidate_range_end, 3);
    assert_eq!(after.change_pte - before.change_pte, 2);
    assert_eq!(after.change_pte_installed - before.change_pte_installed, 2);
    assert_eq!(after.warnings, 0);
    // Three write-protects of live entries and two frame replacements
    // called for flushes: one INVEPT for the batch, after which the two
    // private frames merged away are free.
    assert_eq!(after.tlb_flushes - before.tlb_flushes, 1);
    assert_eq!(after.tlb_flushes_deferred - before.tlb_flushes_deferred, 5);
    assert_eq!(flush.count(), after.tlb_flushes);
    pm.check_consistency().unwrap();
}

/// The consistency check is the tests' oracle: it must see a merged
/// frame's count that no longer matches its mappings, for merged frames
/// (a count one too low, then a record gone) and for zero frames.
#[test]
fn the_consistency_check_sees_counts_that_differ_from_the_mappings() {
    for (bytes, zero) in [([7u8, 7, 7], false), ([0, 0, 0], true)] {
        let mut pm = pm(128, DedupeConfig::default());
        let (v, _) = vm(&mut pm, 3, true, NotifierMode::ChangePte, None);
        fill(&mut pm, v, &bytes);
        scan_until_converged(&mut pm);
        assert_eq!(pm.ksm_stats().zero_pages, if zero { 3 } else { 0 });
        pm.check_consistency().unwrap();
        let want = if zero { "zero frame count differs from its mappings" } else { "merged frame count differs from its mappings" };
        // Drop references without touching the pages mapped to the frame.
        let PageManager { frames, vms, ksm, .. } = &mut pm;
        let vm = vms[v.0 as usize].as_ref().unwrap();
        let (e, d) = (vm.slots[0].pages[0], vm.domain.unwrap());
        ksm.put(frames, d, &e);
        assert_eq!(pm.check_consistency(), Err(want));
        let PageManager { frames, ksm, .. } = &mut pm;
        ksm.put(frames, d, &e);
        ksm.put(frames, d, &e);
        assert_eq!(pm.check_consistency(), Err("page mapped to a merged frame missing from the index"));
    }
}

#[test]
fn a_failed_compare_ends_the_bracket_and_leaves_the_page_write_protected() {
    for mode in [NotifierMode::ChangePte, NotifierMode::LinuxZap] {
        let mut pm = pm(128, DedupeConfig::default());
        let (v, _) = vm(&mut pm, 3, true, mode, None);
        let mut g = fill(&mut pm, v, &[7, 7, 9]);
        scan_until_converged(&mut pm);
        let (target, sum) = {
            let vm = pm.vm(v).unwrap();
            let e = vm.slots[0].pages[0];
            assert!(e.shared());
            (pm.ksm.target_of(vm.domain.unwrap(), &e).unwrap(), e.aux())
        };
        let own = pm.backing_frame(v, gpa(2)).unwrap();
        let before = pm.vm_stats(v).unwrap().1;
        // Page 2 (all 9s) against the merged frame of 7s, as after a hash
        // collision: the compare fails inside the Change bracket.
        {
            let PageManager { mem, frames, vms, ksm, .. } = &mut pm;
            let vm = vms[v.0 as usize].as_mut().unwrap();
            assert!(!crate::dedupe::merge_into(mem, frames, ksm, vm, 0, 2, target, sum));
        }
        let after = pm.vm_stats(v).unwrap().1;
        assert_eq!(after.invalidate_range_start - before.invalidate_range_start, 1);
        assert_eq!(after.invalidate_range_end - before.invalidate_range_end, 1);
        assert_eq!(after.change_pte, before.change_pte, "no change_pte without a match");
        assert_eq!(pm.mmu(v).unwrap().invalidate_in_progress(), 0);
        assert_eq!(pm.mmu(v).unwrap().invalidate_seq(), after.invalidate_range_end);
        assert_eq!(pm.ksm_stats().compare_mismatches, 1);
        assert!(!pm.is_merged(v, gpa(2)));
        assert_eq!(pm.backing_frame(v, gpa(2)), Some(own));
        match pm.mmu(v).unwrap().lookup(pm.mem(), gpa(2) >> 12) {
            Some(l) => assert_eq!((l.hpa, l.perms), (own, Perms::RX), "write-protected, same frame"),
            None => assert_eq!(mode, NotifierMode::LinuxZap, "only Linux's mode zaps"),
        }
        // Ours: the guest reads without a fault, and its write takes one
        // write-protect violation that maps the page writable again.
        // Linux's mode: the read faults the page back in (writable).
        let mut b = [0u8; 1];
        let faults = g.violations;
        g.read(&mut pm, gpa(2), &mut b).unwrap();
        assert_eq!(b, [9]);
        let zap = mode == NotifierMode::LinuxZap;
        assert_eq!(g.violations, faults + zap as u64);
        let (st0, _) = pm.vm_stats(v).unwrap();
        let faults = g.violations;
        g.write(&mut pm, gpa(2), &[1]).unwrap();
        assert_eq!(g.violations, faults + !zap as u64);
        let (st1, mmu) = pm.vm_stats(v).unwrap();
        assert_eq!(st1.write_protected - st0.write_protected, !zap as u64);
        assert_eq!(st1.cow_breaks, st0.cow_breaks, "a private page: no copy");
        let l = pm.mmu(v).unwrap().lookup(pm.mem(), gpa(2) >> 12).unwrap();
        assert_eq!((l.hpa, l.perms), (own, Perms::RWX));
        assert_eq!(page_bytes(&pm, v, 2)[..2], [1, 9]);
        assert_eq!(mmu.warnings, 0);
        pm.check_consistency().unwrap();
        // The merged pages are untouched.
        assert_eq!(page_bytes(&pm, v, 0), [7; 4096]);
        assert_eq!(page_bytes(&pm, v, 1), [7; 4096]);
    }
}

// ---------------------------------------------------------------------------
// Dirty tracking (DedupeConfig::track_dirty): EPT dirty flags instead of
// re-hashing unchanged pages.

fn tracking() -> DedupeConfig {
    DedupeConfig { track_dirty: true, ..DedupeConfig::default() }
}

/// Dirty tracking with KSM's two-look rule (no merge at the first look).
fn tracking_two_looks() -> DedupeConfig {
    DedupeConfig { merge_at_first_look: false, ..tracking() }
}

/// The raw dirty flag of the page's leaf (None: not mapped).
fn dirty_flag(pm: &PageManager<Arena>, v: VmId, p: u64) -> Option<bool> {
    let raw = pm.mmu(v).unwrap().with_tables(|t| t.raw_entry(pm.mem(), gpa(p)));
    raw.map(|(e, _)| e & crate::ept::EptFlags::DIRTY.bits() != 0)
}

#[test]
fn tracking_off_hashes_every_look_and_leaves_the_flags_alone() {
    let mut pm = pm(128, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
    assert!(!pm.mmu(v).unwrap().accessed_dirty());
    fill(&mut pm, v, &[1, 2]);
    assert_eq!(dirty_flag(&pm, v, 0), Some(false), "no A/D: the guest's writes set nothing");
    scan_until_converged(&mut pm);
    let s = pm.stats();
    assert_eq!((s.ksm.checksums_reused, s.mmu.dirty_cleared), (0, 0));
    assert_eq!(s.ksm.pages_hashed, s.ksm.pages_scanned, "every look hashed");
    assert_eq!(pm.mmu(v).unwrap().eptp(false) & (1 << 6), 0);
}

#[test]
fn an_unchanged_page_keeps_its_checksum_with_one_flush_per_batch() {
    let mut pm = pm(128, tracking());
    let (v, flush) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    assert!(pm.mmu(v).unwrap().accessed_dirty());
    assert_ne!(pm.mmu(v).unwrap().eptp(true) & (1 << 6), 0);
    fill(&mut pm, v, &[1, 2, 3, 4]);
    for p in 0..4 {
        assert_eq!(dirty_flag(&pm, v, p), Some(true), "the guest's fill set the dirty flag");
    }
    let f0 = flush.count();
    let r = pm.scan(4); // first look: hashed, flags cleared, one flush
    assert_eq!(r.full_scans_completed, 1);
    assert_eq!(flush.count(), f0 + 1, "one INVEPT for the batch");
    for p in 0..4 {
        assert_eq!(dirty_flag(&pm, v, p), Some(false));
    }
    assert_eq!(pm.stats().mmu.dirty_cleared, 4);
    assert_eq!(pm.ksm_stats().pages_hashed, 4);
    pm.scan(4); // nothing written: no hashing, no flush
    assert_eq!((pm.ksm_stats().checksums_reused, pm.ksm_stats().pages_hashed), (4, 4));
    assert_eq!(flush.count(), f0 + 1, "no flag was set, so none to flush");
    assert!(pm.scan_converged() || { pm.scan(4); pm.scan_converged() });
    assert_eq!(pm.ksm_stats().pages_unshared, 4);
}

#[test]
fn a_guest_write_between_looks_is_rehashed_and_not_merged_with_its_old_twin() {
    let mut pm = pm(128, tracking_two_looks());
    let (v, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
    let mut g = fill(&mut pm, v, &[5, 5]);
    pm.scan(2); // pass 1: both hashed with content 5
    g.write(&mut pm, gpa(1), &[6]).unwrap(); // page 1 changes
    assert_eq!(dirty_flag(&pm, v, 1), Some(true));
    let reused = pm.ksm_stats().checksums_reused;
    pm.scan(2); // pass 2: page 0 unchanged, page 1 dirty
    assert_eq!(pm.ksm_stats().checksums_reused, reused + 1, "only page 0 kept its checksum");
    assert!(!pm.is_merged(v, gpa(0)) && !pm.is_merged(v, gpa(1)), "page 1 is no twin of page 0 any more");
    assert_eq!(pm.ksm_stats().pages_volatile, 1);
    // Page 1 gets page 0's content back, after pass 2 cleared its flag and
    // flushed: the write must set the flag again (the model TLB would not
    // set it had the flush been left out).
    g.write(&mut pm, gpa(1), &[5]).unwrap();
    assert_eq!(dirty_flag(&pm, v, 1), Some(true));
    pm.scan(2); // pass 3: page 1 rehashed: changed again, waits
    assert!(!pm.is_merged(v, gpa(1)));
    assert_eq!(pm.ksm_stats().pages_volatile, 1);
    scan_until_converged(&mut pm); // pass 4 merges them
    assert!(pm.is_merged(v, gpa(0)) && pm.is_merged(v, gpa(1)));
    assert_eq!(page_bytes(&pm, v, 1), [5; 4096]);
    pm.check_consistency().unwrap();
}

#[test]
fn a_hypervisor_write_is_rehashed_too() {
    let mut pm = pm(128, tracking_two_looks());
    let (v, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[5, 5]);
    pm.scan(2);
    pm.write_gpa(v, gpa(1) + 100, &[6]).unwrap();
    assert_eq!(dirty_flag(&pm, v, 1), Some(false), "the EPT does not see hypervisor writes");
    let reused = pm.ksm_stats().checksums_reused;
    pm.scan(2);
    assert_eq!(pm.ksm_stats().checksums_reused, reused + 1, "page 1 was hashed again");
    assert!(!pm.is_merged(v, gpa(0)) && !pm.is_merged(v, gpa(1)));
    assert_eq!(pm.ksm_stats().pages_volatile, 1);
    // Written back to the twin's content by the hypervisor: merges.
    pm.write_gpa(v, gpa(1) + 100, &[5]).unwrap();
    scan_until_converged(&mut pm);
    assert!(pm.is_merged(v, gpa(0)) && pm.is_merged(v, gpa(1)));
    pm.check_consistency().unwrap();
}

#[test]
fn tracking_with_cow_breaks_and_merges() {
    let mut pm = pm(128, tracking_two_looks());
    let (a, _) = vm(&mut pm, 3, true, NotifierMode::ChangePte, None);
    let (b, _) = vm(&mut pm, 1, true, NotifierMode::ChangePte, None);
    let mut ga = fill(&mut pm, a, &[5, 5, 5]);
    fill(&mut pm, b, &[5]);
    scan_until_converged(&mut pm);
    let shared = pm.backing_frame(a, gpa(0)).unwrap();
    assert_eq!(pm.ksm_stats().pages_sharing, 3);
    // A write of the same byte: COW to a private copy with equal content;
    // the next look hashes it (a new frame) and it joins the merged frame.
    ga.write(&mut pm, gpa(1), &[5]).unwrap();
    assert_ne!(pm.backing_frame(a, gpa(1)), Some(shared));
    assert_eq!(dirty_flag(&pm, a, 1), Some(true), "the write after the COW set the flag");
    pm.scan(4);
    assert_eq!(pm.backing_frame(a, gpa(1)), Some(shared), "merged back in one look");
    // A real change: COW, then the page waits, then is unique.
    ga.write(&mut pm, gpa(2), &[9]).unwrap();
    pm.scan(4);
    assert!(!pm.is_merged(a, gpa(2)));
    assert_eq!(pm.ksm_stats().pages_volatile, 1);
    let reused = pm.ksm_stats().checksums_reused;
    pm.scan(4);
    assert_eq!(pm.ksm_stats().checksums_reused, reused + 1, "the new private page held still");
    assert_eq!(pm.ksm_stats().pages_unshared, 1);
    // Then it gets the shared content back (a write through its own,
    // writable frame): the flag says so and it merges again.
    ga.write(&mut pm, gpa(2), &[5]).unwrap();
    scan_until_converged(&mut pm);
    assert_eq!(pm.backing_frame(a, gpa(2)), Some(shared));
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 3));
    for (v, p) in [(a, 0), (a, 1), (a, 2), (b, 0)] {
        assert_eq!(page_bytes(&pm, v, p), [5; 4096]);
    }
    pm.check_consistency().unwrap();
    assert_eq!(pm.stats().mmu.warnings, 0);
}

#[test]
fn tracking_teardown_returns_every_frame() {
    let mut pm = pm(256, tracking());
    let total = pm.frames().free_frames();
    let (a, _) = vm(&mut pm, 16, true, NotifierMode::ChangePte, None);
    let (b, fb) = vm(&mut pm, 16, true, NotifierMode::LinuxZap, None);
    for v in [a, b] {
        let mut g = SimGuest::new(v);
        for p in 0..16 {
            g.fill_page(&mut pm, gpa(p), (p % 3) as u8).unwrap();
        }
    }
    pm.scan(20); // part of a pass: flags cleared in both VMs
    pm.destroy_vm(a).unwrap();
    let f = fb.count();
    pm.scan(40); // the rest, and a pass over b alone
    assert!(fb.count() >= f);
    scan_until_converged(&mut pm);
    assert!(pm.ksm_stats().pages_sharing > 0);
    pm.check_consistency().unwrap();
    pm.destroy_vm(b).unwrap();
    assert_eq!(pm.frames().free_frames(), total);
    assert_eq!(pm.scan(10).visited, 0);
}

#[test]
fn a_hypervisor_write_of_the_same_bytes_keeps_the_page_a_candidate() {
    // The write drops only the tracked mark: the page is hashed again,
    // finds its checksum unchanged and merges in the very next pass.
    let mut pm = pm(128, tracking_two_looks());
    let (v, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
    fill(&mut pm, v, &[5, 5]);
    pm.scan(2); // pass 1: both hashed
    pm.write_gpa(v, gpa(1) + 100, &[5]).unwrap();
    let reused = pm.ksm_stats().checksums_reused;
    let r = pm.scan(2); // pass 2
    assert_eq!(pm.ksm_stats().checksums_reused, reused + 1, "page 1 was hashed again");
    assert_eq!(r.merged, 2);
    assert!(pm.is_merged(v, gpa(0)) && pm.is_merged(v, gpa(1)));
}

// ---------------------------------------------------------------------------
// Merging at the first look (DedupeConfig::merge_at_first_look, with
// tracking): a candidate whose dirty flag stayed clear since its hash is
// merged in the pass that first hashed it.

#[test]
fn at_the_first_look_equal_pages_merge_in_one_pass_and_with_two_looks_in_two() {
    for first_look in [true, false] {
        let mut pm = pm(128, DedupeConfig { merge_at_first_look: first_look, ..tracking() });
        let (a, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
        let (b, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
        fill(&mut pm, a, &[5, 6]);
        fill(&mut pm, b, &[6, 5]);
        let r = pm.scan(4);
        assert_eq!(r.full_scans_completed, 1);
        let s = pm.ksm_stats();
        if first_look {
            assert_eq!(r.merged, 4, "both pairs in the first pass");
            assert_eq!((s.pages_shared, s.pages_sharing, s.first_looks), (2, 2, 4));
            // The next pass changes nothing: converged after two passes.
            pm.scan(4);
            assert!(pm.scan_converged());
        } else {
            assert_eq!((r.merged, s.pages_shared, s.first_looks), (0, 0, 0), "two looks: first pass only hashes");
            assert_eq!(pm.scan(4).merged, 4);
        }
        assert_eq!(pm.backing_frame(a, gpa(0)), pm.backing_frame(b, gpa(1)));
        assert_eq!(pm.backing_frame(a, gpa(1)), pm.backing_frame(b, gpa(0)));
        assert_eq!(page_bytes(&pm, b, 1), [5; 4096]);
        pm.check_consistency().unwrap();
    }
}

#[test]
fn a_candidate_written_since_its_hash_is_not_merged_at_the_first_look() {
    let mut pm = pm(128, tracking());
    let (v, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
    let mut g = fill(&mut pm, v, &[5, 5]);
    assert_eq!(pm.scan(1).merged, 0); // page 0: hashed, a candidate
    // The guest writes page 0 (the same bytes: only the dirty flag can
    // tell), in the guest time between two scan batches.
    g.write(&mut pm, gpa(0) + 9, &[5]).unwrap();
    assert_eq!(dirty_flag(&pm, v, 0), Some(true));
    let r = pm.scan(1); // page 1: its candidate is dirty
    assert_eq!((r.merged, r.full_scans_completed), (0, 1));
    assert!(!pm.is_merged(v, gpa(0)) && !pm.is_merged(v, gpa(1)));
    assert_eq!(pm.ksm_stats().compare_mismatches, 0, "refused before any compare");
    assert_eq!(dirty_flag(&pm, v, 0), Some(false), "the flag was cleared");
    // Page 0 is hashed again at its next look (not trusted), and merges.
    let reused = pm.ksm_stats().checksums_reused;
    assert_eq!(pm.scan(2).merged, 2);
    assert_eq!(pm.ksm_stats().checksums_reused, reused + 1, "only page 1 kept its checksum");
    assert!(pm.is_merged(v, gpa(0)) && pm.is_merged(v, gpa(1)));
    pm.check_consistency().unwrap();
}

#[test]
fn a_page_without_a_dirty_flag_to_watch_waits_for_a_second_look() {
    // Written by the hypervisor and never touched by the guest: no EPT
    // leaf, so no dirty flag says it holds still; KSM's rule applies.
    let mut pm = pm(128, tracking());
    let (v, _) = vm(&mut pm, 2, true, NotifierMode::ChangePte, None);
    for p in 0..2 {
        pm.write_gpa(v, gpa(p), &[7; 4096]).unwrap();
    }
    assert_eq!(dirty_flag(&pm, v, 0), None);
    assert_eq!(pm.scan(2).merged, 0);
    assert_eq!(pm.ksm_stats().first_looks, 0);
    assert_eq!(pm.scan(2).merged, 2);
    assert!(pm.is_merged(v, gpa(0)) && pm.is_merged(v, gpa(1)));
}

#[test]
fn index_keys_spread_their_top_bits() {
    // The content index takes a key's home slot from its top bits: keys
    // of a 28-bit checksum must still use all of them (else every lookup
    // lands in a fraction of the table and probes long runs).
    let mut seen = [0u32; 16];
    let mut page = [0u8; 4096];
    for i in 0..1024u32 {
        page[..4].copy_from_slice(&i.to_le_bytes());
        let sum = crate::dedupe::checksum(&page);
        assert_eq!(sum >> crate::page_manager::AUX_BITS, 0, "a checksum fits in a page entry");
        seen[(crate::dedupe::key_of(sum, 0) >> 60) as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n > 30), "top bits of keys: {seen:?}");
}

#[test]
fn the_unstable_index_keeps_its_candidates_when_it_grows() {
    // 40 different pages fill the unstable index past its first sizes
    // (it is rebuilt from the page entries as it grows); the last page
    // equals the first and must still find it, in the same pass.
    let mut pm = pm(256, tracking());
    let (v, _) = vm(&mut pm, 41, true, NotifierMode::ChangePte, None);
    let bytes: Vec<u8> = (0..41).map(|p| if p == 40 { 1 } else { p as u8 + 1 }).collect();
    fill(&mut pm, v, &bytes);
    let r = pm.scan(41);
    assert_eq!((r.full_scans_completed, r.merged), (1, 2));
    assert!(pm.is_merged(v, gpa(0)) && pm.is_merged(v, gpa(40)));
    assert_eq!(pm.ksm_stats().pages_unshared, 39);
    pm.check_consistency().unwrap();
    // Mid-pass, the index holds the pages behind the cursor.
    pm.scan(20);
    pm.check_consistency().unwrap();
    assert_eq!(pm.ksm_stats().pages_unshared, 39);
}

/// Two different pages with one checksum (found by trying page contents
/// that differ in their first 4 bytes: a 28-bit checksum repeats after
/// about 2^14 of them).
fn colliding_pages() -> ([u8; 4096], [u8; 4096]) {
    let page = |i: u32| {
        let mut p = [0x5a; 4096];
        p[..4].copy_from_slice(&i.to_le_bytes());
        p
    };
    let mut seen = std::collections::HashMap::new();
    for i in 0.. {
        if let Some(j) = seen.insert(crate::dedupe::checksum(&page(i)), i) {
            return (page(j), page(i));
        }
    }
    unreachable!()
}

#[test]
fn pages_with_one_checksum_still_merge_with_their_own_twins() {
    // x and y share a checksum, so every index key: each lookup must try
    // every page and frame under it. Pages 0..3 meet in the unstable
    // index (y fails against x and must wait there too), pages 4 and 5
    // find two merged frames under one key.
    let (x, y) = colliding_pages();
    assert_ne!(x, y);
    assert_eq!(crate::dedupe::checksum(&x), crate::dedupe::checksum(&y));
    let mut pm = pm(128, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 6, true, NotifierMode::ChangePte, None);
    let mut g = SimGuest::new(v);
    let layout = [&x, &y, &y, &x, &y, &x];
    for (p, bytes) in layout.iter().enumerate() {
        g.write(&mut pm, gpa(p as u64), &bytes[..]).unwrap();
    }
    // Pass 1 takes the checksums; pass 2 merges all, as Linux's
    // content-ordered trees do (a lost candidate would wait a pass).
    assert_eq!(pm.scan(6).merged, 0);
    assert_eq!(pm.scan(6).merged, 6);
    assert_eq!(pm.last_pass(), Some(crate::dedupe::PassStats { merged: 6, changed: 0 }));
    let s = pm.ksm_stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 4, 0));
    assert!(s.compare_mismatches >= 3, "x and y were compared: {}", s.compare_mismatches);
    let frame = |p: u64| pm.backing_frame(v, gpa(p)).unwrap();
    assert!(frame(0) == frame(3) && frame(3) == frame(5));
    assert!(frame(1) == frame(2) && frame(2) == frame(4));
    assert_ne!(frame(0), frame(1));
    for (p, bytes) in layout.iter().enumerate() {
        assert_eq!(&page_bytes(&pm, v, p as u64), *bytes);
    }
    pm.check_consistency().unwrap();
}

use super::*;
use crate::page_manager::{Access, Outcome, PmError};
use crate::sim::SimGuest;
use crate::phys::PhysMem;
use crate::stage2::Perms;
use crate::stats::VmStats;

#[test]
fn first_touch_allocates_a_zeroed_frame_and_maps_it() {
    let mut pm = pm(64, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 8, true, NotifierMode::ChangePte, None);
    let free = pm.frames().free_frames();
    let mut g = SimGuest::new(v);
    // Leave junk in every free frame: the page manager must zero.
    let mut junk = alloc::vec::Vec::new();
    while let Some(f) = pm.frames.alloc() {
        pm.mem().page_mut(f).fill(0xee);
        junk.push(f);
    }
    for f in junk {
        pm.frames.free(f).unwrap();
    }
    let mut buf = [1u8; 16];
    g.read(&mut pm, gpa(3) + 100, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);
    assert_eq!(g.violations, 1);
    // One data frame plus the PDPT, PD and PT under the root.
    assert_eq!(pm.frames().free_frames(), free - 4);
    let l = pm.mmu(v).unwrap().lookup(pm.mem(), gpa(3) >> 12).unwrap();
    assert_eq!(l.perms, Perms::RWX);
    assert_eq!(Some(l.hpa), pm.backing_frame(v, gpa(3)));
    g.write(&mut pm, gpa(3), b"hello").unwrap();
    g.read(&mut pm, gpa(3), &mut buf[..5]).unwrap();
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(g.violations, 1, "mapped writable on the first touch");
    let (st, mmu) = pm.vm_stats(v).unwrap();
    assert_eq!((st.ept_violations, st.not_present, st.pages_allocated), (1, 1, 1));
    assert_eq!((mmu.installs, mmu.warnings), (1, 0));
}

#[test]
fn outside_memory_and_bad_arguments() {
    let mut pm = pm(64, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    assert_eq!(pm.handle_ept_violation(v, gpa(4), Access::Read), Outcome::OutsideMemory);
    assert_eq!(pm.handle_ept_violation(v, 0, Access::Write), Outcome::OutsideMemory);
    assert_eq!(pm.handle_ept_violation(crate::page_manager::VmId(9), 0, Access::Read), Outcome::OutsideMemory);
    assert_eq!(pm.vm_stats(v).unwrap().0.outside, 2);
    assert_eq!(pm.add_slot(v, gpa(2), PAGE, false), Err(PmError::BadSlot), "overlap");
    assert_eq!(pm.add_slot(v, 0x1234, PAGE, false), Err(PmError::BadSlot));
    assert_eq!(pm.add_slot(v, 0, 0, false), Err(PmError::BadSlot));
    pm.add_slot(v, 0, PAGE, false).unwrap();
    assert_eq!(pm.write_gpa(v, gpa(3), &[1; 8192]), Err(PmError::OutsideMemory(gpa(4))));
    assert_eq!(pm.backing_frame(v, gpa(3)), None, "nothing written when the range is bad");
}

#[test]
fn hypervisor_reads_and_writes_across_pages() {
    let mut pm = pm(64, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    let free = pm.frames().free_frames();
    let mut buf = [7u8; 100];
    pm.read_gpa(v, gpa(1) - 50, &mut buf).unwrap();
    assert_eq!(buf, [0; 100]);
    assert_eq!(pm.frames().free_frames(), free, "reading does not allocate");
    let data: alloc::vec::Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
    pm.write_gpa(v, gpa(0) + 3000, &data).unwrap();
    assert_eq!(pm.frames().free_frames(), free - 3);
    let mut back = alloc::vec![0u8; 6000];
    pm.read_gpa(v, gpa(0) + 3000, &mut back).unwrap();
    assert_eq!(back, data);
    // The guest sees the same bytes.
    let mut g = SimGuest::new(v);
    let mut gb = alloc::vec![0u8; 6000];
    g.read(&mut pm, gpa(0) + 3000, &mut gb).unwrap();
    assert_eq!(gb, data);
    assert_eq!(pm.read_gpa(v, gpa(3), &mut [0; 8192]), Err(PmError::OutsideMemory(gpa(4))));
}

#[test]
fn discard_zaps_frees_and_reads_zero_again() {
    let mut pm = pm(64, DedupeConfig::default());
    let (v, flush) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    let mut g = SimGuest::new(v);
    g.fill_page(&mut pm, gpa(1), 0x55).unwrap();
    g.fill_page(&mut pm, gpa(2), 0x66).unwrap();
    let free = pm.frames().free_frames();
    pm.discard(v, gpa(1), PAGE).unwrap();
    assert_eq!(pm.frames().free_frames(), free + 1);
    assert_eq!(pm.mmu(v).unwrap().lookup(pm.mem(), gpa(1) >> 12), None);
    assert_eq!(flush.count(), 1, "a live entry went away");
    let mut b = [9u8; 4];
    g.read(&mut pm, gpa(1), &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    g.read(&mut pm, gpa(2), &mut b).unwrap();
    assert_eq!(b, [0x66; 4]);
    let (_, mmu) = pm.vm_stats(v).unwrap();
    assert_eq!(mmu.invalidate_range_start, mmu.invalidate_range_end);
    assert_eq!(pm.mmu(v).unwrap().invalidate_seq(), mmu.invalidate_range_end);
}

#[test]
fn teardown_returns_every_frame() {
    let mut pm = pm(256, DedupeConfig::default());
    let total = pm.frames().free_frames();
    let (a, _) = vm(&mut pm, 32, true, NotifierMode::ChangePte, None);
    let (b, _) = vm(&mut pm, 32, true, NotifierMode::ChangePte, None);
    for (v, byte) in [(a, 1u8), (b, 1u8)] {
        let mut g = SimGuest::new(v);
        for p in 0..32 {
            g.fill_page(&mut pm, gpa(p), if p % 2 == 0 { byte } else { 0 }).unwrap();
        }
    }
    scan_until_converged(&mut pm);
    assert!(pm.ksm_stats().pages_sharing > 0);
    pm.destroy_vm(a).unwrap();
    pm.check_consistency().unwrap();
    pm.destroy_vm(b).unwrap();
    assert_eq!(pm.frames().free_frames(), total);
    assert_eq!(pm.destroy_vm(a), Err(PmError::NoSuchVm));
}

#[test]
fn out_of_frames_on_first_touch_is_an_outcome_not_a_panic() {
    let mut pm = pm(8, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 16, true, NotifierMode::ChangePte, None);
    let mut g = SimGuest::new(v);
    let mut ok = 0;
    let err = loop {
        match g.fill_page(&mut pm, gpa(ok), 1) {
            Ok(()) => ok += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err, Outcome::OutOfMemory);
    assert_eq!(ok, 8 - 4, "root + 3 tables, the rest data");
    assert_eq!(pm.write_gpa(v, gpa(ok), &[1]), Err(PmError::OutOfMemory));
    assert!(pm.vm_stats(v).unwrap().0.out_of_memory >= 1);
    // Freeing a page lets the guest go on.
    pm.discard(v, gpa(0), PAGE).unwrap();
    g.fill_page(&mut pm, gpa(ok), 2).unwrap();
}

// --- Frame quotas ---


/// What the VM holds now, its peak and its refusals.
fn charge(pm: &PageManager<Arena>, v: VmId) -> (u64, u64, u64) {
    let (st, _) = pm.vm_stats(v).unwrap();
    (st.frames_held, st.frames_peak, st.quota_refusals)
}

/// Fills pages from 0 on until the guest is refused; returns how many it
/// filled and why it stopped.
fn fill_until_refused(pm: &mut PageManager<Arena>, v: VmId, byte: u8) -> (u64, Outcome) {
    let mut g = SimGuest::new(v);
    let mut ok = 0;
    loop {
        match g.fill_page(pm, gpa(ok), byte) {
            Ok(()) => ok += 1,
            Err(e) => return (ok, e),
        }
    }
}

#[test]
fn the_default_quota_is_16_mib_and_every_vm_reports_its_own() {
    assert_eq!(DEFAULT_FRAME_QUOTA, 4096);
    assert_eq!(VmConfig::default().frame_quota, DEFAULT_FRAME_QUOTA);
    let mut pm = pm(64, DedupeConfig::default());
    let (a, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    let (b, _) = vm_with_quota(&mut pm, 4, true, NotifierMode::ChangePte, None, 77);
    assert_eq!(pm.frame_quota(a), Ok(DEFAULT_FRAME_QUOTA));
    assert_eq!(pm.frame_quota(b), Ok(77));
    assert_eq!(pm.frame_quota(VmId(9)), Err(PmError::NoSuchVm));
    pm.destroy_vm(b).unwrap();
    assert_eq!(pm.frame_quota(b), Err(PmError::NoSuchVm));
}

#[test]
fn the_root_table_is_the_first_charge() {
    let mut pm = pm(64, DedupeConfig::default());
    let free = pm.frames().free_frames();
    let cfg = VmConfig { frame_quota: 0, ..VmConfig::default() };
    let r = pm.create_vm(cfg, alloc::boxed::Box::new(crate::mmu_notifier::CountingFlush::default()));
    assert_eq!(r.err(), Some(PmError::QuotaExceeded));
    assert_eq!(pm.frames().free_frames(), free, "a refused VM takes nothing");
    // Quota 1: the root and not one page.
    let (v, _) = vm_with_quota(&mut pm, 4, true, NotifierMode::ChangePte, None, 1);
    assert_eq!(v, VmId(0), "the refused VM left no trace");
    assert_eq!(charge(&pm, v), (1, 1, 0));
    assert_eq!(pm.frames().free_frames(), free - 1);
    assert_eq!(pm.handle_ept_violation(v, gpa(0), Access::Read), Outcome::QuotaExceeded);
    assert_eq!(pm.write_gpa(v, gpa(0), &[1]), Err(PmError::QuotaExceeded));
    assert_eq!(charge(&pm, v), (1, 1, 2));
    assert_eq!(pm.frames().free_frames(), free - 1);
    assert_eq!(pm.backing_frame(v, gpa(0)), None);
}

#[test]
fn a_vm_at_its_quota_stops_taking_nothing_while_another_allocates_normally() {
    let mut pm = pm(64, DedupeConfig::default());
    // Root, PDPT, PD and PT, and room for 6 pages.
    let (a, _) = vm_with_quota(&mut pm, 16, true, NotifierMode::ChangePte, None, 10);
    let (b, _) = vm(&mut pm, 16, true, NotifierMode::ChangePte, None);
    let (filled, why) = fill_until_refused(&mut pm, a, 1);
    assert_eq!((filled, why), (6, Outcome::QuotaExceeded));
    assert_eq!(charge(&pm, a), (10, 10, 1));
    let free = pm.frames().free_frames();
    // Refused again and again, it takes nothing.
    for p in 6..11 {
        assert_eq!(pm.handle_ept_violation(a, gpa(p), Access::Write), Outcome::QuotaExceeded);
        assert_eq!(pm.backing_frame(a, gpa(p)), None);
    }
    assert_eq!(pm.write_gpa(a, gpa(6), &[1; 3]), Err(PmError::QuotaExceeded));
    assert_eq!(pm.backing_frame(a, gpa(6)), None, "nothing written");
    assert_eq!(pm.frames().free_frames(), free);
    assert_eq!(charge(&pm, a), (10, 10, 7));
    let (st, _) = pm.vm_stats(a).unwrap();
    assert_eq!(st.out_of_memory, 0, "a quota is not the host running out");
    // What it holds still works: no frame needed.
    let mut g = SimGuest::new(a);
    g.fill_page(&mut pm, gpa(0), 9).unwrap();
    pm.write_gpa(a, gpa(1), &[8; 5]).unwrap();
    let mut buf = [0u8; 5];
    g.read(&mut pm, gpa(1), &mut buf).unwrap();
    assert_eq!(buf, [8; 5]);
    assert_eq!(pm.frames().free_frames(), free);
    // B allocates exactly what it uses from the same pool.
    let (filled, why) = fill_until_refused(&mut pm, b, 2);
    assert_eq!((filled, why), (16, Outcome::OutsideMemory), "B ran to the end of its memory");
    assert_eq!(pm.frames().free_frames(), free - (3 + 16), "its tables under the root it has, and its pages");
    assert_eq!(charge(&pm, b), (20, 20, 0));
    assert_eq!(charge(&pm, a), (10, 10, 7), "A unchanged by B");
    // The totals add up.
    let all = pm.stats().vm;
    assert_eq!((all.frames_held, all.frames_peak, all.quota_refusals), (30, 30, 7));
    // A page given back makes room for one more, and the peak stays.
    pm.discard(a, gpa(5), PAGE).unwrap();
    assert_eq!(charge(&pm, a), (9, 10, 7));
    assert_eq!(pm.frames().free_frames(), free - 19 + 1);
    g.fill_page(&mut pm, gpa(7), 3).unwrap();
    assert_eq!(charge(&pm, a), (10, 10, 7));
    assert_eq!(g.fill_page(&mut pm, gpa(8), 3), Err(Outcome::QuotaExceeded));
    // Teardown gives every frame back.
    pm.destroy_vm(a).unwrap();
    pm.destroy_vm(b).unwrap();
    assert_eq!(pm.frames().free_frames(), 64);
}

#[test]
fn table_frames_are_charged_one_at_a_time_and_checked_first() {
    // The first touch needs the page and three tables; a page in the next
    // 2 MiB needs the page and one page table.
    for quota in 1..=8usize {
        let mut pm = pm(64, DedupeConfig::default());
        let (v, _) = vm_with_quota(&mut pm, 1024, true, NotifierMode::ChangePte, None, quota);
        let free = pm.frames().free_frames();
        let got = pm.handle_ept_violation(v, gpa(0), Access::Read);
        let held = quota.min(5);
        assert_eq!(got, if quota >= 5 { Outcome::Resolved } else { Outcome::QuotaExceeded }, "quota {quota}");
        assert_eq!(charge(&pm, v), (held as u64, held as u64, (quota < 5) as u64), "quota {quota}");
        assert_eq!(pm.frames().free_frames(), free - (held - 1), "quota {quota}: only what was charged");
        // The root, and the tables made before the refusal (the page came first).
        assert_eq!(pm.mmu(v).unwrap().table_frames(), if quota >= 2 { held - 1 } else { 1 }, "quota {quota}");
        assert_eq!(pm.backing_frame(v, gpa(0)).is_some(), quota >= 2);
        assert_eq!(pm.mmu(v).unwrap().lookup(pm.mem(), gpa(0) >> 12).is_some(), quota >= 5);
        // Faulting again is refused again and takes nothing more.
        if quota < 5 {
            assert_eq!(pm.handle_ept_violation(v, gpa(0), Access::Read), Outcome::QuotaExceeded);
            assert_eq!(charge(&pm, v), (held as u64, held as u64, 2));
            assert_eq!(pm.frames().free_frames(), free - (held - 1));
            continue;
        }
        let got = pm.handle_ept_violation(v, gpa(512), Access::Write);
        let held = quota.min(7);
        assert_eq!(got, if quota >= 7 { Outcome::Resolved } else { Outcome::QuotaExceeded }, "quota {quota}");
        assert_eq!(charge(&pm, v), (held as u64, held as u64, (quota < 7) as u64), "quota {quota}");
        assert_eq!(pm.frames().free_frames(), free - (held - 1), "quota {quota}");
        assert_eq!(pm.mmu(v).unwrap().table_frames(), 4 + usize::from(quota >= 7));
    }
}

#[test]
fn merging_uncharges_and_a_cow_break_charges_the_copy() {
    let mut pm = pm(64, DedupeConfig::default());
    // Tables and two more pages.
    let (a, _) = vm_with_quota(&mut pm, 8, true, NotifierMode::ChangePte, None, 6);
    let mut g = SimGuest::new(a);
    g.fill_page(&mut pm, gpa(0), 5).unwrap();
    g.fill_page(&mut pm, gpa(1), 5).unwrap();
    assert_eq!(charge(&pm, a), (6, 6, 0));
    let free = pm.frames().free_frames();
    scan_until_converged(&mut pm);
    assert!(pm.is_merged(a, gpa(0)) && pm.is_merged(a, gpa(1)));
    // One frame freed, the other now the dedupe's: neither is A's.
    assert_eq!(pm.frames().free_frames(), free + 1);
    assert_eq!(charge(&pm, a), (4, 6, 0));
    g.fill_page(&mut pm, gpa(2), 6).unwrap();
    g.fill_page(&mut pm, gpa(3), 7).unwrap();
    assert_eq!(charge(&pm, a), (6, 6, 0));
    // At the quota: a write to a merged page needs a copy and is refused,
    // by the guest and by the hypervisor; the page stays merged and
    // readable, and nothing is taken.
    let free = pm.frames().free_frames();
    assert_eq!(g.write(&mut pm, gpa(0), &[1]), Err(Outcome::QuotaExceeded));
    assert_eq!(pm.write_gpa(a, gpa(1), &[1]), Err(PmError::QuotaExceeded));
    assert!(pm.is_merged(a, gpa(0)) && pm.is_merged(a, gpa(1)));
    let mut b = [0u8; 2];
    g.read(&mut pm, gpa(0), &mut b).unwrap();
    assert_eq!(b, [5, 5]);
    assert_eq!(pm.frames().free_frames(), free);
    let (st, _) = pm.vm_stats(a).unwrap();
    assert_eq!((st.cow_breaks, st.quota_refusals, st.out_of_memory), (0, 2, 0));
    // Discarding a merged page frees no charge; a private one does.
    pm.discard(a, gpa(1), PAGE).unwrap();
    assert_eq!(charge(&pm, a).0, 6);
    pm.discard(a, gpa(3), PAGE).unwrap();
    assert_eq!(charge(&pm, a).0, 5);
    // Now the copy fits: charged to A.
    g.write(&mut pm, gpa(0), &[1]).unwrap();
    assert!(!pm.is_merged(a, gpa(0)));
    assert_eq!(charge(&pm, a), (6, 6, 2));
    assert_eq!(pm.vm_stats(a).unwrap().0.cow_breaks, 1);
    pm.check_consistency().unwrap();
}

#[test]
fn a_merge_across_vms_uncharges_both_and_their_cow_breaks_charge_each() {
    let mut pm = pm(64, DedupeConfig::default());
    let (a, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    let (b, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    let (mut ga, mut gb) = (SimGuest::new(a), SimGuest::new(b));
    // A: one page like B's and one of its own; B: two pages like A's first.
    ga.fill_page(&mut pm, gpa(0), 3).unwrap();
    ga.fill_page(&mut pm, gpa(1), 4).unwrap();
    gb.fill_page(&mut pm, gpa(0), 3).unwrap();
    gb.fill_page(&mut pm, gpa(1), 3).unwrap();
    assert_eq!((charge(&pm, a).0, charge(&pm, b).0), (6, 6));
    scan_until_converged(&mut pm);
    assert_eq!(pm.ksm_stats().pages_shared, 1);
    assert_eq!((charge(&pm, a).0, charge(&pm, b).0), (5, 4), "each VM loses the charge of what it gave up");
    gb.write(&mut pm, gpa(1), &[0]).unwrap();
    assert_eq!((charge(&pm, a).0, charge(&pm, b).0), (5, 5));
    ga.write(&mut pm, gpa(0), &[0]).unwrap();
    assert_eq!((charge(&pm, a).0, charge(&pm, b).0), (6, 5));
    assert_eq!(pm.stats().vm.frames_held, 11);
}

#[test]
fn write_gpa_checks_the_whole_write_against_the_quota_before_writing() {
    let mut pm = pm(64, DedupeConfig::default());
    // The root and two pages (the hypervisor's writes build no tables).
    let (v, _) = vm_with_quota(&mut pm, 8, true, NotifierMode::ChangePte, None, 3);
    let free = pm.frames().free_frames();
    assert_eq!(pm.write_gpa(v, gpa(0) + 100, &[7; 2 * 4096]), Err(PmError::QuotaExceeded), "three pages");
    assert!((0..3).all(|p| pm.backing_frame(v, gpa(p)).is_none()), "nothing written");
    assert_eq!(pm.frames().free_frames(), free);
    assert_eq!(charge(&pm, v), (1, 1, 1));
    // Exactly up to the quota.
    pm.write_gpa(v, gpa(0), &[7; 2 * 4096]).unwrap();
    assert_eq!(charge(&pm, v), (3, 3, 1));
    assert_eq!(pm.frames().free_frames(), free - 2);
    // Pages it holds take no frame; one more page is refused.
    pm.write_gpa(v, gpa(0) + 10, &[8; 5000]).unwrap();
    assert_eq!(pm.write_gpa(v, gpa(1), &[9; 4097]), Err(PmError::QuotaExceeded));
    let mut buf = [0u8; 4];
    pm.read_gpa(v, gpa(1) + 4092, &mut buf).unwrap();
    assert_eq!(buf, [7; 4], "the refused write left no byte");
    assert_eq!(charge(&pm, v), (3, 3, 2));
    // A bad range is still a bad range, whatever the quota.
    assert_eq!(pm.write_gpa(v, gpa(8) - 1, &[0; 2]), Err(PmError::OutsideMemory(gpa(8))));
}

#[test]
fn the_host_out_of_frames_is_out_of_memory_not_a_quota() {
    // Root, then a page, a PDPT and a PD: the page table finds no frame.
    let mut pm = pm(4, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    assert_eq!(pm.handle_ept_violation(v, gpa(0), Access::Read), Outcome::OutOfMemory);
    let (st, _) = pm.vm_stats(v).unwrap();
    assert_eq!((st.out_of_memory, st.quota_refusals, st.frames_held, st.frames_peak), (1, 0, 4, 4));
    assert_eq!(pm.frames().free_frames(), 0);
    // Both at the quota and out of frames: the quota speaks first.
    let mut pm = self::pm(8, DedupeConfig::default());
    let (v, _) = vm_with_quota(&mut pm, 4, true, NotifierMode::ChangePte, None, 5);
    SimGuest::new(v).fill_page(&mut pm, gpa(0), 1).unwrap();
    let hoard = pm.take_all_free();
    assert_eq!(pm.handle_ept_violation(v, gpa(1), Access::Read), Outcome::QuotaExceeded);
    assert_eq!(pm.vm_stats(v).unwrap().0.out_of_memory, 0);
    pm.give_back(hoard);
}

#[test]
fn vm_stats_add_sums_every_counter() {
    let one = VmStats {
        ept_violations: 1,
        not_present: 2,
        refaults: 13,
        write_shared: 3,
        write_protected: 4,
        outside: 5,
        retries: 6,
        out_of_memory: 7,
        cow_breaks: 8,
        pages_allocated: 9,
        frames_held: 10,
        frames_peak: 11,
        quota_refusals: 12,
    };
    let mut t = one;
    t.add(&one);
    let twice = VmStats {
        ept_violations: 2,
        not_present: 4,
        refaults: 26,
        write_shared: 6,
        write_protected: 8,
        outside: 10,
        retries: 12,
        out_of_memory: 14,
        cow_breaks: 16,
        pages_allocated: 18,
        frames_held: 20,
        frames_peak: 22,
        quota_refusals: 24,
    };
    assert_eq!(t, twice);
}

#[test]
fn take_all_free_empties_the_pool_and_give_back_refills_it() {
    let mut pm = pm(16, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    let free = pm.frames().free_frames();
    let hoard = pm.take_all_free();
    assert_eq!((hoard.len(), pm.frames().free_frames()), (free, 0));
    assert_eq!(pm.handle_ept_violation(v, gpa(0), Access::Read), Outcome::OutOfMemory);
    pm.give_back(hoard);
    assert_eq!(pm.frames().free_frames(), free);
    assert_eq!(pm.handle_ept_violation(v, gpa(0), Access::Read), Outcome::Resolved);
}

#[test]
fn vm_ids_run_out_after_65536_vms() {
    // Ids are never reused, so one frame is enough for all of them.
    let mut pm = pm(1, DedupeConfig::default());
    let flush = || alloc::boxed::Box::new(crate::mmu_notifier::CountingFlush::default());
    for i in 0..=u16::MAX {
        let v = pm.create_vm(VmConfig::default(), flush()).unwrap();
        assert_eq!(v, VmId(i));
        pm.destroy_vm(v).unwrap();
    }
    assert_eq!(pm.create_vm(VmConfig::default(), flush()).err(), Some(PmError::TooManyVms));
    assert_eq!(pm.frames().free_frames(), 1);
}

#[test]
fn slots_may_touch_but_not_overlap_and_end_at_the_gpa_limit() {
    let mut pm = pm(16, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None); // gpa(0)..gpa(4)
    // Right above and right below: adjacent, not overlapping.
    pm.add_slot(v, gpa(4), 2 * PAGE, false).unwrap();
    pm.add_slot(v, gpa(0) - 3 * PAGE, 3 * PAGE, false).unwrap();
    for (base, size) in [(gpa(5), PAGE), (gpa(3), PAGE), (gpa(0) - PAGE, 2 * PAGE), (gpa(0) - 4 * PAGE, 2 * PAGE)] {
        assert_eq!(pm.add_slot(v, base, size, false), Err(PmError::BadSlot), "{base:#x}+{size:#x} overlaps");
    }
    // The last page the tables can translate, and none beyond.
    let limit = crate::ept::GPA_LIMIT;
    pm.add_slot(v, limit - PAGE, PAGE, false).unwrap();
    assert_eq!(pm.add_slot(v, limit, PAGE, false), Err(PmError::BadSlot));
    assert_eq!(pm.add_slot(v, u64::MAX - PAGE + 1, PAGE, false), Err(PmError::BadSlot), "wraps");
    // All of them are memory.
    for a in [gpa(5), gpa(0) - 3 * PAGE, limit - PAGE] {
        assert_eq!(pm.handle_ept_violation(v, a, Access::Read), Outcome::Resolved, "{a:#x}");
    }
    assert_eq!(pm.handle_ept_violation(v, gpa(6), Access::Read), Outcome::OutsideMemory);
}

#[test]
fn a_fault_during_an_invalidation_is_retried_and_each_case_is_counted() {
    let mut pm = pm(16, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    // Backed by the hypervisor, never mapped: not present, no allocation.
    pm.write_gpa(v, gpa(1), &[1]).unwrap();
    assert_eq!(pm.handle_ept_violation(v, gpa(1), Access::Read), Outcome::Resolved);
    let (st, _) = pm.vm_stats(v).unwrap();
    assert_eq!((st.ept_violations, st.not_present, st.write_protected, st.pages_allocated), (1, 1, 0, 1));
    // An invalidation of the page in flight: the fault must not install.
    let r = crate::mmu_notifier::GfnRange::one(gpa(2) >> 12);
    let PageManager { mem, frames, vms, .. } = &mut pm;
    let mmu = &vms[v.0 as usize].as_ref().unwrap().mmu;
    mmu.invalidate_range_start(mem, frames, r, crate::mmu_notifier::InvalidateEvent::Clear);
    assert_eq!(pm.handle_ept_violation(v, gpa(2), Access::Write), Outcome::Retry);
    assert_eq!(pm.handle_ept_violation(v, gpa(2), Access::Write), Outcome::Retry);
    assert_eq!(pm.mmu(v).unwrap().lookup(pm.mem(), gpa(2) >> 12), None);
    pm.mmu(v).unwrap().invalidate_range_end(r);
    assert_eq!(pm.handle_ept_violation(v, gpa(2), Access::Write), Outcome::Resolved);
    let (st, _) = pm.vm_stats(v).unwrap();
    // The first retry allocated the page; the second found it unmapped.
    assert_eq!((st.ept_violations, st.retries, st.not_present, st.pages_allocated), (4, 2, 4, 2));
}

#[test]
fn discard_refuses_bad_ranges_and_changes_nothing_then() {
    let mut pm = pm(16, DedupeConfig::default());
    let (v, _) = vm(&mut pm, 4, true, NotifierMode::ChangePte, None);
    pm.write_gpa(v, gpa(0), &[3; 4 * 4096]).unwrap();
    let free = pm.frames().free_frames();
    assert_eq!(pm.discard(v, gpa(0) + 8, PAGE), Err(PmError::BadSlot), "unaligned start");
    assert_eq!(pm.discard(v, gpa(0), PAGE + 8), Err(PmError::BadSlot), "unaligned length");
    assert_eq!(pm.discard(v, gpa(3), 2 * PAGE), Err(PmError::OutsideMemory(gpa(4))));
    assert_eq!(pm.discard(VmId(7), gpa(0), PAGE), Err(PmError::NoSuchVm));
    assert_eq!(pm.frames().free_frames(), free);
    assert!((0..4).all(|p| pm.backing_frame(v, gpa(p)).is_some()));
    assert_eq!(charge(&pm, v).0, 5);
    pm.discard(v, gpa(2), 2 * PAGE).unwrap();
    assert_eq!((pm.frames().free_frames(), charge(&pm, v).0), (free + 2, 3));
}

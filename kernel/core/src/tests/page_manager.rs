use super::*;
use crate::page_manager::{Access, Outcome, PmError};
use crate::sim::SimGuest;
use crate::phys::PhysMem;
use crate::stage2::Perms;

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

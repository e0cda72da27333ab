//! DESIGN.md rule 2, the negative test: `change_pte` outside an
//! invalidation WARNs once per boot, counts every call, and the system
//! stays consistent. Its own test binary, so its logger and the WARN
//! site's counters see nothing but this test.

use hvcore::dedupe::DedupeConfig;
use hvcore::frame::FrameAllocator;
use hvcore::mmu_notifier::{CountingFlush, CHANGE_PTE_WITHOUT_INVALIDATE};
use hvcore::page_manager::{PageManager, VmConfig};
use hvcore::phys::Arena;
use hvcore::sim::SimGuest;
use hvcore::stage2::Perms;
use hvcore::warn::{total_hits, WARN_PREFIX};
use std::sync::Mutex;

struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        self.0.lock().unwrap().push(format!("{}", r.args()));
    }
    fn flush(&self) {}
}

static LOG: Capture = Capture(Mutex::new(Vec::new()));

#[test]
fn change_pte_outside_a_bracket_warns_once_and_counts_twice() {
    log::set_logger(&LOG).unwrap();
    log::set_max_level(log::LevelFilter::Trace);

    let mem = Arena::new(0x100_0000, 64);
    let frames = FrameAllocator::new([mem.range()]);
    let mut pm: PageManager<Arena> = PageManager::new(mem, frames, DedupeConfig::default());
    let vm = pm.create_vm(VmConfig::default(), Box::new(CountingFlush::default())).unwrap();
    pm.add_slot(vm, 0, 2 * 4096, true).unwrap();
    let mut g = SimGuest::new(vm);
    g.write(&mut pm, 0, b"page zero").unwrap();
    g.write(&mut pm, 4096, b"page one").unwrap();
    let other = pm.backing_frame(vm, 4096).unwrap();

    // Twice, each time trying to point gfn 0 at page one's frame.
    for _ in 0..2 {
        pm.mmu(vm).unwrap().change_pte(pm.mem(), 0, other, Perms::RWX);
    }

    let warns: Vec<String> = LOG.0.lock().unwrap().iter().filter(|l| l.starts_with(WARN_PREFIX)).cloned().collect();
    assert_eq!(warns.len(), 1, "one WARN line per boot: {warns:?}");
    assert!(warns[0].contains("mmu_notifier.rs:") && warns[0].contains("change_pte"), "{}", warns[0]);
    assert_eq!(CHANGE_PTE_WITHOUT_INVALIDATE.hits(), 2);
    assert_eq!(total_hits(), 2, "no other WARN site fired");
    let (_, mmu) = pm.vm_stats(vm).unwrap();
    assert_eq!((mmu.change_pte, mmu.warnings), (2, 2));

    // Consistent: nothing in flight, no wrong translation installed, and
    // the guest still sees its own data (it faults the page back in).
    assert_eq!(pm.mmu(vm).unwrap().invalidate_in_progress(), 0);
    assert_ne!(pm.mmu(vm).unwrap().lookup(pm.mem(), 0).map(|l| l.hpa), Some(other));
    pm.check_consistency().unwrap();
    let mut buf = [0u8; 9];
    g.read(&mut pm, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"page zero");
    assert_eq!(pm.mmu(vm).unwrap().lookup(pm.mem(), 0).unwrap().hpa, pm.backing_frame(vm, 0).unwrap());
    // Dedupe and teardown still work.
    g.write(&mut pm, 4096, b"page zero").unwrap();
    for _ in 0..4 {
        pm.scan(2);
    }
    assert!(pm.is_merged(vm, 0));
    pm.destroy_vm(vm).unwrap();
    assert_eq!(pm.frames().free_frames(), 64);
}

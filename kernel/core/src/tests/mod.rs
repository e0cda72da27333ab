//! Shared set-up for the page manager, dedupe and model tests.

use crate::dedupe::DedupeConfig;
use crate::frame::FrameAllocator;
use crate::mmu_notifier::{CountingFlush, NotifierMode};
use crate::page_manager::{PageManager, VmConfig, VmId, DEFAULT_FRAME_QUOTA};
use crate::phys::Arena;
use alloc::boxed::Box;
use alloc::string::ToString;

mod dedupe;
mod model;
mod page_manager;

pub const PAGE: u64 = 4096;
/// Where guest RAM starts in the test VMs (not 0, to catch offset bugs).
pub const RAM: u64 = 0x10_0000;

pub fn pm(frames: usize, cfg: DedupeConfig) -> PageManager<Arena> {
    let mem = Arena::new(0x4000_0000, frames);
    let fa = FrameAllocator::new([mem.range()]);
    PageManager::new(mem, fa, cfg)
}

/// A VM with `pages` pages of RAM at [`RAM`] and the default frame quota.
pub fn vm(pm: &mut PageManager<Arena>, pages: u64, mergeable: bool, mode: NotifierMode, group: Option<&str>) -> (VmId, CountingFlush) {
    vm_with_quota(pm, pages, mergeable, mode, group, DEFAULT_FRAME_QUOTA)
}

/// A VM with `pages` pages of RAM at [`RAM`] that may hold `quota` frames.
pub fn vm_with_quota(
    pm: &mut PageManager<Arena>,
    pages: u64,
    mergeable: bool,
    mode: NotifierMode,
    group: Option<&str>,
    quota: usize,
) -> (VmId, CountingFlush) {
    let flush = CountingFlush::default();
    let cfg = VmConfig { mode, share_group: group.map(|g| g.to_string()), frame_quota: quota };
    let id = pm.create_vm(cfg, Box::new(flush.clone())).unwrap();
    pm.add_slot(id, RAM, pages * PAGE, mergeable).unwrap();
    (id, flush)
}

pub fn gpa(page: u64) -> u64 {
    RAM + page * PAGE
}

/// Scans one page at a time until a full pass converges (bounded); returns
/// the passes it took.
pub fn scan_until_converged(pm: &mut PageManager<Arena>) -> usize {
    let mut passes = 0;
    loop {
        let r = pm.scan(1);
        passes += r.full_scans_completed;
        if r.full_scans_completed > 0 && pm.scan_converged() {
            return passes;
        }
        assert!(passes < 10, "no convergence after {passes} passes");
    }
}

//! Host memory: the kernel heap and the frame allocator, both carved from
//! the usable regions of the bootloader's memory map. All physical memory
//! is reached through the bootloader's offset mapping ([`phys`]).

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use core::ops::Range;
use hvcore::frame::FrameAllocator;
use hvcore::phys::{OffsetPhysMem, PAGE_SIZE};
use hvcore::heap_stats::CountingAlloc;
use linked_list_allocator::LockedHeap;
use spin::Once;

/// The kernel heap, counted so that the run report can show its
/// high-water mark (no guest may be able to grow it without bound).
#[global_allocator]
static HEAP: CountingAlloc<LockedHeap> = CountingAlloc::new(LockedHeap::empty());

/// Heap for the kernel's own data (tables' metadata, indexes, VM state);
/// guest memory and paging tables come from the frame allocator instead.
pub const HEAP_SIZE: u64 = 16 << 20;
/// Frames below 1 MiB are left alone (real-mode structures, BIOS data).
const LOW_MEMORY_END: u64 = 1 << 20;

static PHYS: Once<OffsetPhysMem> = Once::new();

#[derive(Clone, Copy, Debug)]
pub struct MemoryInfo {
    pub usable_bytes: u64,
    pub usable_regions: usize,
    pub heap_bytes: u64,
    pub frames: usize,
}

pub fn phys() -> &'static OffsetPhysMem {
    PHYS.get().expect("memory::init not called")
}

fn usable(regions: &MemoryRegions) -> impl Iterator<Item = Range<u64>> + Clone + '_ {
    regions
        .iter()
        .filter(|r| r.kind == MemoryRegionKind::Usable)
        .map(|r| r.start.max(LOW_MEMORY_END)..r.end)
        .filter(|r| r.start < r.end)
}

/// Sets up the heap in the first usable region large enough, and returns a
/// frame allocator over all other usable memory.
pub fn init(regions: &MemoryRegions, phys_offset: u64) -> Result<(MemoryInfo, FrameAllocator), &'static str> {
    PHYS.call_once(|| OffsetPhysMem { offset: phys_offset });
    let page = PAGE_SIZE as u64;
    let heap = usable(regions)
        .map(|r| r.start.div_ceil(page) * page..r.end)
        .find(|r| r.end - r.start >= HEAP_SIZE)
        .map(|r| r.start..r.start + HEAP_SIZE)
        .ok_or("no usable memory region large enough for the kernel heap")?;
    // SAFETY: the range is usable RAM that nothing else is given (it is cut
    // out of the frame allocator below), mapped at `phys_offset`.
    unsafe { HEAP.inner().lock().init((phys_offset + heap.start) as *mut u8, HEAP_SIZE as usize) };

    let rest = usable(regions).flat_map(move |r| cut(r, heap.clone()));
    let frames = FrameAllocator::new(rest);
    let info = MemoryInfo {
        usable_bytes: usable(regions).map(|r| r.end - r.start).sum(),
        usable_regions: usable(regions).count(),
        heap_bytes: HEAP_SIZE,
        frames: frames.total_frames(),
    };
    Ok((info, frames))
}

/// Heap bytes in use now and at most so far.
pub fn heap_usage() -> (usize, usize) {
    (HEAP.in_use(), HEAP.peak())
}

/// `r` without `hole`: up to two ranges.
fn cut(r: Range<u64>, hole: Range<u64>) -> impl Iterator<Item = Range<u64>> + Clone {
    let before = r.start..r.end.min(hole.start);
    let after = r.start.max(hole.end)..r.end;
    [before, after].into_iter().filter(|x| x.start < x.end)
}

/// A zeroed, page-aligned page on the heap, with its physical address:
/// for VMX regions and bitmaps. The heap lies inside the offset mapping,
/// so its physical address is its virtual one minus the offset.
#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_SIZE]);

impl Page {
    pub fn zeroed() -> alloc::boxed::Box<Page> {
        alloc::boxed::Box::new(Page([0; PAGE_SIZE]))
    }

    /// A VMXON or VMCS region: the revision identifier in its first word
    /// (SDM Vol. 3C 25.2).
    pub fn with_revision(revision: u32) -> alloc::boxed::Box<Page> {
        let mut p = Page::zeroed();
        p.0[..4].copy_from_slice(&revision.to_le_bytes());
        p
    }

    pub fn phys(&self) -> u64 {
        self as *const Page as u64 - phys().offset
    }
}

//! Host-physical memory, reached through one small abstraction.
//!
//! The kernel implements [`PhysMem`] with the bootloader's offset mapping of
//! all physical memory; host tests and benchmarks use an [`Arena`]. Code
//! above this (EPT tables, page manager, dedupe) never dereferences a
//! physical address any other way.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ops::Range;

pub const PAGE_SIZE: usize = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// A host-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct PhysAddr(pub u64);

impl PhysAddr {
    pub const fn is_page_aligned(self) -> bool {
        self.0 & (PAGE_SIZE as u64 - 1) == 0
    }
    pub const fn frame_number(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
}

impl core::fmt::LowerHex for PhysAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Access to host-physical memory.
///
/// # Safety
/// An implementation promises that for every page-aligned address of a
/// frame it hands out (through the frame allocator built over the same
/// memory), `ptr` returns a pointer valid for reads and writes of
/// `PAGE_SIZE` bytes, and that distinct frames do not overlap.
pub unsafe trait PhysMem {
    fn ptr(&self, pa: PhysAddr) -> *mut u8;

    /// The page at `pa` as bytes. The caller must not hold a mutable view
    /// of the same frame at the same time.
    fn page(&self, pa: PhysAddr) -> &[u8; PAGE_SIZE] {
        debug_assert!(pa.is_page_aligned());
        unsafe { &*(self.ptr(pa) as *const [u8; PAGE_SIZE]) }
    }

    #[allow(clippy::mut_from_ref)]
    fn page_mut(&self, pa: PhysAddr) -> &mut [u8; PAGE_SIZE] {
        debug_assert!(pa.is_page_aligned());
        unsafe { &mut *(self.ptr(pa) as *mut [u8; PAGE_SIZE]) }
    }

    /// The page at `pa` as 512 little-endian u64 entries (a paging table).
    #[allow(clippy::mut_from_ref)]
    fn table_mut(&self, pa: PhysAddr) -> &mut [u64; 512] {
        debug_assert!(pa.is_page_aligned());
        unsafe { &mut *(self.ptr(pa) as *mut [u64; 512]) }
    }

    fn zero_page(&self, pa: PhysAddr) {
        self.page_mut(pa).fill(0);
    }

    fn copy_page(&self, from: PhysAddr, to: PhysAddr) {
        assert_ne!(from, to);
        let src = *self.page(from);
        self.page_mut(to).copy_from_slice(&src);
    }
}

/// The kernel's view: all physical memory mapped at a fixed virtual offset.
#[derive(Clone, Copy, Debug)]
pub struct OffsetPhysMem {
    pub offset: u64,
}

// SAFETY: the bootloader maps all physical memory at `offset`
// (`BootInfo::physical_memory_offset`); the kernel builds it from that.
unsafe impl PhysMem for OffsetPhysMem {
    #[inline]
    fn ptr(&self, pa: PhysAddr) -> *mut u8 {
        (self.offset + pa.0) as *mut u8
    }
}

/// Heap-backed stand-in for physical memory, for host tests and benchmarks.
/// Its frames have made-up physical addresses starting at `base`.
pub struct Arena {
    mem: *mut u8,
    layout: Layout,
    base: u64,
}

impl Arena {
    /// An arena of `frames` zeroed frames whose first frame is at `base`
    /// (page-aligned and non-zero, so a zero address stays invalid).
    pub fn new(base: u64, frames: usize) -> Arena {
        assert!(base != 0 && base.is_multiple_of(PAGE_SIZE as u64) && frames > 0);
        let layout = Layout::from_size_align(frames * PAGE_SIZE, PAGE_SIZE).expect("arena size");
        let mem = unsafe { alloc_zeroed(layout) };
        assert!(!mem.is_null(), "arena allocation of {frames} frames failed");
        Arena { mem, layout, base }
    }

    /// The physical range the arena stands for, for a frame allocator.
    pub fn range(&self) -> Range<u64> {
        self.base..self.base + self.layout.size() as u64
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        unsafe { dealloc(self.mem, self.layout) }
    }
}

// SAFETY: every address in `range()` is backed by the arena's allocation.
unsafe impl PhysMem for Arena {
    /// Inlined with the check's panic out of line: every page and table
    /// access goes through here (the kernel's `OffsetPhysMem` is one add).
    #[inline]
    fn ptr(&self, pa: PhysAddr) -> *mut u8 {
        let off = pa.0.wrapping_sub(self.base);
        if off >= self.layout.size() as u64 {
            outside(pa, self.range());
        }
        unsafe { self.mem.add(off as usize) }
    }
}

#[cold]
#[inline(never)]
fn outside(pa: PhysAddr, r: Range<u64>) -> ! {
    panic!("physical address {:#x} outside the arena {:#x?}", pa.0, r)
}

// The arena is plain memory; sharing it across threads is as safe as the
// kernel's offset mapping (callers synchronise through their own locks).
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_pages_are_distinct_and_zeroed() {
        let a = Arena::new(0x10_0000, 4);
        let p0 = PhysAddr(0x10_0000);
        let p1 = PhysAddr(0x10_1000);
        assert!(a.page(p0).iter().all(|&b| b == 0));
        a.page_mut(p0)[7] = 0xaa;
        assert_eq!(a.page(p1)[7], 0);
        a.copy_page(p0, p1);
        assert_eq!(a.page(p1)[7], 0xaa);
        a.zero_page(p0);
        assert_eq!(a.page(p0)[7], 0);
        a.table_mut(p1)[0] = 0x1122;
        assert_eq!(a.page(p1)[..2], [0x22, 0x11]);
    }

    #[test]
    #[should_panic(expected = "outside the arena")]
    fn arena_rejects_addresses_outside() {
        let a = Arena::new(0x10_0000, 1);
        a.ptr(PhysAddr(0x10_1000));
    }
}

//! The host frame allocator: 4 KiB frames from the usable ranges of the
//! boot memory map, handed out and taken back one at a time.
//!
//! Two bitmaps over the span of all usable memory: `usable` (never changes)
//! and `free`. Freeing a frame that is not usable, or already free, is
//! refused with an error instead of corrupting the state.

use crate::phys::{PhysAddr, PAGE_SIZE};
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

const PAGE: u64 = PAGE_SIZE as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The address is not page-aligned.
    Unaligned(PhysAddr),
    /// The frame is not part of usable memory.
    NotUsable(PhysAddr),
    /// The frame is already free (a double free).
    AlreadyFree(PhysAddr),
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::Unaligned(p) => write!(f, "frame address {:#x} is not page-aligned", p.0),
            FrameError::NotUsable(p) => write!(f, "frame {:#x} is not usable memory", p.0),
            FrameError::AlreadyFree(p) => write!(f, "frame {:#x} is already free (double free)", p.0),
        }
    }
}

pub struct FrameAllocator {
    /// Address of the frame that bit 0 stands for.
    base: u64,
    usable: Vec<u64>,
    free: Vec<u64>,
    total: usize,
    free_count: usize,
    /// Word index to start the next search at.
    hint: usize,
}

impl FrameAllocator {
    /// Builds an allocator over `ranges` (byte ranges, any alignment: each is
    /// shrunk to whole frames; overlaps are counted once). All start free.
    pub fn new(ranges: impl IntoIterator<Item = Range<u64>> + Clone) -> FrameAllocator {
        let frames = |r: &Range<u64>| (r.start.div_ceil(PAGE), r.end / PAGE);
        let (mut lo, mut hi) = (u64::MAX, 0);
        for r in ranges.clone() {
            let (s, e) = frames(&r);
            if s < e {
                lo = lo.min(s);
                hi = hi.max(e);
            }
        }
        if lo >= hi {
            return FrameAllocator { base: 0, usable: Vec::new(), free: Vec::new(), total: 0, free_count: 0, hint: 0 };
        }
        let words = (hi - lo).div_ceil(64) as usize;
        let mut usable = vec![0u64; words];
        for r in ranges {
            let (s, e) = frames(&r);
            for f in s..e {
                let i = (f - lo) as usize;
                usable[i / 64] |= 1 << (i % 64);
            }
        }
        let total = usable.iter().map(|w| w.count_ones() as usize).sum();
        FrameAllocator { base: lo * PAGE, free: usable.clone(), usable, total, free_count: total, hint: 0 }
    }

    /// Takes one free frame (its content is whatever was there before).
    pub fn alloc(&mut self) -> Option<PhysAddr> {
        if self.free_count == 0 {
            return None;
        }
        let n = self.free.len();
        for k in 0..n {
            let w = (self.hint + k) % n;
            if self.free[w] != 0 {
                let bit = self.free[w].trailing_zeros() as usize;
                self.free[w] &= !(1 << bit);
                self.free_count -= 1;
                self.hint = w;
                return Some(PhysAddr(self.base + (w * 64 + bit) as u64 * PAGE));
            }
        }
        unreachable!("free_count says {} frames are free but the bitmap has none", self.free_count)
    }

    /// Gives a frame back.
    pub fn free(&mut self, pa: PhysAddr) -> Result<(), FrameError> {
        let (w, bit) = self.locate(pa)?;
        if self.free[w] & bit != 0 {
            return Err(FrameError::AlreadyFree(pa));
        }
        self.free[w] |= bit;
        self.free_count += 1;
        Ok(())
    }

    /// Whether `pa` is a usable frame currently handed out.
    pub fn is_allocated(&self, pa: PhysAddr) -> bool {
        matches!(self.locate(pa), Ok((w, bit)) if self.free[w] & bit == 0)
    }

    pub fn free_frames(&self) -> usize {
        self.free_count
    }

    pub fn total_frames(&self) -> usize {
        self.total
    }

    fn locate(&self, pa: PhysAddr) -> Result<(usize, u64), FrameError> {
        if !pa.is_page_aligned() {
            return Err(FrameError::Unaligned(pa));
        }
        let i = pa.0.checked_sub(self.base).map(|d| (d / PAGE) as usize);
        match i {
            Some(i) if i / 64 < self.usable.len() && self.usable[i / 64] & (1 << (i % 64)) != 0 => {
                Ok((i / 64, 1 << (i % 64)))
            }
            _ => Err(FrameError::NotUsable(pa)),
        }
    }
}

#[cfg(test)]
// The allocator takes a list of ranges; these tests give it one.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;

    #[test]
    fn hands_out_every_usable_frame_once_and_nothing_else() {
        // Two ranges with a hole, unaligned edges shrunk inwards.
        let mut fa = FrameAllocator::new([0x1800..0x5000, 0x10000..0x12000]);
        assert_eq!(fa.total_frames(), 3 + 2); // 0x2000,0x3000,0x4000 + 0x10000,0x11000
        let mut got = BTreeSet::new();
        while let Some(f) = fa.alloc() {
            assert!(f.is_page_aligned());
            assert!(got.insert(f.0), "frame {:#x} handed out twice", f.0);
        }
        let want: BTreeSet<u64> = [0x2000, 0x3000, 0x4000, 0x10000, 0x11000].into();
        assert_eq!(got, want);
        assert_eq!(fa.free_frames(), 0);
    }

    #[test]
    fn free_makes_a_frame_available_again() {
        let mut fa = FrameAllocator::new([0x1000..0x3000]);
        let a = fa.alloc().unwrap();
        let b = fa.alloc().unwrap();
        assert_eq!(fa.alloc(), None);
        assert!(fa.is_allocated(a));
        fa.free(a).unwrap();
        assert!(!fa.is_allocated(a));
        assert_eq!(fa.free_frames(), 1);
        assert_eq!(fa.alloc(), Some(a));
        fa.free(b).unwrap();
        fa.free(a).unwrap();
        assert_eq!(fa.free_frames(), 2);
    }

    #[test]
    fn bad_frees_are_refused_and_change_nothing() {
        let mut fa = FrameAllocator::new([0x1000..0x3000, 0x5000..0x6000]);
        let a = fa.alloc().unwrap();
        assert_eq!(fa.free(PhysAddr(a.0 + 8)), Err(FrameError::Unaligned(PhysAddr(a.0 + 8))));
        assert_eq!(fa.free(PhysAddr(0x4000)), Err(FrameError::NotUsable(PhysAddr(0x4000)))); // the hole
        assert_eq!(fa.free(PhysAddr(0)), Err(FrameError::NotUsable(PhysAddr(0))));
        assert_eq!(fa.free(PhysAddr(0x10_0000)), Err(FrameError::NotUsable(PhysAddr(0x10_0000))));
        fa.free(a).unwrap();
        assert_eq!(fa.free(a), Err(FrameError::AlreadyFree(a)));
        assert_eq!(fa.free_frames(), 3);
    }

    #[test]
    fn empty_and_sub_page_maps_give_no_frames() {
        let mut fa = FrameAllocator::new(core::iter::empty::<Range<u64>>());
        assert_eq!(fa.alloc(), None);
        let mut fa = FrameAllocator::new([0x1001..0x1fff]);
        assert_eq!(fa.total_frames(), 0);
        assert_eq!(fa.alloc(), None);
        assert!(fa.free(PhysAddr(0x1000)).is_err());
    }

    #[test]
    fn many_frames_across_word_boundaries() {
        let mut fa = FrameAllocator::new([0x0..(200 * 0x1000)]);
        let v: Vec<_> = (0..200).map(|_| fa.alloc().unwrap()).collect();
        for f in v.iter().step_by(3) {
            fa.free(*f).unwrap();
        }
        assert_eq!(fa.free_frames(), 67);
        let again: BTreeSet<u64> = (0..67).map(|_| fa.alloc().unwrap().0).collect();
        let freed: BTreeSet<u64> = v.iter().step_by(3).map(|f| f.0).collect();
        assert_eq!(again, freed);
    }
}

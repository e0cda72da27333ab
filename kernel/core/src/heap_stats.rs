//! Heap accounting: a [`GlobalAlloc`] wrapper that counts the bytes in use
//! and their high-water mark, so the kernel can show that nothing a guest
//! does grows the host heap without bound (its report prints the peak).
//!
//! The kernel wraps its heap in it as the global allocator:
//!
//! ```ignore
//! #[global_allocator]
//! static HEAP: CountingAlloc<LockedHeap> = CountingAlloc::new(LockedHeap::empty());
//! // ... HEAP.inner().lock().init(start, size); ... HEAP.peak()
//! ```
//!
//! Counts are of the sizes callers ask for (a [`Layout`]'s size), not of
//! what the inner allocator spends on alignment or its own bookkeeping.
//! Only atomics, no lock: an allocation from an interrupt handler cannot
//! deadlock on the counters. An allocation that fails (null) counts
//! nothing; a `realloc` counts the change of size, and a failed one
//! nothing (the old block stays).

use core::alloc::{GlobalAlloc, Layout};
use core::cmp::Ordering as Cmp;
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// An allocator that counts what `A` hands out (see the module doc).
pub struct CountingAlloc<A> {
    inner: A,
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

impl<A> CountingAlloc<A> {
    pub const fn new(inner: A) -> Self {
        CountingAlloc { inner, in_use: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
    }

    /// Bytes allocated and not yet freed.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Relaxed)
    }

    /// The most bytes that were ever in use at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Relaxed)
    }

    /// The wrapped allocator (the kernel initialises its heap through it).
    pub fn inner(&self) -> &A {
        &self.inner
    }

    fn grew(&self, bytes: usize) {
        // Relaxed is enough: one atomic's modifications are totally ordered,
        // and a block is freed only after its allocation happened-before.
        let now = self.in_use.fetch_add(bytes, Relaxed) + bytes;
        self.peak.fetch_max(now, Relaxed);
    }

    fn shrank(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Relaxed);
    }

    /// Counts a block that went from `old` to `new` bytes.
    fn resized(&self, old: usize, new: usize) {
        match new.cmp(&old) {
            Cmp::Greater => self.grew(new - old),
            Cmp::Less => self.shrank(old - new),
            Cmp::Equal => {}
        }
    }

    /// Counts a new block of `size` bytes at `p`, if there is one.
    fn counted(&self, p: *mut u8, size: usize) -> *mut u8 {
        if !p.is_null() {
            self.grew(size);
        }
        p
    }
}

// SAFETY: every call is passed on to `inner` unchanged, with the caller's
// guarantees; the wrapper only updates counters.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAlloc<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`.
        self.counted(unsafe { self.inner.alloc(layout) }, layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`.
        self.counted(unsafe { self.inner.alloc_zeroed(layout) }, layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`.
        unsafe { self.inner.dealloc(ptr, layout) };
        self.shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`.
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.resized(layout.size(), new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;
    use std::sync::Arc;

    /// An inner allocator that always fails.
    struct Refuses;

    unsafe impl GlobalAlloc for Refuses {
        unsafe fn alloc(&self, _: Layout) -> *mut u8 {
            core::ptr::null_mut()
        }
        unsafe fn dealloc(&self, _: *mut u8, _: Layout) {
            unreachable!("nothing was allocated")
        }
        unsafe fn realloc(&self, _: *mut u8, _: Layout, _: usize) -> *mut u8 {
            core::ptr::null_mut()
        }
    }

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 16).unwrap()
    }

    #[test]
    fn counts_bytes_in_use_and_the_high_water_mark() {
        let a = CountingAlloc::new(System);
        assert_eq!((a.in_use(), a.peak()), (0, 0));
        unsafe {
            let p = a.alloc(layout(100));
            assert!(!p.is_null());
            p.write_bytes(0xab, 100);
            assert_eq!((a.in_use(), a.peak()), (100, 100));
            let q = a.alloc(layout(50));
            assert_eq!((a.in_use(), a.peak()), (150, 150));
            a.dealloc(p, layout(100));
            assert_eq!((a.in_use(), a.peak()), (50, 150));
            let r = a.alloc(layout(30));
            assert_eq!((a.in_use(), a.peak()), (80, 150), "below the peak: it stays");
            let s = a.alloc(layout(200));
            assert_eq!((a.in_use(), a.peak()), (280, 280));
            a.dealloc(q, layout(50));
            a.dealloc(r, layout(30));
            a.dealloc(s, layout(200));
        }
        assert_eq!((a.in_use(), a.peak()), (0, 280));
    }

    #[test]
    fn alloc_zeroed_is_counted_and_zeroed() {
        let a = CountingAlloc::new(System);
        unsafe {
            let p = a.alloc_zeroed(layout(4096));
            assert!(!p.is_null());
            assert!(core::slice::from_raw_parts(p, 4096).iter().all(|&b| b == 0));
            assert_eq!((a.in_use(), a.peak()), (4096, 4096));
            a.dealloc(p, layout(4096));
        }
        assert_eq!((a.in_use(), a.peak()), (0, 4096));
    }

    #[test]
    fn realloc_counts_the_change_of_size_and_keeps_the_bytes() {
        let a = CountingAlloc::new(System);
        unsafe {
            let p = a.alloc(layout(64));
            for i in 0..64 {
                p.add(i).write(i as u8);
            }
            let p = a.realloc(p, layout(64), 1000);
            assert!(!p.is_null());
            assert_eq!((a.in_use(), a.peak()), (1000, 1000));
            assert!((0..64).all(|i| p.add(i).read() == i as u8), "grown: the old bytes stay");
            let p = a.realloc(p, layout(1000), 1000);
            assert_eq!((a.in_use(), a.peak()), (1000, 1000), "same size: no change");
            let p = a.realloc(p, layout(1000), 10);
            assert_eq!((a.in_use(), a.peak()), (10, 1000));
            assert!((0..10).all(|i| p.add(i).read() == i as u8), "shrunk: the kept bytes stay");
            let q = a.alloc(layout(500));
            assert_eq!((a.in_use(), a.peak()), (510, 1000));
            let q = a.realloc(q, layout(500), 1200);
            assert_eq!((a.in_use(), a.peak()), (1210, 1210));
            a.dealloc(p, layout(10));
            a.dealloc(q, layout(1200));
        }
        assert_eq!((a.in_use(), a.peak()), (0, 1210));
    }

    #[test]
    fn a_failed_allocation_counts_nothing() {
        let a = CountingAlloc::new(Refuses);
        unsafe {
            assert!(a.alloc(layout(100)).is_null());
            // alloc_zeroed's default goes through the inner alloc: fails too.
            assert!(a.alloc_zeroed(layout(100)).is_null());
            let mut block = [0u8; 64];
            assert!(a.realloc(block.as_mut_ptr(), layout(64), 128).is_null());
            assert!(a.realloc(block.as_mut_ptr(), layout(64), 8).is_null());
        }
        assert_eq!((a.in_use(), a.peak()), (0, 0));
        // The real allocator refusing a size no machine has.
        let a = CountingAlloc::new(System);
        unsafe {
            let p = a.alloc(layout(8));
            assert!(a.alloc(Layout::from_size_align(isize::MAX as usize - 4095, 4096).unwrap()).is_null());
            assert_eq!((a.in_use(), a.peak()), (8, 8));
            assert!(a.realloc(p, layout(8), isize::MAX as usize - 4095).is_null());
            assert_eq!((a.in_use(), a.peak()), (8, 8), "the old block stays, counted once");
            a.dealloc(p, layout(8));
        }
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn inner_is_the_wrapped_allocator() {
        let a = CountingAlloc::new(7u32);
        assert_eq!(*a.inner(), 7);
    }

    #[test]
    fn threads_allocating_at_once_lose_no_count() {
        const THREADS: usize = 8;
        const ROUNDS: usize = 2000;
        let a = Arc::new(CountingAlloc::new(System));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || unsafe {
                    let size = 16 * (t + 1);
                    for _ in 0..ROUNDS {
                        let p = a.alloc(layout(size));
                        let p = a.realloc(p, layout(size), 2 * size);
                        a.dealloc(p, layout(2 * size));
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(a.in_use(), 0);
        // At least one thread's largest block; never more than all of them.
        let all: usize = (0..THREADS).map(|t| 32 * (t + 1)).sum();
        assert!(a.peak() >= 32 * THREADS && a.peak() <= all, "peak {}", a.peak());
    }
}

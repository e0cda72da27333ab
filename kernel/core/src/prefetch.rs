//! Software prefetch: the dedupe scanner's lookups are random accesses
//! into tables larger than the caches; it names the lines it will need a
//! few pages ahead so their misses overlap with the scan of the pages in
//! between.

/// Starts loading the cache line holding `p` into all cache levels
/// (`prefetcht0`); a hint: it never faults and changes nothing visible.
/// An `asm!` rather than `_mm_prefetch`, which needs SSE enabled, and the
/// kernel's target has it off.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHh does not access memory architecturally and does not
    // fault on any address (SDM Vol. 2B, PREFETCHh).
    unsafe {
        core::arch::asm!("prefetcht0 [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

//! The DEDUPE scenario: fill a region with pages of known classes (see
//! `hvcore::hypercall::dedupe_layout`), wait for the hypervisor's scan to
//! converge, check the contents, write to some merged pages, check again.

use crate::hv;
use hvcore::hypercall::check;
use hvcore::hypercall::dedupe_layout::*;

const WORDS: u64 = PAGE_SIZE / 8;

fn word_ptr(i: u64, w: u64) -> *mut u64 {
    (page_gpa(i) + w * 8) as *mut u64
}

fn written(i: u64) -> bool {
    WRITTEN_PAGES.contains(&i)
}

/// Pages whose content differs from the expectation (`after_write`: with
/// the writes of [`WRITTEN_PAGES`] applied).
fn wrong_pages(salt: u8, after_write: bool) -> u64 {
    let mut wrong = 0;
    for i in 0..REGION_PAGES {
        let patch = after_write && written(i);
        let ok = (0..WORDS).all(|w| {
            let mut want = page_word(i, salt, w);
            if patch && w == WRITE_OFFSET / 8 {
                let shift = (WRITE_OFFSET % 8) * 8;
                want = (want & !(0xFF << shift)) | (written_byte(salt) as u64) << shift;
            }
            // SAFETY: the region lies in this VM's memory (MIN_MEM_SIZE).
            unsafe { core::ptr::read_volatile(word_ptr(i, w)) == want }
        });
        if !ok {
            if wrong < 4 {
                crate::println!("dedupe: page {i} ({:?}) has the wrong content", class(i));
            }
            wrong += 1;
        }
    }
    wrong
}

pub fn run(vm: u8) -> ! {
    let salt = vm;
    crate::println!(
        "dedupe: filling {REGION_PAGES} pages at {REGION_START:#x}: {ZERO_PAGES} zero, {INTRA_PAGES} in groups of {INTRA_GROUP}, {CROSS_PAGES} cross-VM, {UNIQUE_PAGES} unique"
    );
    for i in 0..REGION_PAGES {
        for w in 0..WORDS {
            // SAFETY: as in `wrong_pages`.
            unsafe { core::ptr::write_volatile(word_ptr(i, w), page_word(i, salt, w)) };
        }
    }
    let mut yields = 0;
    while !hv::dedupe_converged() {
        if yields == MAX_YIELDS {
            hv::report(check::DEDUPE_CONVERGED, false, yields);
            hv::exit(1);
        }
        hv::yield_now();
        yields += 1;
    }
    let mut ok = hv::report(check::DEDUPE_CONVERGED, true, yields);
    let wrong = wrong_pages(salt, false);
    ok &= hv::report(check::DEDUPE_INTACT, wrong == 0, wrong);
    for i in WRITTEN_PAGES {
        // SAFETY: as in `wrong_pages`.
        unsafe { core::ptr::write_volatile((page_gpa(i) + WRITE_OFFSET) as *mut u8, written_byte(salt)) };
    }
    let wrong = wrong_pages(salt, true);
    ok &= hv::report(check::DEDUPE_AFTER_WRITE, wrong == 0, wrong);
    hv::exit(!ok as u64)
}

//! FLOOD: more log lines and REPORTs than a VM may have. The hypervisor
//! drops log lines beyond its budget without the guest noticing, and
//! records at most 256 REPORTs per VM, refusing the rest with ERROR (see
//! `hvcore::hypercall::scenario::FLOOD`).

use crate::hv;
use core::fmt::Write;
use hvcore::hypercall::{self as hc, check};

const LINES: u64 = 2000;
const PRINTS: u64 = 2000;
/// REPORTs in all, this scenario's first (FLOOD_PRINTS) included.
const REPORTS: u64 = 300;
/// What the hypervisor records per VM.
const RECORDED: u64 = 256;
/// TSC ticks to let the log budget refill before the summary (a few
/// lines per million ticks).
const REFILL_TICKS: u64 = 20_000_000;
const MAX_REFILL_YIELDS: u64 = 100_000;

/// A line for PRINT, formatted without an allocator.
struct Line {
    buf: [u8; 64],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(core::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn run() -> ! {
    for i in 0..LINES {
        crate::println!("flood: serial line {i}");
    }
    let mut nonzero = 0;
    for i in 0..PRINTS {
        let mut line = Line { buf: [0; 64], len: 0 };
        let _ = write!(line, "flood: PRINT {i}");
        if hv::print_bytes(&line.buf[..line.len]) != 0 {
            nonzero += 1;
        }
    }
    // REPORT 1: the PRINTs.
    let first = hv::report_quiet(check::FLOOD_PRINTS, nonzero == 0, nonzero);
    // REPORTs 2..=300: the first RECORDED are recorded, the rest refused.
    let (mut recorded, mut refused, mut misplaced) = if first == 0 { (1, 0, 0) } else { (0, 0, 1) };
    for n in 2..=REPORTS {
        let r = hv::report_quiet(check::FLOOD_REPORT, true, n);
        match (r, n <= RECORDED) {
            (0, true) => recorded += 1,
            (hc::ERROR, false) => refused += 1,
            _ => misplaced += 1,
        }
    }
    let ok = misplaced == 0 && refused == REPORTS - RECORDED;

    // The log budget is spent: wait for it to refill so the summary shows.
    let t0 = rdtsc();
    let mut yields = 0;
    while rdtsc().wrapping_sub(t0) < REFILL_TICKS && yields < MAX_REFILL_YIELDS {
        hv::yield_now();
        yields += 1;
    }
    crate::println!(
        "flood: {nonzero} of {PRINTS} PRINTs returned nonzero; of REPORTs 1..={REPORTS}, {recorded} returned 0 and {refused} ERROR as expected, {misplaced} returned the wrong one"
    );
    hv::exit(!ok as u64)
}

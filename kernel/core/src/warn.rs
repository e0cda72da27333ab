//! `WARN`-once, as Linux's `WARN_ON_ONCE`: log file:line and a message the
//! first time a call site is hit, count every hit, never panic.
//!
//! ```ignore
//! if warn_on_once!(count == 0, "change_pte without an invalidation in flight") {
//!     stats.warnings += 1;
//! }
//! ```
//! Each call site owns a static [`WarnSite`]; [`total_hits`] counts all
//! sites, for the end-of-run statistics.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The prefix of every WARN line, so logs can be grepped for it.
pub const WARN_PREFIX: &str = "WARNING:";

static TOTAL_HITS: AtomicU64 = AtomicU64::new(0);

pub struct WarnSite {
    pub file: &'static str,
    pub line: u32,
    reported: AtomicBool,
    hits: AtomicU64,
}

impl WarnSite {
    pub const fn new(file: &'static str, line: u32) -> WarnSite {
        WarnSite { file, line, reported: AtomicBool::new(false), hits: AtomicU64::new(0) }
    }

    /// Counts a hit; returns true only for the first, which the caller logs.
    pub fn hit(&self) -> bool {
        self.hits.fetch_add(1, Ordering::Relaxed);
        TOTAL_HITS.fetch_add(1, Ordering::Relaxed);
        !self.reported.swap(true, Ordering::Relaxed)
    }

    /// How many times this site's condition held.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// Hits of every WARN site since boot (process start, on the host).
pub fn total_hits() -> u64 {
    TOTAL_HITS.load(Ordering::Relaxed)
}

/// Evaluates to the condition; when it holds, counts the hit and logs
/// `WARNING: file:line: message` the first time for this call site.
/// Code that needs to read a site's counter uses [`warn_at`] with a
/// `static` [`WarnSite`] of its own.
#[macro_export]
macro_rules! warn_on_once {
    ($cond:expr, $($arg:tt)+) => {{
        static SITE: $crate::warn::WarnSite = $crate::warn::WarnSite::new(file!(), line!());
        $crate::warn::warn_at(&SITE, $cond, format_args!($($arg)+))
    }};
}

/// The body of [`warn_on_once!`]: usable directly with a named static site.
pub fn warn_at(site: &WarnSite, cond: bool, msg: core::fmt::Arguments<'_>) -> bool {
    if cond && site.hit() {
        log::warn!("{} {}:{}: {}", WARN_PREFIX, site.file, site.line, msg);
    }
    cond
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::vec::Vec;

    /// A logger that keeps WARN lines, to check what was printed.
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

    fn lines_with(s: &str) -> usize {
        LOG.0.lock().unwrap().iter().filter(|l| l.contains(s)).count()
    }

    #[test]
    fn warns_once_per_site_counts_every_hit_and_returns_the_condition() {
        let _ = log::set_logger(&LOG);
        log::set_max_level(log::LevelFilter::Trace);
        let before = total_hits();
        let mut results = Vec::new();
        for i in 0..3 {
            results.push(crate::warn_on_once!(i < 2, "site A hit {}", i));
        }
        assert_eq!(results, [true, true, false]);
        assert_eq!(lines_with("site A hit"), 1, "one line for two hits");
        assert_eq!(lines_with("site A hit 0"), 1);
        let l = LOG.0.lock().unwrap().iter().find(|l| l.contains("site A")).cloned().unwrap();
        assert!(l.starts_with(WARN_PREFIX) && l.contains("warn.rs:"), "line names file and line: {l}");

        // A second call site warns on its own.
        for _ in 0..2 {
            crate::warn_on_once!(true, "site B");
        }
        assert_eq!(lines_with("site B"), 1);
        assert!(total_hits() - before >= 4);
    }

    #[test]
    fn a_named_site_exposes_its_counter() {
        static SITE: WarnSite = WarnSite::new("here.rs", 7);
        assert!(!warn_at(&SITE, false, format_args!("never")));
        assert_eq!(SITE.hits(), 0);
        assert!(warn_at(&SITE, true, format_args!("x")));
        assert!(warn_at(&SITE, true, format_args!("x")));
        assert_eq!(SITE.hits(), 2);
    }
}

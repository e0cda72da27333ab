//! The `log` backend: one line per record on the serial console, with its
//! level. The level is set at build time (`HV_LOG=debug cargo run`) and can
//! be changed by the `log=` boot option.

use log::{LevelFilter, Log, Metadata, Record};

struct SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &Record<'_>) {
        crate::println!("[{:<5}] {}", record.level(), record.args());
    }
    fn flush(&self) {
        crate::serial::flush();
    }
}

static LOGGER: SerialLogger = SerialLogger;

/// The level compiled in: `HV_LOG` at build time, else `info`.
pub fn build_time_level() -> LevelFilter {
    option_env!("HV_LOG").and_then(|s| s.parse().ok()).unwrap_or(LevelFilter::Info)
}

pub fn init(level: LevelFilter) {
    // Only fails if a logger is already set, which would be a kernel bug
    // caught the first time it boots.
    log::set_logger(&LOGGER).expect("logger set twice");
    log::set_max_level(level);
}

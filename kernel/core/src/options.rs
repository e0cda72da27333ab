//! Boot options: `key=value` words (spaces or newlines between them, `#`
//! starts a comment), read from the `options` file of the boot bundle.
//! An unknown key or a bad value is an error naming it, so a typo is not
//! silently ignored.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use crate::dedupe::SharingPolicy;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// `log=error|warn|info|debug|trace`
    pub log: Option<log::LevelFilter>,
    /// `fault-test=1`: take a page fault on purpose after the boot summary
    /// (proves the exception path end to end).
    pub fault_test: bool,
    /// `warn-test=1`: call `change_pte` once outside an invalidation
    /// (the negative test of the notifier contract).
    pub warn_test: bool,
    /// `hang-test=1`: spin forever after the boot summary (proves the
    /// runner's timeout kills and reports a hung kernel).
    pub hang_test: bool,
    /// `panic-test=1`: panic after the boot summary (proves the panic
    /// handler prints the message and location and fails the run).
    pub panic_test: bool,
    /// `bad-image-test=1`: also try to create a VM from a truncated guest
    /// image, which must be refused with the reason while the rest run.
    pub bad_image_test: bool,
    /// `oom-test=1`: the first DEDUPE VM finds the host out of frames when
    /// it writes to its merged pages: the COW break fails and only that VM
    /// is stopped.
    pub oom_test: bool,
    /// `vms=hello,hello,wild-access`: one VM per name, each running the
    /// guest program in that scenario (`hvcore::hypercall::scenario`).
    pub vms: Option<Vec<u8>>,
    /// `notifier=linux-zap`: invalidations zap EPT entries and `change_pte`
    /// finds nothing to change, as in Linux before 2024 (for comparison);
    /// the default `change-pte` write-protects and installs the new frame.
    pub linux_zap: bool,
    /// `share=all|same-vm|off`: who may share merged pages. Merging across
    /// VMs is a known side channel; `same-vm` confines it, `off` stops it.
    pub share: SharingPolicy,
}

impl Default for Options {
    fn default() -> Self {
        Options { log: None, fault_test: false, warn_test: false, hang_test: false, panic_test: false, bad_image_test: false, oom_test: false, vms: None, linux_zap: false, share: SharingPolicy::AllVms }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionError {
    NotKeyValue(String),
    UnknownKey(String),
    BadValue { key: String, value: String },
}

impl core::fmt::Display for OptionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OptionError::NotKeyValue(w) => write!(f, "boot option '{w}' is not key=value"),
            OptionError::UnknownKey(k) => write!(f, "unknown boot option '{k}'"),
            OptionError::BadValue { key, value } => write!(f, "bad value '{value}' for boot option '{key}'"),
        }
    }
}

impl Options {
    pub fn parse(text: &str) -> Result<Options, OptionError> {
        let mut o = Options::default();
        let words = text.lines().flat_map(|l| l.split('#').next().unwrap_or("").split_whitespace());
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(|| OptionError::NotKeyValue(word.to_string()))?;
            let bad = || OptionError::BadValue { key: key.to_string(), value: value.to_string() };
            match key {
                "log" => o.log = Some(value.parse().map_err(|_| bad())?),
                "fault-test" => o.fault_test = flag(value).ok_or_else(bad)?,
                "warn-test" => o.warn_test = flag(value).ok_or_else(bad)?,
                "hang-test" => o.hang_test = flag(value).ok_or_else(bad)?,
                "panic-test" => o.panic_test = flag(value).ok_or_else(bad)?,
                "bad-image-test" => o.bad_image_test = flag(value).ok_or_else(bad)?,
                "oom-test" => o.oom_test = flag(value).ok_or_else(bad)?,
                "notifier" => {
                    o.linux_zap = match value {
                        "change-pte" => false,
                        "linux-zap" => true,
                        _ => return Err(bad()),
                    }
                }
                "share" => {
                    o.share = match value {
                        "all" => SharingPolicy::AllVms,
                        "same-vm" => SharingPolicy::SameVm,
                        "off" => SharingPolicy::Off,
                        _ => return Err(bad()),
                    }
                }
                "vms" => {
                    let names = value.split(',').map(|n| crate::hypercall::scenario::from_name(n).ok_or_else(bad));
                    o.vms = Some(names.collect::<Result<Vec<u8>, _>>()?);
                }
                _ => return Err(OptionError::UnknownKey(key.to_string())),
            }
        }
        Ok(o)
    }
}

fn flag(v: &str) -> Option<bool> {
    match v {
        "1" | "on" | "yes" | "true" => Some(true),
        "0" | "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_words_lines_and_comments() {
        let o = Options::parse("log=debug  # chatty\nfault-test=1\n\n warn-test=off hang-test=yes").unwrap();
        assert_eq!(o.log, Some(log::LevelFilter::Debug));
        assert!(o.fault_test);
        assert!(!o.warn_test);
        assert!(o.hang_test);
        assert_eq!(Options::parse("").unwrap(), Options::default());
        let o = Options::parse("vms=hello,wild-access,hello").unwrap();
        use crate::hypercall::scenario::{HELLO, WILD_ACCESS};
        assert_eq!(o.vms, Some(vec![HELLO, WILD_ACCESS, HELLO]));
        assert!(Options::parse("notifier=linux-zap").unwrap().linux_zap);
        assert!(!Options::parse("notifier=change-pte").unwrap().linux_zap);
        assert!(Options::parse("notifier=other").is_err());
        assert_eq!(Options::parse("share=same-vm").unwrap().share, SharingPolicy::SameVm);
        assert_eq!(Options::parse("share=off").unwrap().share, SharingPolicy::Off);
        assert_eq!(Options::default().share, SharingPolicy::AllVms);
        assert!(Options::parse("share=groups").is_err());
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(Options::parse("lg=debug"), Err(OptionError::UnknownKey("lg".into())));
        assert_eq!(
            Options::parse("log=loud"),
            Err(OptionError::BadValue { key: "log".into(), value: "loud".into() })
        );
        assert_eq!(
            Options::parse("vms=hello,nosuch"),
            Err(OptionError::BadValue { key: "vms".into(), value: "hello,nosuch".into() })
        );
        assert_eq!(Options::parse("fault-test"), Err(OptionError::NotKeyValue("fault-test".into())));
        assert_eq!(
            Options::parse("warn-test=2").unwrap_err().to_string(),
            "bad value '2' for boot option 'warn-test'"
        );
    }
}

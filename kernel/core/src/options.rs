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
    /// guest program in that scenario (`hvcore::hypercall::scenario`);
    /// `name:N` gives that VM a frame quota of N host frames.
    pub vms: Option<Vec<VmSpec>>,
    /// `frame-quota=N`: the frame quota of every VM that `vms=` gives
    /// none (default: `page_manager::DEFAULT_FRAME_QUOTA`).
    pub frame_quota: Option<usize>,
    /// `notifier=linux-zap`: invalidations zap EPT entries and `change_pte`
    /// finds nothing to change, as in Linux before 2024 (for comparison);
    /// the default `change-pte` write-protects and installs the new frame.
    pub linux_zap: bool,
    /// `share=all|same-vm|off`: who may share merged pages. Merging across
    /// VMs is a known side channel; `same-vm` confines it, `off` stops it.
    pub share: SharingPolicy,
}

/// One VM of `vms=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSpec {
    pub scenario: u8,
    /// Host frames it may hold, if set for it.
    pub frame_quota: Option<usize>,
}

impl VmSpec {
    pub fn new(scenario: u8) -> VmSpec {
        VmSpec { scenario, frame_quota: None }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options { log: None, fault_test: false, warn_test: false, hang_test: false, panic_test: false, bad_image_test: false, oom_test: false, vms: None, frame_quota: None, linux_zap: false, share: SharingPolicy::AllVms }
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
                    let spec = |item: &str| {
                        let (name, quota) = match item.split_once(':') {
                            Some((name, n)) => (name, Some(quota(n).ok_or_else(bad)?)),
                            None => (item, None),
                        };
                        let scenario = crate::hypercall::scenario::from_name(name).ok_or_else(bad)?;
                        Ok(VmSpec { scenario, frame_quota: quota })
                    };
                    o.vms = Some(value.split(',').map(spec).collect::<Result<Vec<VmSpec>, _>>()?);
                }
                "frame-quota" => o.frame_quota = Some(quota(value).ok_or_else(bad)?),
                _ => return Err(OptionError::UnknownKey(key.to_string())),
            }
        }
        Ok(o)
    }
}

/// A frame quota: a whole number of frames, at least 1.
fn quota(v: &str) -> Option<usize> {
    v.parse().ok().filter(|&n| n > 0)
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
        assert_eq!(o.vms, Some(vec![VmSpec::new(HELLO), VmSpec::new(WILD_ACCESS), VmSpec::new(HELLO)]));
        let o = Options::parse("vms=hello:512,hello frame-quota=2048").unwrap();
        assert_eq!(o.vms, Some(vec![VmSpec { scenario: HELLO, frame_quota: Some(512) }, VmSpec::new(HELLO)]));
        assert_eq!(o.frame_quota, Some(2048));
        assert_eq!(Options::default().frame_quota, None);
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
        for bad in ["vms=hello:0", "vms=hello:x", "vms=hello:", "frame-quota=0", "frame-quota=-1"] {
            let (key, value) = bad.split_once('=').unwrap();
            assert_eq!(Options::parse(bad), Err(OptionError::BadValue { key: key.into(), value: value.into() }), "{bad}");
        }
        assert_eq!(
            Options::parse("warn-test=2").unwrap_err().to_string(),
            "bad value '2' for boot option 'warn-test'"
        );
    }
}

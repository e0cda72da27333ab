//! The VM manifest: which VMs a boot runs, with their kernels, memory,
//! command lines and modules. The runner (`boot/`) renders it into the
//! boot bundle as the file `vms`; the kernel parses it from there.
//!
//! # Format
//!
//! UTF-8 text, lines split at `\n` only. The first line is the version,
//! `hv-manifest 1`. Empty lines and lines that start with `#` are skipped.
//! Every other line is `KEY VALUE`: the key runs to the first space, the
//! value is everything after that one space, verbatim to the end of the
//! line (spaces, `=`, quotes and `#` included). Keys:
//!
//! ```text
//! vm LABEL              starts a VM; LABEL is [A-Za-z0-9._-], 1..=32 chars
//! kind program NAME     the project's guest program in scenario NAME, or
//! kind file             a kernel from the user (multiboot ELF, bzImage)
//! kernel PATH           its kernel, a file of the bundle
//! mem BYTES             guest memory: decimal, a multiple of 4096,
//!                       MIN_MEM..=MAX_MEM
//! cmdline TEXT          the guest kernel's arguments (optional)
//! module PATH TEXT      a multiboot module and its string (repeatable;
//!                       TEXT optional, after one space)
//! frame-quota N         host frames the VM may hold, N >= 1 (optional)
//! ```
//!
//! `kind`, `kernel` and `mem` are required once per VM, `cmdline` and
//! `frame-quota` allowed once. A PATH is 1..=100 chars of
//! [A-Za-z0-9._/-]: 100 is the ustar name field, the only one
//! [`crate::bundle`] reads. In the two TEXT values `\` is written `\\`,
//! a line feed `\n` and a carriage return `\r`; nothing else is escaped,
//! so [`render`] cannot produce a line that reads as another key, and
//! any text survives [`parse`] (the runner refuses newlines anyway).
//!
//! The parser takes the file as untrusted: it never panics, refuses what
//! it does not know, and what it builds is bounded by [`MAX_VMS`],
//! [`MAX_MODULES`], [`MAX_LABEL`], [`MAX_CMDLINE`] and [`MAX_PATH`].
//!
//! Example:
//!
//! ```text
//! hv-manifest 1
//! vm hello
//! kind program hello
//! kernel guest/guest.elf
//! mem 134217728
//! vm apic.flat
//! kind file
//! kernel vm/1/kernel
//! mem 67108864
//! cmdline -smp 1 "x = y"
//! module vm/1/module/0 env
//! frame-quota 4096
//! ```

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};

/// The first line of every manifest.
pub const HEADER: &str = "hv-manifest 1";
/// VMs in one manifest.
pub const MAX_VMS: usize = 64;
/// Modules of one VM.
pub const MAX_MODULES: usize = 16;
/// Bytes of a label (and of a scenario name).
pub const MAX_LABEL: usize = 32;
/// Bytes of a command line or a module string, unescaped (Linux's x86
/// `COMMAND_LINE_SIZE` is 2048, terminating NUL included).
pub const MAX_CMDLINE: usize = 2047;
/// Bytes of a path in the bundle: the ustar name field (POSIX.1-1988).
pub const MAX_PATH: usize = 100;
/// Guest memory bounds and the runner's default.
pub const MIN_MEM: u64 = 2 << 20;
pub const MAX_MEM: u64 = 3 << 30;
pub const DEFAULT_MEM: u64 = 128 << 20;
/// Guest memory is a whole number of these.
pub const MEM_ALIGN: u64 = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The project's guest program (`guest/guest.elf`) in this scenario
    /// (a name of `hypercall::scenario`; the kernel checks it).
    Program { scenario: String },
    /// A kernel file from the user.
    File,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Where the module is in the bundle, e.g. `vm/0/module/0`.
    pub path: String,
    /// Its multiboot string.
    pub cmdline: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmEntry {
    /// The name the VM is reported under.
    pub label: String,
    pub kind: Kind,
    /// Its kernel's path in the bundle, e.g. `vm/0/kernel`.
    pub kernel: String,
    /// Guest memory in bytes.
    pub mem: u64,
    /// The guest kernel's arguments (the loader puts the program name
    /// first).
    pub cmdline: String,
    pub modules: Vec<ModuleEntry>,
    pub frame_quota: Option<usize>,
}

/// What is wrong, and on which line (1-based; a VM that lacks a key is
/// reported at its `vm` line, a manifest with no VM at line 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub line: usize,
    pub problem: Problem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The first line is not [`HEADER`].
    NoHeader,
    /// Not one of the keys (the key is not echoed: it is untrusted).
    UnknownKey,
    /// A key other than `vm` before the first `vm`.
    OutsideVm(&'static str),
    /// A key given twice for one VM.
    Duplicate(&'static str),
    /// A VM without this required key.
    Missing(&'static str),
    /// A value that is not of its key's form.
    Bad(&'static str),
    /// A value longer than its limit.
    TooLong { what: &'static str, max: usize },
    TooManyVms,
    TooManyModules,
    /// No `vm` line at all.
    NoVms,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VM manifest line {}: ", self.line)?;
        match self.problem {
            Problem::NoHeader => write!(f, "the first line is not '{HEADER}'"),
            Problem::UnknownKey => f.write_str("unknown key"),
            Problem::OutsideVm(k) => write!(f, "'{k}' before the first 'vm' line"),
            Problem::Duplicate(k) => write!(f, "'{k}' given twice for one VM"),
            Problem::Missing(k) => write!(f, "this VM has no '{k}' line"),
            Problem::Bad(k) => write!(f, "bad value for '{k}'"),
            Problem::TooLong { what, max } => write!(f, "{what} longer than {max} bytes"),
            Problem::TooManyVms => write!(f, "more than {MAX_VMS} VMs"),
            Problem::TooManyModules => write!(f, "more than {MAX_MODULES} modules for one VM"),
            Problem::NoVms => f.write_str("no VMs"),
        }
    }
}

/// The manifest text for `vms`. Text values are escaped (see the module
/// docs), so the result parses back to `vms` whenever every value is
/// within the limits [`parse`] checks.
pub fn render(vms: &[VmEntry]) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = render_into(&mut s, vms);
    s
}

fn render_into(s: &mut String, vms: &[VmEntry]) -> fmt::Result {
    writeln!(s, "{HEADER}")?;
    for vm in vms {
        writeln!(s, "vm {}", vm.label)?;
        match &vm.kind {
            Kind::Program { scenario } => writeln!(s, "kind program {scenario}")?,
            Kind::File => writeln!(s, "kind file")?,
        }
        writeln!(s, "kernel {}", vm.kernel)?;
        writeln!(s, "mem {}", vm.mem)?;
        if !vm.cmdline.is_empty() {
            s.push_str("cmdline ");
            escape_into(s, &vm.cmdline);
            s.push('\n');
        }
        for m in &vm.modules {
            write!(s, "module {}", m.path)?;
            if !m.cmdline.is_empty() {
                s.push(' ');
                escape_into(s, &m.cmdline);
            }
            s.push('\n');
        }
        if let Some(q) = vm.frame_quota {
            writeln!(s, "frame-quota {q}")?;
        }
    }
    Ok(())
}

fn escape_into(s: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            c => s.push(c),
        }
    }
}

/// A VM being read, with the line it started on and what it has had.
struct Partial {
    line: usize,
    label: String,
    kind: Option<Kind>,
    kernel: Option<String>,
    mem: Option<u64>,
    cmdline: Option<String>,
    modules: Vec<ModuleEntry>,
    frame_quota: Option<usize>,
}

impl Partial {
    fn finish(self) -> Result<VmEntry, ManifestError> {
        let missing = |k| ManifestError { line: self.line, problem: Problem::Missing(k) };
        Ok(VmEntry {
            kind: self.kind.ok_or_else(|| missing("kind"))?,
            kernel: self.kernel.ok_or_else(|| missing("kernel"))?,
            mem: self.mem.ok_or_else(|| missing("mem"))?,
            label: self.label,
            cmdline: self.cmdline.unwrap_or_default(),
            modules: self.modules,
            frame_quota: self.frame_quota,
        })
    }
}

/// Reads a manifest (see the module docs for the format).
pub fn parse(text: &str) -> Result<Vec<VmEntry>, ManifestError> {
    let mut vms: Vec<VmEntry> = Vec::new();
    let mut cur: Option<Partial> = None;
    let mut lines = text.split('\n').enumerate().map(|(i, l)| (i + 1, l));
    if lines.next().map(|(_, l)| l) != Some(HEADER) {
        return Err(ManifestError { line: 1, problem: Problem::NoHeader });
    }
    for (n, line) in lines {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |problem| ManifestError { line: n, problem };
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        if key == "vm" {
            if let Some(done) = cur.take() {
                vms.push(done.finish()?);
            }
            if vms.len() == MAX_VMS {
                return Err(err(Problem::TooManyVms));
            }
            let label = name(value, "vm").map_err(err)?;
            cur = Some(Partial {
                line: n,
                label,
                kind: None,
                kernel: None,
                mem: None,
                cmdline: None,
                modules: Vec::new(),
                frame_quota: None,
            });
            continue;
        }
        let key: &'static str = match key {
            "kind" => "kind",
            "kernel" => "kernel",
            "mem" => "mem",
            "cmdline" => "cmdline",
            "module" => "module",
            "frame-quota" => "frame-quota",
            _ => return Err(err(Problem::UnknownKey)),
        };
        let Some(vm) = cur.as_mut() else {
            return Err(err(Problem::OutsideVm(key)));
        };
        match key {
            "kind" => {
                let kind = match value.split_once(' ') {
                    None if value == "file" => Kind::File,
                    Some(("program", s)) => Kind::Program { scenario: name(s, "kind").map_err(err)? },
                    _ => return Err(err(Problem::Bad("kind"))),
                };
                once(&mut vm.kind, key, kind).map_err(err)?;
            }
            "kernel" => {
                let p = path(value, "kernel").map_err(err)?;
                once(&mut vm.kernel, key, p).map_err(err)?;
            }
            "mem" => {
                let m = number(value)
                    .and_then(|m| u64::try_from(m).ok())
                    .filter(|m| (MIN_MEM..=MAX_MEM).contains(m) && m % MEM_ALIGN == 0)
                    .ok_or_else(|| err(Problem::Bad("mem")))?;
                once(&mut vm.mem, key, m).map_err(err)?;
            }
            "cmdline" => {
                let c = unescape(value, "cmdline").map_err(err)?;
                once(&mut vm.cmdline, key, c).map_err(err)?;
            }
            "module" => {
                if vm.modules.len() == MAX_MODULES {
                    return Err(err(Problem::TooManyModules));
                }
                let (p, c) = value.split_once(' ').unwrap_or((value, ""));
                let path = path(p, "module").map_err(err)?;
                let cmdline = unescape(c, "module string").map_err(err)?;
                vm.modules.push(ModuleEntry { path, cmdline });
            }
            _ => {
                let q = number(value)
                    .and_then(|q| usize::try_from(q).ok())
                    .filter(|&q| q > 0)
                    .ok_or_else(|| err(Problem::Bad("frame-quota")))?;
                once(&mut vm.frame_quota, key, q).map_err(err)?;
            }
        }
    }
    match cur {
        Some(done) => vms.push(done.finish()?),
        None => return Err(ManifestError { line: 1, problem: Problem::NoVms }),
    }
    Ok(vms)
}

/// Sets a once-only field, refusing a second one.
fn once<T>(slot: &mut Option<T>, key: &'static str, v: T) -> Result<(), Problem> {
    match slot {
        Some(_) => Err(Problem::Duplicate(key)),
        None => {
            *slot = Some(v);
            Ok(())
        }
    }
}

/// Whether `s` is a valid label: 1..=[`MAX_LABEL`] bytes of
/// `[A-Za-z0-9._-]` (the runner checks `--label` with it).
pub fn valid_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LABEL && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A label or a scenario name.
fn name(s: &str, what: &'static str) -> Result<String, Problem> {
    if s.len() > MAX_LABEL {
        return Err(Problem::TooLong { what: "a label", max: MAX_LABEL });
    }
    if !valid_label(s) {
        return Err(Problem::Bad(what));
    }
    Ok(s.into())
}

fn path(s: &str, what: &'static str) -> Result<String, Problem> {
    if s.len() > MAX_PATH {
        return Err(Problem::TooLong { what: "a path", max: MAX_PATH });
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b)) {
        return Err(Problem::Bad(what));
    }
    Ok(s.into())
}

/// Decimal digits only (no sign, no spaces), at most 20 of them.
fn number(s: &str) -> Option<u128> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Undoes [`escape_into`]; the limit applies to the result. A NUL is
/// refused: the guest gets these as C strings (multiboot, Linux).
fn unescape(s: &str, what: &'static str) -> Result<String, Problem> {
    let too_long = Problem::TooLong { what, max: MAX_CMDLINE };
    // Every escape is two bytes for one: more than twice the limit cannot fit.
    if s.len() > 2 * MAX_CMDLINE {
        return Err(too_long);
    }
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        out.push(match c {
            '\\' => match chars.next() {
                Some('\\') => '\\',
                Some('n') => '\n',
                Some('r') => '\r',
                _ => return Err(Problem::Bad(what)),
            },
            '\0' | '\r' => return Err(Problem::Bad(what)),
            c => c,
        });
    }
    if out.len() > MAX_CMDLINE {
        return Err(too_long);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn program(label: &str, scenario: &str) -> VmEntry {
        VmEntry {
            label: label.into(),
            kind: Kind::Program { scenario: scenario.into() },
            kernel: "guest/guest.elf".into(),
            mem: DEFAULT_MEM,
            cmdline: String::new(),
            modules: vec![],
            frame_quota: None,
        }
    }

    fn file(label: &str, n: usize) -> VmEntry {
        VmEntry {
            label: label.into(),
            kind: Kind::File,
            kernel: alloc::format!("vm/{n}/kernel"),
            mem: 64 << 20,
            cmdline: "-smp 1 \"x = y\" a=b 'q' \\ # not a comment ".into(),
            modules: vec![
                ModuleEntry { path: alloc::format!("vm/{n}/module/0"), cmdline: "env".into() },
                ModuleEntry { path: alloc::format!("vm/{n}/module/1"), cmdline: String::new() },
            ],
            frame_quota: Some(4096),
        }
    }

    fn problem(text: &str) -> (usize, Problem) {
        let e = parse(text).unwrap_err();
        (e.line, e.problem)
    }

    #[test]
    fn reads_the_documented_example() {
        let text = "hv-manifest 1\nvm hello\nkind program hello\nkernel guest/guest.elf\nmem 134217728\n\
                    vm apic.flat\nkind file\nkernel vm/1/kernel\nmem 67108864\ncmdline -smp 1 \"x = y\"\n\
                    module vm/1/module/0 env\nframe-quota 4096\n";
        let vms = parse(text).unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0], program("hello", "hello"));
        assert_eq!(vms[1].label, "apic.flat");
        assert_eq!(vms[1].kind, Kind::File);
        assert_eq!(vms[1].kernel, "vm/1/kernel");
        assert_eq!(vms[1].mem, 64 << 20);
        assert_eq!(vms[1].cmdline, "-smp 1 \"x = y\"");
        assert_eq!(vms[1].modules, [ModuleEntry { path: "vm/1/module/0".into(), cmdline: "env".into() }]);
        assert_eq!(vms[1].frame_quota, Some(4096));
    }

    #[test]
    fn renders_the_documented_lines() {
        let mut vm = file("apic.flat", 1);
        vm.cmdline = "a\\b\nc\rd".into();
        vm.modules.truncate(1);
        let text = render(&[program("hello", "hello"), vm]);
        assert_eq!(
            text,
            "hv-manifest 1\nvm hello\nkind program hello\nkernel guest/guest.elf\nmem 134217728\n\
             vm apic.flat\nkind file\nkernel vm/1/kernel\nmem 67108864\ncmdline a\\\\b\\nc\\rd\n\
             module vm/1/module/0 env\nframe-quota 4096\n"
        );
    }

    #[test]
    fn round_trips() {
        let vms = vec![program("hello", "hello"), file("apic.flat", 1), program("d-2", "dedupe"), file("x", 3)];
        assert_eq!(parse(&render(&vms)).unwrap(), vms);
        // Text that looks like keys, escapes, comments or trailing spaces.
        let mut odd = file("odd", 0);
        odd.cmdline = "  lead\nvm evil\nkind file\r\\n\\ tail  ".into();
        odd.modules[0].cmdline = "module vm/0/x\n#  ".into();
        let back = parse(&render(&[odd.clone()])).unwrap();
        assert_eq!(back, [odd]);
        // Exactly at every limit.
        let mut big = file(&"L".repeat(MAX_LABEL), 0);
        big.cmdline = "c".repeat(MAX_CMDLINE);
        big.kernel = "k".repeat(MAX_PATH);
        big.mem = MAX_MEM;
        big.frame_quota = Some(1);
        big.modules = (0..MAX_MODULES).map(|k| ModuleEntry { path: alloc::format!("m/{k}"), cmdline: "\\".repeat(MAX_CMDLINE) }).collect();
        let mut small = program("s", "hello");
        small.mem = MIN_MEM;
        let mut many = vec![big, small];
        many.resize(MAX_VMS, program("p", "hello"));
        assert_eq!(parse(&render(&many)).unwrap(), many);
    }

    #[test]
    fn skips_blank_and_comment_lines_and_defaults_the_optional_keys() {
        let vms = parse("hv-manifest 1\n\n# a comment\nvm a\n#kind file\nkind file\n\nkernel k\nmem 2097152").unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!((vms[0].cmdline.as_str(), vms[0].frame_quota, vms[0].modules.len()), ("", None, 0));
        // A module with no string, and an empty cmdline line.
        let vms = parse("hv-manifest 1\nvm a\nkind file\nkernel k\nmem 4194304\ncmdline\nmodule m").unwrap();
        assert_eq!(vms[0].modules, [ModuleEntry { path: "m".into(), cmdline: String::new() }]);
        assert_eq!(vms[0].cmdline, "");
    }

    const VM: &str = "hv-manifest 1\nvm a\nkind file\nkernel k\nmem 4194304\n";

    #[test]
    fn names_the_line_and_the_problem() {
        assert_eq!(problem(""), (1, Problem::NoHeader));
        assert_eq!(problem("hv-manifest 2\nvm a"), (1, Problem::NoHeader));
        assert_eq!(problem("\nhv-manifest 1"), (1, Problem::NoHeader));
        assert_eq!(problem("hv-manifest 1\n"), (1, Problem::NoVms));
        assert_eq!(problem("hv-manifest 1\nkind file"), (2, Problem::OutsideVm("kind")));
        assert_eq!(problem(&(VM.to_string() + "memory 5")), (6, Problem::UnknownKey));
        assert_eq!(problem(&(VM.to_string() + " mem 5")), (6, Problem::UnknownKey));
        assert_eq!(problem(&(VM.to_string() + "kind file")), (6, Problem::Duplicate("kind")));
        assert_eq!(problem(&(VM.to_string() + "kernel k")), (6, Problem::Duplicate("kernel")));
        assert_eq!(problem(&(VM.to_string() + "mem 4194304")), (6, Problem::Duplicate("mem")));
        assert_eq!(problem(&(VM.to_string() + "cmdline\ncmdline x")), (7, Problem::Duplicate("cmdline")));
        assert_eq!(problem(&(VM.to_string() + "frame-quota 1\nframe-quota 1")), (7, Problem::Duplicate("frame-quota")));
        // Missing keys: at the `vm` line, also when the next VM starts.
        assert_eq!(problem("hv-manifest 1\nvm a\nkernel k\nmem 4194304"), (2, Problem::Missing("kind")));
        assert_eq!(problem("hv-manifest 1\nvm a\nkind file\nmem 4194304"), (2, Problem::Missing("kernel")));
        assert_eq!(problem(&(VM.to_string() + "vm b\nkind file\nkernel k\nvm c")), (6, Problem::Missing("mem")));
        let e = parse("hv-manifest 1\nvm a\nkind file\nmem 4194304").unwrap_err();
        assert_eq!(e.to_string(), "VM manifest line 2: this VM has no 'kernel' line");
        assert_eq!(parse("x").unwrap_err().to_string(), "VM manifest line 1: the first line is not 'hv-manifest 1'");
    }

    #[test]
    fn refuses_bad_values() {
        let with = |line: &str| problem(&alloc::format!("hv-manifest 1\nvm a\n{line}"));
        for bad in ["vm", "vm a b", "vm a/b", "vm ä", "vm  a"] {
            assert_eq!(problem(&alloc::format!("hv-manifest 1\n{bad}")), (2, Problem::Bad("vm")), "{bad}");
        }
        assert_eq!(problem(&alloc::format!("hv-manifest 1\nvm {}", "a".repeat(MAX_LABEL + 1))).1, Problem::TooLong { what: "a label", max: MAX_LABEL });
        for bad in ["kind", "kind files", "kind file ", "kind program", "kind program ", "kind program a b", "kind prog x"] {
            assert_eq!(with(bad), (3, Problem::Bad("kind")), "{bad}");
        }
        for bad in ["kernel", "kernel a b", "kernel a\\b", "kernel a:b", "kernel  a"] {
            assert_eq!(with(bad), (3, Problem::Bad("kernel")), "{bad}");
        }
        assert_eq!(with(&alloc::format!("kernel {}", "k".repeat(MAX_PATH + 1))).1, Problem::TooLong { what: "a path", max: MAX_PATH });
        // Below, above, unaligned, signs, spaces, overflow.
        for bad in ["mem 2093056", "mem 3221229568", "mem 4194305", "mem +4194304", "mem 4194304 ", "mem", "mem 0x400000", "mem 99999999999999999999", "mem 184467440737095516160"] {
            assert_eq!(with(bad), (3, Problem::Bad("mem")), "{bad}");
        }
        for bad in ["frame-quota 0", "frame-quota -1", "frame-quota", "frame-quota 1k", "frame-quota 99999999999999999999"] {
            assert_eq!(with(bad), (3, Problem::Bad("frame-quota")), "{bad}");
        }
        for bad in ["cmdline a\\", "cmdline \\t", "cmdline a\0b", "cmdline a\r"] {
            assert_eq!(with(bad), (3, Problem::Bad("cmdline")), "{bad:?}");
        }
        assert_eq!(with("module m \\x"), (3, Problem::Bad("module string")));
        assert_eq!(with("module"), (3, Problem::Bad("module")));
        assert_eq!(with("module  x"), (3, Problem::Bad("module")));
        assert_eq!(with(&alloc::format!("cmdline {}", "c".repeat(MAX_CMDLINE + 1))).1, Problem::TooLong { what: "cmdline", max: MAX_CMDLINE });
        assert_eq!(with(&alloc::format!("cmdline {}", "\\n".repeat(MAX_CMDLINE + 1))).1, Problem::TooLong { what: "cmdline", max: MAX_CMDLINE });
        assert_eq!(with(&alloc::format!("module m {}", "\\\\".repeat(MAX_CMDLINE + 1))).1, Problem::TooLong { what: "module string", max: MAX_CMDLINE });
        // Multibyte text counts in bytes.
        assert_eq!(with(&alloc::format!("cmdline {}", "é".repeat(MAX_CMDLINE / 2 + 1))).1, Problem::TooLong { what: "cmdline", max: MAX_CMDLINE });
    }

    #[test]
    fn bounds_vms_and_modules() {
        let vms = vec![program("p", "hello"); MAX_VMS + 1];
        let text = render(&vms);
        let e = parse(&text).unwrap_err();
        // The 65th `vm` line: a header, then 4 lines per VM.
        assert_eq!((e.line, e.problem), (2 + 4 * MAX_VMS, Problem::TooManyVms));
        let mut vm = program("p", "hello");
        vm.modules = vec![ModuleEntry { path: "m".into(), cmdline: String::new() }; MAX_MODULES + 1];
        let e = parse(&render(&[vm])).unwrap_err();
        assert_eq!((e.line, e.problem), (6 + MAX_MODULES, Problem::TooManyModules));
        assert!(e.to_string().contains("more than 16 modules"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_text_round_trips(cmdline in "\\PC{0,64}", module in "[ -~\n\r\\\\]{0,64}", q in proptest::option::of(1usize..)) {
            let mut vm = file("v", 0);
            vm.cmdline = cmdline.replace('\0', "");
            vm.modules[1].cmdline = module;
            vm.frame_quota = q;
            proptest::prop_assert_eq!(parse(&render(&[vm.clone()])).unwrap(), vec![vm]);
        }

        #[test]
        fn never_panics(text in "hv-manifest 1\n(((vm|kind|kernel|mem|cmdline|module|frame-quota)( [ -~\\\\]{0,12})?)?\n){0,16}") {
            let _ = parse(&text);
        }
    }
}

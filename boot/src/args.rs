//! The runner's command line (see [`USAGE`]).

use crate::emulator::{Emulator, Firmware};
use hvcore::hypercall::scenario;
use hvcore::manifest::{self, MAX_CMDLINE, MAX_LABEL, MAX_MODULES, MAX_VMS, MEM_ALIGN, MAX_MEM, MIN_MEM};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const USAGE: &str = "\
usage: cargo run [--] [build|run] [options] [--vm FILE [vm options]]...

  run (default)   build the images, then boot one headless and wait for
                  the kernel's result
  build           only build target/images/<name>/{bios,uefi}.img

options:
  --emulator E    auto (default), bochs, qemu (TCG) or qemu-kvm (nested)
  --firmware F    bios (default) or uefi (QEMU only)
  --options S     boot options for the kernel, e.g. \"log=debug warn-test=1\"
  --name N        name of the image set and run directory (default: default)
  --timeout S     seconds before a run is killed and failed (default: 300)
  --quiet         do not echo the serial log
  --boot-log      let the bootloader print its own log on the serial port

VMs (without --vm, the kernel runs its default VMs or those of vms= in
--options; with --vm, exactly these, and vms= must not be given):
  --vm FILE       one VM running the kernel FILE (a multiboot ELF such as a
                  kvm-unit-tests .flat, or a Linux bzImage); repeatable
  --vm guest:S    one VM running the project's guest program in scenario S
                  (hello, dedupe, ...)
then, applying to the last --vm:
  --mem SIZE      guest memory: bytes, or with a K, M or G suffix (default
                  128M; at least 2M, at most 3G, a multiple of 4K)
  --cmdline STR   the guest kernel's arguments (the loader puts the program
                  name first)
  --module FILE   a multiboot module, its string the file's name; repeatable
  --initrd FILE   a Linux kernel's initramfs (its one module)
  --label NAME    the name the VM is reported under (default: the file's
                  name, or S); A-Z a-z 0-9 . _ - and at most 32 characters
  --frame-quota N host frames the VM may hold

exit status: 0 success, 1 the kernel reported failure, 2 bad usage or a
missing tool, 3 the kernel reported no usable VMX, 4 timeout or no result";

#[derive(Debug)]
pub struct Args {
    pub build_only: bool,
    pub emulator: Option<Emulator>,
    pub firmware: Firmware,
    pub options: String,
    pub name: String,
    pub timeout: Duration,
    pub echo: bool,
    /// `--boot-log`: the bootloader's serial log on.
    pub boot_log: bool,
    /// The `--vm`s in order; empty: no manifest, the kernel's choice.
    pub vms: Vec<Vm>,
}

/// What a VM runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `guest:SCENARIO`: the project's guest program.
    Guest(String),
    /// A kernel file (checked readable when parsed).
    File(PathBuf),
}

/// One `--vm` and its modifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub source: Source,
    pub label: String,
    pub mem: u64,
    pub cmdline: String,
    /// Files, checked readable when parsed.
    pub modules: Vec<PathBuf>,
    pub frame_quota: Option<usize>,
}

/// A `--vm` whose modifiers are still being read: `None` is not given
/// (yet), so a second one can be refused.
struct Pending {
    arg: String,
    source: Source,
    label: Option<String>,
    mem: Option<u64>,
    cmdline: Option<String>,
    modules: Vec<PathBuf>,
    frame_quota: Option<usize>,
}

impl Pending {
    fn finish(self) -> Result<Vm, String> {
        let label = match (self.label, &self.source) {
            (Some(l), _) => l,
            (None, Source::Guest(s)) => s.clone(),
            (None, Source::File(p)) => {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if !manifest::valid_label(&name) {
                    return Err(format!(
                        "--vm {}: its file name '{name}' is no label ({LABEL_RULE}): give one with --label",
                        self.arg
                    ));
                }
                name
            }
        };
        Ok(Vm {
            source: self.source,
            label,
            mem: self.mem.unwrap_or(manifest::DEFAULT_MEM),
            cmdline: self.cmdline.unwrap_or_default(),
            modules: self.modules,
            frame_quota: self.frame_quota,
        })
    }
}

const LABEL_RULE: &str = "A-Z a-z 0-9 . _ - only, at most 32 characters";

pub fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        build_only: false,
        emulator: None,
        firmware: Firmware::Bios,
        options: String::new(),
        name: "default".into(),
        timeout: Duration::from_secs(300),
        echo: true,
        boot_log: false,
        vms: Vec::new(),
    };
    let mut cur: Option<Pending> = None;
    while let Some(arg) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "run" => {}
            "build" => a.build_only = true,
            "--emulator" => {
                a.emulator = match value()?.as_str() {
                    "auto" => None,
                    "bochs" => Some(Emulator::Bochs),
                    "qemu" => Some(Emulator::QemuTcg),
                    "qemu-kvm" => Some(Emulator::QemuKvm),
                    e => return Err(format!("unknown emulator '{e}'")),
                }
            }
            "--firmware" => {
                a.firmware = match value()?.as_str() {
                    "bios" => Firmware::Bios,
                    "uefi" => Firmware::Uefi,
                    f => return Err(format!("unknown firmware '{f}'")),
                }
            }
            "--options" => a.options = value()?,
            "--name" => a.name = value()?,
            "--timeout" => {
                let v = value()?;
                a.timeout = Duration::from_secs(v.parse().map_err(|_| format!("bad timeout '{v}'"))?)
            }
            "--quiet" => a.echo = false,
            "--boot-log" => a.boot_log = true,
            "--vm" => {
                let v = value()?;
                if let Some(done) = cur.take() {
                    a.vms.push(done.finish()?);
                }
                if a.vms.len() == MAX_VMS {
                    return Err(format!("--vm {v}: more than {MAX_VMS} VMs"));
                }
                let source = match v.strip_prefix("guest:") {
                    Some(s) => {
                        if scenario::from_name(s).is_none() {
                            let all: Vec<_> = scenario::ALL.iter().filter_map(|&s| scenario::name(s)).collect();
                            return Err(format!("--vm {v}: no scenario '{s}' (there are {})", all.join(", ")));
                        }
                        Source::Guest(s.into())
                    }
                    None => Source::File(readable(&arg, &v)?),
                };
                cur = Some(Pending {
                    arg: v,
                    source,
                    label: None,
                    mem: None,
                    cmdline: None,
                    modules: Vec::new(),
                    frame_quota: None,
                });
            }
            "--mem" | "--cmdline" | "--module" | "--initrd" | "--label" | "--frame-quota" => {
                let Some(vm) = cur.as_mut() else {
                    return Err(format!("{arg} must follow a --vm (it applies to the last --vm before it)"));
                };
                let v = value()?;
                let twice = || format!("{arg} given twice for --vm {}", vm.arg);
                match arg.as_str() {
                    "--mem" => {
                        let m = size(&v).map_err(|e| format!("--mem {v}: {e}"))?;
                        vm.mem.replace(m).map_or(Ok(()), |_| Err(twice()))?;
                    }
                    "--cmdline" => {
                        text(&v).map_err(|e| format!("--cmdline for --vm {}: {e}", vm.arg))?;
                        vm.cmdline.replace(v).map_or(Ok(()), |_| Err(twice()))?;
                    }
                    "--initrd" => {
                        if !vm.modules.is_empty() {
                            return Err(format!("--initrd {v}: --vm {} has an initramfs or modules already", vm.arg));
                        }
                        vm.modules.push(readable(&arg, &v)?);
                    }
                    "--module" => {
                        if vm.modules.len() == MAX_MODULES {
                            return Err(format!("--module {v}: more than {MAX_MODULES} modules for --vm {}", vm.arg));
                        }
                        vm.modules.push(readable(&arg, &v)?);
                    }
                    "--label" => {
                        if !manifest::valid_label(&v) {
                            return Err(format!("--label '{v}': {LABEL_RULE}"));
                        }
                        vm.label.replace(v).map_or(Ok(()), |_| Err(twice()))?;
                    }
                    _ => {
                        let q = v.parse().ok().filter(|&q: &usize| q > 0);
                        let q = q.ok_or_else(|| format!("--frame-quota '{v}': not a whole number of frames above 0"))?;
                        vm.frame_quota.replace(q).map_or(Ok(()), |_| Err(twice()))?;
                    }
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument '{other}'\n\n{USAGE}")),
        }
    }
    if let Some(done) = cur {
        a.vms.push(done.finish()?);
    }
    if !a.vms.is_empty() && sets_vms(&a.options) {
        return Err("--vm and the boot option vms= both choose the VMs: give one of them".into());
    }
    Ok(a)
}

/// Whether boot options set `vms=` (words as `hvcore::options` reads them).
fn sets_vms(options: &str) -> bool {
    options.lines().flat_map(|l| l.split('#').next().unwrap_or("").split_whitespace()).any(|w| w.starts_with("vms="))
}

/// A file the build can read: it exists, is a regular file and opens.
fn readable(flag: &str, file: &str) -> Result<PathBuf, String> {
    let p = Path::new(file);
    let f = std::fs::File::open(p).map_err(|e| format!("{flag} {file}: {e}"))?;
    match f.metadata() {
        Ok(m) if m.is_file() => Ok(p.to_path_buf()),
        Ok(_) => Err(format!("{flag} {file}: not a regular file")),
        Err(e) => Err(format!("{flag} {file}: {e}")),
    }
}

/// A command line or module string the manifest carries as the guest
/// gets it.
fn text(s: &str) -> Result<(), String> {
    if s.contains(['\n', '\r']) {
        return Err("a line break cannot be passed".into());
    }
    if s.len() > MAX_CMDLINE {
        return Err(format!("longer than {MAX_CMDLINE} bytes"));
    }
    Ok(())
}

/// `--mem`: bytes, or a number with a K, M or G suffix (binary: 1K = 1024).
pub fn size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let not_a_size = || "not a size (bytes, or a number with a K, M or G suffix)".to_string();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_size());
    }
    let bytes = digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit));
    let Some(bytes) = bytes.filter(|&b| b <= MAX_MEM) else {
        return Err("more than the 3G maximum".into());
    };
    if bytes < MIN_MEM {
        return Err("less than the 2M minimum".into());
    }
    if bytes % MEM_ALIGN != 0 {
        return Err("not a multiple of 4K".into());
    }
    Ok(bytes)
}

const _: () = assert!(MIN_MEM == 2 << 20 && MAX_MEM == 3 << 30 && MEM_ALIGN == 4096 && MAX_LABEL == 32);

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory with files `a.flat`, `b.flat`, `env`, `bad name`
    /// and a subdirectory `dir`.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!("boot-args-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("dir")).unwrap();
            for f in ["a.flat", "b.flat", "env", "bad name", "bzImage", "initrd"] {
                std::fs::write(d.join(f), f).unwrap();
            }
            Scratch(d)
        }
        fn f(&self, name: &str) -> String {
            self.0.join(name).display().to_string()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn args(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    fn err(v: &[&str]) -> String {
        args(v).unwrap_err()
    }

    #[test]
    fn the_old_arguments_still_work() {
        let a = args(&[]).unwrap();
        assert!(!a.build_only && a.echo && !a.boot_log && a.vms.is_empty());
        assert_eq!((a.emulator, a.firmware, a.options.as_str(), a.name.as_str()), (None, Firmware::Bios, "", "default"));
        assert_eq!(a.timeout, Duration::from_secs(300));
        let a = args(&[
            "build", "--emulator", "bochs", "--firmware", "uefi", "--options", "log=debug vms=hello", "--name", "n",
            "--timeout", "7", "--quiet",
        ])
        .unwrap();
        assert!(a.build_only && !a.echo);
        assert_eq!((a.emulator, a.firmware, a.options.as_str(), a.name.as_str()), (Some(Emulator::Bochs), Firmware::Uefi, "log=debug vms=hello", "n"));
        assert_eq!(a.timeout, Duration::from_secs(7));
        assert!(!args(&["run"]).unwrap().build_only);
        assert_eq!(args(&["--emulator", "qemu"]).unwrap().emulator, Some(Emulator::QemuTcg));
        assert_eq!(args(&["--emulator", "qemu-kvm"]).unwrap().emulator, Some(Emulator::QemuKvm));
        assert_eq!(args(&["--emulator", "bochs", "--emulator", "auto"]).unwrap().emulator, None);
        assert_eq!(args(&["--firmware", "bios"]).unwrap().firmware, Firmware::Bios);
        assert!(args(&["--boot-log"]).unwrap().boot_log);
        assert_eq!(err(&["--emulator", "vbox"]), "unknown emulator 'vbox'");
        assert_eq!(err(&["--firmware", "coreboot"]), "unknown firmware 'coreboot'");
        assert_eq!(err(&["--timeout", "soon"]), "bad timeout 'soon'");
        assert_eq!(err(&["--help"]), USAGE);
        assert_eq!(err(&["-h"]), USAGE);
    }

    #[test]
    fn unknown_flags_and_missing_values() {
        assert!(err(&["--vms", "x"]).starts_with("unknown argument '--vms'\n\n"));
        assert!(err(&["--boot-logs"]).starts_with("unknown argument '--boot-logs'"));
        for flag in ["--emulator", "--firmware", "--options", "--name", "--timeout", "--vm"] {
            assert_eq!(err(&[flag]), format!("{flag} needs a value"));
        }
        for flag in ["--mem", "--cmdline", "--module", "--initrd", "--label", "--frame-quota"] {
            assert_eq!(err(&["--vm", "guest:hello", flag]), format!("{flag} needs a value"));
        }
    }

    #[test]
    fn every_vm_flag_and_its_defaults() {
        let s = Scratch::new("flags");
        let a = args(&[
            "--vm", &s.f("a.flat"), "--mem", "64M", "--cmdline", "-smp 1 \"x = y\" '#'", "--module", &s.f("env"),
            "--module", &s.f("b.flat"), "--label", "apic-1", "--frame-quota", "4096",
            "--vm", "guest:dedupe",
            "--vm", &s.f("b.flat"),
        ])
        .unwrap();
        assert_eq!(a.vms.len(), 3);
        assert_eq!(
            a.vms[0],
            Vm {
                source: Source::File(s.0.join("a.flat")),
                label: "apic-1".into(),
                mem: 64 << 20,
                cmdline: "-smp 1 \"x = y\" '#'".into(),
                modules: vec![s.0.join("env"), s.0.join("b.flat")],
                frame_quota: Some(4096),
            }
        );
        // Defaults: 128M, the file's or the scenario's name, nothing else.
        let plain = |source, label: &str| Vm { source, label: label.into(), mem: 128 << 20, cmdline: String::new(), modules: vec![], frame_quota: None };
        assert_eq!(a.vms[1], plain(Source::Guest("dedupe".into()), "dedupe"));
        assert_eq!(a.vms[2], plain(Source::File(s.0.join("b.flat")), "b.flat"));
        // Modifiers in any order, interleaved with the other flags.
        let a = args(&["--vm", "guest:hello", "--label", "x", "--quiet", "--mem", "1G", "--vm", "guest:hello", "--frame-quota", "1", "--cmdline", ""]).unwrap();
        assert_eq!((a.vms[0].label.as_str(), a.vms[0].mem, a.echo), ("x", 1 << 30, false));
        assert_eq!((a.vms[1].label.as_str(), a.vms[1].mem, a.vms[1].frame_quota), ("hello", 128 << 20, Some(1)));
        // Each modifier goes to the last --vm only.
        assert_eq!(a.vms[0].frame_quota, None);
    }

    #[test]
    fn initrd_is_the_one_module() {
        let s = Scratch::new("initrd");
        let a = args(&["--vm", &s.f("bzImage"), "--initrd", &s.f("initrd"), "--cmdline", "console=ttyS0"]).unwrap();
        assert_eq!(a.vms[0].modules, [PathBuf::from(s.f("initrd"))]);
        let e = err(&["--vm", &s.f("bzImage"), "--initrd", &s.f("initrd"), "--initrd", &s.f("env")]);
        assert!(e.contains("has an initramfs or modules already"), "{e}");
        let e = err(&["--vm", &s.f("bzImage"), "--module", &s.f("env"), "--initrd", &s.f("initrd")]);
        assert!(e.contains("has an initramfs or modules already"), "{e}");
    }

    #[test]
    fn modifiers_need_a_vm_before_them() {
        for flag in ["--mem", "--cmdline", "--module", "--initrd", "--label", "--frame-quota"] {
            let e = err(&["--quiet", flag, "1M", "--vm", "guest:hello"]);
            assert_eq!(e, format!("{flag} must follow a --vm (it applies to the last --vm before it)"));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size("2M"), Ok(2 << 20));
        assert_eq!(size("64M"), Ok(64 << 20));
        assert_eq!(size("256m"), Ok(256 << 20));
        assert_eq!(size("1G"), Ok(1 << 30));
        assert_eq!(size("3G"), Ok(3 << 30));
        assert_eq!(size("2048K"), Ok(2 << 20));
        assert_eq!(size("4194304"), Ok(4 << 20));
        assert_eq!(size("3221225472"), Ok(3 << 30));
        for bad in ["", "M", "64MB", "-1M", "1.5G", " 64M", "0x100000", "64 M", "1T"] {
            assert!(size(bad).unwrap_err().starts_with("not a size"), "{bad}");
        }
        for big in ["3073M", "4G", "3221229568", "99999999999999999999", "18446744073709551615G"] {
            assert_eq!(size(big), Err("more than the 3G maximum".into()), "{big}");
        }
        for small in ["0", "1M", "2047K", "2093056"] {
            assert_eq!(size(small), Err("less than the 2M minimum".into()), "{small}");
        }
        assert_eq!(size("4194305"), Err("not a multiple of 4K".into()));
        assert_eq!(size("2049K"), Err("not a multiple of 4K".into()));
        assert_eq!(err(&["--vm", "guest:hello", "--mem", "1M"]), "--mem 1M: less than the 2M minimum");
        assert_eq!(err(&["--vm", "guest:hello", "--mem", "lots"]), "--mem lots: not a size (bytes, or a number with a K, M or G suffix)");
    }

    #[test]
    fn bad_labels() {
        let s = Scratch::new("labels");
        for bad in ["", "a b", "a/b", "ä", "x:y", &"l".repeat(33)] {
            let e = err(&["--vm", "guest:hello", "--label", bad]);
            assert_eq!(e, format!("--label '{bad}': A-Z a-z 0-9 . _ - only, at most 32 characters"));
        }
        assert_eq!(args(&["--vm", "guest:hello", "--label", &"l".repeat(32)]).unwrap().vms[0].label.len(), 32);
        // A file name that is no label needs --label, which fixes it.
        let e = err(&["--vm", &s.f("bad name")]);
        assert!(e.contains("its file name 'bad name' is no label") && e.contains("give one with --label"), "{e}");
        assert_eq!(args(&["--vm", &s.f("bad name"), "--label", "ok"]).unwrap().vms[0].label, "ok");
    }

    #[test]
    fn missing_and_unreadable_files() {
        let s = Scratch::new("files");
        let nosuch = s.f("nosuch.flat");
        let e = err(&["--vm", &nosuch]);
        assert!(e.starts_with(&format!("--vm {nosuch}: ")) && e.contains("No such file"), "{e}");
        let e = err(&["--vm", &s.f("a.flat"), "--module", &nosuch]);
        assert!(e.starts_with(&format!("--module {nosuch}: ")) && e.contains("No such file"), "{e}");
        assert_eq!(err(&["--vm", &s.f("dir")]), format!("--vm {}: not a regular file", s.f("dir")));
        assert_eq!(err(&["--vm", "guest:nosuch"]).split(" (").next().unwrap(), "--vm guest:nosuch: no scenario 'nosuch'");
        assert!(err(&["--vm", "guest:"]).contains("hello, wild-access"));
    }

    #[test]
    fn refuses_what_the_manifest_cannot_carry() {
        let e = err(&["--vm", "guest:hello", "--cmdline", "a\nb"]);
        assert_eq!(e, "--cmdline for --vm guest:hello: a line break cannot be passed");
        assert!(err(&["--vm", "guest:hello", "--cmdline", "a\rb"]).ends_with("a line break cannot be passed"));
        assert!(err(&["--vm", "guest:hello", "--cmdline", &"c".repeat(MAX_CMDLINE + 1)]).ends_with("longer than 2047 bytes"));
        assert_eq!(args(&["--vm", "guest:hello", "--cmdline", &"c".repeat(MAX_CMDLINE)]).unwrap().vms[0].cmdline.len(), MAX_CMDLINE);
        for (flag, v) in [("--mem", "4M"), ("--cmdline", "x"), ("--label", "l"), ("--frame-quota", "9")] {
            let e = err(&["--vm", "guest:hello", flag, v, "--vm", "guest:dedupe", flag, v, flag, v]);
            assert_eq!(e, format!("{flag} given twice for --vm guest:dedupe"));
        }
        for bad in ["0", "-1", "x", ""] {
            assert!(err(&["--vm", "guest:hello", "--frame-quota", bad]).contains("not a whole number of frames"), "{bad}");
        }
        let mut many: Vec<&str> = ["--vm", "guest:hello"].repeat(MAX_VMS);
        assert_eq!(args(&many).unwrap().vms.len(), MAX_VMS);
        many.extend(["--vm", "guest:hello"]);
        assert_eq!(err(&many), "--vm guest:hello: more than 64 VMs");
        let s = Scratch::new("modules");
        let env = s.f("env");
        let mut mods = vec!["--vm", "guest:hello"];
        mods.extend(["--module", env.as_str()].repeat(MAX_MODULES));
        assert_eq!(args(&mods).unwrap().vms[0].modules.len(), MAX_MODULES);
        mods.extend(["--module", env.as_str()]);
        assert_eq!(err(&mods), format!("--module {env}: more than 16 modules for --vm guest:hello"));
    }

    #[test]
    fn vm_and_the_vms_option_exclude_each_other() {
        let e = err(&["--options", "log=debug\nvms=hello", "--vm", "guest:hello"]);
        assert!(e.contains("both choose the VMs"), "{e}");
        // A commented-out vms= and other keys are no conflict.
        assert!(args(&["--options", "# vms=hello\nframe-quota=5 xvms=1", "--vm", "guest:hello"]).is_ok());
        assert!(args(&["--options", "vms=hello"]).is_ok());
    }
}

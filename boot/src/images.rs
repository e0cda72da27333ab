//! Building what boots: the kernel and guest ELFs (bare-metal, by a nested
//! cargo), the boot bundle (a tar that becomes the bootloader's ramdisk),
//! and the BIOS and UEFI disk images.

use crate::args::{Source, Vm};
use bootloader::{BootConfig, DiskImageBuilder};
use bootloader_boot_config::LevelFilter;
use hvcore::manifest::{Kind, ModuleEntry, VmEntry};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const TARGET: &str = "x86_64-unknown-none";
/// The project's guest program in the bundle (the kernel's default VMs
/// and every `--vm guest:S` run it).
pub const GUEST_ELF: &str = "guest/guest.elf";

pub struct Images {
    pub bios: PathBuf,
    pub uefi: PathBuf,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("boot/ has a parent").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the kernel and the guest for the bare-metal target (release:
/// FACTS.md measured debug kernels far slower in Bochs).
fn build_elfs() -> Result<(PathBuf, PathBuf), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["build", "--release", "--target", TARGET, "-p", "kernel", "-p", "guest"])
        .status()
        .map_err(|e| format!("could not start {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!("building the kernel and guest failed ({status})"));
    }
    let dir = target_dir().join(TARGET).join("release");
    Ok((dir.join("kernel"), dir.join("guest")))
}

/// Where each VM's files go in the bundle, and the manifest that names
/// them: kernels at `vm/<n>/kernel`, modules at `vm/<n>/module/<k>`; the
/// project's guest program is `guest/guest.elf`, which every bundle has.
/// A file named again (the same kernel or initramfs for several VMs) is
/// carried once, under the name of its first use: the bootloader loads the
/// whole bundle into memory, and a Linux kernel is 14 MB.
pub fn manifest(vms: &[Vm]) -> Vec<VmEntry> {
    let mut placed: std::collections::HashMap<PathBuf, String> = std::collections::HashMap::new();
    let mut place = |file: &Path, name: String| placed.entry(file.to_path_buf()).or_insert(name).clone();
    vms.iter()
        .enumerate()
        .map(|(n, vm)| {
            let (kind, kernel) = match &vm.source {
                Source::Guest(s) => (Kind::Program { scenario: s.clone() }, GUEST_ELF.to_string()),
                Source::File(f) => (Kind::File, place(f, format!("vm/{n}/kernel"))),
            };
            let modules = vm
                .modules
                .iter()
                .enumerate()
                .map(|(k, m)| ModuleEntry {
                    path: place(m, format!("vm/{n}/module/{k}")),
                    cmdline: m.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
                })
                .collect();
            VmEntry {
                label: vm.label.clone(),
                kind,
                kernel,
                mem: vm.mem,
                cmdline: vm.cmdline.clone(),
                modules,
                frame_quota: vm.frame_quota,
            }
        })
        .collect()
}

/// The boot bundle (a ustar archive, `hvcore::bundle`): the boot options
/// at `options`, the guest program, and for `--vm`s the manifest at `vms`
/// (`hvcore::manifest`) and the files it names.
pub fn bundle<W: Write>(out: W, guest: &Path, options: &str, vms: &[Vm]) -> Result<W, String> {
    let mut tar = tar::Builder::new(out);
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).map_err(|e| format!("bundle {name}: {e}"))
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    add("options", options.as_bytes())?;
    add(GUEST_ELF, &read(guest)?)?;
    if !vms.is_empty() {
        let entries = manifest(vms);
        add("vms", hvcore::manifest::render(&entries).as_bytes())?;
        let mut added = std::collections::HashSet::new();
        for (vm, entry) in vms.iter().zip(&entries) {
            if let Source::File(kernel) = &vm.source {
                if added.insert(entry.kernel.clone()) {
                    add(&entry.kernel, &read(kernel)?)?;
                }
            }
            for (file, m) in vm.modules.iter().zip(&entry.modules) {
                if added.insert(m.path.clone()) {
                    add(&m.path, &read(file)?)?;
                }
            }
        }
    }
    tar.into_inner().map_err(|e| format!("bundle: {e}"))
}

/// The bootloader's own configuration. Its log goes to the serial port
/// only (nobody sees the frame buffer of a headless run, and drawing it
/// costs emulated time); unless `boot_log`, errors only: that keeps its
/// 25-odd lines out of the serial log but not a panic of its own, which
/// it logs as an error (`ERROR: panicked at ...`, see `run::boot_failure`).
pub fn boot_config(boot_log: bool) -> BootConfig {
    let mut c = BootConfig::default();
    c.serial_logging = true;
    c.frame_buffer_logging = false;
    c.log_level = if boot_log { LevelFilter::Trace } else { LevelFilter::Error };
    c
}

/// Builds everything into `target/images/<name>/` and returns the images.
/// `name` keeps images with different boot options apart.
pub fn build(name: &str, options: &str, vms: &[Vm], boot_log: bool) -> Result<Images, String> {
    let (kernel, guest) = build_elfs()?;
    let t = Instant::now();
    let dir = target_dir().join("images").join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ramdisk = dir.join("bundle.tar");
    let file = std::fs::File::create(&ramdisk).map_err(|e| format!("{}: {e}", ramdisk.display()))?;
    bundle(std::io::BufWriter::new(file), &guest, options, vms)?
        .into_inner()
        .map_err(|e| format!("{}: {}", ramdisk.display(), e.error()))?;
    let mut builder = DiskImageBuilder::new(kernel);
    builder.set_ramdisk(ramdisk);
    builder.set_boot_config(&boot_config(boot_log));
    let images = Images { bios: dir.join("bios.img"), uefi: dir.join("uefi.img") };
    builder.create_bios_image(&images.bios).map_err(|e| format!("BIOS image: {e:#}"))?;
    builder.create_uefi_image(&images.uefi).map_err(|e| format!("UEFI image: {e:#}"))?;
    eprintln!("boot: images in {} ({} ms)", dir.display(), t.elapsed().as_millis());
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvcore::bundle::Bundle;

    /// Files with distinct contents in a scratch directory.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str, files: &[(&str, &[u8])]) -> Scratch {
            let d = std::env::temp_dir().join(format!("boot-images-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            for (name, data) in files {
                std::fs::write(d.join(name), data).unwrap();
            }
            Scratch(d)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn vm(source: Source, label: &str) -> Vm {
        Vm { source, label: label.into(), mem: 128 << 20, cmdline: String::new(), modules: vec![], frame_quota: None }
    }

    #[test]
    fn without_vms_the_bundle_is_as_before() {
        let s = Scratch::new("plain", &[("guest.elf", b"\x7fELF guest")]);
        let tar = bundle(Vec::new(), &s.0.join("guest.elf"), "log=debug", &[]).unwrap();
        let b = Bundle::parse(&tar).unwrap();
        let names: Vec<_> = b.entries().map(|e| e.name).collect();
        assert_eq!(names, ["options", "guest/guest.elf"]);
        assert_eq!(b.file("options"), Some(&b"log=debug"[..]));
        assert_eq!(b.file("guest/guest.elf"), Some(&b"\x7fELF guest"[..]));
    }

    #[test]
    fn vms_files_and_manifest_land_at_their_paths() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 511) as u8).collect();
        let s = Scratch::new(
            "vms",
            &[("guest.elf", b"GUEST"), ("apic.flat", &big), ("env", b"NR_CPUS=1\n"), ("two", b"second module"), ("x.flat", b"X")],
        );
        let f = |n: &str| s.0.join(n);
        let mut a = vm(Source::File(f("apic.flat")), "apic.flat");
        a.mem = 64 << 20;
        a.cmdline = "-smp 1 \"x = y\"".into();
        a.modules = vec![f("env"), f("two")];
        a.frame_quota = Some(4096);
        let g = vm(Source::Guest("dedupe".into()), "dedupe");
        let mut x = vm(Source::File(f("x.flat")), "xx");
        x.modules = vec![f("env")];
        let tar = bundle(Vec::new(), &f("guest.elf"), "", &[a, g, x]).unwrap();

        let b = Bundle::parse(&tar).unwrap();
        let names: Vec<_> = b.entries().map(|e| e.name).collect();
        assert_eq!(
            names,
            ["options", "guest/guest.elf", "vms", "vm/0/kernel", "vm/0/module/0", "vm/0/module/1", "vm/2/kernel"],
            "vm 2's module is vm 0's first: carried once"
        );
        assert_eq!(b.file("vm/0/kernel"), Some(&big[..]));
        assert_eq!(b.file("vm/0/module/0"), Some(&b"NR_CPUS=1\n"[..]));
        assert_eq!(b.file("vm/0/module/1"), Some(&b"second module"[..]));
        assert_eq!(b.file("vm/2/kernel"), Some(&b"X"[..]));
        assert_eq!(b.file("vm/2/module/0"), None);
        assert_eq!(b.file("guest/guest.elf"), Some(&b"GUEST"[..]));
        assert_eq!(b.file("options"), Some(&b""[..]));

        let text = std::str::from_utf8(b.file("vms").unwrap()).unwrap();
        let m = hvcore::manifest::parse(text).unwrap();
        let module = |path: &str, cmdline: &str| ModuleEntry { path: path.into(), cmdline: cmdline.into() };
        assert_eq!(
            m,
            [
                VmEntry {
                    label: "apic.flat".into(),
                    kind: Kind::File,
                    kernel: "vm/0/kernel".into(),
                    mem: 64 << 20,
                    cmdline: "-smp 1 \"x = y\"".into(),
                    modules: vec![module("vm/0/module/0", "env"), module("vm/0/module/1", "two")],
                    frame_quota: Some(4096),
                },
                VmEntry {
                    label: "dedupe".into(),
                    kind: Kind::Program { scenario: "dedupe".into() },
                    kernel: "guest/guest.elf".into(),
                    mem: 128 << 20,
                    cmdline: String::new(),
                    modules: vec![],
                    frame_quota: None,
                },
                VmEntry {
                    label: "xx".into(),
                    kind: Kind::File,
                    kernel: "vm/2/kernel".into(),
                    mem: 128 << 20,
                    cmdline: String::new(),
                    modules: vec![module("vm/0/module/0", "env")],
                    frame_quota: None,
                },
            ]
        );
        // Every path the manifest names is a file of the bundle.
        for e in &m {
            assert!(b.file(&e.kernel).is_some(), "{}", e.kernel);
            for md in &e.modules {
                assert!(b.file(&md.path).is_some(), "{}", md.path);
            }
        }
    }

    #[test]
    fn the_largest_bundle_stays_within_the_name_field() {
        // 64 VMs of 16 modules, all different files: the longest path is
        // vm/63/module/15.
        let s = Scratch::new("max", &[("g", b"G")]);
        let file = |name: String| {
            let p = s.0.join(name);
            std::fs::write(&p, b"K").unwrap();
            p
        };
        let vms: Vec<Vm> = (0..hvcore::manifest::MAX_VMS)
            .map(|n| Vm {
                modules: (0..hvcore::manifest::MAX_MODULES).map(|k| file(format!("m{n}-{k}"))).collect(),
                ..vm(Source::File(file(format!("k{n}"))), "k")
            })
            .collect();
        let tar = bundle(Vec::new(), &s.0.join("g"), "", &vms).unwrap();
        let b = Bundle::parse(&tar).unwrap();
        assert_eq!(b.entries().count(), 3 + 64 * 17);
        assert_eq!(b.file("vm/63/module/15"), Some(&b"K"[..]));
        let m = hvcore::manifest::parse(std::str::from_utf8(b.file("vms").unwrap()).unwrap()).unwrap();
        assert_eq!(m.len(), 64);
    }

    #[test]
    fn a_file_gone_since_parsing_is_an_error_naming_it() {
        let s = Scratch::new("gone", &[("g", b"G")]);
        let gone = s.0.join("gone.flat");
        let e = bundle(Vec::new(), &s.0.join("g"), "", &[vm(Source::File(gone.clone()), "x")]).err().unwrap();
        assert!(e.starts_with(&format!("{}: ", gone.display())), "{e}");
    }

    #[test]
    fn the_bootloader_is_quiet_unless_asked() {
        let quiet = boot_config(false);
        assert!(quiet.serial_logging && !quiet.frame_buffer_logging);
        assert_eq!(quiet.log_level, LevelFilter::Error);
        let loud = boot_config(true);
        assert!(loud.serial_logging && !loud.frame_buffer_logging);
        assert_eq!(loud.log_level, LevelFilter::Trace);
    }

    #[test]
    fn a_kernel_for_several_vms_is_carried_once() {
        let s = Scratch::new("shared", &[("guest.elf", b"G"), ("bzImage", b"LINUX"), ("initrd", b"CPIO"), ("other", b"O")]);
        let f = |n: &str| s.0.join(n);
        let linux = |label: &str| Vm { modules: vec![f("initrd")], ..vm(Source::File(f("bzImage")), label) };
        let vms = [linux("a"), linux("b"), vm(Source::File(f("other")), "c"), linux("d")];
        let m = manifest(&vms);
        let kernels: Vec<_> = m.iter().map(|e| e.kernel.as_str()).collect();
        assert_eq!(kernels, ["vm/0/kernel", "vm/0/kernel", "vm/2/kernel", "vm/0/kernel"]);
        assert!(m.iter().filter(|e| e.label != "c").all(|e| e.modules[0].path == "vm/0/module/0"));
        let tar = bundle(Vec::new(), &f("guest.elf"), "", &vms).unwrap();
        let b = Bundle::parse(&tar).unwrap();
        let names: Vec<_> = b.entries().map(|e| e.name).collect();
        assert_eq!(names, ["options", "guest/guest.elf", "vms", "vm/0/kernel", "vm/0/module/0", "vm/2/kernel"]);
        assert_eq!(b.file("vm/0/kernel"), Some(&b"LINUX"[..]));
    }
}

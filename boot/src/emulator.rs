//! Which emulator boots the images, and its command line.
//!
//! Order of preference: QEMU with KVM when the host gives VMX to its
//! guests (nested), else Bochs (VMX and EPT in software), else plain QEMU,
//! where the kernel will report that VMX is missing.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    QemuKvm,
    Bochs,
    QemuTcg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

impl fmt::Display for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Emulator::QemuKvm => "qemu-kvm",
            Emulator::Bochs => "bochs",
            Emulator::QemuTcg => "qemu",
        })
    }
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

pub const QEMU: &str = "qemu-system-x86_64";
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
pub const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
pub const BOCHS_VGABIOS: &str = "/usr/share/vgabios/vgabios.cirrus.bin";
/// The CPU model Bochs emulates: VMX with EPT, VPID, unrestricted guest
/// (see FACTS.md for what it reports).
pub const BOCHS_CPU: &str = "corei7_skylake_x";

const BOCHS_PACKAGES: &str = "apt-get install bochs bochsbios vgabios bochs-term";

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Why this host cannot run QEMU with nested VMX, or `Ok` if it can.
pub fn nested_vmx() -> Result<(), String> {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return Err("/dev/kvm cannot be opened".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx")) {
        return Err("the host CPU shows no vmx flag".into());
    }
    match std::fs::read_to_string("/sys/module/kvm_intel/parameters/nested") {
        Ok(s) if matches!(s.trim(), "Y" | "1") => Ok(()),
        Ok(_) => Err("kvm_intel is loaded with nested=0".into()),
        Err(_) => Err("kvm_intel is not loaded (a different KVM is in use)".into()),
    }
}

/// Everything an emulator needs on this machine, or what is missing and
/// the command that installs it.
pub fn check(emulator: Emulator, firmware: Firmware) -> Result<(), String> {
    let need = |ok: bool, what: &str, install: &str| {
        if ok { Ok(()) } else { Err(format!("{what} not found: install it with `{install}`")) }
    };
    match emulator {
        Emulator::Bochs => {
            if firmware == Firmware::Uefi {
                return Err("Bochs boots the BIOS image only (it has no UEFI firmware here)".into());
            }
            need(on_path("bochs"), "bochs", BOCHS_PACKAGES)?;
            need(on_path("script"), "script (util-linux)", "apt-get install bsdutils")?;
            need(Path::new(BOCHS_BIOS).is_file(), BOCHS_BIOS, BOCHS_PACKAGES)?;
            need(Path::new(BOCHS_VGABIOS).is_file(), BOCHS_VGABIOS, BOCHS_PACKAGES)?;
            need(bochs_term_plugin(), "Bochs' term display plugin", BOCHS_PACKAGES)
        }
        Emulator::QemuKvm | Emulator::QemuTcg => {
            need(on_path(QEMU), QEMU, "apt-get install qemu-system-x86")?;
            if firmware == Firmware::Uefi {
                need(Path::new(OVMF).is_file(), OVMF, "apt-get install ovmf")?;
            }
            if emulator == Emulator::QemuKvm {
                nested_vmx()?;
            }
            Ok(())
        }
    }
}

fn bochs_term_plugin() -> bool {
    ["/usr/lib/x86_64-linux-gnu/bochs/plugins", "/usr/lib/bochs/plugins", "/usr/local/lib/bochs/plugins"]
        .iter()
        .any(|d| Path::new(d).join("libbx_term_gui.so").exists())
}

/// The best emulator for `firmware`, and why it was chosen.
pub fn choose(firmware: Firmware) -> Result<(Emulator, String), String> {
    let kvm = match nested_vmx() {
        Ok(()) => match check(Emulator::QemuKvm, firmware) {
            Ok(()) => return Ok((Emulator::QemuKvm, "the host exposes VMX to guests (nested KVM)".into())),
            Err(e) => e,
        },
        Err(e) => format!("no nested VMX: {e}"),
    };
    let bochs = match check(Emulator::Bochs, firmware) {
        Ok(()) => return Ok((Emulator::Bochs, format!("{kvm}; Bochs emulates VMX and EPT ({BOCHS_CPU})"))),
        Err(e) => e,
    };
    check(Emulator::QemuTcg, firmware)
        .map(|()| (Emulator::QemuTcg, format!("{kvm}; {bochs}; QEMU has no VMX, expect a \"no VMX\" report")))
        .map_err(|qemu| format!("no emulator can run the image: {kvm}; {bochs}; {qemu}"))
}

/// The command line for QEMU (with or without KVM).
pub fn qemu_args(kvm: bool, firmware: Firmware, image: &Path, serial: &Path, mem_mib: u64) -> Vec<String> {
    let mut a: Vec<String> = vec!["-machine".into(), "q35".into()];
    if kvm {
        a.extend(["-enable-kvm", "-cpu", "host"].map(String::from));
    } else {
        a.extend(["-accel", "tcg", "-cpu", "max"].map(String::from));
    }
    a.extend(["-m".into(), format!("{mem_mib}M")]);
    a.extend(["-display", "none", "-no-reboot", "-monitor", "none"].map(String::from));
    a.push("-drive".into());
    a.push(format!("format=raw,file={}", image.display()));
    a.push("-serial".into());
    a.push(format!("file:{}", serial.display()));
    a.extend(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"].map(String::from));
    if firmware == Firmware::Uefi {
        a.extend(["-bios".into(), OVMF.into()]);
    }
    a
}

/// The machine's memory in MiB: 512, or enough for every VM's memory in
/// full plus 256 MiB for the hypervisor, its bundle and the EPT tables,
/// whichever is more (up to [`MAX_MACHINE_MIB`]). Dedupe usually leaves
/// much of it unused, but a VM must not run out because it was not.
pub fn machine_mib(vms: &[crate::args::Vm]) -> u64 {
    let guests: u64 = vms.iter().map(|vm| vm.mem >> 20).sum();
    (guests + 256).clamp(512, MAX_MACHINE_MIB)
}

/// The most the machine is given (Bochs allocates it all up front).
pub const MAX_MACHINE_MIB: u64 = 4096;

/// A bochsrc that runs headless (FACTS.md: the `term` display under a
/// pseudo-terminal; dummy sound; panics reported, not fatal to the display).
pub fn bochsrc(image: &Path, serial: &Path, log: &Path, mem_mib: u64) -> String {
    format!(
        "cpu: model={BOCHS_CPU}, count=1, ips=50000000, reset_on_triple_fault=0\n\
         memory: guest={mem_mib}, host={mem_mib}\n\
         romimage: file={BOCHS_BIOS}\n\
         vgaromimage: file={BOCHS_VGABIOS}\n\
         vga: extension=cirrus\n\
         pci: enabled=1, chipset=i440fx, slot1=cirrus\n\
         ata0-master: type=disk, path={}, mode=flat\n\
         boot: disk\n\
         com1: enabled=1, mode=file, dev={}\n\
         port_e9_hack: enabled=1\n\
         clock: sync=none\n\
         panic: action=fatal, term=report\n\
         log: {}\n\
         display_library: term\n\
         sound: driver=dummy\n",
        image.display(),
        serial.display(),
        log.display()
    )
}

pub fn image_for(images: &crate::images::Images, firmware: Firmware) -> PathBuf {
    match firmware {
        Firmware::Bios => images.bios.clone(),
        Firmware::Uefi => images.uefi.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Source, Vm};

    fn vm(mem_mib: u64) -> Vm {
        Vm { source: Source::File("k".into()), label: "k".into(), mem: mem_mib << 20, cmdline: String::new(), modules: vec![], frame_quota: None }
    }

    #[test]
    fn the_machine_holds_every_vm_in_full() {
        assert_eq!(machine_mib(&[]), 512, "the project's own VMs");
        assert_eq!(machine_mib(&[vm(128), vm(128)]), 512);
        assert_eq!(machine_mib(&[vm(128), vm(128), vm(128)]), 640, "three Linux VMs");
        assert_eq!(machine_mib(&[vm(3 << 10), vm(3 << 10)]), MAX_MACHINE_MIB);
        assert!(bochsrc(Path::new("i"), Path::new("s"), Path::new("l"), 640).contains("memory: guest=640, host=640\n"));
        let q = qemu_args(false, Firmware::Bios, Path::new("i"), Path::new("s"), 640);
        assert!(q.windows(2).any(|w| w == ["-m", "640M"]), "{q:?}");
    }
}

//! Building what boots: the kernel and guest ELFs (bare-metal, by a nested
//! cargo), the boot bundle (a tar that becomes the bootloader's ramdisk),
//! and the BIOS and UEFI disk images.

use bootloader::DiskImageBuilder;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const TARGET: &str = "x86_64-unknown-none";

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

/// The boot bundle: the guest program(s) and the boot options.
fn bundle(guest: &Path, options: &str, out: &Path) -> Result<(), String> {
    let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut tar = tar::Builder::new(file);
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).map_err(|e| format!("bundle {name}: {e}"))
    };
    let elf = std::fs::read(guest).map_err(|e| format!("{}: {e}", guest.display()))?;
    add("guest/guest.elf", &elf)?;
    add("options", options.as_bytes())?;
    tar.into_inner().map_err(|e| format!("bundle: {e}"))?;
    Ok(())
}

/// Builds everything into `target/images/<name>/` and returns the images.
/// `name` keeps images with different boot options apart.
pub fn build(name: &str, options: &str) -> Result<Images, String> {
    let (kernel, guest) = build_elfs()?;
    let t = Instant::now();
    let dir = target_dir().join("images").join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ramdisk = dir.join("bundle.tar");
    bundle(&guest, options, &ramdisk)?;
    let mut builder = DiskImageBuilder::new(kernel);
    builder.set_ramdisk(ramdisk);
    let images = Images { bios: dir.join("bios.img"), uefi: dir.join("uefi.img") };
    builder.create_bios_image(&images.bios).map_err(|e| format!("BIOS image: {e:#}"))?;
    builder.create_uefi_image(&images.uefi).map_err(|e| format!("UEFI image: {e:#}"))?;
    eprintln!("boot: images in {} ({} ms)", dir.display(), t.elapsed().as_millis());
    Ok(images)
}

//! Links the guest as a static, non-PIE executable at 0x20_0000 (see
//! linker.ld): `hvcore::loader::program` loads `ET_EXEC` images only, at their
//! link addresses, without relocating them.
//!
//! rustc links `x86_64-unknown-none` binaries as static PIEs (`-pie`);
//! lld takes the last of `-pie`/`--no-pie`, and these arguments come after
//! rustc's own. Only the guest's binary gets them, not the kernel.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = dir.join("linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        println!("cargo:rustc-link-arg-bins=--no-pie");
        // No .dynamic, .dynsym or .hash: nothing for a loader to do.
        println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
    }
}

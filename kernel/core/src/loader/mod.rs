//! Guest loaders: what puts a guest image into a VM's memory and says
//! how its vCPU starts: `program` for the project's own 64-bit guest
//! program (it builds the guest's GDT, TSS and page tables itself),
//! `multiboot` for unmodified multiboot v1 kernels, `linux` for Linux
//! x86 bzImages (the 32-bit boot protocol: zero page, e820 map, initrd,
//! command line; [`linux::is_bzimage`] tells one from a multiboot ELF).

pub mod linux;
pub mod multiboot;
pub mod program;

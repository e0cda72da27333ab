//! A Linux x86 bzImage loader: puts a kernel, its initrd and its command
//! line into guest memory, builds the zero page (`struct boot_params`)
//! and says how the vCPU starts.
//!
//! The reference is the Linux/x86 boot protocol, Documentation/arch/x86/
//! boot.rst ("boot.rst"), and zero-page.rst for the fields of `struct
//! boot_params` outside the setup header. Kernels are started by boot.rst's
//! "32-bit Boot Protocol": the real-mode setup code in the image is never
//! run; the loader does its work (the zero page, the memory map) itself
//! and enters the protected-mode kernel (`startup_32`) directly.
//!
//! # What is accepted
//!
//! A bzImage (boot.rst "Loading The Rest of The Kernel": protocol >= 2.00
//! and LOADED_HIGH) with the "HdrS" header at 0x202 and the 0xAA55 boot
//! flag at 0x1FE, boot protocol 2.12 (Linux 3.8) or newer, the setup
//! header's end (0x202 + the byte at 0x201) covering at least the 2.12
//! fields (up to 0x268), at most 63 setup sectors (the real-mode code is
//! at most 32 KiB, boot.rst "The Real-Mode Kernel Header") and a
//! protected-mode part at least as long as `syssize` says.
//!
//! # Guest-physical layout
//!
//! | range                                   | what                                              |
//! |-----------------------------------------|---------------------------------------------------|
//! | [`GDT_BASE`] `0x6000..0x6020`           | GDT: null, null, [`BOOT_CS`] code, [`BOOT_DS`] data |
//! | [`ZERO_PAGE`] `0x7000..0x8000`          | the zero page (`struct boot_params`), ESI         |
//! | [`CMDLINE_ADDR`] `0x20000..`            | the command line, NUL-terminated (< [`CMDLINE_MAX`]) |
//! | the load address `..` kernel end        | the protected-mode kernel and the memory it needs |
//! | page-aligned, as high as allowed        | the initrd                                        |
//!
//! Why there: all three low areas lie in conventional memory below the
//! EBDA, none in page 0 (the BIOS data area, which Linux reads). The
//! zero page sits where the sample configuration of boot.rst ("Sample
//! Boot Configuration") would put the real-mode code (X = 0x7000), so
//! that the heap it names (X + 0xE000 = 0x15000) ends below the command
//! line, as boot.rst ("cmd_line_ptr") asks. The decompressor's 5-level
//! paging trampoline goes to the top of low memory (below 0x9F000), far
//! above the command line. Linux copies the zero page and the command
//! line into its own memory before it allocates any memory, and reserves
//! the initrd until it has unpacked it.
//!
//! The protected-mode kernel (the file from `(setup_sects + 1) * 512`
//! on) goes to `pref_address` (aligned up to `kernel_alignment`) if the
//! kernel is relocatable, to 1 MiB if not (boot.rst "Loading The Rest of
//! The Kernel"). The memory it needs is `init_size` bytes from its
//! runtime start (boot.rst "init_size"): the load address for a
//! relocatable kernel, `pref_address` for one that is not. Linux's
//! decompressor never runs below `pref_address` (its `LOAD_PHYSICAL_ADDR`)
//! even when it is relocatable and loaded lower, so a relocatable kernel
//! is never loaded below its `pref_address`: loading it lower would not
//! make it need less memory. Only a relocatable kernel whose
//! `pref_address` is below 1 MiB (none in practice) goes to 1 MiB,
//! aligned up to `kernel_alignment`.
//!
//! The initrd goes as high as allowed: it ends at or below `min(
//! initrd_addr_max + 1, mem_size)`, starts on a page boundary, and never
//! below the end of the kernel's memory (boot.rst "initrd_addr_max",
//! "Special Command Line Options": "an initrd should be placed near end
//! of memory").
//!
//! # The zero page
//!
//! All zero, then (boot.rst "32-bit Boot Protocol") the setup header from
//! the file, bytes `0x1F1..0x202 + byte[0x201]`, at the same offsets
//! (the byte at 0x1EF, the "sentinel", stays zero), then:
//! `vid_mode` = 0xFFFF ("normal", boot.rst "Special Command Line
//! Options"), `type_of_loader` = 0xFF (no assigned id), `loadflags` with
//! CAN_USE_HEAP set and KEEP_SEGMENTS and QUIET_FLAG clear,
//! `heap_end_ptr` = 0xDE00 (boot.rst "Sample Boot Configuration"),
//! `code32_start` = the load address, `ramdisk_image`/`ramdisk_size`,
//! `cmd_line_ptr`, the `ext_*` high halves (zero: everything lies below
//! 3 GiB), `setup_data` = 0 (no list), `alt_mem_k` = KiB above 1 MiB and
//! the e820 map ([`E820_TABLE`], [`E820_ENTRIES`]): the one the
//! multiboot loader gives too ([`super::multiboot::memory_map`]),
//! `[0, 0x9FC00)` RAM, `[0x9FC00, 0xA0000)` and `[0xF0000, 0x100000)`
//! reserved, `[1 MiB, mem_size)` RAM. `screen_info` stays zero (no
//! console: the decompressor then writes no VGA memory), as does
//! `acpi_rsdp_addr` (Linux looks for the RSDP itself).
//!
//! # Initial state (boot.rst "32-bit Boot Protocol")
//!
//! [`Entry`] holds EIP (the load address: the start of the protected-mode
//! kernel, `startup_32`), ESI (the zero page) and the GDT this loader
//! wrote ([`Entry::gdt_base`], [`Entry::gdt_limit`]). The kernel must
//! also set: CR0 = PE (and ET; paging off), EFLAGS = 0x2 (interrupts
//! off), CS = [`BOOT_CS`] (flat 4 GiB 32-bit code, [`CODE_ACCESS_RIGHTS`]),
//! DS = ES = SS (and FS, GS) = [`BOOT_DS`] (flat 4 GiB data,
//! [`DATA_ACCESS_RIGHTS`]), GDTR = the GDT, EBP = EDI = EBX = 0 (and the
//! other registers zero too), A20 on. `startup_32` uses the zero page's
//! `scratch` field (0x1E4) as its first stack and reloads the data
//! segments from the GDT, so both must be real guest memory.
//!
//! # Errors
//!
//! Every malformed image or impossible request is a [`LoadError`], never
//! a panic. Everything is checked before the first write, and `write`
//! is only called with ranges inside `[0, mem_size)`.

use alloc::vec::Vec;
use core::fmt;

use super::multiboot::{memory_map, HIGH_MEMORY_START, MAX_MEM_SIZE, MMAP_ENTRIES};

/// Offsets in the kernel file and in the zero page: the setup header has
/// the same offsets in both (boot.rst "The Real-Mode Kernel Header",
/// zero-page.rst).
pub mod offsets {
    // struct boot_params outside the setup header (zero-page.rst).
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0C0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0C4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0C8;
    pub const ALT_MEM_K: usize = 0x1E0;
    pub const SCRATCH: usize = 0x1E4;
    pub const E820_ENTRIES: usize = 0x1E8;
    pub const SENTINEL: usize = 0x1EF;
    pub const E820_TABLE: usize = 0x2D0;
    // The setup header (boot.rst "The Real-Mode Kernel Header").
    pub const SETUP_SECTS: usize = 0x1F1;
    pub const SYSSIZE: usize = 0x1F4;
    pub const VID_MODE: usize = 0x1FA;
    pub const BOOT_FLAG: usize = 0x1FE;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21C;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const EXT_LOADER_VER: usize = 0x226;
    pub const EXT_LOADER_TYPE: usize = 0x227;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const MIN_ALIGNMENT: usize = 0x235;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const SETUP_DATA: usize = 0x250;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
}
use offsets as off;

/// "HdrS" at 0x202.
pub const HEADER_MAGIC: [u8; 4] = *b"HdrS";
/// The boot flag at 0x1FE.
pub const BOOT_FLAG: u16 = 0xAA55;
/// The oldest protocol accepted: 2.12 (xloadflags and the `ext_*` fields).
pub const MIN_PROTOCOL: u16 = 0x020C;
/// The setup header of protocol 2.12 ends here (after `handover_offset`).
pub const MIN_HEADER_END: usize = 0x268;
/// The setup header can end no later than here: the jump at 0x200 is a
/// short forward jump (boot.rst "The kernel_info": at most 144 bytes).
pub const MAX_HEADER_END: usize = 0x202 + 0x7F;
/// The real-mode code is at most 32 KiB: the boot sector and 63 sectors.
pub const MAX_SETUP_SECTS: u8 = 63;
/// A sector, whatever the medium (boot.rst "The Real-Mode Kernel Header").
pub const SECTOR: usize = 512;

/// `loadflags` bits (boot.rst "loadflags").
pub const LOADED_HIGH: u8 = 1 << 0;
pub const KASLR_FLAG: u8 = 1 << 1;
pub const QUIET_FLAG: u8 = 1 << 5;
pub const KEEP_SEGMENTS: u8 = 1 << 6;
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// `xloadflags` bits (boot.rst "xloadflags").
pub const XLF_KERNEL_64: u16 = 1 << 0;
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;

/// `type_of_loader`: "undefined" (boot.rst "type_of_loader").
pub const LOADER_UNDEFINED: u8 = 0xFF;
/// `vid_mode`: "normal" (boot.rst "Special Command Line Options").
pub const VID_MODE_NORMAL: u16 = 0xFFFF;
/// The end of the setup heap relative to the real-mode code, and
/// `heap_end_ptr` = it minus 0x200 (boot.rst "Sample Boot Configuration").
pub const HEAP_END: u16 = 0xE000;
pub const HEAP_END_PTR: u16 = HEAP_END - 0x200;

/// The GDT's guest-physical address.
pub const GDT_BASE: u64 = 0x6000;
/// GDT entries: null, unused, code, data.
pub const GDT_ENTRIES: usize = 4;
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;
/// __BOOT_CS and __BOOT_DS (boot.rst "32-bit Boot Protocol").
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
/// Flat 4 GiB 32-bit code: present, DPL 0, execute/read, accessed, D, G.
pub const GDT_CODE: u64 = 0x00CF_9B00_0000_FFFF;
/// Flat 4 GiB data: present, DPL 0, read/write, accessed, B, G.
pub const GDT_DATA: u64 = 0x00CF_9300_0000_FFFF;
/// The descriptors' bits 40..56, as the VMCS access-rights fields want
/// them.
pub const CODE_ACCESS_RIGHTS: u32 = 0xC09B;
pub const DATA_ACCESS_RIGHTS: u32 = 0xC093;

/// The zero page's guest-physical address (ESI) and size.
pub const ZERO_PAGE: u64 = 0x7000;
pub const ZERO_PAGE_SIZE: usize = 0x1000;
/// The command line's guest-physical address.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The command line area, the NUL included: the command line is at most
/// this minus one bytes, whatever `cmdline_size` allows.
pub const CMDLINE_MAX: usize = 0x1_0000;
const _: () = assert!(GDT_BASE + (GDT_ENTRIES as u64) * 8 <= ZERO_PAGE);
const _: () = assert!(ZERO_PAGE + ZERO_PAGE_SIZE as u64 + HEAP_END as u64 <= CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= 0x9_F000);

/// The e820 map in the zero page: 20-byte entries (u64 address, u64
/// size, u32 type), at most 128 (zero-page.rst).
pub const E820_TABLE: usize = off::E820_TABLE;
pub const E820_ENTRIES: usize = MMAP_ENTRIES;
pub const E820_ENTRY_SIZE: usize = 20;
pub const E820_MAX_ENTRIES: usize = 128;
const _: () = assert!(E820_ENTRIES <= E820_MAX_ENTRIES);

const PAGE: u64 = 0x1000;

/// What to load.
#[derive(Clone, Copy, Debug)]
pub struct Spec<'a> {
    /// The bzImage file.
    pub kernel: &'a [u8],
    /// The initrd (initramfs) file; `None` or empty for none.
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line (without a NUL).
    pub cmdline: &'a str,
    /// The VM's memory: `[0, mem_size)`.
    pub mem_size: u64,
}

/// How the vCPU starts (boot.rst "32-bit Boot Protocol"; see the module
/// documentation for the rest of the state), and where things went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The load address of the protected-mode kernel (`startup_32`).
    pub eip: u32,
    /// The zero page ([`ZERO_PAGE`]).
    pub esi: u32,
    /// GDTR: the GDT this loader wrote ([`GDT_BASE`], [`GDT_LIMIT`]).
    pub gdt_base: u64,
    pub gdt_limit: u16,
    /// CS ([`BOOT_CS`]) and DS, ES, SS, FS, GS ([`BOOT_DS`]).
    pub code_selector: u16,
    pub data_selector: u16,
    /// `[start, end)` of the kernel: the load address up to the end of
    /// the `init_size` bytes it needs.
    pub kernel: (u64, u64),
    /// `[start, end)` of the initrd, if there is one.
    pub initrd: Option<(u64, u64)>,
    /// The command line's address ([`CMDLINE_ADDR`]).
    pub cmdline: u64,
    /// XLF_KERNEL_64: a 64-bit kernel (its 64-bit entry, unused here, is
    /// at `eip + 0x200`).
    pub kernel_64: bool,
}

/// The setup header fields this loader reads (boot.rst "Details of
/// Header Fields").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `setup_sects` as the file has it (0 means 4).
    pub setup_sects: u8,
    pub syssize: u32,
    pub version: u16,
    pub loadflags: u8,
    pub code32_start: u32,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: bool,
    pub min_alignment: u8,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub pref_address: u64,
    pub init_size: u32,
    /// The setup header ends here: 0x202 + the byte at 0x201.
    pub header_end: usize,
    /// The protected-mode kernel starts at this file offset:
    /// `(setup_sects + 1) * 512`, with setup_sects 0 read as 4.
    pub payload_offset: usize,
}

/// Why an image was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The VM's memory is too small (no memory above 1 MiB) or larger
    /// than [`MAX_MEM_SIZE`].
    BadMemorySize { mem_size: u64 },
    /// The file ends before what its header says it holds (`need`
    /// bytes): the setup header, or the protected-mode kernel of
    /// `syssize` paragraphs.
    TooShort { len: u64, need: u64 },
    /// No "HdrS" at 0x202 or no 0xAA55 at 0x1FE (or a file too short to
    /// hold them): not a Linux kernel.
    NoHeader,
    /// Boot protocol older than [`MIN_PROTOCOL`].
    ProtocolTooOld { version: u16 },
    /// The setup header's end (0x202 + the byte at 0x201) is before the
    /// 2.12 fields end or beyond [`MAX_HEADER_END`].
    BadHeaderLength { end: usize },
    /// `setup_sects` (as in the file) is more than [`MAX_SETUP_SECTS`],
    /// or the file ends inside the setup code (no protected-mode kernel).
    BadSetupSects { setup_sects: u8, len: u64 },
    /// LOADED_HIGH clear: a zImage, loaded at 0x10000.
    NotLoadedHigh { loadflags: u8 },
    /// A relocatable kernel whose `kernel_alignment` is no power of two.
    BadAlignment { kernel_alignment: u32 },
    /// No entry this loader can start: a non-relocatable kernel whose
    /// `code32_start` (its 32-bit entry, and where it must be loaded) is
    /// not 1 MiB, where the protocol puts a bzImage.
    NoUsableEntry { code32_start: u32 },
    /// The kernel loaded at `start` needs memory up to `end` (its
    /// `init_size` from its runtime start), beyond the VM's memory.
    KernelDoesNotFit { start: u64, end: u64, mem_size: u64 },
    /// The initrd of `size` bytes does not fit between the kernel's end
    /// (`lowest`) and `top` = min(initrd_addr_max + 1, mem_size).
    InitrdDoesNotFit { size: u64, lowest: u64, top: u64 },
    /// The command line is `len` bytes, the kernel takes at most `max`
    /// (`cmdline_size`, and at most [`CMDLINE_MAX`] - 1).
    CmdlineTooLong { len: u64, max: u64 },
    /// The command line contains a NUL byte (the kernel would see it cut).
    NulInCmdline,
    /// The `write` callback failed.
    WriteFailed { gpa: u64, len: u64 },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LoadError::BadMemorySize { mem_size } => write!(
                f,
                "linux: VM memory of {mem_size:#x} bytes is not supported (need more than 1 MiB, at most {MAX_MEM_SIZE:#x})"
            ),
            LoadError::TooShort { len, need } => write!(
                f,
                "linux: kernel file is cut off: {len:#x} bytes, its boot header needs {need:#x} \
                 (the setup header, or the protected-mode kernel of syssize paragraphs)"
            ),
            LoadError::NoHeader => f.write_str(
                "linux: not a Linux bzImage (no \"HdrS\" boot header at 0x202 with the 0xAA55 boot flag at 0x1fe)",
            ),
            LoadError::ProtocolTooOld { version } => write!(
                f,
                "linux: boot protocol {}.{:02} is too old, need 2.12 (Linux 3.8) or newer",
                version >> 8,
                version & 0xFF
            ),
            LoadError::BadHeaderLength { end } => write!(
                f,
                "linux: setup header ends at {end:#x} (0x202 + byte at 0x201), \
                 must be {MIN_HEADER_END:#x}..={MAX_HEADER_END:#x}"
            ),
            LoadError::BadSetupSects { setup_sects, len } => write!(
                f,
                "linux: bogus setup_sects {setup_sects} (at most {MAX_SETUP_SECTS}, and the file of {len:#x} \
                 bytes must hold a protected-mode kernel after the setup)"
            ),
            LoadError::NotLoadedHigh { loadflags } => write!(
                f,
                "linux: not a bzImage: loadflags {loadflags:#x} lack LOADED_HIGH (a zImage, loaded at 0x10000, is not supported)"
            ),
            LoadError::BadAlignment { kernel_alignment } => {
                write!(f, "linux: relocatable kernel with kernel_alignment {kernel_alignment:#x}, not a power of two")
            }
            LoadError::NoUsableEntry { code32_start } => write!(
                f,
                "linux: no usable entry: the kernel is not relocatable and its 32-bit entry (code32_start) is \
                 {code32_start:#x}, not 1 MiB"
            ),
            LoadError::KernelDoesNotFit { start, end, mem_size } => write!(
                f,
                "linux: kernel loaded at {start:#x} needs memory up to {end:#x} (init_size), the VM has {mem_size:#x}"
            ),
            LoadError::InitrdDoesNotFit { size, lowest, top } => write!(
                f,
                "linux: initrd of {size:#x} bytes does not fit between the kernel's end {lowest:#x} and {top:#x} \
                 (initrd_addr_max + 1 or the end of memory)"
            ),
            LoadError::CmdlineTooLong { len, max } => {
                write!(f, "linux: command line of {len} bytes is longer than the kernel's cmdline_size ({max})")
            }
            LoadError::NulInCmdline => f.write_str("linux: the command line contains a NUL byte"),
            LoadError::WriteFailed { gpa, len } => {
                write!(f, "linux: writing {len:#x} bytes of guest memory at {gpa:#x} failed")
            }
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Whether the file carries a Linux boot header: the 0xAA55 boot flag at
/// 0x1FE and "HdrS" at 0x202. Cheap; an ELF kernel (multiboot) has
/// neither. [`load`] may still refuse the image (an old protocol, a
/// zImage, ...) and then says why.
pub fn is_bzimage(kernel: &[u8]) -> bool {
    kernel.len() >= off::VERSION
        && u16_at(kernel, off::BOOT_FLAG) == BOOT_FLAG
        && kernel[off::HEADER..off::VERSION] == HEADER_MAGIC
}

/// Reads and checks the setup header (see "What is accepted" in the
/// module documentation).
pub fn header(kernel: &[u8]) -> Result<Header, LoadError> {
    let len = kernel.len();
    if !is_bzimage(kernel) {
        return Err(LoadError::NoHeader);
    }
    if len < off::VERSION + 2 {
        return Err(LoadError::TooShort { len: len as u64, need: off::VERSION as u64 + 2 });
    }
    let version = u16_at(kernel, off::VERSION);
    if version < MIN_PROTOCOL {
        return Err(LoadError::ProtocolTooOld { version });
    }
    // boot.rst "32-bit Boot Protocol": the header ends at 0x202 + the
    // byte at 0x201 (the jump's offset).
    let header_end = off::HEADER + kernel[off::JUMP + 1] as usize;
    if !(MIN_HEADER_END..=MAX_HEADER_END).contains(&header_end) {
        return Err(LoadError::BadHeaderLength { end: header_end });
    }
    if len < header_end {
        return Err(LoadError::TooShort { len: len as u64, need: header_end as u64 });
    }
    // boot.rst "setup_sects": 0 means 4.
    let raw_sects = kernel[off::SETUP_SECTS];
    let setup_sects = if raw_sects == 0 { 4 } else { raw_sects };
    let payload_offset = (setup_sects as usize + 1) * SECTOR;
    if setup_sects > MAX_SETUP_SECTS || payload_offset >= len {
        return Err(LoadError::BadSetupSects { setup_sects: raw_sects, len: len as u64 });
    }
    // boot.rst "syssize": the protected-mode code in 16-byte paragraphs.
    let syssize = u32_at(kernel, off::SYSSIZE);
    let need = payload_offset as u64 + syssize as u64 * 16;
    if (len as u64) < need {
        return Err(LoadError::TooShort { len: len as u64, need });
    }
    Ok(Header {
        setup_sects: raw_sects,
        syssize,
        version,
        loadflags: kernel[off::LOADFLAGS],
        code32_start: u32_at(kernel, off::CODE32_START),
        initrd_addr_max: u32_at(kernel, off::INITRD_ADDR_MAX),
        kernel_alignment: u32_at(kernel, off::KERNEL_ALIGNMENT),
        relocatable: kernel[off::RELOCATABLE_KERNEL] != 0,
        min_alignment: kernel[off::MIN_ALIGNMENT],
        xloadflags: u16_at(kernel, off::XLOADFLAGS),
        cmdline_size: u32_at(kernel, off::CMDLINE_SIZE),
        pref_address: u64_at(kernel, off::PREF_ADDRESS),
        init_size: u32_at(kernel, off::INIT_SIZE),
        header_end,
        payload_offset,
    })
}

/// Where everything goes.
#[derive(Clone, Copy, Debug)]
struct Plan {
    load: u64,
    kernel_end: u64,
    initrd: Option<(u64, u64)>,
}

/// The load address and the end of the memory the kernel needs (see
/// "Guest-physical layout" in the module documentation).
fn place_kernel(h: &Header, payload_len: u64, mem_size: u64) -> Result<(u64, u64), LoadError> {
    let (load, runtime_start) = if h.relocatable {
        let align = h.kernel_alignment as u64;
        if !align.is_power_of_two() {
            return Err(LoadError::BadAlignment { kernel_alignment: h.kernel_alignment });
        }
        // boot.rst "pref_address", "init_size": runtime_start =
        // align_up(load_address, kernel_alignment); loaded at (the
        // aligned) pref_address, the kernel runs where it is.
        let want = h.pref_address.max(HIGH_MEMORY_START);
        let load = want.checked_add(align - 1).map_or(u64::MAX, |a| a & !(align - 1));
        (load, load)
    } else {
        // boot.rst "Loading The Rest of The Kernel": a bzImage at 1 MiB;
        // "pref_address": a non-relocatable kernel moves itself there.
        // The entry is code32_start, which must be where we load it.
        if h.code32_start as u64 != HIGH_MEMORY_START {
            return Err(LoadError::NoUsableEntry { code32_start: h.code32_start });
        }
        (HIGH_MEMORY_START, h.pref_address.max(HIGH_MEMORY_START))
    };
    let end = load.saturating_add(payload_len).max(runtime_start.saturating_add(h.init_size as u64));
    if end > mem_size {
        return Err(LoadError::KernelDoesNotFit { start: load, end, mem_size });
    }
    Ok((load, end))
}

/// The initrd's `[start, end)`: as high as allowed, page-aligned, above
/// the kernel (boot.rst "initrd_addr_max").
fn place_initrd(h: &Header, size: u64, kernel_end: u64, mem_size: u64) -> Result<(u64, u64), LoadError> {
    let top = (h.initrd_addr_max as u64 + 1).min(mem_size);
    match top.checked_sub(size).map(|s| s & !(PAGE - 1)) {
        Some(start) if start >= kernel_end => Ok((start, start + size)),
        _ => Err(LoadError::InitrdDoesNotFit { size, lowest: kernel_end, top }),
    }
}

fn plan(spec: &Spec, h: &Header) -> Result<Plan, LoadError> {
    // boot.rst "Loading The Rest of The Kernel": is_bzImage.
    if h.loadflags & LOADED_HIGH == 0 {
        return Err(LoadError::NotLoadedHigh { loadflags: h.loadflags });
    }
    let payload_len = (spec.kernel.len() - h.payload_offset) as u64;
    let (load, kernel_end) = place_kernel(h, payload_len, spec.mem_size)?;
    // boot.rst "cmdline_size": at most that many bytes, the NUL excluded.
    if spec.cmdline.contains('\0') {
        return Err(LoadError::NulInCmdline);
    }
    let max = (h.cmdline_size as u64).min(CMDLINE_MAX as u64 - 1);
    let len = spec.cmdline.len() as u64;
    if len > max {
        return Err(LoadError::CmdlineTooLong { len, max });
    }
    let initrd = match spec.initrd {
        Some(data) if !data.is_empty() => Some(place_initrd(h, data.len() as u64, kernel_end, spec.mem_size)?),
        _ => None,
    };
    Ok(Plan { load, kernel_end, initrd })
}

/// The e820 map as (address, size, type); the types are e820's (1 RAM,
/// 2 reserved), the same numbers as multiboot's.
pub fn e820_map(mem_size: u64) -> [(u64, u64, u32); E820_ENTRIES] {
    memory_map(mem_size)
}

/// The zero page (see "The zero page" in the module documentation).
fn zero_page(spec: &Spec, h: &Header, p: &Plan) -> Vec<u8> {
    let mut zp = alloc::vec![0u8; ZERO_PAGE_SIZE];
    // boot.rst "32-bit Boot Protocol": the setup header from 0x1F1 on.
    zp[off::SETUP_SECTS..h.header_end].copy_from_slice(&spec.kernel[off::SETUP_SECTS..h.header_end]);
    put_u16(&mut zp, off::VID_MODE, VID_MODE_NORMAL);
    zp[off::TYPE_OF_LOADER] = LOADER_UNDEFINED;
    zp[off::EXT_LOADER_VER] = 0;
    zp[off::EXT_LOADER_TYPE] = 0;
    // boot.rst "loadflags", "heap_end_ptr".
    zp[off::LOADFLAGS] = (h.loadflags & !(KEEP_SEGMENTS | QUIET_FLAG)) | CAN_USE_HEAP;
    put_u16(&mut zp, off::HEAP_END_PTR, HEAP_END_PTR);
    // boot.rst "code32_start": a relocated kernel's load address.
    put_u32(&mut zp, off::CODE32_START, p.load as u32);
    // boot.rst "ramdisk_image", "ramdisk_size"; zero-page.rst ext_*.
    let (image, size) = p.initrd.map_or((0, 0), |(start, end)| (start, end - start));
    put_u32(&mut zp, off::RAMDISK_IMAGE, image as u32);
    put_u32(&mut zp, off::RAMDISK_SIZE, size as u32);
    put_u32(&mut zp, off::EXT_RAMDISK_IMAGE, (image >> 32) as u32);
    put_u32(&mut zp, off::EXT_RAMDISK_SIZE, (size >> 32) as u32);
    // boot.rst "cmd_line_ptr".
    put_u32(&mut zp, off::CMD_LINE_PTR, CMDLINE_ADDR as u32);
    put_u32(&mut zp, off::EXT_CMD_LINE_PTR, (CMDLINE_ADDR >> 32) as u32);
    // boot.rst "setup_data": no list.
    put_u64(&mut zp, off::SETUP_DATA, 0);
    // zero-page.rst: alt_mem_k (KiB above 1 MiB, the pre-e820 fallback)
    // and the e820 map.
    put_u32(&mut zp, off::ALT_MEM_K, ((spec.mem_size - HIGH_MEMORY_START) / 1024) as u32);
    zp[off::E820_ENTRIES] = E820_ENTRIES as u8;
    for (i, (addr, len, ty)) in e820_map(spec.mem_size).into_iter().enumerate() {
        let e = E820_TABLE + i * E820_ENTRY_SIZE;
        put_u64(&mut zp, e, addr);
        put_u64(&mut zp, e + 8, len);
        put_u32(&mut zp, e + 16, ty);
    }
    zp
}

/// The GDT: null, unused, [`BOOT_CS`], [`BOOT_DS`].
pub fn gdt() -> [u8; GDT_ENTRIES * 8] {
    let mut g = [0u8; GDT_ENTRIES * 8];
    put_u64(&mut g, BOOT_CS as usize, GDT_CODE);
    put_u64(&mut g, BOOT_DS as usize, GDT_DATA);
    g
}

/// Stores bytes at a guest-physical address; `Err(())` if it cannot.
pub type GuestWrite<'a> = dyn FnMut(u64, &[u8]) -> Result<(), ()> + 'a;

/// Loads the kernel, the initrd, the command line, the zero page and the
/// GDT; returns the entry state. `write(gpa, bytes)` stores into guest
/// memory, which must be all zero before (what lies beyond the file in
/// the kernel's memory is not written).
pub fn load(spec: &Spec, write: &mut GuestWrite) -> Result<Entry, LoadError> {
    let mem_size = spec.mem_size;
    if mem_size <= HIGH_MEMORY_START || mem_size > MAX_MEM_SIZE {
        return Err(LoadError::BadMemorySize { mem_size });
    }
    let h = header(spec.kernel)?;
    let p = plan(spec, &h)?;
    let zp = zero_page(spec, &h, &p);
    let mut cmdline = Vec::with_capacity(spec.cmdline.len() + 1);
    cmdline.extend_from_slice(spec.cmdline.as_bytes());
    cmdline.push(0);

    // Everything is checked: write.
    let mut put = |gpa: u64, bytes: &[u8]| {
        if bytes.is_empty() {
            return Ok(());
        }
        write(gpa, bytes).map_err(|()| LoadError::WriteFailed { gpa, len: bytes.len() as u64 })
    };
    put(p.load, &spec.kernel[h.payload_offset..])?;
    if let (Some((start, _)), Some(data)) = (p.initrd, spec.initrd) {
        put(start, data)?;
    }
    put(CMDLINE_ADDR, &cmdline)?;
    put(GDT_BASE, &gdt())?;
    put(ZERO_PAGE, &zp)?;
    Ok(Entry {
        eip: p.load as u32,
        esi: ZERO_PAGE as u32,
        gdt_base: GDT_BASE,
        gdt_limit: GDT_LIMIT,
        code_selector: BOOT_CS,
        data_selector: BOOT_DS,
        kernel: (p.load, p.kernel_end),
        initrd: p.initrd,
        cmdline: CMDLINE_ADDR,
        kernel_64: h.xloadflags & XLF_KERNEL_64 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;

    const MIB: u64 = 1 << 20;
    const MEM: u64 = 64 * MIB;
    const PREF: u64 = 16 * MIB;
    const INIT: u32 = 0x80_0000;
    /// The synthetic image's setup: 4 sectors, so the protected-mode
    /// kernel starts at 5 * 512.
    const PM: usize = 5 * 512;
    const PAYLOAD: usize = 0x3005;

    fn set16(k: &mut [u8], at: usize, v: u16) {
        k[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32(k: &mut [u8], at: usize, v: u32) {
        k[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set64(k: &mut [u8], at: usize, v: u64) {
        k[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A synthetic bzImage of protocol 2.15: a patterned boot sector and
    /// setup (the header fields the loader reads set as a 64-bit
    /// relocatable kernel has them, the others recognisable), then
    /// [`PAYLOAD`] bytes of protected-mode kernel. Offsets are literal,
    /// from boot.rst, not the module's constants.
    fn image() -> Vec<u8> {
        let mut k: Vec<u8> = (0..PM).map(|i| (i * 13 + 7) as u8 | 1).collect();
        k.extend((0..PAYLOAD).map(|i| (i * 31 + 3) as u8 ^ 0xA5));
        k[0x1f1..0x26c].fill(0);
        k[0x1ef] = 0xff; // the sentinel, as real images have it
        k[0x1f1] = 4; // setup_sects
        set16(&mut k, 0x1f2, 1); // root_flags
        set32(&mut k, 0x1f4, PAYLOAD.div_ceil(16) as u32 - 1); // syssize
        set16(&mut k, 0x1fa, 0xfffd); // vid_mode "ask"
        set16(&mut k, 0x1fc, 0x0801); // root_dev
        set16(&mut k, 0x1fe, 0xaa55);
        k[0x200] = 0xeb;
        k[0x201] = 0x6a; // header end 0x26c, as Linux 6.1
        k[0x202..0x206].copy_from_slice(b"HdrS");
        set16(&mut k, 0x206, 0x020f);
        set16(&mut k, 0x20e, 0x1234); // kernel_version
        k[0x211] = 0x01; // LOADED_HIGH
        set32(&mut k, 0x214, 0x10_0000);
        set32(&mut k, 0x22c, 0x7fff_ffff);
        set32(&mut k, 0x230, 0x20_0000);
        k[0x234] = 1;
        k[0x235] = 21;
        set16(&mut k, 0x236, 0x3); // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
        set32(&mut k, 0x238, 0x7ff);
        set32(&mut k, 0x248, 0x3b0); // payload_offset
        set32(&mut k, 0x24c, 0x1000); // payload_length
        set64(&mut k, 0x258, PREF);
        set32(&mut k, 0x260, INIT);
        set32(&mut k, 0x264, 0x190); // handover_offset
        set32(&mut k, 0x268, 0x1a0); // kernel_info_offset
        k
    }

    fn patched(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut k = image();
        f(&mut k);
        k
    }

    /// Guest memory as the list of writes (sparse, so any memory size
    /// works); unwritten bytes read zero.
    struct Mem {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl Mem {
        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            let end = addr + len as u64;
            for (gpa, data) in &self.writes {
                let (s, e) = ((*gpa).max(addr), (gpa + data.len() as u64).min(end));
                if s < e {
                    out[(s - addr) as usize..(e - addr) as usize]
                        .copy_from_slice(&data[(s - gpa) as usize..(e - gpa) as usize]);
                }
            }
            out
        }
        fn u8(&self, a: u64) -> u8 {
            self.read(a, 1)[0]
        }
        fn u16(&self, a: u64) -> u16 {
            u16_at(&self.read(a, 2), 0)
        }
        fn u32(&self, a: u64) -> u32 {
            u32_at(&self.read(a, 4), 0)
        }
        fn u64(&self, a: u64) -> u64 {
            u64_at(&self.read(a, 8), 0)
        }
        fn cstr(&self, a: u64) -> String {
            let bytes = self.read(a, CMDLINE_MAX + 1);
            let end = bytes.iter().position(|&b| b == 0).expect("string is NUL-terminated");
            String::from_utf8(bytes[..end].to_vec()).unwrap()
        }
        fn spans(&self) -> Vec<(u64, usize)> {
            self.writes.iter().map(|(gpa, d)| (*gpa, d.len())).collect()
        }
    }

    fn spec<'a>(kernel: &'a [u8], initrd: Option<&'a [u8]>, cmdline: &'a str, mem_size: u64) -> Spec<'a> {
        Spec { kernel, initrd, cmdline, mem_size }
    }

    /// Loads; a write outside `[0, mem_size)` fails. After a successful
    /// load, checks what every load must satisfy: no empty writes, none
    /// in page 0, none outside memory, none overlapping another.
    fn run(s: &Spec) -> (Result<Entry, LoadError>, Mem) {
        let mut mem = Mem { writes: Vec::new() };
        let mem_size = s.mem_size;
        let r = load(s, &mut |gpa, data| {
            if gpa + data.len() as u64 > mem_size {
                return Err(());
            }
            mem.writes.push((gpa, data.to_vec()));
            Ok(())
        });
        if r.is_ok() {
            let spans = mem.spans();
            for (i, &(a, alen)) in spans.iter().enumerate() {
                assert!(alen > 0 && a >= 0x1000 && a + alen as u64 <= mem_size, "{a:#x}+{alen:#x}");
                for &(b, blen) in &spans[i + 1..] {
                    assert!(a + alen as u64 <= b || b + blen as u64 <= a, "{a:#x}+{alen:#x} overlaps {b:#x}+{blen:#x}");
                }
            }
        }
        (r, mem)
    }

    fn refuse_spec(s: &Spec) -> LoadError {
        let (r, mem) = run(s);
        assert!(mem.writes.is_empty(), "a refused load wrote guest memory: {:?}", mem.spans());
        r.unwrap_err()
    }

    fn refuse(kernel: &[u8]) -> LoadError {
        refuse_spec(&spec(kernel, None, "", MEM))
    }

    fn ok(kernel: &[u8]) -> Entry {
        let (r, _) = run(&spec(kernel, None, "", MEM));
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn is_bzimage_tells_a_bzimage_from_an_elf() {
        let k = image();
        assert!(is_bzimage(&k));
        // Just long enough for the magic.
        assert!(is_bzimage(&k[..0x206]));
        assert!(!is_bzimage(&k[..0x205]));
        assert!(!is_bzimage(&[]));
        // An old protocol still has the header: load says why it refuses.
        let old = patched(|k| set16(k, 0x206, 0x0204));
        assert!(is_bzimage(&old));
        assert_eq!(refuse(&old), LoadError::ProtocolTooOld { version: 0x0204 });
        // No magic, no boot flag.
        assert!(!is_bzimage(&patched(|k| k[0x205] = b'T')));
        assert!(!is_bzimage(&patched(|k| k[0x1fe] = 0x56)));
        // An ELF file (a multiboot kernel): neither.
        let mut elf = vec![0u8; 0x2000];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4..7].copy_from_slice(&[1, 1, 1]);
        assert!(!is_bzimage(&elf));
        assert_eq!(refuse(&elf), LoadError::NoHeader);
    }

    #[test]
    fn header_fields_are_read() {
        let h = header(&image()).unwrap();
        assert_eq!(
            h,
            Header {
                setup_sects: 4,
                syssize: 0x300,
                version: 0x020f,
                loadflags: 1,
                code32_start: 0x10_0000,
                initrd_addr_max: 0x7fff_ffff,
                kernel_alignment: 0x20_0000,
                relocatable: true,
                min_alignment: 21,
                xloadflags: 3,
                cmdline_size: 0x7ff,
                pref_address: PREF,
                init_size: INIT,
                header_end: 0x26c,
                payload_offset: 0xa00,
            }
        );
        // setup_sects 0 means 4 (boot.rst "setup_sects").
        let h = header(&patched(|k| k[0x1f1] = 0)).unwrap();
        assert_eq!((h.setup_sects, h.payload_offset), (0, 0xa00));
        let h = header(&patched(|k| k[0x1f1] = 1)).unwrap();
        assert_eq!(h.payload_offset, 0x400);
    }

    #[test]
    fn not_a_bzimage_is_refused() {
        assert_eq!(refuse(&[0u8; 100]), LoadError::NoHeader);
        assert_eq!(refuse(&patched(|k| k[0x202] = b'h')), LoadError::NoHeader);
        assert_eq!(refuse(&patched(|k| set16(k, 0x1fe, 0x55aa))), LoadError::NoHeader);
        // The magic but no version; the version but not the header.
        let k = image();
        assert_eq!(refuse(&k[..0x207]), LoadError::TooShort { len: 0x207, need: 0x208 });
        assert_eq!(refuse(&k[..0x26b]), LoadError::TooShort { len: 0x26b, need: 0x26c });
        // The protected-mode kernel is shorter than syssize says.
        let k = patched(|k| set32(k, 0x1f4, PAYLOAD.div_ceil(16) as u32));
        let need = (PM + PAYLOAD.div_ceil(16) * 16) as u64;
        assert_eq!(refuse(&k), LoadError::TooShort { len: (PM + PAYLOAD) as u64, need });
        // Exactly syssize paragraphs is fine.
        let k = patched(|k| k.truncate(PM + 0x3000));
        assert_eq!(ok(&k).eip as u64, PREF);
    }

    #[test]
    fn bogus_setup_sects_are_refused() {
        // More than 32 KiB of real-mode code.
        let k = patched(|k| {
            k[0x1f1] = 64;
            k.resize(0x20000, 0);
            set32(k, 0x1f4, 0);
        });
        assert_eq!(refuse(&k), LoadError::BadSetupSects { setup_sects: 64, len: 0x20000 });
        let len = (PM + PAYLOAD) as u64;
        assert_eq!(refuse(&patched(|k| k[0x1f1] = 0xff)), LoadError::BadSetupSects { setup_sects: 255, len });
        // 63 sectors: the file must hold more than the setup.
        let sects63 = |len: usize| {
            patched(|k| {
                k[0x1f1] = 63;
                k.resize(len, 0x90);
                set32(k, 0x1f4, 0);
            })
        };
        assert_eq!(refuse(&sects63(64 * 512)), LoadError::BadSetupSects { setup_sects: 63, len: 64 * 512 });
        let k = sects63(64 * 512 + 1);
        let (r, mem) = run(&spec(&k, None, "", MEM));
        assert_eq!(r.unwrap().eip as u64, PREF);
        assert_eq!(mem.read(PREF, 2), [0x90, 0]);
        // setup_sects 0 is 4: a file of 5 sectors holds no kernel.
        let k = patched(|k| {
            k[0x1f1] = 0;
            k.truncate(PM);
            set32(k, 0x1f4, 0);
        });
        assert_eq!(refuse(&k), LoadError::BadSetupSects { setup_sects: 0, len: PM as u64 });
    }

    #[test]
    fn header_length_must_cover_protocol_2_12() {
        for (jump, good) in [(0x65u8, false), (0x66, true), (0x7f, true), (0x80, false), (0xff, false), (0, false)] {
            let k = patched(|k| k[0x201] = jump);
            let end = 0x202 + jump as usize;
            if good {
                let (r, mem) = run(&spec(&k, None, "", MEM));
                assert!(r.is_ok(), "{jump:#x}: {r:?}");
                // The header is copied up to its end, not further.
                let zp = mem.read(ZERO_PAGE, 0x1000);
                assert_eq!(zp[end - 1], k[end - 1], "{jump:#x}");
                assert_eq!(zp[end], 0, "{jump:#x}");
            } else {
                assert_eq!(refuse(&k), LoadError::BadHeaderLength { end }, "{jump:#x}");
            }
        }
    }

    #[test]
    fn protocol_older_than_2_12_is_refused() {
        for version in [0x0000, 0x0200, 0x020a, 0x020b] {
            assert_eq!(refuse(&patched(|k| set16(k, 0x206, version))), LoadError::ProtocolTooOld { version });
        }
        for version in [0x020c, 0x020f, 0x0300] {
            let k = patched(|k| set16(k, 0x206, version));
            assert!(run(&spec(&k, None, "", MEM)).0.is_ok(), "{version:#x}");
        }
    }

    #[test]
    fn a_zimage_is_refused() {
        for loadflags in [0x00, 0x80, 0xfe] {
            assert_eq!(refuse(&patched(|k| k[0x211] = loadflags)), LoadError::NotLoadedHigh { loadflags });
        }
    }

    #[test]
    fn memory_size_bounds() {
        let k = image();
        for mem_size in [0, MIB, (3 << 30) + 1, 4 << 30, u64::MAX] {
            assert_eq!(refuse_spec(&spec(&k, None, "", mem_size)), LoadError::BadMemorySize { mem_size });
        }
        // The memory size is checked first, even for a file that is none.
        assert_eq!(refuse_spec(&spec(&[], None, "", 0)), LoadError::BadMemorySize { mem_size: 0 });
    }

    #[test]
    fn relocatable_kernel_goes_to_pref_address() {
        let k = image();
        let (r, mem) = run(&spec(&k, None, "", MEM));
        let e = r.unwrap();
        assert_eq!((e.eip as u64, e.kernel), (PREF, (PREF, PREF + INIT as u64)));
        assert!(e.kernel_64);
        // code32_start says where it went (boot.rst "code32_start").
        assert_eq!(mem.u32(ZERO_PAGE + 0x214) as u64, PREF);
        // An unaligned pref_address is aligned up to kernel_alignment.
        let e = ok(&patched(|k| set64(k, 0x258, PREF + 0x1000)));
        assert_eq!(e.eip as u64, PREF + 2 * MIB);
        assert_eq!(e.kernel.1, PREF + 2 * MIB + INIT as u64);
        // A smaller alignment is honoured too.
        let e = ok(&patched(|k| {
            set64(k, 0x258, PREF + 0x1000);
            set32(k, 0x230, 0x1000);
        }));
        assert_eq!(e.eip as u64, PREF + 0x1000);
        // No (or a low) pref_address: 1 MiB, aligned up.
        assert_eq!(ok(&patched(|k| set64(k, 0x258, 0))).eip as u64, 2 * MIB);
        assert_eq!(ok(&patched(|k| set64(k, 0x258, 0x8_0000))).eip as u64, 2 * MIB);
        let e = ok(&patched(|k| {
            set64(k, 0x258, 0);
            set32(k, 0x230, 0x1000);
        }));
        assert_eq!(e.kernel, (MIB, MIB + INIT as u64));
        // init_size smaller than the file (never so in Linux): the file
        // counts.
        let e = ok(&patched(|k| set32(k, 0x260, 0x100)));
        assert_eq!(e.kernel, (PREF, PREF + PAYLOAD as u64));
    }

    #[test]
    fn relocatable_kernel_needs_a_power_of_two_alignment() {
        for kernel_alignment in [0, 3, 0x30_0000, 0xffff_ffff] {
            let k = patched(|k| set32(k, 0x230, kernel_alignment));
            assert_eq!(refuse(&k), LoadError::BadAlignment { kernel_alignment });
        }
        // A huge alignment just does not fit.
        let k = patched(|k| set32(k, 0x230, 0x8000_0000));
        assert_eq!(refuse(&k), LoadError::KernelDoesNotFit { start: 0x8000_0000, end: 0x8080_0000, mem_size: MEM });
        // A non-relocatable kernel's alignment does not matter.
        let k = patched(|k| {
            k[0x234] = 0;
            set32(k, 0x230, 0);
        });
        assert_eq!(ok(&k).eip, 0x10_0000);
    }

    #[test]
    fn non_relocatable_kernel_goes_to_1_mib_and_runs_at_pref_address() {
        let k = patched(|k| k[0x234] = 0);
        let (r, mem) = run(&spec(&k, None, "", MEM));
        let e = r.unwrap();
        assert_eq!(e.eip, 0x10_0000);
        // It moves itself to pref_address and needs init_size there.
        assert_eq!(e.kernel, (MIB, PREF + INIT as u64));
        assert_eq!(&mem.read(MIB, PAYLOAD)[..], &k[PM..]);
        assert_eq!(mem.u32(ZERO_PAGE + 0x214), 0x10_0000);
        // pref_address 0 or below 1 MiB: it runs where it is loaded.
        let k = patched(|k| {
            k[0x234] = 0;
            set64(k, 0x258, 0);
        });
        assert_eq!(ok(&k).kernel, (MIB, MIB + INIT as u64));
        // Fits exactly, or not by one byte.
        let k = patched(|k| k[0x234] = 0);
        assert!(run(&spec(&k, None, "", PREF + INIT as u64)).0.is_ok());
        assert_eq!(
            refuse_spec(&spec(&k, None, "", PREF + INIT as u64 - 1)),
            LoadError::KernelDoesNotFit { start: MIB, end: PREF + INIT as u64, mem_size: PREF + INIT as u64 - 1 }
        );
    }

    #[test]
    fn non_relocatable_kernel_must_enter_at_1_mib() {
        for code32_start in [0, 0x20_0000, 0x10_0200, PREF as u32] {
            let k = patched(|k| {
                k[0x234] = 0;
                set32(k, 0x214, code32_start);
            });
            assert_eq!(refuse(&k), LoadError::NoUsableEntry { code32_start });
        }
        // A relocatable kernel's code32_start is ours to set.
        let e = ok(&patched(|k| set32(k, 0x214, 0x20_0000)));
        assert_eq!(e.eip as u64, PREF);
    }

    #[test]
    fn a_32_bit_kernel_loads_the_same_way() {
        let e = ok(&patched(|k| set16(k, 0x236, 0)));
        assert_eq!((e.eip as u64, e.kernel_64), (PREF, false));
    }

    #[test]
    fn kernel_must_fit_in_memory() {
        let k = image();
        let end = PREF + INIT as u64;
        let (r, mem) = run(&spec(&k, None, "", end));
        assert_eq!(r.unwrap().kernel, (PREF, end));
        assert_eq!(&mem.read(PREF, PAYLOAD)[..], &k[PM..]);
        assert_eq!(
            refuse_spec(&spec(&k, None, "", end - 1)),
            LoadError::KernelDoesNotFit { start: PREF, end, mem_size: end - 1 }
        );
        // Not moved lower when pref_address does not fit: the kernel
        // would not run lower anyway (see the module documentation).
        let k = patched(|k| set64(k, 0x258, 60 * MIB));
        assert_eq!(
            refuse(&k),
            LoadError::KernelDoesNotFit { start: 60 * MIB, end: 60 * MIB + INIT as u64, mem_size: MEM }
        );
        // pref_address near 2^64 does not overflow.
        let k = patched(|k| set64(k, 0x258, u64::MAX - 0x1000));
        assert!(matches!(refuse(&k), LoadError::KernelDoesNotFit { end: u64::MAX, .. }));
        // A huge init_size.
        let k = patched(|k| set32(k, 0x260, u32::MAX));
        assert_eq!(refuse(&k), LoadError::KernelDoesNotFit { start: PREF, end: PREF + u32::MAX as u64, mem_size: MEM });
    }

    #[test]
    fn kernel_bytes_land_at_the_load_address_and_nothing_else_of_the_file() {
        let k = image();
        let initrd = [0x11u8; 0x1800];
        let (r, mem) = run(&spec(&k, Some(&initrd), "console=ttyS0", MEM));
        let e = r.unwrap();
        assert_eq!(&mem.read(PREF, PAYLOAD)[..], &k[PM..]);
        assert_eq!(mem.read(PREF - 1, 1), [0]);
        assert_eq!(mem.read(PREF + PAYLOAD as u64, 1), [0]);
        // Exactly five writes: kernel, initrd, command line, GDT, zero page.
        let initrd_at = e.initrd.unwrap().0;
        assert_eq!(mem.spans(), [(PREF, PAYLOAD), (initrd_at, 0x1800), (0x2_0000, 14), (0x6000, 32), (0x7000, 0x1000)]);
    }

    /// The zero page, built here from boot.rst and zero-page.rst offsets.
    #[test]
    fn zero_page_bytes_at_their_offsets() {
        let k = patched(|k| k[0x211] = 0x01 | 0x40); // KEEP_SEGMENTS set in the image
        let initrd: Vec<u8> = (0..0x2345u32).map(|i| i as u8).collect();
        let cmdline = "console=ttyS0 earlyprintk=serial root=/dev/vda";
        let (r, mem) = run(&spec(&k, Some(&initrd), cmdline, MEM));
        let e = r.unwrap();
        assert_eq!(e.esi, 0x7000);
        let zp = mem.read(0x7000, 0x1000);
        let initrd_at = MEM - 0x3000;
        assert_eq!(e.initrd, Some((initrd_at, initrd_at + 0x2345)));

        let mut want = vec![0u8; 0x1000];
        want[0x1f1..0x26c].copy_from_slice(&k[0x1f1..0x26c]);
        set16(&mut want, 0x1fa, 0xffff); // vid_mode "normal"
        want[0x210] = 0xff; // type_of_loader
        want[0x211] = 0x81; // LOADED_HIGH | CAN_USE_HEAP, KEEP_SEGMENTS clear
        set32(&mut want, 0x214, PREF as u32); // code32_start
        set32(&mut want, 0x218, initrd_at as u32); // ramdisk_image
        set32(&mut want, 0x21c, 0x2345); // ramdisk_size
        set16(&mut want, 0x224, 0xde00); // heap_end_ptr
        set32(&mut want, 0x228, 0x2_0000); // cmd_line_ptr
        set32(&mut want, 0x1e0, (63 * 1024) as u32); // alt_mem_k
        want[0x1e8] = 4; // e820_entries
        for (i, (addr, size, ty)) in
            [(0u64, 0x9_fc00u64, 1u32), (0x9_fc00, 0x400, 2), (0xf_0000, 0x1_0000, 2), (MIB, MEM - MIB, 1)]
                .into_iter()
                .enumerate()
        {
            let at = 0x2d0 + 20 * i;
            set64(&mut want, at, addr);
            set64(&mut want, at + 8, size);
            set32(&mut want, at + 16, ty);
        }
        for (i, (a, b)) in zp.iter().zip(&want).enumerate() {
            assert_eq!(a, b, "zero page byte {i:#x}");
        }

        // The same, field by field, for what matters most.
        assert_eq!(mem.u8(0x7000 + 0x1ef), 0, "sentinel");
        assert_eq!(mem.u8(0x7000 + 0x1f1), 4, "setup_sects");
        assert_eq!(mem.read(0x7000 + 0x202, 4), b"HdrS");
        assert_eq!(mem.u16(0x7000 + 0x206), 0x020f);
        assert_eq!(mem.u64(0x7000 + 0x258), PREF, "pref_address");
        assert_eq!(mem.u32(0x7000 + 0x260), INIT, "init_size");
        assert_eq!(mem.u32(0x7000 + 0x22c), 0x7fff_ffff, "initrd_addr_max");
        assert_eq!(mem.u64(0x7000 + 0x070), 0, "acpi_rsdp_addr");
        assert_eq!(mem.read(0x7000, 0x40), [0; 0x40], "screen_info");
        assert_eq!(mem.read(0x7000 + 0xc0, 12), [0; 12], "ext_ramdisk_image/size, ext_cmd_line_ptr");
        assert_eq!(mem.u64(0x7000 + 0x250), 0, "setup_data");
        assert_eq!(mem.cstr(mem.u32(0x7000 + 0x228) as u64), cmdline);
        assert_eq!(mem.read(initrd_at, initrd.len()), initrd);
        // The boot sector's bytes before the header and the setup code
        // after it are not copied (the image has no zero there).
        assert!(k[0x1e0..0x1f1].iter().chain(&k[0x26c..0x2d0]).all(|&b| b != 0));
        assert!(zp[0x26c..0x2d0].iter().all(|&b| b == 0));
        assert!(zp[0x2d0 + 80..].iter().all(|&b| b == 0));
    }

    #[test]
    fn loadflags_written() {
        // KASLR_FLAG (kernel internal) as the image has it; QUIET_FLAG and
        // KEEP_SEGMENTS cleared; CAN_USE_HEAP set.
        for (image_flags, want) in [(0x01u8, 0x81u8), (0x63, 0x83), (0xff, 0x9f), (0x81, 0x81)] {
            let k = patched(|k| k[0x211] = image_flags);
            let (r, mem) = run(&spec(&k, None, "", MEM));
            assert!(r.is_ok());
            assert_eq!(mem.u8(ZERO_PAGE + 0x211), want, "{image_flags:#x}");
        }
    }

    #[test]
    fn e820_map_for_the_largest_vm() {
        let k = image();
        let (r, mem) = run(&spec(&k, None, "", 3 << 30));
        r.unwrap();
        assert_eq!(mem.u8(0x7000 + 0x1e8), 4);
        let last = 0x7000 + 0x2d0 + 3 * 20;
        assert_eq!((mem.u64(last), mem.u64(last + 8), mem.u32(last + 16)), (MIB, (3 << 30) - MIB, 1));
        assert_eq!(mem.u32(0x7000 + 0x1e0), (3 << 20) - 1024);
        assert_eq!(e820_map(3 << 30)[3], (MIB, (3 << 30) - MIB, 1));
    }

    #[test]
    fn gdt_bytes() {
        let k = image();
        let (r, mem) = run(&spec(&k, None, "", MEM));
        let e = r.unwrap();
        assert_eq!((e.gdt_base, e.gdt_limit, e.code_selector, e.data_selector), (0x6000, 0x1f, 0x10, 0x18));
        let g = mem.read(0x6000, 32);
        assert_eq!(&g[..16], &[0; 16]);
        assert_eq!(&g[16..24], &[0xff, 0xff, 0, 0, 0, 0x9b, 0xcf, 0]);
        assert_eq!(&g[24..32], &[0xff, 0xff, 0, 0, 0, 0x93, 0xcf, 0]);
        assert_eq!(mem.read(0x6000 + 32, 0x1000 - 32), vec![0; 0x1000 - 32]);
        // Both flat 4 GiB (base 0, limit 0xFFFFF pages), present, DPL 0,
        // 32-bit; the access rights are the descriptors' bits 40..56.
        for (d, ty) in [(GDT_CODE, 0xb), (GDT_DATA, 0x3)] {
            let base = ((d >> 16) & 0xff_ffff) | ((d >> 56) << 24);
            let limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
            assert_eq!((base, limit), (0, 0xf_ffff));
            assert_eq!((d >> 40) & 0xf, ty);
            assert_eq!((d >> 44) & 0xf, 0x9, "S, DPL 0, P");
            assert_eq!((d >> 52) & 0xf, 0xc, "D/B, G, not L");
        }
        assert_eq!(CODE_ACCESS_RIGHTS as u64, (GDT_CODE >> 40) & 0xf0ff);
        assert_eq!(DATA_ACCESS_RIGHTS as u64, (GDT_DATA >> 40) & 0xf0ff);
        assert_eq!(&gdt()[..], &g[..]);
    }

    #[test]
    fn initrd_goes_as_high_as_allowed() {
        let k = image();
        let at = |k: &[u8], initrd: &[u8], mem_size: u64| {
            let (r, mem) = run(&spec(k, Some(initrd), "", mem_size));
            let e = r.unwrap();
            let (start, end) = e.initrd.unwrap();
            assert_eq!(end - start, initrd.len() as u64);
            assert_eq!((mem.u32(ZERO_PAGE + 0x218) as u64, mem.u32(ZERO_PAGE + 0x21c) as u64), (start, end - start));
            assert_eq!(mem.read(start, initrd.len()), initrd);
            start
        };
        // Page-aligned, ending in the last page of memory.
        assert_eq!(at(&k, &[1; 0x1800], MEM), MEM - 0x2000);
        assert_eq!(at(&k, &[1; 0x1000], MEM), MEM - 0x1000);
        assert_eq!(at(&k, &[1; 1], MEM), MEM - 0x1000);
        // Below initrd_addr_max: its last byte at most that address.
        let k48 = patched(|k| set32(k, 0x22c, 0x2ff_ffff));
        assert_eq!(at(&k48, &[1; 0x1800], MEM), 48 * MIB - 0x2000);
        let kodd = patched(|k| set32(k, 0x22c, 0x2ff_f7ff));
        let start = at(&kodd, &[1; 0x1000], MEM);
        assert_eq!(start, 0x2ffe000);
        assert!(start + 0x1000 - 1 <= 0x2ff_f7ff);
        // Memory ends below initrd_addr_max (the usual case) or above.
        assert_eq!(at(&k48, &[1; 0x1000], 40 * MIB), 40 * MIB - 0x1000);
        // Right after the kernel's memory: fits exactly, or not.
        let kend = PREF + INIT as u64;
        assert_eq!(at(&k, &[1; 0x2000], kend + 0x2000), kend);
        let big = vec![1u8; 0x2001];
        assert_eq!(
            refuse_spec(&spec(&k, Some(&big), "", kend + 0x2000)),
            LoadError::InitrdDoesNotFit { size: 0x2001, lowest: kend, top: kend + 0x2000 }
        );
        // Larger than memory; initrd_addr_max below the kernel.
        let huge = vec![1u8; MEM as usize + 1];
        assert_eq!(
            refuse_spec(&spec(&k, Some(&huge), "", MEM)),
            LoadError::InitrdDoesNotFit { size: MEM + 1, lowest: kend, top: MEM }
        );
        let klow = patched(|k| set32(k, 0x22c, 0xff_ffff));
        assert_eq!(
            refuse_spec(&spec(&klow, Some(&[1; 16]), "", MEM)),
            LoadError::InitrdDoesNotFit { size: 16, lowest: kend, top: 16 * MIB }
        );
        // initrd_addr_max 0xFFFFFFFF does not overflow.
        let kmax = patched(|k| set32(k, 0x22c, u32::MAX));
        assert_eq!(at(&kmax, &[1; 0x1000], MEM), MEM - 0x1000);
    }

    #[test]
    fn no_or_empty_initrd() {
        let k = image();
        for initrd in [None, Some(&[][..])] {
            let (r, mem) = run(&spec(&k, initrd, "", MEM));
            assert_eq!(r.unwrap().initrd, None);
            assert_eq!((mem.u32(ZERO_PAGE + 0x218), mem.u32(ZERO_PAGE + 0x21c)), (0, 0));
            assert_eq!(mem.writes.len(), 4);
        }
    }

    #[test]
    fn command_line() {
        let k = image();
        // Empty: a lone NUL, and cmd_line_ptr still set (boot.rst
        // "cmd_line_ptr": zero would mean a pre-2.02 loader).
        let (r, mem) = run(&spec(&k, None, "", MEM));
        assert_eq!(r.unwrap().cmdline, 0x2_0000);
        assert_eq!(mem.u32(ZERO_PAGE + 0x228), 0x2_0000);
        assert_eq!(mem.spans()[1], (0x2_0000, 1));
        assert_eq!(mem.cstr(0x2_0000), "");
        // cmdline_size characters, without the NUL, and not one more.
        let max = "x".repeat(0x7ff);
        let (r, mem) = run(&spec(&k, None, &max, MEM));
        assert!(r.is_ok());
        assert_eq!(mem.cstr(0x2_0000), max);
        let long = "x".repeat(0x800);
        assert_eq!(refuse_spec(&spec(&k, None, &long, MEM)), LoadError::CmdlineTooLong { len: 0x800, max: 0x7ff });
        // Whatever cmdline_size says, the area is CMDLINE_MAX bytes.
        let k = patched(|k| set32(k, 0x238, u32::MAX));
        let max = "y".repeat(0xffff);
        let (r, mem) = run(&spec(&k, None, &max, MEM));
        assert!(r.is_ok());
        assert_eq!(mem.cstr(0x2_0000).len(), 0xffff);
        let long = "y".repeat(0x1_0000);
        assert_eq!(refuse_spec(&spec(&k, None, &long, MEM)), LoadError::CmdlineTooLong { len: 0x1_0000, max: 0xffff });
        // A NUL inside.
        assert_eq!(refuse_spec(&spec(&image(), None, "a\0b", MEM)), LoadError::NulInCmdline);
    }

    #[test]
    fn a_failed_write_is_reported() {
        let k = image();
        let initrd = [7u8; 0x10];
        for (n, gpa) in [(1, PREF), (2, MEM - 0x1000), (3, 0x2_0000), (4, 0x6000), (5, 0x7000)] {
            let mut calls = 0;
            let r = load(&spec(&k, Some(&initrd), "", MEM), &mut |_, _| {
                calls += 1;
                if calls == n {
                    Err(())
                } else {
                    Ok(())
                }
            });
            assert!(matches!(r, Err(LoadError::WriteFailed { gpa: g, .. }) if g == gpa), "{n}: {r:?}");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let all = [
            (LoadError::BadMemorySize { mem_size: 0x1000 }, "0x1000"),
            (LoadError::TooShort { len: 0x300, need: 0x3400 }, "0x3400"),
            (LoadError::NoHeader, "HdrS"),
            (LoadError::ProtocolTooOld { version: 0x020b }, "2.11"),
            (LoadError::BadHeaderLength { end: 0x267 }, "0x267"),
            (LoadError::BadSetupSects { setup_sects: 64, len: 0x8000 }, "setup_sects 64"),
            (LoadError::NotLoadedHigh { loadflags: 0 }, "LOADED_HIGH"),
            (LoadError::BadAlignment { kernel_alignment: 3 }, "kernel_alignment 0x3"),
            (LoadError::NoUsableEntry { code32_start: 0x20_0000 }, "code32_start"),
            (LoadError::KernelDoesNotFit { start: PREF, end: 0x180_0000, mem_size: MEM }, "init_size"),
            (LoadError::InitrdDoesNotFit { size: 0x10, lowest: 0x180_0000, top: 0x100_0000 }, "initrd_addr_max"),
            (LoadError::CmdlineTooLong { len: 2048, max: 2047 }, "cmdline_size (2047)"),
            (LoadError::NulInCmdline, "NUL"),
            (LoadError::WriteFailed { gpa: 0x7000, len: 0x1000 }, "0x7000"),
        ];
        for (e, needle) in all {
            let s = e.to_string();
            assert!(s.starts_with("linux: ") && s.contains(needle), "{s}");
        }
        assert!(LoadError::ProtocolTooOld { version: 0x020b }.to_string().contains("2.12"));
        assert!(LoadError::KernelDoesNotFit { start: PREF, end: 0x180_0000, mem_size: MEM }
            .to_string()
            .contains("0x1800000"));
    }

    /// A real kernel, e.g. Debian's: `apt-get download
    /// linux-image-6.1.0-57-cloud-amd64 && dpkg -x *.deb /tmp/linux-pkg`,
    /// then `HV_TEST_BZIMAGE=/tmp/linux-pkg/boot/vmlinuz-6.1.0-57-cloud-amd64
    /// cargo test -p hvcore loader::linux -- --ignored`.
    #[test]
    #[ignore = "needs a real bzImage: set HV_TEST_BZIMAGE to its path and run with --ignored"]
    fn a_real_bzimage_loads() {
        let path = std::env::var("HV_TEST_BZIMAGE").expect("HV_TEST_BZIMAGE names a bzImage");
        let k = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(is_bzimage(&k), "{path}");
        // The header, read here independently of the loader.
        let sects = match k[0x1f1] {
            0 => 4,
            s => s as usize,
        };
        let pm = (sects + 1) * 512;
        let version = u16_at(&k, 0x206);
        let header_end = 0x202 + k[0x201] as usize;
        let relocatable = k[0x234] != 0;
        let align = u32_at(&k, 0x230) as u64;
        let pref = u64_at(&k, 0x258);
        let init_size = u32_at(&k, 0x260) as u64;
        let xlf = u16_at(&k, 0x236);
        std::println!(
            "{path}: protocol {version:#x}, setup_sects {sects}, header end {header_end:#x}, relocatable \
             {relocatable}, kernel_alignment {align:#x}, pref_address {pref:#x}, init_size {init_size:#x}, \
             xloadflags {xlf:#x}, cmdline_size {}",
            u32_at(&k, 0x238)
        );
        let load_at = if relocatable { pref.max(MIB).div_ceil(align) * align } else { MIB };
        let kernel_end = load_at.max(pref) + init_size;
        let mem_size = 256 * MIB;
        let initrd: Vec<u8> = (0..MIB as u32 + 123).map(|i| (i * 7) as u8).collect();
        let cmdline = "console=ttyS0 earlyprintk=serial panic=-1";
        let (r, mem) = run(&spec(&k, Some(&initrd), cmdline, mem_size));
        let e = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.eip as u64, load_at);
        assert_eq!(e.kernel, (load_at, kernel_end));
        assert_eq!(e.kernel_64, xlf & 1 != 0);
        assert_eq!(mem.read(load_at, k.len() - pm), &k[pm..]);
        // The zero page: the copied header with the loader's fields.
        let zp = mem.read(ZERO_PAGE, 0x1000);
        let written = [0x1fa..0x1fc, 0x210..0x212, 0x214..0x220, 0x224..0x22c, 0x250..0x258];
        for i in 0x1f1..header_end {
            if !written.iter().any(|r| r.contains(&i)) {
                assert_eq!(zp[i], k[i], "header byte {i:#x}");
            }
        }
        assert_eq!(zp[0x1ef], 0, "sentinel (the image has {:#x})", k[0x1ef]);
        assert_eq!((u16_at(&zp, 0x1fa), zp[0x210], zp[0x211] & 0xe1), (0xffff, 0xff, 0x81));
        assert_eq!(u32_at(&zp, 0x214) as u64, load_at);
        assert_eq!(u32_at(&zp, 0x228), 0x2_0000);
        assert_eq!(mem.cstr(0x2_0000), cmdline);
        let initrd_at = (mem_size.min(u32_at(&k, 0x22c) as u64 + 1) - initrd.len() as u64) & !0xfff;
        assert_eq!((u32_at(&zp, 0x218) as u64, u32_at(&zp, 0x21c) as u64), (initrd_at, initrd.len() as u64));
        assert_eq!(mem.read(initrd_at, initrd.len()), initrd);
        assert_eq!(zp[0x1e8], 4);
        assert_eq!((u64_at(&zp, 0x2d0 + 60), u64_at(&zp, 0x2d0 + 68)), (MIB, mem_size - MIB));
        // One byte of memory too few.
        assert_eq!(
            refuse_spec(&spec(&k, None, "", kernel_end - 1)),
            LoadError::KernelDoesNotFit { start: load_at, end: kernel_end, mem_size: kernel_end - 1 }
        );
        std::println!("loaded at {load_at:#x}, kernel up to {kernel_end:#x}, initrd at {initrd_at:#x}");
    }
}

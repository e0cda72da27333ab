//! A Multiboot (version 1) loader: puts a multiboot kernel, its command
//! line and its modules into guest memory and says how its vCPU starts.
//!
//! The reference is the Multiboot Specification 0.6.96 ("the spec"),
//! sections 3.1 (the header), 3.2 (the machine state) and 3.3 (the boot
//! information); QEMU's `-kernel` multiboot support is the behaviour
//! reference for where things go. kvm-unit-tests' x86 kernels are the
//! first users.
//!
//! # What is loaded
//!
//! * An ELF32 image (`EM_386`, `ET_EXEC`, little-endian): its `PT_LOAD`
//!   segments at their physical address `p_paddr` (file bytes; the rest
//!   up to `p_memsz` is already zero, because guest memory is zero before
//!   the load). The entry is `e_entry`, translated from the virtual to the
//!   physical address of the segment that holds it (as GRUB 2 does; for
//!   kvm-unit-tests both are equal).
//! * With header flag 16 (the "a.out kludge", spec 3.1.3) the header's
//!   address fields instead of any executable format: the file from
//!   `header_addr - load_addr` bytes before the header up to
//!   `load_end_addr` goes to `load_addr`, zeros up to `bss_end_addr`.
//!
//! Every segment must lie in memory the map below calls available:
//! `[0, 0x9FC00)` or `[1 MiB, mem_size)`.
//!
//! # Guest-physical layout
//!
//! | range                              | what                                         |
//! |------------------------------------|----------------------------------------------|
//! | [`INFO_LOW`]`..` (about 300 bytes + strings) | the boot information, see below    |
//! | the kernel's segments              | as the image says                            |
//! | `page_align(max(kernel end, 1 MiB))..` | the modules, each page-aligned, in order |
//!
//! The boot information area holds, in this order: the information
//! structure ([`INFO_SIZE`] bytes, spec 3.3), the memory map
//! ([`MMAP_ENTRIES`] entries of 24 bytes), the module list (16 bytes per
//! module) and the NUL-terminated strings (command line, module command
//! lines, boot loader name).
//!
//! Where the area goes, and why: QEMU writes the information structure
//! and the memory map to 0x9000..0x9558 (low memory, below the EBDA) and
//! the strings, the module list and the modules right after the kernel
//! image, page-aligned. kvm-unit-tests puts its heap right after its
//! image (`edata`, the page-aligned end of its bss): `setup_multiboot`
//! starts the physical allocator there, and the page allocator writes its
//! metadata table at that address in `setup_vm`, *before* `find_highmem`
//! reads `flags`, `mmap_addr` and the memory map again. So the
//! information structure must not lie after the image; low memory is
//! safe: before `main` kvm-unit-tests writes only page 0 (its AP
//! trampoline, `RM_TRAMPOLINE_ADDR`). The modules right after the image
//! are safe as QEMU places them: the first module (the environment) is
//! copied into a static buffer in `setup_libcflat`, and the command line
//! parsed by `__setup_args`, both before the first allocation. We keep the
//! strings and the module list with the information structure, so that
//! only module data lies in the heap-to-be.
//!
//! The area starts at [`INFO_LOW`] (QEMU's 0x9000, never page 0) unless a
//! kernel segment is in the way (kvm-unit-tests' `realmode.flat` is
//! linked at 32 KiB and covers 0x8000..0xDA30; it does not read the boot
//! information). Then the area goes to the first page after the modules.
//!
//! # Initial state (spec 3.2)
//!
//! [`Entry`] holds EIP, EAX = [`BOOTLOADER_MAGIC`] and EBX = the address
//! of the information structure. The kernel must also set: CR0 = PE (and
//! ET; paging off), EFLAGS with IF and VM clear, CS a flat 32-bit code
//! segment (base 0, limit 0xFFFFFFFF), DS/ES/FS/GS/SS flat 32-bit data
//! segments, A20 on. ESP, GDTR and IDTR are undefined for the guest.
//!
//! # Errors
//!
//! Every malformed image or impossible request is a [`LoadError`], never
//! a panic. Everything is checked before the first write, and `write`
//! is only called with ranges inside `[0, mem_size)`.

use alloc::vec::Vec;
use core::fmt;

/// The header's magic (spec 3.1.2).
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// EAX at the kernel's entry (spec 3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie completely inside the first 8 KiB (spec 3.1.1).
pub const HEADER_SEARCH: usize = 8192;

/// Header flag 0: modules page-aligned (we always do that).
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag 1: memory information required (we always give it).
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag 2: video mode table required.
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag 16: the header's address fields say where to load.
pub const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Bits 0-15 are requirements: a loader that does not know one must
/// refuse the image (spec 3.1.2). We know 0, 1 and 2.
const REQUIRED_MASK: u32 = 0xFFFF;
const KNOWN_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// Information flags (spec 3.3): which fields are valid.
pub const INFO_MEMORY: u32 = 1 << 0;
pub const INFO_CMDLINE: u32 = 1 << 2;
pub const INFO_MODS: u32 = 1 << 3;
pub const INFO_MEM_MAP: u32 = 1 << 6;
pub const INFO_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Offsets inside the information structure (spec 3.3).
pub const OFF_FLAGS: usize = 0;
pub const OFF_MEM_LOWER: usize = 4;
pub const OFF_MEM_UPPER: usize = 8;
pub const OFF_CMDLINE: usize = 16;
pub const OFF_MODS_COUNT: usize = 20;
pub const OFF_MODS_ADDR: usize = 24;
pub const OFF_MMAP_LENGTH: usize = 44;
pub const OFF_MMAP_ADDR: usize = 48;
pub const OFF_BOOT_LOADER_NAME: usize = 64;
/// The information structure up to and including the VBE fields.
pub const INFO_SIZE: usize = 88;
/// One module list entry: mod_start, mod_end, string, reserved.
pub const MODULE_ENTRY_SIZE: usize = 16;
/// One memory map entry: size (u32, = 20), base_addr, length (u64), type.
pub const MMAP_ENTRY_SIZE: usize = 24;
pub const MMAP_ENTRIES: usize = 4;
/// The map follows the structure; its entries are packed (a u32 size,
/// then the u64 fields), as the spec draws them.
const MMAP_OFFSET: usize = INFO_SIZE;
const MODS_OFFSET: usize = MMAP_OFFSET + MMAP_ENTRIES * MMAP_ENTRY_SIZE;
const STRINGS_OFFSET: usize = MODS_OFFSET; // + 16 * module count
/// Memory map types.
pub const MEMORY_AVAILABLE: u32 = 1;
pub const MEMORY_RESERVED: u32 = 2;

/// Where the boot information goes unless a segment is in the way
/// (QEMU's `MULTIBOOT_STRUCT_ADDR`).
pub const INFO_LOW: u64 = 0x9000;
/// Conventional memory ends here (the EBDA above is reserved).
pub const LOW_MEMORY_END: u64 = 0x9_FC00;
/// The BIOS area, reserved in the map.
pub const BIOS_START: u64 = 0xF_0000;
/// Extended memory starts here.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The largest VM this layout describes: the map has no hole for the
/// 32-bit MMIO window (LAPIC at 0xFEE00000), so memory must end below it.
pub const MAX_MEM_SIZE: u64 = 3 << 30;
/// mem_lower in KiB: all of conventional memory.
pub const MEM_LOWER_KIB: u32 = (LOW_MEMORY_END / 1024) as u32;
/// A bound on the boot information (structure, map, module list and
/// strings), so that no request can make the loader allocate much.
pub const MAX_INFO_SIZE: usize = 0x1_0000;
const _: () = assert!(INFO_LOW + MAX_INFO_SIZE as u64 <= LOW_MEMORY_END);
/// At most this many program headers are accepted.
pub const MAX_PROGRAM_HEADERS: u16 = 64;
/// The boot loader name the guest sees.
pub const BOOT_LOADER_NAME: &str = "hvcore";

const PAGE: u64 = 0x1000;

/// A boot module (spec 3.3: `mods_addr`): its contents and its string.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    pub data: &'a [u8],
    pub cmdline: &'a str,
}

/// What to load.
#[derive(Clone, Copy, Debug)]
pub struct Spec<'a> {
    /// The kernel file.
    pub kernel: &'a [u8],
    /// The program name: the first word of the command line (as QEMU
    /// passes the kernel's file name).
    pub name: &'a str,
    /// The arguments after the name.
    pub args: &'a str,
    pub modules: &'a [Module<'a>],
    /// The VM's memory: `[0, mem_size)`.
    pub mem_size: u64,
}

/// The kernel's entry state (spec 3.2); see the module documentation for
/// the rest of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub eip: u32,
    /// [`BOOTLOADER_MAGIC`].
    pub eax: u32,
    /// The guest-physical address of the information structure.
    pub ebx: u32,
}

/// A multiboot header found in an image (spec 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Its file offset.
    pub offset: usize,
    pub flags: u32,
    /// The a.out kludge fields (valid with [`FLAG_AOUT_KLUDGE`]).
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// Why an image was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// No magic at a 32-bit aligned offset in the first 8 KiB.
    NoHeader,
    /// The magic was found, but no checksum matched (first such offset).
    BadChecksum {
        offset: usize,
    },
    /// The header's flags need more bytes than the file or the first
    /// 8 KiB hold.
    HeaderTruncated {
        offset: usize,
    },
    /// A required flag (bits 0-15) this loader does not know.
    UnsupportedFlags {
        flags: u32,
    },
    /// Shorter than an ELF32 header.
    Truncated,
    /// No ELF magic (and no a.out kludge).
    NotElf,
    /// ELF class is not ELFCLASS32 (a 64-bit kernel is no multiboot v1
    /// kernel).
    Not32Bit {
        class: u8,
    },
    NotLittleEndian,
    BadVersion,
    NotExecutable {
        e_type: u16,
    },
    /// Not EM_386 (3).
    WrongMachine {
        e_machine: u16,
    },
    BadProgramHeaderSize {
        size: u16,
    },
    TooManyProgramHeaders {
        count: u16,
    },
    ProgramHeadersOutOfBounds,
    NoLoadSegments,
    FileSizeExceedsMemSize {
        paddr: u64,
        filesz: u64,
        memsz: u64,
    },
    SegmentDataOutOfBounds {
        offset: u64,
        filesz: u64,
    },
    /// A segment lies (partly) outside the available memory
    /// (`[0, 0x9FC00)` or `[1 MiB, mem_size)`).
    SegmentOutsideMemory {
        paddr: u64,
        size: u64,
    },
    SegmentsOverlap {
        first: u64,
        second: u64,
    },
    /// The entry point lies in no loaded segment.
    EntryOutsideImage {
        entry: u64,
    },
    /// The a.out kludge addresses are inconsistent (load_addr above
    /// header_addr, load_end or bss_end below load_addr, ...).
    BadAoutAddresses,
    /// The VM's memory is too small (no extended memory) or larger than
    /// [`MAX_MEM_SIZE`].
    BadMemorySize {
        mem_size: u64,
    },
    /// The modules do not fit between the kernel and the end of memory.
    ModulesDoNotFit {
        need_end: u64,
        mem_size: u64,
    },
    /// The boot information is larger than [`MAX_INFO_SIZE`].
    InfoTooBig {
        size: usize,
    },
    /// No place for the boot information (neither low memory nor after
    /// the modules).
    InfoDoesNotFit {
        size: usize,
    },
    /// A command line contains a NUL byte (the guest would see it cut).
    NulInString,
    /// The `write` callback failed.
    WriteFailed {
        gpa: u64,
        len: u64,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LoadError::NoHeader => f.write_str("multiboot: no multiboot header (magic 0x1BADB002) in the first 8 KiB"),
            LoadError::BadChecksum { offset } => {
                write!(f, "multiboot: header at file offset {offset:#x} has a bad checksum")
            }
            LoadError::HeaderTruncated { offset } => write!(
                f,
                "multiboot: header at file offset {offset:#x} is cut off by the end of the file or of the first 8 KiB"
            ),
            LoadError::UnsupportedFlags { flags } => write!(
                f,
                "multiboot: header flags {flags:#x} require features this loader lacks (unknown bits {:#x})",
                flags & REQUIRED_MASK & !KNOWN_REQUIRED
            ),
            LoadError::Truncated => f.write_str("multiboot: kernel is shorter than an ELF32 header"),
            LoadError::NotElf => f.write_str("multiboot: kernel is not an ELF file and has no a.out kludge (flag 16)"),
            LoadError::Not32Bit { class } => write!(
                f,
                "multiboot: kernel is not a 32-bit ELF (class {class}, want ELFCLASS32 = 1; give a 32-bit image)"
            ),
            LoadError::NotLittleEndian => f.write_str("multiboot: kernel is not little-endian"),
            LoadError::BadVersion => f.write_str("multiboot: kernel has an unknown ELF version"),
            LoadError::NotExecutable { e_type } => {
                write!(f, "multiboot: kernel is not an executable (ELF type {e_type}, want ET_EXEC = 2)")
            }
            LoadError::WrongMachine { e_machine } => {
                write!(f, "multiboot: kernel is not for i386 (ELF machine {e_machine}, want EM_386 = 3)")
            }
            LoadError::BadProgramHeaderSize { size } => {
                write!(f, "multiboot: program headers are {size} bytes, want at least 32")
            }
            LoadError::TooManyProgramHeaders { count } => {
                write!(f, "multiboot: {count} program headers, at most {MAX_PROGRAM_HEADERS} are accepted")
            }
            LoadError::ProgramHeadersOutOfBounds => f.write_str("multiboot: program header table lies outside the file"),
            LoadError::NoLoadSegments => f.write_str("multiboot: kernel has no PT_LOAD segment"),
            LoadError::FileSizeExceedsMemSize { paddr, filesz, memsz } => write!(
                f,
                "multiboot: segment at {paddr:#x}: file size {filesz:#x} exceeds memory size {memsz:#x}"
            ),
            LoadError::SegmentDataOutOfBounds { offset, filesz } => write!(
                f,
                "multiboot: segment data at file offset {offset:#x} (+{filesz:#x}) lies outside the file"
            ),
            LoadError::SegmentOutsideMemory { paddr, size } => write!(
                f,
                "multiboot: segment {paddr:#x}+{size:#x} lies outside the VM's memory \
                 ([0, {LOW_MEMORY_END:#x}) or [{HIGH_MEMORY_START:#x}, mem_size))"
            ),
            LoadError::SegmentsOverlap { first, second } => {
                write!(f, "multiboot: segments at {first:#x} and {second:#x} overlap")
            }
            LoadError::EntryOutsideImage { entry } => {
                write!(f, "multiboot: entry point {entry:#x} lies in no loaded segment")
            }
            LoadError::BadAoutAddresses => f.write_str(
                "multiboot: a.out kludge addresses are inconsistent (header_addr, load_addr, load_end_addr, bss_end_addr)",
            ),
            LoadError::BadMemorySize { mem_size } => write!(
                f,
                "multiboot: VM memory of {mem_size:#x} bytes is not supported (need more than 1 MiB, at most {MAX_MEM_SIZE:#x})"
            ),
            LoadError::ModulesDoNotFit { need_end, mem_size } => write!(
                f,
                "multiboot: kernel and modules need memory up to {need_end:#x}, the VM has {mem_size:#x}"
            ),
            LoadError::InfoTooBig { size } => write!(
                f,
                "multiboot: boot information (command lines, module list) of {size:#x} bytes exceeds {MAX_INFO_SIZE:#x}"
            ),
            LoadError::InfoDoesNotFit { size } => write!(
                f,
                "multiboot: no room for {size:#x} bytes of boot information (low memory taken, none left after the modules)"
            ),
            LoadError::NulInString => f.write_str("multiboot: a command line contains a NUL byte"),
            LoadError::WriteFailed { gpa, len } => {
                write!(f, "multiboot: writing {len:#x} bytes of guest memory at {gpa:#x} failed")
            }
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn page_align(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Finds the multiboot header: the magic at a 32-bit aligned offset in
/// the first 8 KiB, with a valid checksum and all the fields its flags
/// announce inside the file and the first 8 KiB (spec 3.1.1).
pub fn find_header(kernel: &[u8]) -> Option<Header> {
    scan_header(kernel).ok()
}

fn scan_header(kernel: &[u8]) -> Result<Header, LoadError> {
    let window = &kernel[..kernel.len().min(HEADER_SEARCH)];
    let mut bad_checksum = None;
    let mut offset = 0;
    while offset + 12 <= window.len() {
        if u32_at(window, offset) == HEADER_MAGIC {
            let flags = u32_at(window, offset + 4);
            let checksum = u32_at(window, offset + 8);
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) == 0 {
                return header_at(window, offset, flags);
            }
            bad_checksum.get_or_insert(offset);
        }
        offset += 4;
    }
    Err(match bad_checksum {
        Some(offset) => LoadError::BadChecksum { offset },
        None => LoadError::NoHeader,
    })
}

fn header_at(window: &[u8], offset: usize, flags: u32) -> Result<Header, LoadError> {
    // Spec 3.1.3: the address fields end at +32, the graphics fields at +48.
    let need = if flags & FLAG_VIDEO_MODE != 0 {
        48
    } else if flags & FLAG_AOUT_KLUDGE != 0 {
        32
    } else {
        12
    };
    if offset + need > window.len() {
        return Err(LoadError::HeaderTruncated { offset });
    }
    let field = |i: usize| if flags & FLAG_AOUT_KLUDGE != 0 { u32_at(window, offset + 12 + 4 * i) } else { 0 };
    Ok(Header {
        offset,
        flags,
        header_addr: field(0),
        load_addr: field(1),
        load_end_addr: field(2),
        bss_end_addr: field(3),
        entry_addr: field(4),
    })
}

/// One piece of the kernel to load: `filesz` file bytes from `offset`
/// to `paddr`, then zeros up to `memsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    paddr: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.paddr + self.memsz // checked against mem_size: no overflow (u32 + u32 in u64)
    }
}

const ELF32_EHDR_SIZE: usize = 52;
const ELF32_PHDR_SIZE: u16 = 32;
const ET_EXEC: u16 = 2;
const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;

/// The loadable pieces of the image and the physical entry point.
struct Layout {
    segments: Vec<Segment>,
    entry: u64,
}

fn elf_layout(kernel: &[u8]) -> Result<Layout, LoadError> {
    if kernel.len() < 4 || kernel[..4] != *b"\x7fELF" {
        return Err(LoadError::NotElf);
    }
    if kernel.len() < ELF32_EHDR_SIZE {
        return Err(LoadError::Truncated);
    }
    if kernel[4] != 1 {
        return Err(LoadError::Not32Bit { class: kernel[4] });
    }
    if kernel[5] != 1 {
        return Err(LoadError::NotLittleEndian);
    }
    if kernel[6] != 1 || u32_at(kernel, 20) != 1 {
        return Err(LoadError::BadVersion);
    }
    let e_type = u16_at(kernel, 16);
    if e_type != ET_EXEC {
        return Err(LoadError::NotExecutable { e_type });
    }
    let e_machine = u16_at(kernel, 18);
    if e_machine != EM_386 {
        return Err(LoadError::WrongMachine { e_machine });
    }
    let e_entry = u32_at(kernel, 24) as u64;
    let phoff = u32_at(kernel, 28) as u64;
    let phentsize = u16_at(kernel, 42);
    let phnum = u16_at(kernel, 44);
    if phnum == 0 {
        return Err(LoadError::NoLoadSegments);
    }
    if phentsize < ELF32_PHDR_SIZE {
        return Err(LoadError::BadProgramHeaderSize { size: phentsize });
    }
    if phnum > MAX_PROGRAM_HEADERS {
        return Err(LoadError::TooManyProgramHeaders { count: phnum });
    }
    let table = phnum as u64 * phentsize as u64; // at most 64 * 65535
    if phoff + table > kernel.len() as u64 {
        return Err(LoadError::ProgramHeadersOutOfBounds);
    }
    let mut segments = Vec::new();
    for i in 0..phnum as usize {
        let h = &kernel[phoff as usize + i * phentsize as usize..][..ELF32_PHDR_SIZE as usize];
        let memsz = u32_at(h, 20) as u64;
        if u32_at(h, 0) != PT_LOAD || memsz == 0 {
            continue;
        }
        segments.push(Segment {
            offset: u32_at(h, 4) as u64,
            vaddr: u32_at(h, 8) as u64,
            paddr: u32_at(h, 12) as u64,
            filesz: u32_at(h, 16) as u64,
            memsz,
        });
    }
    if segments.is_empty() {
        return Err(LoadError::NoLoadSegments);
    }
    // The entry is a virtual address; the segment holding it says where
    // it lies physically (GRUB 2 does the same translation).
    let entry = segments
        .iter()
        .find(|s| s.vaddr <= e_entry && e_entry < s.vaddr + s.memsz)
        .map_or(e_entry, |s| e_entry - s.vaddr + s.paddr);
    Ok(Layout { segments, entry })
}

/// The a.out kludge (spec 3.1.3): one piece, described by the header.
fn aout_layout(kernel: &[u8], h: &Header) -> Result<Layout, LoadError> {
    let (header_addr, load_addr) = (h.header_addr as u64, h.load_addr as u64);
    // The header sits `header_addr - load_addr` bytes into the loaded text.
    let before = header_addr.checked_sub(load_addr).ok_or(LoadError::BadAoutAddresses)?;
    let offset = (h.offset as u64).checked_sub(before).ok_or(LoadError::BadAoutAddresses)?;
    let filesz = if h.load_end_addr == 0 {
        // "the text and data segments occupy the whole OS image file"
        (kernel.len() as u64).checked_sub(offset).ok_or(LoadError::SegmentDataOutOfBounds { offset, filesz: 0 })?
    } else {
        (h.load_end_addr as u64).checked_sub(load_addr).ok_or(LoadError::BadAoutAddresses)?
    };
    let memsz = if h.bss_end_addr == 0 {
        filesz
    } else {
        let m = (h.bss_end_addr as u64).checked_sub(load_addr).ok_or(LoadError::BadAoutAddresses)?;
        if m < filesz {
            return Err(LoadError::BadAoutAddresses);
        }
        m
    };
    if memsz == 0 {
        return Err(LoadError::NoLoadSegments);
    }
    let segment = Segment { offset, paddr: load_addr, vaddr: load_addr, filesz, memsz };
    Ok(Layout { segments: alloc::vec![segment], entry: h.entry_addr as u64 })
}

/// Whether `[start, end)` lies in memory the map calls available.
fn in_available_memory(start: u64, end: u64, mem_size: u64) -> bool {
    (end <= LOW_MEMORY_END) || (start >= HIGH_MEMORY_START && end <= mem_size)
}

fn check_layout(kernel: &[u8], layout: &Layout, mem_size: u64) -> Result<(), LoadError> {
    for s in &layout.segments {
        if s.filesz > s.memsz {
            return Err(LoadError::FileSizeExceedsMemSize { paddr: s.paddr, filesz: s.filesz, memsz: s.memsz });
        }
        if s.offset + s.filesz > kernel.len() as u64 {
            return Err(LoadError::SegmentDataOutOfBounds { offset: s.offset, filesz: s.filesz });
        }
        if !in_available_memory(s.paddr, s.end(), mem_size) {
            return Err(LoadError::SegmentOutsideMemory { paddr: s.paddr, size: s.memsz });
        }
    }
    // Pairwise: at most 64 * 63 / 2 compares.
    for (i, a) in layout.segments.iter().enumerate() {
        for b in &layout.segments[i + 1..] {
            if a.paddr < b.end() && b.paddr < a.end() {
                return Err(LoadError::SegmentsOverlap { first: a.paddr, second: b.paddr });
            }
        }
    }
    let entry = layout.entry;
    if !layout.segments.iter().any(|s| s.paddr <= entry && entry < s.end()) {
        return Err(LoadError::EntryOutsideImage { entry });
    }
    Ok(())
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The memory map (spec 3.3, `mmap_*`): conventional memory, the EBDA,
/// the BIOS, extended memory. The range 0xA0000..0xF0000 (VGA, option
/// ROMs) is in no entry, as on a PC.
pub fn memory_map(mem_size: u64) -> [(u64, u64, u32); MMAP_ENTRIES] {
    [
        (0, LOW_MEMORY_END, MEMORY_AVAILABLE),
        (LOW_MEMORY_END, 0xA_0000 - LOW_MEMORY_END, MEMORY_RESERVED),
        (BIOS_START, HIGH_MEMORY_START - BIOS_START, MEMORY_RESERVED),
        (HIGH_MEMORY_START, mem_size - HIGH_MEMORY_START, MEMORY_AVAILABLE),
    ]
}

/// Stores bytes at a guest-physical address; `Err(())` if it cannot.
pub type GuestWrite<'a> = dyn FnMut(u64, &[u8]) -> Result<(), ()> + 'a;

/// Loads the kernel, its modules and the boot information; returns the
/// entry state. `write(gpa, bytes)` stores into guest memory, which must
/// be all zero before (bss is not written).
pub fn load(spec: &Spec, write: &mut GuestWrite) -> Result<Entry, LoadError> {
    let mem_size = spec.mem_size;
    if mem_size <= HIGH_MEMORY_START || mem_size > MAX_MEM_SIZE {
        return Err(LoadError::BadMemorySize { mem_size });
    }
    let header = scan_header(spec.kernel)?;
    if header.flags & REQUIRED_MASK & !KNOWN_REQUIRED != 0 {
        return Err(LoadError::UnsupportedFlags { flags: header.flags });
    }
    // Flag 2 (video mode) asks for a graphics mode and its table; we have
    // no display and set no VBE/framebuffer fields. Kernels that set it
    // (with a text-mode preference) boot fine on QEMU, which ignores it
    // too, so we do the same rather than refuse.
    let layout = if header.flags & FLAG_AOUT_KLUDGE != 0 {
        aout_layout(spec.kernel, &header)?
    } else {
        elf_layout(spec.kernel)?
    };
    check_layout(spec.kernel, &layout, mem_size)?;
    if [spec.name, spec.args].iter().chain(spec.modules.iter().map(|m| &m.cmdline)).any(|s| s.contains('\0')) {
        return Err(LoadError::NulInString);
    }

    // Modules: page-aligned, after the kernel and never below 1 MiB.
    let kernel_end = layout.segments.iter().map(Segment::end).max().unwrap_or(0);
    let mut next = page_align(kernel_end.max(HIGH_MEMORY_START));
    let mut module_at = Vec::with_capacity(spec.modules.len());
    for m in spec.modules {
        let end = next.checked_add(m.data.len() as u64).filter(|&e| e <= mem_size);
        let Some(end) = end else {
            return Err(LoadError::ModulesDoNotFit { need_end: next.saturating_add(m.data.len() as u64), mem_size });
        };
        module_at.push(next);
        next = page_align(end);
    }
    let modules_end = next;

    // The information area's size: structure, map, module list, strings.
    let cmdline_len = spec.name.len() + if spec.args.is_empty() { 0 } else { 1 + spec.args.len() };
    let mut size = STRINGS_OFFSET as u64 + (MODULE_ENTRY_SIZE * spec.modules.len()) as u64;
    size += cmdline_len as u64 + 1 + BOOT_LOADER_NAME.len() as u64 + 1;
    for m in spec.modules {
        size += m.cmdline.len() as u64 + 1;
    }
    if size > MAX_INFO_SIZE as u64 {
        return Err(LoadError::InfoTooBig { size: usize::try_from(size).unwrap_or(usize::MAX) });
    }
    let size = size as usize;
    let low_free = layout.segments.iter().all(|s| s.end() <= INFO_LOW || s.paddr >= INFO_LOW + size as u64);
    // (The area always fits below the EBDA: see the assertion at MAX_INFO_SIZE.)
    let base = if low_free {
        INFO_LOW
    } else if modules_end + size as u64 <= mem_size {
        modules_end
    } else {
        return Err(LoadError::InfoDoesNotFit { size });
    };

    let info = build_info(spec, base, size, mem_size, &module_at);

    // Everything is checked: write.
    let mut put = |gpa: u64, bytes: &[u8]| {
        if bytes.is_empty() {
            return Ok(());
        }
        write(gpa, bytes).map_err(|()| LoadError::WriteFailed { gpa, len: bytes.len() as u64 })
    };
    for s in &layout.segments {
        put(s.paddr, &spec.kernel[s.offset as usize..(s.offset + s.filesz) as usize])?;
    }
    for (m, &at) in spec.modules.iter().zip(&module_at) {
        put(at, m.data)?;
    }
    put(base, &info)?;
    Ok(Entry { eip: layout.entry as u32, eax: BOOTLOADER_MAGIC, ebx: base as u32 })
}

/// Builds the information area for `base` (all addresses fit in 32 bits:
/// everything lies below `mem_size <= 3 GiB`).
fn build_info(spec: &Spec, base: u64, size: usize, mem_size: u64, module_at: &[u64]) -> Vec<u8> {
    let mut info = alloc::vec![0u8; size];
    let addr = |off: usize| (base + off as u64) as u32;
    put_u32(&mut info, OFF_FLAGS, INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME);
    put_u32(&mut info, OFF_MEM_LOWER, MEM_LOWER_KIB);
    // KiB from 1 MiB up to the first hole: the end of memory here.
    put_u32(&mut info, OFF_MEM_UPPER, ((mem_size - HIGH_MEMORY_START) / 1024) as u32);

    // The memory map: mmap_addr points at the first entry's size field,
    // which counts the bytes after itself (spec 3.3).
    put_u32(&mut info, OFF_MMAP_LENGTH, (MMAP_ENTRIES * MMAP_ENTRY_SIZE) as u32);
    put_u32(&mut info, OFF_MMAP_ADDR, addr(MMAP_OFFSET));
    for (i, (start, len, ty)) in memory_map(mem_size).into_iter().enumerate() {
        let e = MMAP_OFFSET + i * MMAP_ENTRY_SIZE;
        put_u32(&mut info, e, (MMAP_ENTRY_SIZE - 4) as u32);
        put_u64(&mut info, e + 4, start);
        put_u64(&mut info, e + 12, len);
        put_u32(&mut info, e + 20, ty);
    }

    // Strings (NUL-terminated: the buffer is zero, so skipping one byte
    // after each string terminates it).
    let mut strings = STRINGS_OFFSET + MODULE_ENTRY_SIZE * spec.modules.len();
    let mut add_string = |info: &mut [u8], parts: &[&str]| {
        let at = strings;
        for p in parts {
            info[strings..strings + p.len()].copy_from_slice(p.as_bytes());
            strings += p.len();
        }
        strings += 1;
        addr(at)
    };
    let cmdline = if spec.args.is_empty() {
        add_string(&mut info, &[spec.name])
    } else {
        add_string(&mut info, &[spec.name, " ", spec.args])
    };
    put_u32(&mut info, OFF_CMDLINE, cmdline);
    let name = add_string(&mut info, &[BOOT_LOADER_NAME]);
    put_u32(&mut info, OFF_BOOT_LOADER_NAME, name);

    put_u32(&mut info, OFF_MODS_COUNT, spec.modules.len() as u32);
    put_u32(&mut info, OFF_MODS_ADDR, addr(MODS_OFFSET));
    for (i, (m, &at)) in spec.modules.iter().zip(module_at).enumerate() {
        let e = MODS_OFFSET + i * MODULE_ENTRY_SIZE;
        let s = add_string(&mut info, &[m.cmdline]);
        put_u32(&mut info, e, at as u32);
        // mod_end is exclusive, as GRUB and QEMU give it.
        put_u32(&mut info, e + 4, (at + m.data.len() as u64) as u32);
        put_u32(&mut info, e + 8, s);
    }
    debug_assert_eq!(strings, size);
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;

    const MIB: u64 = 1 << 20;
    const MEM: u64 = 8 * MIB;
    const HDR_OFF: usize = 0x100;

    /// One program header for [`elf`].
    #[derive(Clone)]
    struct Ph {
        p_type: u32,
        vaddr: u32,
        paddr: u32,
        data: Vec<u8>,
        memsz: u32,
    }

    fn load_seg(paddr: u32, data: &[u8], memsz: u32) -> Ph {
        Ph { p_type: PT_LOAD, vaddr: paddr, paddr, data: data.to_vec(), memsz }
    }

    fn mb_header(flags: u32) -> [u8; 12] {
        let mut h = [0; 12];
        h[0..4].copy_from_slice(&0x1BAD_B002u32.to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..12].copy_from_slice(&0u32.wrapping_sub(0x1BAD_B002u32.wrapping_add(flags)).to_le_bytes());
        h
    }

    /// An ELF32 i386 executable: header, program headers at 52, a
    /// multiboot header with `flags` at 0x100, segment data from 0x1000
    /// on (each at a 0x1000-aligned file offset).
    fn elf(entry: u32, phs: &[Ph], flags: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 1; // ELFCLASS32
        f[5] = 1; // little-endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..28].copy_from_slice(&entry.to_le_bytes());
        f[28..32].copy_from_slice(&52u32.to_le_bytes()); // e_phoff
        f[40..42].copy_from_slice(&52u16.to_le_bytes()); // e_ehsize
        f[42..44].copy_from_slice(&32u16.to_le_bytes()); // e_phentsize
        f[44..46].copy_from_slice(&(phs.len() as u16).to_le_bytes());
        f[HDR_OFF..HDR_OFF + 12].copy_from_slice(&mb_header(flags));
        for (i, ph) in phs.iter().enumerate() {
            let offset = f.len() as u32;
            f.extend_from_slice(&ph.data);
            f.resize(f.len().div_ceil(0x1000) * 0x1000, 0);
            let h = 52 + 32 * i;
            let fields = [ph.p_type, offset, ph.vaddr, ph.paddr, ph.data.len() as u32, ph.memsz, 7, 0x1000];
            for (j, v) in fields.iter().enumerate() {
                f[h + 4 * j..h + 4 * j + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        f
    }

    fn simple_kernel() -> Vec<u8> {
        let text: Vec<u8> = (0..0x300u32).map(|i| (i * 7 + 1) as u8).collect();
        elf(0x20_0010, &[load_seg(0x20_0000, &text, 0x2000)], 0)
    }

    /// Guest memory backed by a Vec; also records every write.
    struct Mem {
        bytes: Vec<u8>,
        writes: Vec<(u64, usize)>,
    }

    impl Mem {
        fn new(size: u64) -> Mem {
            Mem { bytes: vec![0; size as usize], writes: Vec::new() }
        }
        fn u32(&self, a: u64) -> u32 {
            u32_at(&self.bytes, a as usize)
        }
        fn u64(&self, a: u64) -> u64 {
            let a = a as usize;
            u64::from_le_bytes(self.bytes[a..a + 8].try_into().unwrap())
        }
        fn cstr(&self, a: u64) -> String {
            let a = a as usize;
            let end = self.bytes[a..].iter().position(|&b| b == 0).expect("string is NUL-terminated");
            String::from_utf8(self.bytes[a..a + end].to_vec()).unwrap()
        }
    }

    fn spec<'a>(kernel: &'a [u8], args: &'a str, modules: &'a [Module<'a>], mem_size: u64) -> Spec<'a> {
        Spec { kernel, name: "kernel.flat", args, modules, mem_size }
    }

    fn run(spec: &Spec) -> (Result<Entry, LoadError>, Mem) {
        let mut mem = Mem::new(spec.mem_size.min(64 * MIB));
        let r = load(spec, &mut |gpa, data| {
            mem.writes.push((gpa, data.len()));
            let end = gpa as usize + data.len();
            if end > mem.bytes.len() {
                return Err(());
            }
            mem.bytes[gpa as usize..end].copy_from_slice(data);
            Ok(())
        });
        (r, mem)
    }

    fn refuse(kernel: &[u8]) -> LoadError {
        let (r, mem) = run(&spec(kernel, "", &[], MEM));
        assert!(mem.writes.is_empty(), "a refused image wrote guest memory");
        r.unwrap_err()
    }

    #[test]
    fn header_found_at_aligned_offsets_in_the_first_8k() {
        let mut k = vec![0u8; 0x4000];
        k[0x1ff4..0x2000].copy_from_slice(&mb_header(3));
        let h = find_header(&k).unwrap();
        assert_eq!((h.offset, h.flags), (0x1ff4, 3));
        // One word later it would end past 8 KiB.
        let mut k = vec![0u8; 0x4000];
        k[0x1ff8..0x2004].copy_from_slice(&mb_header(3));
        assert_eq!(find_header(&k), None);
        assert_eq!(scan_header(&k), Err(LoadError::NoHeader));
        // Not 32-bit aligned.
        let mut k = vec![0u8; 0x100];
        k[0x22..0x2e].copy_from_slice(&mb_header(0));
        assert_eq!(find_header(&k), None);
        // At offset 0, in a file of exactly 12 bytes.
        assert_eq!(find_header(&mb_header(0)).map(|h| h.offset), Some(0));
        assert_eq!(find_header(&mb_header(0)[..11]), None);
        assert_eq!(find_header(&[]), None);
    }

    #[test]
    fn bad_checksum_is_named_and_a_later_good_header_wins() {
        let mut k = vec![0u8; 0x100];
        k[0x10..0x1c].copy_from_slice(&mb_header(0));
        k[0x18] ^= 1;
        assert_eq!(scan_header(&k), Err(LoadError::BadChecksum { offset: 0x10 }));
        assert_eq!(find_header(&k), None);
        k[0x40..0x4c].copy_from_slice(&mb_header(2));
        assert_eq!(find_header(&k).map(|h| (h.offset, h.flags)), Some((0x40, 2)));
        // A wrong magic but a checksum that would fit it: not a header.
        let mut k = vec![0u8; 0x100];
        k[0..12].copy_from_slice(&mb_header(0));
        k[0] ^= 0x10;
        assert_eq!(scan_header(&k), Err(LoadError::NoHeader));
    }

    #[test]
    fn header_cut_off_by_its_flags() {
        // The a.out fields need 32 bytes, the video fields 48; the file is
        // 0x100 bytes long.
        let at = |off: usize, flags: u32| {
            let mut k = vec![0u8; 0x100];
            k[off..off + 12].copy_from_slice(&mb_header(flags));
            scan_header(&k).map(|h| h.offset)
        };
        assert_eq!(at(0xe4, FLAG_AOUT_KLUDGE), Err(LoadError::HeaderTruncated { offset: 0xe4 }));
        assert_eq!(at(0xe0, FLAG_AOUT_KLUDGE), Ok(0xe0));
        assert_eq!(at(0xf4, 0), Ok(0xf4));
        assert_eq!(at(0xd4, FLAG_VIDEO_MODE), Err(LoadError::HeaderTruncated { offset: 0xd4 }));
        assert_eq!(at(0xd4, FLAG_VIDEO_MODE | FLAG_AOUT_KLUDGE), Err(LoadError::HeaderTruncated { offset: 0xd4 }));
        assert_eq!(at(0xd0, FLAG_VIDEO_MODE), Ok(0xd0));
        // The end of the first 8 KiB cuts too, even in a longer file.
        let mut k = vec![0u8; 0x3000];
        k[0x1fe4..0x1ff0].copy_from_slice(&mb_header(FLAG_AOUT_KLUDGE));
        assert_eq!(scan_header(&k), Err(LoadError::HeaderTruncated { offset: 0x1fe4 }));
    }

    #[test]
    fn header_kludge_fields_are_read() {
        let mut k = vec![0u8; 0x40];
        k[0..12].copy_from_slice(&mb_header(FLAG_AOUT_KLUDGE));
        for (i, v) in [0x10_0000u32, 0x10_0000, 0x10_2000, 0x10_3000, 0x10_0040].iter().enumerate() {
            k[12 + 4 * i..16 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        let h = find_header(&k).unwrap();
        assert_eq!(
            (h.header_addr, h.load_addr, h.load_end_addr, h.bss_end_addr, h.entry_addr),
            (0x10_0000, 0x10_0000, 0x10_2000, 0x10_3000, 0x10_0040)
        );
        // Without the flag the fields mean nothing.
        k[0..12].copy_from_slice(&mb_header(0));
        assert_eq!(find_header(&k).unwrap().load_addr, 0);
    }

    #[test]
    fn required_flags_we_do_not_know_are_refused() {
        let text = [0x90u8; 16];
        for bit in 3..16 {
            let k = elf(0x20_0000, &[load_seg(0x20_0000, &text, 16)], 1 << bit | 3);
            assert_eq!(refuse(&k), LoadError::UnsupportedFlags { flags: 1 << bit | 3 }, "bit {bit}");
        }
        // Bits 0-2 and unknown optional bits (17-31) load.
        for flags in [0, 1, 2, 3, FLAG_VIDEO_MODE | 3, 1 << 17, 1 << 31] {
            let mut k = elf(0x20_0000, &[load_seg(0x20_0000, &text, 16)], flags);
            k.resize(k.len().max(HDR_OFF + 48), 0);
            let (r, _) = run(&spec(&k, "", &[], MEM));
            assert!(r.is_ok(), "flags {flags:#x}: {r:?}");
        }
    }

    #[test]
    fn elf_header_refusals() {
        let good = simple_kernel();
        assert!(run(&spec(&good, "", &[], MEM)).0.is_ok());
        let patched = |off: usize, bytes: &[u8]| {
            let mut k = good.clone();
            k[off..off + bytes.len()].copy_from_slice(bytes);
            k
        };
        assert_eq!(refuse(&patched(0, b"\x7fELG")), LoadError::NotElf);
        assert_eq!(refuse(&patched(4, &[2])), LoadError::Not32Bit { class: 2 });
        assert_eq!(refuse(&patched(5, &[2])), LoadError::NotLittleEndian);
        assert_eq!(refuse(&patched(6, &[0])), LoadError::BadVersion);
        assert_eq!(refuse(&patched(20, &[2])), LoadError::BadVersion);
        assert_eq!(refuse(&patched(16, &[3, 0])), LoadError::NotExecutable { e_type: 3 });
        assert_eq!(refuse(&patched(16, &[2, 1])), LoadError::NotExecutable { e_type: 0x102 });
        assert_eq!(refuse(&patched(18, &[3, 1])), LoadError::WrongMachine { e_machine: 0x103 });
        assert_eq!(refuse(&patched(18, &[62, 0])), LoadError::WrongMachine { e_machine: 62 });
        assert_eq!(refuse(&patched(42, &[31, 0])), LoadError::BadProgramHeaderSize { size: 31 });
        assert_eq!(refuse(&patched(44, &[65, 0])), LoadError::TooManyProgramHeaders { count: 65 });
        assert_eq!(refuse(&patched(44, &[0, 0])), LoadError::NoLoadSegments);
        let len = good.len() as u32;
        assert_eq!(refuse(&patched(28, &(len - 31).to_le_bytes())), LoadError::ProgramHeadersOutOfBounds);
        assert_eq!(refuse(&patched(28, &u32::MAX.to_le_bytes())), LoadError::ProgramHeadersOutOfBounds);
        // A table ending exactly at the end of the file is fine.
        let mut k = patched(28, &(len - 32).to_le_bytes());
        k[len as usize - 32..].copy_from_slice(&good[52..84]);
        assert!(run(&spec(&k, "", &[], MEM)).0.is_ok());
        // A file with a header but no room for an ELF header.
        let mut short = b"\x7fELF".to_vec();
        short.resize(16, 0);
        short.extend_from_slice(&mb_header(0));
        assert_eq!(refuse(&short), LoadError::Truncated);
        // No ELF and no kludge; nothing at all.
        assert_eq!(refuse(&mb_header(0)), LoadError::NotElf);
        assert_eq!(refuse(&[0u8; 64]), LoadError::NoHeader);
        // A multiboot header behind 8 KiB is not found.
        let mut far = vec![0u8; 0x2000];
        far[..52].copy_from_slice(&good[..52]);
        far.extend_from_slice(&mb_header(0));
        assert_eq!(refuse(&far), LoadError::NoHeader);
    }

    #[test]
    fn segment_refusals() {
        let d = [0xAAu8; 0x100];
        let one = |ph: Ph, entry: u32| refuse(&elf(entry, &[ph], 0));
        // Only non-loadable or empty segments.
        let note = Ph { p_type: 4, ..load_seg(0x20_0000, &d, 0x100) };
        assert_eq!(one(note, 0x20_0000), LoadError::NoLoadSegments);
        assert_eq!(one(load_seg(0x20_0000, &[], 0), 0x20_0000), LoadError::NoLoadSegments);
        assert_eq!(
            one(load_seg(0x20_0000, &d, 0xff), 0x20_0000),
            LoadError::FileSizeExceedsMemSize { paddr: 0x20_0000, filesz: 0x100, memsz: 0xff }
        );
        // Outside memory: past mem_size, across it, in the EBDA/VGA/BIOS
        // hole, across 4 GiB.
        for (paddr, memsz) in [
            (MEM as u32, 0x100),
            (MEM as u32 - 0x80, 0x100),
            (0x9_FB00, 0x101),
            (0xA_0000, 0x100),
            (0xF_FF00, 0x200),
            (0xFFFF_FF00, 0x200),
        ] {
            assert_eq!(
                one(load_seg(paddr, &d, memsz), paddr),
                LoadError::SegmentOutsideMemory { paddr: paddr as u64, size: memsz as u64 },
                "{paddr:#x}+{memsz:#x}"
            );
        }
        // The edges themselves are fine.
        for (paddr, memsz) in [(MEM as u32 - 0x100, 0x100), (0x9_FB00, 0x100), (0x10_0000, 0x100), (0x1000, 0x100)] {
            let k = elf(paddr, &[load_seg(paddr, &d, memsz)], 0);
            assert!(run(&spec(&k, "", &[], MEM)).0.is_ok(), "{paddr:#x}+{memsz:#x}");
        }
        // Data outside the file.
        let mut k = elf(0x20_0000, &[load_seg(0x20_0000, &d, 0x100)], 0);
        k.truncate(0x1000 + 0xff);
        assert_eq!(refuse(&k), LoadError::SegmentDataOutOfBounds { offset: 0x1000, filesz: 0x100 });
        let mut k = elf(0x20_0000, &[load_seg(0x20_0000, &d, 0x100)], 0);
        k[52 + 4..52 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(refuse(&k), LoadError::SegmentDataOutOfBounds { offset: u32::MAX as u64, filesz: 0x100 });
        // Overlap (by one byte), and touching is fine.
        let k = elf(0x20_0000, &[load_seg(0x20_0000, &d, 0x1001), load_seg(0x20_1000, &d, 0x100)], 0);
        assert_eq!(refuse(&k), LoadError::SegmentsOverlap { first: 0x20_0000, second: 0x20_1000 });
        let k = elf(0x20_0000, &[load_seg(0x20_1000, &d, 0x100), load_seg(0x20_0000, &d, 0x1001)], 0);
        assert_eq!(refuse(&k), LoadError::SegmentsOverlap { first: 0x20_1000, second: 0x20_0000 });
        let k = elf(0x20_0000, &[load_seg(0x20_0000, &d, 0x1000), load_seg(0x20_1000, &d, 0x100)], 0);
        assert!(run(&spec(&k, "", &[], MEM)).0.is_ok());
        // Entry outside every segment (just past the end, just before).
        assert_eq!(one(load_seg(0x20_0000, &d, 0x100), 0x20_0100), LoadError::EntryOutsideImage { entry: 0x20_0100 });
        assert_eq!(one(load_seg(0x20_0000, &d, 0x100), 0x1f_ffff), LoadError::EntryOutsideImage { entry: 0x1f_ffff });
        let k = elf(0x20_00ff, &[load_seg(0x20_0000, &d, 0x100)], 0);
        assert_eq!(run(&spec(&k, "", &[], MEM)).0.unwrap().eip, 0x20_00ff);
    }

    #[test]
    fn memory_size_bounds() {
        let k = simple_kernel();
        for mem_size in [0, MIB, (3 << 30) + 1, 4 << 30, u64::MAX] {
            let (r, mem) = run(&spec(&k, "", &[], mem_size));
            assert_eq!(r, Err(LoadError::BadMemorySize { mem_size }));
            assert!(mem.writes.is_empty());
        }
    }

    #[test]
    fn loads_segments_and_builds_the_info_by_the_spec_offsets() {
        let text: Vec<u8> = (0..0x300u32).map(|i| (i * 7 + 1) as u8).collect();
        let data = [0x55u8; 0x20];
        let k = elf(0x20_0010, &[load_seg(0x20_0000, &text, 0x2000), load_seg(0x30_0000, &data, 0x1800)], 0);
        let env = b"NR_CPUS=1\nMEMSIZE=8\n".to_vec();
        let second = vec![0xEEu8; 0x1001];
        let modules = [Module { data: &env, cmdline: "env" }, Module { data: &second, cmdline: "two x=1" }];
        let (r, mem) = run(&spec(&k, "-v smp=1", &modules, MEM));
        let entry = r.unwrap();
        assert_eq!(entry, Entry { eip: 0x20_0010, eax: 0x2BAD_B002, ebx: 0x9000 });

        // Segments: file bytes, then zeros.
        assert_eq!(&mem.bytes[0x20_0000..0x20_0300], &text[..]);
        assert!(mem.bytes[0x20_0300..0x20_2000].iter().all(|&b| b == 0));
        assert_eq!(&mem.bytes[0x30_0000..0x30_0020], &data);

        let info = entry.ebx as u64;
        // flags: mem (0), cmdline (2), mods (3), mmap (6), loader name (9).
        assert_eq!(mem.u32(info), 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9);
        assert_eq!(mem.u32(info + 4), 639);
        assert_eq!(mem.u32(info + 8), (8 * 1024 - 1024) as u32);
        assert_eq!(mem.cstr(mem.u32(info + 16) as u64), "kernel.flat -v smp=1");
        assert_eq!(mem.cstr(mem.u32(info + 64) as u64), "hvcore");

        // Modules: page-aligned after the last segment (0x301800).
        assert_eq!(mem.u32(info + 20), 2);
        let mods = mem.u32(info + 24) as u64;
        let (s0, e0) = (mem.u32(mods) as u64, mem.u32(mods + 4) as u64);
        let (s1, e1) = (mem.u32(mods + 16) as u64, mem.u32(mods + 20) as u64);
        assert_eq!((s0, e0), (0x30_2000, 0x30_2000 + env.len() as u64));
        assert_eq!((s1, e1), (0x30_3000, 0x30_3000 + 0x1001));
        assert_eq!(&mem.bytes[s0 as usize..e0 as usize], &env[..]);
        assert_eq!(&mem.bytes[s1 as usize..e1 as usize], &second[..]);
        assert_eq!(mem.cstr(mem.u32(mods + 8) as u64), "env");
        assert_eq!(mem.cstr(mem.u32(mods + 24) as u64), "two x=1");
        assert_eq!((mem.u32(mods + 12), mem.u32(mods + 28)), (0, 0));

        // The memory map: 4 entries of 24 bytes; each size field (at -4
        // of base_addr) says 20.
        assert_eq!(mem.u32(info + 44), 96);
        let mmap = mem.u32(info + 48) as u64;
        let want = [(0, 0x9_FC00, 1), (0x9_FC00, 0x400, 2), (0xF_0000, 0x1_0000, 2), (MIB, MEM - MIB, 1)];
        for (i, (base, len, ty)) in want.into_iter().enumerate() {
            let e = mmap + 24 * i as u64;
            assert_eq!(mem.u32(e), 20, "entry {i}");
            assert_eq!((mem.u64(e + 4), mem.u64(e + 12), mem.u32(e + 20)), (base, len, ty), "entry {i}");
        }

        // Every pointer of the info lies in the info area, no string
        // overlaps the structure, the map or the module list.
        for p in [mem.u32(info + 16), mem.u32(info + 64), mem.u32(mods + 8), mem.u32(mods + 24)] {
            assert!(p as u64 >= mods + 32 && (p as u64) < info + 0x1000, "{p:#x}");
        }
        assert!(mmap >= info + 88 && mods >= mmap + 96);
        // Nothing was written outside [0, mem_size), nor to page 0.
        for &(gpa, len) in &mem.writes {
            assert!(gpa >= 0x1000 && gpa + len as u64 <= MEM, "{gpa:#x}+{len:#x}");
        }
    }

    #[test]
    fn three_gib_is_the_largest_vm() {
        let k = simple_kernel();
        let (r, mem) = run(&spec(&k, "", &[], 3 << 30));
        let info = r.unwrap().ebx as u64;
        assert_eq!(mem.u32(info + 8), (3 << 20) - 1024);
        let mmap = mem.u32(info + 48) as u64;
        assert_eq!((mem.u64(mmap + 72 + 4), mem.u64(mmap + 72 + 12)), (MIB, (3 << 30) - MIB));
    }

    #[test]
    fn no_empty_writes() {
        // A bss-only segment and an empty module write nothing.
        let text = [0x90u8; 0x10];
        let bss = Ph { data: Vec::new(), ..load_seg(0x30_0000, &[], 0x1000) };
        let k = elf(0x20_0000, &[load_seg(0x20_0000, &text, 0x10), bss], 0);
        let m = [Module { data: &[], cmdline: "empty" }];
        let (r, mem) = run(&spec(&k, "", &m, MEM));
        let info = r.unwrap().ebx as u64;
        let mods = mem.u32(info + 24) as u64;
        assert_eq!((mem.u32(mods), mem.u32(mods + 4)), (0x30_1000, 0x30_1000));
        assert!(mem.writes.iter().all(|&(_, len)| len > 0), "{:?}", mem.writes);
        assert_eq!(mem.writes.len(), 2);
    }

    #[test]
    fn info_size_limit_is_exact() {
        // Structure (88) + map (4 * 24) + "kernel.flat " + args + NUL +
        // "hvcore" + NUL.
        let fixed = 88 + 96 + 12 + 1 + 7;
        let k = simple_kernel();
        let args = "a".repeat(MAX_INFO_SIZE - fixed);
        let (r, mem) = run(&spec(&k, &args, &[], MEM));
        let info = r.unwrap().ebx as u64;
        assert_eq!(mem.cstr(mem.u32(info + 16) as u64).len(), 12 + args.len());
        assert_eq!(mem.u32(info + 64) as u64, info + MAX_INFO_SIZE as u64 - 7);
        let args = "a".repeat(MAX_INFO_SIZE - fixed + 1);
        assert_eq!(run(&spec(&k, &args, &[], MEM)).0, Err(LoadError::InfoTooBig { size: MAX_INFO_SIZE + 1 }));
    }

    #[test]
    fn info_placement_edges() {
        // With one module "env" and no args the area is 88 + 96 + 16 +
        // "kernel.flat\0" + "hvcore\0" + "env\0" = 223 bytes: 0x9000..0x90DF.
        let text = [0x90u8; 4];
        let m = [Module { data: b"E", cmdline: "env" }];
        let at = |paddr: u32| {
            let k = elf(paddr, &[load_seg(paddr, &text, 0x100)], 0);
            run(&spec(&k, "", &m, MEM)).0.unwrap().ebx
        };
        assert_eq!(at(0x90DF), 0x9000);
        assert_eq!(at(0x90DE), 0x10_1000);
        assert_eq!(at(0x8F00), 0x9000);
        assert_eq!(at(0x8F01), 0x10_1000);
        // After the kernel: the area must end inside memory (no modules,
        // 88 + 96 + 12 + 7 = 203 bytes at MEM).
        let k = elf(0x8000, &[load_seg(0x8000, &text, 0x2000), load_seg(0x10_0000, &text, (MEM - MIB) as u32)], 0);
        let (r, mem) = run(&spec(&k, "", &[], MEM + 203));
        assert_eq!(r.unwrap().ebx as u64, MEM);
        assert_eq!(mem.cstr(mem.u32(MEM + 64) as u64), "hvcore");
        assert_eq!(run(&spec(&k, "", &[], MEM + 202)).0, Err(LoadError::InfoDoesNotFit { size: 203 }));
    }

    #[test]
    fn entry_in_the_second_of_two_higher_half_segments() {
        // Contiguous virtually, apart physically: the entry at the start
        // of the second segment is translated by that segment.
        let text = [0x90u8; 0x10];
        let a = Ph { vaddr: 0xC010_0000, ..load_seg(0x10_0000, &text, 0x1000) };
        let b = Ph { vaddr: 0xC010_1000, ..load_seg(0x20_0000, &text, 0x1000) };
        let k = elf(0xC010_1000, &[a.clone(), b.clone()], 0);
        assert_eq!(run(&spec(&k, "", &[], MEM)).0.unwrap().eip, 0x20_0000);
        let k = elf(0xC010_0FFF, &[a, b], 0);
        assert_eq!(run(&spec(&k, "", &[], MEM)).0.unwrap().eip, 0x10_0FFF);
    }

    #[test]
    fn command_line_without_args_has_no_trailing_space() {
        let k = simple_kernel();
        let (r, mem) = run(&spec(&k, "", &[], MEM));
        let info = r.unwrap().ebx as u64;
        assert_eq!(mem.cstr(mem.u32(info + 16) as u64), "kernel.flat");
        assert_eq!(mem.u32(info + 20), 0);
    }

    #[test]
    fn strings_with_nul_are_refused() {
        let k = simple_kernel();
        let m = [Module { data: b"x", cmdline: "a\0b" }];
        for (args, mods) in [("a\0", &[][..]), ("", &m[..])] {
            let (r, mem) = run(&spec(&k, args, mods, MEM));
            assert_eq!(r, Err(LoadError::NulInString));
            assert!(mem.writes.is_empty());
        }
        let s = Spec { kernel: &k, name: "k\0", args: "", modules: &[], mem_size: MEM };
        assert_eq!(run(&s).0, Err(LoadError::NulInString));
    }

    #[test]
    fn higher_half_entry_is_translated_to_its_physical_address() {
        let text = [0x90u8; 0x40];
        let ph = Ph { vaddr: 0xC010_0000, ..load_seg(0x10_0000, &text, 0x40) };
        let k = elf(0xC010_0020, &[ph], 0);
        let (r, mem) = run(&spec(&k, "", &[], MEM));
        assert_eq!(r.unwrap().eip, 0x10_0020);
        assert_eq!(&mem.bytes[0x10_0000..0x10_0040], &text);
    }

    #[test]
    fn low_kernel_over_the_info_page_moves_the_info_after_the_modules() {
        // Like kvm-unit-tests' realmode.flat: 0x8000..0xDA30.
        let text = [0x90u8; 0x100];
        let k = elf(0x8018, &[load_seg(0x8000, &text, 0x2a30), load_seg(0xb000, &text, 0x2a30)], 0);
        let env = [b'E'; 10];
        let modules = [Module { data: &env, cmdline: "env" }];
        let (r, mem) = run(&spec(&k, "", &modules, MEM));
        let e = r.unwrap();
        assert_eq!(e.eip, 0x8018);
        // The module goes to 1 MiB (nothing available between), the info
        // to the next page.
        let mods = mem.u32(e.ebx as u64 + 24) as u64;
        assert_eq!(mem.u32(mods), 0x10_0000);
        assert_eq!(e.ebx, 0x10_1000);
        assert_eq!(&mem.bytes[0x8000..0x8100], &text);
        // A low kernel below the info page leaves it where it is.
        let k = elf(0x1000, &[load_seg(0x1000, &text, 0x8000)], 0);
        assert_eq!(run(&spec(&k, "", &modules, MEM)).0.unwrap().ebx, 0x9000);
        let k = elf(0x1000, &[load_seg(0x1000, &text, 0x8001)], 0);
        assert_eq!(run(&spec(&k, "", &modules, MEM)).0.unwrap().ebx, 0x10_1000);
        // ... and one just above it too (the info area is 0x9000 + 0x100 +
        // strings here).
        let k = elf(0xA000, &[load_seg(0xA000, &text, 0x100)], 0);
        assert_eq!(run(&spec(&k, "", &modules, MEM)).0.unwrap().ebx, 0x9000);
    }

    #[test]
    fn modules_and_info_must_fit() {
        let k = simple_kernel(); // 0x200000..0x202000
        let big = vec![1u8; (MEM - 0x20_2000) as usize];
        let m = [Module { data: &big, cmdline: "" }];
        let (r, mem) = run(&spec(&k, "", &m, MEM));
        assert!(r.is_ok());
        assert_eq!(mem.bytes[MEM as usize - 1], 1);
        let big = vec![1u8; (MEM - 0x20_2000) as usize + 1];
        let m = [Module { data: &big, cmdline: "" }];
        let (r, mem) = run(&spec(&k, "", &m, MEM));
        assert_eq!(r, Err(LoadError::ModulesDoNotFit { need_end: MEM + 1, mem_size: MEM }));
        assert!(mem.writes.is_empty());
        // The second module does not fit after the page-aligned first.
        let a = vec![1u8; 1];
        let b = vec![2u8; (MEM - 0x20_3000) as usize + 1];
        let m = [Module { data: &a, cmdline: "" }, Module { data: &b, cmdline: "" }];
        assert_eq!(run(&spec(&k, "", &m, MEM)).0, Err(LoadError::ModulesDoNotFit { need_end: MEM + 1, mem_size: MEM }));
        // Too long a command line.
        let long = "x".repeat(MAX_INFO_SIZE);
        let (r, mem) = run(&spec(&k, &long, &[], MEM));
        assert!(matches!(r, Err(LoadError::InfoTooBig { .. })), "{r:?}");
        assert!(mem.writes.is_empty());
        // Low memory taken and memory full after the modules.
        let text = [0u8; 4];
        let low = elf(0x8000, &[load_seg(0x8000, &text, 0x2000), load_seg(0x10_0000, &text, (MEM - MIB) as u32)], 0);
        let (r, mem) = run(&spec(&low, "", &[], MEM));
        assert!(matches!(r, Err(LoadError::InfoDoesNotFit { .. })), "{r:?}");
        assert!(mem.writes.is_empty());
    }

    #[test]
    fn a_failed_write_is_reported() {
        let k = simple_kernel();
        let s = spec(&k, "", &[], MEM);
        let mut calls = 0;
        let r = load(&s, &mut |_, _| {
            calls += 1;
            if calls == 2 {
                Err(())
            } else {
                Ok(())
            }
        });
        assert!(matches!(r, Err(LoadError::WriteFailed { gpa: 0x9000, .. })), "{r:?}");
    }

    /// A raw binary with the a.out kludge: the header at file offset
    /// 0x20, loaded at 1 MiB.
    fn aout(load_end: u32, bss_end: u32, header_addr: u32, entry: u32) -> Vec<u8> {
        let mut k: Vec<u8> = (0..0x400u32).map(|i| i as u8 ^ 0x5A).collect();
        let flags = FLAG_AOUT_KLUDGE | FLAG_MEMORY_INFO;
        k[0x20..0x2c].copy_from_slice(&mb_header(flags));
        for (i, v) in [header_addr, 0x10_0000, load_end, bss_end, entry].iter().enumerate() {
            k[0x2c + 4 * i..0x30 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        k
    }

    #[test]
    fn aout_kludge_loads_by_the_header_addresses() {
        let k = aout(0x10_0300, 0x10_1000, 0x10_0020, 0x10_0040);
        let (r, mem) = run(&spec(&k, "", &[], MEM));
        assert_eq!(r.unwrap().eip, 0x10_0040);
        assert_eq!(&mem.bytes[0x10_0000..0x10_0300], &k[..0x300]);
        assert!(mem.bytes[0x10_0300..0x10_1000].iter().all(|&b| b == 0));
        // Modules go after bss_end.
        let m = [Module { data: b"m", cmdline: "" }];
        let (r, mem) = run(&spec(&k, "", &m, MEM));
        assert_eq!(mem.u32(mem.u32(r.unwrap().ebx as u64 + 24) as u64), 0x10_1000);
        // load_end 0: the whole file; bss_end 0: no bss.
        let k = aout(0, 0, 0x10_0020, 0x10_03ff);
        let (r, mem) = run(&spec(&k, "", &[], MEM));
        assert_eq!(r.unwrap().eip, 0x10_03ff);
        assert_eq!(&mem.bytes[0x10_0000..0x10_0400], &k[..]);
        assert_eq!(
            run(&spec(&aout(0, 0, 0x10_0020, 0x10_0400), "", &[], MEM)).0,
            Err(LoadError::EntryOutsideImage { entry: 0x10_0400 })
        );
        // The header 0x20 bytes in, but load_addr says the text starts
        // 0x10 bytes before it: the file is loaded from offset 0x10.
        let k = aout(0x10_0100, 0, 0x10_0010, 0x10_0000);
        let (r, mem) = run(&spec(&k, "", &[], MEM));
        assert!(r.is_ok());
        assert_eq!(&mem.bytes[0x10_0000..0x10_0100], &k[0x10..0x110]);
    }

    #[test]
    fn aout_kludge_refusals() {
        let bad = |k: Vec<u8>| refuse(&k);
        // header_addr below load_addr; header more than its file offset
        // into the text.
        assert_eq!(bad(aout(0x10_0300, 0, 0xF_FFFF, 0x10_0000)), LoadError::BadAoutAddresses);
        assert_eq!(bad(aout(0x10_0300, 0, 0x10_0021, 0x10_0000)), LoadError::BadAoutAddresses);
        // load_end below load_addr, bss_end below load_end.
        assert_eq!(bad(aout(0xF_0000, 0, 0x10_0020, 0x10_0000)), LoadError::BadAoutAddresses);
        assert_eq!(bad(aout(0x10_0300, 0x10_02ff, 0x10_0020, 0x10_0000)), LoadError::BadAoutAddresses);
        // More text than file.
        assert_eq!(
            bad(aout(0x10_0401, 0, 0x10_0020, 0x10_0000)),
            LoadError::SegmentDataOutOfBounds { offset: 0, filesz: 0x401 }
        );
        // Nothing to load.
        assert_eq!(bad(aout(0x10_0000, 0, 0x10_0020, 0x10_0000)), LoadError::NoLoadSegments);
        // Outside memory.
        let mut k = aout(0x10_0300, 0, 0x10_0020, 0x10_0000);
        k[0x30..0x34].copy_from_slice(&0x9_FF00u32.to_le_bytes());
        k[0x2c..0x30].copy_from_slice(&0x9_FF20u32.to_le_bytes());
        k[0x34..0x38].copy_from_slice(&0xA_0200u32.to_le_bytes());
        k[0x3c..0x40].copy_from_slice(&0x9_FF00u32.to_le_bytes());
        assert_eq!(bad(k), LoadError::SegmentOutsideMemory { paddr: 0x9_FF00, size: 0x300 });
    }

    #[test]
    fn errors_name_the_problem() {
        let s = alloc::format!("{}", LoadError::UnsupportedFlags { flags: 0x1_0009 });
        assert!(s.contains("0x8") && s.contains("flags"), "{s}");
        assert!(alloc::format!("{}", LoadError::NoHeader).contains("8 KiB"));
        assert!(alloc::format!("{}", LoadError::Not32Bit { class: 2 }).contains("32-bit"));
        assert!(alloc::format!("{}", LoadError::WrongMachine { e_machine: 62 }).contains("EM_386"));
        assert!(alloc::format!("{}", LoadError::SegmentOutsideMemory { paddr: 0xA0000, size: 1 }).contains("0xa0000"));
    }

    const KUT: &str = "/tmp/kut/kvm-unit-tests/x86";

    #[test]
    fn kvm_unit_tests_dummy_loads() {
        let Ok(k) = std::fs::read(alloc::format!("{KUT}/dummy.flat")) else {
            std::println!("note: {KUT}/dummy.flat not found, skipping");
            return;
        };
        let h = find_header(&k).expect("dummy.flat has a multiboot header");
        assert_eq!(h.flags, 0);
        let env = b"NR_CPUS=1\nMEMSIZE=32\nTEST_DEVICE=0\n";
        let modules = [Module { data: env, cmdline: "env" }];
        let mem_size = 32 * MIB;
        let (r, mem) = run(&spec(&k, "", &modules, mem_size));
        let e = r.unwrap();
        // ELF e_entry, read independently of the loader.
        assert_eq!(e.eip, u32_at(&k, 24));
        assert_eq!((e.eax, e.ebx), (0x2BAD_B002, 0x9000));
        // Each PT_LOAD's bytes are at p_paddr.
        let (phoff, phnum) = (u32_at(&k, 28) as usize, u16_at(&k, 44) as usize);
        let mut end = 0;
        for i in 0..phnum {
            let h = &k[phoff + 32 * i..];
            if u32_at(h, 0) != 1 {
                continue;
            }
            let (off, pa, fsz, msz) =
                (u32_at(h, 4) as usize, u32_at(h, 12) as usize, u32_at(h, 16) as usize, u32_at(h, 20));
            assert_eq!(&mem.bytes[pa..pa + fsz], &k[off..off + fsz]);
            end = end.max(pa as u64 + msz as u64);
        }
        // The environment module right after the image (its heap start).
        let mods = mem.u32(0x9000 + 24) as u64;
        assert_eq!(mem.u32(mods) as u64, end.div_ceil(0x1000) * 0x1000);
        assert_eq!(mem.u32(mods + 4) - mem.u32(mods), env.len() as u32);
        assert_eq!(mem.u32(0x9000 + 8), 31 * 1024);
        assert_eq!(mem.cstr(mem.u32(0x9000 + 16) as u64), "kernel.flat");
    }

    #[test]
    fn kvm_unit_tests_all_load() {
        let Ok(dir) = std::fs::read_dir(KUT) else {
            std::println!("note: {KUT} not found, skipping");
            return;
        };
        let mut n = 0;
        for f in dir.flatten() {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "flat") {
                continue;
            }
            let k = std::fs::read(&path).unwrap();
            let s = spec(&k, "arg", &[], 64 * MIB);
            let r = load(&s, &mut |gpa, data| {
                assert!(gpa + data.len() as u64 <= 64 * MIB);
                Ok(())
            });
            assert!(r.is_ok(), "{}: {:?}", path.display(), r);
            n += 1;
        }
        std::println!("{n} kvm-unit-tests kernels loaded");
    }
}

//! The boot protocol that puts a 64-bit guest program into guest memory.
//!
//! [`load`] parses the guest's ELF64 image (x86-64, `ET_EXEC`, non-PIE),
//! writes its `PT_LOAD` segments (file bytes, then zeros up to the memory
//! size) and builds everything the guest needs to start directly in
//! 64-bit mode with paging on. It returns the initial register state
//! ([`BootState`]); the kernel copies it into the VMCS.
//!
//! # Guest-physical layout
//!
//! | range                 | what                                                     |
//! |-----------------------|----------------------------------------------------------|
//! | `0x0000..0x1000`      | unused (but mapped, like all of the first GiB)           |
//! | `0x1000..0x1028`      | GDT: null, code 0x08, data 0x10, 64-bit TSS 0x18 (16 B)  |
//! | `0x1800..0x1868`      | TSS (104 bytes, no I/O bitmap)                           |
//! | `0x2000`              | PML4: entry 0 -> PDPT                                    |
//! | `0x3000`              | PDPT: entry 0 -> PD                                      |
//! | `0x4000`              | PD: 512 x 2 MiB pages, identity, the first 1 GiB         |
//! | `..0xFF000`           | the initial stack, growing down from [`STACK_TOP`]       |
//! | `0x10_0000..mem_size` | the program's segments (must lie here)                   |
//!
//! The first MiB ([`RESERVED_END`]) belongs to the protocol. The page
//! tables map the whole first GiB (present, writable, 2 MiB pages),
//! deliberately also beyond `mem_size`: a wild guest access then reaches
//! the EPT, where the hypervisor must catch it.
//!
//! # Initial state
//!
//! RIP = ELF entry, RSP = [`STACK_TOP`], RDI = the `arg` of [`load`],
//! CR0 = PE|MP|ET|NE|WP|PG, CR3 = PML4, CR4 = PAE, EFER = LME|LMA, CS =
//! 0x08 (64-bit code, [`CODE_ACCESS_RIGHTS`]), DS/ES/SS/FS/GS = 0x10
//! ([`DATA_ACCESS_RIGHTS`]), TR = 0x18 ([`TSS_ACCESS_RIGHTS`]: a busy
//! 64-bit TSS, as VM entry requires; the GDT descriptor is busy too, as
//! the CPU would leave it after LTR), LDTR unusable, IDTR = base 0 limit 0
//! (the guest installs its own IDT if it wants one), RFLAGS = 0x2. The
//! kernel must still apply the VMX fixed bits (CR0/CR4 FIXED0/1, e.g.
//! CR4.VMXE) and hide them behind read shadows.
//!
//! # Errors
//!
//! Every malformed image is a [`LoadError`], never a panic. The image is
//! checked completely before anything is written.

use core::fmt;

/// The GDT's guest-physical address.
pub const GDT_BASE: u64 = 0x1000;
/// The TSS's guest-physical address.
pub const TSS_BASE: u64 = 0x1800;
/// The PML4's guest-physical address (CR3).
pub const PML4_BASE: u64 = 0x2000;
pub const PDPT_BASE: u64 = 0x3000;
pub const PD_BASE: u64 = 0x4000;
/// The initial RSP (16-byte aligned); the stack grows down from here.
pub const STACK_TOP: u64 = 0xF_F000;
/// Segments may not start below this: the protocol's own area.
pub const RESERVED_END: u64 = 0x10_0000;
const _: () = assert!(STACK_TOP <= RESERVED_END && STACK_TOP.is_multiple_of(16));
/// How much the page tables map (identity, 2 MiB pages).
pub const MAPPED_END: u64 = 1 << 30;

pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;
/// GDT entries: null, code, data, TSS (two slots).
pub const GDT_ENTRIES: usize = 5;
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;
/// The TSS's size and limit (no I/O permission bitmap).
pub const TSS_SIZE: usize = 104;
pub const TSS_LIMIT: u32 = TSS_SIZE as u32 - 1;

/// 64-bit code: present, DPL 0, execute/read, accessed, L, G.
pub const GDT_CODE: u64 = 0x00AF_9B00_0000_FFFF;
/// Data: present, DPL 0, read/write, accessed, D/B, G.
pub const GDT_DATA: u64 = 0x00CF_9300_0000_FFFF;
/// VMCS access rights of CS, DS..GS and TR (the descriptor's bits 40..56,
/// as the VMCS guest access-rights fields want them).
pub const CODE_ACCESS_RIGHTS: u32 = 0xA09B;
pub const DATA_ACCESS_RIGHTS: u32 = 0xC093;
pub const TSS_ACCESS_RIGHTS: u32 = 0x008B;
/// Segment limits in the VMCS (byte granular, as the CPU expands them).
pub const FLAT_LIMIT: u32 = 0xFFFF_FFFF;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const INITIAL_CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
pub const INITIAL_CR4: u64 = CR4_PAE;
pub const INITIAL_EFER: u64 = EFER_LME | EFER_LMA;
pub const INITIAL_RFLAGS: u64 = 0x2;

/// Page-table entry bits.
pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITABLE: u64 = 1 << 1;
pub const PTE_HUGE: u64 = 1 << 7;

/// At most this many program headers are accepted.
pub const MAX_PROGRAM_HEADERS: u16 = 64;

/// The initial guest state for the VMCS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootState {
    pub rip: u64,
    pub rsp: u64,
    pub rdi: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub tss_base: u64,
    pub code_selector: u16,
    pub data_selector: u16,
    pub tss_selector: u16,
}

/// Why an image was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Shorter than the part of the ELF header it needs.
    Truncated,
    /// No ELF magic.
    NotElf,
    /// ELF class is not ELFCLASS64.
    Not64Bit,
    /// Not little-endian.
    NotLittleEndian,
    /// ELF version is not 1.
    BadVersion,
    /// Not `ET_EXEC` (a PIE or shared object is `ET_DYN`).
    NotExecutable { e_type: u16 },
    /// Not x86-64.
    WrongMachine { e_machine: u16 },
    /// Program headers smaller than ELF64's 56 bytes.
    BadProgramHeaderSize { size: u16 },
    /// More than [`MAX_PROGRAM_HEADERS`] program headers.
    TooManyProgramHeaders { count: u16 },
    /// The program header table lies (partly) outside the file.
    ProgramHeadersOutOfBounds,
    /// The image needs a dynamic loader (`PT_DYNAMIC` or `PT_INTERP`).
    Dynamic,
    /// A segment's file size exceeds its memory size.
    FileSizeExceedsMemSize { vaddr: u64, filesz: u64, memsz: u64 },
    /// A segment's file bytes lie (partly) outside the file.
    SegmentDataOutOfBounds { offset: u64, filesz: u64 },
    /// A segment lies (partly) outside `[RESERVED_END, mem_size)` (or
    /// beyond the mapped first GiB).
    SegmentOutsideMemory { vaddr: u64, size: u64 },
    /// Two segments overlap.
    SegmentsOverlap { first: u64, second: u64 },
    /// No `PT_LOAD` segment.
    NoLoadSegments,
    /// The entry point is not in an executable segment.
    EntryNotInCode { entry: u64 },
    /// The VM's memory cannot hold the protocol's area.
    MemoryTooSmall { mem_size: u64 },
    /// The `write` callback failed.
    WriteFailed { gpa: u64, len: u64 },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LoadError::Truncated => f.write_str("guest image is truncated: shorter than an ELF64 header"),
            LoadError::NotElf => f.write_str("guest image is not an ELF file (bad magic)"),
            LoadError::Not64Bit => f.write_str("guest image is not a 64-bit ELF (ELFCLASS64)"),
            LoadError::NotLittleEndian => f.write_str("guest image is not little-endian"),
            LoadError::BadVersion => f.write_str("guest image has an unknown ELF version"),
            LoadError::NotExecutable { e_type } => write!(
                f,
                "guest image is not a static executable (ELF type {e_type}, want ET_EXEC = 2; link it with --no-pie)"
            ),
            LoadError::WrongMachine { e_machine } => {
                write!(f, "guest image is not for x86-64 (ELF machine {e_machine}, want 62)")
            }
            LoadError::BadProgramHeaderSize { size } => {
                write!(f, "guest image program headers are {size} bytes, want at least 56")
            }
            LoadError::TooManyProgramHeaders { count } => {
                write!(f, "guest image has {count} program headers, at most {MAX_PROGRAM_HEADERS} are accepted")
            }
            LoadError::ProgramHeadersOutOfBounds => {
                f.write_str("guest image program header table lies outside the file")
            }
            LoadError::Dynamic => f.write_str("guest image needs a dynamic loader (PT_DYNAMIC or PT_INTERP)"),
            LoadError::FileSizeExceedsMemSize { vaddr, filesz, memsz } => write!(
                f,
                "guest segment at {vaddr:#x}: file size {filesz:#x} exceeds memory size {memsz:#x}"
            ),
            LoadError::SegmentDataOutOfBounds { offset, filesz } => write!(
                f,
                "guest segment data at file offset {offset:#x} (+{filesz:#x}) lies outside the file"
            ),
            LoadError::SegmentOutsideMemory { vaddr, size } => write!(
                f,
                "guest segment {vaddr:#x}+{size:#x} lies outside guest memory [{RESERVED_END:#x}, mem_size)"
            ),
            LoadError::SegmentsOverlap { first, second } => {
                write!(f, "guest segments at {first:#x} and {second:#x} overlap")
            }
            LoadError::NoLoadSegments => f.write_str("guest image has no PT_LOAD segment"),
            LoadError::EntryNotInCode { entry } => {
                write!(f, "guest entry point {entry:#x} is not inside an executable segment")
            }
            LoadError::MemoryTooSmall { mem_size } => write!(
                f,
                "guest memory of {mem_size:#x} bytes cannot hold the boot area (need more than {RESERVED_END:#x})"
            ),
            LoadError::WriteFailed { gpa, len } => {
                write!(f, "writing {len:#x} bytes of guest memory at {gpa:#x} failed")
            }
        }
    }
}

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: u16 = 56;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// One program header (the fields we use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub p_type: u32,
    pub flags: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// A checked ELF64 image: header fields and a bounds-checked program
/// header table.
#[derive(Clone, Copy, Debug)]
pub struct Image<'a> {
    bytes: &'a [u8],
    pub entry: u64,
    phoff: usize,
    phentsize: usize,
    phnum: usize,
}

impl<'a> Image<'a> {
    /// Checks the ELF header and that the program header table lies
    /// inside the file.
    pub fn parse(bytes: &'a [u8]) -> Result<Image<'a>, LoadError> {
        if bytes.len() < 4 {
            return Err(LoadError::Truncated);
        }
        if bytes[..4] != *b"\x7fELF" {
            return Err(LoadError::NotElf);
        }
        if bytes.len() < EHDR_SIZE {
            return Err(LoadError::Truncated);
        }
        if bytes[4] != 2 {
            return Err(LoadError::Not64Bit);
        }
        if bytes[5] != 1 {
            return Err(LoadError::NotLittleEndian);
        }
        if bytes[6] != 1 || u32_at(bytes, 20) != 1 {
            return Err(LoadError::BadVersion);
        }
        let e_type = u16_at(bytes, 16);
        if e_type != ET_EXEC {
            return Err(LoadError::NotExecutable { e_type });
        }
        let e_machine = u16_at(bytes, 18);
        if e_machine != EM_X86_64 {
            return Err(LoadError::WrongMachine { e_machine });
        }
        let entry = u64_at(bytes, 24);
        let phoff = u64_at(bytes, 32);
        let phentsize = u16_at(bytes, 54);
        let phnum = u16_at(bytes, 56);
        if phnum == 0 {
            return Err(LoadError::NoLoadSegments);
        }
        if phentsize < PHDR_SIZE {
            return Err(LoadError::BadProgramHeaderSize { size: phentsize });
        }
        if phnum > MAX_PROGRAM_HEADERS {
            return Err(LoadError::TooManyProgramHeaders { count: phnum });
        }
        let table = (phnum as u64) * (phentsize as u64); // at most 64 * 65535: no overflow
        match phoff.checked_add(table) {
            Some(end) if end <= bytes.len() as u64 => {}
            _ => return Err(LoadError::ProgramHeadersOutOfBounds),
        }
        Ok(Image {
            bytes,
            entry,
            phoff: phoff as usize,
            phentsize: phentsize as usize,
            phnum: phnum as usize,
        })
    }

    /// The program headers.
    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        (0..self.phnum).map(move |i| {
            let h = &self.bytes[self.phoff + i * self.phentsize..][..PHDR_SIZE as usize];
            Segment {
                p_type: u32_at(h, 0),
                flags: u32_at(h, 4),
                offset: u64_at(h, 8),
                vaddr: u64_at(h, 16),
                filesz: u64_at(h, 32),
                memsz: u64_at(h, 40),
            }
        })
    }

    /// The loadable segments with a non-zero memory size.
    pub fn loads(&self) -> impl Iterator<Item = Segment> + '_ {
        self.segments().filter(|s| s.p_type == PT_LOAD && s.memsz != 0)
    }

    /// The file bytes of a checked segment.
    fn data(&self, s: &Segment) -> &'a [u8] {
        &self.bytes[s.offset as usize..(s.offset + s.filesz) as usize]
    }

    /// Checks every segment against the file and the guest memory.
    pub fn check(&self, mem_size: u64) -> Result<(), LoadError> {
        let limit = mem_size.min(MAPPED_END);
        let mut any = false;
        for s in self.segments() {
            match s.p_type {
                PT_DYNAMIC | PT_INTERP => return Err(LoadError::Dynamic),
                PT_LOAD if s.memsz != 0 => {}
                _ => continue,
            }
            any = true;
            if s.filesz > s.memsz {
                return Err(LoadError::FileSizeExceedsMemSize { vaddr: s.vaddr, filesz: s.filesz, memsz: s.memsz });
            }
            match s.offset.checked_add(s.filesz) {
                Some(end) if end <= self.bytes.len() as u64 => {}
                _ => return Err(LoadError::SegmentDataOutOfBounds { offset: s.offset, filesz: s.filesz }),
            }
            let outside = LoadError::SegmentOutsideMemory { vaddr: s.vaddr, size: s.memsz };
            match s.vaddr.checked_add(s.memsz) {
                Some(end) if s.vaddr >= RESERVED_END && end <= limit => {}
                _ => return Err(outside),
            }
        }
        if !any {
            return Err(LoadError::NoLoadSegments);
        }
        // Pairwise overlap: at most MAX_PROGRAM_HEADERS^2 / 2 compares.
        for (i, a) in self.loads().enumerate() {
            for b in self.loads().skip(i + 1) {
                if a.vaddr < b.vaddr + b.memsz && b.vaddr < a.vaddr + a.memsz {
                    return Err(LoadError::SegmentsOverlap { first: a.vaddr, second: b.vaddr });
                }
            }
        }
        let entry = self.entry;
        if !self.loads().any(|s| s.flags & PF_X != 0 && s.vaddr <= entry && entry < s.vaddr + s.memsz) {
            return Err(LoadError::EntryNotInCode { entry });
        }
        Ok(())
    }
}

/// The 16-byte 64-bit TSS descriptor (`busy` selects type 0xB over 0x9).
pub fn tss_descriptor(base: u64, limit: u32, busy: bool) -> [u64; 2] {
    let ty: u64 = if busy { 0xB } else { 0x9 };
    let low = (limit as u64 & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | ty << 40
        | 1 << 47 // present
        | ((limit as u64 >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56;
    [low, base >> 32]
}

/// The GDT bytes: null, code, data, busy TSS at [`TSS_BASE`].
pub fn gdt_bytes() -> [u8; GDT_ENTRIES * 8] {
    let tss = tss_descriptor(TSS_BASE, TSS_LIMIT, true);
    let entries = [0, GDT_CODE, GDT_DATA, tss[0], tss[1]];
    let mut out = [0; GDT_ENTRIES * 8];
    for (chunk, e) in out.as_chunks_mut::<8>().0.iter_mut().zip(entries) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    out
}

/// The TSS bytes: all zero but the I/O map base, which points past the
/// limit (no I/O permission bitmap).
pub fn tss_bytes() -> [u8; TSS_SIZE] {
    let mut t = [0; TSS_SIZE];
    t[0x66..0x68].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    t
}

/// One 4 KiB page table with `entries` (the rest zero).
fn table_bytes(entries: impl Iterator<Item = u64>) -> [u8; 4096] {
    let mut t = [0; 4096];
    for (chunk, e) in t.as_chunks_mut::<8>().0.iter_mut().zip(entries) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    t
}

static ZEROS: [u8; 4096] = [0; 4096];

/// How [`load`] writes guest memory: (guest-physical address, bytes).
pub type WriteGuest<'a> = dyn FnMut(u64, &[u8]) -> Result<(), ()> + 'a;

/// Loads `elf` into a VM with `mem_size` bytes of memory through `write`
/// (guest-physical address, bytes) and builds the boot area; returns the
/// initial state, with RDI = `arg`.
///
/// Nothing is written unless the whole image checks out.
pub fn load(
    elf: &[u8],
    mem_size: u64,
    arg: u64,
    write: &mut WriteGuest,
) -> Result<BootState, LoadError> {
    if mem_size <= RESERVED_END {
        return Err(LoadError::MemoryTooSmall { mem_size });
    }
    let image = Image::parse(elf)?;
    image.check(mem_size)?;

    let mut put = |gpa: u64, bytes: &[u8]| {
        write(gpa, bytes).map_err(|()| LoadError::WriteFailed { gpa, len: bytes.len() as u64 })
    };
    for s in image.loads() {
        if s.filesz != 0 {
            put(s.vaddr, image.data(&s))?;
        }
        let mut gpa = s.vaddr + s.filesz;
        let end = s.vaddr + s.memsz;
        while gpa < end {
            let n = (end - gpa).min(ZEROS.len() as u64);
            put(gpa, &ZEROS[..n as usize])?;
            gpa += n;
        }
    }

    put(GDT_BASE, &gdt_bytes())?;
    put(TSS_BASE, &tss_bytes())?;
    let table = PTE_PRESENT | PTE_WRITABLE;
    put(PML4_BASE, &table_bytes(core::iter::once(PDPT_BASE | table)))?;
    put(PDPT_BASE, &table_bytes(core::iter::once(PD_BASE | table)))?;
    put(PD_BASE, &table_bytes((0..512u64).map(|i| (i << 21) | table | PTE_HUGE)))?;

    Ok(BootState {
        rip: image.entry,
        rsp: STACK_TOP,
        rdi: arg,
        cr0: INITIAL_CR0,
        cr3: PML4_BASE,
        cr4: INITIAL_CR4,
        efer: INITIAL_EFER,
        gdt_base: GDT_BASE,
        gdt_limit: GDT_LIMIT,
        tss_base: TSS_BASE,
        code_selector: CODE_SELECTOR,
        data_selector: DATA_SELECTOR,
        tss_selector: TSS_SELECTOR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    const MEM: u64 = 16 << 20;

    /// A program header for the test images.
    #[derive(Clone, Copy)]
    struct Ph {
        p_type: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn load_ph(flags: u32, offset: u64, vaddr: u64, filesz: u64, memsz: u64) -> Ph {
        Ph { p_type: PT_LOAD, flags, offset, vaddr, filesz, memsz }
    }

    /// An ELF64 x86-64 ET_EXEC with `phs` right after the header and
    /// `payload` after them (offsets in `phs` are absolute).
    fn elf(entry: u64, phs: &[Ph], payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        b[54..56].copy_from_slice(&PHDR_SIZE.to_le_bytes());
        b[56..58].copy_from_slice(&(phs.len() as u16).to_le_bytes());
        for p in phs {
            let mut h = [0u8; PHDR_SIZE as usize];
            h[0..4].copy_from_slice(&p.p_type.to_le_bytes());
            h[4..8].copy_from_slice(&p.flags.to_le_bytes());
            h[8..16].copy_from_slice(&p.offset.to_le_bytes());
            h[16..24].copy_from_slice(&p.vaddr.to_le_bytes());
            h[24..32].copy_from_slice(&p.vaddr.to_le_bytes());
            h[32..40].copy_from_slice(&p.filesz.to_le_bytes());
            h[40..48].copy_from_slice(&p.memsz.to_le_bytes());
            h[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
            b.extend_from_slice(&h);
        }
        b.extend_from_slice(payload);
        b
    }

    /// The layout the real guest has (see guest/linker.ld): text at
    /// 0x20_0000 (R+X), rodata (R), data+bss (RW) with a bss tail.
    fn guest_like() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let code: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let rodata: Vec<u8> = b"hello from the guest".to_vec();
        let data: Vec<u8> = vec![0xAB; 40];
        let base = EHDR_SIZE as u64 + 3 * PHDR_SIZE as u64;
        let phs = [
            load_ph(5, base, 0x20_0000, code.len() as u64, code.len() as u64),
            load_ph(4, base + 300, 0x20_1000, rodata.len() as u64, rodata.len() as u64),
            load_ph(6, base + 320, 0x20_2000, 40, 0x3000),
        ];
        let mut payload = code.clone();
        payload.extend_from_slice(&rodata);
        payload.extend_from_slice(&data);
        (elf(0x20_0010, &phs, &payload), code, rodata)
    }

    /// A flat guest memory that records writes.
    struct Mem {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl Mem {
        fn new(size: u64) -> Mem {
            // Poison so the test sees that bss is really zeroed.
            Mem { bytes: vec![0xEE; size as usize], writes: 0 }
        }
        fn writer(&mut self) -> impl FnMut(u64, &[u8]) -> Result<(), ()> + '_ {
            move |gpa: u64, data: &[u8]| {
                let end = gpa as usize + data.len();
                if end > self.bytes.len() {
                    return Err(());
                }
                self.bytes[gpa as usize..end].copy_from_slice(data);
                self.writes += 1;
                Ok(())
            }
        }
        fn u64(&self, gpa: u64) -> u64 {
            u64_at(&self.bytes, gpa as usize)
        }
        fn slice(&self, gpa: u64, len: usize) -> &[u8] {
            &self.bytes[gpa as usize..gpa as usize + len]
        }
    }

    fn try_load(elf: &[u8], mem_size: u64) -> Result<BootState, LoadError> {
        let mut mem = Mem::new(mem_size.min(MEM));
        let r = load(elf, mem_size, 0, &mut mem.writer());
        if r.is_err() {
            assert_eq!(mem.writes, 0, "nothing may be written for a refused image");
        }
        r
    }

    /// Walks the guest page tables in `mem` like the CPU would.
    fn translate(mem: &Mem, cr3: u64, va: u64) -> Option<u64> {
        let pml4e = mem.u64(cr3 + ((va >> 39) & 511) * 8);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = mem.u64((pml4e & 0x000F_FFFF_FFFF_F000) + ((va >> 30) & 511) * 8);
        if pdpte & PTE_PRESENT == 0 || pdpte & PTE_HUGE != 0 {
            return None;
        }
        let pde = mem.u64((pdpte & 0x000F_FFFF_FFFF_F000) + ((va >> 21) & 511) * 8);
        if pde & PTE_PRESENT == 0 || pde & PTE_HUGE == 0 || pde & PTE_WRITABLE == 0 {
            return None;
        }
        Some((pde & 0x000F_FFFF_FFE0_0000) + (va & 0x1F_FFFF))
    }

    #[test]
    fn loads_a_guest_like_image_and_builds_the_boot_area() {
        let (image, code, rodata) = guest_like();
        let mut mem = Mem::new(MEM);
        let st = load(&image, MEM, 0x105, &mut mem.writer()).unwrap();
        assert_eq!(
            st,
            BootState {
                rip: 0x20_0010,
                rsp: 0xFF000,
                rdi: 0x105,
                cr0: 0x8001_0033,
                cr3: 0x2000,
                cr4: 0x20,
                efer: 0x500,
                gdt_base: 0x1000,
                gdt_limit: 39,
                tss_base: 0x1800,
                code_selector: 0x08,
                data_selector: 0x10,
                tss_selector: 0x18,
            }
        );
        // Segments: file bytes, then zeros (bss) up to memsz.
        assert_eq!(mem.slice(0x20_0000, 300), &code[..]);
        assert_eq!(mem.slice(0x20_1000, rodata.len()), &rodata[..]);
        assert_eq!(mem.slice(0x20_2000, 40), &[0xAB; 40][..]);
        assert!(mem.slice(0x20_2000 + 40, 0x3000 - 40).iter().all(|&b| b == 0));
        assert_eq!(mem.bytes[0x20_5000], 0xEE, "nothing written past memsz");
        // GDT.
        assert_eq!(mem.u64(0x1000), 0);
        assert_eq!(mem.u64(0x1008), 0x00AF_9B00_0000_FFFF);
        assert_eq!(mem.u64(0x1010), 0x00CF_9300_0000_FFFF);
        // TSS descriptor: limit 0x67, base 0x1800, busy 64-bit TSS, present.
        assert_eq!(mem.u64(0x1018), 0x0000_8B00_1800_0067);
        assert_eq!(mem.u64(0x1020), 0);
        // The access rights the VMCS gets match the descriptors.
        assert_eq!((mem.u64(0x1008) >> 40) as u32 & 0xF0FF, CODE_ACCESS_RIGHTS);
        assert_eq!((mem.u64(0x1010) >> 40) as u32 & 0xF0FF, DATA_ACCESS_RIGHTS);
        assert_eq!((mem.u64(0x1018) >> 40) as u32 & 0xF0FF, TSS_ACCESS_RIGHTS);
        // TSS: zero, I/O map base = 104.
        assert!(mem.slice(0x1800, 0x66).iter().all(|&b| b == 0));
        assert_eq!(mem.slice(0x1866, 2), &[104, 0]);
        // Page tables.
        assert_eq!(mem.u64(0x2000), 0x3003);
        assert!((1..512).all(|i| mem.u64(0x2000 + i * 8) == 0));
        assert_eq!(mem.u64(0x3000), 0x4003);
        assert!((1..512).all(|i| mem.u64(0x3000 + i * 8) == 0));
        for i in 0..512u64 {
            assert_eq!(mem.u64(0x4000 + i * 8), (i << 21) | 0x83);
        }
        // Identity over the whole GiB, even beyond mem_size; nothing above.
        for va in [0u64, 0x1000, 0xFF000 - 8, 0x20_0010, MEM - 1, MEM, 0x3000_0000, (1 << 30) - 1] {
            assert_eq!(translate(&mem, st.cr3, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&mem, st.cr3, 1 << 30), None);
        // The protocol's pieces do not overlap each other or the stack.
        let areas = [
            (GDT_BASE, GDT_LIMIT as u64 + 1),
            (TSS_BASE, TSS_SIZE as u64),
            (PML4_BASE, 4096),
            (PDPT_BASE, 4096),
            (PD_BASE, 4096),
        ];
        for (i, a) in areas.iter().enumerate() {
            // Below the stack's page, which is itself below RESERVED_END.
            assert!(a.0 + a.1 <= STACK_TOP - 0x1000);
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0);
            }
        }
    }

    #[test]
    fn control_register_values() {
        assert_eq!(INITIAL_CR0, 0x8001_0033);
        assert_eq!(INITIAL_CR4, 0x20);
        assert_eq!(INITIAL_EFER, 0x500);
        assert_eq!(tss_descriptor(0x1234_5678_9ABC_DEF0, 0x6_0067, false), [0x9A06_89BC_DEF0_0067, 0x1234_5678]);
    }

    #[test]
    fn loads_segment_at_the_top_of_memory() {
        let phs = [load_ph(5, 120, MEM - 0x1000, 4, 0x1000)];
        let image = elf(MEM - 0x1000, &phs, &[0x90; 4]);
        assert!(try_load(&image, MEM).is_ok());
        assert!(matches!(try_load(&image, MEM - 1), Err(LoadError::SegmentOutsideMemory { .. })));
    }

    #[test]
    fn write_failure_is_an_error() {
        let (image, _, _) = guest_like();
        let mut calls = 0;
        let r = load(&image, MEM, 0, &mut |_, _| {
            calls += 1;
            if calls == 3 { Err(()) } else { Ok(()) }
        });
        assert!(matches!(r, Err(LoadError::WriteFailed { .. })), "{r:?}");
    }

    fn with(mut image: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
        image[at..at + bytes.len()].copy_from_slice(bytes);
        image
    }

    #[test]
    fn truncated_header() {
        let (image, _, _) = guest_like();
        assert_eq!(try_load(&[], MEM), Err(LoadError::Truncated));
        assert_eq!(try_load(&image[..3], MEM), Err(LoadError::Truncated));
        for n in [4, 16, 63] {
            assert_eq!(try_load(&image[..n], MEM), Err(LoadError::Truncated), "{n}");
        }
    }

    #[test]
    fn wrong_magic_class_endianness_version() {
        let (image, _, _) = guest_like();
        assert_eq!(try_load(&with(image.clone(), 0, b"\x7fELG"), MEM), Err(LoadError::NotElf));
        assert_eq!(try_load(&[0u8; 200], MEM), Err(LoadError::NotElf));
        assert_eq!(try_load(&with(image.clone(), 4, &[1]), MEM), Err(LoadError::Not64Bit));
        assert_eq!(try_load(&with(image.clone(), 5, &[2]), MEM), Err(LoadError::NotLittleEndian));
        assert_eq!(try_load(&with(image.clone(), 6, &[0]), MEM), Err(LoadError::BadVersion));
        assert_eq!(try_load(&with(image, 20, &[2]), MEM), Err(LoadError::BadVersion));
    }

    #[test]
    fn wrong_type_and_machine() {
        let (image, _, _) = guest_like();
        assert_eq!(try_load(&with(image.clone(), 16, &[3, 0]), MEM), Err(LoadError::NotExecutable { e_type: 3 }));
        assert_eq!(try_load(&with(image.clone(), 18, &[3, 0]), MEM), Err(LoadError::WrongMachine { e_machine: 3 }));
        assert_eq!(try_load(&with(image, 18, &[0xB7, 0]), MEM), Err(LoadError::WrongMachine { e_machine: 183 }));
    }

    #[test]
    fn program_header_table_out_of_bounds() {
        let (image, _, _) = guest_like();
        let len = image.len() as u64;
        assert_eq!(try_load(&with(image.clone(), 32, &len.to_le_bytes()), MEM), Err(LoadError::ProgramHeadersOutOfBounds));
        assert_eq!(
            try_load(&with(image.clone(), 32, &u64::MAX.to_le_bytes()), MEM),
            Err(LoadError::ProgramHeadersOutOfBounds)
        );
        assert_eq!(
            try_load(&with(image.clone(), 32, &(len - 100).to_le_bytes()), MEM),
            Err(LoadError::ProgramHeadersOutOfBounds)
        );
        // The header alone, with program headers promised after it.
        assert_eq!(try_load(&image[..EHDR_SIZE + 10], MEM), Err(LoadError::ProgramHeadersOutOfBounds));
        assert_eq!(try_load(&with(image.clone(), 56, &[40, 0]), MEM), Err(LoadError::ProgramHeadersOutOfBounds));
        assert_eq!(try_load(&with(image.clone(), 56, &[65, 0]), MEM), Err(LoadError::TooManyProgramHeaders { count: 65 }));
        assert_eq!(try_load(&with(image.clone(), 54, &[32, 0]), MEM), Err(LoadError::BadProgramHeaderSize { size: 32 }));
        assert_eq!(try_load(&with(image, 56, &[0, 0]), MEM), Err(LoadError::NoLoadSegments));
    }

    #[test]
    fn segment_file_range_out_of_bounds() {
        let len = EHDR_SIZE as u64 + PHDR_SIZE as u64 + 16;
        for (offset, filesz) in [(len - 8, 16), (len + 1, 1), (u64::MAX, 2), (8, u64::MAX - 4)] {
            let image = elf(0x20_0000, &[load_ph(5, offset, 0x20_0000, filesz, filesz.max(0x1000))], &[0; 16]);
            assert_eq!(
                try_load(&image, MEM),
                Err(LoadError::SegmentDataOutOfBounds { offset, filesz }),
                "{offset:#x}+{filesz:#x}"
            );
        }
    }

    #[test]
    fn filesz_larger_than_memsz() {
        let image = elf(0x20_0000, &[load_ph(5, 120, 0x20_0000, 16, 8)], &[0; 16]);
        assert_eq!(
            try_load(&image, MEM),
            Err(LoadError::FileSizeExceedsMemSize { vaddr: 0x20_0000, filesz: 16, memsz: 8 })
        );
    }

    #[test]
    fn segments_outside_memory() {
        for (vaddr, memsz) in [
            (0, 0x1000),                   // the protocol area
            (0x1000, 0x100),               // the GDT
            (0x2000, 0x1000),              // the page tables
            (0xF_F000, 0x2000),            // straddles the reserved end
            (MEM - 0x800, 0x1000),         // past the end of memory
            (MEM, 0x1000),                 // at the end
            (u64::MAX - 0xFFF, 0x2000),    // wraps
            (0x20_0000, u64::MAX),         // wraps
        ] {
            let image = elf(vaddr, &[load_ph(5, 120, vaddr, 0, memsz)], &[]);
            assert_eq!(
                try_load(&image, MEM),
                Err(LoadError::SegmentOutsideMemory { vaddr, size: memsz }),
                "{vaddr:#x}+{memsz:#x}"
            );
        }
        // Beyond the mapped GiB even when memory is larger.
        let image = elf(1 << 30, &[load_ph(5, 120, 1 << 30, 0, 0x1000)], &[]);
        assert!(matches!(try_load(&image, 2 << 30), Err(LoadError::SegmentOutsideMemory { .. })));
    }

    #[test]
    fn memory_too_small() {
        let (image, _, _) = guest_like();
        assert_eq!(try_load(&image, 0), Err(LoadError::MemoryTooSmall { mem_size: 0 }));
        assert_eq!(try_load(&image, RESERVED_END), Err(LoadError::MemoryTooSmall { mem_size: RESERVED_END }));
    }

    #[test]
    fn overlapping_segments() {
        let phs = [load_ph(5, 120, 0x20_0000, 0, 0x2000), load_ph(6, 120, 0x20_1000, 0, 0x1000)];
        let image = elf(0x20_0000, &phs, &[]);
        assert_eq!(try_load(&image, MEM), Err(LoadError::SegmentsOverlap { first: 0x20_0000, second: 0x20_1000 }));
    }

    #[test]
    fn entry_must_be_in_an_executable_segment() {
        let phs = [load_ph(5, 120, 0x20_0000, 0, 0x1000), load_ph(6, 120, 0x20_1000, 0, 0x1000)];
        for entry in [0, 0x1F_FFFF, 0x20_1000, 0x20_1800, 0x20_2000] {
            assert_eq!(try_load(&elf(entry, &phs, &[]), MEM), Err(LoadError::EntryNotInCode { entry }));
        }
        assert!(try_load(&elf(0x20_0FFF, &phs, &[]), MEM).is_ok());
    }

    #[test]
    fn dynamic_images_and_no_segments() {
        let dynamic = Ph { p_type: PT_DYNAMIC, flags: 6, offset: 0, vaddr: 0, filesz: 0, memsz: 0 };
        let interp = Ph { p_type: PT_INTERP, ..dynamic };
        let code = load_ph(5, 120, 0x20_0000, 0, 0x1000);
        assert_eq!(try_load(&elf(0x20_0000, &[code, dynamic], &[]), MEM), Err(LoadError::Dynamic));
        assert_eq!(try_load(&elf(0x20_0000, &[interp, code], &[]), MEM), Err(LoadError::Dynamic));
        // GNU_STACK and empty loads are ignored, but something must load.
        let stack = Ph { p_type: 0x6474_e551, ..dynamic };
        let empty = load_ph(5, 0, 0, 0, 0);
        assert_eq!(try_load(&elf(0x20_0000, &[stack, empty], &[]), MEM), Err(LoadError::NoLoadSegments));
        assert!(try_load(&elf(0x20_0000, &[stack, empty, code], &[]), MEM).is_ok());
    }

    #[test]
    fn errors_name_the_problem() {
        let msgs = [
            (LoadError::Truncated, "truncated"),
            (LoadError::NotElf, "not an ELF"),
            (LoadError::Not64Bit, "64-bit"),
            (LoadError::NotExecutable { e_type: 3 }, "--no-pie"),
            (LoadError::WrongMachine { e_machine: 3 }, "x86-64"),
            (LoadError::ProgramHeadersOutOfBounds, "program header"),
            (LoadError::SegmentOutsideMemory { vaddr: 0x1000, size: 0x20 }, "0x1000+0x20"),
            (LoadError::FileSizeExceedsMemSize { vaddr: 1, filesz: 2, memsz: 1 }, "file size"),
            (LoadError::SegmentDataOutOfBounds { offset: 9, filesz: 1 }, "outside the file"),
            (LoadError::WriteFailed { gpa: 0x1000, len: 8 }, "0x1000"),
        ];
        for (e, want) in msgs {
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), mem in any::<u64>()) {
            let mut sink = |_: u64, _: &[u8]| Ok(());
            let _ = load(&bytes, mem, 0, &mut sink);
        }

        /// A valid header with random program headers and sizes.
        #[test]
        fn random_program_headers_never_panic(
            raw in proptest::collection::vec(
                (0u32..4, any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()), 0..6),
            small in proptest::collection::vec((0u64..400, 0x10_0000u64..0x30_0000, 0u64..0x3000, 0u64..0x3000), 0..4),
            entry in 0x10_0000u64..0x30_0000,
            mem in 0u64..(64 << 20),
        ) {
            let mut phs: Vec<Ph> = raw.into_iter()
                .map(|(t, flags, offset, vaddr, filesz, memsz)| Ph { p_type: t, flags, offset, vaddr, filesz, memsz })
                .collect();
            phs.extend(small.into_iter().map(|(o, v, f, m)| load_ph(5, o, v, f, m)));
            let image = elf(entry, &phs, &[0x5A; 256]);
            let mut written = 0u64;
            let mut sink = |gpa: u64, b: &[u8]| {
                // Only inside memory, never in the reserved area but the protocol's own writes.
                assert!(gpa + b.len() as u64 <= mem.max(RESERVED_END));
                written += b.len() as u64;
                Ok(())
            };
            if let Ok(st) = load(&image, mem, 7, &mut sink) {
                prop_assert_eq!(st.rip, entry);
                prop_assert_eq!(st.rdi, 7);
            }
        }

        /// Flipping any byte of a valid image never panics.
        #[test]
        fn mutated_image_never_panics(at in 0usize..400, value in any::<u8>(), cut in 0usize..500) {
            let (mut image, _, _) = guest_like();
            let at = at % image.len();
            image[at] = value;
            image.truncate(cut.max(1).min(image.len()));
            let mut sink = |_: u64, _: &[u8]| Ok(());
            let _ = load(&image, MEM, 0, &mut sink);
        }
    }
}

//! Decode of the instruction behind an MMIO exit (an EPT violation on
//! an emulated page such as the xAPIC's at 0xFEE00000), and the register
//! side of its emulation.
//!
//! The exit gives the guest-physical address and whether it was a read
//! or a write; the instruction says how wide the access is and which
//! register (or immediate) it moves. [`decode`] uses iced-x86 and accepts
//! only the plain moves a driver uses for device registers:
//!
//! | opcode (SDM Vol. 2)      | form                     | [`MmioOp`]            |
//! |--------------------------|--------------------------|-----------------------|
//! | 88, 89                   | MOV r/m, r               | `Write` from register |
//! | 8A, 8B                   | MOV r, r/m               | `Read`, no extension  |
//! | A0-A3                    | MOV AL/AX/EAX/RAX, moffs | `Read` / `Write`      |
//! | C6 /0, C7 /0             | MOV r/m, imm             | `Write` of immediate  |
//! | 0F B6, 0F B7             | MOVZX r, r/m8 / r/m16    | `Read`, zero-extended |
//! | 0F BE, 0F BF, 63 (REX.W) | MOVSX, MOVSXD            | `Read`, sign-extended |
//!
//! Everything else is [`DecodeError::Unsupported`] with the mnemonic,
//! so that the kernel can stop the VM naming the instruction.
//!
//! Register writes follow SDM Vol. 1, 3.4.1.1: a 32-bit destination is
//! zero-extended to 64 bits (we do so in every mode; outside 64-bit mode
//! the upper half is undefined for the guest anyway), 8- and 16-bit
//! destinations merge into the register, and AH/CH/DH/BH (without REX)
//! are bits 15:8 of RAX/RCX/RDX/RBX.

use core::fmt;
pub use iced_x86::Mnemonic;
use iced_x86::{Decoder, DecoderError, DecoderOptions, OpKind, Register};

/// The guest's general registers, numbered in Intel encoding order:
/// 0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8..15 R8..R15.
pub trait Gprs {
    fn gpr(&self, n: u8) -> u64;
    fn set_gpr(&mut self, n: u8, v: u64);
}

/// A register operand: which register and which part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegSlot {
    /// 0..15, Intel encoding order (see [`Gprs`]).
    pub num: u8,
    /// The operand's width in bytes: 1, 2, 4 or 8.
    pub width: u8,
    /// AH, CH, DH or BH: bits 15:8 of register `num` (0..3).
    pub high_byte: bool,
}

/// How a value read into a wider register is extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// Zero-extended to the destination's width (MOV, MOVZX).
    Zero,
    /// Sign-extended to the destination's width (MOVSX, MOVSXD).
    Sign,
}

/// What a write stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Reg(RegSlot),
    /// The immediate, as the CPU extends it to the operand size.
    Imm(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Reads `size` bytes (1, 2, 4, 8) into `dest`, extended by `extend`
    /// up to `dest.width`.
    Read { size: u8, dest: RegSlot, extend: Extend },
    /// Writes `size` bytes (1, 2, 4, 8) from `src`.
    Write { size: u8, src: Source },
}

/// A decoded MMIO instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioInsn {
    /// Its length in bytes: RIP advances by this much.
    pub len: usize,
    pub op: MmioOp,
}

/// Why no MMIO access could be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// `bitness` is not 16, 32 or 64.
    BadBitness(u32),
    /// The bytes end before the instruction does.
    Truncated,
    /// The bytes are no valid instruction (in this mode).
    Invalid,
    /// A valid instruction that is not one of the supported moves (or a
    /// move in an unsupported form, e.g. with a segment register).
    Unsupported(Mnemonic),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::BadBitness(b) => write!(f, "mmio: cannot decode in {b}-bit mode"),
            DecodeError::Truncated => f.write_str("mmio: instruction bytes end before the instruction"),
            DecodeError::Invalid => f.write_str("mmio: invalid instruction"),
            DecodeError::Unsupported(m) => {
                // iced's Debug name ("Add", "Movsd"), lower-cased.
                f.write_str("mmio: instruction not emulated: ")?;
                fmt::Write::write_fmt(&mut Lower(f), format_args!("{m:?}"))
            }
        }
    }
}

/// Writes through to a formatter in lower case.
struct Lower<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for Lower<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.chars().try_for_each(|c| self.0.write_char(c.to_ascii_lowercase()))
    }
}

/// Decodes the instruction at the start of `bytes` (up to 15 are used)
/// for a CPU in `bitness`-bit mode (16, 32 or 64: CS.L / CS.D).
pub fn decode(bytes: &[u8], bitness: u32) -> Result<MmioInsn, DecodeError> {
    if !matches!(bitness, 16 | 32 | 64) {
        return Err(DecodeError::BadBitness(bitness));
    }
    let mut decoder = Decoder::new(bitness, bytes, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(match decoder.last_error() {
            DecoderError::NoMoreBytes => DecodeError::Truncated,
            _ => DecodeError::Invalid,
        });
    }
    let unsupported = DecodeError::Unsupported(insn.mnemonic());
    if insn.op_count() != 2 {
        return Err(unsupported);
    }
    let size = insn.memory_size().size();
    if !matches!(size, 1 | 2 | 4 | 8) {
        return Err(unsupported);
    }
    let size = size as u8;
    let (k0, k1) = (insn.op_kind(0), insn.op_kind(1));
    let op = match insn.mnemonic() {
        Mnemonic::Mov if k0 == OpKind::Memory => match k1 {
            OpKind::Register => MmioOp::Write { size, src: Source::Reg(slot(insn.op1_register()).ok_or(unsupported)?) },
            OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate32to64 => {
                MmioOp::Write { size, src: Source::Imm(insn.immediate(1) & mask(size)) }
            }
            _ => return Err(unsupported),
        },
        Mnemonic::Mov | Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd
            if k0 == OpKind::Register && k1 == OpKind::Memory =>
        {
            let dest = slot(insn.op0_register()).ok_or(unsupported)?;
            let extend =
                if matches!(insn.mnemonic(), Mnemonic::Movsx | Mnemonic::Movsxd) { Extend::Sign } else { Extend::Zero };
            MmioOp::Read { size, dest, extend }
        }
        _ => return Err(unsupported),
    };
    Ok(MmioInsn { len: insn.len(), op })
}

/// A general register operand, or None for any other register.
fn slot(r: Register) -> Option<RegSlot> {
    if !r.is_gpr() {
        return None;
    }
    let high_byte = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    Some(RegSlot { num: r.full_register().number() as u8, width: r.size() as u8, high_byte })
}

fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Completes a read: puts `value` (the device's `size` bytes; higher
/// bits are ignored) into the destination register. Does nothing for a
/// write.
pub fn complete_read(regs: &mut dyn Gprs, insn: &MmioInsn, value: u64) {
    let MmioOp::Read { size, dest, extend } = insn.op else {
        return;
    };
    let mut v = value & mask(size);
    // (A size of 8 needs no extension; other sizes only come from
    // hand-made instructions and are not extended.)
    if extend == Extend::Sign && matches!(size, 1 | 2 | 4) {
        let shift = 64 - 8 * size as u32;
        v = ((v << shift) as i64 >> shift) as u64;
    }
    write_slot(regs, dest, v);
}

/// Stores `v` into a register operand (SDM Vol. 1, 3.4.1.1).
fn write_slot(regs: &mut dyn Gprs, dest: RegSlot, v: u64) {
    let old = regs.gpr(dest.num);
    let new = match (dest.width, dest.high_byte) {
        (1, true) => (old & !0xFF00) | (v & 0xFF) << 8,
        (1, false) => (old & !0xFF) | (v & 0xFF),
        (2, _) => (old & !0xFFFF) | (v & 0xFFFF),
        (4, _) => v & 0xFFFF_FFFF,
        _ => v,
    };
    regs.set_gpr(dest.num, new);
}

/// The value a write stores (its low `size` bytes; the rest zero); 0 for
/// a read.
pub fn write_value(regs: &dyn Gprs, insn: &MmioInsn) -> u64 {
    match insn.op {
        MmioOp::Write { size, src: Source::Imm(v) } => v & mask(size),
        MmioOp::Write { size, src: Source::Reg(r) } => {
            let v = regs.gpr(r.num) >> if r.high_byte { 8 } else { 0 };
            v & mask(size)
        }
        MmioOp::Read { .. } => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    struct Regs([u64; 16]);

    impl Gprs for Regs {
        fn gpr(&self, n: u8) -> u64 {
            self.0[n as usize]
        }
        fn set_gpr(&mut self, n: u8, v: u64) {
            self.0[n as usize] = v;
        }
    }

    fn reg(num: u8, width: u8) -> RegSlot {
        RegSlot { num, width, high_byte: false }
    }
    fn high(num: u8) -> RegSlot {
        RegSlot { num, width: 1, high_byte: true }
    }
    fn read(len: usize, size: u8, dest: RegSlot, extend: Extend) -> Result<MmioInsn, DecodeError> {
        Ok(MmioInsn { len, op: MmioOp::Read { size, dest, extend } })
    }
    fn write_reg(len: usize, size: u8, src: RegSlot) -> Result<MmioInsn, DecodeError> {
        Ok(MmioInsn { len, op: MmioOp::Write { size, src: Source::Reg(src) } })
    }
    fn write_imm(len: usize, size: u8, v: u64) -> Result<MmioInsn, DecodeError> {
        Ok(MmioInsn { len, op: MmioOp::Write { size, src: Source::Imm(v) } })
    }
    use super::Extend::{Sign, Zero};

    #[test]
    fn kvm_unit_tests_xapic_accessors() {
        // objdump -d x86/apic.elf: xapic_read / xapic_write.
        assert_eq!(decode(&[0x8b, 0x07, 0xc3], 64), read(2, 4, reg(0, 4), Zero)); // mov (%rdi),%eax
        assert_eq!(decode(&[0x89, 0x37, 0xc3], 64), write_reg(2, 4, reg(6, 4)));
        // mov %esi,(%rdi)
    }

    #[test]
    fn moves_in_64_bit_mode() {
        let d = |b: &[u8]| decode(b, 64);
        // REX.R selects r8d; REX.B only the base (the register stays eax).
        assert_eq!(d(&[0x44, 0x8b, 0x07]), read(3, 4, reg(8, 4), Zero));
        assert_eq!(d(&[0x41, 0x89, 0x00]), write_reg(3, 4, reg(0, 4)));
        // mov [r12], r9d: REX.RB, SIB.
        assert_eq!(d(&[0x45, 0x89, 0x0c, 0x24]), write_reg(4, 4, reg(9, 4)));
        // mov r15, [rbx]: REX.WR.
        assert_eq!(d(&[0x4c, 0x8b, 0x3b]), read(3, 8, reg(15, 8), Zero));
        assert_eq!(d(&[0x48, 0x8b, 0x03]), read(3, 8, reg(0, 8), Zero));
        // 16-bit operand size.
        assert_eq!(d(&[0x66, 0x8b, 0x0b]), read(3, 2, reg(1, 2), Zero));
        assert_eq!(d(&[0x66, 0x89, 0x07]), write_reg(3, 2, reg(0, 2)));
        // High bytes without REX, the new byte registers with it.
        assert_eq!(d(&[0x8a, 0x27]), read(2, 1, high(0), Zero)); // mov ah,[rdi]
        assert_eq!(d(&[0x8a, 0x37]), read(2, 1, high(2), Zero)); // mov dh,[rdi]
        assert_eq!(d(&[0x40, 0x8a, 0x37]), read(3, 1, reg(6, 1), Zero)); // mov sil,[rdi]
        assert_eq!(d(&[0x88, 0x3f]), write_reg(2, 1, high(3))); // mov [rdi],bh
        assert_eq!(d(&[0x40, 0x88, 0x3f]), write_reg(3, 1, reg(7, 1))); // mov [rdi],dil
        assert_eq!(d(&[0x44, 0x88, 0x3f]), write_reg(3, 1, reg(15, 1))); // mov [rdi],r15b
                                                                         // Displacements, RIP-relative, a segment override.
        assert_eq!(d(&[0x8b, 0x87, 0x20, 0x03, 0x00, 0x00]), read(6, 4, reg(0, 4), Zero));
        assert_eq!(d(&[0x8b, 0x05, 0xf0, 0x0e, 0x00, 0x00]), read(6, 4, reg(0, 4), Zero));
        assert_eq!(d(&[0x64, 0x8b, 0x07]), read(3, 4, reg(0, 4), Zero));
        // Immediates, extended to the operand size.
        assert_eq!(d(&[0xc7, 0x07, 0x78, 0x56, 0x34, 0x12]), write_imm(6, 4, 0x1234_5678));
        assert_eq!(d(&[0x48, 0xc7, 0x07, 0xff, 0xff, 0xff, 0xff]), write_imm(7, 8, u64::MAX));
        assert_eq!(d(&[0x48, 0xc7, 0x07, 0x00, 0x00, 0x00, 0x80]), write_imm(7, 8, 0xFFFF_FFFF_8000_0000));
        assert_eq!(d(&[0xc6, 0x07, 0x80]), write_imm(3, 1, 0x80));
        assert_eq!(d(&[0x66, 0xc7, 0x07, 0x34, 0x12]), write_imm(5, 2, 0x1234));
        assert_eq!(d(&[0xc7, 0x87, 0xb0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]), write_imm(10, 4, 0));
        // MOVZX / MOVSX / MOVSXD.
        assert_eq!(d(&[0x0f, 0xb6, 0x07]), read(3, 1, reg(0, 4), Zero));
        assert_eq!(d(&[0x0f, 0xb7, 0x07]), read(3, 2, reg(0, 4), Zero));
        assert_eq!(d(&[0x48, 0x0f, 0xb7, 0x07]), read(4, 2, reg(0, 8), Zero));
        assert_eq!(d(&[0x48, 0x0f, 0xbe, 0x07]), read(4, 1, reg(0, 8), Sign));
        assert_eq!(d(&[0x66, 0x0f, 0xbe, 0x07]), read(4, 1, reg(0, 2), Sign));
        assert_eq!(d(&[0x0f, 0xbf, 0x0f]), read(3, 2, reg(1, 4), Sign));
        assert_eq!(d(&[0x48, 0x63, 0x07]), read(3, 4, reg(0, 8), Sign));
        // moffs forms: a 64-bit address.
        let moffs = [0x00, 0x03, 0xe0, 0xfe, 0, 0, 0, 0];
        let with = |op: &[u8]| {
            let mut b = op.to_vec();
            b.extend_from_slice(&moffs);
            decode(&b, 64)
        };
        assert_eq!(with(&[0xa1]), read(9, 4, reg(0, 4), Zero));
        assert_eq!(with(&[0xa0]), read(9, 1, reg(0, 1), Zero));
        assert_eq!(with(&[0xa3]), write_reg(9, 4, reg(0, 4)));
        assert_eq!(with(&[0x48, 0xa3]), write_reg(10, 8, reg(0, 8)));
        assert_eq!(with(&[0x66, 0xa2]), write_reg(10, 1, reg(0, 1)));
        // Trailing bytes do not count.
        assert_eq!(
            d(&[0x8b, 0x07, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
                .map(|i| i.len),
            Ok(2)
        );
    }

    #[test]
    fn moves_in_32_and_16_bit_mode() {
        assert_eq!(decode(&[0x8b, 0x07], 32), read(2, 4, reg(0, 4), Zero));
        assert_eq!(decode(&[0x66, 0x89, 0x07], 32), write_reg(3, 2, reg(0, 2)));
        assert_eq!(decode(&[0x8a, 0x27], 32), read(2, 1, high(0), Zero));
        assert_eq!(decode(&[0xa1, 0x20, 0x03, 0xe0, 0xfe], 32), read(5, 4, reg(0, 4), Zero));
        let b = [0xc7, 0x05, 0x80, 0x00, 0xe0, 0xfe, 0x01, 0x00, 0x00, 0x00];
        assert_eq!(decode(&b, 32), write_imm(10, 4, 1));
        // 0x48 is DEC EAX outside 64-bit mode, not REX.W.
        assert_eq!(decode(&[0x48, 0x8b, 0x07], 32), Err(DecodeError::Unsupported(Mnemonic::Dec)));
        assert_eq!(decode(&[0x40, 0x8a, 0x37], 32), Err(DecodeError::Unsupported(Mnemonic::Inc)));
        // Address-size prefix: [bx], the operand stays 32 bits.
        assert_eq!(decode(&[0x67, 0x8b, 0x07], 32), read(3, 4, reg(0, 4), Zero));
        assert_eq!(decode(&[0x0f, 0xbe, 0x07], 32), read(3, 1, reg(0, 4), Sign));
        // 16-bit mode: 16-bit operands unless 0x66.
        assert_eq!(decode(&[0x8b, 0x07], 16), read(2, 2, reg(0, 2), Zero));
        assert_eq!(decode(&[0x66, 0x8b, 0x07], 16), read(3, 4, reg(0, 4), Zero));
        assert_eq!(decode(&[0xa1, 0x20, 0x03], 16), read(3, 2, reg(0, 2), Zero));
    }

    #[test]
    fn refusals() {
        use DecodeError::*;
        let d = |b: &[u8]| decode(b, 64);
        assert_eq!(d(&[0x01, 0x08]), Err(Unsupported(Mnemonic::Add))); // add [rax],ecx
        assert_eq!(d(&[0xa5]), Err(Unsupported(Mnemonic::Movsd))); // movs dword
        assert_eq!(d(&[0xf3, 0xa4]), Err(Unsupported(Mnemonic::Movsb))); // rep movsb
        assert_eq!(d(&[0x87, 0x07]), Err(Unsupported(Mnemonic::Xchg)));
        assert_eq!(d(&[0x8c, 0x18]), Err(Unsupported(Mnemonic::Mov))); // mov [rax],ds
        assert_eq!(d(&[0x8e, 0x18]), Err(Unsupported(Mnemonic::Mov))); // mov ds,[rax]
        assert_eq!(d(&[0x89, 0xc8]), Err(Unsupported(Mnemonic::Mov))); // mov eax,ecx
        assert_eq!(d(&[0xb8, 0, 0, 0, 0]), Err(Unsupported(Mnemonic::Mov))); // mov eax,imm
        assert_eq!(d(&[0x0f, 0xb6, 0xc1]), Err(Unsupported(Mnemonic::Movzx))); // movzx eax,cl
        assert_eq!(d(&[0x0f, 0x10, 0x07]), Err(Unsupported(Mnemonic::Movups)));
        assert_eq!(d(&[0x0f, 0x0b]), Err(Unsupported(Mnemonic::Ud2)));
        assert_eq!(d(&[0xff, 0x07]), Err(Unsupported(Mnemonic::Inc)));
        // Too short.
        assert_eq!(d(&[]), Err(Truncated));
        assert_eq!(d(&[0x8b]), Err(Truncated));
        assert_eq!(d(&[0xc7, 0x07, 0x78, 0x56]), Err(Truncated));
        assert_eq!(d(&[0xa1, 0, 0, 0, 0]), Err(Truncated)); // moffs is 8 bytes here
        assert_eq!(d(&[0x66]), Err(Truncated));
        // Invalid: LOCK on MOV, PUSH ES in 64-bit mode.
        assert_eq!(d(&[0xf0, 0x8b, 0x07]), Err(Invalid));
        assert_eq!(d(&[0x06, 0x90]), Err(Invalid));
        assert_eq!(decode(&[0x06], 32), Err(Unsupported(Mnemonic::Push)));
        for b in [0, 8, 63, 128] {
            assert_eq!(decode(&[0x8b, 0x07], b), Err(BadBitness(b)));
        }
    }

    #[test]
    fn errors_name_the_instruction() {
        assert_eq!(format!("{}", DecodeError::Unsupported(Mnemonic::Add)), "mmio: instruction not emulated: add");
        assert_eq!(format!("{}", DecodeError::Unsupported(Mnemonic::Movsd)), "mmio: instruction not emulated: movsd");
        assert!(format!("{}", DecodeError::Truncated).contains("end"));
    }

    fn read_into(bytes: &[u8], bitness: u32, regs: &mut Regs, value: u64) {
        let insn = decode(bytes, bitness).unwrap();
        complete_read(regs, &insn, value);
    }

    #[test]
    fn completing_reads_extends_and_merges() {
        let mut r = Regs([0xFFFF_FFFF_FFFF_FFFF; 16]);
        // 32-bit destination: zero-extended; device bits above the size ignored.
        read_into(&[0x8b, 0x07], 64, &mut r, 0x1_2345_6789);
        assert_eq!(r.0[0], 0x2345_6789);
        read_into(&[0x8b, 0x07], 32, &mut r, 0xDEAD_BEEF);
        assert_eq!(r.0[0], 0xDEAD_BEEF);
        // 64-bit.
        read_into(&[0x4c, 0x8b, 0x3b], 64, &mut r, 0x0123_4567_89AB_CDEF);
        assert_eq!(r.0[15], 0x0123_4567_89AB_CDEF);
        // 16-bit: merged.
        r.0[1] = 0x1111_2222_3333_4444;
        read_into(&[0x66, 0x8b, 0x0b], 64, &mut r, 0xFFFF_BEEF);
        assert_eq!(r.0[1], 0x1111_2222_3333_BEEF);
        // AH and SIL: merged at their byte.
        r.0[0] = 0x1122_3344_5566_7788;
        read_into(&[0x8a, 0x27], 64, &mut r, 0x1AB);
        assert_eq!(r.0[0], 0x1122_3344_5566_AB88);
        r.0[6] = 0x1122_3344_5566_7788;
        read_into(&[0x40, 0x8a, 0x37], 64, &mut r, 0xCD);
        assert_eq!(r.0[6], 0x1122_3344_5566_77CD);
        // REX.R: r8d, nothing else changes.
        let before = r.0;
        read_into(&[0x44, 0x8b, 0x07], 64, &mut r, 0x42);
        assert_eq!(r.0[8], 0x42);
        assert!((0..16).filter(|&i| i != 8).all(|i| r.0[i] == before[i]));
        // MOVZX: zero-extended to 32, then to 64.
        r.0[0] = u64::MAX;
        read_into(&[0x0f, 0xb6, 0x07], 64, &mut r, 0xFF);
        assert_eq!(r.0[0], 0xFF);
        // MOVSX to 64, to 32 (then zero-extended), to 16 (merged).
        read_into(&[0x48, 0x0f, 0xbe, 0x07], 64, &mut r, 0x80);
        assert_eq!(r.0[0], 0xFFFF_FFFF_FFFF_FF80);
        read_into(&[0x48, 0x0f, 0xbe, 0x07], 64, &mut r, 0x7F);
        assert_eq!(r.0[0], 0x7F);
        read_into(&[0x0f, 0xbe, 0x07], 64, &mut r, 0x80);
        assert_eq!(r.0[0], 0xFFFF_FF80);
        r.0[0] = 0x1234_5678_0000_0000;
        read_into(&[0x66, 0x0f, 0xbe, 0x07], 64, &mut r, 0x80);
        assert_eq!(r.0[0], 0x1234_5678_0000_FF80);
        read_into(&[0x0f, 0xbf, 0x07], 64, &mut r, 0x8001);
        assert_eq!(r.0[0], 0xFFFF_8001);
        read_into(&[0x48, 0x63, 0x07], 64, &mut r, 0x8000_0000);
        assert_eq!(r.0[0], 0xFFFF_FFFF_8000_0000);
        read_into(&[0x48, 0x63, 0x07], 64, &mut r, 0x7FFF_FFFF);
        assert_eq!(r.0[0], 0x7FFF_FFFF);
        // A write instruction leaves the registers alone.
        let before = r.0;
        read_into(&[0x89, 0x37], 64, &mut r, 0x5555);
        assert_eq!(r.0, before);
    }

    #[test]
    fn write_values() {
        let mut r = Regs([0; 16]);
        r.0[0] = 0x1122_3344_5566_7788;
        r.0[6] = 0xAAAA_BBBB_CCCC_DDDD;
        r.0[9] = 0x9999_8888_7777_6666;
        r.0[7] = 0x0102_0304_0506_0708;
        let v = |b: &[u8], r: &Regs| write_value(r, &decode(b, 64).unwrap());
        assert_eq!(v(&[0x89, 0x37], &r), 0xCCCC_DDDD);
        assert_eq!(v(&[0x48, 0x89, 0x37], &r), 0xAAAA_BBBB_CCCC_DDDD);
        assert_eq!(v(&[0x66, 0x89, 0x37], &r), 0xDDDD);
        assert_eq!(v(&[0x88, 0x27], &r), 0x77); // ah
        assert_eq!(v(&[0x88, 0x07], &r), 0x88); // al
        assert_eq!(v(&[0x40, 0x88, 0x3f], &r), 0x08); // dil
        assert_eq!(v(&[0x45, 0x89, 0x0c, 0x24], &r), 0x7777_6666); // r9d
        assert_eq!(v(&[0xc6, 0x07, 0x80], &r), 0x80);
        assert_eq!(v(&[0x48, 0xc7, 0x07, 0xfe, 0xff, 0xff, 0xff], &r), 0xFFFF_FFFF_FFFF_FFFE);
        assert_eq!(v(&[0x66, 0xc7, 0x07, 0x34, 0x12], &r), 0x1234);
        assert_eq!(v(&[0x8b, 0x07], &r), 0);
        // A hand-made write whose immediate is wider than its size.
        let insn = MmioInsn { len: 1, op: MmioOp::Write { size: 2, src: Source::Imm(0x12_3456) } };
        assert_eq!(write_value(&r, &insn), 0x3456);
        let insn = MmioInsn { len: 1, op: MmioOp::Write { size: 1, src: Source::Reg(high(0)) } };
        assert_eq!(write_value(&r, &insn), 0x77);
    }
}

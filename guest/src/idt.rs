//! A small IDT for the first 32 vectors: the #UD handler of the VMXON
//! scenario can be set, every other exception prints and EXITs 3.

use core::arch::asm;
use core::ptr::addr_of_mut;
use hvcore::guest_boot::CODE_SELECTOR;

/// What the CPU pushes on an interrupt in long mode.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    zero: u32,
}

const MISSING: Gate = Gate { offset_low: 0, selector: 0, ist: 0, attributes: 0, offset_mid: 0, offset_high: 0, zero: 0 };
/// Present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u8 = 0x8E;
const VECTORS: usize = 32;

static mut IDT: [Gate; VECTORS] = [MISSING; VECTORS];

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

pub type Handler = extern "x86-interrupt" fn(Frame);
pub type HandlerWithCode = extern "x86-interrupt" fn(Frame, u64);

fn set(vector: usize, addr: u64) {
    let gate = Gate {
        offset_low: addr as u16,
        selector: CODE_SELECTOR,
        ist: 0,
        attributes: INTERRUPT_GATE,
        offset_mid: (addr >> 16) as u16,
        offset_high: (addr >> 32) as u32,
        zero: 0,
    };
    // SAFETY: one CPU, no interrupts enabled: nothing else touches the IDT.
    unsafe { (*addr_of_mut!(IDT))[vector] = gate };
}

fn unexpected(vector: u64, frame: &Frame, code: Option<u64>) -> ! {
    crate::println!("unexpected exception {vector} (error code {code:?}) at {:#x}", frame.rip);
    crate::hv::exit(3)
}

macro_rules! unexpected_handlers {
    ($($v:literal => $name:ident),* $(,)?) => {
        $(extern "x86-interrupt" fn $name(frame: Frame) { unexpected($v, &frame, None) })*
        const PLAIN: &[(usize, Handler)] = &[$(($v, $name)),*];
    };
}

macro_rules! unexpected_handlers_with_code {
    ($($v:literal => $name:ident),* $(,)?) => {
        $(extern "x86-interrupt" fn $name(frame: Frame, code: u64) { unexpected($v, &frame, Some(code)) })*
        const WITH_CODE: &[(usize, HandlerWithCode)] = &[$(($v, $name)),*];
    };
}

unexpected_handlers!(0 => de, 1 => db, 2 => nmi, 3 => bp, 4 => of, 5 => br, 6 => ud, 7 => nm,
    9 => cso, 16 => mf, 18 => mc, 19 => xm, 20 => ve);
unexpected_handlers_with_code!(8 => df, 10 => ts, 11 => np, 12 => ss, 13 => gp, 14 => pf, 17 => ac,
    21 => cp, 29 => vc, 30 => sx);

/// Fills the IDT with the "unexpected exception" handlers and loads it.
pub fn install() {
    for &(v, h) in PLAIN {
        set(v, h as usize as u64);
    }
    for &(v, h) in WITH_CODE {
        set(v, h as usize as u64);
    }
    let ptr = Pointer { limit: (VECTORS * 16 - 1) as u16, base: addr_of_mut!(IDT) as u64 };
    // SAFETY: the IDT is a static with valid gates (or not-present ones).
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// Routes #GP (vector 13) to `handler`.
pub fn set_general_protection(handler: HandlerWithCode) {
    set(13, handler as usize as u64);
}

/// Routes #UD (vector 6) to `handler`.
pub fn set_invalid_opcode(handler: Handler) {
    set(6, handler as usize as u64);
}

/// Loads an IDT with limit 0: the next exception becomes a triple fault.
pub fn load_empty() {
    let ptr = Pointer { limit: 0, base: 0 };
    // SAFETY: nothing but exceptions reads the IDT; we want them to fail.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

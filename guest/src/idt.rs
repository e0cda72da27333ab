//! A small IDT for the first 32 vectors: every exception prints and EXITs
//! 3 unless a scenario routes it to a handler of its own ([`set_handler`],
//! [`set_handler_with_code`]; `trap` routes the faults a probe may raise).

use core::arch::asm;
use core::ptr::addr_of_mut;
use hvcore::loader::program::CODE_SELECTOR;

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
    set_gate(vector, addr, 0);
}

/// Points gate `vector` at `addr`; `ist` 1..=7 makes the CPU switch to
/// that Interrupt Stack Table entry of the TSS (SDM Vol. 3A 6.14.5), 0
/// keeps the current stack (at CPL 0).
fn set_gate(vector: usize, addr: u64, ist: u8) {
    let gate = Gate {
        offset_low: addr as u16,
        selector: CODE_SELECTOR,
        ist,
        attributes: INTERRUPT_GATE,
        offset_mid: (addr >> 16) as u16,
        offset_high: (addr >> 32) as u32,
        zero: 0,
    };
    // SAFETY: one CPU, no interrupts enabled: nothing else touches the IDT.
    unsafe { (*addr_of_mut!(IDT))[vector] = gate };
}

pub fn unexpected(vector: u64, frame: &Frame, code: Option<u64>) -> ! {
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

/// Routes `vector` (one without an error code) to `handler`, on IST
/// entry `ist` (0: none).
pub fn set_handler(vector: usize, handler: Handler, ist: u8) {
    set_gate(vector, handler as usize as u64, ist);
}

/// Routes `vector` (one that pushes an error code) to `handler`.
pub fn set_handler_with_code(vector: usize, handler: HandlerWithCode) {
    set(vector, handler as usize as u64);
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

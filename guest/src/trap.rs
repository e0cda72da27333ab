//! Probing instructions that may fault. [`probe!`] runs a few instructions
//! with a recovery point right after them: should one raise #UD, #NM, #GP,
//! #PF, #AC or #XM, the handler notes the exception and resumes at the
//! recovery point, and the probe returns `Err(Fault)`. Outside a probe
//! those exceptions are unexpected, as before (print, EXIT 3).
//!
//! A probe works at CPL 3 too: the handler runs at CPL 0 and IRETQs to the
//! recovery point with the interrupted privilege level.

use crate::idt::{self, Frame};
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use hvcore::hypercall::check;

/// An exception a probe caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    /// The error code (0 for vectors without one).
    pub code: u64,
    /// Where it was raised.
    pub rip: u64,
}

impl Fault {
    /// The REPORT detail that says "this exception instead".
    pub fn detail(&self) -> u64 {
        check::fault_detail(self.vector, self.code)
    }
}

pub const UD: u8 = 6;
pub const GP: u8 = 13;

/// The recovery RIP while a probe runs, else 0. The probe's own asm
/// writes it; the handler or [`take`] clears it.
pub static RECOVER: AtomicU64 = AtomicU64::new(0);
/// The caught exception: vector + 1 (0: none), error code, RIP.
static CAUGHT: AtomicU64 = AtomicU64::new(0);
static CODE: AtomicU64 = AtomicU64::new(0);
static RIP: AtomicU64 = AtomicU64::new(0);

/// Runs the asm template lines (then `;` and the operands, as for `asm!`)
/// with a recovery point after them; evaluates to `Result<(), Fault>`.
/// Use it inside `unsafe`, as `asm!`. A fault in the lines resumes at the
/// recovery point with every register as it was then (the handlers are
/// x86-interrupt functions) and RSP as before the fault, so the lines
/// must not leave the stack moved where they may fault.
#[macro_export]
macro_rules! probe {
    ($($line:expr),+ $(; $($operands:tt)*)?) => {{
        $crate::trap::begin();
        core::arch::asm!(
            "lea {probe_resume}, [rip + 9f]",
            "mov qword ptr [{probe_slot}], {probe_resume}",
            $($line,)+
            "9:",
            probe_resume = out(reg) _,
            probe_slot = in(reg) $crate::trap::RECOVER.as_ptr(),
            $($($operands)*)?
        );
        $crate::trap::take()
    }};
}

/// Forgets an exception caught earlier (before a probe).
pub fn begin() {
    CAUGHT.store(0, SeqCst);
}

/// Disarms the probe; the exception it caught, if any.
pub fn take() -> Result<(), Fault> {
    RECOVER.store(0, SeqCst);
    match CAUGHT.swap(0, SeqCst) {
        0 => Ok(()),
        v => Err(Fault { vector: (v - 1) as u8, code: CODE.load(SeqCst), rip: RIP.load(SeqCst) }),
    }
}

/// For a check that expects #GP(0): whether it was, and the detail to
/// report ([`Fault::detail`], or [`check::NO_FAULT`]).
pub fn expect_gp0(r: Result<(), Fault>) -> (bool, u64) {
    match r {
        Err(f) => (f.vector == GP && f.code == 0, f.detail()),
        Ok(()) => (false, check::NO_FAULT),
    }
}

fn catch(vector: u8, frame: &mut Frame, code: Option<u64>) {
    let resume = RECOVER.swap(0, SeqCst);
    if resume == 0 {
        idt::unexpected(vector as u64, frame, code);
    }
    CODE.store(code.unwrap_or(0), SeqCst);
    RIP.store(frame.rip, SeqCst);
    CAUGHT.store(vector as u64 + 1, SeqCst);
    // SAFETY: the frame is the one the CPU pushed; IRETQ goes to the
    // probe's recovery point.
    unsafe { core::ptr::write_volatile(&mut frame.rip, resume) };
}

macro_rules! catching {
    ($($v:literal => $name:ident),*) => {
        $(extern "x86-interrupt" fn $name(mut frame: Frame) { catch($v, &mut frame, None) })*
    };
}

macro_rules! catching_with_code {
    ($($v:literal => $name:ident),*) => {
        $(extern "x86-interrupt" fn $name(mut frame: Frame, code: u64) { catch($v, &mut frame, Some(code)) })*
    };
}

catching!(6 => ud, 7 => nm, 19 => xm);
catching_with_code!(13 => gp, 14 => pf, 17 => ac);

/// Routes the exceptions a probe may raise to the catching handlers.
pub fn install() {
    idt::set_handler(6, ud, 0);
    idt::set_handler(7, nm, 0);
    idt::set_handler(19, xm, 0);
    idt::set_handler_with_code(13, gp);
    idt::set_handler_with_code(14, pf);
    idt::set_handler_with_code(17, ac);
}

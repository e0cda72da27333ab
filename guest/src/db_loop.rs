//! DB_LOOP: the #DB delivery loop of XSA-156 / CVE-2015-8104. The #DB
//! gate switches to IST1 and a data breakpoint watches the slot of that
//! stack where the CPU pushes SS, so delivering a #DB raises the next one
//! before the handler's first instruction, forever: on bare metal (or
//! with #DB not intercepted) the CPU never reaches an instruction
//! boundary again. The hypervisor must see the loop and stop this VM.

use crate::cpu::*;
use crate::hv;
use crate::idt::{self, Frame};
use core::arch::asm;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use hvcore::loader::program::TSS_BASE;
use hvcore::hypercall::check;

/// IST1's slot in the 64-bit TSS (SDM Vol. 3A 8.7, Figure 8-11).
const TSS_IST1: u64 = 0x24;
const IST_SIZE: usize = 4096;

#[repr(C, align(16))]
struct Stack([u8; IST_SIZE]);
/// Written by the CPU only (each #DB delivery pushes its frame here).
static mut IST_STACK: Stack = Stack([0; IST_SIZE]);

static RUNS: AtomicU64 = AtomicU64::new(0);

/// Runs only if delivery did not loop: counts, clears DR6 and TF.
extern "x86-interrupt" fn debug(mut frame: Frame) {
    RUNS.fetch_add(1, SeqCst);
    let _ = set_dr(6, DR6_CLEAR);
    // SAFETY: the frame the CPU pushed; IRETQ restores RFLAGS from it.
    unsafe { core::ptr::write_volatile(&mut frame.rflags, frame.rflags & !RFLAGS_TF) };
}

pub fn run() -> ! {
    let top = addr_of_mut!(IST_STACK) as u64 + IST_SIZE as u64;
    // SAFETY: the boot protocol's TSS, which TR points at; the CPU reads
    // IST1 from it at each delivery.
    unsafe { ((TSS_BASE + TSS_IST1) as *mut u64).write_unaligned(top) };
    idt::set_handler(1, debug, 1);
    // The frame's first push, SS, goes to top - 8 (the IST top is 16-byte
    // aligned; SDM Vol. 3A 6.14.2). DR7: L0, R/W0 = 01 (writes), LEN0 =
    // 10 (8 bytes) (SDM Vol. 3B 18.2.4).
    let ss_slot = top - 8;
    let dr7 = DR7_OFF | 1 | 0b01 << 16 | 0b10 << 18;
    if let Err(e) = set_dr(0, ss_slot).and_then(|()| set_dr(7, dr7)) {
        crate::println!("db-loop: arming the breakpoint raised exception {}", e.vector);
    }
    crate::println!("db-loop: breakpoint on {ss_slot:#x} (DR7 {:#x}); ICEBP: the hypervisor must stop me", dr(7));
    // SAFETY: deliberately starts the loop; should it come back, the
    // handler has cleared DR6 and nothing else changed.
    unsafe { asm!(".byte 0xf1", options(nomem, nostack)) };
    crate::println!("db-loop: the #DB handler ran ({} times); once more with TF", RUNS.load(SeqCst));
    // SAFETY: as above; the handler clears TF.
    unsafe { asm!("pushfq; or qword ptr [rsp], 0x100; popfq", "nop") };
    let runs = RUNS.load(SeqCst);
    crate::println!("db-loop: the #DB handler ran {runs} times without looping");
    hv::report(check::DB_LOOP_CONTINUED, false, runs);
    hv::exit(1)
}

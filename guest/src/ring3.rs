//! RING3: the guest drops to CPL 3, where hypercalls must be refused,
//! SYSCALL must reach its own CPL 0 handler and #AC must be delivered to
//! its IDT; then it SYSCALLs back to CPL 0 and REPORTs (see
//! `hvcore::hypercall::scenario::RING3`).
//!
//! The GDT and TSS the boot protocol gives have no user segments, so this
//! builds its own. CPL 3 code here is ordinary Rust that only touches its
//! statics (the pages of 2..8 MiB get the U bit), executes VMCALL/SYSCALL
//! and leaves everything privileged, including the serial port, to CPL 0.

use crate::cpu::*;
use crate::hv;
use crate::idt::{self, Frame};
use crate::trap::Fault;
use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use hvcore::loader::program::{tss_descriptor, GDT_CODE, GDT_DATA, PDPT_BASE, PD_BASE, PML4_BASE, TSS_SIZE};
use hvcore::hypercall::{self as hc, check};

const KERNEL_CS: u64 = 0x08;
const KERNEL_DS: u64 = 0x10;
/// SYSRET takes SS from STAR[63:48] + 8 and CS from STAR[63:48] + 16, so
/// the user data descriptor comes right before the user code one (SDM
/// Vol. 2B SYSRET).
const USER_DS: u64 = 0x18 | 3;
const USER_CS: u64 = 0x20 | 3;
const TSS_SELECTOR: u64 = 0x28;
/// The boot protocol's descriptors with DPL 3 (bits 45-46).
const GDT_USER_DATA: u64 = GDT_DATA | 3 << 45;
const GDT_USER_CODE: u64 = GDT_CODE | 3 << 45;
const STAR: u64 = ((USER_DS & !3) - 8) << 48 | KERNEL_CS << 32;
const SFMASK: u64 = RFLAGS_TF | RFLAGS_IF | RFLAGS_DF | RFLAGS_AC;
const PTE_USER: u64 = 1 << 2;
/// What RAX says to the SYSCALL handler: record and SYSRET, or go back to
/// CPL 0 for good.
const SYSCALL_TEST: u64 = 0;
const SYSCALL_LEAVE: u64 = 1;
const FORBIDDEN_TEXT: &str = "ring3: FORBIDDEN print from CPL 3";

#[repr(C, align(16))]
struct Gdt([u64; 7]);
static mut GDT: Gdt = Gdt([0; 7]);

#[repr(C, align(16))]
struct Tss([u8; TSS_SIZE]);
static mut TSS: Tss = Tss([0; TSS_SIZE]);

const STACK_SIZE: usize = 16 * 1024;
#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);
/// RSP0: where exceptions from CPL 3 run.
static mut KERNEL_STACK: Stack = Stack([0; STACK_SIZE]);
static mut USER_STACK: Stack = Stack([0; STACK_SIZE]);

/// An 8-aligned pair of words: the #AC test loads 8 bytes at offset 1.
#[repr(C, align(8))]
struct Words([u64; 2]);
static MISALIGNED: Words = Words([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);

/// CPL 0 state while CPL 3 runs, and what the SYSCALL handler saw.
static KERNEL_RSP: AtomicU64 = AtomicU64::new(0);
static SYSCALL_CS: AtomicU64 = AtomicU64::new(u64::MAX);
static SYSCALL_RCX: AtomicU64 = AtomicU64::new(0);
static SYSCALL_R11: AtomicU64 = AtomicU64::new(0);
static SYSCALL_RFLAGS: AtomicU64 = AtomicU64::new(0);

/// What CPL 3 found: the hypercalls' RAX (or the exception's detail), CS
/// at CPL 3, around SYSCALL, and the #AC test's load address.
static USER_CS_SEEN: AtomicU64 = AtomicU64::new(0);
static PRINT_RESULT: AtomicU64 = AtomicU64::new(0);
static REPORT_RESULT: AtomicU64 = AtomicU64::new(0);
static EXIT_RESULT: AtomicU64 = AtomicU64::new(0);
static SYSCALL_RETURN: AtomicU64 = AtomicU64::new(0);
static SYSRET_CS: AtomicU64 = AtomicU64::new(0);
static AC_LOAD_RIP: AtomicU64 = AtomicU64::new(0);

/// What the #AC handler saw: how often it ran, the first error code, CS, RIP.
static AC_COUNT: AtomicU64 = AtomicU64::new(0);
static AC_CODE: AtomicU64 = AtomicU64::new(0);
static AC_CS: AtomicU64 = AtomicU64::new(0);
static AC_RIP: AtomicU64 = AtomicU64::new(0);

// `ring3_enter(rip, rsp)`: saves the callee-saved registers and RSP, then
// IRETQs to CPL 3. It returns when CPL 3 SYSCALLs with RAX = LEAVE: the
// handler restores that RSP and returns from here.
// `ring3_syscall`: the LSTAR entry (CPL 0, still on the user stack, RCX =
// the user's RIP, R11 = its RFLAGS; SDM Vol. 2B SYSCALL).
global_asm!(
    ".pushsection .text.ring3, \"ax\"",
    "ring3_enter:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov [rip + {kernel_rsp}], rsp",
    "    push {user_ss}",
    "    push rsi",
    "    push {user_rflags}",
    "    push {user_cs}",
    "    push rdi",
    "    iretq",
    "ring3_syscall:",
    "    cmp rax, {leave}",
    "    je 2f",
    "    mov [rip + {seen_rcx}], rcx",
    "    mov [rip + {seen_r11}], r11",
    "    mov ax, cs",
    "    movzx eax, ax",
    "    mov [rip + {seen_cs}], rax",
    "    pushfq",
    "    pop rax",
    "    mov [rip + {seen_rflags}], rax",
    "    sysretq",
    "2:  mov rsp, [rip + {kernel_rsp}]",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    ".popsection",
    kernel_rsp = sym KERNEL_RSP,
    seen_rcx = sym SYSCALL_RCX,
    seen_r11 = sym SYSCALL_R11,
    seen_cs = sym SYSCALL_CS,
    seen_rflags = sym SYSCALL_RFLAGS,
    user_ss = const USER_DS,
    user_cs = const USER_CS,
    user_rflags = const 0x2,
    leave = const SYSCALL_LEAVE,
);

extern "sysv64" {
    fn ring3_enter(rip: u64, rsp: u64);
    fn ring3_syscall();
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// The new GDT (null, kernel code and data, user data and code, the TSS)
/// and TSS (RSP0 = the kernel stack, no I/O bitmap); loads both.
fn load_gdt_and_tss() {
    let tss = addr_of_mut!(TSS) as *mut u8;
    let rsp0 = addr_of_mut!(KERNEL_STACK) as u64 + STACK_SIZE as u64;
    // SAFETY: our TSS; RSP0 is at offset 4, the I/O map base at 0x66
    // (SDM Vol. 3A 8.7): past the limit, so no bitmap.
    unsafe {
        tss.add(4).cast::<u64>().write_unaligned(rsp0);
        tss.add(0x66).cast::<u16>().write_unaligned(TSS_SIZE as u16);
    }
    // LTR wants an available TSS (type 9) and marks it busy.
    let [tss_lo, tss_hi] = tss_descriptor(tss as u64, TSS_SIZE as u32 - 1, false);
    // SAFETY: nothing else uses GDT before it is loaded below.
    unsafe { *addr_of_mut!(GDT) = Gdt([0, GDT_CODE, GDT_DATA, GDT_USER_DATA, GDT_USER_CODE, tss_lo, tss_hi]) };
    let ptr = Pointer { limit: (7 * 8 - 1) as u16, base: addr_of!(GDT) as u64 };
    // SAFETY: the new GDT has the selectors the guest runs with at the
    // same places (0x08, 0x10); a far return reloads CS from it.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {t}, [rip + 2f]",
            "push {t}",
            ".byte 0x48, 0xcb", // retfq
            "2:",
            "mov {t:e}, {ds}",
            "mov ds, {t:x}",
            "mov es, {t:x}",
            "mov ss, {t:x}",
            "mov {t:e}, {tr}",
            "ltr {t:x}",
            ptr = in(reg) &ptr,
            t = out(reg) _,
            cs = const KERNEL_CS,
            ds = const KERNEL_DS,
            tr = const TSS_SELECTOR,
        );
    }
}

/// The U bit on the PML4 and PDPT entries and the PD entries of 2..8 MiB
/// (code, data, the stacks: everything of the program), then a TLB flush
/// by reloading CR3 (SDM Vol. 3A 4.10.4.1).
fn allow_user_pages() -> Result<(), Fault> {
    let entries = [PML4_BASE, PDPT_BASE].into_iter().chain((1..4).map(|i| PD_BASE + 8 * i));
    for gpa in entries {
        let e = gpa as *mut u64;
        // SAFETY: the boot protocol's page tables, identity-mapped and ours.
        unsafe { e.write_volatile(e.read_volatile() | PTE_USER) };
    }
    set_cr3(cr3())
}

/// Everything CPL 3 and SYSCALL need.
fn setup() -> Result<(), Fault> {
    load_gdt_and_tss();
    allow_user_pages()?;
    wrmsr(MSR_EFER, rdmsr(MSR_EFER)? | EFER_SCE)?;
    wrmsr(MSR_STAR, STAR)?;
    wrmsr(MSR_LSTAR, ring3_syscall as *const () as u64)?;
    wrmsr(MSR_SFMASK, SFMASK)?;
    // CR0.AM with RFLAGS.AC at CPL 3 turns on alignment checks (SDM Vol.
    // 3A 6.15, interrupt 17).
    set_cr0(cr0() | CR0_AM)?;
    idt::set_handler_with_code(17, alignment_check);
    Ok(())
}

/// #AC: note it and clear RFLAGS.AC in the frame, so the load succeeds
/// when it runs again.
extern "x86-interrupt" fn alignment_check(mut frame: Frame, code: u64) {
    if AC_COUNT.fetch_add(1, SeqCst) == 0 {
        AC_CODE.store(code, SeqCst);
        AC_CS.store(frame.cs, SeqCst);
        AC_RIP.store(frame.rip, SeqCst);
    }
    // SAFETY: the frame the CPU pushed; IRETQ restores RFLAGS from it.
    unsafe { core::ptr::write_volatile(&mut frame.rflags, frame.rflags & !RFLAGS_AC) };
}

/// A hypercall from CPL 3: RAX, or the detail of the exception it raised.
fn user_vmcall(nr: u64, a: u64, b: u64, c: u64) -> u64 {
    let rax: u64;
    // SAFETY: at CPL 3 the hypervisor must refuse every hypercall; a
    // fault (were it to inject one) is caught.
    let r = unsafe {
        crate::probe!("vmcall";
            inlateout("rax") nr => rax, inlateout("rdi") a => _, inlateout("rsi") b => _, inlateout("rdx") c => _,
            options(nostack))
    };
    match r {
        Ok(()) => rax,
        Err(f) => f.detail(),
    }
}

/// The CPL 3 part: results go to the statics, read at CPL 0.
extern "sysv64" fn user_main() -> ! {
    USER_CS_SEEN.store(cs(), SeqCst);
    let text = FORBIDDEN_TEXT.as_bytes();
    PRINT_RESULT.store(user_vmcall(hc::PRINT, text.as_ptr() as u64, text.len() as u64, 0), SeqCst);
    REPORT_RESULT.store(user_vmcall(hc::REPORT, check::RING3_FORBIDDEN_REPORT, 1, 0xbad), SeqCst);
    EXIT_RESULT.store(user_vmcall(hc::EXIT, 1, 0, 0), SeqCst);

    // SYSCALL with AC and DF set (SFMASK must clear them for the handler);
    // SYSRET restores them from R11 and returns to the next instruction.
    let (ret, cs_after): (u64, u64);
    // SAFETY: the handler only writes its statics and pushes one word on
    // this stack; RFLAGS.DF is clear again when the block ends.
    unsafe {
        asm!(
            "pushfq",
            "or dword ptr [rsp], {set}",
            "popfq",
            "syscall",
            "2:",
            "lea {ret}, [rip + 2b]",
            "mov {cs:x}, cs",
            "movzx {cs:e}, {cs:x}",
            "pushfq",
            "and dword ptr [rsp], {clear}",
            "popfq",
            set = const RFLAGS_AC | RFLAGS_DF,
            clear = const !(RFLAGS_AC | RFLAGS_DF) as u32,
            ret = out(reg) ret,
            cs = out(reg) cs_after,
            inout("rax") SYSCALL_TEST => _,
            out("rcx") _,
            out("r11") _,
        );
    }
    SYSCALL_RETURN.store(ret, SeqCst);
    SYSRET_CS.store(cs_after, SeqCst);

    // A misaligned 8-byte load with RFLAGS.AC: #AC(0); the handler clears
    // AC and the load runs again.
    let at: u64;
    // SAFETY: MISALIGNED holds 16 bytes: the load stays inside it.
    unsafe {
        asm!(
            "pushfq",
            "or dword ptr [rsp], {ac}",
            "popfq",
            "2: mov {v}, qword ptr [{p}]",
            "lea {at}, [rip + 2b]",
            "pushfq",
            "and dword ptr [rsp], {no_ac}",
            "popfq",
            ac = const RFLAGS_AC,
            no_ac = const !RFLAGS_AC as u32,
            v = out(reg) _,
            at = out(reg) at,
            p = in(reg) addr_of!(MISALIGNED) as u64 + 1,
        );
    }
    AC_LOAD_RIP.store(at, SeqCst);

    // SAFETY: SYSCALL with LEAVE does not come back here: the handler
    // returns from `ring3_enter` at CPL 0.
    unsafe { asm!("syscall", in("rax") SYSCALL_LEAVE, options(noreturn)) }
}

/// The detail of the first `(right, value)` that is not right; else
/// `pass_detail`.
fn first_wrong(items: &[(bool, u64)], pass_detail: u64) -> (bool, u64) {
    match items.iter().find(|(right, _)| !right) {
        Some(&(_, v)) => (false, v),
        None => (true, pass_detail),
    }
}

pub fn run() -> ! {
    if let Err(e) = setup() {
        crate::println!("ring3: set-up raised exception {} (error code {:#x}) at {:#x}", e.vector, e.code, e.rip);
        hv::report(check::RING3_SETUP, false, e.detail());
        hv::exit(1)
    }
    hv::report(check::RING3_SETUP, true, 0);
    crate::println!("ring3: entering CPL 3");
    let user_rsp = addr_of_mut!(USER_STACK) as u64 + STACK_SIZE as u64 - 8;
    // SAFETY: the GDT, TSS, paging and SYSCALL MSRs are set up for it.
    unsafe { ring3_enter(user_main as *const () as u64, user_rsp) };
    // Back at CPL 0 (SS from STAR + 8); IRETQ to CPL 3 nulled DS and ES.
    // SAFETY: selector 0x10 is the kernel data descriptor.
    unsafe { asm!("mov ds, {0:x}", "mov es, {0:x}", in(reg) KERNEL_DS, options(nostack, preserves_flags)) };
    let back_cs = cs();
    crate::println!("ring3: back at CPL 0");

    let user_cs = USER_CS_SEEN.load(SeqCst);
    let mut ok = hv::report(check::RING3_CPL3, user_cs == USER_CS, user_cs);
    for (id, result) in [
        (check::RING3_VMCALL_PRINT, &PRINT_RESULT),
        (check::RING3_VMCALL_REPORT, &REPORT_RESULT),
        (check::RING3_VMCALL_EXIT, &EXIT_RESULT),
    ] {
        let r = result.load(SeqCst);
        ok &= hv::report(id, r == hc::ERROR, r);
    }

    let handler_cs = SYSCALL_CS.load(SeqCst);
    let rflags = SYSCALL_RFLAGS.load(SeqCst);
    let r11 = SYSCALL_R11.load(SeqCst);
    let rcx = SYSCALL_RCX.load(SeqCst);
    let (pass, detail) = first_wrong(
        &[
            (handler_cs == KERNEL_CS, handler_cs),
            (rcx == SYSCALL_RETURN.load(SeqCst), rcx),
            (rflags & SFMASK == 0, rflags),
            (r11 & (RFLAGS_AC | RFLAGS_DF) == RFLAGS_AC | RFLAGS_DF, r11),
        ],
        handler_cs,
    );
    if !pass {
        crate::println!(
            "ring3: SYSCALL handler saw CS {handler_cs:#x}, RCX {rcx:#x} (want {:#x}), RFLAGS {rflags:#x}, R11 {r11:#x}",
            SYSCALL_RETURN.load(SeqCst)
        );
    }
    ok &= hv::report(check::RING3_SYSCALL, pass, detail);
    let sysret_cs = SYSRET_CS.load(SeqCst);
    ok &= hv::report(check::RING3_SYSRET, sysret_cs == USER_CS, sysret_cs);

    let count = AC_COUNT.load(SeqCst);
    let (code, ac_cs, ac_rip) = (AC_CODE.load(SeqCst), AC_CS.load(SeqCst), AC_RIP.load(SeqCst));
    let (pass, detail) = first_wrong(
        &[(count == 1, count), (code == 0, code), (ac_cs == USER_CS, ac_cs), (ac_rip == AC_LOAD_RIP.load(SeqCst), ac_rip)],
        0,
    );
    if !pass {
        crate::println!(
            "ring3: {count} #AC, error code {code:#x}, CS {ac_cs:#x}, RIP {ac_rip:#x} (the load is at {:#x})",
            AC_LOAD_RIP.load(SeqCst)
        );
    }
    ok &= hv::report(check::RING3_AC, pass, detail);
    ok &= hv::report(check::RING3_BACK, back_cs == KERNEL_CS, back_cs);
    hv::exit(!ok as u64)
}

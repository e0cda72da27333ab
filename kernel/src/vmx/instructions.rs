//! The VMX instructions the x86 crate lacks (INVEPT, INVVPID), each with
//! its VMfail checked, and the guest entry/exit path, which must save and
//! restore the guest's general-purpose registers and CR2 around
//! VMLAUNCH/VMRESUME (the VMCS holds only RSP and RIP of them; SDM Vol. 3C
//! 28.3 "Saving guest state" lists what a VM exit saves, and CR2 is not
//! in it).

use core::arch::{asm, global_asm};

/// The guest registers the VMCS does not hold. Layout is used by the
/// assembly below: keep the order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    /// CR2: no VMCS field switches it, so the entry path loads it and the
    /// exit path saves it (as KVM's __vmx_vcpu_run does).
    pub cr2: u64,
}

// hv_vmx_run(regs: *mut GuestRegs, launched: u64) -> u64
//   0: the guest ran and exited (registers saved to *regs)
//   1: VMLAUNCH/VMRESUME failed (VMfailValid/Invalid; read the error field)
// HOST_RSP and HOST_RIP are written here, so a VM exit lands in
// hv_vmx_exit on this very stack frame (SDM Vol. 3C 28.5: host state).
global_asm!(
    ".global hv_vmx_run",
    "hv_vmx_run:",
    "push rbp", "push rbx", "push r12", "push r13", "push r14", "push r15",
    "push rdi",            // [rsp+8] regs
    "push rsi",            // [rsp]   launched
    "mov rax, 0x6C14",     // HOST_RSP
    "vmwrite rax, rsp",
    "mov rax, 0x6C16",     // HOST_RIP
    "lea rbx, [rip + hv_vmx_exit]",
    "vmwrite rax, rbx",
    "mov rax, [rdi + 120]", // the guest's CR2
    "mov cr2, rax",
    "mov rax, [rdi + 0]",
    "mov rbx, [rdi + 8]",
    "mov rcx, [rdi + 16]",
    "mov rdx, [rdi + 24]",
    "mov rsi, [rdi + 32]",
    "mov rbp, [rdi + 48]",
    "mov r8,  [rdi + 56]",
    "mov r9,  [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "cmp qword ptr [rsp], 0",
    "mov rdi, [rdi + 40]", // mov leaves the flags alone
    "jne 2f",
    "vmlaunch",
    "jmp 3f",
    "2:",
    "vmresume",
    "3:",                  // only reached when the entry failed
    "add rsp, 16",
    "mov eax, 1",
    "jmp 4f",
    ".global hv_vmx_exit",
    "hv_vmx_exit:",
    "push rdi",            // guest rdi; [rsp+8] launched, [rsp+16] regs
    "mov rdi, [rsp + 16]",
    "mov [rdi + 0], rax",
    "mov [rdi + 8], rbx",
    "mov [rdi + 16], rcx",
    "mov [rdi + 24], rdx",
    "mov [rdi + 32], rsi",
    "mov [rdi + 48], rbp",
    "mov [rdi + 56], r8",
    "mov [rdi + 64], r9",
    "mov [rdi + 72], r10",
    "mov [rdi + 80], r11",
    "mov [rdi + 88], r12",
    "mov [rdi + 96], r13",
    "mov [rdi + 104], r14",
    "mov [rdi + 112], r15",
    "pop rax",
    "mov [rdi + 40], rax",
    "mov rax, cr2",
    "mov [rdi + 120], rax",
    "add rsp, 16",
    "xor eax, eax",
    "4:",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbx", "pop rbp",
    "ret",
);

extern "C" {
    fn hv_vmx_run(regs: *mut GuestRegs, launched: u64) -> u64;
}

/// Enters the guest of the current VMCS; returns after its next VM exit,
/// or `Err(())` if the entry itself failed.
///
/// # Safety
/// A VMCS must be current, with valid host state except HOST_RSP/RIP.
pub unsafe fn run(regs: &mut GuestRegs, launched: bool) -> Result<(), ()> {
    match unsafe { hv_vmx_run(regs, launched as u64) } {
        0 => Ok(()),
        _ => Err(()),
    }
}

pub use hvcore::vmx::Invalidation as InvType;

/// INVEPT of `eptp` (ignored for all-context). A VMfail means the
/// hypervisor asked for a flush the CPU cannot do: stale translations
/// would stay, so the run stops here (SDM Vol. 3C 31.2: VMfailInvalid sets
/// CF, VMfailValid sets ZF).
pub fn invept(kind: InvType, eptp: u64) {
    let descriptor: [u64; 2] = [eptp, 0];
    let ok: u8;
    // SAFETY: VMX root operation; the descriptor is 16 readable bytes.
    unsafe {
        asm!("invept {t}, [{d}]", "seta {ok}", t = in(reg) kind as u64, d = in(reg) &descriptor,
             ok = out(reg_byte) ok, options(nostack))
    };
    if ok == 0 {
        panic!("INVEPT {kind:?} of EPTP {eptp:#x} failed (VMfail): guest TLBs may be stale");
    }
}

/// INVVPID of `vpid` (ignored for all-context), VMfail checked as for
/// [`invept`].
pub fn invvpid(kind: InvType, vpid: u16) {
    let descriptor: [u64; 2] = [vpid as u64, 0];
    let ok: u8;
    // SAFETY: as for `invept`.
    unsafe {
        asm!("invvpid {t}, [{d}]", "seta {ok}", t = in(reg) kind as u64, d = in(reg) &descriptor,
             ok = out(reg_byte) ok, options(nostack))
    };
    if ok == 0 {
        panic!("INVVPID {kind:?} of VPID {vpid} failed (VMfail): guest TLBs may be stale");
    }
}

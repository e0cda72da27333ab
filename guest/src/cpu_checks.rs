//! CPU_CHECKS: writes the hypervisor must refuse as the CPU would, and
//! port reads it must emulate exactly (see
//! `hvcore::hypercall::scenario::CPU_CHECKS`).

use crate::cpu::*;
use crate::hv;
use crate::trap::{self, Fault};
use core::arch::asm;
use hvcore::hypercall::check;

/// A port no device claims.
const UNKNOWN_PORT: u16 = 0x1230;
/// What RAX holds before each IN.
const RAX_BEFORE: u64 = 0x1122_3344_5566_7788;

/// CR4 bits that exist only with a CPUID feature, and whether the guest's
/// CPUID shows it (SDM Vol. 3A 2.5 and 2.6, Vol. 2A CPUID).
fn cr4_feature_bits(f: &Features) -> [(u32, bool); 24] {
    let (c1, d1, a71) = (f.leaf1_ecx, f.leaf1_edx, f.leaf7_1_eax);
    let (b7, c7, d7) = f.leaf7;
    let has = |reg: u32, bit: u32| reg & (1 << bit) != 0;
    [
        (0, has(d1, 1)),   // VME
        (1, has(d1, 1)),   // PVI (with VME)
        (2, has(d1, 4)),   // TSD (TSC)
        (3, has(d1, 2)),   // DE
        (4, has(d1, 3)),   // PSE
        (6, has(d1, 7)),   // MCE
        (7, has(d1, 13)),  // PGE
        (9, has(d1, 24)),  // OSFXSR (FXSR)
        (10, has(d1, 25)), // OSXMMEXCPT (SSE)
        (11, has(c7, 2)),  // UMIP
        (14, has(c1, 6)),  // SMXE (SMX)
        (16, has(b7, 0)),  // FSGSBASE
        (17, has(c1, 17)), // PCIDE (PCID)
        (18, has(c1, 26)), // OSXSAVE (XSAVE)
        (19, has(c7, 23)), // KL
        (20, has(b7, 7)),  // SMEP
        (21, has(b7, 20)), // SMAP
        (22, has(c7, 3)),  // PKE (PKU)
        (23, has(c7, 7)),  // CET (CET_SS)
        (24, has(c7, 31)), // PKS
        (25, has(d7, 5)),  // UINTR
        (27, has(a71, 6)), // LASS
        (28, has(a71, 26)), // LAM_SUP (LAM)
        (32, has(a71, 17)), // FRED
    ]
}

/// CR4 bits no processor defines (as of the SDM this follows).
const CR4_RESERVED: [u32; 8] = [15, 26, 29, 30, 31, 33, 48, 63];

/// Tries to set each of `bits` in a register (`read`, `write`): every try
/// must raise #GP(0) and leave the register as it was; a write that took
/// is undone. Returns the bits that did not behave (0: all right).
fn refused_bits(
    what: &str,
    bits: impl IntoIterator<Item = u32>,
    read: impl Fn() -> Result<u64, Fault>,
    write: impl Fn(u64) -> Result<(), Fault>,
) -> u64 {
    let mut wrong = 0;
    for bit in bits {
        let Ok(before) = read() else {
            wrong |= 1 << bit;
            continue;
        };
        let (gp, detail) = trap::expect_gp0(write(before | 1 << bit));
        let after = read();
        if !gp || after != Ok(before) {
            crate::println!("cpu-checks: setting {what} bit {bit}: detail {detail:#x}, now {after:x?} (was {before:#x})");
            wrong |= 1 << bit;
        }
        if after != Ok(before) {
            let _ = write(before);
        }
    }
    wrong
}

/// REPORTs a `refused_bits` result: detail = the bits tried on a pass,
/// the bits that misbehaved on a failure.
fn report_bits(id: u64, tried: u64, wrong: u64) -> bool {
    hv::report(id, wrong == 0, if wrong == 0 { tried } else { wrong })
}

fn mask(bits: &[u32]) -> u64 {
    bits.iter().fold(0, |m, &b| m | 1 << b)
}

fn bits_of(mask: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |b| mask & (1 << b) != 0)
}

/// `in` of `$insn` from the unknown port with RAX = RAX_BEFORE: RAX after.
macro_rules! in_from_unknown {
    ($insn:literal) => {{
        let mut rax = RAX_BEFORE;
        // SAFETY: no device answers; the IN only changes RAX.
        unsafe { asm!($insn, inout("rax") rax, in("dx") UNKNOWN_PORT, options(nomem, nostack, preserves_flags)) };
        rax
    }};
}

pub fn run() -> ! {
    let f = Features::read();

    // VMXE: VMX is hidden, so the bit is refused like any other the CPUID
    // does not allow.
    let before = cr4();
    let r = set_cr4(before | CR4_VMXE);
    let after = cr4();
    let (gp, detail) = trap::expect_gp0(r);
    if after != before {
        let _ = set_cr4(before);
    }
    let mut ok = hv::report(check::CPU_CR4_VMXE_GP, gp && after == before, if after != before { after } else { detail });

    let hidden = cr4_feature_bits(&f).iter().filter(|(_, shown)| !shown).fold(0, |m, &(b, _)| m | 1 << b);
    let tried = hidden | mask(&CR4_RESERVED);
    crate::println!("cpu-checks: CR4 bits CPUID does not allow, or reserved: {tried:#x}");
    let wrong = refused_bits("CR4", bits_of(tried), || Ok(cr4()), set_cr4);
    ok &= report_bits(check::CPU_CR4_RESERVED_GP, tried, wrong);

    // EFER: bits 1-7, 9 and 12-63 are reserved on Intel (SDM Vol. 4 2.1).
    const EFER_BITS: [u32; 3] = [1, 9, 63];
    let wrong = refused_bits("EFER", EFER_BITS, || rdmsr(MSR_EFER), |v| wrmsr(MSR_EFER, v));
    ok &= report_bits(check::CPU_EFER_RESERVED_GP, mask(&EFER_BITS), wrong);

    // CR0: bits 63:32 are reserved (SDM Vol. 2B MOV CR: #GP(0)).
    const CR0_BITS: [u32; 2] = [32, 63];
    let wrong = refused_bits("CR0", CR0_BITS, || Ok(cr0()), set_cr0);
    ok &= report_bits(check::CPU_CR0_HIGH_GP, mask(&CR0_BITS), wrong);

    // A 32-bit destination zero-extends into RAX in 64-bit mode (SDM Vol.
    // 1 3.4.1.1); 8- and 16-bit ones leave the other bits alone.
    let rax = in_from_unknown!("in eax, dx");
    ok &= hv::report(check::CPU_IN32_ZERO_EXTENDS, rax == 0xffff_ffff, rax);
    let rax8 = in_from_unknown!("in al, dx");
    let rax16 = in_from_unknown!("in ax, dx");
    let (want8, want16) = (RAX_BEFORE | 0xff, RAX_BEFORE | 0xffff);
    let first_wrong = if rax8 != want8 { rax8 } else { rax16 };
    ok &= hv::report(check::CPU_IN8_16_KEEP, rax8 == want8 && rax16 == want16, first_wrong);

    // CPUID.1: what does not work is not shown.
    let (_, _, ecx, edx) = cpuid(1, 0);
    const MONITOR: u32 = 1 << 3;
    const VMX: u32 = 1 << 5;
    const PDCM: u32 = 1 << 15;
    let shown = ecx & (MONITOR | VMX | PDCM);
    ok &= hv::report(check::CPU_CPUID_HIDDEN, shown == 0, shown as u64);
    const APIC_EDX: u32 = 1 << 9;
    const X2APIC: u32 = 1 << 21;
    const TSC_DEADLINE: u32 = 1 << 24;
    let shown = ((edx & APIC_EDX) as u64) << 32 | (ecx & (X2APIC | TSC_DEADLINE)) as u64;
    ok &= hv::report(check::CPU_CPUID_APIC_HIDDEN, shown == 0, shown);
    hv::exit(!ok as u64)
}

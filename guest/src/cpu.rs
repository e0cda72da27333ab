//! CPU access for the scenarios: CPUID, control and debug registers, MSRs
//! and XCR0. Accesses a hypervisor may refuse go through [`crate::probe!`],
//! so a fault becomes an `Err` the scenario reports instead of an EXIT.

use crate::trap::Fault;
use core::arch::asm;

pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

// The architectural bits, from the same definitions the hypervisor checks
// the guest's writes with.
pub use hvcore::control_regs::{CR0_AM, CR0_EM, CR0_MP, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, CR4_PKE, CR4_VMXE, EFER_SCE};
pub use hvcore::cpuid::{XCR0_AVX, XCR0_AVX512, XCR0_PKRU, XCR0_SSE, XCR0_X87};
pub const RFLAGS_TF: u64 = 1 << 8;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_DF: u64 = 1 << 10;
pub const RFLAGS_AC: u64 = 1 << 18;

pub const MSR_SYSENTER_CS: u32 = 0x174;
pub const MSR_SYSENTER_ESP: u32 = 0x175;
pub const MSR_SYSENTER_EIP: u32 = 0x176;
pub const MSR_PAT: u32 = 0x277;
pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SFMASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_TSC_AUX: u32 = 0xc000_0103;

/// What the guest's CPUID shows, as far as the scenarios care.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub leaf1_ecx: u32,
    pub leaf1_edx: u32,
    /// CPUID.7.0 EBX, ECX, EDX (0 when leaf 7 is absent).
    pub leaf7: (u32, u32, u32),
    /// CPUID.7.1 EAX (0 when absent).
    pub leaf7_1_eax: u32,
    pub xsave: bool,
    pub avx: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub pku: bool,
    pub rdtscp: bool,
    pub rdpid: bool,
    /// CPUID.(0xD,0) EDX:EAX: the XCR0 bits that may be set (0 without XSAVE).
    pub xcr0_supported: u64,
}

impl Features {
    pub fn read() -> Features {
        let max = cpuid(0, 0).0;
        let (_, _, leaf1_ecx, leaf1_edx) = cpuid(1, 0);
        let (leaf7, leaf7_1_eax) = if max >= 7 {
            let (eax, ebx, ecx, edx) = cpuid(7, 0);
            ((ebx, ecx, edx), if eax >= 1 { cpuid(7, 1).0 } else { 0 })
        } else {
            ((0, 0, 0), 0)
        };
        let xsave = leaf1_ecx & (1 << 26) != 0;
        let xcr0_supported = if xsave && max >= 0xd {
            let (eax, _, _, edx) = cpuid(0xd, 0);
            (edx as u64) << 32 | eax as u64
        } else {
            0
        };
        let ext_max = cpuid(0x8000_0000, 0).0;
        let ext1_edx = if ext_max >= 0x8000_0001 { cpuid(0x8000_0001, 0).3 } else { 0 };
        Features {
            leaf1_ecx,
            leaf1_edx,
            leaf7,
            leaf7_1_eax,
            xsave,
            avx: xsave && leaf1_ecx & (1 << 28) != 0 && xcr0_supported & XCR0_AVX != 0,
            avx512f: leaf7.0 & (1 << 16) != 0 && xcr0_supported & XCR0_AVX512 == XCR0_AVX512,
            avx512bw: leaf7.0 & (1 << 30) != 0,
            pku: leaf7.1 & (1 << 3) != 0,
            rdtscp: ext1_edx & (1 << 27) != 0,
            rdpid: leaf7.1 & (1 << 22) != 0,
            xcr0_supported,
        }
    }
}

macro_rules! control_register {
    ($read:ident, $write:ident, $cr:literal) => {
        pub fn $read() -> u64 {
            let v: u64;
            // SAFETY: reading a control register at CPL 0 has no side effects.
            unsafe { asm!(concat!("mov {}, ", $cr), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }

        /// The write, or the exception it raised.
        pub fn $write(v: u64) -> Result<(), Fault> {
            // SAFETY: CPL 0 (a fault is caught); what the value does to
            // the guest is the caller's test.
            unsafe { crate::probe!(concat!("mov ", $cr, ", {v}"); v = in(reg) v, options(nostack)) }
        }
    };
}

control_register!(cr0, set_cr0, "cr0");
control_register!(cr2, set_cr2, "cr2");
control_register!(cr3, set_cr3, "cr3");
control_register!(cr4, set_cr4, "cr4");
control_register!(cr8, set_cr8, "cr8");

macro_rules! debug_registers {
    ($($n:literal => $dr:literal),*) => {
        /// Debug register `n` (0-3, 6 or 7).
        pub fn dr(n: u8) -> u64 {
            let v: u64;
            match n {
                // SAFETY: reading a debug register at CPL 0 (CR4.DE is
                // clear, DR7.GD too) has no side effects.
                $($n => unsafe { asm!(concat!("mov {}, ", $dr), out(reg) v, options(nomem, nostack, preserves_flags)) },)*
                _ => panic!("no debug register {n}"),
            }
            v
        }

        /// Writes debug register `n` (0-3, 6 or 7), or the exception that raised.
        pub fn set_dr(n: u8, v: u64) -> Result<(), Fault> {
            match n {
                // SAFETY: as for the control registers.
                $($n => unsafe { crate::probe!(concat!("mov ", $dr, ", {v}"); v = in(reg) v, options(nostack)) },)*
                _ => panic!("no debug register {n}"),
            }
        }
    };
}

debug_registers!(0 => "dr0", 1 => "dr1", 2 => "dr2", 3 => "dr3", 6 => "dr6", 7 => "dr7");

/// DR6 with no condition recorded (its reserved bits read as 1; SDM Vol.
/// 3B 18.2.3): what a #DB handler writes back.
pub const DR6_CLEAR: u64 = 0xffff_0ff0;
pub const DR6_B0: u64 = 1 << 0;
pub use hvcore::vmx::event::DR6_BS;
/// DR7 with every breakpoint off (bit 10 reads as 1).
pub const DR7_OFF: u64 = 0x400;

pub fn rdmsr(msr: u32) -> Result<u64, Fault> {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an MSR has no side effects; a #GP is caught.
    unsafe { crate::probe!("rdmsr"; in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack)) }?;
    Ok((hi as u64) << 32 | lo as u64)
}

pub fn wrmsr(msr: u32, v: u64) -> Result<(), Fault> {
    // SAFETY: as for the control registers.
    unsafe { crate::probe!("wrmsr"; in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack)) }
}

/// XGETBV(`ecx`): #UD unless CR4.OSXSAVE.
pub fn xgetbv(ecx: u32) -> Result<u64, Fault> {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV has no side effects; a #UD or #GP is caught.
    unsafe { crate::probe!("xgetbv"; in("ecx") ecx, out("eax") lo, out("edx") hi, options(nostack)) }?;
    Ok((hi as u64) << 32 | lo as u64)
}

pub fn xsetbv(ecx: u32, v: u64) -> Result<(), Fault> {
    // SAFETY: as for the control registers.
    unsafe { crate::probe!("xsetbv"; in("ecx") ecx, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack)) }
}

/// The CS selector (its low 2 bits are the CPL).
pub fn cs() -> u64 {
    let v: u64;
    // SAFETY: reading a segment register has no side effects.
    unsafe { asm!("mov {0:x}, cs", "movzx {0:e}, {0:x}", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// A canonical address (48-bit, as with 4-level paging) made of `x`'s bits.
pub const fn canonical(x: u64) -> u64 {
    (((x << 16) as i64) >> 16) as u64
}

/// A well-mixed value of `z`: splitmix64's step, a bijection, so
/// different inputs give different outputs.
pub const fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

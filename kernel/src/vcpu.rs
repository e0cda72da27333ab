//! The vCPU: every piece of processor state its guest can observe, and
//! the one place that switches it. Nothing of one VM's state survives
//! into another's time on the CPU.
//!
//! | state                          | switched by                                   | where              |
//! |--------------------------------|-----------------------------------------------|--------------------|
//! | RSP, RIP, RFLAGS, segments, CR0/CR3/CR4, EFER, PAT, SYSENTER, FS/GS base, DR7, DEBUGCTL | the VMCS guest-state area (SDM Vol. 3C 25.4, 27.3.2, 28.3) | `vmx::vmcs` |
//! | RAX..R15, CR2                  | the entry/exit assembly, every entry           | `vmx::instructions` |
//! | x87/SSE/AVX/AVX-512/PKRU, XCR0 | XSAVE/XRSTOR + XSETBV, per slice (Vol. 1 13.7, 13.8) | [`Vcpu::switch_in`] |
//! | DR0-DR3, DR6                   | MOV DR, per slice (no VMCS field: Vol. 3C 28.3 saves only DR7) | [`Vcpu::switch_in`] |
//! | STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, TSC_AUX | RDMSR/WRMSR, per slice (not in the VMCS; passed through to the guest) | [`Vcpu::switch_in`] |
//! | TPR (CR8)                      | the TPR shadow: a virtual-APIC page per VM (Vol. 3C 30.1.1) | [`Vcpu::vapic`] |
//!
//! Per slice rather than per exit is enough because the host never uses
//! that state: the kernel is built soft-float (no x87/SSE instructions),
//! sets no debug registers and uses neither SYSCALL, SWAPGS nor RDTSCP.
//! Between [`Vcpu::switch_in`] and [`Vcpu::switch_out`] the guest's values
//! are live in the CPU, so exit handlers read and write them there (DR6,
//! XCR0).

use crate::memory::Page;
use crate::vmx::instructions::GuestRegs;
use crate::vmx::vmcs::Vmcs;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;
use hvcore::cpuid::Regs;
use x86::msr::{rdmsr, wrmsr};

/// The MSRs the guest reaches directly (the MSR bitmap passes them
/// through) and the vCPU switches: the SYSCALL and SWAPGS ones, and
/// TSC_AUX (RDTSCP, RDPID) where the CPU has it.
pub const SWITCHED_MSRS: [u32; 6] = [
    0xc000_0081, // IA32_STAR
    0xc000_0082, // IA32_LSTAR
    0xc000_0083, // IA32_CSTAR
    0xc000_0084, // IA32_FMASK (SFMASK)
    0xc000_0102, // IA32_KERNEL_GS_BASE
    0xc000_0103, // IA32_TSC_AUX
];
const TSC_AUX_INDEX: usize = 5;

/// DR6 after reset: every reserved bit that reads as one (Vol. 3B 18.2.3).
pub const DR6_INIT: u64 = 0xffff_0ff0;

/// The real CPUID.
pub fn host_cpuid(leaf: u32, subleaf: u32) -> Regs {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Regs { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

/// What the host keeps loaded between guests, found once at start-up.
pub struct HostCpu {
    /// The XCR0 the host keeps while no guest runs: every component a
    /// guest may enable, so that XSAVE/XRSTOR move all of them. 0 when the
    /// CPU has no XSAVE (then FXSAVE/FXRSTOR move x87 and SSE).
    pub xcr0: u64,
    /// Bytes of a vCPU's save area.
    pub area_size: usize,
    /// The CPU has IA32_TSC_AUX (RDTSCP or RDPID).
    tsc_aux: bool,
    /// The host's own values of [`SWITCHED_MSRS`].
    msrs: [u64; 6],
}

impl HostCpu {
    /// Turns on what the switching needs (CR4.OSFXSR, OSXMMEXCPT and, with
    /// XSAVE, OSXSAVE and XCR0 = every component a guest may use) and
    /// records the host's MSRs. Runs before any VMCS takes the host's CR4.
    pub fn init() -> HostCpu {
        use x86_64::registers::control::{Cr4, Cr4Flags};
        let leaf1 = host_cpuid(1, 0);
        let has_xsave = leaf1.ecx & (1 << 26) != 0;
        let mut cr4 = Cr4::read() | Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE;
        if has_xsave {
            cr4 |= Cr4Flags::OSXSAVE;
        }
        // SAFETY: enabling FXSAVE/XSAVE support; the kernel uses neither
        // SSE nor AVX itself, so nothing else changes for it.
        unsafe { Cr4::write(cr4) };
        let (xcr0, area_size) = if has_xsave {
            let xcr0 = hvcore::cpuid::xcr0_allowed(&host_cpuid);
            xsetbv(xcr0);
            // CPUID.(0xD,0):EBX is the size for the XCR0 now loaded.
            (xcr0, host_cpuid(0xd, 0).ebx as usize)
        } else {
            (0, 512)
        };
        let ext = host_cpuid(0x8000_0001, 0);
        let tsc_aux = ext.edx & (1 << 27) != 0 || host_cpuid(7, 0).ecx & (1 << 22) != 0;
        let mut msrs = [0; 6];
        for (i, m) in SWITCHED_MSRS.iter().enumerate() {
            if i != TSC_AUX_INDEX || tsc_aux {
                // SAFETY: architectural MSRs of every 64-bit CPU (TSC_AUX checked).
                msrs[i] = unsafe { rdmsr(*m) };
            }
        }
        log::info!(
            "vcpu state: {} area of {area_size} bytes, XCR0 {xcr0:#x}; DR0-3/DR6, {} MSRs and CR2 switched per VM",
            if has_xsave { "XSAVE" } else { "FXSAVE" },
            if tsc_aux { 6 } else { 5 }
        );
        if host_cpuid(7, 0).ecx & (1 << 3) == 0 {
            // Not an error: the guest is shown no PKU either (Bochs'
            // corei7_skylake_x has none; kvm-unit-tests' pku skips).
            log::info!("vcpu: the CPU has no protection keys (CPUID.7.0:ECX.PKU[bit 3] is 0)");
        }
        HostCpu { xcr0, area_size, tsc_aux, msrs }
    }
}

/// A 64-byte aligned save area (XSAVE requires it; FXSAVE needs 16).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

pub struct Vcpu {
    pub vmcs: Vmcs,
    pub regs: GuestRegs,
    pub launched: bool,
    /// The guest's XCR0 (architectural reset value: x87 only).
    pub xcr0: u64,
    area: Vec<Line>,
    dr: [u64; 4],
    dr6: u64,
    msrs: [u64; 6],
    /// The virtual-APIC page: with the TPR shadow, MOV to/from CR8 reads
    /// and writes its TPR byte instead of the real APIC's (Vol. 3C 30.1.1).
    pub vapic: Box<Page>,
    /// The TSC offset in its VMCS (guest TSC = host TSC + offset), kept
    /// here too so that a halted VM's timer can be checked while its VMCS
    /// is not current.
    pub tsc_offset: u64,
    /// IA32_MISC_ENABLE (`hvcore::msrs`).
    pub misc_enable: u64,
    /// IA32_TSC_ADJUST (SDM Vol. 3B 18.17.3): what the guest added to its
    /// TSC with writes to IA32_TSC or to this MSR.
    pub tsc_adjust: u64,
}

/// The TPR's byte in the virtual-APIC page (SDM Vol. 3C 30.1.1).
const VAPIC_TPR: usize = 0x80;

/// The guest's TSC now.
pub fn guest_tsc(vm: &crate::vm::Vm) -> u64 {
    rdtsc().wrapping_add(vm.vcpu.tsc_offset)
}

/// CR8 writes land in the virtual-APIC page without an exit: the model
/// takes the TPR from there before it decides what to deliver.
pub fn sync_tpr_from_shadow(vm: &mut crate::vm::Vm) {
    let tpr = vm.vcpu.vapic.0[VAPIC_TPR];
    if let Some(lapic) = vm.platform.lapic.as_mut() {
        lapic.set_tpr(tpr);
    }
}

/// After the model's TPR changed (an xAPIC or x2APIC write), CR8 reads
/// must see it.
pub fn sync_tpr_to_shadow(vm: &mut crate::vm::Vm) {
    if let Some(lapic) = vm.platform.lapic.as_ref() {
        vm.vcpu.vapic.0[VAPIC_TPR] = lapic.tpr();
    }
}

/// The guest's CR2 (for an injected #PF): loaded on the next entry.
pub fn set_cr2(vm: &mut crate::vm::Vm, cr2: u64) {
    vm.vcpu.regs.cr2 = cr2;
}

/// The guest's general registers in the order of the instruction encoding
/// (SDM Vol. 2A 2.1.5, Table 2-2; RSP lives in the VMCS), for the
/// instruction emulator.
pub struct RegFile<'a>(pub &'a mut GuestRegs);

impl hvcore::emulate::mmio::Gprs for RegFile<'_> {
    fn gpr(&self, n: u8) -> u64 {
        let r = &self.0;
        match n & 15 {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => crate::vmx::vmcs::read(x86::vmx::vmcs::guest::RSP),
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        }
    }

    fn set_gpr(&mut self, n: u8, v: u64) {
        let r = &mut self.0;
        let slot = match n & 15 {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            4 => return crate::vmx::vmcs::set(x86::vmx::vmcs::guest::RSP, v),
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        };
        *slot = v;
    }
}

impl Vcpu {
    pub fn new(vmcs: Vmcs, host: &HostCpu) -> Vcpu {
        let mut area = vec![Line([0; 64]); host.area_size.div_ceil(64)];
        // The legacy region's FCW and MXCSR at their reset values (Vol. 1
        // 13.4.1); the XSAVE header (bytes 512..576) all zero, so XRSTOR
        // puts every other component in its initial state.
        area[0].0[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        area[0].0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        Vcpu {
            vmcs,
            regs: GuestRegs::default(),
            launched: false,
            xcr0: 1,
            area,
            dr: [0; 4],
            dr6: DR6_INIT,
            msrs: [0; 6],
            vapic: Page::zeroed(),
            tsc_offset: 0,
            misc_enable: hvcore::msrs::MISC_ENABLE_RESET,
            tsc_adjust: 0,
        }
    }

    /// Puts this vCPU's state into the CPU before its slice.
    pub fn switch_in(&mut self, host: &HostCpu) {
        let area = self.area.as_mut_ptr() as *mut u8;
        // SAFETY: the area is ours, aligned and `area_size` long, and only
        // ever holds what XSAVE/FXSAVE wrote (or the reset image), so the
        // restore cannot fault on a reserved bit.
        unsafe {
            if host.xcr0 != 0 {
                xrstor(area, host.xcr0);
                xsetbv(self.xcr0);
            } else {
                asm!("fxrstor64 [{}]", in(reg) area, options(nostack, readonly));
            }
            asm!("mov dr0, {}", in(reg) self.dr[0], options(nostack, nomem));
            asm!("mov dr1, {}", in(reg) self.dr[1], options(nostack, nomem));
            asm!("mov dr2, {}", in(reg) self.dr[2], options(nostack, nomem));
            asm!("mov dr3, {}", in(reg) self.dr[3], options(nostack, nomem));
            asm!("mov dr6, {}", in(reg) self.dr6, options(nostack, nomem));
        }
        self.switch_msrs(host, true);
    }

    /// Takes this vCPU's state out of the CPU after its slice and puts the
    /// host's back (XCR0 and the MSRs).
    pub fn switch_out(&mut self, host: &HostCpu) {
        let area = self.area.as_mut_ptr() as *mut u8;
        // SAFETY: as in `switch_in`; XSAVE writes at most `area_size` bytes
        // for the host XCR0 loaded first.
        unsafe {
            if host.xcr0 != 0 {
                xsetbv(host.xcr0);
                xsave(area, host.xcr0);
            } else {
                asm!("fxsave64 [{}]", in(reg) area, options(nostack));
            }
            asm!("mov {}, dr0", out(reg) self.dr[0], options(nostack, nomem));
            asm!("mov {}, dr1", out(reg) self.dr[1], options(nostack, nomem));
            asm!("mov {}, dr2", out(reg) self.dr[2], options(nostack, nomem));
            asm!("mov {}, dr3", out(reg) self.dr[3], options(nostack, nomem));
            asm!("mov {}, dr6", out(reg) self.dr6, options(nostack, nomem));
        }
        self.switch_msrs(host, false);
    }

    fn switch_msrs(&mut self, host: &HostCpu, to_guest: bool) {
        for (i, &msr) in SWITCHED_MSRS.iter().enumerate() {
            if i == TSC_AUX_INDEX && !host.tsc_aux {
                continue;
            }
            // SAFETY: architectural MSRs (TSC_AUX only where it exists);
            // the values are the host's own or what the guest wrote with
            // a WRMSR the CPU accepted (so canonical where it must be).
            unsafe {
                if to_guest {
                    wrmsr(msr, self.msrs[i]);
                } else {
                    self.msrs[i] = rdmsr(msr);
                    wrmsr(msr, host.msrs[i]);
                }
            }
        }
    }
}

/// XSETBV of XCR0 (the kernel's CR4.OSXSAVE is on).
pub fn xsetbv(value: u64) {
    // SAFETY: callers pass XCR0 values the CPU supports (the host mask, or a
    // guest value checked by `hvcore::control_regs::check_xsetbv`).
    unsafe { asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, nomem)) };
}

unsafe fn xsave(area: *mut u8, mask: u64) {
    unsafe { asm!("xsave64 [{}]", in(reg) area, in("eax") mask as u32, in("edx") (mask >> 32) as u32, options(nostack)) };
}

unsafe fn xrstor(area: *const u8, mask: u64) {
    unsafe {
        asm!("xrstor64 [{}]", in(reg) area, in("eax") mask as u32, in("edx") (mask >> 32) as u32, options(nostack, readonly))
    };
}

/// DR6 of the guest now running (its value is live during its slice).
pub fn read_dr6() -> u64 {
    let v: u64;
    // SAFETY: reading a debug register at CPL 0.
    unsafe { asm!("mov {}, dr6", out(reg) v, options(nostack, nomem)) };
    v
}

pub fn write_dr6(v: u64) {
    // SAFETY: callers keep bits 63:32 clear (they OR architectural bits
    // into a value the CPU produced).
    unsafe { asm!("mov dr6, {}", in(reg) v, options(nostack, nomem)) };
}

/// The host's TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects (CR4.TSD only restricts CPL 3).
    unsafe { core::arch::x86_64::_rdtsc() }
}

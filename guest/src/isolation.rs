//! ISOLATION: the CPU state a VM owns survives other VMs running in
//! between. Run several of these VMs at once: each sets every item to
//! values made from its salt (its VM index), YIELDs, and reads them back
//! (`hvcore::hypercall::scenario::ISOLATION` lists the items and checks).
//!
//! Between setting the vector registers and reading them back only Rust
//! code runs, which never touches x87 or SSE/AVX registers (the target is
//! soft-float), so any change comes from outside the guest.

use crate::cpu::*;
use crate::hv;
use crate::trap::{self, Fault};
use core::arch::asm;
use hvcore::hypercall::check;

const YIELDS: u32 = 50;

/// How the VM uses its vector registers, from what XCR0 enables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    /// XMM0-15 (legacy SSE instructions).
    Xmm,
    /// YMM0-15 (VEX).
    Ymm,
    /// ZMM0-31 and k0-7 (EVEX).
    Zmm,
}

/// 32 registers of 8 64-bit lanes, laid out as ZMM0-31: XMMn is lanes 0-1
/// of register n, YMMn lanes 0-3.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Vectors([[u64; 8]; 32]);

/// What pattern a value comes from, so no two items share one.
#[derive(Clone, Copy)]
enum Kind {
    Vector = 1,
    X87,
    Opmask,
    Pkru,
    Cr2,
    Star,
    Lstar,
    Cstar,
    Sfmask,
    KernelGsBase,
    TscAux,
    SysenterEsp,
    SysenterEip,
}

fn pattern(salt: u8, kind: Kind, i: u64) -> u64 {
    mix((salt as u64) << 40 | (kind as u64) << 32 | i)
}

/// The values one VM sets.
struct Plan {
    xcr0: u64,
    fcw: u16,
    x87: [u64; 8],
    mxcsr: u32,
    vectors: Vectors,
    opmask: [u64; 8],
    pkru: u32,
    cr2: u64,
    dr: [u64; 4],
    /// DR6's writable condition bits (B0-3, BD, BS, BT).
    dr6_bits: u64,
    dr7: u64,
    msrs: [(u32, u64); 5],
    tsc_aux: u64,
    cr8: u64,
    pat: u64,
    sysenter: [u64; 3],
}

const DR6_WRITABLE: u64 = 0xe00f;
const SYSENTER_MSRS: [u32; 3] = [MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP];
/// The memory types IA32_PAT accepts (UC, WC, WT, WP, WB, UC-; SDM Vol.
/// 3A 13.12.2): anything else raises #GP.
const PAT_TYPES: [u64; 6] = [0, 1, 4, 5, 6, 7];
const PAT_WB: u64 = 6;

impl Plan {
    fn new(salt: u8, f: &Features) -> Plan {
        let s = salt as u64;
        let xcr0 = if salt % 2 == 1 {
            XCR0_X87 | XCR0_SSE
        } else {
            let mut x = XCR0_X87 | XCR0_SSE;
            if f.avx {
                x |= XCR0_AVX;
            }
            if f.avx && f.avx512f {
                x |= XCR0_AVX512;
            }
            if f.pku {
                x |= XCR0_PKRU;
            }
            x & f.xcr0_supported
        };
        let mut vectors = Vectors([[0; 8]; 32]);
        for (r, reg) in vectors.0.iter_mut().enumerate() {
            for (l, lane) in reg.iter_mut().enumerate() {
                *lane = pattern(salt, Kind::Vector, (r * 8 + l) as u64);
            }
        }
        // x87 control word: all exceptions masked (bits 0-5, and 6 as
        // FNINIT leaves it), precision control single/double/extended
        // (01 is reserved), a rounding mode (SDM Vol. 1 8.1.5).
        let fcw = 0x7f | ((s + 1) % 4) << 10 | [2, 0, 3][(s / 4 % 3) as usize] << 8;
        // FILD/FISTP of 64-bit integers are exact; stay clear of the
        // integer indefinite (0x8000_0000_0000_0000).
        let x87 = core::array::from_fn(|i| pattern(salt, Kind::X87, i as u64) >> 2);
        // MXCSR: exceptions masked, a rounding mode, FZ, some sticky flags;
        // never DAZ (bit 6, not on every CPU) or a reserved bit.
        let mxcsr = (0x1f80 | ((s + 1) % 4) << 13 | (s / 4 % 2) << 15 | (s % 63 + 1)) as u32;
        let mut opmask = core::array::from_fn(|i| pattern(salt, Kind::Opmask, i as u64));
        if !f.avx512bw {
            opmask.iter_mut().for_each(|k| *k &= 0xffff);
        }
        // Keys 1-15 only: key 0 (every page here) stays accessible.
        let pkru = pattern(salt, Kind::Pkru, 0) as u32 & !3;
        // Debug registers: addresses far beyond the guest's 1 GiB mapping,
        // 8-aligned for any length; DR7 enables them (local or global) as
        // write or read/write breakpoints (never instruction ones, which
        // want LEN 00, SDM Vol. 3B 18.2.5) and never sets GD.
        let dr = core::array::from_fn(|i| 0x7f00_0000_0000 | s << 24 | (i as u64) << 12 | 0x100);
        let dr6_bits = ((s + 1) & 0xf) | ((s + 1) % 8) << 13;
        let mut dr7 = DR7_OFF | if salt.is_multiple_of(2) { 0x55 } else { 0xaa } | (s % 2) << 8;
        for i in 0..4u64 {
            let rw = if (s + i).is_multiple_of(2) { 0b01 } else { 0b11 };
            let len = [0b00, 0b01, 0b11, 0b10][((s + i) % 4) as usize];
            dr7 |= (rw | len << 2) << (16 + 4 * i);
        }
        let star = (0x23 + 8 * s) << 48 | (0x10 + 8 * s) << 32 | pattern(salt, Kind::Star, 0) & 0xffff_ffff;
        let msrs = [
            (MSR_STAR, star),
            (MSR_LSTAR, canonical(pattern(salt, Kind::Lstar, 0))),
            (MSR_CSTAR, canonical(pattern(salt, Kind::Cstar, 0))),
            // SFMASK: bits 63:32 are reserved.
            (MSR_SFMASK, pattern(salt, Kind::Sfmask, 0) & 0xffff_ffff),
            (MSR_KERNEL_GS_BASE, canonical(pattern(salt, Kind::KernelGsBase, 0))),
        ];
        // PAT entry 0 (every page here: PAT=PCD=PWT=0) stays WB; entries
        // 1-7 spell the salt in base 6.
        let mut pat = PAT_WB;
        let mut digits = s;
        for i in 1..8u64 {
            pat |= PAT_TYPES[((digits + i) % 6) as usize] << (8 * i);
            digits /= 6;
        }
        Plan {
            xcr0,
            fcw: fcw as u16,
            x87,
            mxcsr,
            vectors,
            opmask,
            pkru,
            cr2: canonical(pattern(salt, Kind::Cr2, 0)),
            dr,
            dr6_bits,
            dr7,
            msrs,
            // TSC_AUX: bits 63:32 are reserved.
            tsc_aux: pattern(salt, Kind::TscAux, 0) & 0xffff_ffff,
            cr8: s % 15 + 1,
            pat,
            sysenter: [
                0x1008 + 8 * s,
                canonical(pattern(salt, Kind::SysenterEsp, 0)),
                canonical(pattern(salt, Kind::SysenterEip, 0)),
            ],
        }
    }
}

/// Loads registers 0.. from `$p`, 64 bytes apart (one `Vectors` row each).
macro_rules! load_regs {
    ($insn:literal, $reg:literal, $p:expr; $($n:literal)*) => {
        // SAFETY: reads one row of `Vectors` per register; the compiler
        // keeps nothing in vector registers (soft-float target).
        unsafe {
            asm!($(concat!($insn, " ", $reg, $n, ", [{p} + 64*", $n, "]"),)* p = in(reg) $p,
                options(nostack, preserves_flags, readonly))
        }
    };
}

/// Stores registers 0.. to `$p`, as [`load_regs`] reads them.
macro_rules! store_regs {
    ($insn:literal, $reg:literal, $p:expr; $($n:literal)*) => {
        // SAFETY: writes one row of `Vectors` per register.
        unsafe {
            asm!($(concat!($insn, " [{p} + 64*", $n, "], ", $reg, $n),)* p = in(reg) $p,
                options(nostack, preserves_flags))
        }
    };
}

fn load_vectors(width: Width, v: &Vectors) {
    let p = v.0.as_ptr();
    match width {
        Width::Xmm => load_regs!("movdqu", "xmm", p; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15),
        Width::Ymm => load_regs!("vmovdqu", "ymm", p; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15),
        Width::Zmm => load_regs!("vmovdqu64", "zmm", p;
            0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31),
    }
}

fn store_vectors(width: Width, v: &mut Vectors) {
    let p = v.0.as_mut_ptr();
    match width {
        Width::Xmm => store_regs!("movdqu", "xmm", p; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15),
        Width::Ymm => store_regs!("vmovdqu", "ymm", p; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15),
        Width::Zmm => store_regs!("vmovdqu64", "zmm", p;
            0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31),
    }
}

/// k0-7 from/to `k` (8 bytes apart): KMOVQ with AVX512BW, else KMOVW.
fn load_opmask(bw: bool, k: &[u64; 8]) {
    let p = k.as_ptr();
    // SAFETY: reads `k`; the compiler never uses opmask registers.
    unsafe {
        if bw {
            asm!("kmovq k0, [{p}]", "kmovq k1, [{p} + 8]", "kmovq k2, [{p} + 16]", "kmovq k3, [{p} + 24]",
                "kmovq k4, [{p} + 32]", "kmovq k5, [{p} + 40]", "kmovq k6, [{p} + 48]", "kmovq k7, [{p} + 56]",
                p = in(reg) p, options(nostack, preserves_flags, readonly));
        } else {
            asm!("kmovw k0, [{p}]", "kmovw k1, [{p} + 8]", "kmovw k2, [{p} + 16]", "kmovw k3, [{p} + 24]",
                "kmovw k4, [{p} + 32]", "kmovw k5, [{p} + 40]", "kmovw k6, [{p} + 48]", "kmovw k7, [{p} + 56]",
                p = in(reg) p, options(nostack, preserves_flags, readonly));
        }
    }
}

fn store_opmask(bw: bool) -> [u64; 8] {
    let mut k = [0u64; 8];
    let p = k.as_mut_ptr();
    // SAFETY: writes `k`.
    unsafe {
        if bw {
            asm!("kmovq [{p}], k0", "kmovq [{p} + 8], k1", "kmovq [{p} + 16], k2", "kmovq [{p} + 24], k3",
                "kmovq [{p} + 32], k4", "kmovq [{p} + 40], k5", "kmovq [{p} + 48], k6", "kmovq [{p} + 56], k7",
                p = in(reg) p, options(nostack, preserves_flags));
        } else {
            asm!("kmovw [{p}], k0", "kmovw [{p} + 8], k1", "kmovw [{p} + 16], k2", "kmovw [{p} + 24], k3",
                "kmovw [{p} + 32], k4", "kmovw [{p} + 40], k5", "kmovw [{p} + 48], k6", "kmovw [{p} + 56], k7",
                p = in(reg) p, options(nostack, preserves_flags));
        }
    }
    k
}

/// FNINIT, the control word, then pushes `v[0]` .. `v[7]` (ST0 = `v[7]`).
fn load_x87(fcw: u16, v: &[u64; 8]) {
    // SAFETY: x87 state only; the compiler never uses it.
    unsafe {
        asm!("fninit", "fldcw word ptr [{cw}]",
            "fild qword ptr [{v}]", "fild qword ptr [{v} + 8]", "fild qword ptr [{v} + 16]",
            "fild qword ptr [{v} + 24]", "fild qword ptr [{v} + 32]", "fild qword ptr [{v} + 40]",
            "fild qword ptr [{v} + 48]", "fild qword ptr [{v} + 56]",
            cw = in(reg) &fcw, v = in(reg) v.as_ptr(), options(nostack, readonly));
    }
}

/// The control word, then pops the stack back into the order of [`load_x87`].
fn store_x87() -> (u16, [u64; 8]) {
    let mut fcw = 0u16;
    let mut v = [0u64; 8];
    // SAFETY: writes `fcw` and `v`.
    unsafe {
        asm!("fnstcw word ptr [{cw}]",
            "fistp qword ptr [{v} + 56]", "fistp qword ptr [{v} + 48]", "fistp qword ptr [{v} + 40]",
            "fistp qword ptr [{v} + 32]", "fistp qword ptr [{v} + 24]", "fistp qword ptr [{v} + 16]",
            "fistp qword ptr [{v} + 8]", "fistp qword ptr [{v}]",
            cw = in(reg) &mut fcw, v = in(reg) v.as_mut_ptr(), options(nostack));
    }
    (fcw, v)
}

fn load_mxcsr(v: u32) {
    // SAFETY: valid MXCSR bits only (see `Plan::new`).
    unsafe { asm!("ldmxcsr dword ptr [{}]", in(reg) &v, options(nostack, readonly)) };
}

fn store_mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: writes `v`.
    unsafe { asm!("stmxcsr dword ptr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn wrpkru(v: u32) -> Result<(), Fault> {
    // SAFETY: PKRU only guards user pages; this guest has none.
    unsafe { crate::probe!("wrpkru"; in("eax") v, in("ecx") 0, in("edx") 0, options(nostack)) }
}

fn rdpkru() -> Result<u64, Fault> {
    let v: u32;
    // SAFETY: no side effects; a #UD is caught.
    unsafe { crate::probe!("rdpkru"; in("ecx") 0, out("eax") v, out("edx") _, options(nostack)) }?;
    Ok(v as u64)
}

/// TSC_AUX as RDTSCP puts it in ECX.
fn rdtscp_aux() -> Result<u64, Fault> {
    let v: u32;
    // SAFETY: no side effects; a #UD is caught.
    unsafe { crate::probe!("rdtscp"; out("ecx") v, out("eax") _, out("edx") _, options(nostack)) }?;
    Ok(v as u64)
}

fn rdpid() -> Result<u64, Fault> {
    let v: u64;
    // SAFETY: no side effects; a #UD is caught.
    unsafe { crate::probe!("rdpid {v}"; v = out(reg) v, options(nostack)) }?;
    Ok(v)
}

/// What the VM reads back after the YIELDs.
struct Seen {
    vectors: Vectors,
    opmask: [u64; 8],
    fcw: u16,
    x87: [u64; 8],
    mxcsr: u32,
    pkru: Result<u64, Fault>,
    xcr0: Result<u64, Fault>,
    cr2: u64,
    dr: [u64; 4],
    dr6: u64,
    dr7: u64,
    msrs: [Result<u64, Fault>; 5],
    tsc_aux: [Result<u64, Fault>; 3],
    cr8: u64,
    pat: Result<u64, Fault>,
    sysenter: [Result<u64, Fault>; 3],
}

/// Exceptions raised while setting items, by check id.
struct SetFaults([Option<Fault>; 30]);

impl SetFaults {
    fn note(&mut self, id: u64, r: Result<(), Fault>) {
        if let Err(f) = r {
            self.0[(id - check::ISO_SETUP) as usize].get_or_insert(f);
        }
    }

    fn get(&self, id: u64) -> Option<Fault> {
        self.0[(id - check::ISO_SETUP) as usize]
    }
}

/// REPORTs `id`: a pass when every value read equals its want. Each entry
/// is (register, lane, read, want); `mask` picks the bits compared. The
/// detail is the first wrong value (or the exception), else the last one.
fn verdict(
    id: u64,
    what: &str,
    set: Option<Fault>,
    mask: u64,
    entries: impl IntoIterator<Item = (usize, usize, Result<u64, Fault>, u64)>,
) -> bool {
    if let Some(f) = set {
        crate::println!("isolation: setting {what} raised exception {} (error code {:#x})", f.vector, f.code);
        return hv::report(id, false, f.detail());
    }
    let mut last = 0;
    for (reg, lane, got, want) in entries {
        match got {
            Err(f) => {
                crate::println!("isolation: reading {what} {reg}.{lane} raised exception {}", f.vector);
                return hv::report(id, false, f.detail());
            }
            Ok(v) if v & mask != want & mask => {
                crate::println!("isolation: {what} {reg}.{lane} is {v:#x}, want {want:#x} (mask {mask:#x})");
                return hv::report(id, false, v);
            }
            Ok(v) => last = v,
        }
    }
    hv::report(id, true, last)
}

/// One value: `verdict` with a single entry.
fn verdict1(id: u64, what: &str, set: Option<Fault>, got: Result<u64, Fault>, want: u64) -> bool {
    verdict(id, what, set, u64::MAX, [(0, 0, got, want)])
}

/// An XSETBV check: #GP(0), and XCR0 read again (`after`) still `before`.
fn expect_gp_unchanged(id: u64, what: &str, r: Result<(), Fault>, before: u64, after: u64) -> bool {
    let (gp, detail) = trap::expect_gp0(r);
    if !gp {
        crate::println!("isolation: {what}: want #GP(0), got detail {detail:#x}");
    }
    if after != before {
        crate::println!("isolation: {what}: XCR0 changed from {before:#x} to {after:#x}");
        return hv::report(id, false, after);
    }
    hv::report(id, gp, detail)
}

fn xcr0() -> u64 {
    xgetbv(0).unwrap_or(u64::MAX)
}

/// The XSETBV checks 103-107; XCR0 is back at its value before.
fn xsetbv_checks(f: &Features) -> bool {
    let before = xcr0();
    let unsupported = (!f.xcr0_supported).trailing_zeros();
    let tries = [
        (check::XSETBV_ZERO_GP, "XCR0 = 0", 0, 0),
        (check::XSETBV_AVX_WITHOUT_SSE_GP, "AVX without SSE", 0, XCR0_X87 | XCR0_AVX),
        (check::XSETBV_ECX_GP, "ECX = 1", 1, before),
        (check::XSETBV_UNSUPPORTED_GP, "an unsupported bit", 0, XCR0_X87 | XCR0_SSE | 1 << unsupported),
        (check::XSETBV_AVX512_PARTIAL_GP, "opmask without ZMM", 0, XCR0_X87 | XCR0_SSE | XCR0_AVX | 1 << 5),
    ];
    let mut ok = true;
    for (id, what, ecx, value) in tries {
        if id == check::XSETBV_AVX512_PARTIAL_GP && !f.avx512f {
            continue;
        }
        // SDM Vol. 2D XSETBV: #GP(0) if ECX != 0, bit 0 clear, bit 2
        // without bit 1, XCR0[7:5] not all equal (or set without bit 2),
        // or a bit the processor does not support.
        let r = xsetbv(ecx, value);
        let after = xcr0();
        ok &= expect_gp_unchanged(id, what, r, before, after);
        if after != before {
            let _ = xsetbv(0, before);
        }
    }
    ok
}

/// CPUID.1:ECX.OSXSAVE with CR4.OSXSAVE set, cleared, set again (check 102).
fn osxsave_mirror(cr4_now: u64) -> bool {
    const OSXSAVE_BIT: u32 = 1 << 27;
    let ecx = || cpuid(1, 0).2;
    let set1 = ecx();
    let cleared = set_cr4(cr4_now & !CR4_OSXSAVE).map(|()| ecx());
    let set2 = set_cr4(cr4_now).map(|()| ecx());
    verdict(
        check::ISO_OSXSAVE_MIRROR,
        "CPUID.1:ECX (OSXSAVE with CR4.OSXSAVE set, clear, set)",
        None,
        OSXSAVE_BIT as u64,
        [
            (0, 0, Ok(set1 as u64), OSXSAVE_BIT as u64),
            (1, 0, cleared.map(|v| v as u64), 0),
            (2, 0, set2.map(|v| v as u64), OSXSAVE_BIT as u64),
        ],
    )
}

/// CR0.MP, !EM, !TS; CR4.OSFXSR, OSXMMEXCPT, OSXSAVE, PKE: what SSE,
/// XSAVE and PKRU need (SDM Vol. 3A 13.1, 2.5).
fn setup(f: &Features) -> Result<u64, Fault> {
    let cr0_now = cr0();
    let want = (cr0_now | CR0_MP) & !(CR0_EM | CR0_TS);
    if want != cr0_now {
        set_cr0(want)?;
    }
    let mut cr4_want = cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT;
    if f.xsave {
        cr4_want |= CR4_OSXSAVE;
    }
    if f.pku {
        cr4_want |= CR4_PKE;
    }
    set_cr4(cr4_want)?;
    Ok(cr4())
}

pub fn run(vm: u8) -> ! {
    let salt = vm;
    let f = Features::read();
    crate::println!(
        "isolation: salt {salt}; XSAVE {} AVX {} AVX-512 {} (BW {}) PKU {} RDTSCP {} RDPID {}; XCR0 may be {:#x}",
        f.xsave, f.avx, f.avx512f, f.avx512bw, f.pku, f.rdtscp, f.rdpid, f.xcr0_supported
    );
    let cr4_now = match setup(&f) {
        Ok(cr4) => {
            hv::report(check::ISO_SETUP, true, cr4);
            cr4
        }
        Err(e) => {
            crate::println!("isolation: enabling SSE/XSAVE raised exception {}", e.vector);
            hv::report(check::ISO_SETUP, false, e.detail());
            hv::exit(1)
        }
    };
    let (_, _, ecx, _) = cpuid(1, 0);
    let mut ok = hv::report(check::ISO_MONITOR_HIDDEN, ecx & (1 << 3) == 0, ecx as u64);
    if f.xsave {
        ok &= osxsave_mirror(cr4_now);
        ok &= xsetbv_checks(&f);
    }

    // Set every item. The vector state goes first, so the exits the other
    // writes cause (MSRs, debug registers) come between it and the reads.
    let plan = Plan::new(salt, &f);
    let mut faults = SetFaults([None; 30]);
    if f.xsave {
        faults.note(check::ISO_XCR0, xsetbv(0, plan.xcr0));
    }
    // What XCR0 really enables decides which instructions may run.
    let enabled = if f.xsave { xcr0() } else { XCR0_X87 | XCR0_SSE };
    let width = if enabled & (XCR0_AVX | XCR0_AVX512) == XCR0_AVX | XCR0_AVX512 {
        Width::Zmm
    } else if enabled & XCR0_AVX != 0 {
        Width::Ymm
    } else {
        Width::Xmm
    };
    crate::println!("isolation: XCR0 {enabled:#x}: using {width:?} registers; now {YIELDS} YIELDs");
    load_x87(plan.fcw, &plan.x87);
    load_mxcsr(plan.mxcsr);
    load_vectors(width, &plan.vectors);
    if width == Width::Zmm {
        load_opmask(f.avx512bw, &plan.opmask);
    }
    if f.pku {
        faults.note(check::ISO_PKRU, wrpkru(plan.pkru));
    }
    faults.note(check::ISO_CR2, set_cr2(plan.cr2));
    for (n, &v) in plan.dr.iter().enumerate() {
        faults.note(check::ISO_DR0_3, set_dr(n as u8, v));
    }
    faults.note(check::ISO_DR6, set_dr(6, DR6_CLEAR | plan.dr6_bits));
    faults.note(check::ISO_DR7, set_dr(7, plan.dr7));
    for (i, &(msr, v)) in plan.msrs.iter().enumerate() {
        faults.note(check::ISO_STAR + i as u64, wrmsr(msr, v));
    }
    if f.rdtscp {
        faults.note(check::ISO_TSC_AUX, wrmsr(MSR_TSC_AUX, plan.tsc_aux));
    }
    faults.note(check::ISO_CR8, set_cr8(plan.cr8));
    faults.note(check::ISO_PAT, wrmsr(MSR_PAT, plan.pat));
    for (&msr, &v) in SYSENTER_MSRS.iter().zip(&plan.sysenter) {
        faults.note(check::ISO_SYSENTER, wrmsr(msr, v));
    }

    for _ in 0..YIELDS {
        hv::yield_now();
    }

    // Read it all back, the vector state first.
    let mut seen = Seen {
        vectors: Vectors([[0; 8]; 32]),
        opmask: [0; 8],
        fcw: 0,
        x87: [0; 8],
        mxcsr: 0,
        pkru: Ok(0),
        xcr0: Ok(0),
        cr2: 0,
        dr: [0; 4],
        dr6: 0,
        dr7: 0,
        msrs: [Ok(0); 5],
        tsc_aux: [Ok(0); 3],
        cr8: 0,
        pat: Ok(0),
        sysenter: [Ok(0); 3],
    };
    store_vectors(width, &mut seen.vectors);
    if width == Width::Zmm {
        seen.opmask = store_opmask(f.avx512bw);
    }
    (seen.fcw, seen.x87) = store_x87();
    seen.mxcsr = store_mxcsr();
    if f.pku {
        seen.pkru = rdpkru();
    }
    if f.xsave {
        seen.xcr0 = xgetbv(0);
    }
    seen.cr2 = cr2();
    seen.dr = core::array::from_fn(|n| dr(n as u8));
    seen.dr6 = dr(6);
    seen.dr7 = dr(7);
    seen.msrs = core::array::from_fn(|i| rdmsr(plan.msrs[i].0));
    if f.rdtscp {
        seen.tsc_aux = [rdmsr(MSR_TSC_AUX), rdtscp_aux(), if f.rdpid { rdpid() } else { rdtscp_aux() }];
    }
    seen.cr8 = cr8();
    seen.pat = rdmsr(MSR_PAT);
    seen.sysenter = SYSENTER_MSRS.map(rdmsr);
    // Put the breakpoints away before anything else runs.
    let _ = set_dr(7, DR7_OFF);

    ok &= report_all(&f, &plan, &seen, &faults, width);
    if salt % 2 == 1 && f.avx {
        // XCR0 lacks AVX, so every VEX instruction is #UD (SDM Vol. 1 14.3).
        // SAFETY: changes XMM15 only, after its check.
        let r = unsafe { crate::probe!("vpxor xmm15, xmm15, xmm15"; options(nostack)) };
        let pass = matches!(r, Err(e) if e.vector == trap::UD);
        ok &= hv::report(check::ISO_AVX_OFF_UD, pass, r.err().map_or(check::NO_FAULT, |e| e.detail()));
    }
    hv::exit(!ok as u64)
}

fn report_all(f: &Features, plan: &Plan, seen: &Seen, faults: &SetFaults, width: Width) -> bool {
    let mut ok = true;
    if f.xsave {
        ok &= verdict1(check::ISO_XCR0, "XCR0", faults.get(check::ISO_XCR0), seen.xcr0, plan.xcr0);
    }
    let x87 = core::iter::once((0, 0, Ok(seen.fcw as u64), plan.fcw as u64))
        .chain((0..8).map(|i| (i, 1, Ok(seen.x87[i]), plan.x87[i])));
    ok &= verdict(check::ISO_X87, "x87 (control word 0.0, value i.1)", None, u64::MAX, x87);
    ok &= verdict1(check::ISO_MXCSR, "MXCSR", None, Ok(seen.mxcsr as u64), plan.mxcsr as u64);
    let lanes = |regs: core::ops::Range<usize>, lanes: core::ops::Range<usize>| {
        regs.flat_map(move |r| lanes.clone().map(move |l| (r, l)))
            .map(|(r, l)| (r, l, Ok(seen.vectors.0[r][l]), plan.vectors.0[r][l]))
    };
    ok &= verdict(check::ISO_XMM, "XMM", None, u64::MAX, lanes(0..16, 0..2));
    if width != Width::Xmm {
        ok &= verdict(check::ISO_YMM, "YMM", None, u64::MAX, lanes(0..16, 2..4));
    }
    if width == Width::Zmm {
        ok &= verdict(check::ISO_ZMM, "ZMM", None, u64::MAX, lanes(0..16, 4..8).chain(lanes(16..32, 0..8)));
        let k = (0..8).map(|i| (i, 0, Ok(seen.opmask[i]), plan.opmask[i]));
        ok &= verdict(check::ISO_OPMASK, "k", None, u64::MAX, k);
    }
    if f.pku {
        ok &= verdict1(check::ISO_PKRU, "PKRU", faults.get(check::ISO_PKRU), seen.pkru, plan.pkru as u64);
    }
    ok &= verdict1(check::ISO_CR2, "CR2", faults.get(check::ISO_CR2), Ok(seen.cr2), plan.cr2);
    let drs = (0..4).map(|n| (n, 0, Ok(seen.dr[n]), plan.dr[n]));
    ok &= verdict(check::ISO_DR0_3, "DR", faults.get(check::ISO_DR0_3), u64::MAX, drs);
    let dr6 = [(6, 0, Ok(seen.dr6), plan.dr6_bits)];
    ok &= verdict(check::ISO_DR6, "DR6", faults.get(check::ISO_DR6), DR6_WRITABLE, dr6);
    ok &= verdict1(check::ISO_DR7, "DR7", faults.get(check::ISO_DR7), Ok(seen.dr7), plan.dr7);
    const MSR_NAMES: [&str; 5] = ["STAR", "LSTAR", "CSTAR", "SFMASK", "KERNEL_GS_BASE"];
    for (i, &(_, want)) in plan.msrs.iter().enumerate() {
        let id = check::ISO_STAR + i as u64;
        ok &= verdict1(id, MSR_NAMES[i], faults.get(id), seen.msrs[i], want);
    }
    if f.rdtscp {
        let aux = (0..3).map(|i| (i, 0, seen.tsc_aux[i], plan.tsc_aux));
        let what = "TSC_AUX (0: RDMSR, 1: RDTSCP, 2: RDPID or RDTSCP)";
        ok &= verdict(check::ISO_TSC_AUX, what, faults.get(check::ISO_TSC_AUX), u64::MAX, aux);
    }
    ok &= verdict1(check::ISO_CR8, "CR8", faults.get(check::ISO_CR8), Ok(seen.cr8), plan.cr8);
    ok &= verdict1(check::ISO_PAT, "PAT", faults.get(check::ISO_PAT), seen.pat, plan.pat);
    let sysenter = (0..3).map(|i| (i, 0, seen.sysenter[i], plan.sysenter[i]));
    let what = "SYSENTER (0: CS, 1: ESP, 2: EIP)";
    ok &= verdict(check::ISO_SYSENTER, what, faults.get(check::ISO_SYSENTER), u64::MAX, sysenter);
    ok
}

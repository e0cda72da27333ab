//! What a guest sees of CPUID: a whitelist, per leaf and register, of the
//! features that work under this hypervisor; every other bit reads as 0.
//!
//! The guest is a uniprocessor with a local APIC only where its VM has the
//! virtual one (`devices::lapic`: xAPIC, x2APIC, TSC deadline), no PMU, no MCA or
//! MTRR MSRs and no MONITOR/MWAIT, and it runs without VMX of its own. A
//! feature is shown only when the host has it and, where it needs more, when
//! that is there too: vector features only with their XSAVE components in
//! the XCR0 the guest may set, RDTSCP/RDPID and INVPCID only with their VMX
//! controls on, the OS bits (OSXSAVE, OSPKE) mirroring the guest's CR4.
//! Bit 31 of CPUID.1:ECX says a hypervisor is present, and our vendor leaf is
//! at 0x4000_0000 (the range reserved for hypervisors).

use core::cmp::{max, min};

pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// Twelve bytes, returned in EBX, ECX, EDX of the hypervisor leaf.
pub const VENDOR: &[u8; 12] = b"HvDedupeRust";

/// The highest basic leaf a guest is shown (the host's, if lower).
pub const MAX_BASIC_LEAF: u32 = 0x1F;
/// The first extended leaf.
pub const EXT_LEAF_BASE: u32 = 0x8000_0000;
/// The highest extended leaf a guest is shown (the host's, if lower).
pub const MAX_EXT_LEAF: u32 = 0x8000_0008;

/// XCR0 state components (SDM Vol. 1, 13.1).
pub const XCR0_X87: u64 = 1; // bit 0
pub const XCR0_SSE: u64 = 1 << 1;
pub const XCR0_AVX: u64 = 1 << 2;
pub const XCR0_OPMASK: u64 = 1 << 5;
pub const XCR0_ZMM_HI256: u64 = 1 << 6;
pub const XCR0_HI16_ZMM: u64 = 1 << 7;
/// The three AVX-512 components (5, 6, 7), enabled only all together (SDM
/// Vol. 1, 13.3).
pub const XCR0_AVX512: u64 = 0xE0;
const _: () = assert!(XCR0_AVX512 == XCR0_OPMASK | XCR0_ZMM_HI256 | XCR0_HI16_ZMM);
pub const XCR0_PKRU: u64 = 1 << 9;
/// The components a guest may ever enable (x87, SSE, AVX, AVX-512, PKRU):
/// those whose state the vCPU saves and restores. Not MPX (3, 4: deprecated,
/// BNDCFGS is not switched) nor AMX (17, 18: needs XFD and 8 KiB per vCPU).
pub const XCR0_SUPPORTED: u64 = 0x2E7;
const _: () = assert!(XCR0_SUPPORTED == XCR0_X87 | XCR0_SSE | XCR0_AVX | XCR0_AVX512 | XCR0_PKRU);
// All of them are in CPUID.(0xD,0):EAX, so EDX (components 32-63) is always 0.
const _: () = assert!(XCR0_SUPPORTED >> 32 == 0);

/// The legacy region and the XSAVE header of an XSAVE area (SDM Vol. 1, 13.4).
pub const XSAVE_LEGACY_AND_HEADER: u32 = 512 + 64;

/// CPUID.1:ECX bits that other code needs by name.
pub const LEAF1_ECX_VMX: u32 = 1 << 5;
pub const LEAF1_ECX_XSAVE: u32 = 1 << 26;
pub const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.(7,0):ECX bits.
pub const LEAF7_ECX_PKU: u32 = 1 << 3;
pub const LEAF7_ECX_OSPKE: u32 = 1 << 4;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// What CPUID answers depend on besides the host: guest control state and
/// the VMX features the kernel enabled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestView {
    /// Guest CR4.OSXSAVE: CPUID.1:ECX[27] mirrors it.
    pub cr4_osxsave: bool,
    /// Guest CR4.PKE: CPUID.(7,0):ECX[4] OSPKE mirrors it (only if PKU is shown).
    pub cr4_pke: bool,
    /// XCR0 bits the guest may set (from [`xcr0_allowed`]). Only what the
    /// host allows too is used; 0 hides XSAVE and everything that needs it.
    pub xcr0_allowed: u64,
    /// The "enable RDTSCP" VMX control is on: RDTSCP (0x8000_0001:EDX[27])
    /// and RDPID (7.0:ECX[22]) may be shown.
    pub rdtscp: bool,
    /// The "enable INVPCID" control is on: INVPCID (7.0:EBX[10]) may be shown.
    pub invpcid: bool,
    /// The VM has the virtual local APIC: x2APIC (1:ECX[21]) and
    /// TSC-deadline (1:ECX[24]) are shown, whatever the host has (the guest
    /// never touches the host's APIC).
    pub lapic: bool,
    /// ... and it is enabled in IA32_APIC_BASE: APIC (1:EDX[9]) is shown
    /// (a CPU clears the bit while its APIC is globally disabled, SDM
    /// Vol. 3A 11.4.3).
    pub apic_enabled: bool,
    /// The guest TSC's rate in Hz, which the hypervisor measured; 0 if it
    /// did not (leaves 0x15 and 0x16 are then the host's). With it, leaf
    /// 0x15 says a crystal of that rate at a TSC/crystal ratio of 1 (so the
    /// APIC timer, which counts TSC ticks, runs at the crystal rate as the
    /// SDM's Table 20-91 footnote says it does on these CPUs) and leaf 0x16
    /// gives it as the base frequency: a guest learns the rate without
    /// calibrating against a timer (Linux: native_calibrate_tsc).
    pub tsc_hz: u64,
    /// The guest's XCR0 now: the XSAVE area sizes of leaf 0xD subleaves 0
    /// and 1 are for it.
    pub xcr0: u64,
}

/// CPUID.(7,0):EBX[1]: IA32_TSC_ADJUST exists.
pub const LEAF7_EBX_TSC_ADJUST: u32 = 1 << 1;

/// The leaf that gives the TSC and crystal frequencies, and the one that
/// gives the processor frequencies (SDM Vol. 2A, CPUID).
pub const TSC_LEAF: u32 = 0x15;
pub const FREQUENCY_LEAF: u32 = 0x16;

/// What, besides the host having it, a whitelisted bit needs to be shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Always,
    /// XSAVE usable: x87 state in the allowed XCR0.
    Xsave,
    /// XSAVE shown and guest CR4.OSXSAVE set.
    OsXsave,
    /// AVX state (YMM upper halves) in the allowed XCR0.
    Avx,
    /// The three AVX-512 components in the allowed XCR0.
    Avx512,
    /// PKRU state in the allowed XCR0.
    Pkru,
    /// PKU shown and guest CR4.PKE set.
    OsPke,
    /// The "enable RDTSCP" VMX control.
    Rdtscp,
    /// The "enable INVPCID" VMX control.
    Invpcid,
    /// The VM's virtual local APIC.
    Lapic,
    /// ... enabled in IA32_APIC_BASE.
    ApicEnabled,
}

/// One bit of a whitelisted register.
#[derive(Clone, Copy, Debug)]
enum Bit {
    /// The host's bit, when the gate is open.
    Host(u32, Gate),
    /// Set when the gate is open, whatever the host's bit says.
    Set(u32, Gate),
}

use Bit::{Host, Set};
use Gate::{Always, ApicEnabled, Avx, Avx512, Invpcid, Lapic, OsPke, OsXsave, Pkru, Rdtscp, Xsave};

// The whitelists (SDM Vol. 2A, CPUID, tables 3-8 and 3-10 for the bits).

const LEAF1_ECX: &[Bit] = &[
    Host(0, Always),  // SSE3
    Host(1, Always),  // PCLMULQDQ
    Host(9, Always),  // SSSE3
    Host(12, Avx),    // FMA
    Host(13, Always), // CMPXCHG16B
    Host(17, Always), // PCID
    Host(19, Always), // SSE4.1
    Host(20, Always), // SSE4.2
    Set(21, Lapic),   // x2APIC
    Host(22, Always), // MOVBE
    Host(23, Always), // POPCNT
    Set(24, Lapic),   // TSC-deadline timer mode
    Host(25, Always), // AES
    Host(26, Xsave),  // XSAVE
    Set(27, OsXsave), // OSXSAVE: mirrors guest CR4.OSXSAVE
    Host(28, Avx),    // AVX
    Host(29, Avx),    // F16C
    Host(30, Always), // RDRAND
    Set(31, Always),  // hypervisor present
];

const LEAF1_EDX: &[Bit] = &[
    Host(0, Always),  // FPU
    Host(1, Always),  // VME
    Host(2, Always),  // DE
    Host(3, Always),  // PSE
    Host(4, Always),  // TSC
    Host(5, Always),  // MSR
    Host(6, Always),  // PAE
    Host(8, Always),  // CX8
    Set(9, ApicEnabled), // APIC on chip, enabled
    Host(11, Always), // SEP (SYSENTER/SYSEXIT)
    Host(13, Always), // PGE
    Host(15, Always), // CMOV
    Host(16, Always), // PAT
    Host(17, Always), // PSE-36
    Host(19, Always), // CLFSH
    Host(23, Always), // MMX
    Host(24, Always), // FXSR
    Host(25, Always), // SSE
    Host(26, Always), // SSE2
];

const LEAF7_EBX: &[Bit] = &[
    Host(0, Always),  // FSGSBASE
    Set(1, Always),   // IA32_TSC_ADJUST: the hypervisor has it for every VM
    Host(3, Always),  // BMI1
    Host(4, Always),  // HLE
    Host(5, Avx),     // AVX2
    Host(6, Always),  // FDP_EXCPTN_ONLY
    Host(7, Always),  // SMEP
    Host(8, Always),  // BMI2
    Host(9, Always),  // ERMS
    Host(10, Invpcid), // INVPCID
    Host(11, Always), // RTM
    Host(13, Always), // FPU CS/DS deprecated
    Host(16, Avx512), // AVX512F
    Host(17, Avx512), // AVX512DQ
    Host(18, Always), // RDSEED
    Host(19, Always), // ADX
    Host(20, Always), // SMAP
    Host(21, Avx512), // AVX512_IFMA
    Host(23, Always), // CLFLUSHOPT
    Host(24, Always), // CLWB
    Host(28, Avx512), // AVX512CD
    Host(29, Always), // SHA
    Host(30, Avx512), // AVX512BW
    Host(31, Avx512), // AVX512VL
];

const LEAF7_ECX: &[Bit] = &[
    Host(1, Avx512),  // AVX512_VBMI
    Host(2, Always),  // UMIP
    Host(3, Pkru),    // PKU
    Set(4, OsPke),    // OSPKE: mirrors guest CR4.PKE
    Host(6, Avx512),  // AVX512_VBMI2
    Host(8, Always),  // GFNI (has legacy-SSE forms)
    Host(9, Avx),     // VAES (VEX/EVEX only)
    Host(10, Avx),    // VPCLMULQDQ (VEX/EVEX only)
    Host(11, Avx512), // AVX512_VNNI
    Host(12, Avx512), // AVX512_BITALG
    Host(14, Avx512), // AVX512_VPOPCNTDQ
    Host(22, Rdtscp), // RDPID (the "enable RDTSCP" control governs it too)
    Host(25, Always), // CLDEMOTE
    Host(27, Always), // MOVDIRI
    Host(28, Always), // MOVDIR64B
];

/// Bits 26-31 (IBRS/IBPB, STIBP, L1D_FLUSH, ARCH_CAPABILITIES, CORE_CAPABILITIES,
/// SSBD) stay hidden: their MSRs would #GP here.
const LEAF7_EDX: &[Bit] = &[
    Host(2, Avx512),  // AVX512_4VNNIW
    Host(3, Avx512),  // AVX512_4FMAPS
    Host(4, Always),  // fast short REP MOV
    Host(8, Avx512),  // AVX512_VP2INTERSECT
    Host(10, Always), // MD_CLEAR
    Host(14, Always), // SERIALIZE
    Host(23, Avx512), // AVX512_FP16
];

const LEAF7_1_EAX: &[Bit] = &[
    Host(4, Avx),    // AVX-VNNI
    Host(5, Avx512), // AVX512_BF16
];

/// XSAVES (3) and XFD (4) stay hidden: IA32_XSS and IA32_XFD are not
/// switched, and the "enable XSAVES/XRSTORS" control is off.
const LEAFD_1_EAX: &[Bit] = &[
    Host(0, Always), // XSAVEOPT
    Host(1, Always), // XSAVEC
    Host(2, Always), // XGETBV with ECX = 1
];

const EXT1_ECX: &[Bit] = &[
    Host(0, Always), // LAHF/SAHF in 64-bit mode
    Host(5, Always), // LZCNT
    Host(8, Always), // PREFETCHW
];

const EXT1_EDX: &[Bit] = &[
    Host(11, Always), // SYSCALL/SYSRET
    Host(20, Always), // NX
    Host(26, Always), // 1-GByte pages
    Host(27, Rdtscp), // RDTSCP
    Host(29, Always), // Intel 64
];

/// Leaf 4 EAX bits 13:0 (cache type, level, self-initializing, fully
/// associative). Bits 25:14 (threads sharing the cache - 1) and 31:26
/// (cores in the package - 1) read 0: one core, one thread.
const LEAF4_EAX_KEEP: u32 = 0x3FFF;

/// Which gates are open for this guest.
#[derive(Clone, Copy, Debug)]
struct Shown {
    xsave: bool,
    osxsave: bool,
    avx: bool,
    avx512: bool,
    pkru: bool,
    ospke: bool,
    rdtscp: bool,
    invpcid: bool,
    lapic: bool,
    apic_enabled: bool,
}

impl Shown {
    /// `xcr0` is the effective allowed XCR0 ([`effective_xcr0`]). OSPKE is
    /// left closed: only leaf 7 knows whether the host has PKU.
    fn new(xcr0: u64, view: &GuestView) -> Shown {
        let xsave = xcr0 & XCR0_X87 != 0;
        Shown {
            xsave,
            osxsave: xsave && view.cr4_osxsave,
            avx: xcr0 & XCR0_AVX != 0,
            avx512: xcr0 & XCR0_AVX512 == XCR0_AVX512,
            pkru: xcr0 & XCR0_PKRU != 0,
            ospke: false,
            rdtscp: view.rdtscp,
            invpcid: view.invpcid,
            lapic: view.lapic,
            apic_enabled: view.lapic && view.apic_enabled,
        }
    }

    fn open(&self, gate: Gate) -> bool {
        match gate {
            Always => true,
            Xsave => self.xsave,
            OsXsave => self.osxsave,
            Avx => self.avx,
            Avx512 => self.avx512,
            Pkru => self.pkru,
            OsPke => self.ospke,
            Rdtscp => self.rdtscp,
            Invpcid => self.invpcid,
            Lapic => self.lapic,
            ApicEnabled => self.apic_enabled,
        }
    }

    /// The guest's value of a whitelisted register whose host value is `host`.
    fn word(&self, host: u32, table: &[Bit]) -> u32 {
        // The tables name each bit once, so the sum is their union.
        table
            .iter()
            .map(|&b| match b {
                Host(n, g) if self.open(g) => host & 1 << n,
                Set(n, g) if self.open(g) => 1 << n,
                _ => 0,
            })
            .sum()
    }
}

/// XCR0 components a guest may enable: of the host's CPUID.(0xD,0) EDX:EAX,
/// only x87(0), SSE(1), AVX(2), opmask/ZMM_Hi256/Hi16_ZMM(5,6,7, only all
/// three together and only with AVX), PKRU(9). Never MPX(3,4), AMX(17,18) or
/// anything else. 0 if the host has no XSAVE (or no leaf 0xD).
pub fn xcr0_allowed(host: &dyn Fn(u32, u32) -> Regs) -> u64 {
    if host(0, 0).eax < 0xD || host(1, 0).ecx & LEAF1_ECX_XSAVE == 0 {
        return 0;
    }
    // EDX (components 32-63) holds nothing we support.
    consistent_xcr0(u64::from(host(0xD, 0).eax) & XCR0_SUPPORTED)
}

/// The largest subset of `mask` that XSETBV accepts as a whole (SDM Vol. 1,
/// 13.3): x87 always, AVX only with SSE, AVX-512 only all three components
/// together and with AVX. Without x87 nothing is usable: 0.
fn consistent_xcr0(mut mask: u64) -> u64 {
    if mask & XCR0_X87 == 0 {
        return 0;
    }
    if mask & XCR0_SSE == 0 {
        mask &= !XCR0_AVX;
    }
    if mask & XCR0_AVX == 0 || mask & XCR0_AVX512 != XCR0_AVX512 {
        mask &= !XCR0_AVX512;
    }
    mask
}

/// What the guest is allowed: the kernel's choice, within the host's.
fn effective_xcr0(host: &dyn Fn(u32, u32) -> Regs, view: &GuestView) -> u64 {
    consistent_xcr0(view.xcr0_allowed & xcr0_allowed(host))
}

/// Bytes of a standard-form XSAVE area holding every component in `xcr0`:
/// the end of the highest one (offset EBX + size EAX of CPUID.(0xD,i) for
/// i >= 2), at least the legacy region and header (SDM Vol. 1, 13.4.3).
pub fn xsave_area_size(host: &dyn Fn(u32, u32) -> Regs, xcr0: u64) -> u32 {
    (2..64u32)
        .filter(|&i| xcr0 >> i & 1 != 0)
        .map(|i| {
            let r = host(0xD, i);
            r.ebx.saturating_add(r.eax)
        })
        .fold(XSAVE_LEGACY_AND_HEADER, max)
}

/// The size of the compacted XSAVE area (XSAVEC/XSAVES) for the components
/// of `xcr0`: the legacy region and header, then each component in order,
/// at the next 64-byte boundary if CPUID.(0xD,i):ECX[1] says it is aligned
/// (SDM Vol. 1 13.4.3).
pub fn xsave_compacted_size(host: &dyn Fn(u32, u32) -> Regs, xcr0: u64) -> u32 {
    (2..64u32).filter(|&i| xcr0 >> i & 1 != 0).fold(XSAVE_LEGACY_AND_HEADER, |end, i| {
        let r = host(0xD, i);
        let start = if r.ecx & 2 != 0 { end.saturating_add(63) & !63 } else { end };
        start.saturating_add(r.eax)
    })
}

/// The guest's XCR0 now, within what it may set (x87 and SSE, always in
/// the legacy region, count for no size).
fn current_xcr0(view: &GuestView, allowed: u64) -> u64 {
    view.xcr0 & allowed
}

/// The guest's CPUID for (leaf, subleaf); `host` executes the real CPUID.
pub fn guest_cpuid(leaf: u32, subleaf: u32, host: &dyn Fn(u32, u32) -> Regs, view: &GuestView) -> Regs {
    match leaf {
        0..=MAX_BASIC_LEAF => {
            let top = host(0, 0);
            // The TSC leaves may take the guest's range past the host's.
            let shown_top = if view.tsc_hz != 0 { top.eax.max(FREQUENCY_LEAF) } else { top.eax };
            if leaf > shown_top {
                return Regs::default();
            }
            basic(leaf, subleaf, top, shown_top, host, view)
        }
        HYPERVISOR_LEAF => {
            let word = |i: usize| u32::from_le_bytes([VENDOR[i], VENDOR[i + 1], VENDOR[i + 2], VENDOR[i + 3]]);
            // EAX: the highest hypervisor leaf.
            Regs { eax: HYPERVISOR_LEAF, ebx: word(0), ecx: word(4), edx: word(8) }
        }
        EXT_LEAF_BASE..=MAX_EXT_LEAF => extended(leaf, host, view),
        _ => Regs::default(),
    }
}

/// A basic leaf no higher than the guest's highest (`shown_top`); `top`
/// is the host's leaf 0.
fn basic(leaf: u32, subleaf: u32, top: Regs, shown_top: u32, host: &dyn Fn(u32, u32) -> Regs, view: &GuestView) -> Regs {
    match leaf {
        // EAX: highest basic leaf; EBX, EDX, ECX: the vendor string.
        0 => Regs { eax: min(shown_top, MAX_BASIC_LEAF), ..top },
        1 => {
            let r = host(1, 0);
            let s = Shown::new(effective_xcr0(host, view), view);
            // EBX bytes: brand index, CLFLUSH line size (in 8 bytes), logical
            // processors in the package (1), initial APIC ID (0).
            let [brand, clflush, _, _] = r.ebx.to_le_bytes();
            Regs {
                eax: r.eax,
                ebx: u32::from_le_bytes([brand, clflush, 1, 0]),
                ecx: s.word(r.ecx, LEAF1_ECX),
                edx: s.word(r.edx, LEAF1_EDX),
            }
        }
        TSC_LEAF | FREQUENCY_LEAF if view.tsc_hz != 0 => tsc_frequencies(leaf, view.tsc_hz),
        // Leaves past the host's own highest that only the TSC leaves
        // brought into range.
        _ if leaf > top.eax => Regs::default(),
        // Cache and TLB descriptors; TSC/crystal ratio; frequencies.
        2 | TSC_LEAF | FREQUENCY_LEAF => host(leaf, subleaf),
        4 => {
            let r = host(4, subleaf);
            Regs { eax: r.eax & LEAF4_EAX_KEEP, ..r }
        }
        7 => leaf7(subleaf, host, view),
        0xD => leaf_d(subleaf, host, view),
        _ => Regs::default(),
    }
}

/// Leaves 0x15 and 0x16 for a TSC of `hz`. Leaf 0x15: EAX/EBX the
/// TSC/crystal ratio, ECX the crystal in Hz; a rate past ECX's 32 bits is
/// given as a crystal of a whole fraction of it. Leaf 0x16: base, maximum
/// and bus (reference) frequency in MHz, 16 bits each.
fn tsc_frequencies(leaf: u32, hz: u64) -> Regs {
    let ratio = hz.div_ceil(u64::from(u32::MAX)).max(1);
    let mhz = (hz / 1_000_000).min(0xffff) as u32;
    if leaf == TSC_LEAF {
        Regs { eax: 1, ebx: ratio as u32, ecx: (hz / ratio) as u32, edx: 0 }
    } else {
        Regs { eax: mhz, ebx: mhz, ecx: (hz / ratio / 1_000_000).min(0xffff) as u32, edx: 0 }
    }
}

fn leaf7(subleaf: u32, host: &dyn Fn(u32, u32) -> Regs, view: &GuestView) -> Regs {
    let r0 = host(7, 0);
    let mut s = Shown::new(effective_xcr0(host, view), view);
    match subleaf {
        0 => {
            s.ospke = view.cr4_pke && s.pkru && r0.ecx & LEAF7_ECX_PKU != 0;
            Regs {
                // EAX: the highest subleaf.
                eax: min(r0.eax, 1),
                ebx: s.word(r0.ebx, LEAF7_EBX),
                ecx: s.word(r0.ecx, LEAF7_ECX),
                edx: s.word(r0.edx, LEAF7_EDX),
            }
        }
        1 if r0.eax >= 1 => Regs { eax: s.word(host(7, 1).eax, LEAF7_1_EAX), ..Regs::default() },
        _ => Regs::default(),
    }
}

fn leaf_d(subleaf: u32, host: &dyn Fn(u32, u32) -> Regs, view: &GuestView) -> Regs {
    let xcr0 = effective_xcr0(host, view);
    if xcr0 & XCR0_X87 == 0 {
        return Regs::default(); // XSAVE is hidden
    }
    match subleaf {
        // EBX: the size for the guest's XCR0 now; ECX: the size for all
        // allowed.
        0 => Regs { eax: xcr0 as u32, ebx: xsave_area_size(host, current_xcr0(view, xcr0)), ecx: xsave_area_size(host, xcr0), edx: 0 },
        // EBX: the compacted size for XCR0 | IA32_XSS (no IA32_XSS bits
        // are shown, so XCR0), computed: Bochs 2.7 gives the standard
        // size there, which Linux takes for its XSAVES buffer and then
        // finds inconsistent ("XSAVE consistency problem"), disabling
        // XSAVE. ECX, EDX: no IA32_XSS bits.
        1 => {
            let r = host(0xD, 1);
            let s = Shown::new(xcr0, view);
            let ebx = xsave_compacted_size(host, current_xcr0(view, xcr0));
            Regs { eax: s.word(r.eax, LEAFD_1_EAX), ebx, ..Regs::default() }
        }
        i if xcr0.checked_shr(i).unwrap_or(0) & 1 != 0 => host(0xD, i),
        _ => Regs::default(),
    }
}

fn extended(leaf: u32, host: &dyn Fn(u32, u32) -> Regs, view: &GuestView) -> Regs {
    let top = min(host(EXT_LEAF_BASE, 0).eax, MAX_EXT_LEAF);
    if leaf > top {
        return Regs::default();
    }
    match leaf {
        // EAX: the highest extended leaf; the rest is reserved on Intel.
        EXT_LEAF_BASE => Regs { eax: top, ..Regs::default() },
        0x8000_0001 => {
            let r = host(leaf, 0);
            let s = Shown::new(0, view); // no gate here needs XCR0
            Regs { ecx: s.word(r.ecx, EXT1_ECX), edx: s.word(r.edx, EXT1_EDX), ..Regs::default() }
        }
        // Brand string; L2 cache.
        0x8000_0002..=0x8000_0004 | 0x8000_0006 => host(leaf, 0),
        0x8000_0007 => Regs { edx: host(leaf, 0).edx & EXT7_EDX_MASK, ..Regs::default() },
        // EAX: physical and linear address widths.
        0x8000_0008 => Regs { eax: host(leaf, 0).eax, ..Regs::default() },
        _ => Regs::default(),
    }
}

/// CPUID.8000_0007:EDX: only the invariant TSC (bit 8).
const EXT7_EDX_MASK: u32 = 1 << 8;


#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn bits(list: &[u32]) -> u32 {
        list.iter().fold(0, |m, &b| m | 1 << b)
    }

    fn regs(eax: u32, ebx: u32, ecx: u32, edx: u32) -> Regs {
        Regs { eax, ebx, ecx, edx }
    }

    /// A made-up processor: its CPUID answers. Leaves 4, 7 and 0xD depend on
    /// the subleaf; the others answer their subleaf-0 values for any.
    struct Cpu(BTreeMap<(u32, u32), Regs>);

    impl Cpu {
        fn new(leaves: &[((u32, u32), Regs)]) -> Cpu {
            Cpu(leaves.iter().copied().collect())
        }
        fn with(mut self, leaf: u32, subleaf: u32, r: Regs) -> Cpu {
            self.0.insert((leaf, subleaf), r);
            self
        }
        fn get(&self, leaf: u32, subleaf: u32) -> Regs {
            let subleaf = if matches!(leaf, 4 | 7 | 0xD) { subleaf } else { 0 };
            self.0.get(&(leaf, subleaf)).copied().unwrap_or_default()
        }
        fn g(&self, leaf: u32, subleaf: u32, view: &GuestView) -> Regs {
            guest_cpuid(leaf, subleaf, &|l, s| self.get(l, s), view)
        }
        fn allowed(&self) -> u64 {
            xcr0_allowed(&|l, s| self.get(l, s))
        }
        /// Everything the kernel can turn on, turned on.
        fn full_view(&self) -> GuestView {
            GuestView { cr4_osxsave: true, cr4_pke: true, xcr0_allowed: self.allowed(), rdtscp: true, invpcid: true, lapic: false, apic_enabled: false, tsc_hz: 0, xcr0: 0 }
        }
    }

    const GENUINE_INTEL: (u32, u32, u32) = (0x756e_6547, 0x6c65_746e, 0x4965_6e69); // EBX, ECX, EDX

    /// A Sapphire-Rapids-like Xeon: AVX-512, PKRU, AMX, many features we hide.
    fn xeon() -> Cpu {
        let (vb, vc, vd) = GENUINE_INTEL;
        Cpu::new(&[
            ((0, 0), regs(0x20, vb, vc, vd)),
            // Everything in leaf 1 but CNXT-ID (10) and bit 16, hypervisor clear.
            ((1, 0), regs(0x0008_06f8, 0x0a80_0800, 0x7ffe_fbff, 0xbfeb_fbff)),
            ((2, 0), regs(0x00fe_ff01, 0xf0, 0, 0)),
            ((4, 0), regs(0xfc00_4121, 0x02c0_003f, 0x3f, 0)),
            ((4, 1), regs(0xfc00_4122, 0x01c0_003f, 0x3f, 0)),
            ((4, 2), regs(0xfc01_c143, 0x03c0_003f, 0x7ff, 0)),
            ((4, 3), regs(0xfc3f_c163, 0x03b0_003f, 0x1_ffff, 4)),
            ((5, 0), regs(0x40, 0x40, 3, 0x2020)),
            ((6, 0), regs(0x77, 2, 9, 0)),
            (
                (7, 0),
                regs(
                    2,
                    bits(&[0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 28, 29, 30, 31]),
                    bits(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 22, 23, 24, 25, 27, 28, 29, 30, 31]),
                    bits(&[4, 5, 10, 14, 15, 16, 18, 19, 20, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]),
                ),
            ),
            ((7, 1), regs(bits(&[4, 5, 10, 11, 12, 22]), 0, 0, 0)),
            ((0xa, 0), regs(0x0804_3205, 0, 0, 0x8603)),
            ((0xb, 0), regs(1, 2, 0x100, 0x0a)),
            ((0xd, 0), regs(0x0006_02e7, 0x340, 0x2b00, 0)),
            ((0xd, 1), regs(0x1f, 0x2f8, 0x1900, 0)),
            ((0xd, 2), regs(256, 576, 0, 0)),
            ((0xd, 5), regs(64, 1088, 0, 0)),
            ((0xd, 6), regs(512, 1152, 0, 0)),
            ((0xd, 7), regs(1024, 1664, 0, 0)),
            ((0xd, 8), regs(0x80, 0, 1, 0)),
            ((0xd, 9), regs(8, 2688, 0, 0)),
            ((0xd, 11), regs(0x10, 0, 1, 0)),
            ((0xd, 12), regs(0x18, 0, 1, 0)),
            ((0xd, 17), regs(64, 2752, 0, 0)),
            ((0xd, 18), regs(8192, 2816, 6, 0)),
            ((0x15, 0), regs(2, 0xbc, 25_000_000, 0)),
            ((0x16, 0), regs(2000, 3500, 100, 0)),
            ((0x1f, 0), regs(1, 2, 0x100, 0x0a)),
            ((0x4000_0000, 0), regs(0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d)),
            ((0x4000_0001, 0), regs(0x0100_07fb, 0, 0, 0)),
            ((0x8000_0000, 0), regs(0x8000_0008, 0, 0, 0)),
            ((0x8000_0001, 0), regs(0, 0, 0x121, 0x2c10_0800)),
            ((0x8000_0002, 0), regs(0x6574_6e49, 0x2952_286c, 0x6f65_5820, 0x2952_286e)),
            ((0x8000_0003, 0), regs(0x616c_5020, 0x756e_6974, 0x0038_206d, 0x2b30_3834)),
            ((0x8000_0004, 0), regs(0, 0, 0, 0)),
            ((0x8000_0005, 0), regs(1, 2, 3, 4)),
            ((0x8000_0006, 0), regs(0, 0, 0x0800_7040, 0)),
            ((0x8000_0007, 0), regs(0, 0, 0, 0x101)),
            ((0x8000_0008, 0), regs(0x0000_3934, 0x200, 0x7f, 1)),
        ])
    }

    /// Like Bochs' corei7_skylake_x: AVX-512 but no PKRU state although
    /// leaf 7 says PKU; leaf 7 has no subleaf 1.
    fn skylake_x() -> Cpu {
        let (vb, vc, vd) = GENUINE_INTEL;
        Cpu::new(&[
            ((0, 0), regs(0x16, vb, vc, vd)),
            ((1, 0), regs(0x0005_0654, 0x0010_0800, 0x7ffa_fbbf, 0xbfeb_fbff)),
            ((2, 0), regs(0x0076_3601, 0x00f0_b5ff, 0, 0x00c3_0000)),
            ((4, 0), regs(0x1c00_4121, 0x01c0_003f, 0x3f, 0)),
            ((4, 1), regs(0x1c00_4122, 0x01c0_003f, 0x3f, 0)),
            ((4, 2), regs(0x1c00_4143, 0x03c0_003f, 0x3ff, 0)),
            ((4, 3), regs(0x1c03_c163, 0x0280_003f, 0x2fff, 6)),
            (
                (7, 0),
                regs(
                    0,
                    bits(&[0, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14, 16, 17, 18, 19, 20, 23, 24, 28, 30, 31]),
                    bits(&[3, 4]),
                    0,
                ),
            ),
            ((7, 1), regs(bits(&[4, 5]), 0, 0, 0)),
            ((0xd, 0), regs(0xe7, 0x240, 0xa80, 0)),
            ((0xd, 1), regs(0x0f, 0x240, 0, 0)),
            ((0xd, 2), regs(256, 576, 0, 0)),
            ((0xd, 5), regs(64, 1088, 0, 0)),
            ((0xd, 6), regs(512, 1152, 0, 0)),
            ((0xd, 7), regs(1024, 1664, 0, 0)),
            ((0x8000_0000, 0), regs(0x8000_0008, 0, 0, 0)),
            ((0x8000_0001, 0), regs(0, 0, 0x121, 0x2c10_0800)),
            ((0x8000_0006, 0), regs(0, 0, 0x0100_6040, 0)),
            ((0x8000_0007, 0), regs(0, 0, 0, 0x100)),
            ((0x8000_0008, 0), regs(0x0000_3027, 0, 0, 0)),
        ])
    }

    /// Every bit of every register set (leaf 0 and 0x8000_0000 say "all").
    fn everything(leaf: u32, subleaf: u32) -> Regs {
        let _ = (leaf, subleaf);
        regs(u32::MAX, u32::MAX, u32::MAX, u32::MAX)
    }

    fn g_all(leaf: u32, subleaf: u32, view: &GuestView) -> Regs {
        guest_cpuid(leaf, subleaf, &everything, view)
    }

    fn all_view() -> GuestView {
        GuestView { cr4_osxsave: true, cr4_pke: true, xcr0_allowed: u64::MAX, rdtscp: true, invpcid: true, lapic: false, apic_enabled: false, tsc_hz: 0, xcr0: 0 }
    }

    // The whitelists as the issue lists them, written out again here so the
    // code's tables are checked against an independent copy.
    const AVX_BITS_1_ECX: &[u32] = &[12, 28, 29];
    const WL_1_ECX: &[u32] = &[0, 1, 9, 12, 13, 17, 19, 20, 22, 23, 25, 26, 27, 28, 29, 30, 31];
    const WL_1_EDX: &[u32] = &[0, 1, 2, 3, 4, 5, 6, 8, 11, 13, 15, 16, 17, 19, 23, 24, 25, 26];
    const WL_7_EBX: &[u32] = &[0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 16, 17, 18, 19, 20, 21, 23, 24, 28, 29, 30, 31];
    const AVX512_7_EBX: &[u32] = &[16, 17, 21, 28, 30, 31];
    const WL_7_ECX: &[u32] = &[1, 2, 3, 4, 6, 8, 9, 10, 11, 12, 14, 22, 25, 27, 28];
    const AVX512_7_ECX: &[u32] = &[1, 6, 11, 12, 14];
    const WL_7_EDX: &[u32] = &[2, 3, 4, 8, 10, 14, 23];
    const AVX512_7_EDX: &[u32] = &[2, 3, 8, 23];

    #[test]
    fn an_all_ones_host_shows_exactly_the_whitelist() {
        let v = all_view();
        assert_eq!(g_all(0, 0, &v).eax, MAX_BASIC_LEAF);
        let l1 = g_all(1, 0, &v);
        assert_eq!(l1, regs(u32::MAX, 0x0001_ffff, bits(WL_1_ECX), bits(WL_1_EDX)));
        assert_eq!(g_all(7, 0, &v), regs(1, bits(WL_7_EBX), bits(WL_7_ECX), bits(WL_7_EDX)));
        assert_eq!(g_all(7, 1, &v), regs(bits(&[4, 5]), 0, 0, 0));
        assert_eq!(g_all(0xd, 0, &v), regs(0x2e7, 576, u32::MAX, 0), "the sizes of XCR0 = x87");
        assert_eq!(g_all(0xd, 1, &v), regs(0b111, 576, 0, 0));
        let all_on = GuestView { xcr0: u64::MAX, ..v };
        assert_eq!(g_all(0xd, 0, &all_on), regs(0x2e7, u32::MAX, u32::MAX, 0));
        assert_eq!(g_all(0xd, 1, &all_on), regs(0b111, u32::MAX, 0, 0));
        assert_eq!(g_all(4, 0, &v), regs(0x3fff, u32::MAX, u32::MAX, u32::MAX));
        assert_eq!(g_all(EXT_LEAF_BASE, 0, &v), regs(MAX_EXT_LEAF, 0, 0, 0));
        assert_eq!(g_all(0x8000_0001, 0, &v), regs(0, 0, bits(&[0, 5, 8]), bits(&[11, 20, 26, 27, 29])));
        assert_eq!(g_all(0x8000_0007, 0, &v), regs(0, 0, 0, 1 << 8));
        assert_eq!(g_all(0x8000_0008, 0, &v), regs(u32::MAX, 0, 0, 0));
        for pass in [2, 0x15, 0x16, 0x8000_0002, 0x8000_0003, 0x8000_0004, 0x8000_0006] {
            assert_eq!(g_all(pass, 0, &v), everything(pass, 0), "leaf {pass:#x}");
        }
    }

    #[test]
    fn closed_gates_hide_what_needs_them() {
        // Nothing the kernel may turn on is on: XSAVE itself is hidden.
        let v = GuestView::default();
        let l1 = g_all(1, 0, &v);
        let no_xsave_1 = bits(WL_1_ECX) & !bits(AVX_BITS_1_ECX) & !bits(&[26, 27]);
        assert_eq!(l1.ecx, no_xsave_1);
        assert_eq!(l1.edx, bits(WL_1_EDX));
        let l7 = g_all(7, 0, &v);
        assert_eq!(l7.ebx, bits(WL_7_EBX) & !bits(AVX512_7_EBX) & !bits(&[5, 10]));
        assert_eq!(l7.ecx, bits(WL_7_ECX) & !bits(AVX512_7_ECX) & !bits(&[3, 4, 9, 10, 22]));
        assert_eq!(l7.edx, bits(WL_7_EDX) & !bits(AVX512_7_EDX));
        assert_eq!(g_all(7, 1, &v), Regs::default());
        for sub in [0, 1, 2, 9] {
            assert_eq!(g_all(0xd, sub, &v), Regs::default(), "0xD.{sub}");
        }
        assert_eq!(g_all(0x8000_0001, 0, &v).edx, bits(&[11, 20, 26, 29]));
    }

    #[test]
    fn default_view_and_rdtscp_invpcid_gates() {
        let v = GuestView { rdtscp: true, ..GuestView::default() };
        assert_ne!(g_all(0x8000_0001, 0, &v).edx & 1 << 27, 0);
        assert_ne!(g_all(7, 0, &v).ecx & 1 << 22, 0);
        assert_eq!(g_all(7, 0, &v).ebx & 1 << 10, 0);
        let v = GuestView { invpcid: true, ..GuestView::default() };
        assert_eq!(g_all(0x8000_0001, 0, &v).edx & 1 << 27, 0);
        assert_eq!(g_all(7, 0, &v).ecx & 1 << 22, 0);
        assert_ne!(g_all(7, 0, &v).ebx & 1 << 10, 0);
        // The host must have them too.
        let cpu = skylake_x().with(0x8000_0001, 0, regs(0, 0, 0x121, 0x2010_0800)).with(7, 0, regs(0, 1, 0, 0));
        let v = cpu.full_view();
        assert_eq!(cpu.g(0x8000_0001, 0, &v).edx & 1 << 27, 0);
        assert_eq!(cpu.g(7, 0, &v).ebx, 1 | LEAF7_EBX_TSC_ADJUST);
    }

    #[test]
    fn avx_needs_its_xsave_component() {
        for cpu in [xeon(), skylake_x()] {
            let full = cpu.full_view();
            assert_ne!(cpu.g(1, 0, &full).ecx & bits(AVX_BITS_1_ECX), 0);
            let sse = GuestView { xcr0_allowed: XCR0_X87 | XCR0_SSE, ..full };
            let l1 = cpu.g(1, 0, &sse);
            assert_eq!(l1.ecx & bits(AVX_BITS_1_ECX), 0);
            assert_eq!(l1.ecx, cpu.g(1, 0, &full).ecx & !bits(AVX_BITS_1_ECX));
            let l7 = cpu.g(7, 0, &sse);
            assert_eq!(l7.ebx & (1 << 5 | bits(AVX512_7_EBX)), 0);
            assert_eq!(l7.ecx & (bits(&[9, 10]) | bits(AVX512_7_ECX)), 0);
            assert_eq!(l7.edx & bits(AVX512_7_EDX), 0);
            assert_eq!(cpu.g(7, 1, &sse).eax, 0);
            assert_eq!(cpu.g(0xd, 0, &sse).eax as u64, XCR0_X87 | XCR0_SSE);
            // What needs no AVX state stays.
            assert_ne!(l1.ecx & 1 << 20, 0); // SSE4.2
            assert_ne!(l7.ebx & 1 << 8, 0); // BMI2
        }
        let cpu = xeon();
        let sse = GuestView { xcr0_allowed: XCR0_X87 | XCR0_SSE, ..cpu.full_view() };
        assert_ne!(cpu.g(7, 0, &sse).ecx & 1 << 8, 0); // GFNI
    }

    #[test]
    fn avx512_needs_all_three_components() {
        let cpu = xeon();
        let full = cpu.full_view();
        let l7 = cpu.g(7, 0, &full);
        assert_eq!(l7.ebx & bits(AVX512_7_EBX), bits(AVX512_7_EBX));
        assert_eq!(l7.ecx & bits(AVX512_7_ECX), bits(AVX512_7_ECX));
        assert_eq!(l7.edx & bits(AVX512_7_EDX), bits(&[23])); // only FP16 on this host
        assert_eq!(cpu.g(7, 1, &full).eax, bits(&[4, 5]));
        for partial in [XCR0_OPMASK | XCR0_ZMM_HI256, XCR0_HI16_ZMM, 0] {
            let v = GuestView { xcr0_allowed: XCR0_X87 | XCR0_SSE | XCR0_AVX | XCR0_PKRU | partial, ..full };
            let l7 = cpu.g(7, 0, &v);
            assert_eq!(l7.ebx, cpu.g(7, 0, &full).ebx & !bits(AVX512_7_EBX), "{partial:#x}");
            assert_eq!(l7.ecx, cpu.g(7, 0, &full).ecx & !bits(AVX512_7_ECX));
            assert_eq!(l7.edx & bits(AVX512_7_EDX), 0);
            assert_eq!(cpu.g(7, 1, &v).eax, 1 << 4); // AVX-VNNI stays, BF16 goes
            assert_eq!(cpu.g(0xd, 0, &v).eax, 0x207);
            assert_eq!(cpu.g(0xd, 0, &v).ecx, 2696); // PKRU's end
            assert_eq!(cpu.g(0xd, 5, &v), Regs::default());
            assert_ne!(cpu.g(1, 0, &v).ecx & 1 << 28, 0); // AVX stays
        }
        // AVX-512 state allowed but AVX not: neither is shown.
        let v = GuestView { xcr0_allowed: XCR0_X87 | XCR0_SSE | XCR0_AVX512, ..full };
        assert_eq!(cpu.g(7, 0, &v).ebx & bits(AVX512_7_EBX), 0);
        assert_eq!(cpu.g(0xd, 0, &v).eax, 3);
    }

    #[test]
    fn osxsave_mirrors_cr4_when_xsave_is_shown() {
        for cpu in [xeon(), skylake_x()] {
            let on = cpu.full_view();
            let off = GuestView { cr4_osxsave: false, ..on };
            assert_eq!(cpu.g(1, 0, &on).ecx & (LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE), LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE);
            assert_eq!(cpu.g(1, 0, &off).ecx & (LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE), LEAF1_ECX_XSAVE);
            let no_xsave = GuestView { xcr0_allowed: 0, ..on };
            assert_eq!(cpu.g(1, 0, &no_xsave).ecx & (LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE), 0);
        }
        // The host's own OSXSAVE does not leak.
        let cpu = skylake_x();
        let off = GuestView { cr4_osxsave: false, ..cpu.full_view() };
        assert_ne!(cpu.get(1, 0).ecx & LEAF1_ECX_OSXSAVE, 0);
        assert_eq!(cpu.g(1, 0, &off).ecx & LEAF1_ECX_OSXSAVE, 0);
        // A host without XSAVE shows neither, whatever the view says.
        let cpu = skylake_x().with(1, 0, regs(0x0005_0654, 0x0010_0800, 0x7ffa_fbbf & !(LEAF1_ECX_XSAVE), 0xbfeb_fbff));
        let v = GuestView { xcr0_allowed: 0x2e7, ..all_view() };
        assert_eq!(cpu.g(1, 0, &v).ecx & (LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE | 1 << 28), 0);
        assert_eq!(cpu.g(0xd, 0, &v), Regs::default());
    }

    #[test]
    fn pku_needs_pkru_state_and_ospke_mirrors_cr4() {
        let cpu = xeon();
        let on = cpu.full_view();
        let both = LEAF7_ECX_PKU | LEAF7_ECX_OSPKE;
        assert_eq!(cpu.g(7, 0, &on).ecx & both, both);
        let off = GuestView { cr4_pke: false, ..on };
        assert_eq!(cpu.g(7, 0, &off).ecx & both, LEAF7_ECX_PKU);
        let no_pkru = GuestView { xcr0_allowed: on.xcr0_allowed & !XCR0_PKRU, ..on };
        assert_eq!(cpu.g(7, 0, &no_pkru).ecx & both, 0);
        assert_eq!(cpu.g(0xd, 9, &no_pkru), Regs::default());
        // Bochs' skylake_x: PKU (and the host's OSPKE) in leaf 7, no PKRU in 0xD.
        let sky = skylake_x();
        assert_eq!(sky.g(7, 0, &sky.full_view()).ecx & both, 0);
        assert_eq!(sky.g(7, 0, &GuestView { xcr0_allowed: u64::MAX, ..sky.full_view() }).ecx & both, 0);
        // PKRU state but no PKU: no OSPKE either.
        let (a, b, c, d) = (cpu.get(7, 0).eax, cpu.get(7, 0).ebx, cpu.get(7, 0).ecx, cpu.get(7, 0).edx);
        let cpu = xeon().with(7, 0, regs(a, b, c & !LEAF7_ECX_PKU, d));
        assert_eq!(cpu.g(7, 0, &on).ecx & both, 0);
    }

    #[test]
    fn hidden_bits_stay_hidden() {
        for cpu in [xeon(), skylake_x()] {
            let v = cpu.full_view();
            let l1 = cpu.g(1, 0, &v);
            // MONITOR, DS-CPL, VMX, SMX, EIST, TM2, SDBG, xTPR, PDCM, DCA, x2APIC, TSC-deadline.
            assert_eq!(l1.ecx & bits(&[2, 3, 4, 5, 6, 7, 8, 11, 14, 15, 18, 21, 24]), 0);
            assert_eq!(l1.ecx & LEAF1_ECX_VMX, 0);
            // MCE, APIC, MTRR, MCA, PSN, DS, ACPI, SS, HTT, TM, PBE.
            assert_eq!(l1.edx & bits(&[7, 9, 12, 14, 18, 21, 22, 27, 28, 29, 31]), 0);
            let l7 = cpu.g(7, 0, &v);
            // MPX, RDT, PT: hidden; speculation controls; LA57, PKS, CET, WAITPKG.
            assert_eq!(l7.ebx & bits(&[2, 12, 14, 15, 25]), 0);
            assert_ne!(l7.ebx & LEAF7_EBX_TSC_ADJUST, 0, "emulated, whatever the host has");
            assert_eq!(l7.ecx & bits(&[5, 7, 13, 16, 23, 24, 29, 30, 31]), 0);
            assert_eq!(l7.edx & (0xfc00_0000 | bits(&[5, 15, 16, 18, 19, 20, 22, 24, 25])), 0);
            assert_eq!(cpu.g(0xd, 1, &v).eax & bits(&[3, 4]), 0); // XSAVES, XFD
            assert_eq!(cpu.g(0x8000_0007, 0, &v).edx, 1 << 8);
        }
    }

    #[test]
    fn the_virtual_lapic_shows_apic_x2apic_and_tsc_deadline_whatever_the_host() {
        for cpu in [xeon(), skylake_x()] {
            let v = GuestView { lapic: true, apic_enabled: true, ..cpu.full_view() };
            let l1 = cpu.g(1, 0, &v);
            assert_eq!(l1.edx & bits(&[9]), bits(&[9]));
            assert_eq!(l1.ecx & bits(&[21, 24]), bits(&[21, 24]));
            // Still no MCE/MTRR/MCA and the rest of the hidden bits.
            assert_eq!(l1.edx & bits(&[7, 12, 14]), 0);
            // Globally disabled: no APIC bit, the x2APIC and TSC-deadline
            // features stay; without the virtual APIC, enabled means nothing.
            let off = GuestView { apic_enabled: false, ..v };
            let l1 = cpu.g(1, 0, &off);
            assert_eq!((l1.edx & bits(&[9]), l1.ecx & bits(&[21, 24])), (0, bits(&[21, 24])));
            let none = GuestView { lapic: false, apic_enabled: true, ..v };
            let l1 = cpu.g(1, 0, &none);
            assert_eq!((l1.edx & bits(&[9]), l1.ecx & bits(&[21, 24])), (0, 0));
            let eax = l1.eax;
            let host_without = cpu.with(1, 0, regs(eax, 0, 0, 0));
            let l1 = host_without.g(1, 0, &v);
            assert_eq!((l1.edx & bits(&[9]), l1.ecx & bits(&[21, 24])), (bits(&[9]), bits(&[21, 24])));
        }
    }

    #[test]
    fn leaf1_is_one_processor_with_apic_id_0() {
        let cpu = xeon();
        let l1 = cpu.g(1, 0, &cpu.full_view());
        assert_eq!(l1.eax, 0x0008_06f8);
        assert_eq!(l1.ebx, 0x0001_0800);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        let cpu = xeon().with(1, 0, regs(0x0008_06f8, 0xffff_ffff, 0xffff_ffff, 0xbfeb_fbff));
        assert_eq!(cpu.g(1, 0, &GuestView::default()).ebx, 0x0001_ffff);
        assert_ne!(cpu.g(1, 0, &GuestView::default()).ecx & LEAF1_ECX_HYPERVISOR, 0);
    }

    #[test]
    fn leaf_0_caps_the_basic_range_and_passes_the_vendor() {
        let cpu = xeon();
        let v = cpu.full_view();
        let (vb, vc, vd) = GENUINE_INTEL;
        assert_eq!(cpu.g(0, 0, &v), regs(MAX_BASIC_LEAF, vb, vc, vd));
        let sky = skylake_x();
        assert_eq!(sky.g(0, 0, &v), regs(0x16, vb, vc, vd));
        // Skylake_x's top leaf answers, the ones above it read 0.
        let sky = sky.with(0x17, 0, regs(1, 2, 3, 4)).with(0x16, 0, regs(2200, 3500, 100, 0));
        assert_eq!(sky.g(0x16, 0, &v), regs(2200, 3500, 100, 0));
        assert_eq!(sky.g(0x17, 0, &v), Regs::default());
        let low = xeon().with(0, 0, regs(7, vb, vc, vd));
        assert_eq!(low.g(0xd, 0, &v), Regs::default());
        assert_eq!(low.g(0x15, 0, &v), Regs::default());
        assert_ne!(low.g(7, 0, &v).ebx, 0);
        // With no leaf 0xD, there is no XSAVE either.
        assert_eq!(low.g(1, 0, &v).ecx & LEAF1_ECX_XSAVE, 0);
    }

    /// Linux's native_calibrate_tsc / cpu_khz_from_cpuid (arch/x86/kernel/
    /// tsc.c): tsc_khz = ECX / 1000 * EBX / EAX of leaf 0x15, cpu_khz =
    /// leaf 0x16 EAX * 1000; both need leaf 0 to reach them.
    #[test]
    fn tsc_leaves_give_the_measured_rate() {
        let (vb, vc, vd) = GENUINE_INTEL;
        let linux_khz = |cpu: &Cpu, v: &GuestView| {
            let l15 = cpu.g(TSC_LEAF, 0, v);
            (u64::from(l15.ecx) / 1000 * u64::from(l15.ebx) / u64::from(l15.eax), cpu.g(FREQUENCY_LEAF, 0, v).eax)
        };
        for cpu in [xeon(), skylake_x(), xeon().with(0, 0, regs(0xd, vb, vc, vd))] {
            let v = GuestView { tsc_hz: 50_000_000, ..cpu.full_view() };
            assert!(cpu.g(0, 0, &v).eax >= FREQUENCY_LEAF);
            assert_eq!(cpu.g(TSC_LEAF, 0, &v), regs(1, 1, 50_000_000, 0), "the crystal is the TSC");
            assert_eq!(cpu.g(FREQUENCY_LEAF, 0, &v), regs(50, 50, 50, 0));
            assert_eq!(linux_khz(&cpu, &v), (50_000, 50));
            let v = GuestView { tsc_hz: 2_903_998_000, ..v };
            assert_eq!(linux_khz(&cpu, &v), (2_903_998, 2903));
        }
        // Leaves between the host's top and 0x15 stay empty.
        let low = xeon().with(0, 0, regs(0xd, vb, vc, vd)).with(0x14, 0, regs(1, 2, 3, 4));
        let v = GuestView { tsc_hz: 50_000_000, ..low.full_view() };
        assert_eq!(low.g(0x14, 0, &v), Regs::default());
        // ... also those the whitelist knows (the host answers them with
        // whatever its highest leaf says).
        let tiny = xeon().with(0, 0, regs(3, vb, vc, vd));
        for leaf in [4, 7, 0xd] {
            assert_eq!(tiny.g(leaf, 0, &v), Regs::default(), "leaf {leaf:#x}");
        }
        assert_eq!(tiny.g(0, 0, &v).eax, FREQUENCY_LEAF);
        assert_eq!(low.g(0x17, 0, &v), Regs::default());
        // A TSC past 2^32 Hz: a crystal of half of it, twice over.
        let v = GuestView { tsc_hz: 5_000_000_000, ..v };
        assert_eq!(low.g(TSC_LEAF, 0, &v), regs(1, 2, 2_500_000_000, 0));
        assert_eq!(low.g(FREQUENCY_LEAF, 0, &v), regs(5000, 5000, 2500, 0));
    }

    #[test]
    fn leaves_that_pass_and_leaves_that_read_0() {
        let cpu = xeon();
        let v = cpu.full_view();
        for leaf in [2, 0x15, 0x16] {
            assert_eq!(cpu.g(leaf, 0, &v), cpu.get(leaf, 0), "{leaf:#x}");
            assert_eq!(cpu.g(leaf, 3, &v), cpu.get(leaf, 0), "{leaf:#x}");
        }
        for leaf in (3..=0x1f).filter(|l| ![4, 7, 0xd, 0x15, 0x16].contains(l)) {
            assert_eq!(cpu.g(leaf, 0, &v), Regs::default(), "{leaf:#x}");
        }
        for leaf in [0x20, 0x1000, 0x3fff_ffff, 0x4000_0001, 0x4000_00ff, 0x4000_0100, 0x7fff_ffff, 0x8000_0009, 0xc000_0000, u32::MAX] {
            assert_eq!(cpu.g(leaf, 0, &v), Regs::default(), "{leaf:#x}");
            assert_eq!(g_all(leaf, 0, &all_view()), Regs::default(), "{leaf:#x}");
        }
    }

    #[test]
    fn leaf_4_is_one_core_one_thread() {
        let cpu = xeon();
        let v = cpu.full_view();
        for sub in 0..4 {
            let (h, g) = (cpu.get(4, sub), cpu.g(4, sub, &v));
            assert_eq!(g, Regs { eax: h.eax & 0x3fff, ..h }, "subleaf {sub}");
            assert_eq!(g.eax >> 14, 0);
        }
        assert_eq!(cpu.g(4, 0, &v).eax, 0x121);
        assert_eq!(cpu.g(4, 4, &v), Regs::default());
    }

    #[test]
    fn leaf_7_subleaves() {
        let cpu = xeon();
        let v = cpu.full_view();
        assert_eq!(cpu.g(7, 0, &v).eax, 1);
        assert_eq!(cpu.g(7, 1, &v), regs(bits(&[4, 5]), 0, 0, 0));
        assert_eq!(cpu.g(7, 2, &v), Regs::default());
        assert_eq!(cpu.g(7, u32::MAX, &v), Regs::default());
        // Skylake_x has no subleaf 1 (EAX = 0), whatever CPUID(7,1) returns.
        let sky = skylake_x();
        assert_eq!(sky.g(7, 0, &v).eax, 0);
        assert_eq!(sky.g(7, 1, &sky.full_view()), Regs::default());
        let one = skylake_x().with(7, 0, regs(1, 0, 0, 0));
        assert_eq!(one.g(7, 1, &one.full_view()), regs(bits(&[4, 5]), 0, 0, 0));
        // Its leaf 7.0, as shown.
        let l7 = sky.g(7, 0, &sky.full_view());
        assert_eq!(l7.ebx, bits(&[0, 1, 3, 4, 5, 7, 8, 9, 10, 11, 13, 16, 17, 18, 19, 20, 23, 24, 28, 30, 31]));
        assert_eq!((l7.ecx, l7.edx), (0, 0));
    }

    #[test]
    fn leaf_d_describes_the_allowed_xcr0() {
        let cpu = xeon();
        let v = GuestView { xcr0: 0x7, ..cpu.full_view() };
        assert_eq!(cpu.g(0xd, 0, &v), regs(0x2e7, 832, 2696, 0));
        assert_eq!(cpu.g(0xd, 1, &v), regs(0b111, 832, 0, 0));
        // Linux's check (fpu/xstate.c paranoid_xstate_size_valid): with
        // XSAVES its buffer is subleaf 1's EBX, which must be the compacted
        // sum of the components, not the standard layout's end (2688).
        let avx512 = GuestView { xcr0: 0xe7, ..v };
        assert_eq!(cpu.g(0xd, 0, &avx512).ebx, 2688);
        assert_eq!(cpu.g(0xd, 1, &avx512).ebx, 576 + 256 + 64 + 512 + 1024);
        let pkru = GuestView { xcr0: 0x2e7, ..v };
        assert_eq!((cpu.g(0xd, 0, &pkru).ebx, cpu.g(0xd, 1, &pkru).ebx), (2696, 2440));
        // A bit the guest may not set does not count.
        let too_much = GuestView { xcr0: 0x6_0007, ..v };
        assert_eq!((cpu.g(0xd, 0, &too_much).ebx, cpu.g(0xd, 1, &too_much).ebx), (832, 832));
        for i in [2, 5, 6, 7, 9] {
            assert_eq!(cpu.g(0xd, i, &v), cpu.get(0xd, i), "0xD.{i}");
        }
        for i in [3, 4, 8, 10, 11, 12, 17, 18, 31, 32, 63, 64, 65, u32::MAX] {
            assert_eq!(cpu.g(0xd, i, &v), Regs::default(), "0xD.{i}");
        }
        let sky = skylake_x();
        let v = sky.full_view();
        assert_eq!(sky.g(0xd, 0, &v), regs(0xe7, 0x240, 2688, 0));
        assert_eq!(sky.g(0xd, 1, &v), regs(0b111, 0x240, 0, 0));
        assert_eq!(sky.g(0xd, 9, &v), Regs::default());
        // The view asks for more than the host has: the host wins.
        let greedy = GuestView { xcr0_allowed: u64::MAX, ..v };
        assert_eq!(sky.g(0xd, 0, &greedy), regs(0xe7, 0x240, 2688, 0));
        // Less: the view wins.
        let avx = GuestView { xcr0_allowed: 7, ..v };
        assert_eq!(sky.g(0xd, 0, &avx), regs(7, 0x240, 832, 0));
        assert_eq!(sky.g(0xd, 5, &avx), Regs::default());
        assert_eq!(sky.g(0xd, 2, &avx), sky.get(0xd, 2));
    }

    #[test]
    fn xcr0_allowed_takes_only_what_we_switch() {
        assert_eq!(xeon().allowed(), 0x2e7); // AMX (17, 18) dropped
        assert_eq!(skylake_x().allowed(), 0xe7);
        assert_eq!(xcr0_allowed(&everything), XCR0_SUPPORTED);
        assert_eq!(XCR0_SUPPORTED, 0x2e7);
        let (vb, vc, vd) = GENUINE_INTEL;
        let with_d = |eax: u32, edx: u32| skylake_x().with(0xd, 0, regs(eax, 0x240, 0xa80, edx)).allowed();
        assert_eq!(with_d(0xff, u32::MAX), 0xe7); // MPX and components 32-63 dropped
        assert_eq!(with_d(0x27, 0), 0x7); // part of AVX-512: none of it
        assert_eq!(with_d(0xc7, 0), 0x7);
        assert_eq!(with_d(0x2e3, 0), 0x203); // AVX-512 without AVX: no AVX-512
        assert_eq!(with_d(0x5, 0), 0x1); // AVX without SSE: no AVX
        assert_eq!(with_d(0x2e6, 0), 0); // no x87: nothing
        assert_eq!(with_d(0x3, 0), 0x3);
        assert_eq!(with_d(0x1, 0), 0x1);
        // No XSAVE, or no leaf 0xD: nothing.
        let no_xsave = skylake_x().with(1, 0, regs(0x0005_0654, 0x0010_0800, 0x7ffa_fbbf & !LEAF1_ECX_XSAVE, 0xbfeb_fbff));
        assert_eq!(no_xsave.allowed(), 0);
        assert_eq!(skylake_x().with(0, 0, regs(0xc, vb, vc, vd)).allowed(), 0);
        assert_eq!(skylake_x().with(0, 0, regs(0xd, vb, vc, vd)).allowed(), 0xe7);
    }

    #[test]
    fn compacted_size_packs_components_and_aligns_where_asked() {
        let host = |_: u32, i: u32| match i {
            2 => regs(100, 576, 0, 0),
            3 => regs(8, 0, 0b10, 0), // 64-byte aligned
            4 => regs(20, 0, 0, 0),
            _ => regs(0, 0, 0, 0),
        };
        assert_eq!(xsave_compacted_size(&host, 0b11), 576);
        assert_eq!(xsave_compacted_size(&host, 0b111), 676);
        assert_eq!(xsave_compacted_size(&host, 0b1111), 704 + 8);
        assert_eq!(xsave_compacted_size(&host, 0b11011), 576 + 8 + 20, "576 is aligned already");
        assert_eq!(xsave_compacted_size(&everything, 1 << 63), u32::MAX);
    }

    #[test]
    fn xsave_area_size_is_the_end_of_the_last_component() {
        let cpu = xeon();
        let size = |xcr0: u64| xsave_area_size(&|l, s| cpu.get(l, s), xcr0);
        assert_eq!(size(0), 576);
        assert_eq!(size(XCR0_X87 | XCR0_SSE), 576);
        assert_eq!(size(0x7), 832);
        assert_eq!(size(0xe7), 2688);
        assert_eq!(size(0x2e7), 2696);
        assert_eq!(size(0x207), 2696);
        assert_eq!(size(0x47), 1664); // an order that is not the end: still the max
        assert_eq!(size(0x60007), 11008);
        // Components 0 and 1 live in the legacy region, whatever CPUID(0xD,0/1) says.
        assert_eq!(xsave_area_size(&everything, 3), 576);
        assert_eq!(xsave_area_size(&everything, 1 << 63), u32::MAX); // no overflow, no bad shift
        let small = |_: u32, _: u32| regs(8, 16, 0, 0);
        assert_eq!(xsave_area_size(&small, 1 << 2), 576);
    }

    #[test]
    fn extended_leaves() {
        let cpu = xeon();
        let v = cpu.full_view();
        assert_eq!(cpu.g(EXT_LEAF_BASE, 0, &v), regs(0x8000_0008, 0, 0, 0));
        assert_eq!(cpu.g(0x8000_0001, 0, &v), regs(0, 0, 0x121, 0x2c10_0800));
        let no_rdtscp = GuestView { rdtscp: false, ..v };
        assert_eq!(cpu.g(0x8000_0001, 0, &no_rdtscp).edx, 0x2410_0800);
        for leaf in [0x8000_0002, 0x8000_0003, 0x8000_0004, 0x8000_0006] {
            assert_eq!(cpu.g(leaf, 0, &v), cpu.get(leaf, 0), "{leaf:#x}");
        }
        assert_eq!(cpu.g(0x8000_0005, 0, &v), Regs::default());
        assert_eq!(cpu.g(0x8000_0007, 0, &v), regs(0, 0, 0, 0x100));
        assert_eq!(cpu.g(0x8000_0008, 0, &v), regs(0x3934, 0, 0, 0));
        // A host with more extended leaves: capped.
        let more = xeon().with(EXT_LEAF_BASE, 0, regs(0x8000_0023, 0, 0, 0)).with(0x8000_0009, 0, regs(1, 1, 1, 1));
        assert_eq!(more.g(EXT_LEAF_BASE, 0, &v).eax, MAX_EXT_LEAF);
        assert_eq!(more.g(0x8000_0009, 0, &v), Regs::default());
        // Fewer: the ones above read 0, the top one answers.
        let fewer = xeon().with(EXT_LEAF_BASE, 0, regs(0x8000_0004, 0, 0, 0));
        assert_eq!(fewer.g(EXT_LEAF_BASE, 0, &v).eax, 0x8000_0004);
        assert_eq!(fewer.g(0x8000_0004, 0, &v), fewer.get(0x8000_0004, 0));
        assert_eq!(fewer.g(0x8000_0006, 0, &v), Regs::default());
        assert_eq!(fewer.g(0x8000_0008, 0, &v), Regs::default());
        // None (EAX below 0x8000_0000): all read 0.
        let none = xeon().with(EXT_LEAF_BASE, 0, regs(0x20, 0, 0, 0));
        assert_eq!(none.g(EXT_LEAF_BASE, 0, &v), Regs::default());
        assert_eq!(none.g(0x8000_0001, 0, &v), Regs::default());
    }

    #[test]
    fn vendor_leaf_spells_the_signature() {
        let cpu = xeon(); // its host has a hypervisor leaf of its own
        for v in [GuestView::default(), cpu.full_view()] {
            let g = cpu.g(HYPERVISOR_LEAF, 0, &v);
            let mut sig = [0u8; 12];
            sig[..4].copy_from_slice(&g.ebx.to_le_bytes());
            sig[4..8].copy_from_slice(&g.ecx.to_le_bytes());
            sig[8..].copy_from_slice(&g.edx.to_le_bytes());
            assert_eq!(&sig, VENDOR);
            assert_eq!(g.eax, HYPERVISOR_LEAF);
            assert_eq!(cpu.g(HYPERVISOR_LEAF + 1, 0, &v), Regs::default());
        }
    }

    #[test]
    fn named_bits_are_the_architectural_ones() {
        assert_eq!(
            [LEAF1_ECX_VMX, LEAF1_ECX_XSAVE, LEAF1_ECX_OSXSAVE, LEAF1_ECX_HYPERVISOR, LEAF7_ECX_PKU, LEAF7_ECX_OSPKE],
            [1 << 5, 1 << 26, 1 << 27, 1 << 31, 1 << 3, 1 << 4]
        );
        assert_eq!([XCR0_X87, XCR0_SSE, XCR0_AVX, XCR0_AVX512, XCR0_PKRU], [1, 2, 4, 0xe0, 0x200]);
    }

    #[test]
    fn tables_name_each_bit_once() {
        for t in [LEAF1_ECX, LEAF1_EDX, LEAF7_EBX, LEAF7_ECX, LEAF7_EDX, LEAF7_1_EAX, LEAFD_1_EAX, EXT1_ECX, EXT1_EDX] {
            let mut seen = 0u32;
            for b in t {
                let (Host(n, _) | Set(n, _)) = *b;
                assert!(n < 32 && seen & 1 << n == 0, "bit {n} twice");
                seen |= 1 << n;
            }
        }
    }

    /// A random processor: every answer pseudo-random, but a chosen top
    /// basic and extended leaf.
    fn random_host(seed: u64, top: u32, ext_top: u32) -> impl Fn(u32, u32) -> Regs {
        move |leaf, subleaf| {
            let mix = |k: u64| {
                // splitmix64
                let mut z = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            };
            let k = u64::from(leaf) << 32 | u64::from(subleaf);
            let (a, b) = (mix(k), mix(!k));
            let r = regs(a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32);
            match leaf {
                0 => Regs { eax: top, ..r },
                EXT_LEAF_BASE => Regs { eax: ext_top, ..r },
                _ => r,
            }
        }
    }

    proptest! {
        /// No whitelisted register shows a bit the host lacks (but the
        /// hypervisor bit and the OS bits that mirror CR4), nothing outside
        /// the whitelist, and what is shown is consistent with leaf 0xD.
        #[test]
        fn guest_bits_come_from_the_host(
            seed in any::<u64>(),
            top in prop_oneof![0u32..0x24, any::<u32>()],
            ext_top in prop_oneof![0x8000_0000u32..0x8000_000c, any::<u32>()],
            osxsave in any::<bool>(), pke in any::<bool>(), rdtscp in any::<bool>(), invpcid in any::<bool>(),
            xcr0 in prop_oneof![Just(u64::MAX), any::<u64>()],
            leaf in any::<u32>(), subleaf in any::<u32>(),
        ) {
            let host = random_host(seed, top, ext_top);
            let view = GuestView { cr4_osxsave: osxsave, cr4_pke: pke, xcr0_allowed: xcr0, rdtscp, invpcid, lapic: false, apic_enabled: false, tsc_hz: 0, xcr0: 0 };
            let g = |l: u32, s: u32| guest_cpuid(l, s, &host, &view);
            let allowed = xcr0_allowed(&host);
            prop_assert_eq!(allowed & !XCR0_SUPPORTED, 0);
            prop_assert_eq!(allowed, consistent_xcr0(allowed));

            let sub = |l: u32, h: u32, g: u32, extra: u32, wl: &[u32]| -> Result<(), TestCaseError> {
                prop_assert_eq!(g & !h & !extra, 0, "leaf {:#x}: {:#x} not from host {:#x}", l, g, h);
                prop_assert_eq!(g & !bits(wl), 0, "leaf {:#x}: {:#x} outside the whitelist", l, g);
                Ok(())
            };
            let (l1, h1) = (g(1, 0), host(1, 0));
            let (l7, h7) = (g(7, 0), host(7, 0));
            let (d0, d1) = (g(0xd, 0), g(0xd, 1));
            let e1 = g(0x8000_0001, 0);
            if top >= 1 {
                sub(1, h1.ecx, l1.ecx, LEAF1_ECX_HYPERVISOR | LEAF1_ECX_OSXSAVE, WL_1_ECX)?;
                sub(1, h1.edx, l1.edx, 0, WL_1_EDX)?;
                prop_assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
                prop_assert_eq!(l1.ecx & LEAF1_ECX_OSXSAVE != 0, osxsave && l1.ecx & LEAF1_ECX_XSAVE != 0);
                prop_assert_eq!(l1.ebx >> 16, 1);
            } else {
                prop_assert_eq!(l1, Regs::default());
            }
            sub(7, h7.ebx, l7.ebx, LEAF7_EBX_TSC_ADJUST, WL_7_EBX)?;
            sub(7, h7.ecx, l7.ecx, LEAF7_ECX_OSPKE, WL_7_ECX)?;
            sub(7, h7.edx, l7.edx, 0, WL_7_EDX)?;
            sub(7, host(7, 1).eax, g(7, 1).eax, 0, &[4, 5])?;
            prop_assert_eq!(l7.ecx & LEAF7_ECX_OSPKE != 0, pke && l7.ecx & LEAF7_ECX_PKU != 0);
            sub(0xd, host(0xd, 1).eax, d1.eax, 0, &[0, 1, 2])?;
            prop_assert_eq!(u64::from(d0.eax) & !(allowed & xcr0), 0);
            prop_assert_eq!(d0.edx, 0);
            sub(0x8000_0001, host(0x8000_0001, 0).ecx, e1.ecx, 0, &[0, 5, 8])?;
            sub(0x8000_0001, host(0x8000_0001, 0).edx, e1.edx, 0, &[11, 20, 26, 27, 29])?;
            sub(0x8000_0007, host(0x8000_0007, 0).edx, g(0x8000_0007, 0).edx, 0, &[8])?;

            // Consistency with leaf 0xD: each feature's state is there.
            let shown = u64::from(d0.eax);
            prop_assert_eq!(l1.ecx & LEAF1_ECX_XSAVE != 0, shown & XCR0_X87 != 0);
            if l1.ecx & bits(AVX_BITS_1_ECX) != 0 || l7.ebx & 1 << 5 != 0 {
                prop_assert_ne!(shown & XCR0_AVX, 0);
            }
            if l7.ebx & bits(AVX512_7_EBX) != 0 || l7.ecx & bits(AVX512_7_ECX) != 0 || l7.edx & bits(AVX512_7_EDX) != 0 {
                prop_assert_eq!(shown & XCR0_AVX512, XCR0_AVX512);
            }
            if l7.ecx & LEAF7_ECX_PKU != 0 {
                prop_assert_ne!(shown & XCR0_PKRU, 0);
            }
            if !rdtscp {
                prop_assert_eq!((e1.edx & 1 << 27, l7.ecx & 1 << 22), (0, 0));
            }
            if !invpcid {
                prop_assert_eq!(l7.ebx & 1 << 10, 0);
            }

            // Any leaf: outside the served ranges, 0; leaves that pass, pass.
            let r = g(leaf, subleaf);
            let basic_top = top.min(MAX_BASIC_LEAF);
            let ext = min(ext_top, MAX_EXT_LEAF);
            let served = leaf <= basic_top || leaf == HYPERVISOR_LEAF || (EXT_LEAF_BASE..=ext).contains(&leaf);
            if !served {
                prop_assert_eq!(r, Regs::default());
            }
            if leaf <= basic_top && matches!(leaf, 2 | 0x15 | 0x16) || (EXT_LEAF_BASE..=ext).contains(&leaf) && matches!(leaf, 0x8000_0002..=0x8000_0004 | 0x8000_0006) {
                prop_assert_eq!(r, host(leaf, subleaf));
            }
            // The whole area fits in what the guest is told.
            if d0.eax != 0 {
                prop_assert!(d0.ecx >= XSAVE_LEGACY_AND_HEADER);
            }
        }
    }
}

//! VMX capabilities (Intel SDM Vol. 3D Appendix A) and what we require.

use core::fmt;

pub mod msr {
    pub const FEATURE_CONTROL: u32 = 0x3a;
    pub const BASIC: u32 = 0x480;
    pub const PINBASED: u32 = 0x481;
    pub const PROCBASED: u32 = 0x482;
    pub const EXIT: u32 = 0x483;
    pub const ENTRY: u32 = 0x484;
    pub const MISC: u32 = 0x485;
    pub const CR0_FIXED0: u32 = 0x486;
    pub const CR0_FIXED1: u32 = 0x487;
    pub const CR4_FIXED0: u32 = 0x488;
    pub const CR4_FIXED1: u32 = 0x489;
    pub const PROCBASED2: u32 = 0x48b;
    pub const EPT_VPID_CAP: u32 = 0x48c;
    pub const TRUE_PINBASED: u32 = 0x48d;
    pub const TRUE_PROCBASED: u32 = 0x48e;
    pub const TRUE_EXIT: u32 = 0x48f;
    pub const TRUE_ENTRY: u32 = 0x490;
}

/// Bits of IA32_VMX_EPT_VPID_CAP (SDM Vol. 3D A.10).
pub mod ept_cap {
    pub const WALK_4_LEVEL: u64 = 1 << 6;
    pub const MEMTYPE_WB: u64 = 1 << 14;
    pub const PAGE_2M: u64 = 1 << 16;
    pub const INVEPT: u64 = 1 << 20;
    pub const ACCESSED_DIRTY: u64 = 1 << 21;
    pub const INVEPT_SINGLE: u64 = 1 << 25;
    pub const INVEPT_ALL: u64 = 1 << 26;
    pub const INVVPID: u64 = 1 << 32;
    pub const INVVPID_SINGLE: u64 = 1 << 41;
    pub const INVVPID_ALL: u64 = 1 << 42;
}

/// An INVEPT or INVVPID type (SDM Vol. 3C 30.3), as the instruction's
/// register operand encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Invalidation {
    SingleContext = 1,
    AllContext = 2,
}

/// Secondary processor-based controls we look for.
const SECONDARY_CONTROLS: u32 = 1 << 31; // primary procbased bit 31
const ENABLE_EPT: u32 = 1 << 1;
const ENABLE_VPID: u32 = 1 << 5;
const UNRESTRICTED_GUEST: u32 = 1 << 7;
const PREEMPTION_TIMER: u32 = 1 << 6; // pin-based bit 6

/// IA32_FEATURE_CONTROL (SDM Vol. 3C 24.7): bit 0 lock, bit 2 VMX outside SMX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureControl {
    /// Locked with VMX allowed: nothing to do.
    Enabled,
    /// Unlocked: write this value (lock + VMX outside SMX) first.
    Write(u64),
    /// Locked with VMX off: only the firmware can change it.
    DisabledInFirmware,
}

impl FeatureControl {
    pub fn decide(value: u64) -> FeatureControl {
        const LOCK: u64 = 1 << 0;
        const VMX_OUTSIDE_SMX: u64 = 1 << 2;
        match (value & LOCK != 0, value & VMX_OUTSIDE_SMX != 0) {
            (true, true) => FeatureControl::Enabled,
            (true, false) => FeatureControl::DisabledInFirmware,
            (false, _) => FeatureControl::Write(value | LOCK | VMX_OUTSIDE_SMX),
        }
    }
}

/// A feature the hypervisor needs and the CPU lacks, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Missing(pub &'static str);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the CPU lacks {}", self.0)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCaps {
    pub basic: u64,
    /// Pin-based, primary, exit and entry capabilities: the TRUE_ MSRs when
    /// IA32_VMX_BASIC bit 55 says they exist (SDM A.2), else the plain ones.
    pub pinbased: u64,
    pub procbased: u64,
    pub exit: u64,
    pub entry: u64,
    /// 0 when the CPU has no secondary controls.
    pub procbased2: u64,
    /// 0 when the CPU has neither EPT nor VPID.
    pub ept_vpid: u64,
    pub misc: u64,
    pub cr0_fixed: (u64, u64),
    pub cr4_fixed: (u64, u64),
}

impl VmxCaps {
    /// Reads every capability MSR, only those the CPU says exist (reading
    /// 0x48B/0x48C without them raises #GP; FACTS.md saw it on Bochs'
    /// core2_penryn model).
    pub fn read(rdmsr: impl Fn(u32) -> u64) -> VmxCaps {
        let basic = rdmsr(msr::BASIC);
        let true_ctls = basic & (1 << 55) != 0;
        let pick = |t, plain| rdmsr(if true_ctls { t } else { plain });
        let procbased = pick(msr::TRUE_PROCBASED, msr::PROCBASED);
        let procbased2 = if allowed1(procbased) & SECONDARY_CONTROLS != 0 { rdmsr(msr::PROCBASED2) } else { 0 };
        let ept_vpid =
            if allowed1(procbased2) & (ENABLE_EPT | ENABLE_VPID) != 0 { rdmsr(msr::EPT_VPID_CAP) } else { 0 };
        VmxCaps {
            basic,
            pinbased: pick(msr::TRUE_PINBASED, msr::PINBASED),
            procbased,
            exit: pick(msr::TRUE_EXIT, msr::EXIT),
            entry: pick(msr::TRUE_ENTRY, msr::ENTRY),
            procbased2,
            ept_vpid,
            misc: rdmsr(msr::MISC),
            cr0_fixed: (rdmsr(msr::CR0_FIXED0), rdmsr(msr::CR0_FIXED1)),
            cr4_fixed: (rdmsr(msr::CR4_FIXED0), rdmsr(msr::CR4_FIXED1)),
        }
    }

    /// The VMCS revision identifier (bits 30:0 of IA32_VMX_BASIC).
    pub fn revision_id(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// Everything the hypervisor cannot run without, first missing named.
    pub fn check_required(&self) -> Result<(), Missing> {
        let need = |ok: bool, what| if ok { Ok(()) } else { Err(Missing(what)) };
        // SDM A.1: bit 50 would mean VMCS pointers above 4 GiB are refused.
        need(self.basic & (1 << 48) == 0, "64-bit VMX physical addresses (IA32_VMX_BASIC bit 48 is set)")?;
        need(allowed1(self.procbased) & SECONDARY_CONTROLS != 0, "secondary processor-based VM-execution controls")?;
        need(allowed1(self.procbased2) & ENABLE_EPT != 0, "EPT (extended page tables)")?;
        need(self.ept_vpid & ept_cap::WALK_4_LEVEL != 0, "a 4-level EPT page walk")?;
        need(self.ept_vpid & ept_cap::MEMTYPE_WB != 0, "the write-back memory type for EPT structures")?;
        need(self.ept_vpid & ept_cap::INVEPT != 0, "INVEPT")?;
        need(
            self.ept_vpid & (ept_cap::INVEPT_SINGLE | ept_cap::INVEPT_ALL) != 0,
            "an INVEPT type (single-context or all-context)",
        )?;
        need(allowed1(self.pinbased) & PREEMPTION_TIMER != 0, "the VMX-preemption timer")
    }

    /// VPIDs are used only where INVVPID can flush them (single- or
    /// all-context), since a VM's tagged translations must go when its
    /// VPID is reused.
    pub fn has_vpid(&self) -> bool {
        allowed1(self.procbased2) & ENABLE_VPID != 0 && self.invvpid_type().is_some()
    }

    /// The INVEPT type to flush one VM's EPT translations: single-context
    /// where the CPU has it, else all-context (A.10; `check_required`
    /// makes sure one of them exists).
    pub fn invept_type(&self) -> Invalidation {
        if self.ept_vpid & ept_cap::INVEPT_SINGLE != 0 {
            Invalidation::SingleContext
        } else {
            Invalidation::AllContext
        }
    }

    /// Likewise for INVVPID; `None` when the CPU has no INVVPID type.
    pub fn invvpid_type(&self) -> Option<Invalidation> {
        let c = self.ept_vpid;
        if c & ept_cap::INVVPID == 0 {
            None
        } else if c & ept_cap::INVVPID_SINGLE != 0 {
            Some(Invalidation::SingleContext)
        } else if c & ept_cap::INVVPID_ALL != 0 {
            Some(Invalidation::AllContext)
        } else {
            None
        }
    }

    pub fn has_unrestricted_guest(&self) -> bool {
        allowed1(self.procbased2) & UNRESTRICTED_GUEST != 0
    }

    /// EPT accessed and dirty flags (A.10 bit 21, used with EPTP bit 6).
    pub fn has_ept_accessed_dirty(&self) -> bool {
        self.ept_vpid & ept_cap::ACCESSED_DIRTY != 0
    }

    pub fn has_ept_2m(&self) -> bool {
        self.ept_vpid & ept_cap::PAGE_2M != 0
    }

    /// The preemption timer counts down once every 2^rate TSC ticks (A.6).
    pub fn preemption_timer_rate(&self) -> u32 {
        (self.misc & 0x1f) as u32
    }

    /// CR0 or CR4 with the bits VMX operation fixes applied (A.7, A.8).
    pub fn fix_cr0(&self, cr0: u64) -> u64 {
        (cr0 | self.cr0_fixed.0) & self.cr0_fixed.1
    }
    /// CR0 under "unrestricted guest": PE and PG are the guest's own
    /// (SDM Vol. 3C 26.6.2, A.7), the other fixed bits still apply.
    pub fn fix_cr0_unrestricted(&self, cr0: u64) -> u64 {
        const PE_PG: u64 = (1 << 0) | (1 << 31);
        (cr0 | (self.cr0_fixed.0 & !PE_PG)) & self.cr0_fixed.1
    }
    pub fn fix_cr4(&self, cr4: u64) -> u64 {
        (cr4 | self.cr4_fixed.0) & self.cr4_fixed.1
    }
}

fn allowed1(cap: u64) -> u32 {
    (cap >> 32) as u32
}

/// A VM-execution/exit/entry control value derived from its capability
/// MSR (SDM A.3-A.5): the allowed-0 settings (low half: the bits that
/// must be one) are forced on, and every bit of `want` must be allowed
/// (high half), else the bits that are not are returned.
pub fn adjust_controls(cap: u64, want: u32) -> Result<u32, u32> {
    let (must, may) = (cap as u32, (cap >> 32) as u32);
    let refused = want & !may;
    if refused != 0 {
        return Err(refused);
    }
    Ok(want | must)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bochs 2.7's corei7_skylake_x, as the kernel logged them there (the
    /// TRUE_ controls, which IA32_VMX_BASIC bit 55 says exist).
    fn skylake(msr: u32) -> u64 {
        match msr {
            msr::BASIC => 0x00d8_1000_0000_002b,
            msr::TRUE_PINBASED | msr::PINBASED => 0x0000_007f_0000_0016,
            msr::TRUE_PROCBASED | msr::PROCBASED => 0xf7f9_fffe_0400_6172,
            msr::TRUE_EXIT | msr::EXIT => 0x007f_ffff_0003_6dfb,
            msr::TRUE_ENTRY | msr::ENTRY => 0x0000_ffff_0000_11fb,
            msr::MISC => 0x6004_01e0,
            msr::PROCBASED2 => 0x0217_7fff_0000_0000,
            msr::EPT_VPID_CAP => 0x0000_0f01_0633_4141,
            msr::CR0_FIXED0 => 0x8000_0021,
            msr::CR0_FIXED1 => 0xffff_ffff,
            msr::CR4_FIXED0 => 0x2000,
            msr::CR4_FIXED1 => 0x0037_27ff,
            _ => panic!("read of MSR {msr:#x} that was not asked for"),
        }
    }

    #[test]
    fn skylake_has_everything_we_need() {
        let c = VmxCaps::read(skylake);
        assert_eq!(c.revision_id(), 0x2b);
        assert_eq!(c.check_required(), Ok(()));
        assert!(c.has_vpid());
        assert!(c.has_ept_2m());
        assert_eq!(c.preemption_timer_rate(), 0);
        // CR0.NE is fixed to 1 (the bootloader leaves it clear: FACTS.md).
        assert_eq!(c.fix_cr0(0x8000_0011) & (1 << 5), 1 << 5);
        assert_eq!(c.fix_cr4(0x20) & 0x2000, 0x2000);
        assert!(c.has_unrestricted_guest());
        // Unrestricted: a multiboot entry's CR0 (PE|ET) keeps paging off
        // but still gets NE; PG and PE are the guest's.
        assert_eq!(c.fix_cr0_unrestricted(0x11), 0x31);
        assert_eq!(c.fix_cr0_unrestricted(0x10), 0x30);
        assert_eq!(c.fix_cr0_unrestricted(0x8000_0011), 0x8000_0031);
    }

    #[test]
    fn no_unrestricted_guest_without_the_secondary_bit() {
        let c = VmxCaps::read(|m| if m == msr::PROCBASED2 { 0x0017_7fff_0000_0000 & !(1 << 39) } else { skylake(m) });
        assert!(!c.has_unrestricted_guest());
    }

    #[test]
    fn without_secondary_controls_the_ept_msrs_are_not_read() {
        let penryn = |m: u32| match m {
            msr::PROCBASED2 | msr::EPT_VPID_CAP => panic!("#GP: {m:#x} does not exist"),
            msr::PROCBASED | msr::TRUE_PROCBASED => 0x77f9_fffe_0400_6172, // no bit 63
            other => skylake(other),
        };
        let c = VmxCaps::read(penryn);
        assert_eq!(c.check_required(), Err(Missing("secondary processor-based VM-execution controls")));
    }

    #[test]
    fn each_missing_ept_feature_is_named() {
        let base = VmxCaps::read(skylake);
        let cases = [
            (ept_cap::WALK_4_LEVEL, "a 4-level EPT page walk"),
            (ept_cap::MEMTYPE_WB, "the write-back memory type for EPT structures"),
            (ept_cap::INVEPT, "INVEPT"),
            (ept_cap::INVEPT_SINGLE | ept_cap::INVEPT_ALL, "an INVEPT type (single-context or all-context)"),
        ];
        for (bits, name) in cases {
            let c = VmxCaps { ept_vpid: base.ept_vpid & !bits, ..base };
            assert_eq!(c.check_required(), Err(Missing(name)));
        }
        let no_ept = VmxCaps { procbased2: base.procbased2 & !((ENABLE_EPT as u64) << 32), ..base };
        assert_eq!(no_ept.check_required(), Err(Missing("EPT (extended page tables)")));
        let no_timer = VmxCaps { pinbased: base.pinbased & !((PREEMPTION_TIMER as u64) << 32), ..base };
        assert_eq!(no_timer.check_required(), Err(Missing("the VMX-preemption timer")));
    }

    #[test]
    fn invalidation_types_follow_the_capability_bits() {
        let base = VmxCaps::read(skylake);
        assert_eq!(base.invept_type(), Invalidation::SingleContext);
        assert_eq!(base.invvpid_type(), Some(Invalidation::SingleContext));
        let only_all = VmxCaps { ept_vpid: base.ept_vpid & !(ept_cap::INVEPT_SINGLE | ept_cap::INVVPID_SINGLE), ..base };
        assert_eq!(only_all.invept_type(), Invalidation::AllContext);
        assert_eq!(only_all.invvpid_type(), Some(Invalidation::AllContext));
        assert!(only_all.has_vpid());
        let no_type = VmxCaps { ept_vpid: only_all.ept_vpid & !ept_cap::INVVPID_ALL, ..base };
        assert_eq!(no_type.invvpid_type(), None);
        assert!(!no_type.has_vpid());
        let no_invvpid = VmxCaps { ept_vpid: base.ept_vpid & !ept_cap::INVVPID, ..base };
        assert_eq!(no_invvpid.invvpid_type(), None);
        let no_vpid_control = VmxCaps { procbased2: base.procbased2 & !((ENABLE_VPID as u64) << 32), ..base };
        assert!(!no_vpid_control.has_vpid());
        assert_eq!(Invalidation::SingleContext as u64, 1);
        assert_eq!(Invalidation::AllContext as u64, 2);
    }

    #[test]
    fn true_controls_are_read_only_where_basic_bit_55_says_they_exist() {
        let fake = |with_true: bool| {
            move |m: u32| match m {
                msr::BASIC => 0x2b | if with_true { 1 << 55 } else { 0 },
                msr::TRUE_PINBASED => 0x11,
                msr::PINBASED => 0x22,
                msr::TRUE_PROCBASED | msr::PROCBASED => 0,
                msr::TRUE_EXIT => 0x33,
                msr::EXIT => 0x44,
                msr::TRUE_ENTRY => 0x55,
                msr::ENTRY => 0x66,
                msr::PROCBASED2 | msr::EPT_VPID_CAP => panic!("no secondary controls: {m:#x} must not be read"),
                _ => 0,
            }
        };
        let t = VmxCaps::read(fake(true));
        assert_eq!((t.pinbased, t.exit, t.entry), (0x11, 0x33, 0x55));
        let p = VmxCaps::read(fake(false));
        assert_eq!((p.pinbased, p.exit, p.entry), (0x22, 0x44, 0x66));
        assert_eq!((p.procbased2, p.ept_vpid), (0, 0));
    }

    #[test]
    fn feature_bits_are_the_sdms() {
        let c = VmxCaps::read(skylake);
        assert!(c.has_unrestricted_guest() && c.has_ept_accessed_dirty());
        let no_ug = VmxCaps { procbased2: c.procbased2 & !((UNRESTRICTED_GUEST as u64) << 32), ..c };
        assert!(!no_ug.has_unrestricted_guest());
        let no_ad = VmxCaps { ept_vpid: c.ept_vpid & !(1 << 21), ..c };
        assert!(!no_ad.has_ept_accessed_dirty());
        // All-context INVEPT alone (bit 26) is enough.
        let only_all = VmxCaps { ept_vpid: c.ept_vpid & !(1 << 25), ..c };
        assert_eq!(only_all.check_required(), Ok(()));
        // Bit 48: VMCS pointers limited to 32 bits.
        let narrow = VmxCaps { basic: c.basic | 1 << 48, ..c };
        assert_eq!(
            narrow.check_required(),
            Err(Missing("64-bit VMX physical addresses (IA32_VMX_BASIC bit 48 is set)"))
        );
        assert_eq!(alloc::format!("{}", Missing("EPT")), "the CPU lacks EPT");
        // MISC bits 4:0: the timer's rate; FIXED1 clears what must be 0.
        assert_eq!(VmxCaps { misc: 0x6004_01e5, ..c }.preemption_timer_rate(), 5);
        let strict = VmxCaps { cr0_fixed: (0x21, 0xffff_00ff), cr4_fixed: (0x2000, 0x20ff), ..c };
        assert_eq!(strict.fix_cr0(0x1_0000_0100), 0x21);
        assert_eq!(strict.fix_cr4(0x1_0000_0120), 0x2020);
        // Bits already set stay set (an OR, not a toggle).
        assert_eq!(strict.fix_cr0(0x21), 0x21);
        assert_eq!(strict.fix_cr4(0x2000 | 0x20), 0x2020);
        assert!(!VmxCaps { ept_vpid: c.ept_vpid & !ept_cap::PAGE_2M, ..c }.has_ept_2m());
    }

    #[test]
    fn controls_force_allowed0_and_refuse_what_allowed1_forbids() {
        let cap = 0x0000_00ff_0000_0016u64; // must: bits 1,2,4; may: bits 0-7
        assert_eq!(adjust_controls(cap, 0), Ok(0x16));
        assert_eq!(adjust_controls(cap, 1 << 6), Ok(0x56));
        assert_eq!(adjust_controls(cap, 0x12), Ok(0x16)); // wanted and forced
        assert_eq!(adjust_controls(cap, (1 << 8) | (1 << 6)), Err(1 << 8));
    }

    #[test]
    fn feature_control_decisions() {
        assert_eq!(FeatureControl::decide(0x5), FeatureControl::Enabled);
        assert_eq!(FeatureControl::decide(0x1), FeatureControl::DisabledInFirmware);
        assert_eq!(FeatureControl::decide(0x0), FeatureControl::Write(0x5));
        assert_eq!(FeatureControl::decide(0x2), FeatureControl::Write(0x7));
        assert_eq!(FeatureControl::decide(0x4), FeatureControl::Write(0x5));
    }
}

//! Model-specific registers the guest's CPU has that the hypervisor keeps
//! per VM (those with rules beyond "store what was written"; the plain
//! ones live in the VMCS or are switched by the vCPU).

use crate::control_regs::Gp;

/// IA32_MISC_ENABLE (0x1A0, SDM Vol. 4 Table 2-2).
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MCG_CAP (0x179) and IA32_MCG_STATUS (0x17A): the machine-check
/// architecture with no error-reporting banks (CPUID shows no MCA).
pub const IA32_MCG_CAP: u32 = 0x179;
pub const IA32_MCG_STATUS: u32 = 0x17a;

/// IA32_BIOS_SIGN_ID (0x8B), the microcode update signature: after a
/// WRMSR of 0 and a CPUID(1), bits 63:32 hold the revision loaded. A
/// virtual CPU has none to load; it reads revision 1, as under KVM, and
/// writes are accepted and change nothing (the guest cannot load
/// microcode: IA32_BIOS_UPDT_TRIG is not there). Linux writes and reads it
/// at boot with unchecked accesses (early_init_intel).
pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
pub const MICROCODE_REVISION: u64 = 1 << 32;

/// Bits of MISC_ENABLE the guest may change: fast strings (0), automatic
/// thermal control (3), EIST (16), MONITOR/MWAIT enable (18), limit CPUID
/// maxval (22), xTPR disable (23), XD disable (34). Read-only: performance
/// monitoring available (7), BTS unavailable (11), PEBS unavailable (12).
/// Every other bit is reserved (#GP on a write that sets one).
pub const MISC_ENABLE_WRITABLE: u64 = (1 << 0) | (1 << 3) | (1 << 16) | (1 << 18) | (1 << 22) | (1 << 23) | (1 << 34);
pub const MISC_ENABLE_READ_ONLY: u64 = (1 << 7) | (1 << 11) | (1 << 12);
/// After reset, as KVM has it: fast strings on, no BTS and no PEBS (the
/// guest has no PMU), performance monitoring not available.
pub const MISC_ENABLE_RESET: u64 = (1 << 0) | (1 << 11) | (1 << 12);

/// WRMSR MISC_ENABLE: the value to keep, or `Err` for #GP(0): a reserved
/// bit set, or a read-only bit changed.
pub fn misc_enable_write(old: u64, new: u64) -> Result<u64, Gp> {
    let reserved = !(MISC_ENABLE_WRITABLE | MISC_ENABLE_READ_ONLY);
    if new & reserved != 0 || (new ^ old) & MISC_ENABLE_READ_ONLY != 0 {
        return Err(Gp);
    }
    Ok(new)
}

/// RDMSR of the machine-check MSRs: no banks, no MCG_CTL (MCG_CAP = 0),
/// MCG_STATUS clear. `None`: not one of them.
pub fn mcg_read(msr: u32) -> Option<u64> {
    matches!(msr, IA32_MCG_CAP | IA32_MCG_STATUS).then_some(0)
}

/// WRMSR of the machine-check MSRs: MCG_CAP is read-only; MCG_STATUS takes
/// only 0 (nothing ever sets its bits here). `None`: not one of them.
pub fn mcg_write(msr: u32, value: u64) -> Option<Result<(), Gp>> {
    match msr {
        IA32_MCG_CAP => Some(Err(Gp)),
        IA32_MCG_STATUS => Some(if value == 0 { Ok(()) } else { Err(Gp) }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misc_enable_keeps_writable_bits_and_refuses_reserved_and_read_only_changes() {
        // What kvm-unit-tests' x86/msr.c writes (0x400c50809 with the
        // read-only 0x1880 taken from the old value) reads back.
        let old = MISC_ENABLE_RESET;
        let val = (0x4_00c5_0809 & !0x1880) | (old & 0x1880);
        assert_eq!(misc_enable_write(old, val), Ok(val));
        assert_eq!(misc_enable_write(val, old), Ok(old));
        // Reserved bits (1, 2, 4-6, 8-10, 13-15, 17, 19-21, 24-33, 35-63).
        for bit in [1, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 24, 33, 35, 63] {
            assert_eq!(misc_enable_write(old, old | 1 << bit), Err(Gp), "bit {bit}");
        }
        // Read-only bits may not change, either way.
        assert_eq!(misc_enable_write(old, old | 1 << 7), Err(Gp));
        assert_eq!(misc_enable_write(old, old & !(1 << 11)), Err(Gp));
        assert_eq!(misc_enable_write(old, old & !(1 << 12)), Err(Gp));
    }

    #[test]
    fn mcg_has_no_banks() {
        assert_eq!(mcg_read(IA32_MCG_CAP), Some(0));
        assert_eq!(mcg_read(IA32_MCG_STATUS), Some(0));
        assert_eq!(mcg_read(0x400), None);
        assert_eq!(mcg_write(IA32_MCG_CAP, 0), Some(Err(Gp)));
        assert_eq!(mcg_write(IA32_MCG_STATUS, 0), Some(Ok(())));
        assert_eq!(mcg_write(IA32_MCG_STATUS, 1), Some(Err(Gp)));
        assert_eq!(mcg_write(0x401, 0), None);
    }
}

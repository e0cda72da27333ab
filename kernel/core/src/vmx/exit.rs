//! VM-exit reasons, exit qualifications and VM-instruction errors.

/// Basic exit reasons (SDM Vol. 3D Appendix C) that the hypervisor handles
/// or names.
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT_SIGNAL: u16 = 3;
    pub const STARTUP_IPI: u16 = 4;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const NMI_WINDOW: u16 = 8;
    pub const TASK_SWITCH: u16 = 9;
    pub const CPUID: u16 = 10;
    pub const GETSEC: u16 = 11;
    pub const HLT: u16 = 12;
    pub const INVD: u16 = 13;
    pub const RDPMC: u16 = 15;
    pub const VMCALL: u16 = 18;
    pub const VMCLEAR: u16 = 19;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const ENTRY_FAIL_GUEST_STATE: u16 = 33;
    pub const ENTRY_FAIL_MSR_LOADING: u16 = 34;
    pub const MWAIT: u16 = 36;
    pub const MONITOR: u16 = 39;
    pub const ENTRY_FAIL_MACHINE_CHECK: u16 = 41;
    pub const TPR_BELOW_THRESHOLD: u16 = 43;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const WBINVD: u16 = 54;
    pub const XSETBV: u16 = 55;
    /// One past the highest reason we keep a counter for.
    pub const COUNT: usize = 80;
}

/// The VMX instructions a guest may not use: each exits, and the guest
/// gets #UD (SDM Vol. 3C 26.1.3: they exit unconditionally).
pub fn is_vmx_instruction(reason: u16) -> bool {
    (reason::VMCLEAR..=reason::VMXON).contains(&reason) || reason == reason::INVEPT || reason == reason::INVVPID
}

pub fn exit_reason_name(reason: u16) -> &'static str {
    match reason {
        0 => "exception or NMI",
        1 => "external interrupt",
        2 => "triple fault",
        3 => "INIT signal",
        4 => "start-up IPI",
        7 => "interrupt window",
        8 => "NMI window",
        9 => "task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "control-register access",
        29 => "MOV DR",
        30 => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "VM-entry failure: invalid guest state",
        34 => "VM-entry failure: MSR loading",
        36 => "MWAIT",
        37 => "monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "VM-entry failure: machine check",
        43 => "TPR below threshold",
        44 => "APIC access",
        46 => "GDTR/IDTR access",
        47 => "LDTR/TR access",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "VMX-preemption timer expired",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        57 => "RDRAND",
        58 => "INVPCID",
        61 => "RDSEED",
        62 => "page-modification log full",
        _ => "other",
    }
}

/// The VM-instruction error field's meaning (SDM Vol. 3C 31.4).
pub fn instruction_error_meaning(error: u32) -> &'static str {
    match error {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error",
    }
}

/// Exit qualification of an I/O instruction (SDM Vol. 3C Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoQual {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub is_in: bool,
    /// INS/OUTS (with or without REP): not emulated.
    pub string: bool,
}

impl IoQual {
    pub fn decode(q: u64) -> IoQual {
        IoQual {
            size: (q & 7) as u8 + 1,
            is_in: q & (1 << 3) != 0,
            string: q & (1 << 4) != 0,
            port: (q >> 16) as u16,
        }
    }
}

/// Exit qualification of an EPT violation (SDM Vol. 3C Table 28-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptQual {
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// Bits 3-5: whether the entry allowed read, write, fetch.
    pub was_readable: bool,
    pub was_writable: bool,
}

impl EptQual {
    pub fn decode(q: u64) -> EptQual {
        EptQual {
            read: q & 1 != 0,
            write: q & 2 != 0,
            fetch: q & 4 != 0,
            was_readable: q & 8 != 0,
            was_writable: q & 16 != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_qualification() {
        // OUT DX, AL to 0x3f8
        assert_eq!(IoQual::decode(0x03f8_0000), IoQual { port: 0x3f8, size: 1, is_in: false, string: false });
        // IN EAX, DX from 0x3fd
        assert_eq!(IoQual::decode(0x03fd_000b), IoQual { port: 0x3fd, size: 4, is_in: true, string: false });
        assert!(IoQual::decode(0x10).string);
    }

    #[test]
    fn ept_qualification_bochs_reported() {
        // FACTS.md: a write to a read-only EPT page exited with 0x18a.
        let q = EptQual::decode(0x18a);
        assert!(q.write && !q.read && !q.fetch && q.was_readable && !q.was_writable);
    }

    #[test]
    fn names_and_meanings() {
        assert_eq!(exit_reason_name(reason::VMCALL), "VMCALL");
        assert_eq!(exit_reason_name(reason::EPT_VIOLATION), "EPT violation");
        assert_eq!(instruction_error_meaning(7), "VM entry with invalid control field(s)");
        assert_eq!(instruction_error_meaning(99), "unknown VM-instruction error");
        assert!(is_vmx_instruction(reason::VMXON) && is_vmx_instruction(reason::INVEPT));
        assert!(!is_vmx_instruction(reason::VMCALL) && !is_vmx_instruction(reason::CR_ACCESS));
    }
}

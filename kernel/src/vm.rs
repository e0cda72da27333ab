//! A virtual machine as the kernel sees it: one vCPU (its VMCS and
//! registers), its memory in the page manager, its devices, its counters,
//! and how it ended.

use crate::vmx::instructions::GuestRegs;
use crate::vmx::vmcs::Vmcs;
use alloc::string::String;
use alloc::vec::Vec;
use hvcore::page_manager::VmId;
use hvcore::serial_device::SerialDevice;
use hvcore::vmx::exit::reason;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest asked to stop (EXIT hypercall) with this code.
    Exited(u64),
    /// The hypervisor stopped it: the cause, for the log.
    Stopped(Cause),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    WildAccess(u64),
    TripleFault,
    OutOfMemory,
    EntryFailed(String),
    Unhandled(String),
}

impl core::fmt::Display for Cause {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Cause::WildAccess(gpa) => write!(f, "guest-physical access at {gpa:#x} outside its memory"),
            Cause::TripleFault => f.write_str("triple fault"),
            Cause::OutOfMemory => f.write_str("out of host memory"),
            Cause::EntryFailed(why) => write!(f, "VM entry failed: {why}"),
            Cause::Unhandled(why) => f.write_str(why),
        }
    }
}

/// A check the guest reported.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    pub id: u64,
    pub failed: bool,
    pub detail: u64,
}

pub struct Vm {
    pub name: String,
    pub scenario: u8,
    pub id: VmId,
    pub vmcs: Vmcs,
    pub regs: GuestRegs,
    pub launched: bool,
    pub serial: SerialDevice,
    pub exits: [u64; reason::COUNT],
    /// Time slices it was given.
    pub slices: u64,
    pub checks: Vec<Check>,
    pub unknown_ports: u64,
    pub refused_hypercalls: u64,
    pub kernel_gs_base: u64,
    pub end: Option<End>,
    pub dedupe: DedupeProgress,
}

/// Where a DEDUPE guest is in its test, to measure each phase: EPT
/// violations taken by the re-read after convergence (goal: zero), and
/// COW breaks caused by its writes to merged pages.
#[derive(Clone, Copy, Debug, Default)]
pub struct DedupeProgress {
    /// `full_scans` when the guest first asked whether the scan converged.
    pub asked_at: Option<u64>,
    /// The VM's EPT violations when it was told the scan converged.
    pub violations_at_converged: Option<u64>,
    /// The VM's COW breaks when it reported its re-read check.
    pub cow_at_reread: Option<u64>,
    /// `oom-test`: this VM's writes find the host out of frames.
    pub starved: bool,
}

impl Vm {
    pub fn new(name: String, scenario: u8, id: VmId, vmcs: Vmcs) -> Vm {
        Vm {
            name,
            scenario,
            id,
            vmcs,
            regs: GuestRegs::default(),
            launched: false,
            serial: SerialDevice::default(),
            exits: [0; reason::COUNT],
            slices: 0,
            checks: Vec::new(),
            unknown_ports: 0,
            refused_hypercalls: 0,
            kernel_gs_base: 0,
            end: None,
            dedupe: DedupeProgress::default(),
        }
    }

    /// Stops the VM with a log line naming it and the cause.
    pub fn stop(&mut self, cause: Cause) {
        log::warn!("{}: stopped: {}", self.name, cause);
        self.end = Some(End::Stopped(cause));
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
}

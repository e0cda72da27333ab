//! A virtual machine as the kernel sees it: one vCPU (all of its
//! processor state), its memory in the page manager, its devices, its
//! counters and limits, and how it ended.

use crate::vcpu::Vcpu;
use alloc::string::String;
use alloc::vec::Vec;
use hvcore::page_manager::VmId;
use hvcore::rate_limit::TokenBucket;
use hvcore::platform::Platform;
use hvcore::vmx::event::ExceptionLoop;
use hvcore::vmx::exit::reason;

/// At most this many REPORTed checks are kept per VM; past it REPORT
/// returns ERROR (the list must not grow the host heap without bound).
pub const MAX_CHECKS: usize = 256;
/// Guest-triggered log lines: a burst of this many, then one more every
/// [`LOG_TICKS_PER_LINE`] TSC ticks. Each line costs the host the time to
/// send it through the UART (about 1 ms at 115200 baud), so a guest that
/// prints without end would otherwise take the CPU from the other VMs.
pub const LOG_BURST: u32 = 64;
pub const LOG_TICKS_PER_LINE: u64 = 1 << 20;
/// An unmodified guest's serial console is its output (kvm-unit-tests
/// print a line per check, a few hundred at most): a larger burst and a
/// faster refill, still bounded.
pub const CONSOLE_LOG_BURST: u32 = 1024;
pub const CONSOLE_LOG_TICKS_PER_LINE: u64 = 1 << 18;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest asked to stop (EXIT hypercall) with this code.
    Exited(u64),
    /// The guest wrote this status to the isa-debug-exit port (0xf4).
    DebugExit(u32),
    /// The guest asked the platform to reset it (the keyboard
    /// controller's reset line, or 0xcf9): as with QEMU's `-no-reboot`,
    /// the VM ends.
    Reset,
    /// The hypervisor stopped it: the cause, for the log.
    Stopped(Cause),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    WildAccess(u64),
    TripleFault,
    OutOfMemory,
    /// It would hold more host frames than its quota.
    FrameQuota(usize),
    /// The same exception at the same place, exit after exit.
    ExceptionLoop { vector: u8, rip: u64, rounds: u32 },
    EntryFailed(String),
    Unhandled(String),
}

impl core::fmt::Display for Cause {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Cause::WildAccess(gpa) => write!(f, "guest-physical access at {gpa:#x} outside its memory"),
            Cause::TripleFault => f.write_str("triple fault"),
            Cause::OutOfMemory => f.write_str("out of host memory"),
            Cause::FrameQuota(q) => write!(f, "frame quota of {q} frames exceeded"),
            Cause::ExceptionLoop { vector, rip, rounds } => {
                let what = if *vector == 1 { "debug-exception loop" } else { "exception loop" };
                write!(f, "{what}: vector {vector} at RIP {rip:#x} {rounds} times in a row with no progress")
            }
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

/// What runs in a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The project's guest program in one of its scenarios.
    Program { scenario: u8 },
    /// An unmodified multiboot kernel from a file.
    Multiboot,
    /// An unmodified Linux kernel (bzImage) from a file, with its initramfs.
    Linux,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Program { .. } => "program",
            Kind::Multiboot => "multiboot",
            Kind::Linux => "linux",
        }
    }

    /// An unmodified guest from a file: it has the virtual PC and a
    /// console, and ends through the isa-debug-exit port.
    pub fn unmodified(self) -> bool {
        !matches!(self, Kind::Program { .. })
    }
}

pub struct Vm {
    pub name: String,
    /// What the user called it (the file or scenario name).
    pub label: String,
    pub kind: Kind,
    pub id: VmId,
    pub vcpu: Vcpu,
    /// The devices of its small PC (the UART, debug-exit, fw_cfg, ...).
    pub platform: Platform,
    pub exits: [u64; reason::COUNT],
    /// Time slices it was given.
    pub slices: u64,
    pub checks: Vec<Check>,
    pub refused_hypercalls: u64,
    /// Host TSC ticks its slices took, exit handling included.
    pub cpu_ticks: u64,
    log_bucket: TokenBucket,
    pub exception_loop: ExceptionLoop,
    pub end: Option<End>,
    pub dedupe: DedupeProgress,
    /// It executed HLT and waits for an interrupt (a VM with the virtual
    /// APIC only); `halted_with_if`: RFLAGS.IF was set then, so a maskable
    /// interrupt wakes it (else only an NMI).
    pub halted: bool,
    pub halted_with_if: bool,
    /// An NMI that could not be injected yet (blocked): it waits for the
    /// NMI window.
    pub nmi_pending: bool,
}

/// Where a DEDUPE guest is in its test, to measure each phase: EPT
/// violations taken by the re-read after convergence (goal: zero), and
/// COW breaks caused by its writes to merged pages.
#[derive(Clone, Copy, Debug, Default)]
pub struct DedupeProgress {
    /// `full_scans` when the guest first asked whether the scan converged.
    pub asked_at: Option<u64>,
    /// EPT violations in the dedupe region so far (the guest's own code
    /// and stack pages are not what the re-read measures).
    pub region_violations: u64,
    /// `region_violations` when the VM was told the scan converged.
    pub violations_at_converged: Option<u64>,
    /// The VM's COW breaks when it reported its re-read check.
    pub cow_at_reread: Option<u64>,
    /// `oom-test`: this VM's writes find the host out of frames.
    pub starved: bool,
}

impl Vm {
    pub fn new(name: String, label: String, kind: Kind, id: VmId, vcpu: Vcpu, platform: Platform) -> Vm {
        Vm {
            name,
            label,
            kind,
            id,
            vcpu,
            platform,
            exits: [0; reason::COUNT],
            slices: 0,
            checks: Vec::new(),
            refused_hypercalls: 0,
            cpu_ticks: 0,
            log_bucket: match kind {
                Kind::Program { .. } => TokenBucket::new(LOG_BURST, LOG_TICKS_PER_LINE),
                Kind::Multiboot | Kind::Linux => TokenBucket::new(CONSOLE_LOG_BURST, CONSOLE_LOG_TICKS_PER_LINE),
            },
            exception_loop: ExceptionLoop::default(),
            end: None,
            dedupe: DedupeProgress::default(),
            halted: false,
            halted_with_if: false,
            nmi_pending: false,
        }
    }

    /// Stops the VM with a log line naming it and the cause.
    pub fn stop(&mut self, cause: Cause) {
        log::warn!("{}: stopped: {}", self.name, cause);
        self.end = Some(End::Stopped(cause));
    }

    /// Whether a log line this guest caused may go out now (see
    /// [`LOG_BURST`]); a line that may not is counted.
    pub fn may_log(&mut self) -> bool {
        let ok = self.log_bucket.take(crate::vcpu::rdtsc());
        if !ok && self.log_bucket.dropped() == 1 {
            log::warn!("{}: guest log rate limit reached: lines over its budget are dropped and counted", self.name);
        }
        ok
    }

    /// Guest-caused log lines dropped so far.
    pub fn logs_dropped(&self) -> u64 {
        self.log_bucket.dropped()
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
}

/// A log line caused by the guest of `$vm`: rate-limited per VM
/// ([`Vm::may_log`]).
macro_rules! guest_log {
    ($vm:expr, $level:ident, $($arg:tt)*) => {
        if $vm.may_log() {
            log::$level!($($arg)*);
        }
    };
}

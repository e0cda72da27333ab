//! The hypercall ABI shared by the guest program and the hypervisor.
//!
//! # Calling convention
//!
//! The guest executes `VMCALL` (at CPL 0) with
//!
//! | register | meaning                  |
//! |----------|--------------------------|
//! | RAX      | hypercall number         |
//! | RDI      | first argument           |
//! | RSI      | second argument          |
//! | RDX      | third argument           |
//!
//! The hypervisor writes the result to RAX, advances RIP past the 3-byte
//! `VMCALL` and leaves every other register as it was. The result is
//! [`ERROR`] (`u64::MAX`) for an unknown number or bad arguments (see
//! [`decode`]); calls that have no result return 0. The guest wrapper
//! [`vmcall`] still treats RDI, RSI and RDX as clobbered, so a hypervisor
//! that uses them as scratch does no harm.
//!
//! # Numbers
//!
//! | nr | name            | arguments                                          | result                 |
//! |----|-----------------|----------------------------------------------------|------------------------|
//! | 1  | [`PRINT`]         | rdi = guest-physical address of UTF-8 bytes, rsi = length (at most [`PRINT_MAX`] = 256) | 0 |
//! | 2  | [`YIELD`]         | none: give the CPU to the next VM                  | 0                      |
//! | 3  | [`REPORT`]        | rdi = check id (< [`MAX_CHECK`]), rsi = 0 pass / nonzero fail, rdx = a detail value | 0 |
//! | 4  | [`EXIT`]          | rdi = exit code (0 = success)                      | does not return        |
//! | 5  | [`DEDUPE_STATUS`] | none                                               | 1 when the hypervisor's dedupe scan has converged, else 0 |
//!
//! The guest identity-maps its memory (see [`crate::loader::program`]), so the
//! pointer handed to `PRINT` is both virtual and guest-physical. Whether
//! the range lies inside the VM's memory is checked by the hypervisor when
//! it reads it (an out-of-range `PRINT` also returns [`ERROR`]); [`decode`]
//! checks only what it can know without the VM: the length and that the
//! range does not wrap.
//!
//! # Guest program argument
//!
//! The guest's entry point receives in RDI `scenario | (vm_index << 8)`
//! (see [`scenario`] and [`guest_arg`]): bits 0..8 choose what the guest
//! does, bits 8..16 are the VM's index (0, 1, ...), from which a guest
//! derives per-VM data (the dedupe scenario's "unique" pages).

use core::fmt;

/// `PRINT(gpa, len)`: the hypervisor logs the UTF-8 bytes, prefixed with
/// the VM's name.
pub const PRINT: u64 = 1;
/// `YIELD()`: give up the CPU to the next VM.
pub const YIELD: u64 = 2;
/// `REPORT(check, failed, detail)`: the result of one check.
pub const REPORT: u64 = 3;
/// `EXIT(code)`: the VM is done; 0 means success.
pub const EXIT: u64 = 4;
/// `DEDUPE_STATUS()`: 1 once the dedupe scan has converged, else 0.
pub const DEDUPE_STATUS: u64 = 5;
/// `NOP()`: returns 0 and does nothing: the cost of a VMCALL round trip.
pub const NOP: u64 = 6;

/// What a hypercall returns for an unknown number or bad arguments.
pub const ERROR: u64 = u64::MAX;
/// The longest `PRINT`, in bytes.
pub const PRINT_MAX: u64 = 256;
/// Check ids are small integers: `0..MAX_CHECK`.
pub const MAX_CHECK: u64 = 1 << 16;

/// A decoded hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// Print `len` bytes at guest-physical `gpa`.
    Print { gpa: u64, len: u64 },
    Yield,
    Report { check: u64, failed: bool, detail: u64 },
    Exit { code: u64 },
    DedupeStatus,
    Nop,
}

impl Hypercall {
    /// The number that selects this call (RAX).
    pub fn number(&self) -> u64 {
        match self {
            Hypercall::Print { .. } => PRINT,
            Hypercall::Yield => YIELD,
            Hypercall::Report { .. } => REPORT,
            Hypercall::Exit { .. } => EXIT,
            Hypercall::DedupeStatus => DEDUPE_STATUS,
            Hypercall::Nop => NOP,
        }
    }

    /// The registers `(rax, rdi, rsi, rdx)` a guest sets for this call
    /// (unused arguments are 0; `failed` becomes 1).
    pub fn encode(&self) -> (u64, u64, u64, u64) {
        let nr = self.number();
        match *self {
            Hypercall::Print { gpa, len } => (nr, gpa, len, 0),
            Hypercall::Report { check, failed, detail } => (nr, check, failed as u64, detail),
            Hypercall::Exit { code } => (nr, code, 0, 0),
            Hypercall::Yield | Hypercall::DedupeStatus | Hypercall::Nop => (nr, 0, 0, 0),
        }
    }
}

/// Why a hypercall was refused; the guest sees [`ERROR`] in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallError {
    /// No hypercall has this number.
    Unknown(u64),
    /// A `PRINT` longer than [`PRINT_MAX`].
    BadLength(u64),
    /// A `PRINT` whose range wraps around the address space.
    BadAddress(u64),
    /// A `REPORT` check id not below [`MAX_CHECK`].
    BadCheck(u64),
}

impl fmt::Display for HypercallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HypercallError::Unknown(n) => write!(f, "unknown hypercall number {n:#x}"),
            HypercallError::BadLength(len) => {
                write!(f, "print length {len} exceeds the maximum of {PRINT_MAX} bytes")
            }
            HypercallError::BadAddress(gpa) => write!(f, "print buffer at {gpa:#x} wraps around"),
            HypercallError::BadCheck(c) => write!(f, "check id {c} is not below {MAX_CHECK}"),
        }
    }
}

/// Decodes the guest's registers at a VMCALL exit.
pub fn decode(rax: u64, rdi: u64, rsi: u64, rdx: u64) -> Result<Hypercall, HypercallError> {
    match rax {
        PRINT => {
            if rsi > PRINT_MAX {
                return Err(HypercallError::BadLength(rsi));
            }
            if rdi.checked_add(rsi).is_none() {
                return Err(HypercallError::BadAddress(rdi));
            }
            Ok(Hypercall::Print { gpa: rdi, len: rsi })
        }
        YIELD => Ok(Hypercall::Yield),
        REPORT => {
            if rdi >= MAX_CHECK {
                return Err(HypercallError::BadCheck(rdi));
            }
            Ok(Hypercall::Report { check: rdi, failed: rsi != 0, detail: rdx })
        }
        EXIT => Ok(Hypercall::Exit { code: rdi }),
        DEDUPE_STATUS => Ok(Hypercall::DedupeStatus),
        NOP => Ok(Hypercall::Nop),
        n => Err(HypercallError::Unknown(n)),
    }
}

/// Guest side: executes `VMCALL` with RAX = `nr`, RDI = `a`, RSI = `b`,
/// RDX = `c` and returns RAX.
///
/// # Safety
///
/// Only in a guest running under this hypervisor at CPL 0: elsewhere
/// `VMCALL` raises #UD. `PRINT` makes the hypervisor read guest memory at
/// `a`, which must hold `b` readable bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn vmcall(nr: u64, a: u64, b: u64, c: u64) -> u64 {
    let ret: u64;
    // SAFETY: the caller's contract; VMCALL touches no guest memory itself.
    unsafe {
        core::arch::asm!(
            "vmcall",
            inlateout("rax") nr => ret,
            inlateout("rdi") a => _,
            inlateout("rsi") b => _,
            inlateout("rdx") c => _,
            options(nostack),
        );
    }
    ret
}

/// The value of the guest's RDI at entry: the scenario in bits 0..8, the
/// VM's index in bits 8..16.
pub const fn guest_arg(scenario: u8, vm_index: u8) -> u64 {
    scenario as u64 | (vm_index as u64) << 8
}

/// The scenario (bits 0..8) of a guest argument.
pub const fn arg_scenario(arg: u64) -> u8 {
    arg as u8
}

/// The VM index (bits 8..16) of a guest argument.
pub const fn arg_vm_index(arg: u64) -> u8 {
    (arg >> 8) as u8
}

/// What the guest program does, chosen by bits 0..8 of its RDI at entry.
/// Check ids it REPORTs are given per scenario.
///
/// Scenarios 0..=8 exercise the basics; 16.. prove that a guest can end
/// only itself: its CPU state is its own, what it is shown works, what it
/// cannot have faults, and it cannot hang the host, flood its log, forge
/// its verdict or take more memory than its quota. (9..16 are unused.)
pub mod scenario {
    /// Serial "hello from the guest"; CPUID checks (REPORT 1: leaf 1 ECX
    /// bit 5 VMX clear, 2: leaf 1 ECX bit 31 hypervisor set, 3: leaf
    /// 0x4000_0000 vendor "HvDedupeRust"); a PRINT hypercall; three
    /// YIELDs with "tick N" on serial between them; EXIT 0.
    pub const HELLO: u8 = 0;
    /// A serial line, then a read of guest-physical 0x3000_0000 (beyond
    /// memory, mapped by the guest's page tables): the hypervisor must
    /// stop the VM. If the read returns: REPORT 40 fail, EXIT 1.
    pub const WILD_ACCESS: u8 = 1;
    /// Installs a #UD handler, executes VMXON: the hypervisor injects #UD
    /// and the handler REPORTs 10 pass and EXITs 0. If VMXON returns:
    /// REPORT 10 fail, EXIT 1.
    pub const VMXON: u8 = 2;
    /// A VMCALL with number 0xdead must return ERROR: REPORT 20; EXIT 0.
    pub const BAD_HYPERCALL: u8 = 3;
    /// Loads a zero-limit IDT and executes `ud2`: a triple fault, and the
    /// hypervisor must end the VM. If execution continues: REPORT 50
    /// fail, EXIT 1.
    pub const TRIPLE_FAULT: u8 = 4;
    /// The end-to-end dedupe test, see [`super::dedupe_layout`]: REPORT 30
    /// (contents intact after the scan converged), 31 (contents right
    /// after writes to merged pages), 32 (the scan converged within
    /// [`super::dedupe_layout::MAX_YIELDS`] yields); EXIT 0.
    pub const DEDUPE: u8 = 5;
    /// Measures exits: the guest's TSC over 1000 NOP hypercalls (REPORT
    /// 60, detail: TSC ticks per round trip) and 1000 CPUIDs (REPORT 61,
    /// detail: ticks per CPUID exit), each the fastest of fifty rounds of
    /// 20 (a round that a time slice boundary fell into also measures the
    /// other VMs and the scan between slices); EXIT 0. In Bochs a TSC tick is one
    /// emulated instruction, so these are instructions per round trip.
    pub const EXIT_COST: u8 = 6;
    /// Not a guest behaviour: the hypervisor breaks this VM's VMCS (a
    /// CR3-target count above 4, SDM Vol. 3C 27.2.1.1) so its VM entry
    /// fails; the guest never runs. Proves a failed entry ends only that VM.
    pub const BAD_VMCS: u8 = 7;
    /// The other emulated exits: IN from an unknown port (0x5658) reads all
    /// ones (REPORT 70); RDMSR of an MSR that does not exist raises #GP in
    /// the guest (71); CR4 reads back without VMXE (72); setting CR4.VMXE
    /// raises #GP(0) and leaves CR4 unchanged (73: VMX is hidden from the
    /// guest, so VMXE is a bit its CPUID does not allow); HLT with
    /// interrupts on returns (74); EXIT 0.
    pub const DEVICES: u8 = 8;

    /// Run as several VMs at once (`vms=isolation,isolation,...`): the
    /// per-VM CPU state. Enables CR4.OSFXSR|OSXMMEXCPT (and OSXSAVE with
    /// XSAVE, PKE with PKU), CR0.MP with EM and TS clear (REPORT 100).
    /// Checks CPUID.1:ECX: MONITOR (bit 3) hidden (101), OSXSAVE (bit 27)
    /// following CR4.OSXSAVE as the guest clears and sets it (102).
    /// XSETBV with invalid values raises #GP(0) and leaves XCR0 unchanged:
    /// XCR0 = 0 (103), AVX without SSE (104), ECX = 1 (105), the lowest
    /// bit CPUID.(0xD,0) EDX:EAX does not list (106), and, where AVX-512
    /// is shown, one AVX-512 bit without the other two (107).
    ///
    /// Then sets, from a salt (the VM's index, so each VM's values
    /// differ): XCR0 (even VMs: every component shown among x87, SSE,
    /// AVX, AVX-512 and PKRU; odd VMs: x87|SSE only), the x87 control
    /// word and eight x87 stack registers, MXCSR (rounding mode, FZ and
    /// flag bits), XMM0-15, the upper halves of YMM0-15 (AVX), ZMM0-31 and
    /// k0-7 (AVX-512), PKRU (PKU) — every register and lane a different
    /// pattern — then CR2, DR0-3 (addresses the guest never touches),
    /// DR6 (B0-3, BD, BS, BT), DR7 (enables and R/W, LEN bits on those
    /// addresses), STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, TSC_AUX
    /// (with RDTSCP), CR8, IA32_PAT (entry 0 stays WB) and SYSENTER_CS/
    /// ESP/EIP; YIELDs 50 times; reads everything back and REPORTs one
    /// check per item, 108..=128 (see [`super::check`]); items the CPUID
    /// does not show are not reported. Odd VMs on a CPU with AVX also
    /// check that a VEX instruction raises #UD (129: XCR0 really lacks
    /// AVX while they run). EXIT 0.
    pub const ISOLATION: u8 = 16;
    /// Drops to CPL 3 and back. Builds its own GDT (kernel code 0x08 and
    /// data 0x10, user data 0x18 and code 0x20 at DPL 3, an available
    /// 64-bit TSS at 0x28 whose RSP0 is a kernel stack) and loads it with
    /// LGDT/LTR; sets the U bit on the paging entries of 2..8 MiB (code,
    /// data, user stack) and reloads CR3; sets EFER.SCE (WRMSR), STAR,
    /// LSTAR, SFMASK (IF|TF|DF|AC), CR0.AM and a #AC handler (REPORT 130
    /// on all of that). IRETQ to CPL 3, where the guest checks its CPL
    /// (131); that VMCALL returns ERROR and does nothing else for PRINT
    /// (132; the text "ring3: FORBIDDEN print from CPL 3" must never
    /// appear in the log), REPORT (133; it would record check 139 failed)
    /// and EXIT(1) (134; it would end the VM); that SYSCALL reaches the
    /// LSTAR handler at CPL 0 with RCX = the return address and RFLAGS
    /// masked by SFMASK (135) and SYSRET returns to CPL 3 (136); that a
    /// misaligned 8-byte load with RFLAGS.AC=1 raises #AC(0), delivered
    /// to the guest's handler once with the CPL 3 frame (137). A last
    /// SYSCALL returns to CPL 0 (138); the checks are REPORTed there; EXIT 0.
    pub const RING3: u8 = 17;
    /// Single-stepping and debug exceptions the hypervisor must reflect
    /// (it intercepts #DB). With RFLAGS.TF=1 (set by POPFQ, so the trap
    /// comes after the next instruction, SDM Vol. 3B 18.3.1.4), one #DB
    /// with DR6.BS (bit 14) and RIP right after the instruction, for a NOP
    /// (REPORT 140, no exit: the baseline), CPUID (141), a NOP hypercall
    /// (142), an IN from an unknown port (143), and CPUID right after
    /// `mov ss` (144: the MOV-SS shadow holds the trap until after CPUID,
    /// SDM Vol. 3A 6.8.3); ICEBP (0xF1) raises #DB with RIP after it
    /// (145); an instruction breakpoint (DR0 = the instruction's address,
    /// DR7.L0, R/W0 = LEN0 = 0) raises #DB before it executes, RIP at it,
    /// DR6.B0 set (146). EXIT 0.
    pub const SINGLE_STEP: u8 = 18;
    /// The #DB delivery loop (XSA-156 / CVE-2015-8104): the #DB gate uses
    /// IST1, a data breakpoint (DR0 = the slot of IST1's stack where the
    /// CPU pushes SS, DR7 write, 8 bytes) fires on every delivery, and
    /// ICEBP starts it: the CPU would deliver #DB forever without running
    /// an instruction. The hypervisor must stop this VM ("debug-exception
    /// loop") and only it. Should the handler ever run, the guest tries
    /// once more with a TF single-step; if that too comes back: REPORT 150
    /// fail (detail: handler runs), EXIT 1.
    pub const DB_LOOP: u8 = 19;
    /// MONITOR/MWAIT: CPUID.1:ECX MONITOR (bit 3) hidden (REPORT 160);
    /// MONITOR on a variable returns without an exception (161); MWAIT
    /// with IF=1 returns, like HLT, after the hypervisor ran the others
    /// (162); EXIT 0. (MWAIT with IF=0 would end the VM: never done here.)
    pub const MWAIT: u8 = 20;
    /// Writes the hypervisor must refuse and exits it must emulate right:
    /// setting CR4.VMXE raises #GP(0), CR4 unchanged (170); so does
    /// setting any CR4 bit the guest's CPUID does not allow, or a reserved
    /// one (171); WRMSR EFER with a reserved bit (1, 9 or 63): #GP(0),
    /// EFER unchanged (172); MOV to CR0 with bit 32 or 63: #GP(0), CR0
    /// unchanged (173); a 32-bit IN from an unknown port (0x1230) gives
    /// RAX = 0xFFFF_FFFF, the upper half cleared (174); 8- and 16-bit IN
    /// from it keep RAX's other bits (175); CPUID.1 hides MONITOR (ECX 3),
    /// VMX (ECX 5) and PDCM (ECX 15) (176) and, until the local APIC is
    /// emulated, APIC (EDX 9), x2APIC (ECX 21) and TSC-deadline (ECX 24)
    /// (177). EXIT 0.
    pub const CPU_CHECKS: u8 = 21;
    /// Tries to forge the run's verdict: prints, on serial and with PRINT,
    /// copies of the kernel's own lines (`HV-EXIT: 0x10 success`, a VM
    /// summary "... exited with code 0; 3 checks passed, 0 failed; 1 exits;
    /// as expected", "... 1 VMs in 1 time slices; all ended as expected")
    /// behind embedded `\n`, `\r`, NUL, ESC sequences (erase line, cursor
    /// up, OSC title), backspaces, a 200-character run (the serial line
    /// limit) and bytes that are not UTF-8; then REPORTs 180 pass and
    /// EXITs 0. The hypervisor must log all of it prefixed and escaped:
    /// with `vms=forge,fail` the run must still fail.
    pub const FORGE: u8 = 22;
    /// Floods the per-VM limits: 2000 serial lines and 2000 PRINTs as fast
    /// as it can (beyond the log budget they are dropped and counted; the
    /// guest does not notice: every PRINT returns 0, REPORT 190), then 299
    /// more REPORTs of check 191 (pass, detail: the REPORT's number, 2 to
    /// 300). The hypervisor records at most 256 REPORTs per VM: the 257th
    /// and later must return ERROR. EXIT 0 if REPORTs 1..=256 returned 0
    /// and exactly the 44 after them ERROR, else EXIT 1 (after waiting for
    /// the log budget to refill, it prints the counts).
    pub const FLOOD: u8 = 23;
    /// REPORTs 200 failed and EXITs 1: the companion of FORGE (and a
    /// plain "a failed VM fails the run").
    pub const FAIL: u8 = 24;
    /// Writes one byte (the value already there) into every 4 KiB page of
    /// 1..8 MiB in order, printing progress every 256 pages: the VM has 8
    /// MiB but a small frame quota for this scenario, and the hypervisor
    /// must stop it ("frame quota") before it finishes. If it finishes:
    /// REPORT 210 fail (detail: pages written), EXIT 1.
    pub const MEMHOG: u8 = 25;

    /// Every scenario, for loops over them.
    pub const ALL: [u8; 19] = [
        HELLO,
        WILD_ACCESS,
        VMXON,
        BAD_HYPERCALL,
        TRIPLE_FAULT,
        DEDUPE,
        EXIT_COST,
        BAD_VMCS,
        DEVICES,
        ISOLATION,
        RING3,
        SINGLE_STEP,
        DB_LOOP,
        MWAIT,
        CPU_CHECKS,
        FORGE,
        FLOOD,
        FAIL,
        MEMHOG,
    ];

    /// A short name for logs.
    pub fn name(s: u8) -> Option<&'static str> {
        Some(match s {
            HELLO => "hello",
            WILD_ACCESS => "wild-access",
            VMXON => "vmxon",
            BAD_HYPERCALL => "bad-hypercall",
            TRIPLE_FAULT => "triple-fault",
            DEDUPE => "dedupe",
            EXIT_COST => "exit-cost",
            BAD_VMCS => "bad-vmcs",
            DEVICES => "devices",
            ISOLATION => "isolation",
            RING3 => "ring3",
            SINGLE_STEP => "single-step",
            DB_LOOP => "db-loop",
            MWAIT => "mwait",
            CPU_CHECKS => "cpu-checks",
            FORGE => "forge",
            FLOOD => "flood",
            FAIL => "fail",
            MEMHOG => "memhog",
            _ => return None,
        })
    }

    /// The scenario with this name.
    pub fn from_name(name: &str) -> Option<u8> {
        ALL.into_iter().find(|&s| self::name(s) == Some(name))
    }
}

/// Check ids the guest REPORTs.
///
/// # Details
///
/// A check's detail is the value it looked at: on a failure the first
/// wrong value seen (the serial line before the REPORT says which
/// register, lane or bit it was and what was wanted). Where an
/// instruction raised an exception instead of working, or a check expects
/// one, the detail is [`fault_detail`] of what it raised,
/// `0xfa17_00VV_EEEE_EEEE` (vector VV, error code E), or [`NO_FAULT`] when
/// it raised none.
pub mod check {
    /// HELLO: CPUID.1:ECX bit 5 (VMX) is clear.
    pub const CPUID_VMX_HIDDEN: u64 = 1;
    /// HELLO: CPUID.1:ECX bit 31 (hypervisor present) is set.
    pub const CPUID_HYPERVISOR_BIT: u64 = 2;
    /// HELLO: CPUID.0x4000_0000 vendor is "HvDedupeRust" (detail: EBX).
    pub const CPUID_VENDOR: u64 = 3;
    /// VMXON: the instruction raised #UD (detail: the faulting RIP).
    pub const VMXON_UD: u64 = 10;
    /// BAD_HYPERCALL: number 0xdead returned ERROR (detail: RAX).
    pub const BAD_HYPERCALL: u64 = 20;
    /// DEDUPE: every page reads back right after convergence (detail: the
    /// number of wrong pages).
    pub const DEDUPE_INTACT: u64 = 30;
    /// DEDUPE: every page reads back right after the writes to merged
    /// pages (detail: the number of wrong pages).
    pub const DEDUPE_AFTER_WRITE: u64 = 31;
    /// DEDUPE: DEDUPE_STATUS reached 1 (detail: yields it took).
    pub const DEDUPE_CONVERGED: u64 = 32;
    /// WILD_ACCESS: the wild read returned (always a fail).
    pub const WILD_ACCESS_CONTINUED: u64 = 40;
    /// TRIPLE_FAULT: execution went on after the fault (always a fail).
    pub const TRIPLE_FAULT_CONTINUED: u64 = 50;
    /// EXIT_COST: TSC ticks per NOP hypercall round trip (detail).
    pub const VMCALL_COST: u64 = 60;
    /// EXIT_COST: TSC ticks per CPUID exit (detail).
    pub const CPUID_COST: u64 = 61;
    /// DEVICES: IN from an unknown port read all ones (detail: the value).
    pub const UNKNOWN_PORT_ONES: u64 = 70;
    /// DEVICES: RDMSR of a missing MSR raised #GP.
    pub const UNKNOWN_MSR_GP: u64 = 71;
    /// DEVICES: CR4 reads without VMXE (detail: CR4).
    pub const CR4_VMXE_HIDDEN: u64 = 72;
    /// DEVICES: setting CR4.VMXE raised #GP(0) and left CR4 unchanged
    /// (detail: the exception, see the module doc, or CR4 if it changed).
    pub const CR4_WRITE: u64 = 73;
    /// DEVICES: HLT with interrupts enabled returned.
    pub const HLT_RETURNS: u64 = 74;

    /// ISOLATION: CR4.OSFXSR|OSXMMEXCPT (OSXSAVE, PKE where shown) and
    /// CR0.MP, !EM, !TS took (detail: CR4, or the exception).
    pub const ISO_SETUP: u64 = 100;
    /// ISOLATION: CPUID.1:ECX bit 3 (MONITOR) is clear (detail: ECX).
    pub const ISO_MONITOR_HIDDEN: u64 = 101;
    /// ISOLATION: CPUID.1:ECX bit 27 (OSXSAVE) is set with CR4.OSXSAVE,
    /// clear after the guest clears it, set again after it sets it
    /// (detail: ECX, the first wrong one). Only with XSAVE.
    pub const ISO_OSXSAVE_MIRROR: u64 = 102;
    /// ISOLATION: XSETBV(0, 0) raises #GP(0), XCR0 unchanged (detail: the
    /// exception, or XCR0 if it changed). Only with XSAVE, as are 104-107.
    pub const XSETBV_ZERO_GP: u64 = 103;
    /// ISOLATION: XSETBV of x87|AVX (bit 2 without bit 1): #GP(0).
    pub const XSETBV_AVX_WITHOUT_SSE_GP: u64 = 104;
    /// ISOLATION: XSETBV with ECX = 1 (and XCR0's own value): #GP(0).
    pub const XSETBV_ECX_GP: u64 = 105;
    /// ISOLATION: XSETBV of x87|SSE plus the lowest bit CPUID.(0xD,0)
    /// EDX:EAX does not list: #GP(0).
    pub const XSETBV_UNSUPPORTED_GP: u64 = 106;
    /// ISOLATION: XSETBV of x87|SSE|AVX|opmask (XCR0[7:5] not all equal):
    /// #GP(0). Only where AVX-512 is shown.
    pub const XSETBV_AVX512_PARTIAL_GP: u64 = 107;
    /// ISOLATION: XGETBV(0) returns the XCR0 the VM set (detail: XCR0).
    pub const ISO_XCR0: u64 = 108;
    /// ISOLATION: the x87 control word and the eight x87 stack registers
    /// (FILD/FISTP of 64-bit integers) (detail: the first wrong value).
    pub const ISO_X87: u64 = 109;
    /// ISOLATION: MXCSR (detail: MXCSR).
    pub const ISO_MXCSR: u64 = 110;
    /// ISOLATION: XMM0-15 (detail: the first wrong 64-bit lane).
    pub const ISO_XMM: u64 = 111;
    /// ISOLATION: bits 128..256 of YMM0-15. Only in VMs with AVX on.
    pub const ISO_YMM: u64 = 112;
    /// ISOLATION: bits 256..512 of ZMM0-15 and all of ZMM16-31. Only in
    /// VMs with AVX-512 on, as is 114.
    pub const ISO_ZMM: u64 = 113;
    /// ISOLATION: the opmask registers k0-7 (64 bits with AVX512BW, else 16).
    pub const ISO_OPMASK: u64 = 114;
    /// ISOLATION: PKRU (RDPKRU; keys 1-15 only). Only with PKU.
    pub const ISO_PKRU: u64 = 115;
    /// ISOLATION: CR2.
    pub const ISO_CR2: u64 = 116;
    /// ISOLATION: DR0-DR3.
    pub const ISO_DR0_3: u64 = 117;
    /// ISOLATION: DR6's writable bits B0-3, BD, BS, BT (detail: DR6).
    pub const ISO_DR6: u64 = 118;
    /// ISOLATION: DR7.
    pub const ISO_DR7: u64 = 119;
    /// ISOLATION: IA32_STAR (0xC000_0081).
    pub const ISO_STAR: u64 = 120;
    /// ISOLATION: IA32_LSTAR (0xC000_0082).
    pub const ISO_LSTAR: u64 = 121;
    /// ISOLATION: IA32_CSTAR (0xC000_0083).
    pub const ISO_CSTAR: u64 = 122;
    /// ISOLATION: IA32_FMASK (0xC000_0084).
    pub const ISO_SFMASK: u64 = 123;
    /// ISOLATION: IA32_KERNEL_GS_BASE (0xC000_0102).
    pub const ISO_KERNEL_GS_BASE: u64 = 124;
    /// ISOLATION: IA32_TSC_AUX (0xC000_0103) by RDMSR, RDTSCP's ECX and
    /// (where shown) RDPID. Only with RDTSCP (CPUID 0x8000_0001 EDX 27).
    pub const ISO_TSC_AUX: u64 = 125;
    /// ISOLATION: CR8 (the TPR).
    pub const ISO_CR8: u64 = 126;
    /// ISOLATION: IA32_PAT (0x277).
    pub const ISO_PAT: u64 = 127;
    /// ISOLATION: IA32_SYSENTER_CS, _ESP, _EIP (0x174-0x176).
    pub const ISO_SYSENTER: u64 = 128;
    /// ISOLATION, odd VMs on a CPU with AVX: a VEX instruction (`vpxor`)
    /// raises #UD, as XCR0 lacks AVX (detail: the exception).
    pub const ISO_AVX_OFF_UD: u64 = 129;

    /// RING3: the GDT, TSS, paging, EFER.SCE, STAR/LSTAR/SFMASK and CR0.AM
    /// set-up took (detail: 0, or the exception of the step that failed).
    pub const RING3_SETUP: u64 = 130;
    /// RING3: the user code ran at CPL 3 (detail: CS).
    pub const RING3_CPL3: u64 = 131;
    /// RING3: PRINT at CPL 3 returned ERROR (detail: RAX, or an exception).
    pub const RING3_VMCALL_PRINT: u64 = 132;
    /// RING3: REPORT (of check 139, failed) at CPL 3 returned ERROR.
    pub const RING3_VMCALL_REPORT: u64 = 133;
    /// RING3: EXIT(1) at CPL 3 returned ERROR.
    pub const RING3_VMCALL_EXIT: u64 = 134;
    /// RING3: SYSCALL (made with RFLAGS.AC and DF set) ran the LSTAR
    /// handler at CPL 0 with RCX = the return address, no SFMASK bit in
    /// RFLAGS and AC, DF in R11 (detail: the handler's CS on a pass, else
    /// the first wrong of CS, RCX, RFLAGS, R11; CS is u64::MAX if it never
    /// ran).
    pub const RING3_SYSCALL: u64 = 135;
    /// RING3: SYSRET came back to CPL 3 (detail: CS after it).
    pub const RING3_SYSRET: u64 = 136;
    /// RING3: one #AC, error code 0, CS = 0x23, RIP = the misaligned load
    /// (detail: the number of #ACs if not 1, else the first wrong of the
    /// error code, CS, RIP).
    pub const RING3_AC: u64 = 137;
    /// RING3: the last SYSCALL got back to CPL 0 (detail: CS).
    pub const RING3_BACK: u64 = 138;
    /// RING3: the id the CPL 3 REPORT uses (failed): it must never be
    /// recorded.
    pub const RING3_FORBIDDEN_REPORT: u64 = 139;

    /// SINGLE_STEP: TF over a NOP (detail for 140-146: DR6 on a pass; on a
    /// failure the number of #DBs if not 1, else their RIP if wrong, else
    /// DR6).
    pub const SS_TF_NOP: u64 = 140;
    /// SINGLE_STEP: TF over CPUID.
    pub const SS_TF_CPUID: u64 = 141;
    /// SINGLE_STEP: TF over a NOP hypercall (VMCALL).
    pub const SS_TF_VMCALL: u64 = 142;
    /// SINGLE_STEP: TF over IN from an unknown port.
    pub const SS_TF_IN: u64 = 143;
    /// SINGLE_STEP: TF, then `mov ss`, then CPUID: one #DB after CPUID.
    pub const SS_MOV_SS_CPUID: u64 = 144;
    /// SINGLE_STEP: ICEBP (DR6 not checked).
    pub const SS_ICEBP: u64 = 145;
    /// SINGLE_STEP: an instruction breakpoint in DR0 (DR6.B0).
    pub const SS_DR0_EXEC: u64 = 146;

    /// DB_LOOP: the #DB handler ran: no loop (always a fail; detail:
    /// handler runs).
    pub const DB_LOOP_CONTINUED: u64 = 150;

    /// MWAIT: CPUID.1:ECX bit 3 is clear (detail: ECX).
    pub const MWAIT_HIDDEN: u64 = 160;
    /// MWAIT: MONITOR returned (detail: 0, or the exception).
    pub const MONITOR_RETURNS: u64 = 161;
    /// MWAIT: MWAIT with IF=1 returned (detail: 0, or the exception).
    pub const MWAIT_RETURNS: u64 = 162;

    /// CPU_CHECKS: CR4.VMXE: #GP(0), CR4 unchanged (detail: the exception,
    /// or CR4 if it changed).
    pub const CPU_CR4_VMXE_GP: u64 = 170;
    /// CPU_CHECKS: every CR4 bit CPUID does not allow and the reserved 15,
    /// 26, 29-31, 33, 48, 63: #GP(0), CR4 unchanged (detail: on a pass the
    /// bits tried, on a failure the bits that did not behave).
    pub const CPU_CR4_RESERVED_GP: u64 = 171;
    /// CPU_CHECKS: EFER bits 1, 9, 63: #GP(0), EFER unchanged (detail as 171).
    pub const CPU_EFER_RESERVED_GP: u64 = 172;
    /// CPU_CHECKS: CR0 bits 32, 63: #GP(0), CR0 unchanged (detail as 171).
    pub const CPU_CR0_HIGH_GP: u64 = 173;
    /// CPU_CHECKS: `in eax, dx` from an unknown port: RAX = 0xFFFF_FFFF
    /// (detail: RAX).
    pub const CPU_IN32_ZERO_EXTENDS: u64 = 174;
    /// CPU_CHECKS: `in al, dx` and `in ax, dx` from it keep the other bits
    /// of RAX (detail: the first wrong RAX).
    pub const CPU_IN8_16_KEEP: u64 = 175;
    /// CPU_CHECKS: CPUID.1:ECX MONITOR, VMX, PDCM clear (detail: the bits
    /// set of those, 0 on a pass).
    pub const CPU_CPUID_HIDDEN: u64 = 176;
    /// CPU_CHECKS: CPUID.1 APIC (EDX 9, detail bit 41), x2APIC (ECX 21),
    /// TSC-deadline (ECX 24) clear (detail: the bits set, EDX in 63:32).
    pub const CPU_CPUID_APIC_HIDDEN: u64 = 177;

    /// FORGE: everything printed (always a pass).
    pub const FORGE_DONE: u64 = 180;
    /// FLOOD: the 2000 PRINTs returned 0 (detail: how many did not).
    pub const FLOOD_PRINTS: u64 = 190;
    /// FLOOD: REPORTs 2..=300 (pass; detail: the REPORT's number).
    pub const FLOOD_REPORT: u64 = 191;
    /// FAIL: always a fail (detail 0).
    pub const FAIL_ALWAYS: u64 = 200;
    /// MEMHOG: every page was written (always a fail; detail: pages).
    pub const MEMHOG_FINISHED: u64 = 210;

    /// Top bits of [`fault_detail`] and [`NO_FAULT`].
    pub const FAULT_TAG: u64 = 0xfa17 << 48;
    /// The detail "raised exception `vector` with error code `code`" (0
    /// for vectors without one): `0xfa17_00VV_EEEE_EEEE`.
    pub const fn fault_detail(vector: u8, code: u64) -> u64 {
        FAULT_TAG | (vector as u64) << 32 | (code & 0xffff_ffff)
    }
    /// The detail "raised no exception" where one was expected.
    pub const NO_FAULT: u64 = FAULT_TAG | 0xff << 32;
}

/// The vendor signature in CPUID leaf 0x4000_0000 (EBX, ECX, EDX).
pub use crate::cpuid::VENDOR as CPUID_VENDOR;
/// The hypervisor's CPUID leaf.
pub use crate::cpuid::HYPERVISOR_LEAF as CPUID_HV_LEAF;
/// The number the BAD_HYPERCALL scenario uses.
pub const BAD_NUMBER: u64 = 0xdead;
/// The guest-physical address the WILD_ACCESS scenario reads.
pub const WILD_GPA: u64 = 0x3000_0000;

pub mod dedupe_layout {
    //! The DEDUPE scenario's memory: a region of [`REGION_PAGES`] 4 KiB pages
    //! at [`REGION_START`] (4 MiB), filled by page class. The VM needs at
    //! least [`MIN_MEM_SIZE`] bytes of memory.
    //!
    //! Per VM, by page index `i` in the region:
    //!
    //! | pages      | class       | content                                   | distinct contents per VM |
    //! |------------|-------------|-------------------------------------------|--------------------------|
    //! | 0..64      | zero        | all zero                                  | 1                        |
    //! | 64..128    | intra-VM    | groups of 4 equal pages, salted by the VM | 16                       |
    //! | 128..192   | cross-VM    | depends only on `i`: equal in every VM    | 64                       |
    //! | 192..256   | unique      | depends on `i` and the VM                 | 64                       |
    //!
    //! No two classes share a content, and nothing inside a class is equal
    //! beyond what the table says ([`page_word`] makes every word carry the
    //! class, the index and the salt). With N VMs all running DEDUPE and
    //! sharing allowed between all of them, a converged scan over the region
    //! alone (the guest's code, stack and page tables are also mergeable and
    //! come on top) leaves:
    //!
    //! - zero pages: `N * ZERO_PAGES` guest pages on one zero frame;
    //! - intra-VM: `N * INTRA_GROUPS` shared frames, each mapped by
    //!   `INTRA_GROUP` pages of one VM;
    //! - cross-VM: `CROSS_PAGES` shared frames, each mapped once per VM;
    //! - unique: `N * UNIQUE_PAGES` unshared pages.
    //!
    //! [`expected_frames`] gives the number of host frames the region needs
    //! after convergence.
    //!
    //! After convergence the guest checks every page (check 30), then writes
    //! one byte, `written_byte(salt)`, at `WRITE_OFFSET` of each page in
    //! [`WRITTEN_PAGES`] (the first 8 cross-VM pages, the first zero page and
    //! the first page of intra-VM group 0), which must break the sharing for
    //! that page only, and checks everything again (check 31).

    pub const PAGE_SIZE: u64 = 4096;
    /// Guest-physical start of the region (4 MiB).
    pub const REGION_START: u64 = 0x40_0000;
    pub const REGION_PAGES: u64 = 256;
    pub const REGION_END: u64 = REGION_START + REGION_PAGES * PAGE_SIZE;
    /// The least VM memory size the scenario works with.
    pub const MIN_MEM_SIZE: u64 = REGION_END;

    pub const ZERO_FIRST: u64 = 0;
    pub const ZERO_PAGES: u64 = 64;
    pub const INTRA_FIRST: u64 = 64;
    pub const INTRA_PAGES: u64 = 64;
    /// Equal pages per intra-VM group.
    pub const INTRA_GROUP: u64 = 4;
    pub const INTRA_GROUPS: u64 = INTRA_PAGES / INTRA_GROUP;
    pub const CROSS_FIRST: u64 = 128;
    pub const CROSS_PAGES: u64 = 64;
    pub const UNIQUE_FIRST: u64 = 192;
    pub const UNIQUE_PAGES: u64 = 64;

    /// Page indexes (in the region) the guest writes after convergence.
    pub const WRITTEN_PAGES: [u64; 10] = [
        CROSS_FIRST,
        CROSS_FIRST + 1,
        CROSS_FIRST + 2,
        CROSS_FIRST + 3,
        CROSS_FIRST + 4,
        CROSS_FIRST + 5,
        CROSS_FIRST + 6,
        CROSS_FIRST + 7,
        ZERO_FIRST,
        INTRA_FIRST,
    ];

    /// Yields the guest waits for DEDUPE_STATUS = 1 before it fails.
    pub const MAX_YIELDS: u64 = 100_000;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Class {
        Zero,
        Intra,
        Cross,
        Unique,
    }

    /// The class of page `i` of the region (`i < REGION_PAGES`).
    pub const fn class(i: u64) -> Class {
        if i < INTRA_FIRST {
            Class::Zero
        } else if i < CROSS_FIRST {
            Class::Intra
        } else if i < UNIQUE_FIRST {
            Class::Cross
        } else {
            Class::Unique
        }
    }

    /// Guest-physical address of page `i` of the region.
    pub const fn page_gpa(i: u64) -> u64 {
        REGION_START + i * PAGE_SIZE
    }

    /// splitmix64's finaliser: a cheap, well-mixed, never-equal-for-
    /// different-inputs (bijective) function.
    const fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The 64-bit word `w` (0..512) of page `i` in the VM with `salt`
    /// (its VM index), before any write.
    ///
    /// Non-zero pages carry their identity (class, group or page index,
    /// salt where it applies) in word 0, so contents that should differ
    /// always differ; the other words are a mix of that identity and `w`.
    pub const fn page_word(i: u64, salt: u8, w: u64) -> u64 {
        let id = match class(i) {
            Class::Zero => return 0,
            Class::Intra => (1 << 56) | ((salt as u64) << 32) | ((i - INTRA_FIRST) / INTRA_GROUP),
            Class::Cross => (2 << 56) | i,
            Class::Unique => (3 << 56) | ((salt as u64) << 32) | i,
        };
        if w == 0 {
            id
        } else {
            mix(id ^ mix(w))
        }
    }

    /// The offset in each page of [`WRITTEN_PAGES`] the guest writes.
    /// Byte 1 of every written page is 0 before the write (word 0 holds
    /// the page's identity, whose byte 1 is 0 for these pages).
    pub const WRITE_OFFSET: u64 = 1;

    /// The byte the guest writes at [`WRITE_OFFSET`]: never 0, and
    /// different for VMs with indexes below 128.
    pub const fn written_byte(salt: u8) -> u8 {
        0x80 | salt
    }

    /// The expected byte at `offset` of page `i` after the writes.
    pub const fn byte_after_write(i: u64, salt: u8, offset: u64) -> u8 {
        if offset == WRITE_OFFSET {
            let mut k = 0;
            while k < WRITTEN_PAGES.len() {
                if WRITTEN_PAGES[k] == i {
                    return written_byte(salt);
                }
                k += 1;
            }
        }
        (page_word(i, salt, offset / 8) >> ((offset % 8) * 8)) as u8
    }

    /// Host frames the region needs once the scan converged, for `vms`
    /// VMs running DEDUPE with sharing between all of them (before the
    /// writes): one zero frame, the intra-VM groups of each VM, the
    /// cross-VM pages once, and every unique page.
    pub const fn expected_frames(vms: u64) -> u64 {
        1 + vms * INTRA_GROUPS + CROSS_PAGES + vms * UNIQUE_PAGES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    #[test]
    fn numbers_are_fixed() {
        assert_eq!((PRINT, YIELD, REPORT, EXIT, DEDUPE_STATUS), (1, 2, 3, 4, 5));
        assert_eq!(ERROR, u64::MAX);
    }

    #[test]
    fn decode_each_call() {
        assert_eq!(decode(1, 0x20_0000, 5, 9), Ok(Hypercall::Print { gpa: 0x20_0000, len: 5 }));
        assert_eq!(decode(2, 1, 2, 3), Ok(Hypercall::Yield));
        assert_eq!(decode(3, 7, 0, 42), Ok(Hypercall::Report { check: 7, failed: false, detail: 42 }));
        assert_eq!(decode(3, 7, 5, 0), Ok(Hypercall::Report { check: 7, failed: true, detail: 0 }));
        assert_eq!(decode(4, 0, 0, 0), Ok(Hypercall::Exit { code: 0 }));
        assert_eq!(decode(4, 3, 0, 0), Ok(Hypercall::Exit { code: 3 }));
        assert_eq!(decode(5, 0, 0, 0), Ok(Hypercall::DedupeStatus));
        assert_eq!(decode(6, 1, 2, 3), Ok(Hypercall::Nop));
    }

    #[test]
    fn decode_errors() {
        assert_eq!(decode(0, 0, 0, 0), Err(HypercallError::Unknown(0)));
        assert_eq!(decode(7, 0, 0, 0), Err(HypercallError::Unknown(7)));
        assert_eq!(decode(0xdead, 0, 0, 0), Err(HypercallError::Unknown(0xdead)));
        assert_eq!(decode(u64::MAX, 0, 0, 0), Err(HypercallError::Unknown(u64::MAX)));
        // High bits of RAX count: the whole register is the number.
        assert_eq!(decode(1 | 1 << 32, 0, 1, 0), Err(HypercallError::Unknown(1 | 1 << 32)));
        assert_eq!(decode(PRINT, 0x1000, 256, 0), Ok(Hypercall::Print { gpa: 0x1000, len: 256 }));
        assert_eq!(decode(PRINT, 0x1000, 257, 0), Err(HypercallError::BadLength(257)));
        assert_eq!(decode(PRINT, 0x1000, u64::MAX, 0), Err(HypercallError::BadLength(u64::MAX)));
        assert_eq!(decode(PRINT, u64::MAX - 3, 8, 0), Err(HypercallError::BadAddress(u64::MAX - 3)));
        assert_eq!(decode(REPORT, MAX_CHECK, 0, 0), Err(HypercallError::BadCheck(MAX_CHECK)));
        assert!(decode(REPORT, MAX_CHECK - 1, 0, 0).is_ok());
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert!(HypercallError::Unknown(0xdead).to_string().contains("0xdead"));
        assert!(HypercallError::BadLength(300).to_string().contains("300"));
        assert!(HypercallError::BadAddress(5).to_string().contains("wraps"));
        assert!(HypercallError::BadCheck(70000).to_string().contains("70000"));
    }

    #[test]
    fn encode_round_trips() {
        let calls = [
            Hypercall::Print { gpa: 0x20_1000, len: 12 },
            Hypercall::Yield,
            Hypercall::Report { check: 3, failed: true, detail: 99 },
            Hypercall::Report { check: 30, failed: false, detail: 0 },
            Hypercall::Exit { code: 2 },
            Hypercall::DedupeStatus,
        ];
        for c in calls {
            let (a, b, d, e) = c.encode();
            assert_eq!(decode(a, b, d, e), Ok(c));
        }
    }

    #[test]
    fn guest_arg_encoding() {
        let arg = guest_arg(scenario::DEDUPE, 1);
        assert_eq!(arg, 0x105);
        assert_eq!(arg_scenario(arg), scenario::DEDUPE);
        assert_eq!(arg_vm_index(arg), 1);
        assert_eq!(arg_scenario(guest_arg(scenario::HELLO, 0)), 0);
    }

    #[test]
    fn scenario_numbers_and_names() {
        use scenario::*;
        assert_eq!((HELLO, WILD_ACCESS, VMXON, BAD_HYPERCALL, TRIPLE_FAULT, DEDUPE, EXIT_COST, BAD_VMCS, DEVICES), (0, 1, 2, 3, 4, 5, 6, 7, 8));
        for s in ALL {
            assert_eq!(from_name(name(s).unwrap()), Some(s));
        }
        assert_eq!(name(9), None);
        assert_eq!(from_name("nope"), None);
    }

    fn page(i: u64, salt: u8) -> Vec<u64> {
        (0..512).map(|w| dedupe_layout::page_word(i, salt, w)).collect()
    }

    #[test]
    fn dedupe_layout_counts() {
        use dedupe_layout::*;
        assert_eq!(ZERO_PAGES + INTRA_PAGES + CROSS_PAGES + UNIQUE_PAGES, REGION_PAGES);
        assert_eq!(ZERO_FIRST + ZERO_PAGES, INTRA_FIRST);
        assert_eq!(INTRA_FIRST + INTRA_PAGES, CROSS_FIRST);
        assert_eq!(CROSS_FIRST + CROSS_PAGES, UNIQUE_FIRST);
        assert_eq!(INTRA_GROUPS, 16);
        assert_eq!(REGION_END, 0x50_0000);
        assert_eq!(expected_frames(2), 1 + 32 + 64 + 128);
    }

    /// Counting distinct page contents over two VMs gives exactly the
    /// numbers the layout documents.
    #[test]
    fn dedupe_layout_contents_match_the_documented_classes() {
        use dedupe_layout::*;
        use std::collections::HashMap;
        let mut by_content: HashMap<Vec<u64>, Vec<(u8, u64)>> = HashMap::new();
        for salt in [0u8, 1] {
            for i in 0..REGION_PAGES {
                by_content.entry(page(i, salt)).or_default().push((salt, i));
            }
        }
        assert_eq!(by_content.len() as u64, expected_frames(2));
        for (content, pages) in &by_content {
            let (salt, i) = pages[0];
            match class(i) {
                Class::Zero => {
                    assert!(content.iter().all(|&w| w == 0));
                    assert_eq!(pages.len() as u64, 2 * ZERO_PAGES);
                }
                Class::Intra => {
                    assert_eq!(pages.len() as u64, INTRA_GROUP);
                    assert!(pages.iter().all(|&(s, j)| s == salt && class(j) == Class::Intra));
                }
                Class::Cross => {
                    assert_eq!(pages, &[(0, i), (1, i)]);
                }
                Class::Unique => assert_eq!(pages.len(), 1),
            }
        }
    }

    #[test]
    fn written_bytes_change_the_pages_and_differ_per_vm() {
        use dedupe_layout::*;
        for salt in 0..=255u8 {
            for i in WRITTEN_PAGES {
                let before = (page_word(i, salt, 0) >> 8) as u8;
                assert_eq!(before, 0);
                assert_ne!(byte_after_write(i, salt, WRITE_OFFSET), before, "page {i} salt {salt}");
                assert_eq!(byte_after_write(i, salt, 0), page_word(i, salt, 0) as u8);
                assert_eq!(byte_after_write(i, salt, 9), (page_word(i, salt, 1) >> 8) as u8);
            }
            let u = UNIQUE_FIRST;
            assert_eq!(byte_after_write(u, salt, WRITE_OFFSET), (page_word(u, salt, 0) >> 8) as u8);
        }
        for a in 0..128u8 {
            for b in 0..a {
                assert_ne!(written_byte(a), written_byte(b));
            }
        }
    }
}

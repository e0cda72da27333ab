//! Events around an exit: the event-information format the VMCS uses for
//! injection, exit interruption and IDT vectoring (SDM Vol. 3C 25.8.3,
//! 25.9.2, 25.9.3), what ends an instruction the hypervisor emulated (the
//! interrupt shadow and TF single-step), the DR6 of a reflected #DB, and
//! the detector for an exception whose delivery raises itself forever.

/// Bits of the event-information format.
pub const VALID: u32 = 1 << 31;
pub const DELIVERS_ERROR_CODE: u32 = 1 << 11;
/// Bits 10:8: the event's type.
pub mod kind {
    pub const EXTERNAL_INTERRUPT: u32 = 0;
    pub const NMI: u32 = 2;
    pub const HARDWARE_EXCEPTION: u32 = 3;
    pub const SOFTWARE_INTERRUPT: u32 = 4;
    /// ICEBP (INT1, opcode F1).
    pub const PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    /// INT3, INTO.
    pub const SOFTWARE_EXCEPTION: u32 = 6;
}

/// One event in the event-information format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub vector: u8,
    pub kind: u32,
    pub error_code: bool,
}

impl Event {
    /// A hardware exception (`#GP(0)` is `Event::exception(13, true)`).
    pub const fn exception(vector: u8, error_code: bool) -> Event {
        Event { vector, kind: kind::HARDWARE_EXCEPTION, error_code }
    }

    /// A maskable external interrupt with `vector` (from the virtual APIC).
    pub const fn external(vector: u8) -> Event {
        Event { vector, kind: kind::EXTERNAL_INTERRUPT, error_code: false }
    }

    /// The NMI (always vector 2: SDM 27.2.1.3 requires it).
    pub const fn nmi() -> Event {
        Event { vector: 2, kind: kind::NMI, error_code: false }
    }

    /// The event in a valid information field, if it is one.
    pub fn decode(info: u32) -> Option<Event> {
        (info & VALID != 0).then_some(Event {
            vector: info as u8,
            kind: (info >> 8) & 7,
            error_code: info & DELIVERS_ERROR_CODE != 0,
        })
    }

    /// The VM-entry interruption-information value that delivers it (bit 12
    /// and bits 30:13 zero, as VM entry requires: SDM 27.2.1.3).
    pub fn encode(self) -> u32 {
        VALID | (self.kind & 7) << 8 | self.vector as u32 | if self.error_code { DELIVERS_ERROR_CODE } else { 0 }
    }

    /// Software interrupts and exceptions (and ICEBP) are injected with the
    /// instruction's length, so that the pushed RIP points after it.
    pub fn needs_instruction_length(self) -> bool {
        matches!(self.kind, kind::SOFTWARE_INTERRUPT | kind::PRIVILEGED_SOFTWARE_EXCEPTION | kind::SOFTWARE_EXCEPTION)
    }
}

/// Guest interruptibility state (SDM 25.4.2, Table 25-3).
pub const BLOCKING_BY_STI: u32 = 1 << 0;
pub const BLOCKING_BY_MOV_SS: u32 = 1 << 1;
/// With virtual NMIs: virtual-NMI blocking (bit 3).
pub const BLOCKING_BY_NMI: u32 = 1 << 3;
/// RFLAGS bits the exit paths look at.
pub const RFLAGS_TF: u64 = 1 << 8;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_RF: u64 = 1 << 16;

/// DR6 bits (SDM Vol. 3B 18.2.3): B0-B3, BD (debug-register access), BS
/// (single step).
pub const DR6_B0_B3: u64 = 0xf;
pub const DR6_BD: u64 = 1 << 13;
pub const DR6_BS: u64 = 1 << 14;
/// DR7.GD: general detect, cleared when its #DB is delivered.
pub const DR7_GD: u64 = 1 << 13;

/// How an instruction the hypervisor emulated ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AfterEmulation {
    /// The guest's interruptibility state from now on: blocking by STI or
    /// by MOV SS covers only the one instruction after STI / MOV SS, which
    /// was the emulated one, so it ends with it.
    pub interruptibility: u32,
    /// RFLAGS.TF was set: the instruction ends in a single-step #DB trap
    /// (DR6.BS), as it would on the CPU.
    pub single_step: bool,
}

/// After emulating one instruction of a guest whose interruptibility
/// state and RFLAGS were `interruptibility` and `rflags`. Leaving the
/// shadow in place would let it cover a second instruction; worse, with TF
/// set a VM entry with blocking by MOV SS fails its guest-state checks
/// unless a single-step is pending (SDM 27.3.1.5).
pub fn after_emulated(interruptibility: u32, rflags: u64) -> AfterEmulation {
    AfterEmulation {
        interruptibility: interruptibility & !(BLOCKING_BY_STI | BLOCKING_BY_MOV_SS),
        single_step: rflags & RFLAGS_TF != 0,
    }
}

/// The guest's DR6 when an intercepted #DB with exit qualification `qual`
/// is reflected to it. On such an exit the CPU leaves DR6 alone and puts
/// what it would have set in the qualification (SDM 28.2.1, Table 28-1:
/// B0-B3, BD, BS); the hypervisor sets those bits as the delivery would.
/// B0-B3 say which breakpoints this #DB matched, so the old ones go
/// ("certain debug exceptions may clear bits 0-3", SDM Vol. 3B 18.2.3;
/// Intel CPUs and KVM replace them, and kvm-unit-tests' debug test checks
/// the exact DR6); BD, BS and the rest stay until the guest clears them.
pub fn dr6_for_db(dr6: u64, qual: u64) -> u64 {
    (dr6 & !DR6_B0_B3) | (qual & (DR6_B0_B3 | DR6_BD | DR6_BS))
}

/// Exceptions of the fault class (SDM Vol. 3A 6.5, Table 6-1): all but
/// #DB (trap or fault), #BP and #OF (traps), #DF and #MC (aborts). The CPU
/// sets RFLAGS.RF in the image a fault pushes (6.12.1; 18.3.1.1), so an
/// injected fault must have RF set in the guest RFLAGS.
pub fn is_fault(vector: u8) -> bool {
    vector < 32 && !matches!(vector, 1 | 2 | 3 | 4 | 8 | 18)
}

/// Spots an exception whose delivery raises the same exception again: the
/// same vector at the same RIP and RSP, exit after exit, with no other
/// exit between them. A debug trap on the stack slot an IST delivery
/// pushes to does this forever (XSA-156): intercepted, each round is an
/// exit and the CPU is never stuck, but the guest makes no progress and
/// would hold its share of the CPU until the run's end. [`LIMIT`] rounds
/// in a row are taken as that loop. (A guest debugger that breaks on one
/// spinning instruction that often, with nothing else exiting, looks the
/// same and is stopped too: it is only ever the guest itself.)
///
/// [`LIMIT`]: ExceptionLoop::LIMIT
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionLoop {
    last: Option<(u8, u64, u64)>,
    rounds: u32,
}

impl ExceptionLoop {
    pub const LIMIT: u32 = 10_000;

    /// An exception exit; true once it has repeated [`Self::LIMIT`] times.
    pub fn exception(&mut self, vector: u8, rip: u64, rsp: u64) -> bool {
        let now = Some((vector, rip, rsp));
        if self.last == now {
            self.rounds = self.rounds.saturating_add(1);
        } else {
            self.last = now;
            self.rounds = 1;
        }
        self.rounds >= Self::LIMIT
    }

    /// Any other exit: the guest got somewhere.
    pub fn progress(&mut self) {
        *self = ExceptionLoop::default();
    }

    /// Rounds of the current streak.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_interrupts_and_the_nmi_encode_as_the_sdm_says() {
        // 25.8.3: vector 7:0, type 10:8 (0 external, 2 NMI), valid 31.
        assert_eq!(Event::external(0x20).encode(), 0x8000_0020);
        assert_eq!(Event::external(0xff).encode(), 0x8000_00ff);
        assert_eq!(Event::nmi().encode(), 0x8000_0202);
        assert!(!Event::external(0x30).needs_instruction_length());
        assert_eq!(Event::decode(0x8000_0202), Some(Event::nmi()));
    }

    #[test]
    fn faults_are_every_exception_but_the_traps_and_aborts() {
        for v in [0u8, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21, 31] {
            assert!(is_fault(v), "vector {v}");
        }
        for v in [1u8, 2, 3, 4, 8, 18, 32, 255] {
            assert!(!is_fault(v), "vector {v}");
        }
    }

    #[test]
    fn event_information_round_trips() {
        let gp = Event::exception(13, true);
        assert_eq!(gp.encode(), 0x8000_0b0d);
        assert_eq!(Event::decode(gp.encode()), Some(gp));
        let ud = Event::exception(6, false);
        assert_eq!(ud.encode(), 0x8000_0306);
        // ICEBP as an exit reports it: vector 1, type 5.
        let icebp = Event::decode(0x8000_0501).unwrap();
        assert_eq!(icebp, Event { vector: 1, kind: kind::PRIVILEGED_SOFTWARE_EXCEPTION, error_code: false });
        assert!(icebp.needs_instruction_length());
        assert!(Event { vector: 3, kind: kind::SOFTWARE_EXCEPTION, error_code: false }.needs_instruction_length());
        assert!(Event { vector: 0x80, kind: kind::SOFTWARE_INTERRUPT, error_code: false }.needs_instruction_length());
        assert!(!ud.needs_instruction_length());
        assert!(!Event { vector: 2, kind: kind::NMI, error_code: false }.needs_instruction_length());
        assert_eq!(Event::decode(0x0000_0b0d), None);
        // Bit 12 (NMI unblocking) and other bits of an exit field never
        // reach the injection.
        assert_eq!(Event::decode(0x8000_1b0d).unwrap().encode(), 0x8000_0b0d);
    }

    #[test]
    fn the_shadow_ends_with_the_emulated_instruction() {
        let a = after_emulated(BLOCKING_BY_MOV_SS | BLOCKING_BY_STI | 1 << 3, 0x2);
        assert_eq!(a, AfterEmulation { interruptibility: 1 << 3, single_step: false });
        assert_eq!(after_emulated(0, 0x102), AfterEmulation { interruptibility: 0, single_step: true });
        assert_eq!(after_emulated(BLOCKING_BY_STI, 0x302).interruptibility, 0);
    }

    #[test]
    fn reflected_db_sets_the_qualification_bits_of_dr6() {
        assert_eq!(dr6_for_db(0xffff_0ff0, DR6_BS), 0xffff_4ff0);
        assert_eq!(dr6_for_db(0xffff_0ff0, 0b0101), 0xffff_0ff5);
        assert_eq!(dr6_for_db(0xffff_0ff0, DR6_BD), 0xffff_2ff0);
        // A new #DB replaces the breakpoint bits of the last one (kvm-unit-
        // tests' debug: B1 left from before, then a B2 single-step hit:
        // DR6 = 0xffff4ff4, not ...ff6); BS and BD are not cleared.
        assert_eq!(dr6_for_db(0xffff_0ff2, 0b0100 | DR6_BS), 0xffff_4ff4);
        assert_eq!(dr6_for_db(0xffff_4ff0, 0b0001), 0xffff_4ff1);
        assert_eq!(dr6_for_db(0xffff_2ff0 | 0b1000, DR6_BS), 0xffff_6ff0);
        // Bits of the qualification that are not DR6 status bits stay out.
        assert_eq!(dr6_for_db(0, 1 << 16 | 1 << 4), 0);
    }

    #[test]
    fn a_loop_is_the_same_exception_at_the_same_place_without_progress() {
        let mut d = ExceptionLoop::default();
        for _ in 1..ExceptionLoop::LIMIT {
            assert!(!d.exception(1, 0x1000, 0x8000));
        }
        assert_eq!(d.rounds(), ExceptionLoop::LIMIT - 1);
        assert!(d.exception(1, 0x1000, 0x8000));
        // Any difference restarts the count: RIP, RSP, vector, progress.
        let mut d = ExceptionLoop::default();
        for i in 0..3 * ExceptionLoop::LIMIT as u64 {
            assert!(!d.exception(1, 0x1000 + i % 2, 0x8000));
        }
        for i in 0..3 * ExceptionLoop::LIMIT as u64 {
            assert!(!d.exception(1, 0x1000, 0x8000 + i % 2));
        }
        for i in 0..3 * ExceptionLoop::LIMIT {
            assert!(!d.exception(if i % 2 == 0 { 1 } else { 17 }, 0x1000, 0x8000));
        }
        for _ in 0..3 * ExceptionLoop::LIMIT {
            assert!(!d.exception(1, 0x1000, 0x8000));
            d.progress();
        }
        assert_eq!(d.rounds(), 0);
    }
}

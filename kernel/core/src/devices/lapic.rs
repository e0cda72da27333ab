//! A local APIC for one vCPU (Intel SDM Vol. 3A, chapter 11), as a plain
//! state machine: the xAPIC register page, the x2APIC MSRs, the
//! IA32_APIC_BASE and IA32_TSC_DEADLINE MSRs, the timer and the
//! IRR/ISR/TPR/PPR logic that decides what the vCPU is offered.
//!
//! Choices, where the SDM leaves room or the platform is smaller:
//! - The timer's input clock is the guest's TSC: one timer tick per TSC
//!   tick before the divide configuration register's divisor. Real parts
//!   clock it from the bus or core-crystal clock, which a guest learns by
//!   calibration (or from CPUID 0x15), so any fixed rate is architectural.
//! - This vCPU is the only processor: an IPI reaches it only when its
//!   destination (or shorthand) includes it; INIT and SIPI are never acted
//!   on (not even to self) and are counted; SMI and reserved delivery modes
//!   are dropped. Lowest-priority is delivered like fixed. The delivery
//!   status bits always read idle.
//! - LVT entries: timer, thermal, performance counter, LINT0, LINT1, error
//!   (no CMCI, so the version register says "max LVT entry 5" and 0x2F0 is
//!   reserved). No EOI-broadcast suppression (version bit 24 clear).
//! - No IOAPIC, and every interrupt this model accepts is edge-triggered,
//!   so the TMR stays zero and an EOI never needs a broadcast.
//! - While the APIC is software-disabled (SVR bit 8 clear) a new fixed
//!   interrupt is dropped and nothing is offered to the vCPU; IRR and ISR
//!   keep what they hold (11.4.7.2); NMIs are still accepted.
//! - Moving the APIC base is accepted and remembered; the kernel only maps
//!   (and routes) the default page at [`XAPIC_BASE`].
//! - While hardware-disabled or in x2APIC mode, the MMIO page behaves like
//!   no device (11.12.1.2: "as a legacy xAPIC in globally disabled
//!   state"): reads return all ones and writes are ignored.
//! - No spurious-vector delivery: the kernel offers and acknowledges an
//!   interrupt in one step, so the race that produces one cannot happen.
//!
//! Time: every access that takes `now` first runs [`Lapic::poll`], so
//! what a guest reads is always up to date; the kernel polls before it
//! asks for [`Lapic::pending_interrupt`].

/// The default physical address of the xAPIC page (11.4.1).
pub const XAPIC_BASE: u64 = 0xFEE0_0000;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// The x2APIC register MSRs (11.12.1.2).
pub const X2APIC_MSR_FIRST: u32 = 0x800;
pub const X2APIC_MSR_LAST: u32 = 0x8FF;

/// Local APIC version: an integrated xAPIC (11.4.8).
pub const VERSION: u32 = 0x14;
/// Highest LVT entry index (six entries: timer .. error).
pub const MAX_LVT: u32 = 5;

/// IA32_APIC_BASE bits (11.4.4).
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_EXTD: u64 = 1 << 10;
pub const APIC_BASE_EN: u64 = 1 << 11;

/// Register offsets in the xAPIC page (Table 11-1); the x2APIC MSR of a
/// register is `0x800 + offset / 16`.
pub mod reg {
    pub const ID: u32 = 0x020;
    pub const VERSION: u32 = 0x030;
    pub const TPR: u32 = 0x080;
    pub const APR: u32 = 0x090;
    pub const PPR: u32 = 0x0A0;
    pub const EOI: u32 = 0x0B0;
    pub const RRD: u32 = 0x0C0;
    pub const LDR: u32 = 0x0D0;
    pub const DFR: u32 = 0x0E0;
    pub const SVR: u32 = 0x0F0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const ICR: u32 = 0x300;
    pub const ICR2: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
    /// x2APIC mode only (reserved in the xAPIC page).
    pub const SELF_IPI: u32 = 0x3F0;
}

/// Error status register bits (11.5.3).
pub mod esr {
    pub const SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
    pub const RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
    pub const ILLEGAL_REGISTER_ADDRESS: u32 = 1 << 7;
}

/// LVT bits (Figure 11-8).
pub const LVT_MASKED: u32 = 1 << 16;
pub const LVT_TIMER_ONESHOT: u32 = 0;
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
pub const LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;

const SVR_ENABLE: u32 = 1 << 8;
/// Vector, enable and focus bit 9 (defined on P6, reserved later; kept
/// writable as a harmless no-op because guests clear or set it).
const SVR_WRITABLE: u32 = 0x3FF;

const LVT_TIMER: usize = 0;
const LVT_ERROR: usize = 5;
const LVT_LINT0: usize = 3;
/// Writable bits per LVT entry (timer, thermal, perf, LINT0, LINT1,
/// error): vector, delivery mode where there is one, polarity and trigger
/// for LINTn, mask, timer mode.
const LVT_WRITABLE: [u32; 6] = [0x700FF, 0x107FF, 0x107FF, 0x1A7FF, 0x1A7FF, 0x100FF];
/// Read-only bits: delivery status, and remote IRR for LINTn. They read
/// 0 here and a write of them is ignored, not a reserved-bit fault.
const LVT_READONLY: [u32; 6] = [0x1000, 0x1000, 0x1000, 0x5000, 0x5000, 0x1000];

/// Stored ICR low bits: vector, delivery mode, destination mode, level,
/// trigger mode, shorthand (Figure 11-12). Bit 12 (delivery status) is
/// read-only in xAPIC mode and ignored by WRMSR in x2APIC mode.
const ICR_WRITABLE: u32 = 0xCCFFF;
const ICR_BUSY: u32 = 1 << 12;

/// A fault the kernel turns into #GP(0) for the guest's RDMSR/WRMSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault;

/// The APIC's global mode, from IA32_APIC_BASE EN and EXTD (11.12.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disabled,
    XApic,
    X2Apic,
}

/// Result of a register write before the caller applies its mode's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteError {
    /// Not a register in this mode (xAPIC: flag ESR bit 7).
    Reserved,
    /// A read-only register (xAPIC: ignored).
    ReadOnly,
    /// Reserved bits set (x2APIC only; 11.12.1.3).
    BadValue,
}

/// The one-shot/periodic counter. The count had the value `count` at TSC
/// `anchor` (a tick boundary); it reaches zero at
/// `anchor + count * divisor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counter {
    running: bool,
    anchor: u64,
    count: u32,
}

const COUNTER_STOPPED: Counter = Counter {
    running: false,
    anchor: 0,
    count: 0,
};

#[derive(Debug, Clone)]
pub struct Lapic {
    /// The initial APIC ID (CPUID.1:EBX[31:24], CPUID.0xB:EDX).
    initial_id: u32,
    base: u64,
    bsp: bool,
    mode: Mode,
    x2apic_supported: bool,
    /// xAPIC ID (writable in xAPIC mode).
    xapic_id: u8,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// What ESR reads: the errors latched by the last ESR write.
    esr: u32,
    /// Errors detected since the last ESR write.
    esr_pending: u32,
    /// An error interrupt may be raised (rearmed by an ESR write).
    error_armed: bool,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    timer_initial: u32,
    timer_divide: u32,
    counter: Counter,
    tsc_deadline: u64,
    nmi_pending: bool,
    inits_ignored: u64,
    sipis_ignored: u64,
}

impl Lapic {
    /// The APIC of a bootstrap processor as after reset: xAPIC mode at
    /// [`XAPIC_BASE`] (IA32_APIC_BASE = 0xFEE00900), software-disabled,
    /// every LVT masked (11.4.7.1). x2APIC is supported unless
    /// [`Lapic::set_x2apic_supported`] says otherwise.
    pub fn new(apic_id: u32) -> Lapic {
        let mut l = Lapic {
            initial_id: apic_id,
            base: XAPIC_BASE,
            bsp: true,
            mode: Mode::XApic,
            x2apic_supported: true,
            xapic_id: 0,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            error_armed: true,
            icr_low: 0,
            icr_high: 0,
            lvt: [0; 6],
            timer_initial: 0,
            timer_divide: 0,
            counter: COUNTER_STOPPED,
            tsc_deadline: 0,
            nmi_pending: false,
            inits_ignored: 0,
            sipis_ignored: 0,
        };
        l.reset_registers();
        l
    }

    /// Whether the guest's CPUID shows x2APIC (CPUID.1:ECX[21]); if not,
    /// IA32_APIC_BASE.EXTD is a reserved bit. Call before the guest runs.
    pub fn set_x2apic_supported(&mut self, supported: bool) {
        self.x2apic_supported = supported;
    }

    /// The power-up register state of 11.4.7.1 / 11.12.5.1 (the base, BSP
    /// flag and the counters of ignored IPIs stay).
    fn reset_registers(&mut self) {
        self.xapic_id = self.initial_id as u8;
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xFFFF_FFFF;
        self.svr = 0xFF;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.error_armed = true;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; 6];
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.counter = COUNTER_STOPPED;
        self.tsc_deadline = 0;
        self.nmi_pending = false;
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// IA32_APIC_BASE as RDMSR returns it.
    pub fn apic_base(&self) -> u64 {
        let mut v = self.base;
        if self.bsp {
            v |= APIC_BASE_BSP;
        }
        match self.mode {
            Mode::Disabled => {}
            Mode::XApic => v |= APIC_BASE_EN,
            Mode::X2Apic => v |= APIC_BASE_EN | APIC_BASE_EXTD,
        }
        v
    }

    /// WRMSR IA32_APIC_BASE (11.4.4, 11.12.5). `Err` = #GP: reserved bits
    /// (0-7, 9, and MAXPHYADDR and up; EXTD without x2APIC support), the
    /// invalid state EN=0/EXTD=1, x2APIC -> xAPIC, disabled -> x2APIC.
    /// Clearing EN resets the APIC to its power-up state (11.4.3).
    pub fn set_apic_base(&mut self, value: u64, maxphyaddr: u8) -> Result<(), Fault> {
        let maxphyaddr = u32::from(maxphyaddr.clamp(12, 52));
        let mut reserved = 0xFFu64 | (1 << 9) | (u64::MAX << maxphyaddr);
        if !self.x2apic_supported {
            reserved |= APIC_BASE_EXTD;
        }
        if value & reserved != 0 {
            return Err(Fault);
        }
        let new = match (value & APIC_BASE_EN != 0, value & APIC_BASE_EXTD != 0) {
            (false, false) => Mode::Disabled,
            (true, false) => Mode::XApic,
            (true, true) => Mode::X2Apic,
            (false, true) => return Err(Fault),
        };
        match (self.mode, new) {
            (Mode::X2Apic, Mode::XApic) | (Mode::Disabled, Mode::X2Apic) => return Err(Fault),
            _ => {}
        }
        self.base = value & !0xFFF;
        self.bsp = value & APIC_BASE_BSP != 0;
        if new == Mode::Disabled && self.mode != Mode::Disabled {
            self.reset_registers();
        }
        // xAPIC -> x2APIC: the ID becomes the (read-only) x2APIC ID and the
        // LDR is derived from it (11.12.5.1); both are computed on read.
        self.mode = new;
        Ok(())
    }

    /// The APIC ID as the guest reads it in the current mode.
    pub fn apic_id(&self) -> u32 {
        match self.mode {
            Mode::X2Apic => self.initial_id,
            _ => u32::from(self.xapic_id),
        }
    }

    fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Hardware- and software-enabled: fixed interrupts are accepted and
    /// offered.
    pub fn is_enabled(&self) -> bool {
        self.mode != Mode::Disabled && self.sw_enabled()
    }

    // ---- TPR / CR8 ----------------------------------------------------

    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// Sets the whole TPR byte (VMX's virtual-APIC page holds it at 0x80).
    /// Works in every mode, as CR8 does.
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = tpr;
    }

    /// CR8 = TPR[7:4] (10.8.6.1 / 11.8.6.1).
    pub fn cr8(&self) -> u8 {
        self.tpr >> 4
    }

    /// MOV to CR8: TPR[7:4] = value[3:0], TPR[3:0] = 0. The kernel faults
    /// a value with bits 63:4 set before it gets here.
    pub fn set_cr8(&mut self, value: u8) {
        self.tpr = (value & 0xF) << 4;
    }

    // ---- priorities and delivery (11.8) -------------------------------

    fn highest(bits: &[u32; 8]) -> Option<u8> {
        (0..8)
            .rev()
            .find(|&i| bits[i] != 0)
            .map(|i| (i as u32 * 32 + 31 - bits[i].leading_zeros()) as u8)
    }

    fn test(bits: &[u32; 8], v: u8) -> bool {
        bits[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }

    fn set(bits: &mut [u32; 8], v: u8) {
        bits[usize::from(v >> 5)] |= 1 << (v & 31);
    }

    fn clear(bits: &mut [u32; 8], v: u8) {
        bits[usize::from(v >> 5)] &= !(1 << (v & 31));
    }

    /// Processor priority (11.8.3.1).
    pub fn ppr(&self) -> u8 {
        let isrv = Self::highest(&self.isr).unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// Arbitration priority (11.6.2.4 / Figure 11-15).
    fn apr(&self) -> u8 {
        let isrv = Self::highest(&self.isr).unwrap_or(0);
        let irrv = Self::highest(&self.irr).unwrap_or(0);
        let t = self.tpr >> 4;
        if t >= irrv >> 4 && t > isrv >> 4 {
            self.tpr
        } else {
            t.max(isrv >> 4).max(irrv >> 4) << 4
        }
    }

    /// The highest requested vector, whatever its priority (for a VMX TPR
    /// threshold).
    pub fn highest_irr(&self) -> Option<u8> {
        Self::highest(&self.irr)
    }

    /// The interrupt to offer the vCPU now: the highest IRR vector whose
    /// priority class is above PPR's, if the APIC is enabled (11.8.4).
    pub fn pending_interrupt(&self) -> Option<u8> {
        if !self.is_enabled() {
            return None;
        }
        let v = Self::highest(&self.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The vCPU took `vector` (INTA at injection): IRR -> ISR.
    pub fn ack_interrupt(&mut self, vector: u8) {
        if Self::test(&self.irr, vector) {
            Self::clear(&mut self.irr, vector);
            Self::set(&mut self.isr, vector);
        }
    }

    /// EOI: retire the highest in-service vector (11.8.5). A
    /// level-triggered one (TMR set) would also broadcast an EOI to the
    /// IOAPICs; this platform has none and accepts only edge interrupts.
    fn eoi(&mut self) {
        if let Some(v) = Self::highest(&self.isr) {
            Self::clear(&mut self.isr, v);
        }
    }

    /// An NMI for the vCPU (sent by the ICR to this APIC). NMIs do not
    /// queue: several before the vCPU takes one are one.
    pub fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.nmi_pending)
    }

    /// A device raises an edge-triggered fixed interrupt.
    pub fn set_irq(&mut self, vector: u8) {
        self.accept_fixed(vector);
    }

    /// Whether an 8259 PIC's INTR reaches the vCPU: APIC hardware-disabled
    /// (LINT0 is then the INTR pin), or LINT0 unmasked in ExtINT mode.
    pub fn accepts_pic_interrupts(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        self.mode == Mode::Disabled || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == 7)
    }

    /// INIT IPIs this APIC sent (or received) and ignored.
    pub fn inits_ignored(&self) -> u64 {
        self.inits_ignored
    }

    /// Start-up IPIs this APIC sent (or received) and ignored.
    pub fn sipis_ignored(&self) -> u64 {
        self.sipis_ignored
    }

    /// A fixed interrupt arrives (11.5.2: vectors 0-15 are illegal and
    /// never reach the IRR).
    fn accept_fixed(&mut self, vector: u8) {
        if self.mode == Mode::Disabled {
            return;
        }
        if vector < 16 {
            self.error(esr::RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        if !self.sw_enabled() {
            return;
        }
        Self::set(&mut self.irr, vector);
        Self::clear(&mut self.tmr, vector);
    }

    /// An error is detected (11.5.3): logged for the next ESR write, and
    /// signalled through the LVT error entry once per ESR write.
    fn error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if self.error_armed && lvt & LVT_MASKED == 0 {
            self.error_armed = false;
            self.accept_fixed(lvt as u8);
        }
    }

    // ---- IPIs (11.6) --------------------------------------------------

    fn x2apic_ldr(&self) -> u32 {
        let id = self.initial_id;
        ((id >> 4) << 16) | (1 << (id & 0xF))
    }

    fn ldr_value(&self) -> u32 {
        match self.mode {
            Mode::X2Apic => self.x2apic_ldr(),
            _ => self.ldr,
        }
    }

    /// Whether a destination (no shorthand) names this APIC (11.6.2).
    fn is_destination(&self, dest: u32, logical: bool) -> bool {
        if self.mode == Mode::X2Apic {
            if dest == 0xFFFF_FFFF {
                return true;
            }
            if !logical {
                return dest == self.initial_id;
            }
            let ldr = self.x2apic_ldr();
            return dest >> 16 == ldr >> 16 && dest & ldr & 0xFFFF != 0;
        }
        let dest = dest as u8;
        if dest == 0xFF {
            return true;
        }
        if !logical {
            return dest == self.xapic_id;
        }
        let id = (self.ldr >> 24) as u8;
        match self.dfr >> 28 {
            0xF => dest & id != 0,
            0x0 => dest >> 4 == id >> 4 && dest & id & 0xF != 0,
            _ => false,
        }
    }

    fn send_ipi(&mut self, low: u32, dest: u32) {
        let vector = low as u8;
        let to_self = match (low >> 18) & 3 {
            0 => self.is_destination(dest, low & (1 << 11) != 0),
            1 | 2 => true,
            _ => false,
        };
        match (low >> 8) & 7 {
            0 | 1 => {
                if vector < 16 {
                    let receive = if to_self {
                        esr::RECEIVE_ILLEGAL_VECTOR
                    } else {
                        0
                    };
                    self.error(esr::SEND_ILLEGAL_VECTOR | receive);
                } else if to_self {
                    self.accept_fixed(vector);
                }
            }
            4 if to_self => self.nmi_pending = true,
            5 => self.inits_ignored = self.inits_ignored.saturating_add(1),
            6 => self.sipis_ignored = self.sipis_ignored.saturating_add(1),
            _ => {}
        }
    }

    fn self_ipi(&mut self, vector: u8) {
        if vector < 16 {
            self.error(esr::SEND_ILLEGAL_VECTOR | esr::RECEIVE_ILLEGAL_VECTOR);
        } else {
            self.accept_fixed(vector);
        }
    }

    // ---- the timer (11.5.4) -------------------------------------------

    fn timer_mode(&self) -> u32 {
        self.lvt[LVT_TIMER] & (3 << 17)
    }

    /// Divide configuration (Figure 11-10): bits 3,1,0 = 111 is 1,
    /// otherwise 2 << value.
    fn divisor(&self) -> u64 {
        let v = ((self.timer_divide >> 1) & 4) | (self.timer_divide & 3);
        1 << ((v + 1) & 7)
    }

    fn counting(&self) -> bool {
        self.counter.running && matches!(self.timer_mode(), LVT_TIMER_ONESHOT | LVT_TIMER_PERIODIC)
    }

    fn counter_expiry(&self) -> u64 {
        self.counter
            .anchor
            .saturating_add(u64::from(self.counter.count) * self.divisor())
    }

    /// The current count at `now`; callers have run `poll(now)`, so a
    /// periodic counter has already been reloaded.
    fn current_count(&self, now: u64) -> u32 {
        if !self.counting() {
            return 0;
        }
        let ticks = now.saturating_sub(self.counter.anchor) / self.divisor();
        u64::from(self.counter.count).saturating_sub(ticks) as u32
    }

    fn timer_interrupt(&mut self) {
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept_fixed(lvt as u8);
        }
    }

    /// The guest TSC at which the timer next raises its interrupt; `None`
    /// if it is stopped or its LVT entry is masked (a masked expiry changes
    /// nothing the guest can see before its next APIC access, which polls).
    /// The value may lie in the past: then it is due now.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.mode == Mode::Disabled || self.lvt[LVT_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        match self.timer_mode() {
            LVT_TIMER_TSC_DEADLINE if self.tsc_deadline != 0 => Some(self.tsc_deadline),
            LVT_TIMER_ONESHOT | LVT_TIMER_PERIODIC if self.counter.running => {
                Some(self.counter_expiry())
            }
            _ => None,
        }
    }

    /// Fires what is due at guest TSC `now`: sets the timer vector in the
    /// IRR (unless masked). A periodic timer re-arms on its own grid, and a
    /// guest that missed many periods gets one interrupt.
    pub fn poll(&mut self, now: u64) {
        match self.timer_mode() {
            LVT_TIMER_TSC_DEADLINE if self.tsc_deadline != 0 && now >= self.tsc_deadline => {
                self.tsc_deadline = 0;
                self.timer_interrupt();
            }
            LVT_TIMER_ONESHOT | LVT_TIMER_PERIODIC if self.counter.running => {
                let expiry = self.counter_expiry();
                if now < expiry {
                    return;
                }
                if self.timer_mode() == LVT_TIMER_PERIODIC && self.timer_initial != 0 {
                    let period = u64::from(self.timer_initial) * self.divisor();
                    let missed = (now - expiry) / period;
                    self.counter = Counter {
                        running: true,
                        anchor: expiry + missed * period,
                        count: self.timer_initial,
                    };
                } else {
                    self.counter.running = false;
                }
                self.timer_interrupt();
            }
            _ => {}
        }
    }

    /// RDMSR IA32_TSC_DEADLINE: the armed deadline, 0 once it fired or in
    /// the other timer modes (11.5.4.1).
    pub fn tsc_deadline(&mut self, now: u64) -> u64 {
        self.poll(now);
        if self.timer_mode() == LVT_TIMER_TSC_DEADLINE {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// WRMSR IA32_TSC_DEADLINE: arms the timer in TSC-deadline mode (0
    /// disarms; ignored in the other modes). A deadline that is not in the
    /// future fires at once.
    pub fn set_tsc_deadline(&mut self, value: u64, now: u64) {
        self.poll(now);
        // (A disabled APIC's timer is in one-shot mode.)
        if self.timer_mode() != LVT_TIMER_TSC_DEADLINE {
            return;
        }
        self.tsc_deadline = value;
        self.poll(now);
    }

    fn write_lvt_timer(&mut self, value: u32) {
        let old = self.timer_mode();
        self.lvt[LVT_TIMER] = value;
        let new = self.timer_mode();
        // 11.5.4.1: a transition to or from TSC-deadline mode disarms the
        // timer. Between one-shot and periodic the count goes on.
        if (old == LVT_TIMER_TSC_DEADLINE) != (new == LVT_TIMER_TSC_DEADLINE) || new == 3 << 17 {
            self.counter = COUNTER_STOPPED;
            self.timer_initial = 0;
            self.tsc_deadline = 0;
        }
    }

    fn write_timer_initial(&mut self, value: u32, now: u64) {
        if !matches!(self.timer_mode(), LVT_TIMER_ONESHOT | LVT_TIMER_PERIODIC) {
            return; // ignored in TSC-deadline (and the reserved) mode
        }
        self.timer_initial = value;
        self.counter = if value == 0 {
            COUNTER_STOPPED
        } else {
            Counter {
                running: true,
                anchor: now,
                count: value,
            }
        };
    }

    fn write_timer_divide(&mut self, value: u32, now: u64) {
        if self.counting() {
            // The count goes on from its current value at the new rate
            // (poll ran, so the counter has not passed zero).
            let div = self.divisor();
            let ticks =
                (now.saturating_sub(self.counter.anchor) / div).min(u64::from(self.counter.count));
            self.counter.anchor += ticks * div;
            self.counter.count -= ticks as u32;
        }
        self.timer_divide = value & 0xB;
    }

    // ---- register access ----------------------------------------------

    /// Reads a register; `None` if the offset is no readable register in
    /// this mode.
    fn read_reg(&self, off: u32, now: u64) -> Option<u64> {
        let x2 = self.mode == Mode::X2Apic;
        let v = match off {
            reg::ID => {
                if x2 {
                    self.initial_id
                } else {
                    u32::from(self.xapic_id) << 24
                }
            }
            reg::VERSION => (MAX_LVT << 16) | VERSION,
            reg::TPR => u32::from(self.tpr),
            reg::APR if !x2 => u32::from(self.apr()),
            reg::PPR => u32::from(self.ppr()),
            reg::EOI | reg::RRD if !x2 => 0,
            reg::LDR => self.ldr_value(),
            reg::DFR if !x2 => self.dfr | 0x0FFF_FFFF,
            reg::SVR => self.svr,
            0x100..=0x170 => self.isr[((off - reg::ISR) >> 4) as usize],
            0x180..=0x1F0 => self.tmr[((off - reg::TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((off - reg::IRR) >> 4) as usize],
            reg::ESR => self.esr,
            reg::ICR if x2 => {
                return Some(u64::from(self.icr_high) << 32 | u64::from(self.icr_low))
            }
            reg::ICR => self.icr_low,
            reg::ICR2 if !x2 => self.icr_high,
            0x320..=0x370 => self.lvt[((off - reg::LVT_TIMER) >> 4) as usize],
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => self.current_count(now),
            reg::TIMER_DIVIDE => self.timer_divide,
            _ => return None,
        };
        Some(u64::from(v))
    }

    /// Writes a register. In xAPIC mode reserved bits are dropped; in
    /// x2APIC mode they are an error (11.12.1.3).
    fn write_reg(&mut self, off: u32, value: u64, now: u64) -> Result<(), WriteError> {
        let x2 = self.mode == Mode::X2Apic;
        // Bits 63:32 of everything but the x2APIC ICR are reserved.
        let (allowed, ignored): (u64, u64) = match off {
            reg::ID | reg::LDR if x2 => return Err(WriteError::ReadOnly),
            reg::ID | reg::LDR => (0xFF00_0000, 0),
            reg::DFR if !x2 => (0xF000_0000, 0x0FFF_FFFF),
            reg::VERSION | reg::PPR | reg::TIMER_CURRENT => return Err(WriteError::ReadOnly),
            0x100..=0x270 => return Err(WriteError::ReadOnly),
            reg::APR | reg::RRD if !x2 => return Err(WriteError::ReadOnly),
            reg::TPR => (0xFF, 0),
            // x2APIC: only 0 may be written; xAPIC: the value is ignored.
            reg::EOI | reg::ESR => (0, 0),
            reg::SVR => (u64::from(SVR_WRITABLE), 0),
            // Bits 63:32 are the x2APIC destination (an xAPIC write has none).
            reg::ICR => (
                0xFFFF_FFFF_0000_0000 | u64::from(ICR_WRITABLE),
                u64::from(ICR_BUSY),
            ),
            reg::ICR2 if !x2 => (0xFF00_0000, 0),
            0x320..=0x370 => {
                let i = ((off - reg::LVT_TIMER) >> 4) as usize;
                (u64::from(LVT_WRITABLE[i]), u64::from(LVT_READONLY[i]))
            }
            reg::TIMER_INITIAL => (0xFFFF_FFFF, 0),
            reg::TIMER_DIVIDE => (0xB, 0),
            reg::SELF_IPI if x2 => (0xFF, 0),
            _ => return Err(WriteError::Reserved),
        };
        if x2 && value & !(allowed | ignored) != 0 {
            return Err(WriteError::BadValue);
        }
        let v = value & allowed;
        let low = v as u32;
        match off {
            reg::ID => self.xapic_id = (low >> 24) as u8,
            reg::LDR => self.ldr = low,
            reg::DFR => self.dfr = low,
            reg::TPR => self.tpr = low as u8,
            reg::EOI => self.eoi(),
            reg::SVR => {
                self.svr = low;
                if low & SVR_ENABLE == 0 {
                    for e in &mut self.lvt {
                        *e |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
                self.error_armed = true;
            }
            reg::ICR => {
                self.icr_low = low;
                let dest = if x2 {
                    self.icr_high = (v >> 32) as u32;
                    self.icr_high
                } else {
                    self.icr_high >> 24
                };
                self.send_ipi(low, dest);
            }
            reg::ICR2 => self.icr_high = low,
            0x320..=0x370 => {
                let i = ((off - reg::LVT_TIMER) >> 4) as usize;
                let low = if self.sw_enabled() {
                    low
                } else {
                    low | LVT_MASKED
                };
                if i == LVT_TIMER {
                    self.write_lvt_timer(low);
                } else {
                    self.lvt[i] = low;
                }
            }
            reg::TIMER_INITIAL => self.write_timer_initial(low, now),
            reg::TIMER_DIVIDE => self.write_timer_divide(low, now),
            reg::SELF_IPI => self.self_ipi(low as u8),
            _ => {}
        }
        Ok(())
    }

    /// A 32-bit read of the xAPIC page at `offset` (16-byte aligned
    /// registers; other offsets in a register's slot read 0). All ones
    /// unless in xAPIC mode. A reserved register reads 0 and sets ESR's
    /// illegal-register-address bit.
    pub fn mmio_read(&mut self, offset: u32, now: u64) -> u32 {
        if self.mode != Mode::XApic {
            return u32::MAX;
        }
        if offset >= 0x1000 || offset & 0xF != 0 {
            return 0;
        }
        self.poll(now);
        match self.read_reg(offset, now) {
            Some(v) => v as u32,
            None => {
                self.error(esr::ILLEGAL_REGISTER_ADDRESS);
                0
            }
        }
    }

    /// A 32-bit write to the xAPIC page. Ignored unless in xAPIC mode;
    /// writes to read-only registers are ignored, to reserved ones set
    /// ESR's illegal-register-address bit.
    pub fn mmio_write(&mut self, offset: u32, value: u32, now: u64) {
        if self.mode != Mode::XApic || offset >= 0x1000 || offset & 0xF != 0 {
            return;
        }
        self.poll(now);
        if let Err(WriteError::Reserved) = self.write_reg(offset, u64::from(value), now) {
            self.error(esr::ILLEGAL_REGISTER_ADDRESS);
        }
    }

    fn x2apic_offset(&self, msr: u32) -> Result<u32, Fault> {
        if self.mode != Mode::X2Apic || !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(Fault);
        }
        Ok((msr - X2APIC_MSR_FIRST) << 4)
    }

    /// RDMSR of an x2APIC register (11.12.1.2). `Err` (#GP) outside
    /// x2APIC mode and for reserved and write-only registers.
    pub fn msr_read(&mut self, msr: u32, now: u64) -> Result<u64, Fault> {
        let off = self.x2apic_offset(msr)?;
        self.poll(now);
        self.read_reg(off, now).ok_or(Fault)
    }

    /// WRMSR of an x2APIC register. `Err` (#GP) outside x2APIC mode, for
    /// reserved and read-only registers, for reserved bits set (bits 63:32
    /// except in the ICR) and for a non-zero write to EOI or ESR.
    pub fn msr_write(&mut self, msr: u32, value: u64, now: u64) -> Result<(), Fault> {
        let off = self.x2apic_offset(msr)?;
        self.poll(now);
        self.write_reg(off, value, now).map_err(|_| Fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Literal values from the SDM, not the module's constants, so that a
    // wrong constant fails a test.
    const EN: u64 = 1 << 11;
    const EXTD: u64 = 1 << 10;
    const BSP: u64 = 1 << 8;
    const BUSY: u32 = 1 << 12;
    const MASKED: u32 = 1 << 16;
    const ONESHOT: u32 = 0;
    const PERIODIC: u32 = 1 << 17;
    const TSC_DEADLINE: u32 = 2 << 17;
    const SEND_ILL: u32 = 0x20;
    const RECV_ILL: u32 = 0x40;
    const ILL_REG: u32 = 0x80;
    const MAXPHY: u8 = 46;
    // ICR fields (Figure 11-12).
    const DM_LOWEST: u32 = 1 << 8;
    const DM_NMI: u32 = 4 << 8;
    const DM_INIT: u32 = 5 << 8;
    const DM_SIPI: u32 = 6 << 8;
    const LOGICAL: u32 = 1 << 11;
    const ASSERT: u32 = 1 << 14;
    const SELF: u32 = 1 << 18;
    const ALLINC: u32 = 2 << 18;
    const ALLBUT: u32 = 3 << 18;
    const DIV1: u32 = 0xB;

    /// A freshly reset APIC, software-enabled as every OS does first.
    fn enabled(id: u32) -> Lapic {
        let mut l = Lapic::new(id);
        l.mmio_write(reg::SVR, 0x1FF, 0);
        l
    }

    fn x2(id: u32) -> Lapic {
        let mut l = enabled(id);
        l.set_apic_base(XAPIC_BASE | BSP | EN | EXTD, MAXPHY)
            .unwrap();
        l
    }

    fn msr(off: u32) -> u32 {
        0x800 + off / 16
    }

    /// Bit `v` of the 256-bit ISR/TMR/IRR at `base`, read through the page.
    fn bit(l: &mut Lapic, base: u32, v: u8, now: u64) -> bool {
        l.mmio_read(base + u32::from(v >> 5) * 0x10, now) & (1 << (v & 31)) != 0
    }

    fn irr(l: &Lapic, v: u8) -> bool {
        Lapic::test(&l.irr, v)
    }

    fn irr_empty(l: &Lapic) -> bool {
        l.irr == [0; 8]
    }

    /// Takes the offered interrupt (if any) through INTA and EOI.
    fn service(l: &mut Lapic) -> Option<u8> {
        let v = l.pending_interrupt()?;
        l.ack_interrupt(v);
        if l.mode() == Mode::X2Apic {
            l.msr_write(msr(reg::EOI), 0, 0).unwrap();
        } else {
            l.mmio_write(reg::EOI, 0, 0);
        }
        Some(v)
    }

    /// ESR after the write that latches it (11.5.3).
    fn esr(l: &mut Lapic) -> u32 {
        if l.mode() == Mode::X2Apic {
            l.msr_write(msr(reg::ESR), 0, 0).unwrap();
            l.msr_read(msr(reg::ESR), 0).unwrap() as u32
        } else {
            l.mmio_write(reg::ESR, 0, 0);
            l.mmio_read(reg::ESR, 0)
        }
    }

    /// Sends an xAPIC IPI and reports the vector it delivered, if any.
    fn ipi(l: &mut Lapic, icr: u32, dest: u8) -> Option<u8> {
        l.mmio_write(reg::ICR2, u32::from(dest) << 24, 0);
        l.mmio_write(reg::ICR, icr, 0);
        service(l)
    }

    fn ipi_x2(l: &mut Lapic, icr: u32, dest: u32) -> Option<u8> {
        l.msr_write(msr(reg::ICR), u64::from(dest) << 32 | u64::from(icr), 0)
            .unwrap();
        service(l)
    }

    #[test]
    fn register_map_is_table_11_1() {
        let map = [
            (reg::ID, 0x20),
            (reg::VERSION, 0x30),
            (reg::TPR, 0x80),
            (reg::APR, 0x90),
            (reg::PPR, 0xA0),
            (reg::EOI, 0xB0),
            (reg::RRD, 0xC0),
            (reg::LDR, 0xD0),
            (reg::DFR, 0xE0),
            (reg::SVR, 0xF0),
            (reg::ISR, 0x100),
            (reg::TMR, 0x180),
            (reg::IRR, 0x200),
            (reg::ESR, 0x280),
            (reg::ICR, 0x300),
            (reg::ICR2, 0x310),
            (reg::LVT_TIMER, 0x320),
            (reg::LVT_THERMAL, 0x330),
            (reg::LVT_PERF, 0x340),
            (reg::LVT_LINT0, 0x350),
            (reg::LVT_LINT1, 0x360),
            (reg::LVT_ERROR, 0x370),
            (reg::TIMER_INITIAL, 0x380),
            (reg::TIMER_CURRENT, 0x390),
            (reg::TIMER_DIVIDE, 0x3E0),
            (reg::SELF_IPI, 0x3F0),
        ];
        for (c, off) in map {
            assert_eq!(c, off);
        }
        assert_eq!((MSR_APIC_BASE, MSR_TSC_DEADLINE), (0x1B, 0x6E0));
        assert_eq!((X2APIC_MSR_FIRST, X2APIC_MSR_LAST), (0x800, 0x8FF));
        assert_eq!(XAPIC_BASE, 0xFEE0_0000);
    }

    #[test]
    fn reset_state() {
        let mut l = Lapic::new(0);
        assert_eq!(l.apic_base(), 0xFEE0_0900);
        assert_eq!(l.mode(), Mode::XApic);
        assert_eq!(l.mmio_read(reg::ID, 0), 0);
        assert_eq!(Lapic::new(3).mmio_read(reg::ID, 0), 3 << 24);
        let ver = l.mmio_read(reg::VERSION, 0);
        assert_eq!(ver, 0x0005_0014);
        assert_eq!(ver & (1 << 24), 0, "no EOI-broadcast suppression");
        assert_eq!(l.mmio_read(reg::SVR, 0), 0xFF);
        for off in (reg::LVT_TIMER..=reg::LVT_ERROR).step_by(16) {
            assert_eq!(l.mmio_read(off, 0), 0x1_0000, "LVT {off:#x}");
        }
        assert_eq!(l.mmio_read(reg::DFR, 0), 0xFFFF_FFFF);
        for off in [
            reg::TPR,
            reg::PPR,
            reg::APR,
            reg::LDR,
            reg::ESR,
            reg::ICR,
            reg::ICR2,
            reg::TIMER_INITIAL,
            reg::TIMER_CURRENT,
            reg::TIMER_DIVIDE,
        ] {
            assert_eq!(l.mmio_read(off, 0), 0, "{off:#x}");
        }
        // Software-disabled after reset: fixed interrupts are not taken.
        l.set_irq(0x40);
        assert!(irr_empty(&l));
        assert_eq!(l.pending_interrupt(), None);
    }

    #[test]
    fn ppr_follows_tpr_and_isr() {
        let mut l = enabled(0);
        l.set_irq(0x45);
        assert_eq!(service_ack_only(&mut l), Some(0x45));
        for (tpr, ppr) in [
            (0x30, 0x40),
            (0x52, 0x52),
            (0x4A, 0x4A),
            (0x3F, 0x40),
            (0x00, 0x40),
        ] {
            l.set_tpr(tpr);
            assert_eq!(l.ppr(), ppr, "tpr {tpr:#x}");
            assert_eq!(l.mmio_read(reg::PPR, 0), u32::from(ppr));
        }
        l.set_tpr(0x3F);
        l.mmio_write(reg::EOI, 0, 0);
        assert_eq!(l.mmio_read(reg::PPR, 0), 0x3F);
    }

    fn service_ack_only(l: &mut Lapic) -> Option<u8> {
        let v = l.pending_interrupt()?;
        l.ack_interrupt(v);
        Some(v)
    }

    #[test]
    fn only_a_class_above_ppr_is_offered() {
        let mut l = enabled(0);
        l.set_irq(0x31);
        l.set_irq(0x45);
        assert_eq!(l.pending_interrupt(), Some(0x45));
        assert_eq!(l.highest_irr(), Some(0x45));
        for (tpr, want) in [
            (0x45, None),
            (0x40, None),
            (0x3F, Some(0x45)),
            (0x50, None),
            (0x00, Some(0x45)),
        ] {
            l.set_tpr(tpr);
            assert_eq!(l.pending_interrupt(), want, "tpr {tpr:#x}");
        }
        // CR8 holds TPR[7:4].
        l.set_cr8(4);
        assert_eq!(l.mmio_read(reg::TPR, 0), 0x40);
        assert_eq!(l.pending_interrupt(), None);
        l.set_cr8(3);
        assert_eq!(l.cr8(), 3);
        assert_eq!(l.pending_interrupt(), Some(0x45));
        // The TPR register is the same byte.
        l.mmio_write(reg::TPR, 0x1_0050, 0);
        assert_eq!(l.tpr(), 0x50);
        assert_eq!(l.cr8(), 5);
        assert_eq!(l.pending_interrupt(), None);
    }

    #[test]
    fn arbitration_priority() {
        let mut l = enabled(0);
        l.set_tpr(0x20);
        l.set_irq(0x31);
        assert_eq!(l.mmio_read(reg::APR, 0), 0x30);
        l.set_tpr(0x4A);
        assert_eq!(l.mmio_read(reg::APR, 0), 0x4A);
        l.set_tpr(0);
        l.ack_interrupt(0x31);
        l.set_tpr(0x3A);
        // TPR class equals the in-service class: APR is the class only.
        assert_eq!(l.mmio_read(reg::APR, 0), 0x30);
        l.set_tpr(0x20);
        assert_eq!(l.mmio_read(reg::APR, 0), 0x30);
        // TPR above the in-service class, nothing requested: APR = TPR.
        l.set_tpr(0x4A);
        assert_eq!(l.mmio_read(reg::APR, 0), 0x4A);
    }

    #[test]
    fn nested_interrupts_and_eoi_order() {
        let mut l = enabled(0);
        l.set_irq(0x40);
        assert_eq!(service_ack_only(&mut l), Some(0x40));
        assert!(bit(&mut l, reg::ISR, 0x40, 0));
        assert!(!bit(&mut l, reg::IRR, 0x40, 0));
        // Same class as the one in service: held.
        l.set_irq(0x41);
        assert_eq!(l.pending_interrupt(), None);
        // A higher class nests.
        l.set_irq(0x60);
        assert_eq!(service_ack_only(&mut l), Some(0x60));
        l.set_irq(0x50);
        assert_eq!(
            l.pending_interrupt(),
            None,
            "0x50 is below the in-service 0x60"
        );
        assert!(bit(&mut l, reg::IRR, 0x50, 0) && bit(&mut l, reg::IRR, 0x41, 0));
        // EOI retires the highest in-service vector first.
        l.mmio_write(reg::EOI, 0, 0);
        assert!(!bit(&mut l, reg::ISR, 0x60, 0));
        assert!(bit(&mut l, reg::ISR, 0x40, 0));
        assert_eq!(service_ack_only(&mut l), Some(0x50));
        l.mmio_write(reg::EOI, 0x1234, 0); // any value EOIs in xAPIC mode
        assert!(!bit(&mut l, reg::ISR, 0x50, 0) && bit(&mut l, reg::ISR, 0x40, 0));
        l.mmio_write(reg::EOI, 0, 0);
        assert!(!bit(&mut l, reg::ISR, 0x40, 0));
        assert_eq!(service(&mut l), Some(0x41));
        l.mmio_write(reg::EOI, 0, 0); // nothing in service: no effect
        assert_eq!(l.isr, [0; 8]);
        assert_eq!(
            l.mmio_read(reg::TMR, 0) | l.mmio_read(reg::TMR + 0x30, 0),
            0
        );
        // Acknowledging something not requested changes nothing.
        l.ack_interrupt(0x99);
        assert_eq!(l.isr, [0; 8]);
    }

    #[test]
    fn self_ipi_through_icr() {
        let mut l = enabled(0);
        assert_eq!(ipi(&mut l, SELF | 0xF1, 0), Some(0xF1));
        // Delivery status reads idle; reserved ICR bits read 0.
        assert_eq!(l.mmio_read(reg::ICR, 0), SELF | 0xF1);
        l.mmio_write(reg::ICR2, 0xFFFF_FFFF, 0);
        assert_eq!(l.mmio_read(reg::ICR2, 0), 0xFF00_0000);
        l.mmio_write(reg::ICR, 0xFFFF_FFFF, 0); // reserved delivery mode 7: not sent
        assert_eq!(l.mmio_read(reg::ICR, 0), 0x000C_CFFF);
        assert_eq!(l.pending_interrupt(), None);
        // Lowest priority goes to the only CPU, like fixed.
        assert_eq!(ipi(&mut l, DM_LOWEST | 0x70, 0), Some(0x70));
    }

    #[test]
    fn xapic_destinations() {
        let mut l = enabled(5);
        // Physical.
        assert_eq!(ipi(&mut l, 0x61, 5), Some(0x61));
        assert_eq!(ipi(&mut l, 0x61, 6), None);
        assert_eq!(ipi(&mut l, 0x61, 0xFF), Some(0x61));
        // Shorthands ignore the destination field.
        assert_eq!(ipi(&mut l, SELF | 0x62, 6), Some(0x62));
        assert_eq!(ipi(&mut l, ALLINC | 0x63, 6), Some(0x63));
        assert_eq!(ipi(&mut l, ALLBUT | 0x64, 5), None);
        // Logical, flat model; LDR 0 matches nothing but broadcast.
        assert_eq!(ipi(&mut l, LOGICAL | 0x65, 0x01), None);
        assert_eq!(ipi(&mut l, LOGICAL | 0x65, 0xFF), Some(0x65));
        l.mmio_write(reg::LDR, 0x04FF_FFFF, 0);
        assert_eq!(l.mmio_read(reg::LDR, 0), 0x0400_0000);
        assert_eq!(ipi(&mut l, LOGICAL | 0x66, 0x04), Some(0x66));
        assert_eq!(ipi(&mut l, LOGICAL | 0x66, 0x0C), Some(0x66));
        assert_eq!(ipi(&mut l, LOGICAL | 0x66, 0x03), None);
        // Logical, cluster model: cluster 2, member bit 0.
        l.mmio_write(reg::DFR, 0x0000_0000, 0);
        assert_eq!(l.mmio_read(reg::DFR, 0), 0x0FFF_FFFF);
        l.mmio_write(reg::LDR, 0x21 << 24, 0);
        assert_eq!(ipi(&mut l, LOGICAL | 0x67, 0x21), Some(0x67));
        assert_eq!(ipi(&mut l, LOGICAL | 0x67, 0x23), Some(0x67));
        assert_eq!(ipi(&mut l, LOGICAL | 0x67, 0x22), None);
        assert_eq!(ipi(&mut l, LOGICAL | 0x67, 0x31), None);
        assert_eq!(ipi(&mut l, LOGICAL | 0x67, 0xFF), Some(0x67));
        // The xAPIC ID is writable and physical delivery follows it.
        l.mmio_write(reg::ID, 0x07AB_CDEF, 0);
        assert_eq!(l.mmio_read(reg::ID, 0), 0x0700_0000);
        assert_eq!(l.apic_id(), 7);
        assert_eq!(ipi(&mut l, 0x68, 7), Some(0x68));
        assert_eq!(ipi(&mut l, 0x68, 5), None);
    }

    #[test]
    fn x2apic_destinations_and_self_ipi() {
        let mut l = x2(0x123);
        assert_eq!(l.msr_read(msr(reg::ID), 0), Ok(0x123));
        // 11.12.10.2: cluster = ID[19:4], member bit = 1 << ID[3:0].
        assert_eq!(l.msr_read(msr(reg::LDR), 0), Ok(0x0012_0008));
        assert_eq!(ipi_x2(&mut l, 0x61, 0x123), Some(0x61));
        assert_eq!(
            ipi_x2(&mut l, 0x61, 0x23),
            None,
            "the full 32-bit ID is compared"
        );
        assert_eq!(
            ipi_x2(&mut l, 0x61, 0xFF),
            None,
            "0xFF is no broadcast in x2APIC mode"
        );
        assert_eq!(ipi_x2(&mut l, 0x61, 0xFFFF_FFFF), Some(0x61));
        assert_eq!(ipi_x2(&mut l, LOGICAL | 0x62, 0x0012_0008), Some(0x62));
        assert_eq!(ipi_x2(&mut l, LOGICAL | 0x62, 0x0012_000C), Some(0x62));
        assert_eq!(ipi_x2(&mut l, LOGICAL | 0x62, 0x0012_0004), None);
        assert_eq!(ipi_x2(&mut l, LOGICAL | 0x62, 0x0013_0008), None);
        assert_eq!(ipi_x2(&mut l, LOGICAL | 0x62, 0xFFFF_FFFF), Some(0x62));
        assert_eq!(ipi_x2(&mut l, SELF | 0x63, 7), Some(0x63));
        assert_eq!(ipi_x2(&mut l, ALLBUT | 0x63, 0x123), None);
        // The ICR is one 64-bit register.
        assert_eq!(
            l.msr_read(msr(reg::ICR), 0),
            Ok(0x123 << 32 | u64::from(ALLBUT | 0x63))
        );
        // SELF IPI register.
        l.msr_write(msr(reg::SELF_IPI), 0x55, 0).unwrap();
        assert_eq!(service(&mut l), Some(0x55));
    }

    #[test]
    fn nmi_by_icr() {
        let mut l = enabled(0);
        l.mmio_write(reg::ICR2, 0, 0);
        l.mmio_write(reg::ICR, DM_NMI | ASSERT, 0);
        assert!(l.take_nmi());
        assert!(!l.take_nmi());
        // NMIs sent before the vCPU takes one are one NMI.
        for _ in 0..10 {
            l.mmio_write(reg::ICR, DM_NMI, 0);
        }
        assert!(l.take_nmi());
        assert!(!l.take_nmi());
        l.mmio_write(reg::ICR2, 1 << 24, 0);
        l.mmio_write(reg::ICR, DM_NMI, 0);
        assert!(!l.take_nmi(), "another CPU's NMI");
        l.mmio_write(reg::ICR, ALLBUT | DM_NMI, 0);
        assert!(!l.take_nmi());
        l.mmio_write(reg::ICR, ALLINC | DM_NMI, 0);
        assert!(l.take_nmi());
        // A software-disabled APIC still takes NMIs (11.4.7.2).
        l.mmio_write(reg::SVR, 0xFF, 0);
        l.mmio_write(reg::ICR, SELF | DM_NMI, 0);
        assert!(l.take_nmi());
        assert!(irr_empty(&l));
    }

    #[test]
    fn init_and_sipi_are_ignored_and_counted() {
        let mut l = enabled(0);
        l.set_tpr(0x20);
        // What kvm-unit-tests' smp bring-up sends.
        l.mmio_write(reg::ICR2, 0, 0);
        l.mmio_write(reg::ICR, ALLBUT | DM_INIT | ASSERT, 0);
        l.mmio_write(reg::ICR, ALLBUT | DM_SIPI, 0);
        assert_eq!(l.mmio_read(reg::ICR, 0) & BUSY, 0);
        assert_eq!(l.mmio_read(reg::ICR, 0), ALLBUT | DM_SIPI);
        // To self too: nothing happens to this CPU.
        l.mmio_write(reg::ICR, DM_INIT | ASSERT, 0);
        l.mmio_write(reg::ICR, SELF | DM_SIPI | 0x12, 0);
        assert_eq!((l.inits_ignored(), l.sipis_ignored()), (2, 2));
        assert_eq!(l.mmio_read(reg::SVR, 0), 0x1FF);
        assert_eq!(l.tpr(), 0x20);
        assert!(!l.take_nmi());
        assert!(irr_empty(&l));
        assert_eq!(esr(&mut l), 0, "a SIPI's vector is no interrupt vector");
    }

    #[test]
    fn illegal_vectors_set_esr() {
        let mut l = enabled(0);
        l.mmio_write(reg::ICR, SELF | 5, 0);
        assert_eq!(esr(&mut l), SEND_ILL | RECV_ILL);
        l.mmio_write(reg::ICR, ALLBUT | 5, 0);
        assert_eq!(esr(&mut l), SEND_ILL);
        l.mmio_write(reg::ICR, DM_LOWEST | 0x0F, 0); // physical dest 0 = self
        assert_eq!(esr(&mut l), 0x60);
        l.set_irq(3);
        assert_eq!(esr(&mut l), RECV_ILL);
        assert!(irr_empty(&l));
        // 16-31 are not illegal (11.5.2).
        l.set_irq(16);
        assert_eq!(esr(&mut l), 0);
        assert_eq!(service(&mut l), Some(16));
        assert_eq!(ipi(&mut l, SELF | 16, 0), Some(16));
        assert_eq!(esr(&mut l), 0);
        // An LVT with an illegal vector.
        l.mmio_write(reg::LVT_TIMER, 8, 0);
        l.mmio_write(reg::TIMER_DIVIDE, DIV1, 0);
        l.mmio_write(reg::TIMER_INITIAL, 10, 0);
        l.poll(10);
        assert_eq!(esr(&mut l), RECV_ILL);
        assert!(!irr(&l, 8));
        // x2APIC SELF IPI.
        let mut l = x2(0);
        l.msr_write(msr(reg::SELF_IPI), 5, 0).unwrap();
        assert_eq!(esr(&mut l), 0x60);
        assert!(irr_empty(&l));
        l.msr_write(msr(reg::SELF_IPI), 16, 0).unwrap();
        assert_eq!(service(&mut l), Some(16));
        assert_eq!(esr(&mut l), 0);
    }

    #[test]
    fn esr_latches_on_write_and_error_interrupt_rearms() {
        let mut l = enabled(0);
        l.set_irq(3);
        assert_eq!(l.mmio_read(reg::ESR, 0), 0, "not latched before the write");
        l.mmio_write(reg::ESR, 0x1234, 0);
        assert_eq!(l.mmio_read(reg::ESR, 0), 0x40);
        assert_eq!(l.mmio_read(reg::ESR, 0), 0x40, "reading does not clear");
        l.mmio_write(reg::ESR, 0, 0);
        assert_eq!(l.mmio_read(reg::ESR, 0), 0);
        // LVT error: one interrupt per ESR write.
        l.mmio_write(reg::LVT_ERROR, 0xE3, 0);
        l.set_irq(2);
        assert_eq!(service(&mut l), Some(0xE3));
        l.set_irq(2);
        assert_eq!(l.pending_interrupt(), None, "not rearmed yet");
        l.mmio_write(reg::ESR, 0, 0);
        l.set_irq(2);
        assert_eq!(service(&mut l), Some(0xE3));
        // A masked LVT error logs the error but raises nothing.
        l.mmio_write(reg::ESR, 0, 0);
        l.mmio_write(reg::LVT_ERROR, MASKED | 0xE3, 0);
        l.set_irq(2);
        assert_eq!(l.pending_interrupt(), None);
        assert_eq!(esr(&mut l), 0x40);
    }

    #[test]
    fn illegal_register_address() {
        let mut l = enabled(0);
        for off in [
            0x000, 0x010, 0x040, 0x070, 0x290, 0x2F0, 0x3A0, 0x3F0, 0x400, 0xFF0,
        ] {
            assert_eq!(l.mmio_read(off, 0), 0, "{off:#x}");
            assert_eq!(esr(&mut l), ILL_REG, "read {off:#x}");
            l.mmio_write(off, 0xFFFF_FFFF, 0);
            assert_eq!(esr(&mut l), ILL_REG, "write {off:#x}");
        }
        // Write-only and read-only registers are no reserved addresses.
        assert_eq!(l.mmio_read(reg::EOI, 0), 0);
        l.mmio_write(reg::VERSION, 0, 0);
        l.mmio_write(reg::PPR, 0xFF, 0);
        l.mmio_write(reg::IRR, 0xFFFF_FFFF, 0);
        l.mmio_write(reg::APR, 0xFF, 0);
        l.mmio_write(reg::RRD, 0xFF, 0);
        assert_eq!(esr(&mut l), 0);
        assert_eq!(l.mmio_read(reg::VERSION, 0), 0x0005_0014);
        assert!(irr_empty(&l));
        // Offsets inside a register's 16-byte slot, and outside the page.
        assert_eq!(l.mmio_read(reg::VERSION + 4, 0), 0);
        l.mmio_write(reg::TPR + 4, 0xFF, 0);
        assert_eq!(l.mmio_read(0x1000, 0), 0);
        l.mmio_write(0x1080, 0xFF, 0);
        assert_eq!(l.tpr(), 0);
        assert_eq!(esr(&mut l), 0, "no register access at all");
    }

    #[test]
    fn software_disable_masks_lvts() {
        let mut l = enabled(0);
        l.mmio_write(reg::SVR, 0x1F5, 0);
        assert_eq!(l.mmio_read(reg::SVR, 0), 0x1F5);
        l.mmio_write(reg::SVR, 0xFFFF_FFFF, 0);
        assert_eq!(l.mmio_read(reg::SVR, 0), 0x3FF, "bit 12 and up reserved");
        l.mmio_write(reg::LVT_TIMER, 0x30, 0);
        l.mmio_write(reg::LVT_LINT0, 0x700, 0);
        assert_eq!(l.mmio_read(reg::LVT_TIMER, 0), 0x30);
        l.set_irq(0x40);
        l.mmio_write(reg::SVR, 0xFF, 0);
        assert_eq!(l.mmio_read(reg::LVT_TIMER, 0), 0x1_0030);
        assert_eq!(l.mmio_read(reg::LVT_LINT0, 0), 0x1_0700);
        l.mmio_write(reg::LVT_TIMER, 0x30, 0);
        assert_eq!(
            l.mmio_read(reg::LVT_TIMER, 0),
            0x1_0030,
            "stays masked while disabled"
        );
        // Held, not offered; new fixed interrupts are not taken.
        assert_eq!(l.pending_interrupt(), None);
        l.set_irq(0x50);
        assert!(!irr(&l, 0x50));
        l.mmio_write(reg::SVR, 0x1FF, 0);
        assert_eq!(
            l.mmio_read(reg::LVT_TIMER, 0),
            0x1_0030,
            "re-enabling unmasks nothing"
        );
        assert_eq!(l.pending_interrupt(), Some(0x40));
        l.mmio_write(reg::LVT_TIMER, 0x30, 0);
        assert_eq!(l.mmio_read(reg::LVT_TIMER, 0), 0x30);
    }

    #[test]
    fn lvt_writable_bits() {
        let mut l = enabled(0);
        let want = [0x7_00FF, 0x1_07FF, 0x1_07FF, 0x1_A7FF, 0x1_A7FF, 0x1_00FF];
        for (i, w) in want.iter().enumerate() {
            let off = reg::LVT_TIMER + 16 * i as u32;
            l.mmio_write(off, 0xFFFF_FFFF, 0);
            assert_eq!(l.mmio_read(off, 0), *w, "LVT {off:#x}");
        }
    }

    #[test]
    fn pic_interrupts_reach_the_cpu_through_lint0_extint() {
        let mut l = Lapic::new(0);
        assert!(!l.accepts_pic_interrupts(), "LINT0 masked after reset");
        l.mmio_write(reg::SVR, 0x1FF, 0);
        l.mmio_write(reg::LVT_LINT0, 0x700, 0);
        assert!(l.accepts_pic_interrupts());
        l.mmio_write(reg::LVT_LINT0, 0x400, 0);
        assert!(!l.accepts_pic_interrupts(), "NMI mode");
        l.set_apic_base(XAPIC_BASE | BSP, MAXPHY).unwrap();
        assert!(
            l.accepts_pic_interrupts(),
            "hardware-disabled: LINT0 is INTR"
        );
    }

    /// A one-shot timer of `initial` ticks started at `start`.
    fn one_shot(divide: u32, initial: u32, start: u64) -> Lapic {
        let mut l = enabled(0);
        l.mmio_write(reg::LVT_TIMER, ONESHOT | 0x30, start);
        l.mmio_write(reg::TIMER_DIVIDE, divide, start);
        l.mmio_write(reg::TIMER_INITIAL, initial, start);
        l
    }

    #[test]
    fn one_shot_fires_once_with_every_divisor() {
        let table = [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xA, 128),
            (0xB, 1),
            (0xF, 1),
        ];
        for (dcr, div) in table {
            let start = 1000;
            let mut l = one_shot(dcr, 100, start);
            let expiry = start + 100 * div;
            assert_eq!(l.mmio_read(reg::TIMER_DIVIDE, start), dcr & 0xB);
            assert_eq!(l.next_deadline(), Some(expiry), "dcr {dcr:#x}");
            assert_eq!(l.mmio_read(reg::TIMER_CURRENT, start), 100);
            assert_eq!(
                l.mmio_read(reg::TIMER_CURRENT, start + 10 * div + div - 1),
                90
            );
            assert_eq!(l.mmio_read(reg::TIMER_CURRENT, expiry - 1), 1);
            assert!(!irr(&l, 0x30), "dcr {dcr:#x}: early");
            l.poll(expiry);
            assert!(irr(&l, 0x30), "dcr {dcr:#x}: on time");
            assert_eq!(l.mmio_read(reg::TIMER_CURRENT, expiry), 0);
            assert_eq!(l.mmio_read(reg::TIMER_INITIAL, expiry), 100);
            assert_eq!(l.next_deadline(), None);
            assert_eq!(service(&mut l), Some(0x30));
            l.poll(expiry + 1_000_000);
            assert_eq!(l.pending_interrupt(), None, "dcr {dcr:#x}: fired twice");
        }
    }

    #[test]
    fn current_count_decreases_and_initial_count_restarts() {
        let mut l = one_shot(DIV1, 1000, 0);
        let mut last = u32::MAX;
        for now in (0..1000).step_by(97) {
            let c = l.mmio_read(reg::TIMER_CURRENT, now);
            assert_eq!(c, 1000 - now as u32);
            assert!(c < last);
            last = c;
        }
        // Writing the initial count restarts the count from it.
        l.mmio_write(reg::TIMER_INITIAL, 1000, 500);
        assert_eq!(l.next_deadline(), Some(1500));
        l.poll(1499);
        assert!(!irr(&l, 0x30));
        // Initial count 0 stops the timer.
        l.mmio_write(reg::TIMER_INITIAL, 0, 1499);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 1499), 0);
        assert_eq!(l.next_deadline(), None);
        l.poll(10_000);
        assert!(irr_empty(&l));
    }

    #[test]
    fn divide_change_mid_count_keeps_the_count() {
        let mut l = one_shot(0x0, 100, 0); // divide by 2
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 81), 60);
        l.mmio_write(reg::TIMER_DIVIDE, 0x2, 81); // divide by 8, from tick 40 (TSC 80)
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 81), 60);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 80 + 8 * 10), 50);
        assert_eq!(l.next_deadline(), Some(80 + 60 * 8));
        l.mmio_write(reg::TIMER_DIVIDE, 0xB, 80 + 8 * 10 + 3); // divide by 1
        assert_eq!(l.next_deadline(), Some(160 + 50));
    }

    #[test]
    fn periodic_fires_every_period_without_drift_or_flood() {
        let mut l = enabled(0);
        l.mmio_write(reg::LVT_TIMER, PERIODIC | 0x31, 0);
        l.mmio_write(reg::TIMER_DIVIDE, 0x0, 0); // 2
        l.mmio_write(reg::TIMER_INITIAL, 50, 0); // period 100 TSC ticks
        assert_eq!(l.next_deadline(), Some(100));
        l.poll(99);
        assert_eq!(l.pending_interrupt(), None);
        l.poll(100);
        assert_eq!(service(&mut l), Some(0x31));
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 100), 50, "reloaded");
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 150), 25);
        assert_eq!(service(&mut l), None);
        assert_eq!(l.next_deadline(), Some(200));
        // Polled late: fires, and the next period is still on the grid.
        l.poll(305);
        assert_eq!(service(&mut l), Some(0x31));
        assert_eq!(l.next_deadline(), Some(400));
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 305), 48);
        // Not run for ten million periods: one interrupt.
        l.poll(1_000_000_050);
        assert_eq!(service(&mut l), Some(0x31));
        l.poll(1_000_000_050);
        assert_eq!(service(&mut l), None);
        assert_eq!(l.next_deadline(), Some(1_000_000_100));
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 1_000_000_050), 25);
        l.poll(1_000_000_100);
        assert_eq!(service(&mut l), Some(0x31));
    }

    #[test]
    fn one_shot_and_periodic_switch_keeps_counting() {
        // 11.5.4: changing the mode between one-shot and periodic does not
        // restart (or stop) the count; kvm-unit-tests' apic_change_mode.
        let mut l = one_shot(DIV1, 1000, 0);
        l.mmio_write(reg::LVT_TIMER, PERIODIC | 0x30, 600);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 600), 400);
        assert_eq!(l.mmio_read(reg::TIMER_INITIAL, 600), 1000);
        l.poll(1000);
        assert_eq!(service(&mut l), Some(0x30));
        assert_eq!(
            l.mmio_read(reg::TIMER_CURRENT, 1100),
            900,
            "periodic reload"
        );
        l.mmio_write(reg::LVT_TIMER, ONESHOT | 0x30, 2500);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 2500), 500);
        l.poll(3000);
        assert_eq!(service(&mut l), Some(0x30));
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 3500), 0);
        assert_eq!(l.next_deadline(), None);
        // An expired one-shot switched to periodic stays at zero.
        l.mmio_write(reg::LVT_TIMER, PERIODIC | 0x30, 3600);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 3600), 0);
        l.poll(100_000);
        assert_eq!(service(&mut l), None);
    }

    #[test]
    fn masked_timer_counts_but_raises_nothing() {
        let mut l = enabled(0);
        l.mmio_write(reg::LVT_TIMER, MASKED | 0x30, 0);
        l.mmio_write(reg::TIMER_DIVIDE, DIV1, 0);
        l.mmio_write(reg::TIMER_INITIAL, 100, 0);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 50), 50);
        assert_eq!(l.next_deadline(), None, "nothing to wake for");
        l.poll(100);
        assert!(irr_empty(&l));
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 100), 0);
        // Unmasking after the expiry raises nothing.
        l.mmio_write(reg::LVT_TIMER, 0x30, 200);
        l.poll(1000);
        assert!(irr_empty(&l));
        // A masked periodic timer keeps its period; unmasked, it fires on it.
        l.mmio_write(reg::LVT_TIMER, MASKED | PERIODIC | 0x30, 1000);
        l.mmio_write(reg::TIMER_INITIAL, 100, 1000);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 1250), 50);
        assert!(irr_empty(&l));
        l.mmio_write(reg::LVT_TIMER, PERIODIC | 0x30, 1250);
        assert_eq!(l.next_deadline(), Some(1300));
        l.poll(1300);
        assert!(irr(&l, 0x30));
    }

    fn deadline_mode() -> Lapic {
        let mut l = enabled(0);
        l.mmio_write(reg::LVT_TIMER, TSC_DEADLINE | 0xEF, 0);
        l
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut l = deadline_mode();
        // The counter registers are out of use (11.5.4.1).
        l.mmio_write(reg::TIMER_INITIAL, 1000, 0);
        assert_eq!(l.mmio_read(reg::TIMER_INITIAL, 0), 0);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 10), 0);
        assert_eq!(l.next_deadline(), None);
        l.poll(5000);
        assert!(irr_empty(&l));
        // Armed in the future.
        l.set_tsc_deadline(5500, 5100);
        assert_eq!(l.tsc_deadline(5100), 5500);
        assert_eq!(l.next_deadline(), Some(5500));
        l.poll(5499);
        assert!(irr_empty(&l));
        l.poll(5500);
        assert_eq!(l.tsc_deadline(5500), 0, "cleared when it fires");
        assert_eq!(l.next_deadline(), None);
        assert_eq!(service(&mut l), Some(0xEF));
        // In the past: fires at once.
        l.set_tsc_deadline(50, 6000);
        assert!(irr(&l, 0xEF));
        assert_eq!(l.tsc_deadline(6000), 0);
        assert_eq!(service(&mut l), Some(0xEF));
        // Zero disarms.
        l.set_tsc_deadline(8000, 6000);
        l.set_tsc_deadline(0, 6500);
        assert_eq!(l.tsc_deadline(6500), 0);
        assert_eq!(l.next_deadline(), None);
        l.poll(9000);
        assert!(irr_empty(&l));
        // Re-armed later: only the new deadline counts.
        l.set_tsc_deadline(10_000, 9000);
        l.set_tsc_deadline(12_000, 9500);
        l.poll(11_000);
        assert!(irr_empty(&l));
        l.poll(12_000);
        assert_eq!(service(&mut l), Some(0xEF));
        l.poll(100_000);
        assert_eq!(service(&mut l), None);
        // Masked: it expires (and clears) but raises nothing.
        l.mmio_write(reg::LVT_TIMER, MASKED | TSC_DEADLINE | 0xEF, 100_000);
        l.set_tsc_deadline(100_200, 100_100);
        assert_eq!(l.next_deadline(), None);
        assert_eq!(l.tsc_deadline(100_150), 100_200);
        assert_eq!(l.tsc_deadline(100_250), 0);
        assert!(irr_empty(&l));
    }

    #[test]
    fn tsc_deadline_msr_is_inert_in_other_modes() {
        let mut l = one_shot(DIV1, 0, 0);
        l.set_tsc_deadline(500, 0);
        assert_eq!(l.tsc_deadline(0), 0);
        assert_eq!(l.next_deadline(), None);
        l.poll(1000);
        assert!(irr_empty(&l));
    }

    #[test]
    fn switching_to_or_from_tsc_deadline_disarms() {
        let mut l = one_shot(DIV1, 1000, 0);
        l.mmio_write(reg::LVT_TIMER, TSC_DEADLINE | 0x30, 100);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 100), 0);
        assert_eq!(l.mmio_read(reg::TIMER_INITIAL, 100), 0);
        assert_eq!(l.next_deadline(), None);
        l.poll(2000);
        assert!(irr_empty(&l));
        l.set_tsc_deadline(5000, 2000);
        assert_eq!(l.next_deadline(), Some(5000));
        l.mmio_write(reg::LVT_TIMER, ONESHOT | 0x30, 2100);
        assert_eq!(l.tsc_deadline(2100), 0);
        assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 2100), 0);
        l.mmio_write(reg::LVT_TIMER, TSC_DEADLINE | 0x30, 2200);
        assert_eq!(l.tsc_deadline(2200), 0, "the old deadline is gone");
        l.poll(6000);
        assert!(irr_empty(&l));
        // The reserved timer mode 11b stops the counter.
        let mut l = one_shot(DIV1, 1000, 0);
        l.mmio_write(reg::LVT_TIMER, (3 << 17) | 0x30, 10);
        assert_eq!(l.next_deadline(), None);
        l.poll(2000);
        assert!(irr_empty(&l));
    }

    #[test]
    fn x2apic_register_faults() {
        let mut l = enabled(1);
        assert_eq!(
            l.msr_read(msr(reg::ID), 0),
            Err(Fault),
            "not in x2APIC mode"
        );
        assert_eq!(l.msr_write(msr(reg::TPR), 0, 0), Err(Fault));
        let mut l = x2(1);
        let readable = [
            0x802, 0x803, 0x808, 0x80A, 0x80D, 0x80F, 0x828, 0x830, 0x832, 0x833, 0x834, 0x835,
            0x836, 0x837, 0x838, 0x839, 0x83E,
        ];
        for m in 0x800..=0x8FF {
            let ok = readable.contains(&m) || (0x810..=0x827).contains(&m);
            assert_eq!(l.msr_read(m, 0).is_ok(), ok, "read {m:#x}");
        }
        for m in [0x7FF, 0x900] {
            assert_eq!(l.msr_read(m, 0), Err(Fault));
        }
        // Read-only registers.
        for m in [
            0x802, 0x803, 0x80A, 0x80D, 0x810, 0x817, 0x818, 0x820, 0x827, 0x839,
        ] {
            assert_eq!(l.msr_write(m, 0, 0), Err(Fault), "write {m:#x}");
        }
        // Not x2APIC registers: APR, RRD, DFR, ICR2, CMCI, gaps.
        for m in [
            0x800, 0x801, 0x804, 0x809, 0x80C, 0x80E, 0x829, 0x82F, 0x831, 0x83A, 0x83D, 0x840,
            0x8FF,
        ] {
            assert_eq!(l.msr_write(m, 0, 0), Err(Fault), "write {m:#x}");
        }
        // EOI and ESR take only 0.
        assert_eq!(l.msr_write(0x80B, 1, 0), Err(Fault));
        assert_eq!(l.msr_write(0x80B, 0, 0), Ok(()));
        assert_eq!(l.msr_write(0x828, 1, 0), Err(Fault));
        assert_eq!(l.msr_write(0x828, 0, 0), Ok(()));
        // Reserved bits (11.12.1.3).
        let cases: [(u32, u64, bool); 22] = [
            (0x808, 0xFF, true),
            (0x808, 0x100, false),
            (0x808, 1 << 32, false),
            (0x80F, 0x3FF, true),
            (0x80F, 0x1000, false), // no EOI-broadcast suppression
            (0x832, 0x7_00FF, true),
            (0x832, 0x1000, true), // delivery status: read-only, ignored
            (0x832, 0x100, false), // the timer has no delivery mode
            (0x835, 0x1_A7FF, true),
            (0x835, 0x800, false),
            (0x837, 0x700, false),
            (0x838, 0xFFFF_FFFF, true),
            (0x838, 1 << 32, false),
            (0x83E, 0xB, true),
            (0x83E, 0x4, false),
            (0x83F, 0xFF, true),
            (0x83F, 0x100, false),
            (
                0x830,
                0xFFFF_FFFF << 32 | u64::from(BUSY | ALLBUT | 0x40),
                true,
            ),
            (0x830, 1 << 13, false),
            (0x830, 1 << 16, false),
            (0x830, 1 << 17, false),
            (0x830, 1 << 20, false),
        ];
        for (m, v, ok) in cases {
            assert_eq!(l.msr_write(m, v, 0).is_ok(), ok, "write {m:#x} = {v:#x}");
        }
        // WRMSR ignores ICR bit 12.
        assert_eq!(
            l.msr_read(0x830, 0),
            Ok(0xFFFF_FFFF << 32 | u64::from(ALLBUT | 0x40))
        );
        // The last timer LVT write set only the read-only bit 12.
        assert_eq!(l.msr_read(0x832, 0), Ok(0));
    }

    /// kvm-unit-tests x86/msr.c, `__test_x2apic_msrs`, with its semantics
    /// table (lib/x86/apic.h) for an APIC without CMCI.
    #[test]
    fn kvm_unit_tests_msr_x2apic_sweep() {
        fn semantics(off: u32) -> (bool, bool) {
            match off {
                reg::ID | reg::VERSION | reg::PPR | reg::LDR | reg::TIMER_CURRENT => (true, false),
                0x100..=0x270 => (true, false),
                reg::TPR
                | reg::SVR
                | reg::ESR
                | reg::ICR
                | reg::TIMER_INITIAL
                | reg::TIMER_DIVIDE => (true, true),
                0x320..=0x370 => (true, true),
                reg::EOI | reg::SELF_IPI => (false, true),
                _ => (false, false),
            }
        }
        for enabled_x2 in [false, true] {
            let mut l = if enabled_x2 { x2(0) } else { enabled(0) };
            for off in (0..0x1000).step_by(16) {
                let m = msr(off);
                let (r, w) = if enabled_x2 {
                    semantics(off)
                } else {
                    (false, false)
                };
                if !w {
                    assert_eq!(l.msr_write(m, 0, 0), Err(Fault), "{m:#x}");
                }
                if !r {
                    assert_eq!(l.msr_read(m, 0), Err(Fault), "{m:#x}");
                }
                if !enabled_x2 || off != reg::ICR {
                    assert_eq!(l.msr_write(m, u64::MAX, 0), Err(Fault), "{m:#x} all ones");
                }
                if off == reg::SELF_IPI {
                    for v in [0x100, 0xFF00, 0xFF00_0000] {
                        assert_eq!(l.msr_write(m, v, 0), Err(Fault));
                    }
                }
                match (r, w) {
                    (true, true) => {
                        let orig = l.msr_read(m, 0).unwrap();
                        l.msr_write(m, orig, 0).unwrap();
                        assert_eq!(l.msr_read(m, 0), Ok(orig), "{m:#x}");
                    }
                    (false, true) => l.msr_write(m, 0, 0).unwrap(),
                    (true, false) => assert_eq!(l.msr_read(m, 0).unwrap() >> 32, 0, "{m:#x}"),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn x2apic_id_and_ldr_are_read_only() {
        let mut l = enabled(0x1F);
        l.mmio_write(reg::ID, 0x42 << 24, 0);
        assert_eq!(l.apic_id(), 0x42);
        l.set_apic_base(XAPIC_BASE | BSP | EN | EXTD, MAXPHY)
            .unwrap();
        // The x2APIC ID is the initial ID, not what xAPIC software wrote.
        assert_eq!(l.msr_read(msr(reg::ID), 0), Ok(0x1F));
        assert_eq!(l.apic_id(), 0x1F);
        assert_eq!(l.msr_write(msr(reg::ID), 0x20, 0), Err(Fault));
        assert_eq!(l.msr_read(msr(reg::LDR), 0), Ok(0x0001_8000));
        assert_eq!(l.msr_write(msr(reg::LDR), 0, 0), Err(Fault));
        assert_eq!(l.msr_read(msr(reg::VERSION), 0), Ok(0x0005_0014));
    }

    #[test]
    fn apic_base_transitions() {
        // kvm-unit-tests x86/apic.c test_enable_x2apic, in its order.
        let mut l = enabled(0);
        let base = XAPIC_BASE | BSP;
        l.set_apic_base(base | EN | EXTD, MAXPHY).unwrap();
        assert_eq!(l.mode(), Mode::X2Apic);
        assert_eq!(
            l.set_apic_base(base | EXTD, MAXPHY),
            Err(Fault),
            "x2APIC -> invalid"
        );
        assert_eq!(
            l.set_apic_base(base | EN, MAXPHY),
            Err(Fault),
            "x2APIC -> xAPIC"
        );
        assert_eq!(
            l.apic_base(),
            base | EN | EXTD,
            "a refused write changes nothing"
        );
        l.set_apic_base(base, MAXPHY).unwrap();
        assert_eq!(l.mode(), Mode::Disabled);
        assert_eq!(
            l.set_apic_base(base | EXTD, MAXPHY),
            Err(Fault),
            "disabled -> invalid"
        );
        assert_eq!(
            l.set_apic_base(base | EN | EXTD, MAXPHY),
            Err(Fault),
            "disabled -> x2APIC"
        );
        l.set_apic_base(base | EN, MAXPHY).unwrap();
        assert_eq!(l.mode(), Mode::XApic);
        assert_eq!(
            l.set_apic_base(base | EXTD, MAXPHY),
            Err(Fault),
            "xAPIC -> invalid"
        );
        // Reserved bits: 0-7, 9, MAXPHYADDR and up.
        for b in [0, 7, 9, u32::from(MAXPHY), 63] {
            assert_eq!(
                l.set_apic_base(base | EN | 1 << b, MAXPHY),
                Err(Fault),
                "bit {b}"
            );
        }
        assert_eq!(l.apic_base(), 0xFEE0_0900);
        l.set_apic_base(base | EN | 1 << (MAXPHY - 1), MAXPHY)
            .unwrap();
        assert_eq!(l.apic_base(), base | EN | 1 << (MAXPHY - 1));
        // The BSP flag is read/write.
        l.set_apic_base(XAPIC_BASE | EN, MAXPHY).unwrap();
        assert_eq!(l.apic_base(), 0xFEE0_0800);
        // Without x2APIC in CPUID, EXTD is reserved.
        let mut l = enabled(0);
        l.set_x2apic_supported(false);
        assert_eq!(l.set_apic_base(EN | EXTD, MAXPHY), Err(Fault));
        assert_eq!(l.set_apic_base(base | EN | EXTD, MAXPHY), Err(Fault));
        assert_eq!(l.mode(), Mode::XApic);
    }

    #[test]
    fn disabling_resets_to_the_power_up_state() {
        for via_x2apic in [false, true] {
            let mut l = enabled(2);
            l.mmio_write(reg::ID, 9 << 24, 0);
            l.mmio_write(reg::TPR, 0x20, 0);
            l.mmio_write(reg::LDR, 0x10 << 24, 0);
            l.mmio_write(reg::DFR, 0, 0);
            l.mmio_write(reg::TIMER_DIVIDE, 0x3, 0);
            l.mmio_write(reg::LVT_TIMER, 0x30, 0);
            l.mmio_write(reg::TIMER_INITIAL, 1000, 0);
            l.mmio_write(reg::ICR2, 2 << 24, 0);
            l.mmio_write(reg::ICR, 0x40, 0);
            l.set_irq(0x50);
            l.ack_interrupt(0x50);
            l.set_irq(3);
            l.mmio_write(reg::ESR, 0, 0);
            l.set_irq(4);
            l.mmio_write(reg::ICR, SELF | DM_NMI, 0);
            if via_x2apic {
                l.set_apic_base(XAPIC_BASE | BSP | EN | EXTD, MAXPHY)
                    .unwrap();
            }
            l.set_apic_base(XAPIC_BASE | BSP, MAXPHY).unwrap();
            assert_eq!(l.mode(), Mode::Disabled);
            assert_eq!(l.apic_base(), 0xFEE0_0100);
            assert!(!l.take_nmi());
            assert_eq!(l.pending_interrupt(), None);
            assert_eq!(l.next_deadline(), None);
            l.set_irq(0x60);
            l.poll(1_000_000);
            l.set_apic_base(XAPIC_BASE | BSP | EN, MAXPHY).unwrap();
            assert_eq!(l.mmio_read(reg::ID, 0), 2 << 24);
            assert_eq!(l.mmio_read(reg::SVR, 0), 0xFF);
            assert_eq!(l.mmio_read(reg::DFR, 0), 0xFFFF_FFFF);
            for off in (reg::LVT_TIMER..=reg::LVT_ERROR).step_by(16) {
                assert_eq!(l.mmio_read(off, 0), MASKED);
            }
            for off in [
                reg::TPR,
                reg::LDR,
                reg::TIMER_DIVIDE,
                reg::TIMER_INITIAL,
                reg::TIMER_CURRENT,
                reg::ICR,
                reg::ICR2,
                reg::ESR,
            ] {
                assert_eq!(l.mmio_read(off, 0), 0, "{off:#x}");
            }
            for i in 0..8 {
                assert_eq!(
                    l.mmio_read(reg::IRR + 16 * i, 0) | l.mmio_read(reg::ISR + 16 * i, 0),
                    0
                );
            }
            l.mmio_write(reg::ESR, 0, 0);
            assert_eq!(l.mmio_read(reg::ESR, 0), 0, "pending errors are gone too");
        }
    }

    #[test]
    fn mmio_page_is_absent_when_disabled_or_in_x2apic_mode() {
        // kvm-unit-tests verify_disabled_apic_mmio.
        let mut disabled = enabled(0);
        disabled.set_apic_base(XAPIC_BASE | BSP, MAXPHY).unwrap();
        for mut l in [disabled, x2(0)] {
            let mode = l.mode();
            l.set_cr8(0);
            for off in (0..0x1000).step_by(4) {
                l.mmio_write(off, 0xFFFF_FFFF, 0);
            }
            assert_eq!(l.mmio_read(reg::VERSION, 0), !0);
            assert_eq!(l.mmio_read(reg::TPR, 0), !0);
            assert_eq!(l.cr8(), 0, "{mode:?}: the writes reached nothing");
            l.set_cr8(0xF);
            assert_eq!(l.cr8(), 0xF);
            assert_eq!(l.mmio_read(reg::TPR, 0), !0);
            assert_eq!(l.mode(), mode);
        }
    }

    /// kvm-unit-tests x86/apic.flat as the "xapic" entry of unittests.cfg
    /// runs it (one CPU, x2APIC hidden, TSC deadline shown): its start-up
    /// code, then the checks of main() that one CPU can pass, with the
    /// results the test expects.
    #[test]
    fn kvm_unit_tests_apic_xapic_run() {
        let mut l = Lapic::new(0);
        l.set_x2apic_supported(false);
        let mut now = 1_000u64;
        let mut tick = |by: u64| {
            now += by;
            now
        };
        // Start-up (x86/cstart64.S): reset_apic, enable_apic, save_id,
        // bringup_aps' INIT and SIPI broadcasts.
        let reset_apic = |l: &mut Lapic, now: u64| {
            let b = l.apic_base();
            l.set_apic_base(b & !(EN | EXTD), MAXPHY).unwrap();
            l.set_apic_base(l.apic_base() | EN, MAXPHY).unwrap();
            l.mmio_write(reg::SVR, 0x1FF, now);
        };
        reset_apic(&mut l, tick(1));
        l.mmio_write(reg::SVR, 0x1FF, tick(1));
        assert_eq!(l.mmio_read(reg::ID, tick(1)) >> 24, 0);
        for icr in [ALLBUT | DM_INIT | ASSERT, ALLBUT | DM_SIPI] {
            while l.mmio_read(reg::ICR, tick(1)) & BUSY != 0 {}
            l.mmio_write(reg::ICR2, 0, tick(1));
            l.mmio_write(reg::ICR, icr, tick(1));
        }
        // main(): "APIC should be fully enabled by startup code."
        assert!(l.apic_base() & EN != 0 && l.mmio_read(reg::SVR, tick(1)) & 0x100 != 0);
        let spiv = l.mmio_read(reg::SVR, tick(1));
        let between_tests = |l: &mut Lapic, now: u64| {
            reset_apic(l, now);
            l.mmio_write(reg::SVR, spiv, now);
        };

        // test_lapic_existence
        let version = l.mmio_read(reg::VERSION, tick(1)) as u8;
        assert!((0x10..=0x15).contains(&version), "apic existence");
        between_tests(&mut l, tick(1));

        // test_apic_disable
        let lvr = l.mmio_read(reg::VERSION, tick(1));
        let cr8 = l.cr8();
        l.set_apic_base(l.apic_base() & !(EN | EXTD), MAXPHY)
            .unwrap();
        assert_eq!(l.apic_base() & EN, 0, "Local apic disabled");
        for off in (0..0x1000).step_by(4) {
            l.mmio_write(off, 0xFFFF_FFFF, tick(1));
        }
        assert_eq!(l.mmio_read(reg::VERSION, tick(1)), !0);
        assert_eq!(l.cr8(), cr8);
        l.set_cr8(cr8 ^ 0xF);
        assert_eq!(l.cr8(), cr8 ^ 0xF);
        assert_eq!(l.mmio_read(reg::TPR, tick(1)), !0);
        l.set_cr8(cr8);
        reset_apic(&mut l, tick(1));
        assert_eq!(
            l.apic_base() & (EN | EXTD),
            EN,
            "Local apic enabled in xAPIC mode"
        );
        assert_eq!(l.mmio_read(reg::VERSION, tick(1)), lvr);
        assert_eq!(l.mmio_read(reg::TPR, tick(1)), u32::from(cr8));
        l.set_cr8(cr8 ^ 0xF);
        assert_eq!(l.mmio_read(reg::TPR, tick(1)), u32::from(cr8 ^ 0xF) << 4);
        l.set_cr8(cr8);
        between_tests(&mut l, tick(1));

        // test_enable_x2apic without x2APIC: "enable unsupported x2apic".
        assert_eq!(l.set_apic_base(EN | EXTD, MAXPHY), Err(Fault));
        between_tests(&mut l, tick(1));

        // test_self_ipi_xapic
        reset_apic(&mut l, tick(1));
        l.mmio_write(reg::ICR2, 0, tick(1));
        l.mmio_write(reg::ICR, SELF | 0xF1, tick(1));
        assert_eq!(service(&mut l), Some(0xF1), "self ipi");
        assert_eq!(service(&mut l), None);
        between_tests(&mut l, tick(1));

        // test_physical_broadcast: one CPU must see each broadcast once.
        assert_eq!(ipi(&mut l, ASSERT | 0xCF, 0xFF), Some(0xCF));
        assert_eq!(service(&mut l), None);
        l.mmio_write(reg::ICR2, 0, tick(1));
        l.mmio_write(reg::ICR, ASSERT | ALLINC | 0xCF, tick(1));
        assert_eq!(service(&mut l), Some(0xCF), "physical broadcast shorthand");
        between_tests(&mut l, tick(1));

        // test_pending_nmi: an NMI, and ten more sent from its handler,
        // make two NMIs.
        l.mmio_write(reg::ICR2, 0, tick(1));
        l.mmio_write(reg::ICR, DM_NMI, tick(1));
        let mut received = 0;
        while l.take_nmi() {
            received += 1;
            if received == 1 {
                for _ in 0..10 {
                    l.mmio_write(reg::ICR, DM_NMI, tick(1));
                }
            }
        }
        assert_eq!(received, 2, "pending nmi");
        between_tests(&mut l, tick(1));

        // test_apic_timer_one_shot
        l.mmio_write(reg::LVT_TIMER, ONESHOT | 0xEE, tick(1));
        l.mmio_write(reg::TIMER_DIVIDE, 0xB, tick(1));
        let tsc1 = tick(1);
        l.mmio_write(reg::TIMER_INITIAL, 0x10000, tsc1);
        let mut count = 0;
        let tsc2 = loop {
            let t = tick(0x1000);
            l.poll(t);
            if service(&mut l) == Some(0xEE) {
                count += 1;
                break t;
            }
        };
        assert!(
            count == 1 && tsc2 - tsc1 >= 0x10000,
            "APIC LVT timer one shot"
        );

        // test_apic_change_mode (TMCCT is read in a busy loop; `tick`
        // stands for the time each read takes).
        let tmict = 0x99_9999u32;
        let change_mode = |l: &mut Lapic, mode: u32, now: u64| {
            let lvtt = l.mmio_read(reg::LVT_TIMER, now);
            l.mmio_write(reg::LVT_TIMER, (lvtt & !(3 << 17)) | mode, now);
            assert_eq!(l.mmio_read(reg::LVT_TIMER, now) & (3 << 17), mode);
        };
        let step = 0x1_0000;
        l.mmio_write(reg::TIMER_INITIAL, tmict, tick(1));
        change_mode(&mut l, PERIODIC, tick(1));
        assert_eq!(
            l.mmio_read(reg::TIMER_INITIAL, tick(1)),
            tmict,
            "TMICT value reset"
        );
        change_mode(&mut l, ONESHOT, tick(1));
        l.mmio_write(reg::TIMER_INITIAL, tmict, tick(1));
        assert_ne!(l.mmio_read(reg::TIMER_CURRENT, tick(1)), 0);
        while l.mmio_read(reg::TIMER_CURRENT, tick(step)) != 0 {}
        assert_eq!(
            l.mmio_read(reg::TIMER_CURRENT, tick(1)),
            0,
            "TMCCT should have reached 0"
        );
        l.mmio_write(reg::TIMER_INITIAL, tmict, tick(1));
        while l.mmio_read(reg::TIMER_CURRENT, tick(step)) > tmict / 2 {}
        change_mode(&mut l, PERIODIC, tick(1));
        let c = l.mmio_read(reg::TIMER_CURRENT, tick(1));
        assert!(
            c != 0 && c < tmict / 2,
            "TMCCT should not be reset to TMICT value"
        );
        let mut c = l.mmio_read(reg::TIMER_CURRENT, tick(step));
        while c <= tmict / 2 && c > 0 {
            c = l.mmio_read(reg::TIMER_CURRENT, tick(step));
        }
        assert!(
            l.mmio_read(reg::TIMER_CURRENT, tick(1)) > tmict / 2,
            "TMCCT should be reset to the initial-count"
        );
        while l.mmio_read(reg::TIMER_CURRENT, tick(step)) > tmict / 2 {}
        change_mode(&mut l, ONESHOT, tick(1));
        assert!(
            l.mmio_read(reg::TIMER_CURRENT, tick(1)) < tmict / 2,
            "TMCCT should not be reset to init"
        );
        while l.mmio_read(reg::TIMER_CURRENT, tick(step)) != 0 {}
        change_mode(&mut l, PERIODIC, tick(1));
        assert_eq!(
            l.mmio_read(reg::TIMER_CURRENT, tick(1)),
            0,
            "TMCCT should stay at zero"
        );
        while service(&mut l).is_some() {}

        // test_tsc_deadline_timer: a deadline of "now" has fired by the
        // next instruction, and the MSR reads 0.
        l.mmio_write(reg::LVT_TIMER, TSC_DEADLINE | 0xEF, tick(1));
        let t = tick(1);
        l.set_tsc_deadline(t, t);
        assert_eq!(service(&mut l), Some(0xEF), "tsc deadline timer");
        assert_eq!(l.tsc_deadline(tick(1)), 0, "tsc deadline timer clearing");
        between_tests(&mut l, tick(1));

        // test_apicbase
        let orig = l.apic_base();
        let lvr = l.mmio_read(reg::VERSION, tick(1));
        l.set_apic_base(orig & !(EN | EXTD), MAXPHY).unwrap();
        l.set_apic_base(0xFED4_0000 | BSP | EN, MAXPHY).unwrap();
        assert_eq!(l.apic_base(), 0xFED4_0900);
        assert_eq!(l.mmio_read(reg::VERSION, tick(1)), lvr, "relocate apic");
        assert_eq!(
            l.set_apic_base(orig | 1 << MAXPHY, MAXPHY),
            Err(Fault),
            "reserved physaddr bits"
        );
        assert_eq!(
            l.set_apic_base(orig | 1, MAXPHY),
            Err(Fault),
            "reserved low bits"
        );
        l.set_apic_base(orig, MAXPHY).unwrap();
        assert_eq!(l.apic_base(), 0xFEE0_0900);
        assert_eq!(l.inits_ignored() + l.sipis_ignored(), 2);
    }

    /// The same test as the "x2apic" entry runs it: start-up ends with
    /// enable_x2apic, and the x2APIC parts of main()'s checks.
    #[test]
    fn kvm_unit_tests_apic_x2apic_run() {
        let mut l = Lapic::new(0);
        l.set_apic_base(0xFEE0_0100, MAXPHY).unwrap();
        l.set_apic_base(0xFEE0_0900, MAXPHY).unwrap();
        l.mmio_write(reg::SVR, 0x1FF, 0);
        let b = l.apic_base();
        l.set_apic_base(b | EXTD, MAXPHY).unwrap();
        assert_eq!(l.apic_base() & (EN | EXTD), EN | EXTD);
        let spiv = l.msr_read(msr(reg::SVR), 0).unwrap();
        assert_eq!(spiv & 0x100, 0x100);
        let version = l.msr_read(msr(reg::VERSION), 0).unwrap() as u8;
        assert!((0x10..=0x15).contains(&version));
        // test_apic_disable, x2APIC half: the page reads all ones.
        assert_eq!(l.mmio_read(reg::VERSION, 0), !0);
        // test_enable_x2apic
        let apicbase = l.apic_base() & !(EN | EXTD);
        assert!(l.set_apic_base(apicbase | EXTD, MAXPHY).is_err());
        assert!(l.set_apic_base(apicbase | EN, MAXPHY).is_err());
        assert!(l.set_apic_base(apicbase, MAXPHY).is_ok());
        assert!(l.set_apic_base(apicbase | EXTD, MAXPHY).is_err());
        assert!(l.set_apic_base(apicbase | EN | EXTD, MAXPHY).is_err());
        assert!(l.set_apic_base(apicbase | EN, MAXPHY).is_ok());
        assert!(l.set_apic_base(apicbase | EXTD, MAXPHY).is_err());
        // Between tests: enable_x2apic, SPIV restored.
        l.set_apic_base(apicbase | EN | EXTD, MAXPHY).unwrap();
        l.msr_write(msr(reg::SVR), spiv, 0).unwrap();
        // test_self_ipi_x2apic: the 64-bit ICR with the ID in bits 63:32.
        l.msr_write(msr(reg::ICR), u64::from(SELF | 0xF1), 0)
            .unwrap();
        assert_eq!(service(&mut l), Some(0xF1));
        assert_eq!(service(&mut l), None);
        // test_physical_broadcast with the x2APIC broadcast ID.
        assert_eq!(ipi_x2(&mut l, ASSERT | 0xCF, 0xFFFF_FFFF), Some(0xCF));
        assert_eq!(ipi_x2(&mut l, ASSERT | ALLINC | 0xCF, 0), Some(0xCF));
        // vmexit.c tscdeadline: rdtsc()+3000 fires 3000 ticks later.
        l.msr_write(msr(reg::LVT_TIMER), u64::from(TSC_DEADLINE | 0xEF), 10)
            .unwrap();
        l.set_tsc_deadline(10 + 3000, 10);
        assert_eq!(l.next_deadline(), Some(3010));
        l.poll(3009);
        assert_eq!(service(&mut l), None);
        l.poll(3010);
        assert_eq!(service(&mut l), Some(0xEF));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Mmio(u32, u32, bool),
        Msr(u32, u64, bool),
        Base(u64),
        Deadline(u64),
        Irq(u8),
        Ack,
        Tpr(u8),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..0x1010, any::<u32>(), any::<bool>()).prop_map(|(o, v, w)| Op::Mmio(
                o & !3,
                v,
                w
            )),
            (0x7F0u32..0x910, any::<u64>(), any::<bool>()).prop_map(|(m, v, w)| Op::Msr(m, v, w)),
            (0x7F0u32..0x840, (0u64..0x200), any::<bool>()).prop_map(|(m, v, w)| Op::Msr(m, v, w)),
            prop_oneof![
                Just(0xFEE0_0900u64),
                Just(0xFEE0_0D00),
                Just(0xFEE0_0100),
                any::<u64>()
            ]
            .prop_map(Op::Base),
            any::<u64>().prop_map(Op::Deadline),
            any::<u8>().prop_map(Op::Irq),
            Just(Op::Ack),
            any::<u8>().prop_map(Op::Tpr),
            prop_oneof![
                0u64..1000,
                any::<u32>().prop_map(u64::from),
                Just(u64::MAX / 2)
            ]
            .prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Whatever a guest does: no panic, vectors 0-15 never reach the
        /// IRR or ISR, and what is offered beats PPR.
        #[test]
        fn hostile_guest(ops in proptest::collection::vec(op(), 1..200)) {
            let mut l = enabled(0);
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Mmio(o, v, true) => l.mmio_write(o, v, now),
                    Op::Mmio(o, _, false) => { l.mmio_read(o, now); }
                    Op::Msr(m, v, true) => { let _ = l.msr_write(m, v, now); }
                    Op::Msr(m, _, false) => { let _ = l.msr_read(m, now); }
                    Op::Base(v) => { let _ = l.set_apic_base(v, MAXPHY); }
                    Op::Deadline(v) => l.set_tsc_deadline(v, now),
                    Op::Irq(v) => l.set_irq(v),
                    Op::Ack => if let Some(v) = l.pending_interrupt() { l.ack_interrupt(v) },
                    Op::Tpr(t) => l.set_tpr(t),
                    Op::Advance(d) => { now = now.saturating_add(d); l.poll(now); }
                }
                prop_assert_eq!(l.irr[0] & 0xFFFF, 0);
                prop_assert_eq!(l.isr[0] & 0xFFFF, 0);
                if let Some(v) = l.pending_interrupt() {
                    prop_assert!(v >> 4 > l.ppr() >> 4);
                    prop_assert!(l.is_enabled());
                }
                if let Some(d) = l.next_deadline() {
                    prop_assert!(l.mode() != Mode::Disabled);
                    let _ = d;
                }
            }
        }
    }
}

//! The PC's Intel 8254 programmable interval timer at 0x40-0x43 (channels
//! 0, 1, 2 and the mode/command register), and port 0x61, "NMI status and
//! control", whose bits 0 and 5 are channel 2's gate and OUT.
//!
//! Per channel, as in the 8254 datasheet: the six modes (0 interrupt on
//! terminal count, 1 hardware retriggerable one-shot, 2 rate generator,
//! 3 square wave, 4 software and 5 hardware triggered strobe), the LSB,
//! MSB and LSB-then-MSB access modes with their separate read and write
//! byte flip-flops, the counter latch command, the read-back command
//! (count and/or status, with OUT and NULL COUNT), the one CLK pulse a
//! new count takes to load, a count rewritten in mode 2 or 3 taking
//! effect at the end of the current period or half-period, and the gate:
//! channels 0 and 1 have theirs tied high as on a PC, channel 2's is bit
//! 0 of port 0x61. The mode register is write-only and reads 0xff.
//!
//! Time: the 8254 has no clock of its own here. Its CLK is the PC's
//! 1 193 182 Hz ([`PIT_HZ`]) derived from the guest TSC and the TSC rate
//! given to [`Pit::new`]: CLK pulse `p` happens at the first TSC tick
//! `now` with `now * PIT_HZ / tsc_hz >= p` (128-bit arithmetic, so a count
//! loaded at any TSC value keeps to its grid for ever). A channel's state
//! is a closed form of the pulses since its count was loaded, evaluated
//! when asked; nothing is stepped. Every call that takes `now` first
//! brings the channels up to it, so what a guest reads is current.
//! Channel 0's OUT is ISA IRQ 0, edge-triggered at the 8259A: [`Pit::poll`]
//! says whether it rose since the last poll (one edge however many
//! periods went by, as the 8259A's IRR holds one request), and
//! [`Pit::next_deadline`] when it next will. So a mode 0 count N
//! interrupts N + 1 pulses after its write, mode 2 every N pulses from
//! then, mode 4 at the end of its one-pulse strobe, N + 2 pulses after.
//!
//! Choices, where the datasheet leaves room or a PC is more than needed:
//! - At power-on the 8254's state is undefined; here each channel is as
//!   after control word "mode 3, LSB then MSB, binary" (what a PC BIOS
//!   leaves) with no count written: OUT high, count 0. No BIOS ran, so
//!   channel 0 is not running at 18.2 Hz: an unprogrammed PIT raises no
//!   IRQ 0, and the first mode 2 control word (OUT high) raises none
//!   either. A control word that takes OUT from low to high does.
//! - BCD counting is not implemented: the BCD bit is kept (and read back
//!   in the status byte) but every count is binary. Linux never sets it.
//! - Between a count's write and the CLK pulse that loads it the count
//!   reads as the new count (the datasheet: undefined).
//! - Gate low in modes 0 and 4 freezes the count and OUT; gate high
//!   resumes them (a count written while the gate is low is loaded when
//!   it rises, one pulse later than on the part).
//! - Counts of 1 in modes 2 and 3 (illegal in the datasheet) keep OUT high
//!   and raise no edge.
//! - Port 0x61: bit 0 (gate 2) and bit 1 (speaker data enable, no sound)
//!   are kept; bit 4 (the refresh request toggle, every 15 us on a PC)
//!   flips at every read; bit 5 is channel 2's OUT; the NMI bits read 0.

/// The 8254's input clock: the PC's 14.31818 MHz crystal divided by 12.
pub const PIT_HZ: u64 = 1_193_182;
/// Channel 0's counter port; channels 1 and 2 follow.
pub const CHANNEL0: u16 = 0x40;
/// The mode/command register (write-only).
pub const MODE: u16 = 0x43;
/// NMI status and control ("port B").
pub const PORT_B: u16 = 0x61;
/// The ISA IRQ channel 0's OUT drives.
pub const IRQ: u8 = 0;

/// Port 0x61 bits.
pub mod port_b {
    pub const GATE2: u8 = 1 << 0;
    pub const SPEAKER: u8 = 1 << 1;
    pub const REFRESH: u8 = 1 << 4;
    pub const OUT2: u8 = 1 << 5;
}

/// The control word's read-back command (SC = 11) bits.
const READ_BACK: u8 = 0xc0;
const READ_BACK_NO_COUNT: u8 = 1 << 5;
const READ_BACK_NO_STATUS: u8 = 1 << 4;

/// Status byte bits (read-back); bits 5:0 are the control word's.
const STATUS_OUT: u8 = 1 << 7;
const STATUS_NULL_COUNT: u8 = 1 << 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Lsb,
    Msb,
    /// LSB then MSB.
    Word,
}

/// A count being counted: channel state as a closed form of `t`, the CLK
/// pulses since `start` (the pulse count when the count was written or
/// the gate triggered). Pulse `t = 1` loads the count.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u64,
    /// The count, 1 to 65536 (a written 0).
    n: u64,
    /// Mode 3: where in its period (high half first) pulse 1 lies: 0, or
    /// the high half's length for a run that begins with the low half.
    phase: u64,
    /// OUT and the count before the loading pulse.
    out0: bool,
    count0: u16,
    /// Modes 0 and 4 with the gate low: frozen at this pulse.
    paused: Option<u64>,
}

impl Run {
    fn t(&self, pulse: u64) -> u64 {
        self.paused.map_or(pulse, |p| pulse.min(p)).saturating_sub(self.start)
    }

    /// Mode 3's high half (the longer one for an odd count).
    fn high_half(&self) -> u64 {
        self.n - self.n / 2
    }

    fn out(&self, mode: u8, t: u64) -> bool {
        if t == 0 {
            return self.out0;
        }
        let n = self.n;
        match mode {
            // Low from the control word (mode 0) or the trigger (mode 1)
            // until the count reaches 0.
            0 | 1 => t > n,
            // Low for the one pulse on which the count reaches 0.
            4 | 5 => t != n + 1,
            // Low for the pulse on which the count is 1.
            2 => n == 1 || (t - 1) % n != n - 1,
            _ => (t - 1 + self.phase) % n < self.high_half(),
        }
    }

    fn count(&self, mode: u8, t: u64) -> u16 {
        if t == 0 {
            return self.count0;
        }
        let n = self.n;
        match mode {
            // After reaching 0 the count goes on down from 0xffff.
            0 | 1 | 4 | 5 => ((n + 0x10000 - (t - 1) % 0x10000) % 0x10000) as u16,
            2 => (n - (t - 1) % n) as u16,
            _ => {
                // Down by two from the count (an odd one less one) in each
                // half.
                let k = (t - 1 + self.phase) % n;
                let into_half = if k < self.high_half() { k } else { k - self.high_half() };
                ((n & !1) - 2 * into_half) as u16
            }
        }
    }

    /// The smallest `t >= lo` with `t = residue` modulo n.
    fn next_congruent(&self, lo: u64, residue: u64) -> u64 {
        lo + (residue + self.n - lo % self.n) % self.n
    }

    /// The first pulse after `pulse` at which OUT rises.
    fn first_rise_after(&self, mode: u8, pulse: u64) -> Option<u64> {
        if self.paused.is_some() {
            return None;
        }
        let ta = pulse.saturating_sub(self.start);
        if ta == 0 && !self.out0 && self.out(mode, 1) {
            return Some(self.start + 1);
        }
        let lo = (ta + 1).max(2);
        let t = match mode {
            0 | 1 => self.n + 1,
            4 | 5 => self.n + 2,
            _ if self.n < 2 => return None,
            // Each period begins high (k = 0).
            _ => self.next_congruent(lo, (1 + self.n - self.phase) % self.n),
        };
        (t >= lo).then(|| self.start.saturating_add(t))
    }

    /// Modes 2 and 3: the first pulse after `pulse` that reloads the count
    /// (mode 2: the end of a period; mode 3: of a half).
    fn next_reload_after(&self, mode: u8, pulse: u64) -> u64 {
        let lo = (pulse.saturating_sub(self.start) + 1).max(2);
        let t = if mode == 2 {
            self.next_congruent(lo, 1 % self.n)
        } else {
            let high = self.next_congruent(lo, (1 + self.n - self.phase) % self.n);
            let low = self.next_congruent(lo, (1 + self.high_half() + self.n - self.phase) % self.n);
            high.min(low)
        };
        self.start.saturating_add(t)
    }
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Not counting: waiting for a count (after a control word) or for a
    /// trigger (modes 1 and 5; modes 2 and 3 with the gate low).
    Idle { out: bool, count: u16 },
    Running(Run),
}

#[derive(Clone, Copy, Debug)]
struct Channel {
    /// Bits 5:0 of the last control word (RW, M, BCD), as the status byte
    /// reports them.
    control: u8,
    mode: u8,
    access: Access,
    /// The count register as last written (0 is 65536).
    count_register: u16,
    /// A count was written since the last control word.
    has_count: bool,
    /// LSB-then-MSB writes: the LSB, waiting for its MSB.
    lsb: Option<u8>,
    /// LSB-then-MSB reads: the next byte read is the MSB.
    read_msb: bool,
    latched: Option<u16>,
    status: Option<u8>,
    /// The count register holds a count not yet loaded ...
    null_count: bool,
    /// ... which it will be at this pulse.
    loads_at: Option<u64>,
    gate: bool,
    state: State,
    /// Modes 2 and 3: a count written while counting, loaded at this
    /// pulse (the end of the current period or half).
    reload_at: Option<u64>,
    /// The pulses this channel has been brought up to.
    last: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            control: 0x36,
            mode: 3,
            access: Access::Word,
            count_register: 0,
            has_count: false,
            lsb: None,
            read_msb: false,
            latched: None,
            status: None,
            null_count: false,
            loads_at: None,
            gate,
            state: State::Idle { out: true, count: 0 },
            reload_at: None,
            last: 0,
        }
    }

    fn out(&self) -> bool {
        match self.state {
            State::Idle { out, .. } => out,
            State::Running(r) => r.out(self.mode, r.t(self.last)),
        }
    }

    fn count(&self) -> u16 {
        match self.state {
            State::Idle { count, .. } => count,
            State::Running(r) => r.count(self.mode, r.t(self.last)),
        }
    }

    fn status_byte(&self) -> u8 {
        let mut s = self.control;
        if self.out() {
            s |= STATUS_OUT;
        }
        if self.null_count {
            s |= STATUS_NULL_COUNT;
        }
        s
    }

    fn rises_in(&self, after: u64, upto: u64) -> bool {
        match self.state {
            State::Running(r) => r.first_rise_after(self.mode, after).is_some_and(|p| p <= upto),
            State::Idle { .. } => false,
        }
    }

    /// Brings the channel up to pulse `p`; whether OUT rose on the way.
    fn advance(&mut self, p: u64) -> bool {
        if p <= self.last {
            return false;
        }
        let mut rose = false;
        if let Some(r) = self.reload_at.filter(|&r| r <= p) {
            rose |= self.rises_in(self.last, r - 1);
            self.last = r - 1;
            self.reload(r);
        }
        rose |= self.rises_in(self.last, p);
        self.last = p;
        if self.loads_at.is_some_and(|l| l <= p) {
            self.null_count = false;
            self.loads_at = None;
        }
        rose
    }

    /// The pulse at which OUT next rises.
    fn next_rise(&self) -> Option<u64> {
        let State::Running(run) = self.state else { return None };
        let first = run.first_rise_after(self.mode, self.last);
        match self.reload_at {
            Some(r) if first.is_none_or(|f| f >= r) => {
                let mut after = *self;
                after.last = r - 1;
                after.reload(r);
                after.next_rise()
            }
            _ => first,
        }
    }

    /// Modes 2 and 3 at pulse `r` (with `last` = r - 1): the count
    /// register goes into the counting element, continuing the waveform.
    fn reload(&mut self, r: u64) {
        self.reload_at = None;
        let State::Running(old) = self.state else { return };
        let n = count_of(self.count_register);
        let begins_low = self.mode == 3 && !old.out(3, old.t(r));
        let phase = if begins_low { n - n / 2 } else { 0 };
        self.state = State::Running(Run {
            start: r - 1,
            n,
            phase,
            out0: self.out(),
            count0: self.count(),
            paused: None,
        });
    }

    /// Counting from the count register, loaded on the next pulse.
    fn start(&mut self, out0: bool) {
        let frozen = !self.gate && matches!(self.mode, 0 | 4);
        self.state = State::Running(Run {
            start: self.last,
            n: count_of(self.count_register),
            phase: 0,
            out0,
            count0: self.count_register,
            paused: frozen.then_some(self.last),
        });
        self.reload_at = None;
        self.loads_at = Some(self.last + 1);
    }

    /// A control word for this channel (not a latch command); whether OUT
    /// rose (modes 1-5 set it high at once).
    fn set_control(&mut self, v: u8) -> bool {
        let (was, count) = (self.out(), self.count());
        self.control = v & 0x3f;
        self.mode = match (v >> 1) & 7 {
            m @ 0..=5 => m,
            m => m & 3, // 110 and 111 are modes 2 and 3
        };
        self.access = match (v >> 4) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        };
        self.has_count = false;
        self.lsb = None;
        self.read_msb = false;
        self.latched = None;
        self.status = None;
        self.null_count = true;
        self.loads_at = None;
        self.reload_at = None;
        let out = self.mode != 0;
        self.state = State::Idle { out, count };
        !was && out
    }

    fn write_count(&mut self, v: u8) {
        let value = match self.access {
            Access::Lsb => u16::from(v),
            Access::Msb => u16::from(v) << 8,
            Access::Word => match self.lsb.take() {
                Some(lsb) => u16::from_le_bytes([lsb, v]),
                None => {
                    self.lsb = Some(v);
                    if self.mode == 0 {
                        // Mode 0: the first byte stops the count and sets
                        // OUT low at once.
                        self.state = State::Idle { out: false, count: self.count() };
                    }
                    return;
                }
            },
        };
        self.count_register = value;
        self.has_count = true;
        self.null_count = true;
        match self.mode {
            0 => self.start(false),
            // Mode 4 restarts from the new count; OUT is as it was.
            4 => self.start(self.out()),
            // The count waits for the next trigger.
            1 | 5 => self.loads_at = None,
            _ => match self.state {
                // Counting: the current period (mode 2) or half (mode 3)
                // runs out first.
                State::Running(run) => {
                    let r = *self.reload_at.get_or_insert(run.next_reload_after(self.mode, self.last));
                    self.loads_at = Some(r);
                }
                State::Idle { .. } if self.gate => self.start(true),
                State::Idle { .. } => self.loads_at = None,
            },
        }
    }

    fn set_gate(&mut self, high: bool) {
        if high == self.gate {
            return;
        }
        self.gate = high;
        match (self.mode, high, &mut self.state) {
            (0 | 4, false, State::Running(r)) => {
                r.paused.get_or_insert(self.last);
            }
            (0 | 4, true, State::Running(r)) => {
                if let Some(q) = r.paused.take() {
                    r.start += self.last - q;
                }
            }
            // A rising gate triggers modes 1 and 5 (and retriggers them).
            (1 | 5, true, _) if self.has_count => self.start(self.out()),
            // Modes 2 and 3: gate low stops the count and sets OUT high;
            // gate high starts over from the count register.
            (2 | 3, false, State::Running(_)) => {
                self.state = State::Idle { out: true, count: self.count() };
                self.reload_at = None;
            }
            (2 | 3, true, _) if self.has_count => self.start(true),
            _ => {}
        }
    }

    fn latch(&mut self) {
        // A second latch before the first is read is ignored.
        if self.latched.is_none() {
            self.latched = Some(self.count());
        }
    }

    fn latch_status(&mut self) {
        if self.status.is_none() {
            self.status = Some(self.status_byte());
        }
    }

    fn read(&mut self) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        let [lsb, msb] = self.latched.unwrap_or_else(|| self.count()).to_le_bytes();
        let (byte, done) = match self.access {
            Access::Lsb => (lsb, true),
            Access::Msb => (msb, true),
            Access::Word => {
                self.read_msb = !self.read_msb;
                if self.read_msb {
                    (lsb, false)
                } else {
                    (msb, true)
                }
            }
        };
        if done {
            self.latched = None;
        }
        byte
    }
}

/// A count register value as a count: 0 is 65536 (binary).
fn count_of(cr: u16) -> u64 {
    if cr == 0 {
        0x10000
    } else {
        u64::from(cr)
    }
}

/// The timer and port 0x61.
#[derive(Clone, Debug)]
pub struct Pit {
    tsc_hz: u64,
    channels: [Channel; 3],
    speaker: bool,
    refresh: bool,
    /// Channel 0's OUT rose since the last [`Pit::poll`].
    irq0_edge: bool,
    /// The CLK pulses so far (never goes back).
    pulses: u64,
}

impl Pit {
    /// A PIT whose guest's TSC runs at `tsc_hz` (0 is taken as 1).
    pub fn new(tsc_hz: u64) -> Self {
        Pit {
            tsc_hz: tsc_hz.max(1),
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            speaker: false,
            refresh: false,
            irq0_edge: false,
            pulses: 0,
        }
    }

    /// Whether `port` is 0x40-0x43 or 0x61.
    pub fn claims(port: u16) -> bool {
        matches!(port, 0x40..=0x43 | PORT_B)
    }

    /// The CLK pulses up to guest TSC `now`.
    fn pulses_at(&self, now: u64) -> u64 {
        let p = u128::from(now) * u128::from(PIT_HZ) / u128::from(self.tsc_hz);
        u64::try_from(p).unwrap_or(u64::MAX)
    }

    /// The guest TSC of CLK pulse `p`.
    fn tsc_of(&self, p: u64) -> u64 {
        let tsc = (u128::from(p) * u128::from(self.tsc_hz)).div_ceil(u128::from(PIT_HZ));
        u64::try_from(tsc).unwrap_or(u64::MAX)
    }

    fn advance(&mut self, now: u64) {
        self.pulses = self.pulses.max(self.pulses_at(now));
        let p = self.pulses;
        let [c0, c1, c2] = &mut self.channels;
        if c0.advance(p) {
            self.irq0_edge = true;
        }
        c1.advance(p);
        c2.advance(p);
    }

    /// A guest IN of one byte at guest TSC `now`.
    pub fn read(&mut self, port: u16, now: u64) -> u8 {
        self.advance(now);
        match port {
            0x40..=0x42 => self.channels[usize::from(port - CHANNEL0)].read(),
            PORT_B => {
                self.refresh = !self.refresh;
                let c2 = &self.channels[2];
                let mut v = 0;
                for (bit, on) in [(port_b::GATE2, c2.gate), (port_b::SPEAKER, self.speaker), (port_b::REFRESH, self.refresh), (port_b::OUT2, c2.out())] {
                    if on {
                        v |= bit;
                    }
                }
                v
            }
            // The mode register is write-only.
            _ => 0xff,
        }
    }

    /// A guest OUT of one byte at guest TSC `now`.
    pub fn write(&mut self, port: u16, value: u8, now: u64) {
        self.advance(now);
        match port {
            0x40..=0x42 => self.channels[usize::from(port - CHANNEL0)].write_count(value),
            MODE => self.write_mode(value),
            PORT_B => {
                self.speaker = value & port_b::SPEAKER != 0;
                self.channels[2].set_gate(value & port_b::GATE2 != 0);
            }
            _ => {}
        }
    }

    fn write_mode(&mut self, v: u8) {
        if v & READ_BACK == READ_BACK {
            for (i, c) in self.channels.iter_mut().enumerate() {
                if v & (2 << i) == 0 {
                    continue;
                }
                // Datasheet: if both are latched, status is read first.
                if v & READ_BACK_NO_COUNT == 0 {
                    c.latch();
                }
                if v & READ_BACK_NO_STATUS == 0 {
                    c.latch_status();
                }
            }
            return;
        }
        let c = &mut self.channels[usize::from(v >> 6)];
        if v & 0x30 == 0 {
            c.latch();
        } else if c.set_control(v) && v >> 6 == 0 {
            self.irq0_edge = true;
        }
    }

    /// Brings the timer up to guest TSC `now`; whether channel 0's OUT
    /// (IRQ 0) rose since the last poll. However many times it did, this
    /// is one edge.
    pub fn poll(&mut self, now: u64) -> bool {
        self.advance(now);
        core::mem::take(&mut self.irq0_edge)
    }

    /// The guest TSC at which channel 0's OUT next rises (the next IRQ 0),
    /// `None` if it never will unless reprogrammed. It may lie in the
    /// past (an edge not yet polled): then it is due now.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.irq0_edge {
            return Some(self.tsc_of(self.pulses));
        }
        self.channels[0].next_rise().map(|p| self.tsc_of(p))
    }

    /// Channel `channel`'s OUT at guest TSC `now`.
    pub fn out(&mut self, channel: usize, now: u64) -> bool {
        self.advance(now);
        self.channels[channel].out()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest whose every port access costs `step` TSC ticks.
    struct Guest {
        pit: Pit,
        now: u64,
        step: u64,
    }

    impl Guest {
        fn new(tsc_hz: u64, step: u64) -> Self {
            Guest { pit: Pit::new(tsc_hz), now: 0, step }
        }

        fn outb(&mut self, v: u8, port: u16) {
            self.now += self.step;
            self.pit.write(port, v, self.now);
        }

        fn inb(&mut self, port: u16) -> u8 {
            self.now += self.step;
            self.pit.read(port, self.now)
        }

        fn get_cycles(&self) -> u64 {
            self.now
        }
    }

    /// A PIT whose TSC is its CLK: `now` counts pulses.
    fn pulse_pit() -> Pit {
        Pit::new(PIT_HZ)
    }

    /// `next_deadline` against the OUT pin itself: at every pulse, the
    /// deadline is the first later pulse at which channel 0's OUT rises,
    /// found by stepping a copy, in every periodic and one-shot mode, with
    /// odd and even counts, and with a count rewritten mid-period (which
    /// modes 2 and 3 take at the next reload).
    #[test]
    fn next_deadline_is_the_next_rise_of_out0() {
        for control in [0x30u8, 0x34, 0x36, 0x38] {
            for count in [1u16, 2, 3, 5, 7, 10] {
                for rewrite in [None, Some((3u64, 4u16)), Some((8, 9)), Some((5, 2))] {
                    let mut pit = pulse_pit();
                    program(&mut pit, 0, control, count);
                    for t in 0..60u64 {
                        if let Some((at, c)) = rewrite {
                            if t == at {
                                pit.write(CHANNEL0, c as u8, t);
                                pit.write(CHANNEL0, (c >> 8) as u8, t);
                            }
                        }
                        pit.poll(t);
                        let mut probe = pit.clone();
                        let mut was = probe.out(0, t);
                        let rise = (t + 1..t + 200).find(|&u| {
                            let now = probe.out(0, u);
                            let rose = now && !was;
                            was = now;
                            rose
                        });
                        let what = format!("control {control:#x} count {count} rewrite {rewrite:?} at {t}");
                        match rise {
                            Some(u) => assert_eq!(pit.next_deadline(), Some(u), "{what}"),
                            None => assert!(pit.next_deadline().is_none_or(|d| d >= t + 200), "{what}"),
                        }
                    }
                }
            }
        }
    }

    fn program(pit: &mut Pit, now: u64, control: u8, count: u16) {
        let port = CHANNEL0 + u16::from(control >> 6);
        pit.write(MODE, control, now);
        match (control >> 4) & 3 {
            1 => pit.write(port, count as u8, now),
            2 => pit.write(port, (count >> 8) as u8, now),
            _ => {
                pit.write(port, count as u8, now);
                pit.write(port, (count >> 8) as u8, now);
            }
        }
    }

    /// Latch (counter latch command) and read channel `ch`, word access.
    fn latched_count(pit: &mut Pit, ch: u8, now: u64) -> u16 {
        pit.write(MODE, ch << 6, now);
        let port = CHANNEL0 + u16::from(ch);
        u16::from_le_bytes([pit.read(port, now), pit.read(port, now)])
    }

    /// OUT of channel `ch` at pulses `from..to`.
    fn outs(pit: &mut Pit, ch: usize, from: u64, to: u64) -> Vec<bool> {
        (from..to).map(|t| pit.out(ch, t)).collect()
    }

    /// The pulses in `from..=to` at which `poll` (called at every pulse)
    /// reports an IRQ 0 edge.
    fn edges(pit: &mut Pit, from: u64, to: u64) -> Vec<u64> {
        (from..=to).filter(|&t| pit.poll(t)).collect()
    }

    // ---- Linux 6.1 arch/x86/kernel/tsc.c ------------------------------

    /// pit_verify_msb: ignore the LSB, compare the MSB.
    fn pit_verify_msb(g: &mut Guest, val: u8) -> bool {
        g.inb(0x42);
        g.inb(0x42) == val
    }

    /// pit_expect_msb: (success, tsc at the last matching read, delta).
    fn pit_expect_msb(g: &mut Guest, val: u8) -> (bool, u64, u64) {
        let (mut tsc, mut prev_tsc) = (0, 0);
        let mut count = 0;
        while count < 50000 {
            if !pit_verify_msb(g, val) {
                break;
            }
            prev_tsc = tsc;
            tsc = g.get_cycles();
            count += 1;
        }
        (count > 5, tsc, g.get_cycles() - prev_tsc)
    }

    /// quick_pit_calibrate: the TSC rate in kHz, or 0 if it failed; and
    /// the number of MSB steps seen.
    fn quick_pit_calibrate(g: &mut Guest) -> (u64, u64) {
        const MAX_QUICK_PIT_ITERATIONS: u64 = 50 * PIT_HZ / 1000 / 256;
        let b = g.inb(0x61);
        g.outb((b & !0x02) | 0x01, 0x61);
        g.outb(0xb0, 0x43);
        g.outb(0xff, 0x42);
        g.outb(0xff, 0x42);
        pit_verify_msb(g, 0);
        let (ok, tsc, d1) = pit_expect_msb(g, 0xff);
        if !ok {
            return (0, 0);
        }
        for i in 1..=MAX_QUICK_PIT_ITERATIONS {
            let (ok, t, d2) = pit_expect_msb(g, (0xff - i) as u8);
            if !ok {
                return (0, i);
            }
            let delta = t - tsc;
            if i == 1 && d1 + d2 >= (delta * MAX_QUICK_PIT_ITERATIONS) >> 11 {
                return (0, i);
            }
            if d1 + d2 >= delta >> 11 {
                continue;
            }
            if !pit_verify_msb(g, (0xfe - i) as u8) {
                return (0, i);
            }
            return (delta * PIT_HZ / (i * 256 * 1000), i);
        }
        (0, MAX_QUICK_PIT_ITERATIONS)
    }

    /// pit_calibrate_tsc(latch, ms, loopmin): TSC ticks per ms, or
    /// u64::MAX; and the loop count.
    fn pit_calibrate_tsc(g: &mut Guest, latch: u16, ms: u64, loopmin: u64) -> (u64, u64) {
        let b = g.inb(0x61);
        g.outb((b & !0x02) | 0x01, 0x61);
        g.outb(0xb0, 0x43);
        g.outb(latch as u8, 0x42);
        g.outb((latch >> 8) as u8, 0x42);
        let (t1, mut tsc) = (g.get_cycles(), g.get_cycles());
        let mut t2 = t1;
        let (mut pitcnt, mut tscmin, mut tscmax) = (0, u64::MAX, 0);
        while g.inb(0x61) & 0x20 == 0 {
            t2 = g.get_cycles();
            let delta = t2 - tsc;
            tsc = t2;
            tscmin = tscmin.min(delta);
            tscmax = tscmax.max(delta);
            pitcnt += 1;
            assert!(pitcnt < 10_000_000, "OUT 2 never went high");
        }
        if pitcnt < loopmin || tscmax > 10 * tscmin {
            return (u64::MAX, pitcnt);
        }
        ((t2 - t1) / ms, pitcnt)
    }

    #[test]
    fn linux_quick_pit_calibrate_finds_the_tsc_rate() {
        // 2.5 GHz, a port access (a VM exit) costs 1.2 us.
        let mut g = Guest::new(2_500_000_000, 3000);
        let (khz, steps) = quick_pit_calibrate(&mut g);
        assert!(khz.abs_diff(2_500_000) <= 2_500_000 / 2000, "{khz} kHz: within 500 ppm");
        assert!(steps > 10, "the MSB fell step by step ({steps})");
        assert_eq!(g.inb(0x61) & 0x03, 0x01, "gate 2 high, speaker off");
    }

    #[test]
    fn linux_quick_pit_calibrate_gives_up_with_slow_exits_and_pit_calibrate_tsc_works() {
        // A 5 us exit: the error of the last reads (about 8 of them) stays
        // above 1/2048 of the 233 steps it may wait, so Linux gives up at
        // the first step, as on hardware with slow port I/O, and uses
        // pit_calibrate_tsc (native_calibrate_cpu_early).
        let mut g = Guest::new(1_000_000_000, 5_000);
        assert_eq!(quick_pit_calibrate(&mut g), (0, 1));
        let (per_ms, loops) = pit_calibrate_tsc(&mut g, 11931, 10, 1000);
        assert!(loops >= 1000, "{loops}");
        assert!(per_ms.abs_diff(1_000_000) < 1_000, "{per_ms} TSC ticks per ms");
    }

    #[test]
    fn channel_2_msb_falls_by_one_every_256_pulses() {
        let mut pit = pulse_pit();
        pit.write(PORT_B, 0x01, 0);
        program(&mut pit, 10, 0xb0, 0xffff);
        // Pulse 11 loads 0xffff; the count reaches 0xfeff at pulse 267.
        let msb = |pit: &mut Pit, t: u64| {
            pit.read(0x42, t);
            pit.read(0x42, t)
        };
        assert_eq!(msb(&mut pit, 11), 0xff);
        assert_eq!(msb(&mut pit, 266), 0xff, "0xff00");
        assert_eq!(msb(&mut pit, 267), 0xfe, "0xfeff");
        assert_eq!(msb(&mut pit, 267 + 255), 0xfe);
        assert_eq!(msb(&mut pit, 267 + 256), 0xfd);
        assert_eq!(msb(&mut pit, 267 + 256 * 100), 0xfe - 100);
    }

    #[test]
    fn linux_pit_calibrate_tsc_waits_for_out_2() {
        // CAL_LATCH = PIT_TICK_RATE / (1000 / CAL_MS), 10 ms, 1000 loops;
        // then the 50 ms pass.
        for (latch, ms, loopmin) in [(11931, 10, 1000), (59659, 50, 5000)] {
            let mut g = Guest::new(3_000_000_000, 4500);
            let (per_ms, loops) = pit_calibrate_tsc(&mut g, latch, ms, loopmin);
            assert!(loops >= loopmin, "{loops} reads");
            // latch + 1 pulses of 1/1193182 s, over ms: the TSC ticks per ms.
            let expect = (u64::from(latch) + 1) * 3_000_000_000 / PIT_HZ / ms;
            assert!(per_ms.abs_diff(expect) <= 2 * 4500 / ms + 1, "{per_ms} vs {expect}");
            assert!(per_ms.abs_diff(3_000_000) < 3_000_000 / 1000, "within 0.1% of 3 GHz");
        }
    }

    #[test]
    fn mode_0_out_rises_at_terminal_count_and_stays_high() {
        let mut pit = pulse_pit();
        pit.write(PORT_B, 0x01, 0);
        program(&mut pit, 100, 0xb0, 5);
        // Written at pulse 100, loaded at 101, 0 at 106 (N + 1 pulses).
        let counts: Vec<u16> = (100..=108).map(|t| latched_count(&mut pit, 2, t)).collect();
        assert_eq!(counts, [5, 5, 4, 3, 2, 1, 0, 0xffff, 0xfffe]);
        let mut pit = pulse_pit();
        pit.write(PORT_B, 0x01, 0);
        program(&mut pit, 100, 0xb0, 5);
        assert_eq!(outs(&mut pit, 2, 100, 110), [false, false, false, false, false, false, true, true, true, true]);
        assert_eq!(pit.read(PORT_B, 106 + 70000) & port_b::OUT2, port_b::OUT2, "high until reprogrammed, past the wrap");
        pit.write(MODE, 0xb0, 200_000);
        assert_eq!(pit.read(PORT_B, 200_000) & port_b::OUT2, 0, "a mode 0 control word sets OUT low");
    }

    #[test]
    fn mode_0_on_channel_0_is_one_irq_edge() {
        let mut pit = pulse_pit();
        program(&mut pit, 50, 0x30, 1000);
        assert_eq!(pit.next_deadline(), Some(1051));
        assert_eq!(edges(&mut pit, 50, 5000), [1051]);
        assert_eq!(pit.next_deadline(), None);
        assert!(!pit.poll(1 << 40), "no edge on the wrap");
    }

    #[test]
    fn mode_0_two_byte_write_stops_the_count_at_the_first_byte() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x30, 10);
        assert!(pit.out(0, 20));
        assert!(pit.poll(20), "the first count ran out at 11");
        pit.write(0x40, 0x05, 30);
        assert!(!pit.out(0, 30), "first byte: OUT low at once");
        assert_eq!(latched_count(&mut pit, 0, 35), latched_count(&mut pit, 0, 31), "not counting");
        pit.write(0x40, 0x00, 40);
        assert_eq!(pit.next_deadline(), Some(46));
    }

    #[test]
    fn mode_2_rate_generator() {
        let mut pit = pulse_pit();
        program(&mut pit, 1000, 0x34, 4);
        // Loaded at 1001: 4 3 2 1 4 3 2 1; OUT low while 1.
        let counts: Vec<u16> = (1001..1009).map(|t| latched_count(&mut pit, 0, t)).collect();
        assert_eq!(counts, [4, 3, 2, 1, 4, 3, 2, 1]);
        let mut pit = pulse_pit();
        program(&mut pit, 1000, 0x34, 4);
        assert_eq!(outs(&mut pit, 0, 1000, 1010), [true, true, true, true, false, true, true, true, false, true]);
        let mut pit = pulse_pit();
        program(&mut pit, 1000, 0x34, 4);
        assert_eq!(pit.next_deadline(), Some(1005));
        assert_eq!(edges(&mut pit, 1000, 1020), [1005, 1009, 1013, 1017]);
        assert_eq!(pit.next_deadline(), Some(1021));
    }

    #[test]
    fn mode_3_square_wave_even_and_odd() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x36, 6);
        assert_eq!(outs(&mut pit, 0, 1, 13), [true, true, true, false, false, false, true, true, true, false, false, false]);
        let counts: Vec<u16> = (1..8).map(|t| latched_count(&mut pit, 0, t + 100)).collect();
        // (at 101..107: k = 100..106 mod 6 = 4 5 0 1 2 3 4)
        assert_eq!(counts, [4, 2, 6, 4, 2, 6, 4]);
        // Odd: high (N + 1) / 2, low (N - 1) / 2; the count is N - 1,
        // down by two, and reaches 0 at the end of the high half.
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x36, 5);
        assert_eq!(outs(&mut pit, 0, 1, 11), [true, true, true, false, false, true, true, true, false, false]);
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x36, 5);
        let counts: Vec<u16> = (1..11).map(|t| latched_count(&mut pit, 0, t)).collect();
        assert_eq!(counts, [4, 2, 0, 4, 2, 4, 2, 0, 4, 2]);
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x36, 5);
        assert_eq!(edges(&mut pit, 0, 20), [6, 11, 16]);
    }

    #[test]
    fn mode_4_strobe_and_linux_oneshot() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x38, 3);
        // Loaded at 1, 0 at 4: OUT low for that one pulse.
        assert_eq!(outs(&mut pit, 0, 0, 8), [true, true, true, true, false, true, true, true]);
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x38, 3);
        assert_eq!(pit.next_deadline(), Some(5));
        assert_eq!(edges(&mut pit, 0, 100_000), [5], "one strobe, not periodic");
        // Linux's pit_next_event: a new count restarts it.
        pit.write(0x40, 100, 200_000);
        pit.write(0x40, 0, 200_000);
        assert_eq!(pit.next_deadline(), Some(200_102));
        assert_eq!(edges(&mut pit, 200_000, 300_000), [200_102]);
    }

    #[test]
    fn many_periods_keep_to_the_grid() {
        // HZ = 250: LATCH = (1193182 + 125) / 250 = 4773.
        let tsc_hz = 2_400_000_000;
        let mut pit = Pit::new(tsc_hz);
        let t0 = 123_456_789;
        program(&mut pit, t0, 0x34, 4773);
        let p0 = pit.pulses_at(t0);
        // Poll every millisecond for 100 s: one edge per period.
        let ms = tsc_hz / 1000;
        let n = (1..=100_000).filter(|i| pit.poll(t0 + i * ms)).count() as u64;
        let periods = (pit.pulses_at(t0 + 100_000 * ms) - p0 - 1) / 4773;
        assert_eq!(n, periods);
        assert_eq!(n, 24_998, "100 s at 1193182 / 4773 Hz, less the loading pulse");
        // Follow the deadlines a million periods on: exactly on the grid.
        let mut last = 0;
        for _ in 0..1_000_000 {
            let d = pit.next_deadline().unwrap();
            assert!(!pit.poll(d - 1));
            assert!(pit.poll(d));
            last = d;
        }
        let pulse = p0 + 1 + (n + 1_000_000) * 4773;
        assert_eq!(last, pit.tsc_of(pulse));
        assert_eq!(pit.pulses_at(last), pulse);
        assert_eq!(pit.pulses_at(last - 1), pulse - 1);
    }

    #[test]
    fn missed_periods_are_one_edge() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x34, 100);
        assert!(pit.poll(10_000 * 100 + 50));
        assert!(!pit.poll(10_000 * 100 + 60));
        assert_eq!(pit.next_deadline(), Some(10_001 * 100 + 1));
    }

    #[test]
    fn large_tsc_values() {
        let tsc_hz = 3_000_000_000;
        let mut pit = Pit::new(tsc_hz);
        let t0 = 1 << 62;
        program(&mut pit, t0, 0x34, 1193);
        let d = pit.next_deadline().unwrap();
        assert!(d > t0 && d - t0 <= 1194 * tsc_hz / PIT_HZ + 1, "{}", d - t0);
        assert!(pit.poll(d));
        let d2 = pit.next_deadline().unwrap();
        assert_eq!(pit.pulses_at(d2) - pit.pulses_at(d), 1193);
    }

    #[test]
    fn linux_clockevent_periodic_oneshot_shutdown() {
        // drivers/clocksource/i8253.c, with outb_p's port 0x80 delays
        // left out.
        let mut pit = pulse_pit();
        // pit_set_periodic: 0x34, LATCH LSB, MSB.
        pit.write(MODE, 0x34, 10);
        pit.write(0x40, (4773 & 0xff) as u8, 11);
        pit.write(0x40, (4773 >> 8) as u8, 12);
        assert_eq!(edges(&mut pit, 12, 13 + 3 * 4773), [13 + 4773, 13 + 2 * 4773, 13 + 3 * 4773]);
        // i8253 clocksource read: latch, LSB, MSB, never above LATCH.
        for t in [20_000, 20_001, 23_000, 24_000] {
            let c = latched_count(&mut pit, 0, t);
            assert!((1..=4773).contains(&c));
            assert_eq!(c, (4773 - (t - 13) % 4773) as u16);
        }
        assert!(pit.poll(30_000));
        // pit_shutdown: 0x30, 0, 0: mode 0 with 65536, one edge 65537
        // pulses later, then none.
        pit.write(MODE, 0x30, 30_000);
        pit.write(0x40, 0, 30_000);
        pit.write(0x40, 0, 30_000);
        assert_eq!(pit.next_deadline(), Some(30_000 + 65_537));
        assert_eq!(edges(&mut pit, 30_000, 30_000 + 500_000), [30_000 + 65_537]);
        // pit_set_oneshot + pit_next_event(1000).
        pit.write(MODE, 0x38, 600_000);
        assert!(!pit.poll(600_000), "OUT was high since the shutdown count ran out: no edge");
        pit.write(0x40, 0xe8, 600_001);
        pit.write(0x40, 0x03, 600_001);
        assert_eq!(edges(&mut pit, 600_001, 700_000), [600_001 + 1002]);
    }

    #[test]
    fn a_control_word_that_sets_out_high_is_an_edge() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x30, 1000);
        assert!(!pit.poll(10));
        pit.write(MODE, 0x34, 20);
        assert!(pit.poll(20), "mode 0 OUT low -> mode 2 OUT high");
        pit.write(MODE, 0x34, 30);
        assert!(!pit.poll(30), "already high");
    }

    #[test]
    fn counter_latch_holds_until_read() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x34, 1000);
        pit.write(MODE, 0x00, 100);
        pit.write(MODE, 0x00, 300); // ignored: the first is unread
        assert_eq!(pit.read(0x40, 500), (901 & 0xff) as u8);
        assert_eq!(pit.read(0x40, 700), (901 >> 8) as u8);
        // Unlatched: live, LSB and MSB from their own moments.
        assert_eq!(pit.read(0x40, 800), ((1000 - 799) & 0xff) as u8);
        assert_eq!(pit.read(0x40, 801), 0);
        // The latch of a byte-access channel is one read.
        program(&mut pit, 1000, 0x50, 0x3412); // channel 1, LSB only: 0x12
        pit.write(MODE, 0x40, 1005);
        assert_eq!(pit.read(0x41, 1009), 0x12 - 4);
        assert_eq!(pit.read(0x41, 1009), 0x12 - 8);
    }

    #[test]
    fn access_modes() {
        let mut pit = pulse_pit();
        // Channel 1, MSB only, mode 2: count 0x1200.
        pit.write(MODE, 0x64, 0);
        pit.write(0x41, 0x12, 0);
        assert_eq!(pit.read(0x41, 1), 0x12);
        assert_eq!(pit.read(0x41, 0x101), 0x11);
        pit.write(MODE, 0x74, 0x200);
        assert_eq!(latched_count(&mut pit, 1, 0x300), 0x1001, "stopped at the control word, awaiting a count");
        // LSB then MSB, the datasheet's interleaving: read LSB, write LSB,
        // read MSB, write MSB; the read and write flip-flops are separate.
        assert_eq!(pit.read(0x41, 0x300), 0x01);
        pit.write(0x41, 0x34, 0x300);
        assert_eq!(pit.read(0x41, 0x300), 0x10);
        pit.write(0x41, 0x12, 0x300);
        assert_eq!(pit.read(0x41, 0x300), 0x34, "before the loading pulse: the new count");
        assert_eq!(pit.read(0x41, 0x301), 0x12, "MSB");
        assert_eq!(pit.read(0x41, 0x302), 0x33, "LSB, one pulse later");
    }

    #[test]
    fn read_back_status_and_count() {
        let mut pit = pulse_pit();
        pit.write(MODE, 0x34, 0);
        // Status only (0xe2): OUT high, null count, the control bits.
        pit.write(MODE, 0xe2, 0);
        assert_eq!(pit.read(0x40, 0), 0x80 | 0x40 | 0x34);
        pit.write(0x40, 10, 5);
        pit.write(0x40, 0, 5);
        pit.write(MODE, 0xe2, 5);
        assert_eq!(pit.read(0x40, 5), 0xc0 | 0x34, "written, not yet loaded");
        pit.write(MODE, 0xe2, 6);
        assert_eq!(pit.read(0x40, 6), 0x80 | 0x34, "loaded");
        // Count and status (0xc2) at 15: count 10 - 9 = 1, OUT low.
        pit.write(MODE, 0xc2, 15);
        assert_eq!(pit.read(0x40, 17), 0x34, "status first");
        assert_eq!(pit.read(0x40, 17), 1);
        assert_eq!(pit.read(0x40, 17), 0);
        // Several channels at once (0xce), count only (0xd2 = channel 0).
        program(&mut pit, 20, 0xb0, 0x1234);
        pit.write(MODE, 0xce, 30);
        pit.write(MODE, 0xd2, 40); // channel 0's count is latched: ignored
        assert_eq!(pit.read(0x40, 50), 0x80 | 0x34, "channel 0 status");
        assert_eq!(u16::from_le_bytes([pit.read(0x40, 50), pit.read(0x40, 50)]), 6);
        assert_eq!(pit.read(0x42, 60), 0x30, "channel 2: mode 0, gate low, OUT low, loaded");
        assert_eq!(u16::from_le_bytes([pit.read(0x42, 60), pit.read(0x42, 60)]), 0x1234, "gate low: not counting");
        // BCD is kept but counts are binary.
        pit.write(MODE, 0x35, 100);
        pit.write(0x40, 0x00, 100);
        pit.write(0x40, 0x01, 100);
        pit.write(MODE, 0xc2, 200);
        assert_eq!(pit.read(0x40, 200), 0x80 | 0x35);
        assert_eq!(u16::from_le_bytes([pit.read(0x40, 200), pit.read(0x40, 200)]), 256 - 99);
    }

    #[test]
    fn gate_pauses_mode_0_and_restarts_mode_2() {
        let mut pit = pulse_pit();
        pit.write(PORT_B, 0x01, 0);
        program(&mut pit, 0, 0xb0, 100);
        assert_eq!(latched_count(&mut pit, 2, 51), 50);
        pit.write(PORT_B, 0x00, 51);
        assert_eq!(latched_count(&mut pit, 2, 1000), 50, "gate low: frozen");
        pit.write(PORT_B, 0x01, 1000);
        assert_eq!(latched_count(&mut pit, 2, 1050), 0);
        assert_eq!(pit.read(PORT_B, 1050) & port_b::OUT2, port_b::OUT2);
        // Mode 2: gate low forces OUT high and stops; gate high reloads.
        program(&mut pit, 2000, 0xb4, 10);
        assert_eq!(latched_count(&mut pit, 2, 2010), 1);
        assert!(!pit.out(2, 2010));
        pit.write(PORT_B, 0x00, 2010);
        assert!(pit.out(2, 2010));
        assert_eq!(latched_count(&mut pit, 2, 3000), 1);
        pit.write(PORT_B, 0x01, 3000);
        assert_eq!(latched_count(&mut pit, 2, 3001), 10);
        assert_eq!(latched_count(&mut pit, 2, 3005), 6);
    }

    #[test]
    fn modes_1_and_5_wait_for_the_gate() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0xb2, 4); // mode 1
        assert!(pit.out(2, 100), "waiting for a trigger");
        assert_eq!(latched_count(&mut pit, 2, 100), 0);
        pit.write(PORT_B, 0x01, 100);
        assert_eq!(outs(&mut pit, 2, 100, 107), [true, false, false, false, false, true, true]);
        // Retriggered by the next rising edge.
        pit.write(PORT_B, 0x00, 200);
        pit.write(PORT_B, 0x01, 201);
        assert_eq!(outs(&mut pit, 2, 201, 207), [true, false, false, false, false, true]);
        // Mode 5: one pulse low N + 1 pulses after the trigger.
        program(&mut pit, 300, 0xba, 3);
        assert_eq!(outs(&mut pit, 2, 300, 320), vec![true; 20], "gate is already high: no trigger");
        pit.write(PORT_B, 0x00, 320);
        pit.write(PORT_B, 0x01, 321);
        assert_eq!(outs(&mut pit, 2, 321, 328), [true, true, true, true, false, true, true]);
    }

    #[test]
    fn a_new_count_in_mode_2_waits_for_the_end_of_the_period() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x34, 10);
        // Periods end (edges) at 11, 21, 31, ...; write 4 at pulse 15.
        pit.write(0x40, 4, 15);
        pit.write(0x40, 0, 15);
        assert_eq!(latched_count(&mut pit, 0, 16), 5, "the old count goes on");
        pit.write(MODE, 0xe2, 17);
        assert_eq!(pit.read(0x40, 17) & 0x40, 0x40, "null count until it is loaded");
        assert_eq!(pit.next_deadline(), Some(17), "the edge at 11 is not yet polled: due now");
        assert!(pit.poll(17));
        assert_eq!(pit.next_deadline(), Some(21));
        assert_eq!(edges(&mut pit, 15, 40), [21, 25, 29, 33, 37]);
        assert_eq!(latched_count(&mut pit, 0, 41), 4);
    }

    #[test]
    fn a_new_count_in_mode_3_waits_for_the_end_of_the_half() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x36, 8);
        // High 1-4, low 5-8, high 9-12; write 4 at 2: loaded at 5, into
        // the low half: low 5-6, high 7-8, low 9-10.
        pit.write(0x40, 4, 2);
        pit.write(0x40, 0, 2);
        assert_eq!(outs(&mut pit, 0, 1, 13), [true, true, true, true, false, false, true, true, false, false, true, true]);
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x36, 8);
        pit.write(0x40, 4, 2);
        pit.write(0x40, 0, 2);
        assert_eq!(edges(&mut pit, 2, 16), [7, 11, 15]);
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x36, 8);
        pit.write(0x40, 4, 2);
        pit.write(0x40, 0, 2);
        assert_eq!(pit.next_deadline(), Some(7));
    }

    #[test]
    fn count_0_is_65536() {
        let mut pit = pulse_pit();
        program(&mut pit, 0, 0x34, 0);
        assert_eq!(latched_count(&mut pit, 0, 1), 0);
        assert_eq!(latched_count(&mut pit, 0, 2), 0xffff);
        assert_eq!(pit.next_deadline(), Some(65_537));
        assert_eq!(edges(&mut pit, 0, 3 * 65_536 + 10), [65_537, 2 * 65_536 + 1, 3 * 65_536 + 1]);
    }

    #[test]
    fn port_b() {
        let mut pit = pulse_pit();
        // Power-on: OUT 2 high (mode 3, no count), gate low.
        assert_eq!(pit.read(PORT_B, 0), port_b::REFRESH | port_b::OUT2);
        assert_eq!(pit.read(PORT_B, 0), port_b::OUT2, "the refresh bit flips at every read");
        pit.write(PORT_B, 0xff, 0);
        assert_eq!(pit.read(PORT_B, 0) & !port_b::REFRESH, 0x23, "only gate and speaker are kept");
        pit.write(PORT_B, 0x02, 0);
        assert_eq!(pit.read(PORT_B, 0) & !port_b::REFRESH, 0x22);
        pit.write(MODE, 0xb0, 0);
        assert_eq!(pit.read(PORT_B, 0) & port_b::OUT2, 0, "mode 0: OUT 2 low");
        assert_eq!(pit.read(MODE, 0), 0xff, "the mode register is write-only");
    }

    #[test]
    fn unprogrammed_and_time_going_back() {
        let mut pit = Pit::new(2_000_000_000);
        assert_eq!(pit.next_deadline(), None);
        assert!(!pit.poll(1 << 50));
        program(&mut pit, 1 << 40, 0x34, 100);
        let d = pit.next_deadline().unwrap();
        assert!(!pit.poll(1 << 30), "an earlier now changes nothing");
        assert_eq!(pit.next_deadline(), Some(d));
        assert!(pit.poll(d));
        assert!(Pit::new(0).next_deadline().is_none(), "a TSC rate of 0 does not divide by zero");
    }
}

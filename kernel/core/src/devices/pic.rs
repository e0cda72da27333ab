//! The PC's pair of Intel 8259A interrupt controllers: the master at
//! 0x20/0x21 (IRQ 0-7), the slave at 0xa0/0xa1 (IRQ 8-15) cascaded on the
//! master's IR2, and the PIIX3 edge/level control registers (ELCR) at
//! 0x4d0/0x4d1.
//!
//! Per chip, as in the 8259A datasheet: the ICW1-ICW4 initialization
//! sequence (8086 mode only: ICW2 gives vector bits 7:3), OCW1 (the mask
//! register, read back at A0=1), OCW2 (non-specific, specific and
//! rotating EOIs, set priority, rotate in automatic-EOI mode), OCW3
//! (read IRR or ISR, poll, special mask mode), fully nested priority
//! with rotation, automatic EOI, special fully nested mode on the master.
//! Lines are edge-triggered unless ELCR (or ICW1 LTIM) makes them level.
//!
//! Simplifications, all invisible to a guest that follows the datasheet:
//! - At power-on the 8259A's state is undefined until ICW1; here it
//!   starts masked (IMR 0xff) and presents no interrupt until the master
//!   has been initialized, so an unprogrammed PIC cannot inject vector
//!   0-7. (Today's guests only write 0xff to both masks.)
//! - ICW1 clears IRR and ISR too (the datasheet lists only IMR, priority,
//!   special mask and the edge sense); a guest re-initializing mid-service
//!   is not left with a level in service forever.
//! - The slave's INT output reaches the master's IR2 as a level: the
//!   master's IRR bit 2 is "the slave has a request to present", so a
//!   second slave request after the first's acknowledge is not lost to
//!   a missing edge. Line 2 takes no other input (on the ISA bus that
//!   pin is IRQ 9).
//! - INTA is one call ([`Pic::ack`]); nothing can change between the
//!   interrupt and its acknowledge, so there are no spurious IRQ 7/15.

/// The master's command port (A0=0); data port (A0=1) is +1.
pub const MASTER: u16 = 0x20;
/// The slave's command port.
pub const SLAVE: u16 = 0xa0;
/// ELCR for IRQ 0-7; +1 for IRQ 8-15.
pub const ELCR: u16 = 0x4d0;
/// The master's input the slave is wired to.
pub const CASCADE_LINE: u8 = 2;

/// ELCR bits that can be set (PIIX3: IRQ 0, 1, 2, 8 and 13 are always
/// edge-triggered).
const ELCR_WRITABLE: [u8; 2] = [0xf8, 0xde];

const ICW1: u8 = 1 << 4;
const ICW1_IC4: u8 = 1 << 0;
const ICW1_SNGL: u8 = 1 << 1;
const ICW1_LTIM: u8 = 1 << 3;
const ICW4_AEOI: u8 = 1 << 1;
const ICW4_SFNM: u8 = 1 << 4;
const OCW3: u8 = 1 << 3;
const OCW3_RIS: u8 = 1 << 0;
const OCW3_RR: u8 = 1 << 1;
const OCW3_POLL: u8 = 1 << 2;
const OCW3_SMM: u8 = 1 << 5;
const OCW3_ESMM: u8 = 1 << 6;

/// The next word expected on the data port during initialization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

#[derive(Clone, Debug)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels last seen, for edge detection.
    level: u8,
    elcr: u8,
    icw1: u8,
    /// Vector bits 7:3 (ICW2).
    base: u8,
    icw3: u8,
    icw4: u8,
    init: Init,
    /// A complete ICW sequence has been seen.
    initialized: bool,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    rotate_in_aeoi: bool,
    /// The level with the lowest priority; the one after it is highest.
    lowest: u8,
}

impl Chip {
    fn new() -> Self {
        Chip {
            irr: 0,
            isr: 0,
            imr: 0xff,
            level: 0,
            elcr: 0,
            icw1: 0,
            base: 0,
            icw3: 0,
            icw4: 0,
            init: Init::Ready,
            initialized: false,
            read_isr: false,
            poll: false,
            special_mask: false,
            rotate_in_aeoi: false,
            lowest: 7,
        }
    }

    fn ready(&self) -> bool {
        self.initialized && self.init == Init::Ready
    }

    /// Level-triggered lines: ELCR's, or all of them with ICW1 LTIM.
    fn level_lines(&self) -> u8 {
        if self.icw1 & ICW1_LTIM != 0 {
            0xff
        } else {
            self.elcr
        }
    }

    /// 0 for the highest priority level, 7 for the lowest.
    fn rank(&self, line: u8) -> u8 {
        (line + 7 - self.lowest) % 8
    }

    /// The highest-priority level among `bits`.
    fn highest(&self, bits: u8) -> Option<u8> {
        (1..=8).map(|i| (self.lowest + i) % 8).find(|&l| bits & (1 << l) != 0)
    }

    /// The request this chip would present now (its INT output).
    fn deliverable(&self) -> Option<u8> {
        let req = self.highest(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            // Special mask mode: a masked level in service does not hold
            // off the others.
            in_service &= !self.imr;
        }
        match self.highest(in_service) {
            None => Some(req),
            Some(cur) if self.rank(req) < self.rank(cur) => Some(req),
            // Special fully nested (master): the slave's line may
            // interrupt while it is in service, the slave sorting out
            // priorities among its own.
            Some(cur) if cur == req && self.icw4 & ICW4_SFNM != 0 && self.cascades_on(req) => Some(req),
            Some(_) => None,
        }
    }

    /// Whether `line` has a slave (ICW3 of a master in cascade mode).
    fn cascades_on(&self, line: u8) -> bool {
        self.icw1 & ICW1_SNGL == 0 && self.icw3 & (1 << line) != 0
    }

    fn set_line(&mut self, line: u8, high: bool) {
        let m = 1 << line;
        if high {
            if self.level_lines() & m != 0 || self.level & m == 0 {
                self.irr |= m;
            }
            self.level |= m;
        } else {
            if self.level_lines() & m != 0 {
                self.irr &= !m;
            }
            self.level &= !m;
        }
    }

    /// The INTA cycle for `line`.
    fn acknowledge(&mut self, line: u8) {
        let m = 1 << line;
        if self.level_lines() & m == 0 {
            self.irr &= !m;
        }
        if self.icw4 & ICW4_AEOI != 0 {
            if self.rotate_in_aeoi {
                self.lowest = line;
            }
        } else {
            self.isr |= m;
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & ICW1 != 0 {
            self.icw1 = v;
            // Datasheet, ICW1: edge sense reset (a line must go low to high
            // again), IMR cleared, IR7 lowest priority, slave address 7,
            // special mask off, status read of IRR; no IC4 zeroes ICW4.
            self.irr = self.level & self.level_lines();
            self.isr = 0;
            self.imr = 0;
            self.lowest = 7;
            self.icw3 = 7;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.rotate_in_aeoi = false;
            if v & ICW1_IC4 == 0 {
                self.icw4 = 0;
            }
            self.init = Init::Icw2;
        } else if v & OCW3 != 0 {
            if v & OCW3_RR != 0 {
                self.read_isr = v & OCW3_RIS != 0;
            }
            self.poll = v & OCW3_POLL != 0;
            if v & OCW3_ESMM != 0 {
                self.special_mask = v & OCW3_SMM != 0;
            }
        } else {
            self.write_ocw2(v);
        }
    }

    /// OCW2: R, SL, EOI in bits 7:5, the level in bits 2:0.
    fn write_ocw2(&mut self, v: u8) {
        let level = v & 7;
        match v >> 5 {
            // Non-specific EOI; with rotation, the level becomes lowest.
            0b001 | 0b101 => {
                if let Some(l) = self.highest(self.isr) {
                    self.isr &= !(1 << l);
                    if v >> 5 == 0b101 {
                        self.lowest = l;
                    }
                }
            }
            0b011 => self.isr &= !(1 << level),
            0b111 => {
                self.isr &= !(1 << level);
                self.lowest = level;
            }
            0b110 => self.lowest = level,
            0b100 => self.rotate_in_aeoi = true,
            0b000 => self.rotate_in_aeoi = false,
            _ => {} // 0b010: no operation
        }
    }

    fn write_data(&mut self, v: u8) {
        let was = self.init;
        self.init = match was {
            Init::Ready => {
                self.imr = v; // OCW1
                Init::Ready
            }
            Init::Icw2 => {
                self.base = v & 0xf8;
                if self.icw1 & ICW1_SNGL == 0 {
                    Init::Icw3
                } else if self.icw1 & ICW1_IC4 != 0 {
                    Init::Icw4
                } else {
                    Init::Ready
                }
            }
            Init::Icw3 => {
                self.icw3 = v;
                if self.icw1 & ICW1_IC4 != 0 {
                    Init::Icw4
                } else {
                    Init::Ready
                }
            }
            Init::Icw4 => {
                self.icw4 = v & 0x1f;
                Init::Ready
            }
        };
        if was != Init::Ready && self.init == Init::Ready {
            self.initialized = true;
        }
    }

    fn read_command(&mut self) -> u8 {
        if self.poll {
            // Poll: the read is the acknowledge; bit 7 says whether there
            // was a request, bits 2:0 which.
            self.poll = false;
            return match self.deliverable() {
                Some(l) => {
                    self.acknowledge(l);
                    0x80 | l
                }
                None => 0,
            };
        }
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The pair, as wired in a PC.
#[derive(Clone, Debug)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    pub fn new() -> Self {
        Pic { chips: [Chip::new(), Chip::new()] }
    }

    /// Whether `port` is one of 0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1.
    pub fn claims(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1)
    }

    /// A guest IN of one byte.
    pub fn read(&mut self, port: u16) -> u8 {
        let v = match port {
            0x20 | 0xa0 => self.chip(port).read_command(),
            0x21 | 0xa1 => self.chip(port).imr,
            0x4d0 | 0x4d1 => self.chips[usize::from(port - ELCR)].elcr,
            _ => 0xff,
        };
        self.sync_cascade();
        v
    }

    /// A guest OUT of one byte.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            0x20 | 0xa0 => self.chip(port).write_command(value),
            0x21 | 0xa1 => self.chip(port).write_data(value),
            0x4d0 | 0x4d1 => {
                let i = usize::from(port - ELCR);
                let c = &mut self.chips[i];
                c.elcr = value & ELCR_WRITABLE[i];
                // A line that turned level-triggered requests while high.
                c.irr = (c.irr & !c.level_lines()) | (c.level & c.level_lines());
            }
            _ => {}
        }
        self.sync_cascade();
    }

    /// Sets the input level of ISA interrupt `line` (0-15). Lines 2 (the
    /// cascade) and 16 and above are ignored.
    pub fn set_irq_level(&mut self, line: u8, high: bool) {
        if line >= 16 || line == CASCADE_LINE {
            return;
        }
        self.chips[usize::from(line / 8)].set_line(line % 8, high);
        self.sync_cascade();
    }

    /// An edge on `line`: the input goes high and low again (an
    /// edge-triggered request that stays latched in IRR).
    pub fn raise_irq(&mut self, line: u8) {
        self.set_irq_level(line, true);
        self.set_irq_level(line, false);
    }

    /// The vector the pair presents to the CPU now, if any (INTR high).
    pub fn pending_vector(&self) -> Option<u8> {
        let [m, s] = &self.chips;
        if !m.ready() {
            return None;
        }
        let line = m.deliverable()?;
        if m.cascades_on(line) {
            // IRR bit 2 is set only while the slave has a request.
            s.deliverable().map(|sl| s.base | sl)
        } else {
            Some(m.base | line)
        }
    }

    /// The CPU's interrupt acknowledge: returns the vector of
    /// [`Pic::pending_vector`] and moves its request from IRR to ISR
    /// (or, in automatic-EOI mode, just out of IRR). None if nothing was
    /// pending.
    pub fn ack(&mut self) -> Option<u8> {
        let vector = self.pending_vector()?;
        let [m, s] = &mut self.chips;
        let line = m.deliverable()?;
        m.acknowledge(line);
        if m.cascades_on(line) {
            if let Some(sl) = s.deliverable() {
                s.acknowledge(sl);
            }
        }
        self.sync_cascade();
        Some(vector)
    }

    /// The mask registers: master in bits 7:0, slave in 15:8.
    pub fn masks(&self) -> u16 {
        u16::from_le_bytes([self.chips[0].imr, self.chips[1].imr])
    }

    fn chip(&mut self, port: u16) -> &mut Chip {
        &mut self.chips[usize::from(port >= SLAVE)]
    }

    /// The slave's INT output, as a level on the master's IR2.
    fn sync_cascade(&mut self) {
        let [m, s] = &mut self.chips;
        let out = s.ready() && s.deliverable().is_some();
        let bit = 1 << CASCADE_LINE;
        if out {
            m.irr |= bit;
            m.level |= bit;
        } else {
            m.irr &= !bit;
            m.level &= !bit;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The usual PC initialization (Linux's init_8259A, SeaBIOS): ICW1
    /// edge, cascade, ICW4; vectors 0x20 and 0x28; slave on IR2, slave
    /// ID 2; 8086 mode. ICW1 leaves both masks clear.
    fn init(p: &mut Pic, aeoi: bool) {
        let icw4 = if aeoi { 0x03 } else { 0x01 };
        for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, icw4), (0xa0, 0x11), (0xa1, 0x28), (0xa1, 0x02), (0xa1, 0x01)] {
            p.write(port, v);
        }
    }

    fn unmask_all(p: &mut Pic) {
        p.write(0x21, 0);
        p.write(0xa1, 0);
    }

    fn eoi(p: &mut Pic, slave: bool) {
        if slave {
            p.write(0xa0, 0x20);
        }
        p.write(0x20, 0x20);
    }

    #[test]
    fn masking_everything_reads_back_exactly() {
        // What kvm-unit-tests' mask_pic_interrupts does, from power-on.
        let mut p = Pic::new();
        p.write(0x21, 0xff);
        p.write(0xa1, 0xff);
        assert_eq!((p.read(0x21), p.read(0xa1)), (0xff, 0xff));
        for v in [0x00, 0xa5, 0x5a] {
            p.write(0x21, v);
            p.write(0xa1, !v);
            assert_eq!((p.read(0x21), p.read(0xa1)), (v, !v));
            assert_eq!(p.masks(), u16::from_le_bytes([v, !v]));
        }
        assert_eq!(p.pending_vector(), None);
    }

    #[test]
    fn icw_sequence_then_imr() {
        let mut p = Pic::new();
        p.write(0x21, 0x55);
        p.write(0x20, 0x11);
        assert_eq!(p.read(0x21), 0, "ICW1 clears the mask");
        p.write(0x21, 0x20); // ICW2, not a mask
        p.write(0x21, 0x04); // ICW3
        p.write(0x21, 0x01); // ICW4
        assert_eq!(p.read(0x21), 0, "the ICWs did not land in IMR");
        p.write(0x21, 0xfb); // OCW1
        assert_eq!(p.read(0x21), 0xfb);
        let c = &p.chips[0];
        assert_eq!((c.base, c.icw3, c.icw4), (0x20, 0x04, 0x01));
        // Single mode, no ICW4: ICW2 ends the sequence.
        let mut p = Pic::new();
        p.write(0x20, 0x12);
        p.write(0x21, 0x47);
        assert_eq!(p.chips[0].base, 0x40, "vector bits 2:0 come from the level");
        p.write(0x21, 0x3c);
        assert_eq!(p.read(0x21), 0x3c);
        // Cascade without ICW4: ICW3 ends it.
        p.write(0x20, 0x10);
        p.write(0x21, 0x08);
        p.write(0x21, 0x04);
        p.write(0x21, 0x99);
        assert_eq!((p.read(0x21), p.chips[0].icw4), (0x99, 0));
    }

    #[test]
    fn ocw3_selects_irr_or_isr_and_it_sticks() {
        let mut p = Pic::new();
        init(&mut p, false);
        unmask_all(&mut p);
        p.raise_irq(3);
        p.raise_irq(5);
        assert_eq!(p.read(0x20), 0x28, "IRR is read after ICW1");
        p.write(0x20, 0x0b); // read ISR
        assert_eq!(p.read(0x20), 0);
        assert_eq!(p.ack(), Some(0x23));
        assert_eq!(p.read(0x20), 0x08, "ISR: 3 in service");
        assert_eq!(p.read(0x20), 0x08, "the selection sticks");
        p.write(0x20, 0x08); // RR=0: no change
        assert_eq!(p.read(0x20), 0x08);
        p.write(0x20, 0x0a); // read IRR
        assert_eq!(p.read(0x20), 0x20);
        assert_eq!(p.read(0x21), 0, "A0=1 still reads IMR");
    }

    #[test]
    fn priorities_eoi_and_masking() {
        let mut p = Pic::new();
        init(&mut p, false);
        unmask_all(&mut p);
        p.raise_irq(4);
        p.raise_irq(1);
        assert_eq!(p.pending_vector(), Some(0x21));
        assert_eq!(p.ack(), Some(0x21));
        assert_eq!(p.pending_vector(), None, "4 waits behind 1 in service");
        p.raise_irq(0);
        assert_eq!(p.ack(), Some(0x20), "0 outranks 1 in service");
        eoi(&mut p, false); // clears 0, the highest in service
        assert_eq!(p.pending_vector(), None);
        eoi(&mut p, false);
        assert_eq!(p.ack(), Some(0x24));
        p.write(0x20, 0x64); // specific EOI level 4
        assert_eq!(p.chips[0].isr, 0);
        // A masked request stays in IRR and is presented once unmasked.
        p.write(0x21, 0x80);
        p.raise_irq(7);
        assert_eq!(p.pending_vector(), None);
        assert_eq!(p.chips[0].irr & 0x80, 0x80);
        p.write(0x21, 0);
        assert_eq!(p.ack(), Some(0x27));
        assert_eq!(p.ack(), None);
    }

    #[test]
    fn slave_requests_come_through_the_cascade() {
        let mut p = Pic::new();
        init(&mut p, false);
        unmask_all(&mut p);
        p.raise_irq(14);
        assert_eq!(p.read(0x20) & 0x04, 0x04, "master IRR 2");
        assert_eq!(p.pending_vector(), Some(0x2e));
        p.raise_irq(9);
        assert_eq!(p.ack(), Some(0x29));
        assert_eq!((p.chips[0].isr, p.chips[1].isr), (0x04, 0x02));
        assert_eq!(p.pending_vector(), None, "14 is lower than 9 in service");
        p.write(0xa0, 0x20);
        assert_eq!(p.pending_vector(), None, "master IR2 still in service");
        p.write(0x20, 0x20);
        assert_eq!(p.ack(), Some(0x2e), "the second slave request was not lost");
        eoi(&mut p, true);
        // Masking IR2 on the master holds off the whole slave.
        p.write(0x21, 0x04);
        p.raise_irq(8);
        assert_eq!(p.pending_vector(), None);
        p.write(0x21, 0x00);
        assert_eq!(p.pending_vector(), Some(0x28));
        // IR1 outranks the slave's requests on IR2.
        p.raise_irq(1);
        assert_eq!(p.ack(), Some(0x21));
        p.raise_irq(2); // not a device line: ignored
        assert_eq!(p.chips[0].irr & 0x04, 0x04, "still the slave's request");
    }

    #[test]
    fn special_fully_nested_mode_lets_a_higher_slave_level_through() {
        let mut p = Pic::new();
        init(&mut p, false);
        p.write(0x20, 0x11);
        p.write(0x21, 0x20);
        p.write(0x21, 0x04);
        p.write(0x21, 0x11); // ICW4: SFNM, 8086
        unmask_all(&mut p);
        p.raise_irq(12);
        assert_eq!(p.ack(), Some(0x2c));
        p.raise_irq(10);
        assert_eq!(p.pending_vector(), Some(0x2a), "IR2 in service does not block the slave's higher level");
        p.raise_irq(5);
        assert_eq!(p.ack(), Some(0x2a));
        // Without SFNM the same sequence waits for the master's EOI.
        let mut p = Pic::new();
        init(&mut p, false);
        unmask_all(&mut p);
        p.raise_irq(12);
        p.ack();
        p.raise_irq(10);
        assert_eq!(p.pending_vector(), None);
    }

    #[test]
    fn automatic_eoi_and_rotation() {
        let mut p = Pic::new();
        init(&mut p, true);
        unmask_all(&mut p);
        p.raise_irq(3);
        assert_eq!(p.ack(), Some(0x23));
        assert_eq!(p.chips[0].isr, 0, "AEOI: nothing in service");
        // Rotate in AEOI: the acknowledged level becomes lowest.
        p.write(0x20, 0x80);
        p.raise_irq(3);
        p.ack();
        assert_eq!(p.chips[0].lowest, 3);
        p.raise_irq(3);
        p.raise_irq(4);
        assert_eq!(p.ack(), Some(0x24), "4 is now highest");
        p.write(0x20, 0x00); // clear rotate in AEOI
        p.ack(); // 3
        assert_eq!(p.chips[0].lowest, 4);
        // Set priority: lowest = 6, so 7 is highest.
        p.write(0x20, 0xc6);
        p.raise_irq(0);
        p.raise_irq(7);
        assert_eq!(p.ack(), Some(0x27));
        p.ack();
        // Rotate on non-specific EOI, and on specific EOI.
        let mut p = Pic::new();
        init(&mut p, false);
        unmask_all(&mut p);
        p.raise_irq(5);
        p.ack();
        p.write(0x20, 0xa0);
        assert_eq!((p.chips[0].isr, p.chips[0].lowest), (0, 5));
        p.raise_irq(1);
        p.ack();
        p.write(0x20, 0xe1);
        assert_eq!((p.chips[0].isr, p.chips[0].lowest), (0, 1));
        p.write(0x20, 0x42); // no operation
        assert_eq!(p.chips[0].lowest, 1);
    }

    #[test]
    fn poll_mode_acknowledges_on_read() {
        let mut p = Pic::new();
        init(&mut p, false);
        unmask_all(&mut p);
        p.write(0x20, 0x0c);
        assert_eq!(p.read(0x20), 0, "nothing to poll");
        p.raise_irq(6);
        p.write(0x20, 0x0c);
        assert_eq!(p.read(0x20), 0x86);
        assert_eq!(p.chips[0].isr, 0x40);
        assert_eq!(p.read(0x20), 0, "poll is for one read; IRR now");
    }

    #[test]
    fn special_mask_mode() {
        let mut p = Pic::new();
        init(&mut p, false);
        unmask_all(&mut p);
        p.raise_irq(3);
        p.ack();
        p.raise_irq(5);
        assert_eq!(p.pending_vector(), None);
        p.write(0x21, 0x08); // mask 3 (in service)
        p.write(0x20, 0x68); // set special mask mode
        assert_eq!(p.pending_vector(), Some(0x25));
        p.write(0x20, 0x48); // reset special mask mode
        assert_eq!(p.pending_vector(), None);
        p.write(0x20, 0x28); // ESMM=0: SMM bit ignored
        assert_eq!(p.pending_vector(), None);
    }

    #[test]
    fn edge_and_level_triggering() {
        let mut p = Pic::new();
        init(&mut p, false);
        unmask_all(&mut p);
        // Edge: a held-high line requests once.
        p.set_irq_level(4, true);
        assert_eq!(p.ack(), Some(0x24));
        eoi(&mut p, false);
        p.set_irq_level(4, true);
        assert_eq!(p.pending_vector(), None);
        p.set_irq_level(4, false);
        p.set_irq_level(4, true);
        assert_eq!(p.ack(), Some(0x24));
        eoi(&mut p, false);
        p.set_irq_level(4, false);
        // Level (ELCR): requests while high, again after EOI, not once low.
        p.write(0x4d0, 0xff);
        assert_eq!(p.read(0x4d0), 0xf8, "IRQ 0-2 are always edge");
        p.write(0x4d1, 0xff);
        assert_eq!(p.read(0x4d1), 0xde, "IRQ 8 and 13 are always edge");
        p.set_irq_level(5, true);
        assert_eq!(p.ack(), Some(0x25));
        eoi(&mut p, false);
        assert_eq!(p.ack(), Some(0x25), "still high: requested again");
        eoi(&mut p, false);
        p.set_irq_level(5, false);
        assert_eq!(p.pending_vector(), None);
        // A line held high that ELCR turns level starts requesting.
        p.write(0x4d0, 0);
        p.set_irq_level(6, true);
        p.ack();
        eoi(&mut p, false);
        assert_eq!(p.pending_vector(), None);
        p.write(0x4d0, 0x40);
        assert_eq!(p.pending_vector(), Some(0x26));
        // ICW1 resets edge sense: a line high across it must go low first.
        let mut p = Pic::new();
        p.set_irq_level(3, true);
        init(&mut p, false);
        unmask_all(&mut p);
        assert_eq!(p.pending_vector(), None);
        p.set_irq_level(3, false);
        p.set_irq_level(3, true);
        assert_eq!(p.pending_vector(), Some(0x23));
    }

    #[test]
    fn icw1_ltim_makes_every_line_level_triggered() {
        let mut p = Pic::new();
        for (port, v) in [(0x20, 0x19), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01)] {
            p.write(port, v);
        }
        p.set_irq_level(1, true); // ELCR cannot make IRQ 1 level; LTIM does
        assert_eq!(p.ack(), Some(0x31));
        p.write(0x20, 0x20);
        assert_eq!(p.ack(), Some(0x31), "still high: requested again");
        p.write(0x20, 0x20);
        p.set_irq_level(1, false);
        assert_eq!(p.pending_vector(), None, "low: the request is gone");
        assert_eq!(p.read(0x20), 0);
    }

    #[test]
    fn nothing_is_presented_before_initialization() {
        let mut p = Pic::new();
        p.write(0x21, 0);
        p.raise_irq(1);
        assert_eq!(p.pending_vector(), None);
        assert_eq!(p.ack(), None);
        // Mid-sequence neither.
        p.write(0x20, 0x11);
        p.raise_irq(1);
        assert_eq!(p.pending_vector(), None);
        p.write(0x21, 0x08);
        p.write(0x21, 0x04);
        p.write(0x21, 0x01);
        p.raise_irq(1);
        assert_eq!(p.pending_vector(), Some(0x09));
        // An uninitialized slave presents nothing through the cascade.
        p.raise_irq(9);
        assert_eq!(p.chips[0].irr & 0x04, 0);
    }

    #[test]
    fn claims_and_foreign_ports() {
        for port in [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1] {
            assert!(Pic::claims(port));
        }
        for port in [0x1f, 0x22, 0x9f, 0xa2, 0x4cf, 0x4d2] {
            assert!(!Pic::claims(port));
        }
        let mut p = Pic::new();
        p.write(0x22, 0x11);
        assert_eq!(p.read(0x22), 0xff);
        p.raise_irq(16);
        p.raise_irq(255);
    }

    proptest! {
        /// Whatever the guest writes and whichever lines move, nothing
        /// panics, a presented vector is the chip's base plus a level,
        /// and ack agrees with pending_vector.
        #[test]
        fn any_sequence_is_handled(ops in proptest::collection::vec((0u8..5, any::<u8>()), 0..300)) {
            let mut p = Pic::new();
            for (op, v) in ops {
                match op {
                    0 => p.write([0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1][usize::from(v % 6)], v),
                    1 => { p.read([0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1][usize::from(v % 6)]); }
                    2 => p.set_irq_level(v % 18, v & 0x80 != 0),
                    3 => p.raise_irq(v % 18),
                    _ => {
                        let want = p.pending_vector();
                        prop_assert_eq!(p.ack(), want);
                    }
                }
                if let Some(vec) = p.pending_vector() {
                    let bases = [p.chips[0].base, p.chips[1].base];
                    prop_assert!(bases.contains(&(vec & 0xf8)));
                }
            }
        }
    }
}

//! A National/TI PC16550D UART at a base port (COM1: 0x3f8, IRQ 4).
//!
//! Register by register as in the datasheet (section 8, "Registers"):
//! RBR/THR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR, and DLL/DLM while
//! LCR.DLAB is set. What is not a wire in a VM is simplified:
//!
//! - Transmit is instant: a byte written to THR leaves at once, so LSR
//!   THRE and TEMT are always set, and the byte (cut to the LCR word
//!   length, as the transmitter shifts out only that many bits) goes to a
//!   [`LineBuffer`] that hands out finished, escaped host log lines.
//! - Receive holds only what [`Uart16550::push_input`] (or loopback)
//!   puts in: a 16-byte FIFO in FIFO mode, the single RBR in 16450 mode.
//!   No parity, framing or break errors ever happen; overrun does.
//! - The receive FIFO's character timeout (IIR 0x0c) has no clock to
//!   count four character times with: it is reported as soon as data
//!   below the trigger level waits, as if the time had passed.
//! - The modem inputs (CTS, DSR, DCD asserted; RI not) are those of a
//!   terminal that is always attached; in loopback they are MCR's outputs.
//!
//! Reset state: the datasheet's (IER, MCR, FCR 0, no interrupt), except
//! LCR = 0x03 (8N1) and divisor 1 (115200 baud). The datasheet's LCR
//! reset value 0 means 5-bit characters; firmware programs the port
//! before an OS runs, and our VMs start without firmware, so they start
//! as a firmware leaves a console port (guests that never touch LCR,
//! like our own guest program, then print 8-bit text).

use crate::serial_device::LineBuffer;
use alloc::string::String;

/// The PC's first serial port.
pub const COM1: u16 = 0x3f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u8 = 4;
/// Ports a 16550 decodes from its base.
pub const PORTS: u16 = 8;
/// Depth of the 16550A receive FIFO.
pub const RX_FIFO_SIZE: usize = 16;

// Register offsets (datasheet Table II).
const RBR_THR: u16 = 0; // DLL with DLAB
const IER: u16 = 1; // DLM with DLAB
const IIR_FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const MSR: u16 = 6;
const SCR: u16 = 7;

/// Interrupt Enable Register bits (bits 7:4 are always 0).
pub mod ier {
    pub const RX_DATA: u8 = 1 << 0;
    pub const THR_EMPTY: u8 = 1 << 1;
    pub const LINE_STATUS: u8 = 1 << 2;
    pub const MODEM_STATUS: u8 = 1 << 3;
    pub const MASK: u8 = 0x0f;
}

/// Interrupt Identification Register values (datasheet Table IV), in
/// priority order; bits 7:6 are set while the FIFOs are enabled.
pub mod iir {
    pub const NONE: u8 = 0x01;
    pub const LINE_STATUS: u8 = 0x06;
    pub const RX_DATA: u8 = 0x04;
    pub const CHAR_TIMEOUT: u8 = 0x0c;
    pub const THR_EMPTY: u8 = 0x02;
    pub const MODEM_STATUS: u8 = 0x00;
    pub const FIFOS_ENABLED: u8 = 0xc0;
}

/// FIFO Control Register bits (write only: reading offset 2 gives IIR).
pub mod fcr {
    pub const ENABLE: u8 = 1 << 0;
    pub const RX_RESET: u8 = 1 << 1;
    pub const TX_RESET: u8 = 1 << 2;
    pub const DMA_MODE: u8 = 1 << 3;
    pub const TRIGGER: u8 = 0xc0;
}

/// Line Control Register bits.
pub mod lcr {
    /// Word length select: 00 = 5 bits ... 11 = 8 bits.
    pub const WORD_LENGTH: u8 = 0x03;
    pub const DLAB: u8 = 0x80;
}

/// Modem Control Register bits (bits 7:5 are always 0).
pub mod mcr {
    pub const DTR: u8 = 1 << 0;
    pub const RTS: u8 = 1 << 1;
    pub const OUT1: u8 = 1 << 2;
    /// On a PC, OUT2 enables the buffer between INTRPT and the IRQ line.
    pub const OUT2: u8 = 1 << 3;
    pub const LOOP: u8 = 1 << 4;
    pub const MASK: u8 = 0x1f;
}

/// Line Status Register bits.
pub mod lsr {
    pub const DATA_READY: u8 = 1 << 0;
    pub const OVERRUN: u8 = 1 << 1;
    pub const PARITY: u8 = 1 << 2;
    pub const FRAMING: u8 = 1 << 3;
    pub const BREAK: u8 = 1 << 4;
    pub const THR_EMPTY: u8 = 1 << 5;
    pub const TX_EMPTY: u8 = 1 << 6;
    pub const FIFO_ERROR: u8 = 1 << 7;
}

/// Modem Status Register bits: deltas (cleared by reading MSR), lines.
pub mod msr {
    pub const DCTS: u8 = 1 << 0;
    pub const DDSR: u8 = 1 << 1;
    pub const TERI: u8 = 1 << 2;
    pub const DDCD: u8 = 1 << 3;
    pub const CTS: u8 = 1 << 4;
    pub const DSR: u8 = 1 << 5;
    pub const RI: u8 = 1 << 6;
    pub const DCD: u8 = 1 << 7;
    pub const DELTAS: u8 = 0x0f;
}

/// The modem inputs of the always-attached terminal.
const MSR_ATTACHED: u8 = msr::CTS | msr::DSR | msr::DCD;

pub struct Uart16550 {
    base: u16,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    /// FCR bits that stay programmed: enable, DMA mode, trigger level.
    fcr: u8,
    /// Overrun, until LSR is read (the only error that can happen here).
    lsr_errors: u8,
    /// MSR bits 3:0, until MSR is read.
    msr_deltas: u8,
    /// The THR-empty interrupt condition: set when THR empties (at once
    /// after every write here) or ETBEI is enabled with THR empty;
    /// cleared by a THR write or an IIR read that reports it.
    thr_empty_pending: bool,
    rx: [u8; RX_FIFO_SIZE],
    rx_head: usize,
    rx_len: usize,
    line: LineBuffer,
}

impl Uart16550 {
    pub fn new(base: u16) -> Self {
        Uart16550 {
            base,
            ier: 0,
            lcr: 0x03,
            mcr: 0,
            scr: 0,
            dll: 1,
            dlm: 0,
            fcr: 0,
            lsr_errors: 0,
            msr_deltas: 0,
            thr_empty_pending: false,
            rx: [0; RX_FIFO_SIZE],
            rx_head: 0,
            rx_len: 0,
            line: LineBuffer::default(),
        }
    }

    pub fn base(&self) -> u16 {
        self.base
    }

    /// Whether `port` is one of this UART's eight.
    pub fn claims(&self, port: u16) -> bool {
        port >= self.base && port - self.base < PORTS
    }

    /// The baud rate divisor (DLM:DLL).
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }

    /// A guest IN of one byte from `port` (a port not ours reads 0xff).
    pub fn read(&mut self, port: u16) -> u8 {
        if !self.claims(port) {
            return 0xff;
        }
        let dlab = self.lcr & lcr::DLAB != 0;
        match port - self.base {
            RBR_THR if dlab => self.dll,
            RBR_THR => self.rx_pop(),
            IER if dlab => self.dlm,
            IER => self.ier,
            IIR_FCR => {
                let id = self.interrupt_id();
                // Datasheet Table IV: reading IIR resets a THRE interrupt
                // if that is what it reports.
                if id == iir::THR_EMPTY {
                    self.thr_empty_pending = false;
                }
                id | if self.fifo_enabled() { iir::FIFOS_ENABLED } else { 0 }
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let v = self.lsr();
                self.lsr_errors = 0;
                v
            }
            MSR => {
                let v = self.msr_lines() | self.msr_deltas;
                self.msr_deltas = 0;
                v
            }
            SCR => self.scr,
            _ => 0xff, // not ours (checked above)
        }
    }

    /// A guest OUT of one byte to `port`; returns a finished, escaped
    /// line when this byte completed one.
    pub fn write(&mut self, port: u16, value: u8) -> Option<String> {
        if !self.claims(port) {
            return None;
        }
        let dlab = self.lcr & lcr::DLAB != 0;
        match port - self.base {
            RBR_THR if dlab => self.dll = value,
            RBR_THR => return self.transmit(value),
            IER if dlab => self.dlm = value,
            IER => {
                let was = self.ier;
                self.ier = value & ier::MASK;
                // Enabling ETBEI while THR is empty (it always is here)
                // raises the THRE interrupt, as on the 8250 family; Linux's
                // 8250 driver starts transmitting on that interrupt.
                if self.ier & ier::THR_EMPTY != 0 && was & ier::THR_EMPTY == 0 {
                    self.thr_empty_pending = true;
                }
            }
            IIR_FCR => self.write_fcr(value),
            LCR => self.lcr = value,
            MCR => {
                let before = self.msr_lines();
                self.mcr = value & mcr::MASK;
                self.note_modem_change(before);
            }
            // LSR is for factory testing and MSR is read-only: a write to
            // either has no effect here.
            LSR | MSR => {}
            SCR => self.scr = value,
            _ => {} // not ours (checked above)
        }
        None
    }

    /// A byte arriving on the serial input; false if it was not taken
    /// (loopback disconnects the input; a full receiver overruns).
    pub fn push_input(&mut self, byte: u8) -> bool {
        if self.mcr & mcr::LOOP != 0 {
            return false;
        }
        self.receive(byte)
    }

    /// Whether INTRPT is asserted: some enabled interrupt is pending.
    pub fn interrupt_asserted(&self) -> bool {
        self.interrupt_id() != iir::NONE
    }

    /// Whether the UART raises its IRQ line (IRQ 4 for COM1): INTRPT
    /// asserted and passed by the PC's buffer, which OUT2 enables. In
    /// loopback the OUT2 pin is forced inactive (datasheet, MCR bit 4),
    /// so no interrupt leaves the chip, whatever MCR bit 3 holds.
    pub fn irq_pending(&self) -> bool {
        self.interrupt_asserted() && self.mcr & (mcr::OUT2 | mcr::LOOP) == mcr::OUT2
    }

    /// Whatever is left unprinted (when the VM ends).
    pub fn take_partial(&mut self) -> Option<String> {
        self.line.take_partial()
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & fcr::ENABLE != 0
    }

    /// The character as the LCR word length keeps it (5 to 8 bits).
    fn word(&self, byte: u8) -> u8 {
        byte & (0xff >> (3 - (self.lcr & lcr::WORD_LENGTH)))
    }

    fn transmit(&mut self, byte: u8) -> Option<String> {
        let byte = self.word(byte);
        // The write resets the THRE interrupt; the instant transmission
        // empties THR again, which sets it.
        self.thr_empty_pending = true;
        if self.mcr & mcr::LOOP != 0 {
            // Loopback: the transmitter feeds the receiver, the serial
            // output stays in the marking state.
            self.receive(byte);
            None
        } else {
            self.line.push(byte)
        }
    }

    /// A character assembled by the receiver (from the input or loopback).
    fn receive(&mut self, byte: u8) -> bool {
        let byte = self.word(byte);
        let capacity = if self.fifo_enabled() { RX_FIFO_SIZE } else { 1 };
        if self.rx_len < capacity {
            self.rx[(self.rx_head + self.rx_len) % RX_FIFO_SIZE] = byte;
            self.rx_len += 1;
            return true;
        }
        self.lsr_errors |= lsr::OVERRUN;
        // 16450 mode: the new character overwrites RBR. FIFO mode: the
        // FIFO keeps its 16, the character in the shift register is lost.
        if !self.fifo_enabled() {
            self.rx[self.rx_head] = byte;
        }
        false
    }

    /// RBR read: the oldest received character; 0 when there is none.
    fn rx_pop(&mut self) -> u8 {
        if self.rx_len == 0 {
            return 0;
        }
        let b = self.rx[self.rx_head];
        self.rx_head = (self.rx_head + 1) % RX_FIFO_SIZE;
        self.rx_len -= 1;
        b
    }

    fn rx_clear(&mut self) {
        self.rx_head = 0;
        self.rx_len = 0;
    }

    fn write_fcr(&mut self, value: u8) {
        // Switching between FIFO and 16450 mode empties the FIFOs.
        if (value ^ self.fcr) & fcr::ENABLE != 0 {
            self.rx_clear();
        }
        if value & fcr::ENABLE == 0 {
            // The other bits are only programmed together with FCR0.
            self.fcr = 0;
            return;
        }
        if value & fcr::RX_RESET != 0 {
            self.rx_clear();
        }
        // TX_RESET: the transmitter never holds anything to clear.
        self.fcr = value & (fcr::ENABLE | fcr::DMA_MODE | fcr::TRIGGER);
    }

    /// The receive FIFO trigger level of FCR bits 7:6.
    fn trigger_level(&self) -> usize {
        [1, 4, 8, 14][usize::from(self.fcr >> 6)]
    }

    fn lsr(&self) -> u8 {
        let dr = if self.rx_len > 0 { lsr::DATA_READY } else { 0 };
        dr | self.lsr_errors | lsr::THR_EMPTY | lsr::TX_EMPTY
    }

    /// The highest-priority pending, enabled interrupt (datasheet Table IV).
    fn interrupt_id(&self) -> u8 {
        if self.ier & ier::LINE_STATUS != 0 && self.lsr_errors != 0 {
            iir::LINE_STATUS
        } else if self.ier & ier::RX_DATA != 0 && self.rx_len > 0 {
            if !self.fifo_enabled() || self.rx_len >= self.trigger_level() {
                iir::RX_DATA
            } else {
                iir::CHAR_TIMEOUT
            }
        } else if self.ier & ier::THR_EMPTY != 0 && self.thr_empty_pending {
            iir::THR_EMPTY
        } else if self.ier & ier::MODEM_STATUS != 0 && self.msr_deltas != 0 {
            iir::MODEM_STATUS
        } else {
            iir::NONE
        }
    }

    /// MSR bits 7:4: the attached terminal's, or in loopback MCR's
    /// outputs (RTS to CTS, DTR to DSR, OUT1 to RI, OUT2 to DCD).
    fn msr_lines(&self) -> u8 {
        if self.mcr & mcr::LOOP == 0 {
            return MSR_ATTACHED;
        }
        let m = self.mcr;
        let bit = |from: u8, to: u8| if m & from != 0 { to } else { 0 };
        bit(mcr::RTS, msr::CTS) | bit(mcr::DTR, msr::DSR) | bit(mcr::OUT1, msr::RI) | bit(mcr::OUT2, msr::DCD)
    }

    /// Latches MSR's delta bits for the lines that changed since `before`:
    /// any change of CTS, DSR, DCD; RI only on its trailing edge.
    fn note_modem_change(&mut self, before: u8) {
        let now = self.msr_lines();
        let changed = before ^ now;
        let mut d = 0;
        if changed & msr::CTS != 0 {
            d |= msr::DCTS;
        }
        if changed & msr::DSR != 0 {
            d |= msr::DDSR;
        }
        if changed & msr::DCD != 0 {
            d |= msr::DDCD;
        }
        if before & msr::RI != 0 && now & msr::RI == 0 {
            d |= msr::TERI;
        }
        self.msr_deltas |= d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: u16 = COM1;

    fn uart() -> Uart16550 {
        Uart16550::new(B)
    }

    fn send(u: &mut Uart16550, s: &[u8]) -> Vec<String> {
        s.iter().filter_map(|&b| u.write(B, b)).collect()
    }

    #[test]
    fn dlab_switches_ports_0_and_1_between_the_divisor_and_thr_ier() {
        let mut u = uart();
        u.write(B + 1, 0x05); // IER
        u.write(B + 3, 0x83); // DLAB on, 8N1
        u.write(B, 0x0c); // DLL
        u.write(B + 1, 0x01); // DLM
        assert_eq!((u.read(B), u.read(B + 1)), (0x0c, 0x01));
        assert_eq!(u.divisor(), 0x010c);
        assert_eq!(u.take_partial(), None, "a DLL write is not text");
        u.write(B + 3, 0x03); // DLAB off
        assert_eq!(u.read(B + 1), 0x05, "IER is back, untouched by the DLM write");
        assert_eq!(u.read(B), 0, "RBR with nothing received");
        u.write(B, b'A');
        assert_eq!(u.take_partial().as_deref(), Some("A"));
        assert_eq!(u.divisor(), 0x010c, "a THR write is not DLL");
        // IER keeps only bits 3:0; DLL and DLM take all 8 bits.
        u.write(B + 1, 0xff);
        assert_eq!(u.read(B + 1), 0x0f);
        u.write(B + 3, 0x80);
        u.write(B, 0xff);
        u.write(B + 1, 0xfe);
        assert_eq!(u.divisor(), 0xfeff);
    }

    #[test]
    fn scratch_and_line_control_round_trip_and_mcr_keeps_five_bits() {
        let mut u = uart();
        for v in [0x00, 0x5a, 0xa5, 0xff] {
            u.write(B + 7, v);
            assert_eq!(u.read(B + 7), v);
        }
        u.write(B + 3, 0x1b); // 8 bits, 2 stop, even parity
        assert_eq!(u.read(B + 3), 0x1b);
        u.write(B + 4, 0xff);
        assert_eq!(u.read(B + 4), 0x1f);
        u.write(B + 4, 0x0b);
        assert_eq!(u.read(B + 4), 0x0b);
    }

    #[test]
    fn reset_state() {
        let mut u = uart();
        assert_eq!(u.read(B + 1), 0, "IER");
        assert_eq!(u.read(B + 2), 0x01, "IIR: no interrupt, FIFOs off");
        assert_eq!(u.read(B + 3), 0x03, "LCR: 8N1 as firmware leaves it");
        assert_eq!(u.read(B + 4), 0, "MCR");
        assert_eq!(u.read(B + 5), 0x60, "LSR: THRE | TEMT");
        assert_eq!(u.read(B + 6), 0xb0, "MSR: DCD, DSR, CTS of an attached terminal, no deltas");
        assert_eq!(u.divisor(), 1);
        assert!(!u.interrupt_asserted() && !u.irq_pending());
    }

    #[test]
    fn lsr_after_writes_says_transmitter_empty() {
        let mut u = uart();
        for b in *b"hello\n" {
            u.write(B, b);
            assert_eq!(u.read(B + 5), lsr::THR_EMPTY | lsr::TX_EMPTY);
        }
        // Writing LSR or MSR changes nothing.
        u.write(B + 5, 0x1f);
        u.write(B + 6, 0x0f);
        assert_eq!(u.read(B + 5), 0x60);
        assert_eq!(u.read(B + 6), 0xb0);
    }

    #[test]
    fn transmitted_text_becomes_escaped_lines() {
        let mut u = uart();
        assert_eq!(send(&mut u, b"PASS: x\r\nSUM"), ["PASS: x"]);
        assert_eq!(send(&mut u, b"\x1b[0m\n"), ["SUM\\x1b[0m"]);
        assert_eq!(u.take_partial(), None);
        // A port not ours: nothing happens, reads float high.
        assert_eq!(u.write(B + 8, b'\n'), None);
        assert_eq!(u.write(B - 1, b'\n'), None);
        assert_eq!(u.read(B + 8), 0xff);
        assert!(u.claims(B) && u.claims(B + 7) && !u.claims(B + 8) && !u.claims(B - 1));
        assert!(!Uart16550::new(0xfffc).claims(0x0003), "no wrap past port 0xffff");
    }

    #[test]
    fn word_length_keeps_only_the_low_bits() {
        let mut u = uart();
        for (lcr, want) in [(0x00, 0x1f), (0x01, 0x3f), (0x02, 0x7f), (0x03, 0xff)] {
            u.write(B + 3, lcr | 0x04); // stop bits do not matter
            u.write(B, 0xff);
            let line = u.take_partial().unwrap();
            assert_eq!(line, crate::serial_device::escape_guest_text(&[want]), "LCR {lcr:#x}");
        }
        // 7 bits: 'a' | 0x80 prints as 'a'; 5 bits: 'a' (0x61) is 0x01.
        u.write(B + 3, 0x02);
        assert_eq!(send(&mut u, &[b'a' | 0x80, b'\n']), ["a"]);
        u.write(B + 3, 0x00);
        assert_eq!(send(&mut u, b"a"), Vec::<String>::new());
        assert_eq!(u.take_partial().as_deref(), Some("\\x01"));
        // A 5-bit '\n' (0x0a) is still a newline; a 5-bit 0x2a is too.
        assert_eq!(send(&mut u, &[b'x', 0x2a]), ["\\x18"]);
    }

    #[test]
    fn fcr_is_write_only_and_iir_shows_fifo_mode() {
        let mut u = uart();
        u.write(B + 2, 0xc7); // enable, reset both, trigger 14
        assert_eq!(u.read(B + 2), 0xc1, "IIR: FIFOs enabled, no interrupt");
        assert_eq!(u.trigger_level(), 14);
        u.write(B + 2, 0x41); // trigger 4
        assert_eq!(u.trigger_level(), 4);
        u.write(B + 2, 0xc0); // FCR0 clear: FIFOs off, other bits ignored
        assert_eq!(u.read(B + 2), 0x01);
        assert_eq!(u.trigger_level(), 1);
        // Under DLAB offset 2 is still IIR/FCR.
        u.write(B + 3, 0x83);
        u.write(B + 2, 0x01);
        assert_eq!(u.read(B + 2), 0xc1);
    }

    #[test]
    fn thr_empty_interrupt_follows_the_datasheet() {
        let mut u = uart();
        u.write(B + 4, mcr::OUT2);
        assert_eq!(u.read(B + 2), 0x01);
        // Enabling ETBEI with THR empty raises it at once.
        u.write(B + 1, ier::THR_EMPTY);
        assert!(u.interrupt_asserted() && u.irq_pending());
        assert_eq!(u.read(B + 2), 0x02);
        // Reading IIR that reported it clears it.
        assert_eq!(u.read(B + 2), 0x01);
        assert!(!u.irq_pending());
        // Every transmitted byte empties THR again.
        u.write(B, b'x');
        assert!(u.irq_pending());
        assert_eq!(u.read(B + 2), 0x02);
        assert_eq!(u.read(B + 2), 0x01);
        // Rewriting IER with ETBEI already set raises nothing new.
        u.write(B + 1, ier::THR_EMPTY);
        assert_eq!(u.read(B + 2), 0x01);
        // Disabled: pending but not identified; enabled again: it is.
        u.write(B + 1, 0);
        u.write(B, b'y');
        assert_eq!(u.read(B + 2), 0x01);
        assert!(!u.interrupt_asserted());
        u.write(B + 1, ier::THR_EMPTY);
        assert_eq!(u.read(B + 2), 0x02);
    }

    #[test]
    fn irq_needs_out2_and_no_loopback() {
        let mut u = uart();
        u.write(B + 1, ier::THR_EMPTY);
        assert!(u.interrupt_asserted());
        assert!(!u.irq_pending(), "OUT2 clear: the PC's buffer is off");
        u.write(B + 4, mcr::OUT2 | mcr::DTR | mcr::RTS);
        assert!(u.irq_pending());
        u.write(B + 4, mcr::OUT2 | mcr::LOOP);
        assert!(u.interrupt_asserted() && !u.irq_pending(), "loopback forces OUT2 inactive");
    }

    #[test]
    fn receive_fifo_data_ready_trigger_timeout_and_overrun() {
        let mut u = uart();
        u.write(B + 1, ier::RX_DATA | ier::LINE_STATUS);
        // 16450 mode: one character, a second overruns and replaces it.
        assert!(u.push_input(b'a'));
        assert_eq!(u.read(B + 5) & lsr::DATA_READY, 1);
        assert_eq!(u.read(B + 2), 0x04);
        assert!(!u.push_input(b'b'));
        assert_eq!(u.read(B + 2), 0x06, "line status outranks received data");
        assert_eq!(u.read(B + 5), 0x63, "DR | OE | THRE | TEMT");
        assert_eq!(u.read(B + 5), 0x61, "reading LSR cleared OE");
        assert_eq!(u.read(B + 2), 0x04);
        assert_eq!(u.read(B), b'b');
        assert_eq!(u.read(B + 5), 0x60);
        assert_eq!(u.read(B + 2), 0x01);
        // FIFO mode, trigger 4: below it the timeout id, at it RDA.
        u.write(B + 2, 0x41);
        for b in *b"123" {
            assert!(u.push_input(b));
        }
        assert_eq!(u.read(B + 2), 0xcc);
        assert!(u.push_input(b'4'));
        assert_eq!(u.read(B + 2), 0xc4);
        for b in 5..=16u8 {
            assert!(u.push_input(b'0' + b));
        }
        assert!(!u.push_input(b'X'), "the 17th overruns");
        assert_eq!(u.read(B + 5), 0x63);
        let got: Vec<u8> = (0..16).map(|_| u.read(B)).collect();
        assert_eq!(&got[..4], b"1234");
        assert_eq!(got[15], b'0' + 16, "the FIFO kept its 16; the overrunning one is lost");
        assert_eq!(u.read(B + 5), 0x60);
        assert_eq!(u.read(B), 0, "empty");
        // Leaving FIFO mode empties the FIFO; so does RX reset.
        u.write(B + 2, 0x01);
        u.push_input(b'z');
        u.write(B + 2, 0x03);
        assert_eq!(u.read(B + 5) & 1, 0);
        u.push_input(b'z');
        u.write(B + 2, 0x00);
        assert_eq!(u.read(B + 5) & 1, 0);
        // Received characters keep only the word length.
        u.write(B + 3, 0x02);
        u.push_input(0xe1);
        assert_eq!(u.read(B), 0x61);
    }

    #[test]
    fn the_receive_fifo_keeps_order_across_its_wrap() {
        let mut u = uart();
        u.write(B + 2, 0x01);
        let mut next = 0u8;
        let mut want = 0u8;
        for (push, pop) in [(10, 5), (10, 12), (13, 3), (2, 16)] {
            for _ in 0..push {
                u.push_input(next);
                next += 1;
            }
            for _ in 0..pop {
                if u.read(B + 5) & lsr::DATA_READY == 0 {
                    break;
                }
                assert_eq!(u.read(B), want);
                want += 1;
            }
        }
        assert_eq!(u.read(B + 5) & lsr::DATA_READY, 0, "all read");
        assert_eq!(want, 10 + 10 + 13 + 2, "every byte taken came out once, in order");
    }

    #[test]
    fn loopback_feeds_the_receiver_and_the_modem_lines() {
        let mut u = uart();
        u.write(B + 4, mcr::LOOP);
        // Entering loopback: CTS, DSR, DCD go from asserted to MCR's
        // (all off): three deltas.
        assert_eq!(u.read(B + 6), msr::DCTS | msr::DDSR | msr::DDCD);
        assert_eq!(u.read(B + 6), 0);
        assert_eq!(u.write(B, b'Q'), None, "nothing leaves in loopback");
        assert_eq!(u.take_partial(), None);
        assert_eq!(u.read(B + 5), 0x61);
        assert_eq!(u.read(B), b'Q');
        assert!(!u.push_input(b'E'), "the serial input is disconnected");
        assert_eq!(u.read(B + 5), 0x60);
        // MCR outputs to MSR inputs: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        u.write(B + 4, mcr::LOOP | mcr::RTS);
        assert_eq!(u.read(B + 6), msr::CTS | msr::DCTS);
        u.write(B + 4, mcr::LOOP | mcr::DTR);
        assert_eq!(u.read(B + 6), msr::DSR | msr::DDSR | msr::DCTS);
        u.write(B + 4, mcr::LOOP | mcr::OUT1);
        assert_eq!(u.read(B + 6), msr::RI | msr::DDSR, "RI's leading edge is no delta");
        u.write(B + 4, mcr::LOOP | mcr::OUT2);
        assert_eq!(u.read(B + 6), msr::DCD | msr::DDCD | msr::TERI);
        // A modem status interrupt while the deltas are unread.
        u.write(B + 1, ier::MODEM_STATUS);
        u.write(B + 4, mcr::LOOP);
        assert_eq!(u.read(B + 2), 0x00);
        u.read(B + 6);
        assert_eq!(u.read(B + 2), 0x01);
        // Leaving loopback: the attached terminal's lines again.
        u.write(B + 4, 0);
        assert_eq!(u.read(B + 6), 0xb0 | msr::DCTS | msr::DDSR | msr::DDCD);
        assert_eq!(send(&mut u, b"ok\n"), ["ok"]);
    }

    #[test]
    fn interrupt_priorities() {
        let mut u = uart();
        u.write(B + 2, 0x01);
        u.write(B + 1, ier::MASK);
        u.write(B + 4, mcr::LOOP | mcr::DTR); // a modem delta
        assert_eq!(u.read(B + 2), 0xc2, "THRE (from enabling ETBEI) over modem status");
        assert_eq!(u.read(B + 2), 0xc0, "then modem status");
        u.write(B, b'1'); // loopback: received, and THR empty again
        assert_eq!(u.read(B + 2), 0xc4, "received data over THRE (trigger 1)");
        for _ in 0..16 {
            u.write(B, b'2');
        }
        assert_eq!(u.read(B + 2), 0xc6, "overrun: line status first");
        u.read(B + 5);
        assert_eq!(u.read(B + 2), 0xc4);
    }

    proptest! {
        /// Whatever a guest writes and reads, in any order: nothing
        /// panics, LSR always says the transmitter is empty, IER and MCR
        /// keep their reserved bits zero, the FIFO never holds more than
        /// 16, and lines stay bounded.
        #[test]
        fn any_access_sequence_keeps_the_invariants(
            ops in proptest::collection::vec((any::<bool>(), 0u16..10, any::<u8>(), any::<bool>()), 0..400),
        ) {
            let mut u = uart();
            for (is_write, off, v, input) in ops {
                let port = (B - 1).wrapping_add(off);
                if input {
                    u.push_input(v);
                }
                if is_write {
                    if let Some(line) = u.write(port, v) {
                        prop_assert!(line.len() <= crate::serial_device::MAX_LINE);
                    }
                } else {
                    u.read(port);
                }
                prop_assert!(u.rx_len <= RX_FIFO_SIZE);
                prop_assert_eq!(u.lsr() & 0x60, 0x60);
                prop_assert_eq!(u.ier & !ier::MASK, 0);
                prop_assert_eq!(u.mcr & !mcr::MASK, 0);
                prop_assert_eq!(u.fcr & (fcr::RX_RESET | fcr::TX_RESET), 0);
            }
        }
    }
}

//! The guest's COM1: a 16550 whose transmit path is emulated, so a guest
//! that prints the usual way (poll LSR, write THR) shows up on the host's
//! log, one line at a time, prefixed with its VM's name by the caller.
//! Receive, interrupts and modem lines are not emulated: reads of those
//! registers return 0 and writes are ignored, like an idle port.

use alloc::string::String;

pub const COM1_BASE: u16 = 0x3f8;
const THR: u16 = 0; // transmit holding (write), DLAB=0
const LCR: u16 = 3;
const LSR: u16 = 5;
/// LSR: transmit holding register empty | transmitter empty.
const LSR_IDLE: u8 = 0x60;
const LCR_DLAB: u8 = 0x80;
/// A guest that never sends a newline still gets its output shown.
const MAX_LINE: usize = 200;

#[derive(Default)]
pub struct SerialDevice {
    lcr: u8,
    line: String,
}

impl SerialDevice {
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + 8).contains(&port)
    }

    /// A guest OUT to `port`; returns a finished line to print, if any.
    pub fn write(&mut self, port: u16, value: u8) -> Option<String> {
        match port - COM1_BASE {
            THR if self.lcr & LCR_DLAB == 0 => self.push(value),
            LCR => {
                self.lcr = value;
                None
            }
            _ => None, // divisor latch, IER, FCR, MCR, scratch
        }
    }

    /// A guest IN from `port`.
    pub fn read(&self, port: u16) -> u8 {
        match port - COM1_BASE {
            LSR => LSR_IDLE,
            LCR => self.lcr,
            _ => 0,
        }
    }

    /// Whatever is left unprinted (when the VM ends).
    pub fn take_partial(&mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| core::mem::take(&mut self.line))
    }

    fn push(&mut self, byte: u8) -> Option<String> {
        match byte {
            b'\n' => Some(core::mem::take(&mut self.line)),
            b'\r' => None,
            // Anything else non-printable is shown escaped, never raw.
            0x20..=0x7e => {
                self.line.push(byte as char);
                (self.line.len() >= MAX_LINE).then(|| core::mem::take(&mut self.line))
            }
            _ => {
                self.line.push_str(&alloc::format!("\\x{byte:02x}"));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(d: &mut SerialDevice, s: &[u8]) -> Vec<String> {
        s.iter().filter_map(|&b| d.write(COM1_BASE, b)).collect()
    }

    #[test]
    fn lines_come_out_whole() {
        let mut d = SerialDevice::default();
        assert_eq!(send(&mut d, b"hello\r\nwor"), ["hello"]);
        assert_eq!(send(&mut d, b"ld\n"), ["world"]);
        assert_eq!(d.take_partial(), None);
        send(&mut d, b"tail");
        assert_eq!(d.take_partial().as_deref(), Some("tail"));
    }

    #[test]
    fn line_status_says_ready_and_dlab_writes_are_not_text() {
        let mut d = SerialDevice::default();
        assert_eq!(d.read(COM1_BASE + 5), 0x60);
        d.write(COM1_BASE + 3, 0x80); // DLAB on: port 0 is the divisor now
        assert_eq!(d.write(COM1_BASE, b'\n'), None);
        d.write(COM1_BASE + 3, 0x03);
        assert_eq!(d.read(COM1_BASE + 3), 0x03);
        assert_eq!(send(&mut d, b"x\n"), ["x"]);
    }

    #[test]
    fn control_bytes_are_escaped_and_long_lines_split() {
        let mut d = SerialDevice::default();
        assert_eq!(send(&mut d, b"a\x1b[31mb\n"), ["a\\x1b[31mb"]);
        let long = [b'z'; MAX_LINE + 5];
        let out = send(&mut d, &long);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_LINE);
        assert!(SerialDevice::claims(0x3fd) && !SerialDevice::claims(0x2f8));
    }
}

//! The guest's COM1 and the line assembler behind every guest's serial
//! output. [`SerialDevice`] is COM1 as the kernel has used it so far: a
//! thin wrapper over the full 16550A model
//! ([`crate::devices::uart16550::Uart16550`]) at [`COM1_BASE`].
//! [`LineBuffer`] turns transmitted bytes into host log lines, one at a
//! time, prefixed with its VM's name by the caller.
//!
//! Guest bytes never reach the host log raw: [`escape_guest_text`] keeps
//! printable ASCII, writes a backslash as `\\` and every other byte as
//! `\xNN`, so a guest can neither end the host's line early (no raw `\n`
//! or `\r`), nor send terminal control sequences, nor make an escape look
//! like text it typed. A line here is at most [`MAX_LINE`] characters of
//! that escaped text, whatever the guest sends, so the buffer is bounded.

use crate::devices::uart16550::Uart16550;
use alloc::string::String;

pub const COM1_BASE: u16 = 0x3f8;
/// The longest line [`LineBuffer`] hands out, in characters of escaped
/// text; a guest that never sends a newline still gets its output shown.
pub const MAX_LINE: usize = 200;

/// The longest escape of one byte (`\xNN`).
const MAX_ESCAPE: usize = 4;

/// `bytes` from a guest, escaped for the host log: printable ASCII
/// (0x20..=0x7e) as itself except the backslash, which becomes `\\`;
/// every other byte (`\n`, `\r`, control bytes, anything above 0x7e)
/// becomes `\xNN` in lower-case hex. At most 4 characters per input byte.
pub fn escape_guest_text(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        push_escaped(&mut out, b);
    }
    out
}

/// How many characters [`push_escaped`] adds for `byte`.
fn escaped_len(byte: u8) -> usize {
    match byte {
        b'\\' => 2,
        0x20..=0x7e => 1,
        _ => MAX_ESCAPE,
    }
}

fn push_escaped(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match byte {
        b'\\' => out.push_str("\\\\"),
        0x20..=0x7e => out.push(byte as char),
        _ => {
            out.push_str("\\x");
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0xf)] as char);
        }
    }
}

/// Assembles transmitted bytes into escaped lines: `\n` ends a line, `\r`
/// is dropped, every other byte is escaped ([`escape_guest_text`]), and a
/// line that would grow past [`MAX_LINE`] characters is handed out before
/// the byte that does not fit. Holds at most [`MAX_LINE`] characters,
/// whatever the guest sends.
#[derive(Default)]
pub struct LineBuffer {
    line: String,
}

impl LineBuffer {
    /// One transmitted byte; returns a finished line, if any.
    pub fn push(&mut self, byte: u8) -> Option<String> {
        match byte {
            b'\n' => Some(core::mem::take(&mut self.line)),
            b'\r' => None,
            _ => {
                // An escape never straddles two lines: if it does not fit,
                // the line so far goes out and the escape starts the next.
                // (A line that is just full waits for the next byte, so a
                // full line and its newline make one line, not two.)
                let done = (self.line.len() + escaped_len(byte) > MAX_LINE).then(|| core::mem::take(&mut self.line));
                push_escaped(&mut self.line, byte);
                done
            }
        }
    }

    /// Whatever is left unprinted (when the VM ends).
    pub fn take_partial(&mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| core::mem::take(&mut self.line))
    }
}

/// COM1 (ports 0x3f8-0x3ff) as the kernel routes it today: the 16550A
/// model of [`crate::devices::uart16550`] at [`COM1_BASE`].
pub struct SerialDevice {
    uart: Uart16550,
}

impl Default for SerialDevice {
    fn default() -> Self {
        SerialDevice { uart: Uart16550::new(COM1_BASE) }
    }
}

impl SerialDevice {
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + 8).contains(&port)
    }

    /// A guest OUT to `port`; returns a finished line to print, if any.
    pub fn write(&mut self, port: u16, value: u8) -> Option<String> {
        self.uart.write(port, value)
    }

    /// A guest IN from `port`. Takes `&mut self`: on a 16550 reading IIR,
    /// LSR, MSR or RBR changes state.
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read(port)
    }

    /// Whatever is left unprinted (when the VM ends).
    pub fn take_partial(&mut self) -> Option<String> {
        self.uart.take_partial()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        assert_eq!(d.take_partial().as_deref(), Some("zzzzz"));
    }

    #[test]
    fn claims_exactly_the_eight_com1_ports() {
        assert!(SerialDevice::claims(0x3f8) && SerialDevice::claims(0x3fd) && SerialDevice::claims(0x3ff));
        assert!(!SerialDevice::claims(0x3f7) && !SerialDevice::claims(0x400) && !SerialDevice::claims(0x2f8));
        assert!(!SerialDevice::claims(0) && !SerialDevice::claims(0xffff));
    }

    #[test]
    fn the_escape_of_every_byte() {
        assert_eq!(escape_guest_text(b""), "");
        assert_eq!(escape_guest_text(b" az~AZ09!"), " az~AZ09!");
        assert_eq!(escape_guest_text(b"\\"), "\\\\");
        assert_eq!(escape_guest_text(b"a\nb\rc\0"), "a\\x0ab\\x0dc\\x00");
        assert_eq!(escape_guest_text(b"\x1f\x7f\x80\xab\xff"), "\\x1f\\x7f\\x80\\xab\\xff");
        // The guest typing the four characters of an escape is not the escape.
        assert_eq!(escape_guest_text(b"\\x1b"), "\\\\x1b");
        assert_ne!(escape_guest_text(b"\\x1b"), escape_guest_text(b"\x1b"));
        // UTF-8 is bytes like any other: shown, not interpreted.
        assert_eq!(escape_guest_text("é".as_bytes()), "\\xc3\\xa9");
        for b in 0..=255u8 {
            let e = escape_guest_text(&[b]);
            assert_eq!(e.len(), escaped_len(b), "byte {b:#x}");
            assert!(e.bytes().all(|c| (0x20..=0x7e).contains(&c)), "byte {b:#x}: {e:?}");
            assert_eq!(unescape(&e), Some(vec![b]), "byte {b:#x}");
        }
    }

    #[test]
    fn the_serial_line_uses_the_same_escapes() {
        let mut d = SerialDevice::default();
        assert_eq!(send(&mut d, b"C:\\dir \x07\xff\r\n"), ["C:\\\\dir \\x07\\xff"]);
        // A forged result line stays one guest line with no line break in it.
        assert_eq!(send(&mut d, b"\x00\x0dHV-EXIT: 0x10 success\n"), ["\\x00HV-EXIT: 0x10 success"]);
        assert_eq!(send(&mut d, b"\n"), [""]);
    }

    #[test]
    fn control_bytes_alone_cannot_grow_a_line_past_the_limit() {
        let mut d = SerialDevice::default();
        // Only escapes: 50 of them (200 characters) fill a line exactly.
        let out = send(&mut d, &[0x1b; 50 * 3 + 1]);
        assert_eq!(out, vec!["\\x1b".repeat(50); 3]);
        assert_eq!(d.take_partial().as_deref(), Some("\\x1b"));
        // 199 characters and a backslash: the 2-character escape does not
        // fit, so the 199 go out alone and the escape starts the next line.
        let mut text = vec![b'a'; MAX_LINE - 1];
        text.push(b'\\');
        assert_eq!(send(&mut d, &text), ["a".repeat(MAX_LINE - 1)]);
        assert_eq!(d.take_partial().as_deref(), Some("\\\\"));
        // 196 characters and a 4-character escape fill the line exactly;
        // it goes out with the next byte, a newline adds no empty line.
        let mut text = vec![b'b'; MAX_LINE - 4];
        text.extend([0x01, b'\n']);
        assert_eq!(send(&mut d, &text), ["b".repeat(MAX_LINE - 4) + "\\x01"]);
        assert_eq!(d.take_partial(), None);
        // 197 and a 4-character escape: the escape moves to the next line.
        let mut text = vec![b'c'; MAX_LINE - 3];
        text.extend([0x02, b'\n']);
        assert_eq!(send(&mut d, &text), ["c".repeat(MAX_LINE - 3), "\\x02".into()]);
        // 198 and a backslash fill the line exactly; the next byte starts
        // a new line.
        let mut text = vec![b'd'; MAX_LINE - 2];
        text.extend(b"\\e");
        assert_eq!(send(&mut d, &text), ["d".repeat(MAX_LINE - 2) + "\\\\"]);
        assert_eq!(d.take_partial().as_deref(), Some("e"));
    }

    /// The bytes behind escaped text, or None if it is not well-formed
    /// (a raw byte outside 0x20..=0x7e, a cut or unknown escape).
    fn unescape(s: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut it = s.bytes();
        while let Some(c) = it.next() {
            match c {
                b'\\' => match it.next()? {
                    b'\\' => out.push(b'\\'),
                    b'x' => {
                        let hex = [it.next()?, it.next()?];
                        let hex = core::str::from_utf8(&hex).ok()?;
                        if hex.bytes().any(|h| h.is_ascii_uppercase()) {
                            return None;
                        }
                        out.push(u8::from_str_radix(hex, 16).ok()?);
                    }
                    _ => return None,
                },
                0x20..=0x7e => out.push(c),
                _ => return None,
            }
        }
        Some(out)
    }

    proptest! {
        #[test]
        fn escaping_is_bounded_printable_and_reversible(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let e = escape_guest_text(&bytes);
            prop_assert!(e.len() <= 4 * bytes.len());
            prop_assert!(!e.contains('\n') && !e.contains('\r'));
            prop_assert_eq!(unescape(&e), Some(bytes));
        }

        /// Whatever the guest sends: every line (and the partial one) is at
        /// most MAX_LINE characters, each is well-formed on its own (no
        /// escape split across lines), a line the guest did not end is cut
        /// only when the next byte's escape does not fit, and together the
        /// lines are exactly the guest's bytes without its \r and \n.
        #[test]
        fn serial_lines_are_bounded_whole_and_lossless(
            bytes in proptest::collection::vec(
                prop_oneof![any::<u8>(), Just(b'\n'), Just(b'\r'), Just(b'\\'), Just(0x1b), Just(b'a')], 0..2000),
        ) {
            let mut d = SerialDevice::default();
            let mut got = Vec::new();
            let mut check = |line: &str| -> Result<(), TestCaseError> {
                prop_assert!(line.len() <= MAX_LINE, "{} characters", line.len());
                let raw = unescape(line);
                prop_assert!(raw.is_some(), "not well-formed: {:?}", line);
                got.extend(raw.unwrap());
                Ok(())
            };
            for &b in &bytes {
                if let Some(line) = d.write(COM1_BASE, b) {
                    check(&line)?;
                    if b != b'\n' {
                        prop_assert!(line.len() + escaped_len(b) > MAX_LINE, "cut at {} before {:#x}", line.len(), b);
                    }
                }
            }
            let partial = d.take_partial();
            if let Some(p) = &partial {
                prop_assert!(!p.is_empty());
                check(p)?;
            }
            let want: Vec<u8> = bytes.iter().copied().filter(|&b| b != b'\n' && b != b'\r').collect();
            prop_assert_eq!(got, want);
        }
    }
}

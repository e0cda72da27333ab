//! The PC's 8042 keyboard controller at 0x60 (data) and 0x64 (status on
//! read, command on write), with nothing plugged into its keyboard and
//! auxiliary (mouse) ports.
//!
//! A controller, not an empty bus: Linux's reboot path (`kb_wait`, then
//! `outb(0xfe, 0x64)`) needs a status register whose input-buffer-full bit
//! clears, and with 0x64 reading 0xff (no controller) it waits 131 ms
//! first. So Linux's i8042 driver finds a controller: the flush in
//! i8042_controller_check sees the output buffer empty, the self-test
//! (0xaa) answers 0x55, the command byte reads and writes back, the AUX
//! loopback (0xd3) and AUX enable/disable work. A byte sent to either
//! device gets what a controller with no device attached answers: 0xfe
//! with the time-out status bit, so atkbd and psmouse give up at once
//! (their commands are NAKed) instead of each waiting out its timeout.
//!
//! Commands: 0x20-0x3f / 0x60-0x7f read / write byte 0-31 of the
//! controller RAM (byte 0 is the command byte), 0xa7 / 0xa8 disable /
//! enable AUX, 0xa9 AUX interface test (0: no error), 0xaa self-test
//! (0x55), 0xab keyboard interface test (0), 0xad / 0xae disable /
//! enable the keyboard, 0xd0 / 0xd1 read / write the output port, 0xd2 /
//! 0xd3 put a byte in the output buffer as from the keyboard / AUX, 0xd4
//! send a byte to the AUX device, 0xf0-0xff pulse output port lines low
//! (bit 0 of the command clear pulses the reset line). Others are
//! ignored.
//!
//! Resets: pulsing the reset line (0xfe, and every 0xf0-0xfe with bit 0
//! clear) and writing the output port with bit 0 (reset) clear, the old
//! A20/reset way. [`I8042::write`] reports them; the controller's state is
//! not reset, the VM ends. A20 is remembered in the output port but not
//! acted on (always enabled).
//!
//! Interrupts: ISA IRQ 1 is high while the output buffer holds a byte not
//! from AUX and the command byte enables it (bit 0), IRQ 12 for an AUX
//! byte (bit 1), as on a PC (the controller's responses to commands
//! included). The input buffer is never full: every write is taken at
//! once. The output buffer holds one byte; a new one replaces an unread
//! one (no command answers more than one byte).

/// The data port.
pub const DATA: u16 = 0x60;
/// Status (read) and command (write).
pub const COMMAND: u16 = 0x64;
pub const KBD_IRQ: u8 = 1;
pub const AUX_IRQ: u8 = 12;

/// Status register bits.
pub mod status {
    pub const OBF: u8 = 1 << 0;
    pub const IBF: u8 = 1 << 1;
    pub const SYS: u8 = 1 << 2;
    /// The last write was to 0x64.
    pub const CMD: u8 = 1 << 3;
    /// The keyboard is not inhibited (keylock off).
    pub const UNLOCKED: u8 = 1 << 4;
    pub const AUXDATA: u8 = 1 << 5;
    pub const TIMEOUT: u8 = 1 << 6;
}

/// Command byte (controller RAM byte 0) bits.
pub mod ctr {
    pub const KBDINT: u8 = 1 << 0;
    pub const AUXINT: u8 = 1 << 1;
    pub const SYS: u8 = 1 << 2;
    pub const KBDDIS: u8 = 1 << 4;
    pub const AUXDIS: u8 = 1 << 5;
    pub const XLATE: u8 = 1 << 6;
}

/// Output port bits.
pub mod out_port {
    /// Low: the CPU is held in reset.
    pub const RESET: u8 = 1 << 0;
    pub const A20: u8 = 1 << 1;
    pub const KBD_IRQ: u8 = 1 << 4;
    pub const AUX_IRQ: u8 = 1 << 5;
}

/// The command byte a PC BIOS (SeaBIOS) leaves: translation, AUX off,
/// POST passed, keyboard interrupt on.
pub const DEFAULT_CTR: u8 = ctr::XLATE | ctr::AUXDIS | ctr::SYS | ctr::KBDINT;

/// A keyboard or mouse command's answer when no device is there.
const NO_DEVICE: u8 = 0xfe;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Output {
    byte: u8,
    aux: bool,
    timeout: bool,
}

#[derive(Clone, Debug)]
pub struct I8042 {
    ram: [u8; 32],
    output: Option<Output>,
    /// What 0x60 reads with the output buffer empty: the last byte.
    last: u8,
    /// A command waiting for its byte on 0x60.
    pending: Option<u8>,
    output_port: u8,
    last_was_command: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    pub fn new() -> Self {
        let mut ram = [0; 32];
        ram[0] = DEFAULT_CTR;
        I8042 {
            ram,
            output: None,
            last: 0,
            pending: None,
            output_port: out_port::RESET | out_port::A20,
            last_was_command: false,
        }
    }

    /// Whether `port` is 0x60 or 0x64.
    pub fn claims(port: u16) -> bool {
        matches!(port, DATA | COMMAND)
    }

    /// The command byte.
    pub fn command_byte(&self) -> u8 {
        self.ram[0]
    }

    /// ISA IRQ 1's level.
    pub fn kbd_irq(&self) -> bool {
        self.output.is_some_and(|o| !o.aux) && self.ram[0] & ctr::KBDINT != 0
    }

    /// ISA IRQ 12's level.
    pub fn aux_irq(&self) -> bool {
        self.output.is_some_and(|o| o.aux) && self.ram[0] & ctr::AUXINT != 0
    }

    /// A guest IN of one byte.
    pub fn read(&mut self, port: u16) -> u8 {
        if port == COMMAND {
            return self.status();
        }
        if let Some(o) = self.output.take() {
            self.last = o.byte;
        }
        self.last
    }

    fn status(&self) -> u8 {
        let mut s = status::UNLOCKED;
        if self.ram[0] & ctr::SYS != 0 {
            s |= status::SYS;
        }
        if self.last_was_command {
            s |= status::CMD;
        }
        if let Some(o) = self.output {
            s |= status::OBF;
            if o.aux {
                s |= status::AUXDATA;
            }
            if o.timeout {
                s |= status::TIMEOUT;
            }
        }
        s
    }

    fn put(&mut self, byte: u8, aux: bool, timeout: bool) {
        self.output = Some(Output { byte, aux, timeout });
    }

    fn answer(&mut self, byte: u8) {
        self.put(byte, false, false);
    }

    /// A guest OUT of one byte; true if it asks for a system reset.
    pub fn write(&mut self, port: u16, value: u8) -> bool {
        self.last_was_command = port == COMMAND;
        if port == COMMAND {
            self.command(value)
        } else {
            self.data(value)
        }
    }

    fn command(&mut self, c: u8) -> bool {
        self.pending = None;
        match c {
            0x20..=0x3f => self.answer(self.ram[usize::from(c & 0x1f)]),
            0x60..=0x7f | 0xd1..=0xd4 => self.pending = Some(c),
            0xa7 => self.ram[0] |= ctr::AUXDIS,
            0xa8 => self.ram[0] &= !ctr::AUXDIS,
            0xa9 | 0xab => self.answer(0x00),
            0xaa => self.answer(0x55),
            0xad => self.ram[0] |= ctr::KBDDIS,
            0xae => self.ram[0] &= !ctr::KBDDIS,
            0xd0 => {
                // Bits 4 and 5 are the IRQ 1 and 12 outputs.
                let mut v = self.output_port & !(out_port::KBD_IRQ | out_port::AUX_IRQ);
                if self.kbd_irq() {
                    v |= out_port::KBD_IRQ;
                }
                if self.aux_irq() {
                    v |= out_port::AUX_IRQ;
                }
                self.answer(v);
            }
            // Pulse the output port lines whose bit is 0 for 6 us; bit 0
            // is the reset line.
            0xf0..=0xff => return c & 1 == 0,
            _ => {}
        }
        false
    }

    fn data(&mut self, v: u8) -> bool {
        match self.pending.take() {
            Some(c @ 0x60..=0x7f) => self.ram[usize::from(c & 0x1f)] = v,
            Some(0xd1) => {
                self.output_port = v;
                if v & out_port::RESET == 0 {
                    return true;
                }
            }
            Some(0xd2) => self.put(v, false, false),
            Some(0xd3) => self.put(v, true, false),
            // To the mouse, which is not there.
            Some(_) => self.put(NO_DEVICE, true, true),
            // To the keyboard, which is not there.
            None => self.put(NO_DEVICE, false, true),
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- Linux 6.1 drivers/input/serio/i8042.c ------------------------

    const I8042_CTL_TIMEOUT: u32 = 10000;

    /// i8042_wait_write / i8042_wait_read: polls (50 us apart), or None
    /// on a timeout.
    fn wait(k: &mut I8042, ready: impl Fn(u8) -> bool) -> Option<u32> {
        (0..I8042_CTL_TIMEOUT).find(|_| ready(k.read(COMMAND)))
    }

    /// __i8042_command: the command's parameter and answer counts are in
    /// its bits 15:12 and 11:8.
    fn i8042_command(k: &mut I8042, param: &mut [u8], command: u16) -> Result<(), &'static str> {
        wait(k, |s| s & status::IBF == 0).ok_or("wait write")?;
        assert!(!k.write(COMMAND, command as u8));
        for &p in &param[..usize::from((command >> 12) & 0xf)] {
            wait(k, |s| s & status::IBF == 0).ok_or("wait write")?;
            assert!(!k.write(DATA, p));
        }
        for p in param.iter_mut().take(usize::from((command >> 8) & 0xf)) {
            wait(k, |s| s & status::OBF != 0).ok_or("wait read")?;
            if command == 0x11d3 && k.read(COMMAND) & status::AUXDATA == 0 {
                return Err("auxerr");
            }
            *p = k.read(DATA);
        }
        Ok(())
    }

    /// i8042_flush: reads while OBF, at most I8042_BUFFER_SIZE (16).
    fn i8042_flush(k: &mut I8042) -> Result<usize, ()> {
        let mut n = 0;
        while k.read(COMMAND) & status::OBF != 0 {
            if n == 16 {
                return Err(());
            }
            k.read(DATA);
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn linux_i8042_probe_finds_a_controller() {
        let mut k = I8042::new();
        // i8042_controller_check.
        assert_eq!(i8042_flush(&mut k), Ok(0), "not 0xff: a controller");
        // i8042_controller_selftest.
        let mut p = [0];
        i8042_command(&mut k, &mut p, 0x01aa).unwrap();
        assert_eq!(p[0], 0x55);
        // i8042_controller_init: two equal CTR reads, keylock, write back.
        let (mut a, mut b) = ([0], [0]);
        i8042_command(&mut k, &mut a, 0x0120).unwrap();
        i8042_command(&mut k, &mut b, 0x0120).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], DEFAULT_CTR);
        assert_ne!(k.read(COMMAND) & status::UNLOCKED, 0, "no keylock warning");
        let mut ctr = [(a[0] | ctr::KBDDIS) & !ctr::KBDINT];
        i8042_command(&mut k, &mut ctr, 0x1060).unwrap();
        assert_eq!(k.command_byte(), 0x74);
        assert_eq!(i8042_flush(&mut k), Ok(0));
        // i8042_check_aux: the loopback with AUXDATA, then the AUXDIS
        // toggles read back through the command byte.
        let mut p = [0x5a];
        i8042_command(&mut k, &mut p, 0x11d3).unwrap();
        assert_eq!(p, [0x5a]);
        i8042_command(&mut k, &mut [], 0x00a7).unwrap();
        let mut c = [0];
        i8042_command(&mut k, &mut c, 0x0120).unwrap();
        assert_ne!(c[0] & ctr::AUXDIS, 0);
        i8042_command(&mut k, &mut [], 0x00a8).unwrap();
        i8042_command(&mut k, &mut c, 0x0120).unwrap();
        assert_eq!(c[0] & ctr::AUXDIS, 0);
        // The AUX IRQ test: AUXINT on, loopback without reading; IRQ 12
        // goes high (the handler then reads the byte).
        let mut ctr = [c[0] | ctr::AUXINT];
        i8042_command(&mut k, &mut ctr, 0x1060).unwrap();
        i8042_command(&mut k, &mut [0xa5], 0x10d3).unwrap();
        assert!(k.aux_irq() && !k.kbd_irq());
        assert_eq!(k.read(COMMAND) & (status::OBF | status::AUXDATA), status::OBF | status::AUXDATA);
        assert_eq!(k.read(DATA), 0xa5);
        assert!(!k.aux_irq());
        // The keyboard interface test and enabling the port.
        let mut p = [0xff];
        i8042_command(&mut k, &mut p, 0x01ab).unwrap();
        assert_eq!(p, [0]);
        i8042_command(&mut k, &mut [], 0x00ae).unwrap();
        assert_eq!(k.command_byte() & ctr::KBDDIS, 0);
    }

    #[test]
    fn no_keyboard_or_mouse_answers_at_once() {
        let mut k = I8042::new();
        // atkbd's ATKBD_CMD_GETID (0xf2), written to 0x60.
        assert!(!k.write(DATA, 0xf2));
        assert_eq!(k.read(COMMAND) & (status::OBF | status::TIMEOUT | status::AUXDATA), status::OBF | status::TIMEOUT);
        assert!(k.kbd_irq(), "KBDINT is on by default");
        assert_eq!(k.read(DATA), 0xfe);
        assert_eq!(k.read(COMMAND) & (status::OBF | status::TIMEOUT), 0);
        assert!(!k.kbd_irq());
        // psmouse through 0xd4.
        k.write(COMMAND, 0xd4);
        k.write(DATA, 0xf2);
        assert_eq!(k.read(COMMAND) & 0x61, status::OBF | status::AUXDATA | status::TIMEOUT);
        assert!(!k.aux_irq(), "AUXINT is off by default");
        assert_eq!(k.read(DATA), 0xfe);
    }

    #[test]
    fn reset_requests() {
        let mut k = I8042::new();
        // Linux's BOOT_KBD reboot: kb_wait (IBF clear), outb(0xfe, 0x64).
        assert_eq!(k.read(COMMAND) & status::IBF, 0);
        assert!(k.write(COMMAND, 0xfe));
        // Other pulses: bit 0 set leaves the reset line alone.
        assert!(!k.write(COMMAND, 0xff));
        assert!(!k.write(COMMAND, 0xfd));
        assert!(k.write(COMMAND, 0xf0));
        // The output port: A20 on, reset line released: no reset; then
        // bit 0 clear.
        k.write(COMMAND, 0xd1);
        assert!(!k.write(DATA, 0xdf));
        k.write(COMMAND, 0xd0);
        assert_eq!(k.read(DATA), 0xdf & !0x30);
        k.write(COMMAND, 0xd1);
        assert!(k.write(DATA, 0xde));
        // A plain keyboard byte is no reset; nor is 0xd1's byte after
        // another command replaced it.
        assert!(!k.write(DATA, 0x00));
        k.write(COMMAND, 0xd1);
        k.write(COMMAND, 0x20);
        assert!(!k.write(DATA, 0x00));
    }

    #[test]
    fn data_port_reads_the_last_byte() {
        let mut k = I8042::new();
        assert_eq!(k.read(DATA), 0, "nothing yet");
        k.write(COMMAND, 0xd2);
        k.write(DATA, 0x1c);
        assert_eq!(k.read(COMMAND) & (status::OBF | status::AUXDATA), status::OBF);
        assert_eq!(k.read(DATA), 0x1c);
        assert_eq!(k.read(DATA), 0x1c, "empty: the last byte again");
        assert_eq!(k.read(COMMAND) & status::OBF, 0);
    }

    #[test]
    fn status_bits() {
        let mut k = I8042::new();
        assert_eq!(k.read(COMMAND), status::UNLOCKED | status::SYS);
        k.write(COMMAND, 0xad);
        assert_eq!(k.read(COMMAND) & status::CMD, status::CMD, "last write was a command");
        k.write(DATA, 0xee);
        assert_eq!(k.read(COMMAND) & status::CMD, 0);
        // SYS follows the command byte.
        k.write(COMMAND, 0x60);
        k.write(DATA, 0x00);
        assert_eq!(k.read(COMMAND) & status::SYS, 0);
        assert_eq!(k.command_byte(), 0);
    }

    #[test]
    fn command_byte_and_ram() {
        let mut k = I8042::new();
        k.write(COMMAND, 0xad);
        k.write(COMMAND, 0xa8);
        k.write(COMMAND, 0x20);
        assert_eq!(k.read(DATA), DEFAULT_CTR & !ctr::AUXDIS | ctr::KBDDIS);
        k.write(COMMAND, 0x7f);
        k.write(DATA, 0x42);
        k.write(COMMAND, 0x3f);
        assert_eq!(k.read(DATA), 0x42);
        // Unknown commands are ignored and expect nothing.
        k.write(COMMAND, 0xc0);
        assert_eq!(k.read(COMMAND) & status::OBF, 0);
        // Interrupts only as the command byte enables them.
        k.write(COMMAND, 0x60);
        k.write(DATA, 0x00);
        k.write(COMMAND, 0xaa);
        assert!(!k.kbd_irq());
        assert_eq!(k.read(DATA), 0x55);
        k.write(COMMAND, 0x60);
        k.write(DATA, ctr::KBDINT);
        k.write(COMMAND, 0xaa);
        assert!(k.kbd_irq(), "a command's answer raises IRQ 1 too");
    }
}

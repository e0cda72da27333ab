//! The 16550 transmit path at COM1, which the hypervisor emulates: poll
//! the line status register until the transmitter holding register is
//! empty (bit 5), then write the byte.

use core::arch::asm;
use core::fmt;

const DATA: u16 = 0x3f8;
const LINE_STATUS: u16 = 0x3fd;
const THR_EMPTY: u8 = 1 << 5;

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O on COM1 has no memory effects.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) };
    v
}

fn outb(port: u16, v: u8) {
    // SAFETY: as above.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
}

pub fn write_byte(b: u8) {
    while inb(LINE_STATUS) & THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
    outb(DATA, b);
}

pub fn write_str(s: &str) {
    s.bytes().for_each(write_byte);
}

/// `core::fmt` onto the serial port.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_str(s);
        Ok(())
    }
}

/// Formats a line onto the serial port.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}

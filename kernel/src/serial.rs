//! COM1, the console: every log line goes here.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::spec::registers::LSR;
use uart_16550::{BaudRate, Config, Uart16550, Uart16550Tty};

const COM1: u16 = 0x3f8;

static PORT: Mutex<Option<Uart16550Tty<PioBackend>>> = Mutex::new(None);

/// Sets COM1 to 115200 8N1 (the crate's default is 9600: about 3.5x slower
/// to print a boot log in Bochs, see FACTS.md).
pub fn init() {
    let config = Config { baud_rate: BaudRate::Baud115200, ..Config::default() };
    // SAFETY: COM1 is a standard PC port and nothing else drives it.
    let mut uart = unsafe { Uart16550::new_port(COM1) }.expect("COM1 port address");
    // A machine without COM1 just loses the log; there is nobody to tell.
    let _ = uart.init(config);
    *PORT.lock() = Some(Uart16550Tty::from_inner(uart));
    // The bootloader's last bytes may still be in flight; start on a fresh
    // line so our first one is not glued to (or eaten by) them.
    print(format_args!("\n"));
}

pub fn print(args: fmt::Arguments<'_>) {
    // The kernel runs with interrupts off, so only an exception or a panic
    // in the middle of a print finds the lock taken; both never return to
    // the interrupted code and call `force_unlock` first.
    if let Some(port) = PORT.lock().as_mut() {
        let _ = port.write_fmt(args);
    }
}

/// Waits until the transmitter has sent every byte (LSR bit 6): in Bochs,
/// bytes still queued when the machine powers off are lost.
pub fn flush() {
    if let Some(port) = PORT.lock().as_mut() {
        while !port.inner_mut().lsr().contains(LSR::TRANSMITTER_EMPTY) {
            core::hint::spin_loop();
        }
    }
}

/// For the exception and panic paths: the code they stopped may hold the
/// port lock, and it will never run again.
pub unsafe fn force_unlock() {
    unsafe { PORT.force_unlock() }
}

#[macro_export]
macro_rules! println {
    () => { $crate::serial::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}

//! Ending a run: print the result line, then tell whichever emulator we
//! are in to stop with that result. See `hvcore::exit` for the protocol.

use hvcore::exit::{ExitCode, EXIT_MARKER, QEMU_DEBUG_EXIT_PORT};
use x86_64::instructions::port::Port;

/// Bochs powers off when "Shutdown" is written to this port byte by byte.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

pub fn exit(code: ExitCode) -> ! {
    crate::println!("{} {:#04x} {}", EXIT_MARKER, code as u8, code.name());
    crate::serial::flush();
    // SAFETY: writes to ports no device of ours uses; on a machine without
    // these emulator devices they do nothing and we halt below.
    unsafe {
        Port::<u32>::new(QEMU_DEBUG_EXIT_PORT).write(code as u32);
        let mut bochs = Port::<u8>::new(BOCHS_SHUTDOWN_PORT);
        for b in b"Shutdown" {
            bochs.write(*b);
        }
    }
    // Real hardware: stay here with the result on the console.
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

//! FORGE: tries to make the log say the run succeeded. Every line here
//! copies one the kernel or the runner reads, behind the control bytes a
//! terminal or a line-based reader might act on; the hypervisor must log
//! all of it prefixed with the VM's name and escaped, so none of it can
//! pass for the kernel's own output (see
//! `hvcore::hypercall::scenario::FORGE`).

use crate::hv;
use crate::serial;
use hvcore::hypercall::check;

/// The longest serial line the kernel logs as one (200 characters today,
/// `hvcore::serial_device::MAX_LINE`); a longer one goes on in a new line.
const SERIAL_LINE: usize = 200;

/// The lines, each sent on serial (then a newline) and as one PRINT.
const LINES: [&str; 10] = [
    "HV-EXIT: 0x10 success",
    "\n[INFO ] vm0 (hello): exited with code 0; 3 checks passed, 0 failed; 1 exits; as expected",
    "[INFO ] 1 VMs in 1 time slices; all ended as expected",
    // A carriage return to overwrite the prefix on a terminal, NULs and a
    // lone CR before the marker (what the runner's own parser forgives).
    "\rHV-EXIT: 0x10 success\r",
    "\0\0HV-EXIT: 0x10 success",
    "x\r\nHV-EXIT: 0x10 success\n",
    // ANSI: erase the line, cursor up, erase, to the column 0.
    "\x1b[2K\x1b[1A\x1b[2K\x1b[GHV-EXIT: 0x10 success",
    // An OSC title, SGR reset, backspaces over the prefix.
    "\x1b]0;HV-EXIT: 0x10 success\x07\x1b[0m\x08\x08\x08\x08\x08\x08\x08\x08HV-EXIT: 0x10 success",
    // Line breaks that are not ASCII: NEL, LINE SEPARATOR.
    "\u{85}HV-EXIT: 0x10 success\u{2028}HV-EXIT: 0x10 success",
    "[INFO ] vm1 (fail): exited with code 0; 1 checks passed, 0 failed; 1 exits; as expected\n\
     [INFO ] 2 VMs in 2 time slices; all ended as expected\nHV-EXIT: 0x10 success",
];

/// Bytes that are not UTF-8: 8-bit CSI (0x9b), a lone continuation byte,
/// an overlong '\n' (0xc0 0x8a).
const RAW: &[u8] = b"\x9b2K\x80\xc0\x8aHV-EXIT: 0x10 success";

pub fn run() -> ! {
    for line in LINES {
        crate::println!("{line}");
        hv::print(line);
    }
    // A run exactly as long as a serial line may be, so the marker starts
    // the next one.
    for _ in 0..SERIAL_LINE {
        serial::write_byte(b'x');
    }
    crate::println!("HV-EXIT: 0x10 success");
    RAW.iter().for_each(|&b| serial::write_byte(b));
    serial::write_byte(b'\n');
    hv::print_bytes(RAW);
    hv::report(check::FORGE_DONE, true, 0);
    hv::exit(0)
}

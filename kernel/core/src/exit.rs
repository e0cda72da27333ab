//! How a run ends: the code the kernel reports and the runner turns into
//! its own exit status. Shared by the kernel and `boot/` so they agree.
//!
//! The kernel prints `HV-EXIT: <code> <name>` as its last serial line, then
//! writes the code to QEMU's isa-debug-exit port and powers Bochs off. QEMU
//! exits with `(code << 1) | 1`; Bochs' own status says nothing, so the
//! runner reads the serial line there.

/// The marker that starts the last line of every run.
pub const EXIT_MARKER: &str = "HV-EXIT:";

/// QEMU's `isa-debug-exit` device port (see `boot/`'s QEMU command line).
pub const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Everything the run was asked to do succeeded.
    Success = 0x10,
    /// A check failed, a panic, or an unexpected exception.
    Failure = 0x11,
    /// The CPU (or firmware) does not give us what VMX needs.
    NoVmx = 0x12,
}

impl ExitCode {
    pub const ALL: [ExitCode; 3] = [ExitCode::Success, ExitCode::Failure, ExitCode::NoVmx];

    pub fn name(self) -> &'static str {
        match self {
            ExitCode::Success => "success",
            ExitCode::Failure => "failure",
            ExitCode::NoVmx => "no-vmx",
        }
    }

    pub fn from_code(code: u8) -> Option<ExitCode> {
        Self::ALL.into_iter().find(|c| *c as u8 == code)
    }

    /// The status QEMU exits with after the kernel writes `self` to the
    /// isa-debug-exit port.
    pub fn qemu_status(self) -> i32 {
        ((self as i32) << 1) | 1
    }

    pub fn from_qemu_status(status: i32) -> Option<ExitCode> {
        Self::ALL.into_iter().find(|c| c.qemu_status() == status)
    }

    /// Parses an `HV-EXIT: 0x10 success` line (anywhere in `line`).
    pub fn from_serial_line(line: &str) -> Option<ExitCode> {
        let rest = &line[line.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
        let hex = rest.split_whitespace().next()?.strip_prefix("0x")?;
        Self::from_code(u8::from_str_radix(hex, 16).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_status_round_trips_and_differs() {
        for c in ExitCode::ALL {
            assert_eq!(ExitCode::from_qemu_status(c.qemu_status()), Some(c));
        }
        assert_eq!(ExitCode::Success.qemu_status(), 33);
        // QEMU's own failures (1) and a plain exit (0) are not any of ours.
        assert_eq!(ExitCode::from_qemu_status(0), None);
        assert_eq!(ExitCode::from_qemu_status(1), None);
    }

    #[test]
    fn parses_the_serial_line_the_kernel_prints() {
        let line = alloc::format!("{} {:#04x} {}", EXIT_MARKER, ExitCode::NoVmx as u8, "no-vmx");
        assert_eq!(ExitCode::from_serial_line(&line), Some(ExitCode::NoVmx));
        assert_eq!(ExitCode::from_serial_line("\0junk HV-EXIT: 0x10 success\r"), Some(ExitCode::Success));
        assert_eq!(ExitCode::from_serial_line("HV-EXIT: 0x99 what"), None);
        assert_eq!(ExitCode::from_serial_line("no marker"), None);
    }
}

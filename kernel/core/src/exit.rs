//! How a run ends: the code the kernel reports and the runner turns into
//! its own exit status. Shared by the kernel and `boot/` so they agree.
//!
//! The kernel prints `HV-EXIT: <code> <name>` as its last serial line, then
//! writes the code to QEMU's isa-debug-exit port and powers Bochs off. QEMU
//! exits with `(code << 1) | 1`, and that status is the verdict there (no
//! guest can reach port 0xf4: every guest port access exits to us). Bochs'
//! own status says nothing, so the runner reads the serial line there; the
//! line counts only as the kernel prints it, alone on its line, so a guest
//! (whose text is always logged after a `[INFO ] [vmN] ` prefix, escaped)
//! cannot forge it.

use alloc::string::String;

/// The marker that starts the last line of every run.
pub const EXIT_MARKER: &str = "HV-EXIT:";

/// The marker of the line that tells how one VM ended, printed the moment
/// it ends, alone on its line like [`EXIT_MARKER`]:
/// `HV-VM: <vm> <label> exited=<code>` (the guest program's EXIT),
/// `HV-VM: <vm> <label> debug-exit=<status>` (a write of `status` to port
/// 0xf4, as QEMU's isa-debug-exit) or `HV-VM: <vm> <label> stopped: <cause>`.
/// Runners such as scripts/kvm-unit-tests.py read it.
pub const VM_END_MARKER: &str = "HV-VM:";

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

    /// The line the kernel prints for `self`: `HV-EXIT: 0x10 success`.
    pub fn serial_line(self) -> String {
        alloc::format!("{} {:#04x} {}", EXIT_MARKER, self as u8, self.name())
    }

    /// Parses the kernel's result line: exactly [`ExitCode::serial_line`],
    /// except that leading NUL bytes (Bochs has turned a `\n` into `\0`
    /// at start-up) and a trailing `\r` are allowed. Anything else before
    /// the marker (a log prefix such as `[INFO ] [vm0] `, a space) or after
    /// the name makes it not the kernel's line.
    pub fn from_serial_line(line: &str) -> Option<ExitCode> {
        let line = line.trim_start_matches('\0');
        let line = line.strip_suffix('\r').unwrap_or(line);
        if !line.starts_with(EXIT_MARKER) {
            return None; // the common case: no allocation
        }
        Self::ALL.into_iter().find(|c| line == c.serial_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in ExitCode::ALL {
            assert_eq!(ExitCode::from_code(c as u8), Some(c));
        }
        for other in [0, 1, 0x0f, 0x13, 0xff] {
            assert_eq!(ExitCode::from_code(other), None);
        }
    }

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
        // kernel/src/power.rs prints this format.
        let line = alloc::format!("{} {:#04x} {}", EXIT_MARKER, ExitCode::NoVmx as u8, "no-vmx");
        assert_eq!(line, ExitCode::NoVmx.serial_line());
        assert_eq!(ExitCode::from_serial_line(&line), Some(ExitCode::NoVmx));
        for c in ExitCode::ALL {
            assert_eq!(ExitCode::from_serial_line(&c.serial_line()), Some(c));
        }
        assert_eq!(ExitCode::Success.serial_line(), "HV-EXIT: 0x10 success");
        assert_eq!(ExitCode::from_serial_line("HV-EXIT: 0x10 success"), Some(ExitCode::Success));
        assert_eq!(ExitCode::from_serial_line("HV-EXIT: 0x11 failure\r"), Some(ExitCode::Failure));
        assert_eq!(ExitCode::from_serial_line("\0\0HV-EXIT: 0x12 no-vmx\r"), Some(ExitCode::NoVmx));
    }

    #[test]
    fn only_the_kernels_own_line_counts() {
        for forged in [
            "[INFO ] [vm0] HV-EXIT: 0x10 success",
            "x HV-EXIT: 0x10 success",
            " HV-EXIT: 0x10 success",
            "\0junk HV-EXIT: 0x10 success\r",
            "\rHV-EXIT: 0x10 success",
            "HV-EXIT: 0x10 success trailing",
            "HV-EXIT: 0x10 success\r\r",
            "HV-EXIT: 0x10 success ",
            "HV-EXIT: 0x10 failure",
            "HV-EXIT: 0x10",
            "HV-EXIT: 0X10 success",
            "HV-EXIT: 16 success",
            "HV-EXIT:  0x10 success",
            "HV-EXIT: 0x99 what",
            "HV-EXIT:",
            "no marker",
            "",
            "\0",
        ] {
            assert_eq!(ExitCode::from_serial_line(forged), None, "{forged:?}");
        }
    }
}

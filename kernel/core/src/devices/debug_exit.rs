//! QEMU's `isa-debug-exit` as kvm-unit-tests configures it
//! (`-device isa-debug-exit,iobase=0xf4,iosize=0x4`): ports 0xf4-0xf7.
//!
//! QEMU (hw/misc/debugexit.c): a write of any size from 1 to 4 bytes to
//! any of its ports ends the machine; QEMU's own process then exits with
//! `(value << 1) | 1`, so a guest cannot make it exit 0. We keep the value
//! the guest wrote (cut to the access size) as the VM's status; the VM's
//! owner may map it the way QEMU does with [`qemu_exit_code`]. Reads
//! return 0, as QEMU's read handler does.

/// The first port.
pub const BASE: u16 = 0xf4;
/// Ports decoded (`iosize=0x4`).
pub const PORTS: u16 = 4;

/// The exit code QEMU's process ends with for `status`:
/// kvm-unit-tests' `exit(0)` gives 1 (PASS), `exit(1)` 3 (FAIL).
pub fn qemu_exit_code(status: u32) -> u32 {
    (status << 1) | 1
}

/// The device; it has no state (the write that ends the VM is its only
/// effect).
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugExit;

impl DebugExit {
    pub fn claims(port: u16) -> bool {
        port.wrapping_sub(BASE) < PORTS
    }

    /// An IN of `size` bytes.
    pub fn read(&self, _port: u16, _size: u8) -> u32 {
        0
    }

    /// An OUT of `size` bytes (1, 2 or 4): the status the VM ends with,
    /// the value cut to `size` bytes.
    pub fn write(&mut self, _port: u16, size: u8, value: u32) -> u32 {
        match size {
            1 => value & 0xff,
            2 => value & 0xffff,
            _ => value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_exactly_f4_to_f7() {
        assert!((0xf4..=0xf7).all(DebugExit::claims));
        assert!(!DebugExit::claims(0xf3) && !DebugExit::claims(0xf8));
        assert!(!DebugExit::claims(0) && !DebugExit::claims(0xffff));
    }

    #[test]
    fn a_write_is_the_status_cut_to_its_size() {
        let mut d = DebugExit;
        assert_eq!(d.write(0xf4, 4, 0), 0);
        assert_eq!(d.write(0xf4, 4, 1), 1);
        assert_eq!(d.write(0xf4, 4, 0x1234_5678), 0x1234_5678);
        assert_eq!(d.write(0xf4, 2, 0x1234_5678), 0x5678);
        assert_eq!(d.write(0xf4, 1, 0x1234_5678), 0x78);
        assert_eq!(d.write(0xf6, 1, 0x1ff), 0xff, "any of its ports");
    }

    #[test]
    fn reads_are_zero_and_qemu_codes_are_odd() {
        let d = DebugExit;
        assert_eq!(d.read(0xf4, 1), 0);
        assert_eq!(d.read(0xf5, 4), 0);
        assert_eq!(qemu_exit_code(0), 1);
        assert_eq!(qemu_exit_code(1), 3);
        assert_eq!(qemu_exit_code(38), 77, "kvm-unit-tests' SKIP");
    }
}

//! PCI configuration mechanism #1 (PCI Local Bus Spec 3.0, 3.2.2.3.2)
//! with no device behind it, and the PIIX3 reset control register.
//!
//! - CONFIG_ADDRESS, 0xcf8: only a full dword access is the register;
//!   the spec has every other access to that address leave it alone and
//!   run as a normal I/O transaction. Bit 31 enables configuration
//!   cycles, bits 23:2 pick bus, device, function and dword; bits 30:24
//!   are reserved and, like bits 1:0, read as 0.
//! - CONFIG_DATA, 0xcfc-0xcff: any size at any offset inside the four
//!   ports. There is no device, so a configuration read ends in a master
//!   abort (all ones) and a write is dropped; with bit 31 clear the
//!   access is ordinary I/O that nothing answers: all ones as well.
//! - 0xcf9 (a byte): the PIIX3 Reset Control Register: bit 1 chooses a
//!   hard or soft reset, a 0-to-1 transition of bit 2 starts it; bit 3
//!   (full reset, on later ICHs) is kept too.
//! - Every other access to 0xcf8-0xcfb (bytes at 0xcf8, 0xcfa, 0xcfb,
//!   words): refused, so the platform treats it as an unclaimed port.
//!   That is the PC's behaviour: nothing else decodes there. It matters
//!   to Linux, whose probe for mechanism #2 writes and reads back bytes
//!   at 0xcf8 and 0xcfa and must see all ones.

/// The address register.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The reset control register (byte), inside the address register's
/// dword.
pub const RESET_CONTROL: u16 = 0xcf9;
/// The first data port.
pub const CONFIG_DATA: u16 = 0xcfc;
/// The ports this module decodes: 0xcf8-0xcff.
pub const PORTS: core::ops::Range<u16> = CONFIG_ADDRESS..CONFIG_DATA + 4;

/// CONFIG_ADDRESS bits that hold what was written: enable (31) and
/// bus, device, function, register (23:2).
const ADDRESS_WRITABLE: u32 = 0x80ff_fffc;
/// RCR bits kept: system reset type (1), reset CPU (2), full reset (3).
const RCR_KEPT: u8 = 0x0e;
const RCR_RESET_CPU: u8 = 1 << 2;

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciWrite {
    /// Not an access this device takes: an unclaimed port.
    Refused,
    Done,
    /// The guest asked for a platform reset (RCR bit 2 went from 0 to 1).
    Reset,
}

#[derive(Debug, Default)]
pub struct PciHost {
    address: u32,
    rcr: u8,
}

/// All ones for an access of `size` bytes.
fn ones(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

impl PciHost {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `port` is in 0xcf8-0xcff (some accesses there are still
    /// refused; see the module doc).
    pub fn claims(port: u16) -> bool {
        PORTS.contains(&port)
    }

    /// CONFIG_ADDRESS as a 32-bit read returns it.
    pub fn config_address(&self) -> u32 {
        self.address
    }

    /// Whether (port, size) lies inside CONFIG_DATA.
    fn is_data(port: u16, size: u8) -> bool {
        matches!(size, 1 | 2 | 4) && port >= CONFIG_DATA && u32::from(port) + u32::from(size) <= u32::from(CONFIG_DATA) + 4
    }

    /// An IN of `size` bytes at `port`; None if refused.
    pub fn read(&mut self, port: u16, size: u8) -> Option<u32> {
        match (port, size) {
            (CONFIG_ADDRESS, 4) => Some(self.address),
            (RESET_CONTROL, 1) => Some(u32::from(self.rcr)),
            _ if Self::is_data(port, size) => Some(ones(size)),
            _ => None,
        }
    }

    /// An OUT of `size` bytes at `port`.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> PciWrite {
        match (port, size) {
            (CONFIG_ADDRESS, 4) => {
                self.address = value & ADDRESS_WRITABLE;
                PciWrite::Done
            }
            (RESET_CONTROL, 1) => {
                let new = value as u8 & RCR_KEPT;
                let rising = new & !self.rcr & RCR_RESET_CPU != 0;
                self.rcr = new;
                if rising {
                    PciWrite::Reset
                } else {
                    PciWrite::Done
                }
            }
            _ if Self::is_data(port, size) => PciWrite::Done,
            _ => PciWrite::Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kvm-unit-tests' PCI_CONF1_ADDRESS(dev, reg) (lib/x86/asm/pci.h).
    fn conf1(bdf: u32, reg: u32) -> u32 {
        (1 << 31) | (bdf << 8) | reg
    }

    #[test]
    fn config_address_holds_enable_and_bdf_reg_bits_only() {
        let mut p = PciHost::new();
        assert_eq!(p.read(CONFIG_ADDRESS, 4), Some(0));
        assert_eq!(p.write(CONFIG_ADDRESS, 4, 0x8000_0000), PciWrite::Done);
        assert_eq!(p.read(CONFIG_ADDRESS, 4), Some(0x8000_0000), "Linux's type 1 probe");
        p.write(CONFIG_ADDRESS, 4, 0xffff_ffff);
        assert_eq!(p.read(CONFIG_ADDRESS, 4), Some(0x80ff_fffc), "bits 30:24 and 1:0 read 0");
        p.write(CONFIG_ADDRESS, 4, conf1(0x0108, 0x3e));
        assert_eq!(p.config_address(), 0x8001_083c);
        p.write(CONFIG_ADDRESS, 4, 0x7f00_0003);
        assert_eq!(p.config_address(), 0);
    }

    #[test]
    fn data_reads_all_ones_at_every_size_and_offset() {
        let mut p = PciHost::new();
        for enable in [0, 1 << 31] {
            p.write(CONFIG_ADDRESS, 4, enable);
            for off in 0..4 {
                assert_eq!(p.read(CONFIG_DATA + off, 1), Some(0xff));
            }
            assert_eq!(p.read(0xcfc, 2), Some(0xffff));
            assert_eq!(p.read(0xcfd, 2), Some(0xffff));
            assert_eq!(p.read(0xcfe, 2), Some(0xffff));
            assert_eq!(p.read(0xcfc, 4), Some(0xffff_ffff));
            // Past 0xcff: not inside CONFIG_DATA.
            assert_eq!(p.read(0xcff, 2), None);
            assert_eq!(p.read(0xcfd, 4), None);
            assert_eq!(p.read(0xcfc, 3), None);
        }
        // What pci_dev_exists concludes: no device at 00:00.0.
        p.write(CONFIG_ADDRESS, 4, conf1(0, 0));
        assert_eq!(p.read(CONFIG_DATA, 2), Some(0xffff));
    }

    #[test]
    fn data_writes_are_dropped() {
        let mut p = PciHost::new();
        p.write(CONFIG_ADDRESS, 4, conf1(0, 0x10));
        assert_eq!(p.write(CONFIG_DATA, 4, 0), PciWrite::Done);
        assert_eq!(p.write(0xcfe, 2, 0), PciWrite::Done);
        assert_eq!(p.write(0xcff, 1, 0), PciWrite::Done);
        assert_eq!(p.read(CONFIG_DATA, 4), Some(0xffff_ffff));
        assert_eq!(p.config_address(), 0x8000_0010, "data writes leave the address");
        assert_eq!(p.write(0xcfe, 4, 0), PciWrite::Refused);
    }

    #[test]
    fn byte_and_word_accesses_to_the_address_dword_are_not_the_register() {
        let mut p = PciHost::new();
        p.write(CONFIG_ADDRESS, 4, 0x8000_0000);
        // Linux's mechanism #2 probe: byte writes at 0xcf8, 0xcfa, 0xcfb.
        assert_eq!(p.write(0xcfb, 1, 1), PciWrite::Refused);
        assert_eq!(p.write(0xcf8, 1, 0), PciWrite::Refused);
        assert_eq!(p.write(0xcfa, 1, 0), PciWrite::Refused);
        assert_eq!(p.write(0xcf8, 2, 0), PciWrite::Refused);
        assert_eq!(p.write(0xcfa, 2, 0), PciWrite::Refused);
        assert_eq!(p.write(0xcf9, 4, 0), PciWrite::Refused);
        assert_eq!(p.read(0xcf8, 1), None);
        assert_eq!(p.read(0xcfa, 1), None);
        assert_eq!(p.read(0xcf8, 2), None);
        assert_eq!(p.config_address(), 0x8000_0000, "none of them touched the register");
    }

    #[test]
    fn reset_control_starts_a_reset_on_bit_2_rising() {
        let mut p = PciHost::new();
        assert_eq!(p.read(RESET_CONTROL, 1), Some(0));
        // Linux's reboot=pci: read, write bit 1 (hard reset), then bits 1|2.
        assert_eq!(p.write(RESET_CONTROL, 1, 0x02), PciWrite::Done);
        assert_eq!(p.read(RESET_CONTROL, 1), Some(0x02));
        assert_eq!(p.write(RESET_CONTROL, 1, 0x06), PciWrite::Reset);
        assert_eq!(p.write(RESET_CONTROL, 1, 0x06), PciWrite::Done, "no new transition");
        assert_eq!(p.write(RESET_CONTROL, 1, 0xf2), PciWrite::Done);
        assert_eq!(p.read(RESET_CONTROL, 1), Some(0x02), "reserved bits 7:4 and 0 read 0");
        assert_eq!(p.write(RESET_CONTROL, 1, 0x0e), PciWrite::Reset);
        assert_eq!(p.config_address(), 0, "the RCR is not part of CONFIG_ADDRESS");
    }

    #[test]
    fn claims_cf8_to_cff() {
        assert!((0xcf8..=0xcff).all(PciHost::claims));
        assert!(!PciHost::claims(0xcf7) && !PciHost::claims(0xd00));
    }
}

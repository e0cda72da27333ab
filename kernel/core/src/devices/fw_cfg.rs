//! QEMU's firmware configuration device, traditional I/O interface only
//! (QEMU docs/specs/fw_cfg.rst; hw/nvram/fw_cfg.c for what the spec
//! leaves open).
//!
//! - Selector, 0x510: a 16-bit little-endian write selects an item and
//!   resets the data offset to 0. The spec calls it write only; QEMU's
//!   I/O region covers 0x510-0x511 as one, where every byte access (read
//!   or write, either port) is a data register access and a 16-bit read
//!   is not a valid access. We do the same: a byte read of 0x510 reads
//!   data, and a 16-bit read (or any 32-bit access) is refused, which the
//!   platform treats as an unclaimed port.
//! - Data, 0x511: each byte read returns the next byte of the selected
//!   item; past its end, and for an item that does not exist, 0. Writes
//!   are ignored (QEMU has not supported them since v2.4).
//! - The ID item says "traditional interface only" (bit 0, no DMA bit),
//!   and the DMA ports 0x514-0x51b are not claimed.
//! - As in QEMU, bit 14 of the selector (the write channel) does not
//!   change which item is read; bit 15 selects the architecture-local
//!   items (ACPI tables, e820, ...), of which there are none here.
//! - After reset the signature is selected (QEMU's fw_cfg_reset).

/// The selector port (and the first of the combined 2-port region).
pub const SELECTOR: u16 = 0x510;
/// The data port.
pub const DATA: u16 = 0x511;

/// Item keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h).
pub mod key {
    pub const SIGNATURE: u16 = 0x0000;
    pub const ID: u16 = 0x0001;
    pub const RAM_SIZE: u16 = 0x0003;
    pub const NB_CPUS: u16 = 0x0005;
    pub const MAX_CPUS: u16 = 0x000f;
    /// What kvm-unit-tests reads as `FW_CFG_MAX_RAM` (lib/x86/fwcfg.h:
    /// "dummy entries used when running on bare metal", filled there from
    /// its MEMLIMIT variable): the end of the physical memory its
    /// allocator may use above the multiboot `mem_upper`, 0 meaning no
    /// limit (setup.c `find_highmem`). For QEMU this key is
    /// FW_CFG_KERNEL_DATA, the `-kernel` image itself: under QEMU the
    /// guest reads the first 8 bytes of its own ELF segment (for a
    /// kvm-unit-tests `.flat`, the multiboot magic 0x1badb002), an
    /// accident. We answer the top of guest RAM, which says what the
    /// variable means.
    pub const KVM_UNIT_TESTS_MAX_RAM: u16 = 0x0011;
}

/// Selector bit 14: write channel (no effect on reads, as in QEMU).
const WRITE_CHANNEL: u16 = 0x4000;
/// Selector bit 15: the architecture-local items.
const ARCH_LOCAL: u16 = 0x8000;
/// ID bit 0: the traditional interface. (Bit 1, DMA, stays clear.)
const ID_TRADITIONAL: u32 = 1;

pub struct FwCfg {
    selector: u16,
    /// Bytes of the selected item read so far (saturates: an item is at
    /// most 8 bytes, so "past the end" is all that matters).
    offset: u32,
    ram_size: u64,
    cpus: u16,
    max_ram: u64,
}

impl FwCfg {
    /// `ram_size` bytes of guest RAM, `cpus` vCPUs. The
    /// kvm-unit-tests memory limit answers `ram_size` (the top of RAM
    /// while RAM is contiguous from 0); see [`FwCfg::set_max_ram`].
    pub fn new(ram_size: u64, cpus: u16) -> Self {
        FwCfg { selector: key::SIGNATURE, offset: 0, ram_size, cpus, max_ram: ram_size }
    }

    /// The answer to [`key::KVM_UNIT_TESTS_MAX_RAM`]: a layout that puts
    /// RAM above a PCI hole must give the top of RAM here (0 = no limit).
    pub fn set_max_ram(&mut self, limit: u64) {
        self.max_ram = limit;
    }

    /// Whether `port` is one of the two legacy I/O ports.
    pub fn claims(port: u16) -> bool {
        port == SELECTOR || port == DATA
    }

    /// A selector write: `key` becomes the current item, offset 0.
    pub fn select(&mut self, key: u16) {
        self.selector = key;
        self.offset = 0;
    }

    /// The next byte of the selected item (0 past its end).
    pub fn read_data(&mut self) -> u8 {
        let (bytes, len) = self.item(self.selector);
        let i = self.offset as usize;
        self.offset = self.offset.saturating_add(1);
        if i < len {
            bytes[i]
        } else {
            0
        }
    }

    /// An IN of `size` bytes at `port`; None if that is not a valid
    /// access here (not ours, or wider than a byte).
    pub fn read(&mut self, port: u16, size: u8) -> Option<u32> {
        (Self::claims(port) && size == 1).then(|| u32::from(self.read_data()))
    }

    /// An OUT of `size` bytes at `port`; false if that is not a valid
    /// access here. A 16-bit write at the selector selects; a byte write
    /// (to either port) is a data write, ignored.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> bool {
        match (port, size) {
            (SELECTOR, 2) => {
                self.select(value as u16);
                true
            }
            (SELECTOR | DATA, 1) => true,
            _ => false,
        }
    }

    /// The bytes of item `key` and their count (no allocation).
    fn item(&self, key: u16) -> ([u8; 8], usize) {
        fn le(v: &[u8]) -> ([u8; 8], usize) {
            let mut b = [0; 8];
            b[..v.len()].copy_from_slice(v);
            (b, v.len())
        }
        if key & ARCH_LOCAL != 0 {
            return ([0; 8], 0);
        }
        match key & !WRITE_CHANNEL {
            key::SIGNATURE => le(b"QEMU"),
            key::ID => le(&ID_TRADITIONAL.to_le_bytes()),
            key::RAM_SIZE => le(&self.ram_size.to_le_bytes()),
            key::NB_CPUS | key::MAX_CPUS => le(&self.cpus.to_le_bytes()),
            key::KVM_UNIT_TESTS_MAX_RAM => le(&self.max_ram.to_le_bytes()),
            _ => ([0; 8], 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// What kvm-unit-tests' fwcfg_get_u does: select, then `n` byte reads
    /// of the data port, little-endian.
    fn get(f: &mut FwCfg, key: u16, n: usize) -> u64 {
        assert!(f.write(SELECTOR, 2, u32::from(key)));
        (0..n).map(|i| u64::from(f.read(DATA, 1).unwrap()) << (8 * i)).sum()
    }

    fn bytes(f: &mut FwCfg, n: usize) -> Vec<u8> {
        (0..n).map(|_| f.read_data()).collect()
    }

    #[test]
    fn signature_id_and_counts() {
        let mut f = FwCfg::new(256 * MIB, 1);
        assert!(f.write(SELECTOR, 2, 0));
        assert_eq!(bytes(&mut f, 6), b"QEMU\0\0", "4 bytes, then zeros past the end");
        f.select(key::ID);
        assert_eq!(bytes(&mut f, 5), [1, 0, 0, 0, 0], "traditional interface, no DMA");
        assert_eq!(get(&mut f, key::NB_CPUS, 2), 1);
        assert_eq!(get(&mut f, key::MAX_CPUS, 2), 1);
        let mut f = FwCfg::new(256 * MIB, 0x0203);
        f.select(key::NB_CPUS);
        assert_eq!(bytes(&mut f, 3), [0x03, 0x02, 0], "u16 little-endian");
    }

    #[test]
    fn ram_size_is_u64_little_endian() {
        let mut f = FwCfg::new(0x0102_0304_0506_0708, 1);
        f.select(key::RAM_SIZE);
        assert_eq!(bytes(&mut f, 9), [8, 7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(get(&mut f, key::RAM_SIZE, 8), 0x0102_0304_0506_0708);
        let mut f = FwCfg::new(256 * MIB, 1);
        assert_eq!(get(&mut f, key::RAM_SIZE, 8), 0x1000_0000);
        // What kvm-unit-tests' MAX_RAM reads: the RAM size unless set.
        assert_eq!(get(&mut f, key::KVM_UNIT_TESTS_MAX_RAM, 8), 256 * MIB);
        f.set_max_ram(0);
        assert_eq!(get(&mut f, key::KVM_UNIT_TESTS_MAX_RAM, 8), 0);
    }

    #[test]
    fn a_new_selector_resets_the_offset() {
        let mut f = FwCfg::new(MIB, 1);
        f.select(key::SIGNATURE);
        assert_eq!(bytes(&mut f, 2), b"QE");
        assert!(f.write(SELECTOR, 2, 0));
        assert_eq!(bytes(&mut f, 2), b"QE", "reselecting the same item starts over");
        f.select(key::ID);
        f.select(key::SIGNATURE);
        assert_eq!(bytes(&mut f, 4), b"QEMU");
    }

    #[test]
    fn reset_selects_the_signature() {
        let mut f = FwCfg::new(MIB, 1);
        assert_eq!(bytes(&mut f, 4), b"QEMU");
    }

    #[test]
    fn unknown_and_arch_local_keys_read_zero() {
        let mut f = FwCfg::new(MIB, 4);
        for k in [0x0002, 0x0004, 0x0010, 0x0019, 0x0020, 0x3fff, 0x8000, 0x8005, 0xffff] {
            f.select(k);
            assert_eq!(bytes(&mut f, 8), [0; 8], "key {k:#x}");
        }
        // Bit 14 (write channel) does not change the item read.
        f.select(WRITE_CHANNEL | key::NB_CPUS);
        assert_eq!(bytes(&mut f, 2), [4, 0]);
    }

    #[test]
    fn access_sizes_as_qemu_decodes_them() {
        let mut f = FwCfg::new(MIB, 1);
        // A byte write to either port is a data write: ignored, offset kept.
        f.select(key::SIGNATURE);
        assert_eq!(f.read(DATA, 1), Some(u32::from(b'Q')));
        assert!(f.write(DATA, 1, 0xff));
        assert!(f.write(SELECTOR, 1, 0x05), "a byte at 0x510 is not the selector");
        assert_eq!(f.read(DATA, 1), Some(u32::from(b'E')));
        // A byte read of 0x510 reads data too.
        assert_eq!(f.read(SELECTOR, 1), Some(u32::from(b'M')));
        // Wider reads and non-selector wide writes are not valid accesses.
        assert_eq!(f.read(SELECTOR, 2), None);
        assert_eq!(f.read(DATA, 2), None);
        assert_eq!(f.read(SELECTOR, 4), None);
        assert!(!f.write(SELECTOR, 4, 1));
        assert!(!f.write(DATA, 2, 1));
        assert_eq!(f.read(DATA, 1), Some(u32::from(b'U')), "refused accesses changed nothing");
        // Not ours: the DMA ports and neighbours.
        for p in [0x50f, 0x512, 0x514, 0x518, 0x51b] {
            assert!(!FwCfg::claims(p));
            assert_eq!(f.read(p, 1), None);
            assert!(!f.write(p, 2, 0));
        }
        // The high half of a 16-bit selector write counts.
        assert!(f.write(SELECTOR, 2, 0xdead_0003));
        assert_eq!(f.selector, key::RAM_SIZE);
    }

    #[test]
    fn endless_reads_stay_zero_and_bounded() {
        let mut f = FwCfg::new(MIB, 1);
        f.select(key::SIGNATURE);
        f.offset = u32::MAX - 1;
        assert_eq!(bytes(&mut f, 4), [0; 4]);
        assert_eq!(f.offset, u32::MAX);
    }
}

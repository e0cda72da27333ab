//! A VM's virtual PC, as its port I/O sees it: the router from a guest's
//! IN/OUT to the devices of [`crate::devices`].
//!
//! | ports         | device                                          |
//! |---------------|-------------------------------------------------|
//! | 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 | the 8259A pair and ELCR     |
//! | 0x80          | POST code / I/O delay: taken and ignored, reads 0xff |
//! | 0xf4-0xf7     | isa-debug-exit                                  |
//! | 0x3f8-0x3ff   | COM1, a 16550A (IRQ 4)                          |
//! | 0x510-0x511   | fw_cfg (DMA ports 0x514-0x51b not claimed)      |
//! | 0xcf8-0xcff   | PCI configuration mechanism #1, no device; 0xcf9 reset control ([`Platform::take_reset_request`]) |
//!
//! Any other port reads as all ones of the access size (nothing drives
//! the bus), ignores writes, and is counted ([`Platform::unknown_ports`]).
//!
//! Access sizes: a device with registers wider than a byte (debug-exit,
//! fw_cfg, PCI) takes an access that lies wholly inside its ports as one
//! access, or refuses it as that device's spec says (a refused access is
//! an unclaimed one). Every other multi-byte access is split into byte
//! accesses to consecutive ports, lowest first, each routed on its own,
//! as the PC's ISA/LPC bridge does for 8-bit devices: `outw` to 0x20
//! writes 0x20 then 0x21, `inl` from 0x3fe reads MSR, SCR and two
//! unclaimed ports (counted once for the access). Ports past 0xffff are
//! unclaimed.
//!
//! Interrupts: after each access COM1's interrupt output is driven onto
//! ISA IRQ 4 of the PIC (it reaches no CPU until the kernel injects
//! [`crate::devices::pic::Pic::pending_vector`]).

use crate::devices::debug_exit::{self, DebugExit};
use crate::devices::fw_cfg::{self, FwCfg};
use crate::devices::pci::{self, PciHost, PciWrite};
use crate::devices::lapic::Lapic;
use crate::devices::pic::Pic;
use crate::devices::uart16550::{self, Uart16550};
use alloc::string::String;

/// The POST code / delay port.
pub const POST_PORT: u16 = 0x80;

/// What a VM is built with.
#[derive(Clone, Copy, Debug)]
pub struct PlatformConfig {
    /// Guest RAM in bytes (fw_cfg RAM_SIZE).
    pub ram_size: u64,
    /// vCPUs (fw_cfg NB_CPUS and MAX_CPUS).
    pub cpus: u16,
    /// A local APIC (APIC ID 0) for its one vCPU.
    pub lapic: bool,
}

/// What a guest OUT means beyond the device's own state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoEffect {
    None,
    /// A finished serial line, every byte that is not printable ASCII
    /// escaped ([`crate::serial_device::escape_guest_text`]).
    Line(String),
    /// isa-debug-exit: end this VM with this status (the value written;
    /// QEMU would exit with `(status << 1) | 1`).
    Exit(u32),
}

impl IoEffect {
    /// Of two effects of one access (split into bytes), the one to keep:
    /// ending the VM over a line, the first exit over a later one. (One
    /// access holds at most one THR byte, so no line is dropped.)
    fn or(self, other: IoEffect) -> IoEffect {
        fn rank(e: &IoEffect) -> u8 {
            match e {
                IoEffect::None => 0,
                IoEffect::Line(_) => 1,
                IoEffect::Exit(_) => 2,
            }
        }
        if rank(&other) > rank(&self) {
            other
        } else {
            self
        }
    }
}

pub struct Platform {
    pub uart: Uart16550,
    pub debug_exit: DebugExit,
    pub fw_cfg: FwCfg,
    pub pci: PciHost,
    pub pic: Pic,
    /// The local APIC, where the VM has one (MMIO page and x2APIC MSRs,
    /// no ports, so `io_read`/`io_write` do not route to it; the kernel's
    /// exit handlers do).
    pub lapic: Option<Lapic>,
    unknown_ports: u64,
    /// The guest wrote a reset request to 0xcf9 and nobody took it yet.
    reset_requested: bool,
}

/// How a device took one access.
enum Taken<T> {
    Done(T),
    /// The device's ports, but not an access it accepts.
    Refused,
    /// No wide device holds the whole access, and it is not a byte.
    NotWhole,
}

/// All ones for an access of `size` bytes.
fn ones(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// Whether [port, port + size) lies inside [start, start + len).
fn inside(port: u32, size: u8, start: u16, len: u16) -> bool {
    port >= u32::from(start) && port + u32::from(size) <= u32::from(start) + u32::from(len)
}

impl Platform {
    pub fn new(config: &PlatformConfig) -> Self {
        Platform {
            uart: Uart16550::new(uart16550::COM1),
            debug_exit: DebugExit,
            fw_cfg: FwCfg::new(config.ram_size, config.cpus),
            pci: PciHost::new(),
            pic: Pic::new(),
            lapic: config.lapic.then(|| Lapic::new(0)),
            unknown_ports: 0,
            reset_requested: false,
        }
    }

    /// Whether the guest asked for a platform reset (a 0-to-1 transition
    /// of bit 2 of the PIIX3 reset control register, 0xcf9) since the
    /// last call. Not an [`IoEffect`]: no kvm-unit-tests or default Linux
    /// path writes it (Linux uses 0xcf9 only once it found mechanism #1
    /// with a host bridge behind it), and the VM keeps running.
    pub fn take_reset_request(&mut self) -> bool {
        core::mem::take(&mut self.reset_requested)
    }

    /// Accesses to unclaimed ports (or refused by a device) so far.
    pub fn unknown_ports(&self) -> u64 {
        self.unknown_ports
    }

    /// A guest IN of `size` bytes (1, 2 or 4) from `port`: the value in
    /// the low `size` bytes, the rest zero.
    pub fn io_read(&mut self, port: u16, size: u8) -> u32 {
        if !matches!(size, 1 | 2 | 4) {
            self.unknown_ports += 1;
            return u32::MAX;
        }
        let mut unknown = false;
        let v = self.read_at(u32::from(port), size, &mut unknown);
        if unknown {
            self.unknown_ports += 1;
        }
        self.sync_irqs();
        v
    }

    /// A guest OUT of the low `size` bytes (1, 2 or 4) of `value` to `port`.
    pub fn io_write(&mut self, port: u16, size: u8, value: u32) -> IoEffect {
        if !matches!(size, 1 | 2 | 4) {
            self.unknown_ports += 1;
            return IoEffect::None;
        }
        let mut unknown = false;
        let e = self.write_at(u32::from(port), size, value & ones(size), &mut unknown);
        if unknown {
            self.unknown_ports += 1;
        }
        self.sync_irqs();
        e
    }

    fn read_at(&mut self, port: u32, size: u8, unknown: &mut bool) -> u32 {
        match self.read_whole(port, size) {
            Taken::Done(v) => v,
            Taken::Refused => {
                *unknown = true;
                ones(size)
            }
            Taken::NotWhole if size == 1 => {
                *unknown = true;
                0xff
            }
            Taken::NotWhole => (0..size).map(|i| self.read_at(port + u32::from(i), 1, unknown) << (8 * i)).fold(0, |a, b| a | b),
        }
    }

    fn write_at(&mut self, port: u32, size: u8, value: u32, unknown: &mut bool) -> IoEffect {
        match self.write_whole(port, size, value) {
            Taken::Done(e) => e,
            Taken::Refused => {
                *unknown = true;
                IoEffect::None
            }
            Taken::NotWhole if size == 1 => {
                *unknown = true;
                IoEffect::None
            }
            Taken::NotWhole => (0..size).fold(IoEffect::None, |e, i| {
                let byte = (value >> (8 * i)) & 0xff;
                let next = self.write_at(port + u32::from(i), 1, byte, unknown);
                e.or(next)
            }),
        }
    }

    /// The access as one, if a device takes it whole (or is a byte
    /// device and this is a byte).
    fn read_whole(&mut self, port: u32, size: u8) -> Taken<u32> {
        let Ok(p) = u16::try_from(port) else {
            return Taken::NotWhole;
        };
        if inside(port, size, debug_exit::BASE, debug_exit::PORTS) {
            return Taken::Done(self.debug_exit.read(p, size));
        }
        if inside(port, size, fw_cfg::SELECTOR, 2) {
            return self.fw_cfg.read(p, size).map_or(Taken::Refused, Taken::Done);
        }
        if inside(port, size, pci::CONFIG_ADDRESS, 8) {
            return self.pci.read(p, size).map_or(Taken::Refused, Taken::Done);
        }
        if size != 1 {
            return Taken::NotWhole;
        }
        if self.uart.claims(p) {
            Taken::Done(u32::from(self.uart.read(p)))
        } else if Pic::claims(p) {
            Taken::Done(u32::from(self.pic.read(p)))
        } else if p == POST_PORT {
            Taken::Done(0xff)
        } else {
            Taken::NotWhole
        }
    }

    fn write_whole(&mut self, port: u32, size: u8, value: u32) -> Taken<IoEffect> {
        let Ok(p) = u16::try_from(port) else {
            return Taken::NotWhole;
        };
        if inside(port, size, debug_exit::BASE, debug_exit::PORTS) {
            return Taken::Done(IoEffect::Exit(self.debug_exit.write(p, size, value)));
        }
        if inside(port, size, fw_cfg::SELECTOR, 2) {
            return if self.fw_cfg.write(p, size, value) { Taken::Done(IoEffect::None) } else { Taken::Refused };
        }
        if inside(port, size, pci::CONFIG_ADDRESS, 8) {
            return match self.pci.write(p, size, value) {
                PciWrite::Done => Taken::Done(IoEffect::None),
                PciWrite::Reset => {
                    self.reset_requested = true;
                    Taken::Done(IoEffect::None)
                }
                PciWrite::Refused => Taken::Refused,
            };
        }
        if size != 1 {
            return Taken::NotWhole;
        }
        let byte = value as u8;
        if self.uart.claims(p) {
            Taken::Done(self.uart.write(p, byte).map_or(IoEffect::None, IoEffect::Line))
        } else if Pic::claims(p) {
            self.pic.write(p, byte);
            Taken::Done(IoEffect::None)
        } else if p == POST_PORT {
            Taken::Done(IoEffect::None)
        } else {
            Taken::NotWhole
        }
    }

    /// Drives the device interrupt lines onto the PIC.
    fn sync_irqs(&mut self) {
        self.pic.set_irq_level(uart16550::COM1_IRQ, self.uart.irq_pending());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fw_cfg::key;

    const MIB: u64 = 1 << 20;

    fn platform() -> Platform {
        Platform::new(&PlatformConfig { ram_size: 256 * MIB, cpus: 1, lapic: false })
    }

    fn outb(p: &mut Platform, v: u8, port: u16) -> IoEffect {
        p.io_write(port, 1, u32::from(v))
    }

    fn inb(p: &mut Platform, port: u16) -> u8 {
        let v = p.io_read(port, 1);
        assert!(v <= 0xff);
        v as u8
    }

    /// kvm-unit-tests' fwcfg_get_u (lib/x86/fwcfg.c): `out %ax, %dx` of
    /// the key to 0x510, then `bytes` byte reads of 0x511, little-endian.
    fn fwcfg_get(p: &mut Platform, index: u16, bytes: usize) -> u64 {
        assert_eq!(p.io_write(0x510, 2, u32::from(index)), IoEffect::None);
        (0..bytes).map(|i| u64::from(inb(p, 0x511)) << (8 * i)).sum()
    }

    /// kvm-unit-tests' serial_outb/serial_put (lib/x86/io.c): wait for
    /// LSR bit 5, write THR; '\n' is preceded by '\r'.
    fn serial_put(p: &mut Platform, ch: u8, lines: &mut Vec<String>) {
        let mut outb_thr = |p: &mut Platform, c: u8| {
            let mut polls = 0;
            while inb(p, 0x3fd) & 0x20 == 0 {
                polls += 1;
                assert!(polls < 10, "the guest would spin on LSR forever");
            }
            match p.io_write(0x3f8, 1, u32::from(c)) {
                IoEffect::None => {}
                IoEffect::Line(l) => lines.push(l),
                e => panic!("THR write had effect {e:?}"),
            }
        };
        if ch == b'\n' {
            outb_thr(p, b'\r');
        }
        outb_thr(p, ch);
    }

    /// kvm-unit-tests' serial_init, port for port.
    fn serial_init(p: &mut Platform) {
        let base = 0x3f8;
        let lcr = inb(p, base + 3) | 0x80;
        outb(p, lcr, base + 3);
        outb(p, 0x01, base);
        outb(p, 0x00, base + 1);
        let lcr = inb(p, base + 3) & !0x80;
        outb(p, lcr, base + 3);
        outb(p, 0x00, base + 1);
        outb(p, 0x03, base + 3);
        outb(p, 0x00, base + 2);
        outb(p, 0x03, base + 4);
    }

    /// The port I/O of a kvm-unit-tests x86 test from start to exit
    /// (cstart64.S start64, setup.c, smp.c, io.c), checked for what the
    /// guest concludes.
    #[test]
    fn kvm_unit_tests_start_up_and_exit() {
        let mut p = platform();
        // start64: mask_pic_interrupts.
        outb(&mut p, 0xff, 0x21);
        outb(&mut p, 0xff, 0xa1);
        // setup_vm -> find_highmem (when the multiboot map is there).
        let max_end = fwcfg_get(&mut p, 0x11, 8);
        assert_eq!(max_end, 256 * MIB, "MAX_RAM: the top of RAM, not 0 (no limit)");
        // smp_init: the CPU count; with it 1, the BSP waits for no AP.
        let cpus = fwcfg_get(&mut p, 0x05, 2);
        assert_eq!(cpus, 1);
        // Tests that size memory (vmx_tests, rmap_chain, svm).
        assert_eq!(fwcfg_get(&mut p, 0x03, 8), 256 * MIB);
        // The first printf initializes the port, then prints.
        let mut lines = Vec::new();
        serial_init(&mut p);
        for s in [alloc::format!("smp: waiting for {} APs\n", cpus - 1), "PASS: a test\nSUMMARY: 1 tests\n".into()] {
            for &b in s.as_bytes() {
                serial_put(&mut p, b, &mut lines);
            }
        }
        assert_eq!(lines, ["smp: waiting for 0 APs", "PASS: a test", "SUMMARY: 1 tests"]);
        assert_eq!(p.uart.divisor(), 1, "115200 baud");
        assert_eq!(inb(&mut p, 0x3fb), 0x03);
        // The masks read back as written.
        assert_eq!((inb(&mut p, 0x21), inb(&mut p, 0xa1)), (0xff, 0xff));
        // exit(0): outl(code, 0xf4).
        assert_eq!(p.io_write(0xf4, 4, 0), IoEffect::Exit(0));
        assert_eq!(p.unknown_ports(), 0, "start-up touched only ports we emulate");
        // Had the exit not ended it: the Bochs shutdown port is unknown.
        outb(&mut p, b'S', 0x8900);
        assert_eq!(p.unknown_ports(), 1);
    }

    #[test]
    fn exit_statuses() {
        let mut p = platform();
        assert_eq!(p.io_write(0xf4, 4, 1), IoEffect::Exit(1));
        assert_eq!(p.io_write(0xf4, 4, 38), IoEffect::Exit(38));
        assert_eq!(p.io_write(0xf4, 1, 0x1234), IoEffect::Exit(0x34));
        assert_eq!(p.io_write(0xf4, 2, 0xdead_beef), IoEffect::Exit(0xbeef));
        assert_eq!(p.io_write(0xf7, 1, 5), IoEffect::Exit(5));
        assert_eq!(p.io_read(0xf4, 4), 0);
        assert_eq!(p.unknown_ports(), 0);
    }

    #[test]
    fn unclaimed_ports_read_all_ones_and_are_counted() {
        let mut p = platform();
        assert_eq!(p.io_read(0x60, 1), 0xff);
        assert_eq!(p.io_read(0x40, 2), 0xffff);
        assert_eq!(p.io_read(0x1234, 4), 0xffff_ffff);
        assert_eq!(p.io_write(0x43, 1, 0x34), IoEffect::None);
        assert_eq!(p.unknown_ports(), 4);
        // fw_cfg DMA is not there; nor COM2.
        assert_eq!(p.io_read(0x514, 4), 0xffff_ffff);
        assert_eq!(p.io_read(0x2fd, 1), 0xff);
        assert_eq!(p.unknown_ports(), 6);
        // A bad size is refused, not routed.
        assert_eq!(p.io_read(0x3f8, 3), u32::MAX);
        assert_eq!(p.io_write(0xf4, 8, 1), IoEffect::None);
        assert_eq!(p.unknown_ports(), 8);
        // Port 0x80: taken, ignored, not counted.
        assert_eq!(p.io_write(0x80, 1, 0x55), IoEffect::None);
        assert_eq!(p.io_read(0x80, 1), 0xff);
        assert_eq!(p.unknown_ports(), 8);
        // The last ports of the space: no wrap to port 0.
        assert_eq!(p.io_read(0xfffe, 4), 0xffff_ffff);
        assert_eq!(p.io_write(0xffff, 4, 0xffff_ffff), IoEffect::None);
        assert_eq!(p.unknown_ports(), 10);
    }

    #[test]
    fn pci_through_the_router() {
        let mut p = platform();
        p.io_write(0xcf8, 4, 0x8000_0000);
        assert_eq!(p.io_read(0xcf8, 4), 0x8000_0000);
        assert_eq!(p.io_read(0xcfc, 2), 0xffff, "no vendor at 00:00.0");
        assert_eq!(p.io_read(0xcfe, 1), 0xff);
        assert_eq!(p.io_read(0xcfc, 4), 0xffff_ffff);
        assert_eq!(p.unknown_ports(), 0);
        // Byte accesses to 0xcf8 and 0xcfa are no register (mechanism #2
        // probe) and are counted.
        p.io_write(0xcfb, 1, 1);
        p.io_write(0xcf8, 1, 0);
        p.io_write(0xcfa, 1, 0);
        assert_eq!((p.io_read(0xcf8, 1), p.io_read(0xcfa, 1)), (0xff, 0xff));
        assert_eq!(p.io_read(0xcf8, 2), 0xffff);
        assert_eq!(p.unknown_ports(), 6);
        assert_eq!(p.io_read(0xcf8, 4), 0x8000_0000);
        // Reset control.
        assert_eq!(p.io_write(0xcf9, 1, 0x02), IoEffect::None);
        assert!(!p.take_reset_request());
        assert_eq!(p.io_write(0xcf9, 1, 0x06), IoEffect::None);
        assert!(p.take_reset_request());
        assert!(!p.take_reset_request(), "taken once");
        assert_eq!(p.io_read(0xcf9, 1), 0x06);
        // A dword at 0xcfe runs past 0xcff: two data bytes, two unknown.
        assert_eq!(p.io_read(0xcfe, 4), 0xffff_ffff);
        assert_eq!(p.unknown_ports(), 7);
    }

    #[test]
    fn wide_accesses_to_byte_devices_are_split() {
        let mut p = platform();
        // outw 0xff00 to 0x20: 0x00 to 0x20 (an OCW2 no-op, bits 7:5 = 0),
        // then 0xff to 0x21 (the mask).
        p.io_write(0x20, 2, 0xff00);
        assert_eq!(inb(&mut p, 0x21), 0xff);
        // inw 0x20: IRR in the low byte, IMR in the high.
        assert_eq!(p.io_read(0x20, 2), 0xff00);
        // outw to THR: the low byte is text, the high byte goes to IER.
        assert_eq!(p.io_write(0x3f8, 2, 0x000a), IoEffect::Line(String::new()));
        assert_eq!(inb(&mut p, 0x3f9), 0x00);
        p.io_write(0x3f8, 2, 0x0141);
        assert_eq!(inb(&mut p, 0x3f9), 0x01);
        assert_eq!(p.uart.take_partial().as_deref(), Some("A"));
        // inl 0x3fc: MCR, LSR, MSR, SCR.
        p.io_write(0x3ff, 1, 0x5a);
        p.io_write(0x3fc, 1, 0x03);
        assert_eq!(p.io_read(0x3fc, 4), 0x5a_b0_60_03);
        // inl 0x3fe: MSR, SCR, then two unclaimed ports (one count).
        assert_eq!(p.io_read(0x3fe, 4), 0xffff_5ab0);
        assert_eq!(p.unknown_ports(), 1);
        // fw_cfg refuses a 16-bit read; a dword at 0x50f is split: 0x50f
        // unknown, 0x510 and 0x511 data bytes, 0x512 unknown.
        p.io_write(0x510, 2, u32::from(key::SIGNATURE));
        assert_eq!(p.io_read(0x510, 2), 0xffff);
        assert_eq!(p.unknown_ports(), 2);
        assert_eq!(p.io_read(0x50f, 4), 0xff_45_51_ff, "'Q', 'E'");
        assert_eq!(p.unknown_ports(), 3);
        // The effect of a split write: the line of its THR byte, wherever
        // that byte is; of two exits, the first.
        assert_eq!(p.io_write(0x3f7, 2, 0x0a00), IoEffect::Line(String::new()));
        assert_eq!(p.unknown_ports(), 4);
        assert_eq!(p.io_write(0xf6, 4, 0x0403_0201), IoEffect::Exit(0x01));
        assert_eq!(p.unknown_ports(), 5);
    }

    #[test]
    fn com1_interrupt_reaches_pic_irq_4() {
        let mut p = platform();
        for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0xa0, 0x11), (0xa1, 0x28), (0xa1, 0x02), (0xa1, 0x01)] {
            outb(&mut p, v, port);
        }
        outb(&mut p, 0xef, 0x21); // only IRQ 4
        outb(&mut p, 0x08, 0x3fc); // OUT2
        assert_eq!(p.pic.pending_vector(), None);
        outb(&mut p, 0x02, 0x3f9); // ETBEI: THR is empty
        assert_eq!(p.pic.pending_vector(), Some(0x24));
        assert_eq!(p.pic.ack(), Some(0x24));
        // The handler reads IIR (THRE, which clears it) and sends EOI.
        assert_eq!(inb(&mut p, 0x3fa), 0x02);
        assert_eq!(inb(&mut p, 0x3fa), 0x01);
        outb(&mut p, 0x20, 0x20);
        assert_eq!(p.pic.pending_vector(), None);
        // The next byte sent empties THR again: a new edge.
        outb(&mut p, b'x', 0x3f8);
        assert_eq!(p.pic.pending_vector(), Some(0x24));
    }

    #[test]
    fn fw_cfg_with_more_cpus() {
        let mut p = Platform::new(&PlatformConfig { ram_size: 5 << 30, cpus: 4, lapic: false });
        assert_eq!(fwcfg_get(&mut p, key::SIGNATURE, 4), u64::from(u32::from_le_bytes(*b"QEMU")));
        assert_eq!(fwcfg_get(&mut p, key::ID, 4), 1);
        assert_eq!(fwcfg_get(&mut p, key::NB_CPUS, 2), 4);
        assert_eq!(fwcfg_get(&mut p, key::MAX_CPUS, 2), 4);
        assert_eq!(fwcfg_get(&mut p, key::RAM_SIZE, 8), 5 << 30);
    }
}

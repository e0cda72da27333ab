//! A VM's virtual PC, as its port I/O sees it: the router from a guest's
//! IN/OUT to the devices of [`crate::devices`].
//!
//! | ports         | device                                          |
//! |---------------|-------------------------------------------------|
//! | 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 | the 8259A pair and ELCR     |
//! | 0x40-0x43, 0x61 | the 8254 PIT (channel 0 on IRQ 0); 0x61 NMI status and control (channel 2's gate and OUT) |
//! | 0x60, 0x64    | the 8042 keyboard controller, no keyboard or mouse (IRQ 1, 12); resets |
//! | 0x70-0x71     | the MC146818 RTC and CMOS RAM                   |
//! | 0x80          | POST code / I/O delay: taken and ignored, reads 0xff |
//! | 0xf4-0xf7     | isa-debug-exit                                  |
//! | 0x3f8-0x3ff   | COM1, a 16550A (IRQ 4)                          |
//! | 0x510-0x511   | fw_cfg (DMA ports 0x514-0x51b not claimed)      |
//! | 0xcf8-0xcff   | PCI configuration mechanism #1, no device; 0xcf9 reset control |
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
//! Interrupts: after each access (and each [`Platform::poll`]) COM1's
//! interrupt output is driven onto ISA IRQ 4 of the PIC, the keyboard
//! controller's onto IRQ 1 and 12, and every rising edge of PIT channel
//! 0's OUT since the last look is one edge on IRQ 0 (none of them reaches
//! a CPU until the kernel injects
//! [`crate::devices::pic::Pic::pending_vector`]).
//!
//! Time: the PIT and the RTC run on the guest's TSC. [`Platform::poll`]
//! tells the platform the guest TSC now; the kernel calls it before every
//! port access and before it asks the PIC for an interrupt, and sleeps no
//! later than [`Platform::next_deadline`] (the LAPIC timer's deadline is
//! the LAPIC's own). Accesses happen at the time of the last poll.
//!
//! Resets: an OUT that asks for a platform reset (0xfe or an output port
//! write with bit 0 clear to the keyboard controller, a reset through
//! 0xcf9) returns [`IoEffect::Reset`].

use crate::devices::debug_exit::{self, DebugExit};
use crate::devices::fw_cfg::{self, FwCfg};
use crate::devices::i8042::{self, I8042};
use crate::devices::lapic::Lapic;
use crate::devices::pci::{self, PciHost, PciWrite};
use crate::devices::pic::Pic;
use crate::devices::pit::{self, Pit};
use crate::devices::rtc::{self, Rtc};
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
    /// The guest TSC's rate, Hz: the clock of the PIT and the RTC.
    pub tsc_hz: u64,
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
    /// The guest asked for a platform reset (keyboard controller or
    /// 0xcf9): end this VM as rebooted.
    Reset,
}

impl IoEffect {
    /// Of two effects of one access (split into bytes), the one to keep:
    /// ending the VM over a line, the first exit or reset over a later
    /// one. (One access holds at most one THR byte, so no line is
    /// dropped.)
    fn or(self, other: IoEffect) -> IoEffect {
        fn rank(e: &IoEffect) -> u8 {
            match e {
                IoEffect::None => 0,
                IoEffect::Line(_) => 1,
                IoEffect::Exit(_) | IoEffect::Reset => 2,
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
    pub pit: Pit,
    pub rtc: Rtc,
    pub i8042: I8042,
    /// The guest TSC of the last [`Platform::poll`].
    now: u64,
    unknown_ports: u64,
    /// The guest asked for a reset and nobody took it yet.
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
            pit: Pit::new(config.tsc_hz),
            rtc: Rtc::new(rtc::DEFAULT_BOOT_TIME, config.ram_size, config.tsc_hz),
            i8042: I8042::new(),
            now: 0,
            unknown_ports: 0,
            reset_requested: false,
        }
    }

    /// Whether the guest asked for a platform reset since the last call:
    /// a 0-to-1 transition of bit 2 of the PIIX3 reset control register
    /// (0xcf9; Linux uses it only once it found mechanism #1 with a host
    /// bridge behind it) or the keyboard controller's reset line. The OUT
    /// that asked returned [`IoEffect::Reset`].
    pub fn take_reset_request(&mut self) -> bool {
        core::mem::take(&mut self.reset_requested)
    }

    /// The guest TSC is `now` (an earlier value than the last is ignored):
    /// the port accesses that follow happen then, and what fell due by
    /// then is driven onto the PIC (PIT channel 0's edges on IRQ 0).
    pub fn poll(&mut self, now: u64) {
        self.now = self.now.max(now);
        self.sync_irqs();
    }

    /// The guest TSC at which a device next raises an interrupt by itself
    /// (PIT channel 0), if any; it may lie in the past (then it is due at
    /// the next [`Platform::poll`]). The LAPIC timer is not included.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pit.next_deadline()
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
        } else if Pit::claims(p) {
            Taken::Done(u32::from(self.pit.read(p, self.now)))
        } else if I8042::claims(p) {
            Taken::Done(u32::from(self.i8042.read(p)))
        } else if Rtc::claims(p) {
            Taken::Done(u32::from(self.rtc.read(p, self.now)))
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
                    Taken::Done(IoEffect::Reset)
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
        } else if Pit::claims(p) {
            self.pit.write(p, byte, self.now);
            Taken::Done(IoEffect::None)
        } else if I8042::claims(p) {
            if self.i8042.write(p, byte) {
                self.reset_requested = true;
                Taken::Done(IoEffect::Reset)
            } else {
                Taken::Done(IoEffect::None)
            }
        } else if Rtc::claims(p) {
            self.rtc.write(p, byte, self.now);
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
        self.pic.set_irq_level(i8042::KBD_IRQ, self.i8042.kbd_irq());
        self.pic.set_irq_level(i8042::AUX_IRQ, self.i8042.aux_irq());
        // OUT 0 is sampled, not followed: a mode 2 low pulse lasts one
        // CLK, so the PIT reports the rising edges it had.
        if self.pit.poll(self.now) {
            self.pic.raise_irq(pit::IRQ);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fw_cfg::key;

    const MIB: u64 = 1 << 20;

    const TSC_HZ: u64 = 2_500_000_000;

    fn platform() -> Platform {
        Platform::new(&PlatformConfig { ram_size: 256 * MIB, cpus: 1, lapic: false, tsc_hz: TSC_HZ })
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
        // LPT1, the primary IDE channel, the secondary's status.
        assert_eq!(p.io_read(0x378, 1), 0xff);
        assert_eq!(p.io_read(0x1f0, 2), 0xffff);
        assert_eq!(p.io_read(0x1234, 4), 0xffff_ffff);
        assert_eq!(p.io_write(0x177, 1, 0x34), IoEffect::None);
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
        assert_eq!(p.io_write(0xcf9, 1, 0x06), IoEffect::Reset);
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
        let mut p = Platform::new(&PlatformConfig { ram_size: 5 << 30, cpus: 4, lapic: false, tsc_hz: TSC_HZ });
        assert_eq!(fwcfg_get(&mut p, key::SIGNATURE, 4), u64::from(u32::from_le_bytes(*b"QEMU")));
        assert_eq!(fwcfg_get(&mut p, key::ID, 4), 1);
        assert_eq!(fwcfg_get(&mut p, key::NB_CPUS, 2), 4);
        assert_eq!(fwcfg_get(&mut p, key::MAX_CPUS, 2), 4);
        assert_eq!(fwcfg_get(&mut p, key::RAM_SIZE, 8), 5 << 30);
    }

    /// A guest on the platform whose every port access is one exit of
    /// `step` TSC ticks; the kernel polls before each access.
    struct Guest {
        p: Platform,
        now: u64,
        step: u64,
    }

    impl Guest {
        fn new(p: Platform) -> Self {
            Guest { p, now: 0, step: TSC_HZ / 1_000_000 }
        }

        fn outb(&mut self, v: u8, port: u16) -> IoEffect {
            self.now += self.step;
            self.p.poll(self.now);
            self.p.io_write(port, 1, u32::from(v))
        }

        /// Linux's outb_p: the write, then a write to 0x80 as I/O delay.
        fn outb_p(&mut self, v: u8, port: u16) {
            assert_eq!(self.outb(v, port), IoEffect::None);
            assert_eq!(self.outb(0, 0x80), IoEffect::None);
        }

        fn inb(&mut self, port: u16) -> u8 {
            self.now += self.step;
            self.p.poll(self.now);
            inb(&mut self.p, port)
        }

        fn cmos_read(&mut self, addr: u8) -> u8 {
            self.outb(addr, 0x70);
            self.inb(0x71)
        }

        /// Runs to guest TSC `t` and polls there (the kernel waking the
        /// idle vCPU at a deadline).
        fn run_to(&mut self, t: u64) {
            self.now = self.now.max(t);
            self.p.poll(self.now);
        }
    }

    /// Linux 6.1's boot-time traffic to the PIT, RTC and keyboard
    /// controller, in boot order, on a legacy-PIC PC without ACPI, ending
    /// in a reboot through the keyboard controller.
    #[test]
    fn linux_boot_port_traffic() {
        let mut g = Guest::new(platform());
        // init_8259A: mask both, ICW1-4 (vectors 0x30 and 0x38), then the
        // cached masks: only the cascade open.
        for (v, port) in [(0xff, 0x21), (0xff, 0xa1), (0x11, 0x20), (0x30, 0x21), (0x04, 0x21), (0x01, 0x21), (0x11, 0xa0), (0x38, 0xa1), (0x02, 0xa1), (0x01, 0xa1)] {
            g.outb_p(v, port);
        }
        g.outb(0xfb, 0x21);
        g.outb(0xff, 0xa1);

        // read_persistent_clock64 -> mach_get_cmos_time -> mc146818_get_time
        // (one clean pass of mc146818_avoid_UIP).
        assert_eq!(g.cmos_read(0x0d) & 0x40, 0);
        let sec = g.cmos_read(0x00);
        assert_eq!(g.cmos_read(0x0a) & 0x80, 0, "no update in progress");
        assert_eq!(g.cmos_read(0x00), sec);
        let date = [g.cmos_read(0x02), g.cmos_read(0x04), g.cmos_read(0x07), g.cmos_read(0x08), g.cmos_read(0x09)];
        let ctrl = g.cmos_read(0x0b);
        assert_eq!(g.cmos_read(0x0a) & 0x80, 0);
        assert_eq!(g.cmos_read(0x00), sec);
        assert_eq!(ctrl & 0x04, 0, "BCD");
        assert_eq!((sec, date), (0x00, [0x00, 0x00, 0x01, 0x01, 0x26]), "2026-01-01 00:00:00");

        // quick_pit_calibrate: gate 2 high, speaker off, channel 2 mode 0
        // from 0xffff; the MSB must fall by one every 256 PIT ticks.
        let b = g.inb(0x61);
        g.outb((b & !0x02) | 0x01, 0x61);
        g.outb(0xb0, 0x43);
        g.outb(0xff, 0x42);
        g.outb(0xff, 0x42);
        let msb = |g: &mut Guest| {
            g.inb(0x42);
            g.inb(0x42)
        };
        while msb(&mut g) == 0xff {}
        let t0 = g.now;
        let mut steps = 0;
        while steps < 100 {
            let m = msb(&mut g);
            if m != 0xfe - steps {
                assert_eq!(m, 0xfd - steps, "one step at a time");
                steps += 1;
            }
        }
        let khz = (g.now - t0) * pit::PIT_HZ / (u64::from(steps) * 256 * 1000);
        assert!(khz.abs_diff(TSC_HZ / 1000) < TSC_HZ / 1000 / 1000, "{khz} kHz");

        // The PIT clockevent, periodic at HZ = 250; unmask IRQ 0.
        g.outb_p(0x34, 0x43);
        g.outb_p((4773 & 0xff) as u8, 0x40);
        g.outb_p((4773 >> 8) as u8, 0x40);
        g.outb(0xfa, 0x21);
        let period = 4773 * TSC_HZ / pit::PIT_HZ;
        let mut last = None;
        for _ in 0..5 {
            let d = g.p.next_deadline().expect("the tick is armed");
            assert!(d > g.now);
            if let Some(l) = last {
                let gap: u64 = d - l;
                assert!(gap.abs_diff(period) <= 1, "{gap} vs {period}");
            }
            last = Some(d);
            g.run_to(d - 1);
            assert_eq!(g.p.pic.pending_vector(), None, "not before its deadline");
            g.run_to(d);
            assert_eq!(g.p.pic.ack(), Some(0x30), "IRQ 0");
            // The handler's EOI.
            g.outb(0x20, 0x20);
            assert_eq!(g.p.pic.pending_vector(), None);
        }
        // A guest that sleeps through many ticks gets one.
        g.run_to(g.now + 100 * period);
        assert_eq!(g.p.pic.ack(), Some(0x30));
        g.outb(0x20, 0x20);
        g.run_to(g.now + 10);
        assert_eq!(g.p.pic.pending_vector(), None);

        // The i8042 driver: i8042_controller_check (flush), self-test,
        // CTR read twice and written back with the keyboard disabled.
        assert_eq!(g.inb(0x64) & 0x01, 0, "output buffer empty");
        assert_eq!(g.inb(0x64) & 0x02, 0);
        g.outb(0xaa, 0x64);
        assert_ne!(g.inb(0x64) & 0x01, 0);
        assert_eq!(g.inb(0x60), 0x55);
        g.outb(0x20, 0x64);
        let ctr = g.inb(0x60);
        g.outb(0x20, 0x64);
        assert_eq!(g.inb(0x60), ctr);
        g.outb(0x60, 0x64);
        g.outb((ctr | 0x10) & !0x01, 0x60);
        assert_eq!(g.p.i8042.command_byte(), 0x74);
        // The keyboard interrupt: atkbd's GET ID to an absent keyboard is
        // answered at once, on IRQ 1 once the port is enabled.
        g.outb(0x60, 0x64);
        g.outb(0x45, 0x60);
        g.outb(0xf8, 0x21);
        g.outb(0xf2, 0x60);
        assert_eq!(g.p.pic.pending_vector(), Some(0x31));
        assert_eq!(g.inb(0x64) & 0x41, 0x41, "OBF and time-out");
        assert_eq!(g.inb(0x60), 0xfe);
        assert_eq!(g.p.unknown_ports(), 0, "boot touched only ports we emulate");

        // Reboot, BOOT_KBD: kb_wait, then pulse the reset line.
        assert_eq!(g.inb(0x64) & 0x02, 0);
        assert_eq!(g.outb(0xfe, 0x64), IoEffect::Reset);
        assert!(g.p.take_reset_request());
    }

    #[test]
    fn new_devices_through_the_router() {
        let mut p = platform();
        p.poll(TSC_HZ);
        // The RTC, one second in; NMI mask bit on the index.
        p.io_write(0x70, 1, 0x80);
        assert_eq!(p.io_read(0x71, 1), 0x01);
        assert!(p.rtc.nmi_masked());
        // A word access to the index and data ports is split: index 0x09,
        // then data: the year.
        p.io_write(0x70, 1, 0x09);
        assert_eq!(p.io_read(0x70, 2), 0x26ff, "0x70 is write-only; 0x71 the year");
        // CMOS memory sizes of 256 MiB.
        p.io_write(0x70, 1, 0x34);
        assert_eq!(p.io_read(0x71, 1), 0x00);
        p.io_write(0x70, 1, 0x35);
        assert_eq!(p.io_read(0x71, 1), 0x0f);
        // The PIT: port 0x61 (power-on OUT 2 high) and a word latch read.
        assert_eq!(p.io_read(0x61, 1) & 0x21, 0x20);
        p.io_write(0x43, 1, 0x30);
        p.io_write(0x40, 1, 0x00);
        p.io_write(0x40, 1, 0x10);
        // Written at PIT tick PIT_HZ (one second); the first TSC tick of
        // tick PIT_HZ + 0x1000 + 1.
        assert_eq!(p.next_deadline(), Some(((pit::PIT_HZ + 0x1001) * TSC_HZ).div_ceil(pit::PIT_HZ)));
        p.poll(TSC_HZ + 1000 * TSC_HZ / pit::PIT_HZ);
        p.io_write(0x43, 1, 0x00);
        let c = p.io_read(0x40, 1) | p.io_read(0x40, 1) << 8;
        assert!((0x1000 - 1000..=0x1000 - 998).contains(&c), "{c:#x}");
        // The keyboard controller's old reset: output port, bit 0 clear.
        p.io_write(0x64, 1, 0xd1);
        assert_eq!(p.io_write(0x60, 1, 0xdf), IoEffect::None);
        p.io_write(0x64, 1, 0xd1);
        assert_eq!(p.io_write(0x60, 1, 0xde), IoEffect::Reset);
        // A split access keeps the reset: outw 0xfe64 at 0x63 is 0x64 to
        // 0x63 (unclaimed) and 0xfe to 0x64.
        assert_eq!(p.io_write(0x63, 2, 0xfe64), IoEffect::Reset);
        assert_eq!(p.unknown_ports(), 1);
        // Time does not go back.
        let d = p.next_deadline();
        p.poll(0);
        assert_eq!(p.next_deadline(), d);
    }

    #[test]
    fn pit_edges_reach_irq_0_only_when_polled() {
        let mut p = platform();
        for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0xa0, 0x11), (0xa1, 0x28), (0xa1, 0x02), (0xa1, 0x01)] {
            outb(&mut p, v, port);
        }
        outb(&mut p, 0xfe, 0x21); // only IRQ 0
        // Mode 4, 100 ticks: one strobe.
        outb(&mut p, 0x38, 0x43);
        outb(&mut p, 100, 0x40);
        outb(&mut p, 0, 0x40);
        let d = p.next_deadline().unwrap();
        assert_eq!(d, (102 * TSC_HZ).div_ceil(pit::PIT_HZ), "N + 2 ticks: load, count, the strobe's end");
        // Nothing happens between polls.
        assert_eq!(p.pic.pending_vector(), None);
        p.poll(d - 1);
        assert_eq!(p.pic.pending_vector(), None);
        p.poll(d);
        assert_eq!(p.pic.pending_vector(), Some(0x20));
        assert_eq!(p.next_deadline(), None, "a one-shot");
        // Masked, the edge still waits in IRR; unmasked, it is delivered.
        assert_eq!(p.pic.ack(), Some(0x20));
        outb(&mut p, 0x20, 0x20);
        outb(&mut p, 0xff, 0x21);
        outb(&mut p, 10, 0x40);
        outb(&mut p, 0, 0x40);
        p.poll(d + 20 * TSC_HZ / pit::PIT_HZ);
        assert_eq!(p.pic.pending_vector(), None);
        outb(&mut p, 0xfe, 0x21);
        assert_eq!(p.pic.pending_vector(), Some(0x20));
    }
}

//! The host TSC's rate, measured once at boot. A VM's guest TSC runs at
//! the host's rate (only offset), so this is also the rate Linux guests
//! are told in CPUID 0x15/0x16 and the clock of their virtual PIT.
//!
//! The measurement counts TSC ticks across a known number of ticks of the
//! host's 8254 channel 2 (1 193 182 Hz), gated through port 0x61 with the
//! speaker off, in mode 0 (OUT rises at terminal count), as PC firmware
//! and Linux's `pit_calibrate_tsc` do. Bochs and QEMU run their PIT in the
//! same virtual time as their TSC, so the rate is right there too; on real
//! hardware it is right to a few parts in ten thousand. Where no PIT
//! answers (OUT never rises) the CPU's own word is used: CPUID 0x15
//! (crystal clock and ratio), else the base frequency of CPUID 0x16.

use x86_64::instructions::port::Port;

const PIT_HZ: u64 = 1_193_182;
/// 10 ms of PIT ticks.
const PIT_TICKS: u64 = 11_932;
/// Reads of port 0x61 before giving up on the PIT (a real read takes
/// about 1 us, so this is far longer than 10 ms).
const MAX_POLLS: u32 = 1 << 24;

/// Where the rate came from, for the boot log.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    Pit,
    Cpuid15,
    Cpuid16,
}

/// The host TSC rate in Hz, or `None` if neither the PIT nor CPUID says.
pub fn measure() -> Option<(u64, Source)> {
    if let Some(hz) = against_pit() {
        return Some((hz, Source::Pit));
    }
    let top = crate::vcpu::host_cpuid(0, 0).eax;
    if top >= 0x15 {
        let r = crate::vcpu::host_cpuid(0x15, 0);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            return Some((u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax), Source::Cpuid15));
        }
    }
    if top >= 0x16 {
        let mhz = crate::vcpu::host_cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return Some((u64::from(mhz) * 1_000_000, Source::Cpuid16));
        }
    }
    None
}

fn against_pit() -> Option<u64> {
    // SAFETY: the PC's PIT and port 0x61; the kernel uses neither for
    // anything else, and port 0x61 gets its old value back.
    unsafe {
        let mut control = Port::<u8>::new(0x61);
        let mut mode = Port::<u8>::new(0x43);
        let mut counter2 = Port::<u8>::new(0x42);
        let old = control.read();
        control.write((old & !0x02) | 0x01);
        // Channel 2, LSB then MSB, mode 0, binary.
        mode.write(0xb0);
        counter2.write(PIT_TICKS as u8);
        counter2.write((PIT_TICKS >> 8) as u8);
        let start = crate::vcpu::rdtsc();
        let mut polls = 0;
        while control.read() & 0x20 == 0 {
            polls += 1;
            if polls == MAX_POLLS {
                control.write(old);
                return None;
            }
        }
        let ticks = crate::vcpu::rdtsc() - start;
        control.write(old);
        // The count reaches 0 one PIT tick after the load (8254 mode 0).
        Some(ticks * PIT_HZ / (PIT_TICKS + 1))
    }
}

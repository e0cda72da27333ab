//! A minimal Motorola MC146818 real-time clock and its 128 bytes of CMOS
//! RAM, at 0x70 (index; bit 7 is the PC's NMI mask) and 0x71 (data).
//!
//! What a guest finds:
//! - The time registers 0x00 (seconds), 0x02, 0x04, 0x06 (day of week,
//!   1 = Sunday), 0x07-0x09 (day, month, year) and the century at 0x32,
//!   in BCD and 24-hour mode as status B is set on a PC (0x02); status
//!   B's DM (binary) and 24/12 bits are honoured when the guest writes
//!   them, and so are writes to the time registers (setting the clock,
//!   with or without SET).
//! - The clock runs with guest time: it starts at the wall-clock second
//!   given to [`Rtc::new`] (the kernel has no wall clock; the platform
//!   passes [`DEFAULT_BOOT_TIME`], 2026-01-01 00:00:00 UTC) at guest TSC 0
//!   and advances one second every `tsc_hz` TSC ticks.
//! - Status A: UIP is set realistically, for the 244 us before each update
//!   (the datasheet's t_BUC); the registers then take the next second in
//!   one step, so a guest that saw UIP clear has 244 us to read them
//!   consistently. The divider and rate bits are kept as written (default
//!   0x26) and change nothing.
//! - Status B: all bits are kept; SET stops the updates (and clears UIE,
//!   as on the part) until it is cleared, the next update following one
//!   second later.
//! - Status C: UF is set by every update since C was last read, and IRQF
//!   with it while UIE is set; PF and AF are never set, and no interrupt
//!   (ISA IRQ 8) is ever raised: PIE, AIE and UIE never fire. Reading C
//!   clears it.
//! - Status D: 0x80 (valid RAM and time), read-only.
//! - The rest is plain CMOS RAM, preset as a PC BIOS leaves it: 0x10
//!   floppy types 0, 0x14 equipment (a math coprocessor, nothing else),
//!   0x15/0x16 base memory (640 KiB), 0x17/0x18 and 0x30/0x31 extended
//!   memory in KiB above 1 MiB and 0x34/0x35 memory above 16 MiB in
//!   64 KiB units, each capped at 0xffff.
//!
//! Choices: the time registers are kept as binary numbers and shown in
//! the format B selects at each read (the part keeps the bytes as written
//! and software rewrites them after changing DM or 24/12). The day of
//! week is stored as written and recomputed from the date at each update.
//! A date that does not exist (Feb 30) is carried over like a calendar at
//! the next update; one before 1970 becomes 1970-01-01. Port 0x70 is
//! write-only and reads 0xff.

/// The index port; the data port is +1.
pub const INDEX: u16 = 0x70;
pub const DATA: u16 = 0x71;

/// 2026-01-01 00:00:00 UTC, seconds since 1970.
pub const DEFAULT_BOOT_TIME: u64 = 1_767_225_600;

/// Register and CMOS byte indices.
pub mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const DAY_OF_WEEK: u8 = 0x06;
    pub const DAY_OF_MONTH: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const A: u8 = 0x0a;
    pub const B: u8 = 0x0b;
    pub const C: u8 = 0x0c;
    pub const D: u8 = 0x0d;
    pub const FLOPPY: u8 = 0x10;
    pub const EQUIPMENT: u8 = 0x14;
    pub const BASE_MEMORY: u8 = 0x15;
    pub const EXTENDED_MEMORY: u8 = 0x17;
    pub const EXTENDED_MEMORY_2: u8 = 0x30;
    pub const CENTURY: u8 = 0x32;
    pub const MEMORY_ABOVE_16M: u8 = 0x34;
}

pub const A_UIP: u8 = 1 << 7;
pub const B_SET: u8 = 1 << 7;
pub const B_UIE: u8 = 1 << 4;
pub const B_BINARY: u8 = 1 << 2;
pub const B_24H: u8 = 1 << 1;
pub const C_IRQF: u8 = 1 << 7;
pub const C_UF: u8 = 1 << 4;
pub const D_VRT: u8 = 1 << 7;

/// UIP's lead before an update (t_BUC), us.
const UIP_LEAD_US: u64 = 244;
const DAY: u64 = 86_400;
/// Days in any 400 consecutive Gregorian years.
const DAYS_IN_400_YEARS: u64 = 146_097;

/// The time registers as numbers (the year with its century).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fields {
    second: u64,
    minute: u64,
    hour: u64,
    weekday: u64,
    day: u64,
    month: u64,
    year: u64,
}

fn is_leap(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The date and time `secs` seconds after 1970-01-01 00:00:00.
fn fields_of(secs: u64) -> Fields {
    let (mut days, time) = (secs / DAY, secs % DAY);
    // 1970-01-01 was a Thursday (5).
    let weekday = (days + 4) % 7 + 1;
    let mut year = 1970 + 400 * (days / DAYS_IN_400_YEARS);
    days %= DAYS_IN_400_YEARS;
    while days >= 365 + u64::from(is_leap(year)) {
        days -= 365 + u64::from(is_leap(year));
        year += 1;
    }
    let mut month = 1;
    while days >= days_in_month(year, month) {
        days -= days_in_month(year, month);
        month += 1;
    }
    Fields { second: time % 60, minute: time / 60 % 60, hour: time / 3600, weekday, day: days + 1, month, year }
}

/// Seconds since 1970 of `f`, fields out of range carried over (month 13
/// is January of the next year, day 0 the last of the month before); 0
/// for a time before 1970. The day of week is not looked at.
fn seconds_of(f: &Fields) -> u64 {
    let m = f.month as i64 - 1;
    let year = f.year as i64 + m.div_euclid(12);
    let month = m.rem_euclid(12) as u64 + 1;
    let Ok(year) = u64::try_from(year) else { return 0 };
    if year < 1970 {
        return 0;
    }
    let cycles = (year - 1970) / 400;
    let mut days = cycles * DAYS_IN_400_YEARS;
    days += (1970 + 400 * cycles..year).map(|y| 365 + u64::from(is_leap(y))).sum::<u64>();
    days += (1..month).map(|m| days_in_month(year, m)).sum::<u64>();
    let secs = (days + f.day) as i64 * DAY as i64 - DAY as i64 + (f.hour * 3600 + f.minute * 60 + f.second) as i64;
    u64::try_from(secs).unwrap_or(0)
}

#[derive(Clone, Debug)]
pub struct Rtc {
    tsc_hz: u64,
    /// The time registers at TSC `since` (while halted: now).
    fields: Fields,
    since: u64,
    /// SET: no updates.
    halted: bool,
    /// UF, and the TSC of the next update that sets it.
    update_flag: bool,
    next_update: Option<u64>,
    index: u8,
    nmi_masked: bool,
    ram: [u8; 128],
}

impl Rtc {
    /// A clock reading `boot_time` (seconds since 1970, UTC) at guest TSC
    /// 0, running at `tsc_hz` TSC ticks a second (0 is taken as 1), and
    /// CMOS memory bytes for `ram_size` bytes of RAM.
    pub fn new(boot_time: u64, ram_size: u64, tsc_hz: u64) -> Self {
        let tsc_hz = tsc_hz.max(1);
        let mut ram = [0; 128];
        ram[usize::from(reg::A)] = 0x26;
        ram[usize::from(reg::B)] = B_24H;
        ram[usize::from(reg::FLOPPY)] = 0;
        ram[usize::from(reg::EQUIPMENT)] = 0x02;
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        let words = [
            (reg::BASE_MEMORY, (ram_size / KIB).min(640)),
            (reg::EXTENDED_MEMORY, ram_size.saturating_sub(MIB) / KIB),
            (reg::EXTENDED_MEMORY_2, ram_size.saturating_sub(MIB) / KIB),
            (reg::MEMORY_ABOVE_16M, ram_size.saturating_sub(16 * MIB) / (64 * KIB)),
        ];
        for (at, value) in words {
            let [lo, hi] = (value.min(0xffff) as u16).to_le_bytes();
            ram[usize::from(at)] = lo;
            ram[usize::from(at) + 1] = hi;
        }
        Rtc {
            tsc_hz,
            fields: fields_of(boot_time),
            since: 0,
            halted: false,
            update_flag: false,
            next_update: Some(tsc_hz),
            index: 0,
            nmi_masked: false,
            ram,
        }
    }

    /// Whether `port` is 0x70 or 0x71.
    pub fn claims(port: u16) -> bool {
        matches!(port, INDEX | DATA)
    }

    /// Bit 7 of the last index write: the guest asked for NMIs to be
    /// masked (remembered, not acted on).
    pub fn nmi_masked(&self) -> bool {
        self.nmi_masked
    }

    /// A guest IN of one byte at guest TSC `now`.
    pub fn read(&mut self, port: u16, now: u64) -> u8 {
        if port != DATA {
            return 0xff;
        }
        self.sync_flag(now);
        let b = self.ram[usize::from(reg::B)];
        match self.index {
            reg::A => self.ram[usize::from(reg::A)] | if self.update_pending(now) { A_UIP } else { 0 },
            reg::C => {
                let mut c = 0;
                if core::mem::take(&mut self.update_flag) {
                    c |= C_UF;
                    if b & B_UIE != 0 {
                        c |= C_IRQF;
                    }
                }
                c
            }
            reg::D => D_VRT,
            i if Self::is_time(i) => {
                let f = self.fields_at(now);
                match i {
                    reg::SECONDS => self.encode(f.second),
                    reg::MINUTES => self.encode(f.minute),
                    reg::HOURS => self.encode_hour(f.hour),
                    reg::DAY_OF_WEEK => self.encode(f.weekday),
                    reg::DAY_OF_MONTH => self.encode(f.day),
                    reg::MONTH => self.encode(f.month),
                    reg::YEAR => self.encode(f.year % 100),
                    _ => self.encode(f.year / 100),
                }
            }
            i => self.ram[usize::from(i)],
        }
    }

    /// A guest OUT of one byte at guest TSC `now`.
    pub fn write(&mut self, port: u16, value: u8, now: u64) {
        if port == INDEX {
            self.index = value & 0x7f;
            self.nmi_masked = value & 0x80 != 0;
            return;
        }
        self.sync_flag(now);
        match self.index {
            reg::A => self.ram[usize::from(reg::A)] = value & !A_UIP,
            reg::B => self.write_b(value, now),
            reg::C | reg::D => {}
            i if Self::is_time(i) => {
                let mut f = self.settle(now);
                let v = self.decode(value);
                match i {
                    reg::SECONDS => f.second = v,
                    reg::MINUTES => f.minute = v,
                    reg::HOURS => f.hour = self.decode_hour(value),
                    reg::DAY_OF_WEEK => f.weekday = v,
                    reg::DAY_OF_MONTH => f.day = v,
                    reg::MONTH => f.month = v,
                    reg::YEAR => f.year = f.year / 100 * 100 + v,
                    _ => f.year = v * 100 + f.year % 100,
                }
                self.fields = f;
            }
            i => self.ram[usize::from(i)] = value,
        }
    }

    fn is_time(index: u8) -> bool {
        matches!(index, reg::SECONDS | reg::MINUTES | reg::HOURS | reg::DAY_OF_WEEK..=reg::YEAR | reg::CENTURY)
    }

    fn write_b(&mut self, mut value: u8, now: u64) {
        let old = self.ram[usize::from(reg::B)];
        if value & B_SET != 0 {
            value &= !B_UIE;
            if old & B_SET == 0 {
                self.fields = self.settle(now);
                self.halted = true;
                self.next_update = None;
            }
        } else if old & B_SET != 0 {
            self.halted = false;
            self.since = now;
            self.next_update = Some(now.saturating_add(self.tsc_hz));
        }
        self.ram[usize::from(reg::B)] = value;
    }

    /// Whole seconds (updates) since `since`.
    fn updates(&self, now: u64) -> u64 {
        if self.halted {
            0
        } else {
            now.saturating_sub(self.since) / self.tsc_hz
        }
    }

    fn fields_at(&self, now: u64) -> Fields {
        match self.updates(now) {
            0 => self.fields,
            n => fields_of(seconds_of(&self.fields).saturating_add(n)),
        }
    }

    /// The fields at `now`, made the new base (keeping the second's phase).
    fn settle(&mut self, now: u64) -> Fields {
        let n = self.updates(now);
        self.fields = self.fields_at(now);
        self.since += n * self.tsc_hz;
        self.fields
    }

    /// UIP: an update comes within t_BUC.
    fn update_pending(&self, now: u64) -> bool {
        let lead = (u128::from(self.tsc_hz) * u128::from(UIP_LEAD_US) / 1_000_000) as u64;
        !self.halted && now.saturating_sub(self.since) % self.tsc_hz >= self.tsc_hz - lead
    }

    fn sync_flag(&mut self, now: u64) {
        if let Some(t) = self.next_update.filter(|&t| now >= t) {
            self.update_flag = true;
            // The next update after now, on the same grid.
            let k = (now - t) / self.tsc_hz + 1;
            self.next_update = Some(t.saturating_add(k * self.tsc_hz));
        }
    }

    fn binary(&self) -> bool {
        self.ram[usize::from(reg::B)] & B_BINARY != 0
    }

    /// Two decimal digits of `v` in the format B selects.
    fn encode(&self, v: u64) -> u8 {
        let v = (v % 100) as u8;
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, b: u8) -> u64 {
        if self.binary() {
            u64::from(b)
        } else {
            u64::from(b >> 4) * 10 + u64::from(b & 0xf)
        }
    }

    /// 12-hour mode: 1-12, bit 7 PM.
    fn encode_hour(&self, hour: u64) -> u8 {
        if self.ram[usize::from(reg::B)] & B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = if hour.is_multiple_of(12) { 12 } else { hour % 12 };
        self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
    }

    fn decode_hour(&self, b: u8) -> u64 {
        if self.ram[usize::from(reg::B)] & B_24H != 0 {
            return self.decode(b);
        }
        self.decode(b & 0x7f) % 12 + if b & 0x80 != 0 { 12 } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: u64 = 2_000_000_000;
    const MIB: u64 = 1 << 20;

    /// A guest whose every port access costs `step` TSC ticks.
    struct Guest {
        rtc: Rtc,
        now: u64,
        step: u64,
    }

    impl Guest {
        fn new(boot: u64, now: u64) -> Self {
            Guest { rtc: Rtc::new(boot, 256 * MIB, HZ), now, step: 3000 }
        }

        /// Linux's CMOS_READ (rtc_cmos_read): outb(addr, 0x70), inb(0x71).
        fn cmos_read(&mut self, addr: u8) -> u8 {
            self.now += self.step;
            self.rtc.write(INDEX, addr, self.now);
            self.now += self.step;
            self.rtc.read(DATA, self.now)
        }

        fn cmos_write(&mut self, v: u8, addr: u8) {
            self.now += self.step;
            self.rtc.write(INDEX, addr, self.now);
            self.now += self.step;
            self.rtc.write(DATA, v, self.now);
        }

        fn mdelay(&mut self, ms: u64) {
            self.now += ms * HZ / 1000;
        }
    }

    /// struct rtc_time's fields Linux fills: sec, min, hour, mday, mon
    /// (0-11), year (since 1900).
    type Tm = [u32; 6];

    fn bcd2bin(v: u8) -> u32 {
        u32::from(v & 0xf) + u32::from(v >> 4) * 10
    }

    /// Linux 6.1 mc146818_get_time (drivers/rtc/rtc-mc146818-lib.c) with
    /// mc146818_avoid_UIP: at most 10 tries, 1 ms apart while UIP is set.
    /// No ACPI FADT century (x86 without ACPI): the century byte is not
    /// read. Also the number of tries.
    fn mc146818_get_time(g: &mut Guest) -> Option<(Tm, u32)> {
        for i in 0..10 {
            let seconds = g.cmos_read(reg::SECONDS);
            if g.cmos_read(reg::A) & A_UIP != 0 {
                g.mdelay(1);
                continue;
            }
            if seconds != g.cmos_read(reg::SECONDS) {
                continue;
            }
            // mc146818_get_time_callback
            let mut raw = [seconds, g.cmos_read(reg::MINUTES), g.cmos_read(reg::HOURS), g.cmos_read(reg::DAY_OF_MONTH), g.cmos_read(reg::MONTH), g.cmos_read(reg::YEAR)];
            let ctrl = g.cmos_read(reg::B);
            if g.cmos_read(reg::A) & A_UIP != 0 {
                g.mdelay(1);
                continue;
            }
            if seconds != g.cmos_read(reg::SECONDS) {
                continue;
            }
            if ctrl & B_BINARY == 0 {
                raw = raw.map(|b| bcd2bin(b) as u8);
            }
            let mut tm = raw.map(u32::from);
            // "if (time->tm_year <= 69) time->tm_year += 100;"
            if tm[5] <= 69 {
                tm[5] += 100;
            }
            tm[4] -= 1;
            return Some((tm, i + 1));
        }
        None
    }

    /// mktime64 over Linux's rtc_time, written out independently of the
    /// model's own conversion (days before each month of a common year).
    fn rtc_tm_to_time64(tm: &Tm) -> u64 {
        const BEFORE: [u64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let year = u64::from(tm[5]) + 1900;
        let leap = |y: u64| y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
        let mut days: u64 = (1970..year).map(|y| if leap(y) { 366 } else { 365 }).sum();
        days += BEFORE[tm[4] as usize] + u64::from(tm[4] >= 2 && leap(year)) + u64::from(tm[3]) - 1;
        days * 86_400 + u64::from(tm[2]) * 3600 + u64::from(tm[1]) * 60 + u64::from(tm[0])
    }

    #[test]
    fn linux_mach_get_cmos_time_reads_the_boot_date_plus_guest_time() {
        // 3 days, 5 h, 7 min, 9.5 s after boot: 2026-01-04 05:07:09.
        let after = (3 * 86_400 + 5 * 3600 + 7 * 60 + 9) * HZ + HZ / 2;
        let mut g = Guest::new(DEFAULT_BOOT_TIME, after);
        assert_eq!(g.cmos_read(reg::D) & 0x40, 0, "RTC_VALID bit 6 clear");
        let (tm, tries) = mc146818_get_time(&mut g).expect("a sane read");
        assert_eq!(tries, 1);
        assert_eq!(tm, [9, 7, 5, 4, 0, 126]);
        assert_eq!(rtc_tm_to_time64(&tm), 1_767_503_229);
    }

    #[test]
    fn linux_read_during_uip_waits_and_sees_the_new_year() {
        // Boot at 2026-12-31 23:59:59; read 100 us before the update.
        let mut g = Guest::new(1_798_761_599, HZ - HZ / 10_000);
        let (tm, tries) = mc146818_get_time(&mut g).expect("a sane read");
        assert_eq!(tries, 2, "UIP seen once, then 1 ms later a clean read");
        assert_eq!(tm, [0, 0, 0, 1, 0, 127], "2027-01-01 00:00:00");
        assert_eq!(rtc_tm_to_time64(&tm), 1_798_761_600);
        // And the second before, read well clear of the update.
        let mut g = Guest::new(1_798_761_599, HZ / 2);
        let (tm, _) = mc146818_get_time(&mut g).unwrap();
        assert_eq!(tm, [59, 59, 23, 31, 11, 126]);
    }

    #[test]
    fn bcd_24_hour_registers() {
        // 2026-07-04 13:45:09, a Saturday.
        let mut g = Guest::new(1_783_172_709, 0);
        let regs: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, 0x32].iter().map(|&r| g.cmos_read(r)).collect();
        assert_eq!(regs, [0x09, 0x45, 0x13, 0x07, 0x04, 0x07, 0x26, 0x20]);
        assert_eq!(g.cmos_read(reg::A), 0x26);
        assert_eq!(g.cmos_read(reg::B), 0x02);
        assert_eq!(g.cmos_read(reg::D), 0x80);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut g = Guest::new(1_783_172_709, 0);
        g.cmos_write(B_24H | B_BINARY, reg::B);
        let regs: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, 0x32].iter().map(|&r| g.cmos_read(r)).collect();
        assert_eq!(regs, [9, 45, 13, 7, 4, 7, 26, 20]);
        // 12-hour: 13:45 is 1 PM.
        g.cmos_write(0, reg::B);
        assert_eq!(g.cmos_read(reg::HOURS), 0x81);
        g.cmos_write(B_BINARY, reg::B);
        assert_eq!(g.cmos_read(reg::HOURS), 0x81);
        // Midnight is 12 AM, noon 12 PM, 23 h 11 PM (binary 0x8b, BCD 0x91).
        for (h, bcd, bin) in [(0, 0x12, 12), (12, 0x92, 0x8c), (23, 0x91, 0x8b), (9, 0x09, 9)] {
            let mut g = Guest::new(DEFAULT_BOOT_TIME + h * 3600, 0);
            g.cmos_write(0, reg::B);
            assert_eq!(g.cmos_read(reg::HOURS), bcd, "{h} h, BCD");
            g.cmos_write(B_BINARY, reg::B);
            assert_eq!(g.cmos_read(reg::HOURS), bin, "{h} h, binary");
            // Written back in 12-hour mode, read in 24-hour BCD.
            g.cmos_write(bin, reg::HOURS);
            g.cmos_write(B_24H, reg::B);
            assert_eq!(g.cmos_read(reg::HOURS), (h / 10 * 16 + h % 10) as u8);
        }
    }

    #[test]
    fn linux_set_time_with_set_held() {
        // mc146818_set_time: SET, then year, month, day, hour, minute,
        // second, then B restored. From Jan 31 the month goes to 2 first:
        // no Feb 31 carried to March while SET holds the fields.
        let mut g = Guest::new(DEFAULT_BOOT_TIME + 30 * 86_400, 5 * HZ);
        let save = g.cmos_read(reg::B);
        g.cmos_write(save | B_SET, reg::B);
        for (v, r) in [(0x27, reg::YEAR), (0x02, reg::MONTH), (0x15, reg::DAY_OF_MONTH), (0x08, reg::HOURS), (0x30, reg::MINUTES), (0x00, reg::SECONDS)] {
            g.cmos_write(v, r);
        }
        g.mdelay(5000);
        assert_eq!(g.cmos_read(reg::SECONDS), 0, "halted while SET");
        assert_eq!(g.cmos_read(reg::A) & A_UIP, 0, "no update pending while SET");
        g.cmos_write(save, reg::B);
        g.mdelay(2500);
        let (tm, _) = mc146818_get_time(&mut g).unwrap();
        assert_eq!(tm, [2, 30, 8, 15, 1, 127], "2027-02-15 08:30:02");
        // Day of week follows the date at the next update: a Monday.
        assert_eq!(g.cmos_read(reg::DAY_OF_WEEK), 2);
    }

    #[test]
    fn writes_without_set_keep_counting() {
        let mut g = Guest::new(DEFAULT_BOOT_TIME, HZ / 4);
        g.cmos_write(0x58, reg::SECONDS);
        g.cmos_write(0x59, reg::MINUTES);
        g.cmos_write(0x23, reg::HOURS);
        g.now = 2 * HZ + HZ / 2;
        let regs: Vec<u8> = [0, 2, 4, 7, 8, 9].iter().map(|&r| g.cmos_read(r)).collect();
        assert_eq!(regs, [0x00, 0x00, 0x00, 0x02, 0x01, 0x26], "two updates later: the next day");
        // The century register moves the year.
        g.cmos_write(0x21, reg::CENTURY);
        assert_eq!((g.cmos_read(reg::YEAR), g.cmos_read(reg::CENTURY)), (0x26, 0x21));
        // A date before 1970 becomes the epoch.
        g.cmos_write(0x19, reg::CENTURY);
        g.cmos_write(0x50, reg::YEAR);
        g.now += 2 * HZ;
        assert_eq!((g.cmos_read(reg::YEAR), g.cmos_read(reg::MONTH), g.cmos_read(reg::DAY_OF_MONTH)), (0x70, 0x01, 0x01));
    }

    #[test]
    fn uip_is_set_244_us_before_each_update() {
        let mut rtc = Rtc::new(DEFAULT_BOOT_TIME, 0, HZ);
        let lead = HZ * 244 / 1_000_000;
        let at = |rtc: &mut Rtc, now: u64| {
            rtc.write(INDEX, reg::A, now);
            let a = rtc.read(DATA, now);
            rtc.write(INDEX, reg::SECONDS, now);
            (a & A_UIP != 0, rtc.read(DATA, now))
        };
        assert_eq!(at(&mut rtc, 0), (false, 0x00));
        assert_eq!(at(&mut rtc, HZ - lead - 1), (false, 0x00));
        assert_eq!(at(&mut rtc, HZ - lead), (true, 0x00), "UIP: the registers still hold the old second");
        assert_eq!(at(&mut rtc, HZ - 1), (true, 0x00));
        assert_eq!(at(&mut rtc, HZ), (false, 0x01));
        assert_eq!(at(&mut rtc, 59 * HZ + HZ / 2), (false, 0x59));
        assert_eq!(at(&mut rtc, 60 * HZ), (false, 0x00));
        // Divider bits are kept, UIP is read-only.
        rtc.write(INDEX, reg::A, 0);
        rtc.write(DATA, 0xa0, 0);
        assert_eq!(rtc.read(DATA, 0), 0x20);
    }

    #[test]
    fn status_c_reports_updates_and_clears_on_read() {
        let mut g = Guest::new(DEFAULT_BOOT_TIME, 0);
        assert_eq!(g.cmos_read(reg::C), 0);
        g.now = HZ + 10;
        assert_eq!(g.cmos_read(reg::C), C_UF);
        assert_eq!(g.cmos_read(reg::C), 0, "read clears");
        g.now = 5 * HZ;
        assert_eq!(g.cmos_read(reg::C), C_UF, "several updates: one flag");
        g.cmos_write(B_24H | B_UIE, reg::B);
        g.now = 6 * HZ;
        assert_eq!(g.cmos_read(reg::C), C_UF | C_IRQF);
        // SET clears UIE and stops updates.
        g.cmos_write(B_24H | B_UIE | B_SET, reg::B);
        assert_eq!(g.cmos_read(reg::B), B_24H | B_SET);
        g.now = 10 * HZ;
        assert_eq!(g.cmos_read(reg::C), 0);
        // C and D are read-only.
        g.cmos_write(0xff, reg::C);
        g.cmos_write(0x00, reg::D);
        assert_eq!((g.cmos_read(reg::C), g.cmos_read(reg::D)), (0, 0x80));
    }

    #[test]
    fn cmos_memory_bytes() {
        let bytes = |ram: u64| {
            let mut rtc = Rtc::new(0, ram, HZ);
            [0x10, 0x14, 0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35].map(|i| {
                rtc.write(INDEX, i, 0);
                rtc.read(DATA, 0)
            })
        };
        // 32 MiB: 31744 KiB = 0x7c00 extended; 16 MiB / 64 KiB = 0x100.
        assert_eq!(bytes(32 * MIB), [0, 0x02, 0x80, 0x02, 0x00, 0x7c, 0x00, 0x7c, 0x00, 0x01]);
        // 256 MiB: extended capped; 240 MiB / 64 KiB = 0xf00.
        assert_eq!(bytes(256 * MIB), [0, 0x02, 0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0x0f]);
        // 8 GiB: both capped.
        assert_eq!(bytes(8 << 30), [0, 0x02, 0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        // 512 KiB: less base memory, nothing above.
        assert_eq!(bytes(512 * 1024), [0, 0x02, 0x00, 0x02, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn index_port_nmi_bit_and_plain_ram() {
        let mut rtc = Rtc::new(DEFAULT_BOOT_TIME, 0, HZ);
        rtc.write(INDEX, 0x80 | 0x40, 0);
        assert!(rtc.nmi_masked());
        rtc.write(DATA, 0xa5, 0);
        rtc.write(INDEX, 0x40, 0);
        assert!(!rtc.nmi_masked());
        assert_eq!(rtc.read(DATA, 0), 0xa5);
        assert_eq!(rtc.read(INDEX, 0), 0xff, "the index port is write-only");
        // Alarm bytes are plain storage; the day of week is derived.
        rtc.write(INDEX, 0x01, 0);
        rtc.write(DATA, 0x30, 0);
        assert_eq!(rtc.read(DATA, 0), 0x30);
        rtc.write(INDEX, reg::DAY_OF_WEEK, 0);
        assert_eq!(rtc.read(DATA, 0), 0x05, "2026-01-01 was a Thursday");
        // The index wraps at 128 (bit 7 is the NMI mask).
        rtc.write(INDEX, 0xc0, 0);
        assert_eq!(rtc.read(DATA, 0), 0xa5);
    }

    #[test]
    fn date_conversions() {
        let f = |s| {
            let f = fields_of(s);
            (f.year, f.month, f.day, f.hour, f.minute, f.second, f.weekday)
        };
        assert_eq!(f(0), (1970, 1, 1, 0, 0, 0, 5));
        assert_eq!(f(951_782_400), (2000, 2, 29, 0, 0, 0, 3));
        assert_eq!(f(4_107_542_400), (2100, 3, 1, 0, 0, 0, 2), "2100 is not a leap year");
        assert_eq!(f(4_102_444_799), (2099, 12, 31, 23, 59, 59, 5));
        assert_eq!(f(1_783_172_709), (2026, 7, 4, 13, 45, 9, 7));
        for s in [0, 951_782_400, 4_107_542_400, 4_102_444_799, 1_783_172_709, 1 << 40] {
            assert_eq!(seconds_of(&fields_of(s)), s);
        }
        // Carried over: Feb 30 2026 is Mar 2; month 13 is next January;
        // day 0 is the last of the month before.
        let mut x = fields_of(DEFAULT_BOOT_TIME);
        (x.month, x.day) = (2, 30);
        assert_eq!(f(seconds_of(&x)), (2026, 3, 2, 0, 0, 0, 2));
        (x.month, x.day) = (13, 1);
        assert_eq!(f(seconds_of(&x)).0, 2027);
        (x.month, x.day) = (3, 0);
        assert_eq!(f(seconds_of(&x)), (2026, 2, 28, 0, 0, 0, 7));
        (x.month, x.day) = (0, 31);
        assert_eq!(f(seconds_of(&x)), (2025, 12, 31, 0, 0, 0, 4));
    }
}

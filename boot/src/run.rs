//! One headless boot: start the emulator in its own run directory, echo
//! the serial log as it grows, stop when the verdict is in or at the
//! timeout, and say how the run ended.
//!
//! Where the verdict comes from ([`decide`]): under QEMU it is QEMU's exit
//! status, which only the kernel can set (through the isa-debug-exit port;
//! a guest's port I/O never reaches QEMU); the serial result line is only
//! compared with it. Bochs has no such device, so there the kernel's result
//! line decides, and only as the kernel prints it: alone on its line
//! ([`ExitCode::from_serial_line`]), which no guest text can be, since
//! guest text is logged escaped after a `[vmN]` prefix.

use crate::emulator::{self, Emulator, Firmware};
use hvcore::exit::{ExitCode, EXIT_MARKER};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Printed by the kernel at the top of its boot summary (kernel/src/summary.rs).
const SUMMARY_MARKER: &str = "== boot summary ==";

/// How long QEMU may take to exit after the kernel printed its result
/// line, before the run is given up as having no result.
const QEMU_EXIT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel's result: QEMU's exit status, or the result line under
    /// Bochs.
    Exited(ExitCode),
    /// The emulator stopped without a result (crash, triple fault, a QEMU
    /// status that is none of ours), or the reason why.
    NoResult(String),
    TimedOut,
}

/// What [`decide`] concluded, and anything worth telling the user about
/// how (the serial line and QEMU's status disagreeing).
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub note: Option<String>,
}

/// The kernel's result line in `serial` (whole lines only: the last one
/// may still be arriving), if it printed one.
pub fn serial_result(serial: &str) -> Option<ExitCode> {
    let whole = &serial[..serial.rfind('\n').map_or(0, |i| i + 1)];
    whole.lines().find_map(ExitCode::from_serial_line)
}

/// The bootloader's panic, if it had one before the kernel started: its
/// `panicked at FILE:LINE:COL:` line (UEFI: on the firmware's console,
/// after ANSI escapes; BIOS: logged as `ERROR: panicked at`, which the
/// quiet boot config still shows) and the message line after it. Only
/// lines before the kernel's first one count (the kernel's lines start
/// with `[`, and guest text is inside them), so nothing the kernel or a
/// guest prints can match. `None` as well while the lines are incomplete.
pub fn boot_failure(serial: &str) -> Option<String> {
    let whole = &serial[..serial.rfind('\n').map_or(0, |i| i + 1)];
    let mut lines = whole.lines().map(|l| l.trim_start_matches('\0')).take_while(|l| !l.starts_with('['));
    let panic = lines.find_map(|l| {
        let l = strip_ansi(l);
        let at = l.find("panicked at ")?;
        matches!(&l[..at], "" | "ERROR: ").then(|| l[at..].trim_end().to_string())
    })?;
    if !panic.ends_with(':') {
        return Some(panic);
    }
    let message = lines.next()?;
    Some(format!("{panic} {}", strip_ansi(message).trim()))
}

/// `line` without ANSI CSI sequences (`ESC [ ... final byte`, ECMA-48
/// 5.4), which OVMF's console puts before the text.
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameter and intermediate bytes, then one final byte 0x40-0x7e.
            for c in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The verdict of a run so far: `serial` is the serial log, `exited` the
/// emulator's exit status if it has stopped. `None`: keep waiting.
///
/// QEMU: nothing until QEMU exits, then its status decides (a serial line
/// that says otherwise is noted, and loses); a status that is none of the
/// kernel's is no result. Bochs: the kernel's result line decides as soon
/// as it is whole; Bochs stopping without one is no result. Either way, a
/// panic of the bootloader ([`boot_failure`]) is no result at once.
pub fn decide(emulator: Emulator, serial: &str, exited: Option<ExitStatus>) -> Option<Verdict> {
    let line = serial_result(serial);
    let verdict = |outcome| Some(Verdict { outcome, note: None });
    // It halts after a panic: waiting for the timeout would tell no more.
    if let Some(panic) = boot_failure(serial) {
        return verdict(Outcome::NoResult(format!("the bootloader failed before the kernel started: {panic}")));
    }
    match emulator {
        Emulator::Bochs => match (line, exited) {
            (Some(code), _) => verdict(Outcome::Exited(code)),
            (None, Some(status)) => {
                verdict(Outcome::NoResult(format!("{emulator} stopped ({status}) without a `{EXIT_MARKER}` line")))
            }
            (None, None) => None,
        },
        Emulator::QemuKvm | Emulator::QemuTcg => {
            let status = exited?;
            let Some(code) = status.code().and_then(ExitCode::from_qemu_status) else {
                let seen = line.map_or(String::new(), |l| {
                    format!(" (the serial log's `{}` line does not count under QEMU)", l.serial_line())
                });
                let expected = ExitCode::ALL.map(|c| c.qemu_status().to_string()).join(", ");
                return verdict(Outcome::NoResult(format!(
                    "{emulator} stopped ({status}), which is no kernel result (the kernel's exit statuses are {expected}){seen}"
                )));
            };
            let note = match line {
                Some(l) if l == code => None,
                Some(l) => Some(format!(
                    "the serial log says `{}` but {emulator}'s exit status {} says {}: the status wins",
                    l.serial_line(),
                    code.qemu_status(),
                    code.name()
                )),
                None => Some(format!(
                    "{emulator}'s exit status {} says {}, but the serial log has no `{EXIT_MARKER}` line",
                    code.qemu_status(),
                    code.name()
                )),
            };
            Some(Verdict { outcome: Outcome::Exited(code), note })
        }
    }
}

pub struct Report {
    pub outcome: Outcome,
    pub serial: PathBuf,
    pub to_summary: Option<Duration>,
    pub total: Duration,
}

pub struct Run<'a> {
    pub emulator: Emulator,
    pub firmware: Firmware,
    pub image: &'a Path,
    pub dir: PathBuf,
    pub timeout: Duration,
    pub echo: bool,
    /// The machine's memory ([`emulator::machine_mib`]).
    pub mem_mib: u64,
}

impl Run<'_> {
    pub fn start(&self) -> Result<Report, String> {
        let io = |e: std::io::Error, what: &Path| format!("{}: {e}", what.display());
        // A fresh directory per run: Bochs locks its disk image, and old
        // serial output must not be mistaken for this run's.
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).map_err(|e| io(e, &self.dir))?;
        let image = self.dir.join(self.image.file_name().unwrap_or("disk.img".as_ref()));
        std::fs::copy(self.image, &image).map_err(|e| io(e, self.image))?;
        let serial = self.dir.join("serial.log");
        std::fs::write(&serial, b"").map_err(|e| io(e, &serial))?;
        let out = std::fs::File::create(self.dir.join("emulator.out")).map_err(|e| io(e, &self.dir))?;

        let mut cmd = match self.emulator {
            Emulator::Bochs => {
                let rc = self.dir.join("bochsrc");
                let cmds = self.dir.join("bochs.cmds");
                let log = self.dir.join("bochs.log");
                std::fs::write(&rc, emulator::bochsrc(&image, &serial, &log, self.mem_mib)).map_err(|e| io(e, &rc))?;
                // The Debian build has the debugger in: `c` makes it run.
                std::fs::write(&cmds, "c\n").map_err(|e| io(e, &cmds))?;
                let mut c = Command::new("script");
                c.args(["-qfec", &format!("bochs -q -f {} -rc {}", rc.display(), cmds.display()), "/dev/null"]);
                c.env("TERM", "xterm");
                c
            }
            Emulator::QemuKvm | Emulator::QemuTcg => {
                let mut c = Command::new(emulator::QEMU);
                c.args(emulator::qemu_args(self.emulator == Emulator::QemuKvm, self.firmware, &image, &serial, self.mem_mib));
                c
            }
        };
        use std::os::unix::process::CommandExt;
        cmd.current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| io(e, &self.dir))?)
            .stderr(out)
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| format!("could not start {}: {e}", self.emulator))?;
        let report = self.watch(&mut child, &serial, started);
        self.stop(&mut child);
        report
    }

    fn watch(&self, child: &mut Child, serial: &Path, started: Instant) -> Result<Report, String> {
        let mut shown = 0;
        let mut to_summary = None;
        let mut line_seen: Option<Instant> = None;
        let mut stdout = std::io::stdout();
        loop {
            let exited = child.try_wait().map_err(|e| e.to_string())?;
            let log = std::fs::read(serial).unwrap_or_default();
            if self.echo && log.len() > shown {
                let _ = stdout.write_all(&log[shown..]);
                let _ = stdout.flush();
            }
            shown = log.len();
            let text = String::from_utf8_lossy(&log);
            if to_summary.is_none() && text.contains(SUMMARY_MARKER) {
                to_summary = Some(started.elapsed());
            }
            let verdict = decide(self.emulator, &text, exited).or_else(|| {
                // Still running: QEMU gets a grace period after the result
                // line to exit with its status; then the overall timeout.
                let line = serial_result(&text).filter(|_| self.emulator != Emulator::Bochs);
                if let Some(code) = line {
                    let since = *line_seen.get_or_insert_with(Instant::now);
                    if since.elapsed() > QEMU_EXIT_GRACE {
                        return Some(Verdict {
                            outcome: Outcome::NoResult(format!(
                                "the kernel printed `{}` but {} did not exit within {} s (no isa-debug-exit device?)",
                                code.serial_line(),
                                self.emulator,
                                QEMU_EXIT_GRACE.as_secs()
                            )),
                            note: None,
                        });
                    }
                }
                (started.elapsed() > self.timeout).then_some(Verdict { outcome: Outcome::TimedOut, note: None })
            });
            if let Some(Verdict { outcome, note }) = verdict {
                if let Some(note) = note {
                    eprintln!("boot: {note}");
                }
                return Ok(Report { outcome, serial: serial.to_path_buf(), to_summary, total: started.elapsed() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Gives the emulator a moment to power off by itself, then kills its
    /// whole process group (Bochs runs under `script`, in a session of its
    /// own, so it is also found by its run directory).
    fn stop(&self, child: &mut Child) {
        for _ in 0..40 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
        let _ = Command::new("pkill").args(["-KILL", "-f", &self.dir.display().to_string()]).status();
        let _ = child.wait();
    }
}

/// The last `n` lines of the serial log, for a failure report.
pub fn tail(serial: &Path, n: usize) -> String {
    let log = std::fs::read(serial).unwrap_or_default();
    let text = String::from_utf8_lossy(&log);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    const QEMUS: [Emulator; 2] = [Emulator::QemuKvm, Emulator::QemuTcg];

    fn exit(code: i32) -> Option<ExitStatus> {
        Some(ExitStatus::from_raw(code << 8))
    }

    fn exited(code: ExitCode) -> Option<Verdict> {
        Some(Verdict { outcome: Outcome::Exited(code), note: None })
    }

    fn no_result(v: Option<Verdict>) -> String {
        match v {
            Some(Verdict { outcome: Outcome::NoResult(why), note: None }) => why,
            other => panic!("expected no result, got {other:?}"),
        }
    }

    /// A serial log as the kernel writes it, with `guest` as a VM's line.
    fn log(guest: &str, result: Option<ExitCode>) -> String {
        let mut s = format!("[INFO ] booting\n[INFO ] [vm0] {guest}\n[INFO ] == boot summary ==\n");
        if let Some(c) = result {
            s += &c.serial_line();
            s += "\r\n";
        }
        s
    }

    const FORGED: &str = "HV-EXIT: 0x10 success";

    #[test]
    fn bochs_reads_the_anchored_line_only() {
        let e = Emulator::Bochs;
        for c in ExitCode::ALL {
            assert_eq!(decide(e, &log("hi", Some(c)), None), exited(c));
            assert_eq!(decide(e, &log("hi", Some(c)), exit(0)), exited(c));
        }
        // A guest's forged line is not a result, running or stopped.
        assert_eq!(decide(e, &log(FORGED, None), None), None);
        let why = no_result(decide(e, &log(FORGED, None), exit(1)));
        assert!(why.contains("bochs stopped") && why.contains("without a `HV-EXIT:` line"), "{why}");
        // The forged line comes first; the kernel's own one still decides.
        assert_eq!(decide(e, &log(FORGED, Some(ExitCode::Failure)), None), exited(ExitCode::Failure));
        // A NUL that Bochs left at the start of the line is allowed.
        assert_eq!(decide(e, "\0HV-EXIT: 0x12 no-vmx\n", None), exited(ExitCode::NoVmx));
    }

    #[test]
    fn only_whole_lines_count() {
        // "0x1" of "0x11 failure" so far: not read as anything yet.
        assert_eq!(decide(Emulator::Bochs, "[INFO ] x\nHV-EXIT: 0x1", None), None);
        assert_eq!(decide(Emulator::Bochs, "HV-EXIT: 0x10 success", None), None);
        assert_eq!(serial_result("HV-EXIT: 0x10 success"), None);
        assert_eq!(serial_result("HV-EXIT: 0x10 success\n"), Some(ExitCode::Success));
        assert_eq!(serial_result("a\nHV-EXIT: 0x11 failure\r\nb"), Some(ExitCode::Failure));
        assert_eq!(serial_result(""), None);
    }

    #[test]
    fn qemu_waits_for_its_exit_and_its_status_decides() {
        for e in QEMUS {
            // The line alone is not enough: wait for QEMU's status.
            assert_eq!(decide(e, &log("hi", Some(ExitCode::Success)), None), None);
            for c in ExitCode::ALL {
                assert_eq!(decide(e, &log("hi", Some(c)), exit(c.qemu_status())), exited(c));
            }
        }
    }

    #[test]
    fn qemu_status_wins_over_the_serial_line_and_says_so() {
        let v = decide(Emulator::QemuKvm, &log("hi", Some(ExitCode::Success)), exit(ExitCode::Failure.qemu_status()))
            .unwrap();
        assert_eq!(v.outcome, Outcome::Exited(ExitCode::Failure));
        let note = v.note.unwrap();
        assert!(note.contains("`HV-EXIT: 0x10 success`") && note.contains("35") && note.contains("status wins"), "{note}");
        // No result line at all, but the status: the status, with a note.
        let v = decide(Emulator::QemuTcg, &log(FORGED, None), exit(ExitCode::NoVmx.qemu_status())).unwrap();
        assert_eq!(v.outcome, Outcome::Exited(ExitCode::NoVmx));
        let note = v.note.unwrap();
        assert!(note.contains("37 says no-vmx") && note.contains("no `HV-EXIT:` line"), "{note}");
    }

    #[test]
    fn a_bootloader_panic_ends_the_run_at_once() {
        // As logged by the BIOS stage 4 (bootloader-x86_64-common's logger
        // writes "{level:5}: {message}") and as printed by the UEFI one
        // after OVMF's escapes (seen with a 200 MB ramdisk in 256 MB).
        let bios = "ERROR: panicked at src/main.rs:120:5:\r\nout of frames\r\n";
        let uefi = "\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: starting Boot0002\r\n\x1b[2J\x1b[01;01Hpanicked at /x/bootloader-x86_64-uefi-0.11.17/src/main.rs:244:6:\r\nFailed to allocate memory for the file: Error { status: OUT_OF_RESOURCES, data: () }\r\n";
        assert_eq!(boot_failure(bios).as_deref(), Some("panicked at src/main.rs:120:5: out of frames"));
        assert_eq!(
            boot_failure(uefi).as_deref(),
            Some("panicked at /x/bootloader-x86_64-uefi-0.11.17/src/main.rs:244:6: Failed to allocate memory for the file: Error { status: OUT_OF_RESOURCES, data: () }")
        );
        for e in [Emulator::Bochs, Emulator::QemuTcg, Emulator::QemuKvm] {
            let why = no_result(decide(e, bios, None));
            assert_eq!(why, "the bootloader failed before the kernel started: panicked at src/main.rs:120:5: out of frames");
        }
        // Not before the message line is whole; an old-style one-line panic at once.
        assert_eq!(boot_failure("ERROR: panicked at src/main.rs:120:5:\r\nout of"), None);
        assert_eq!(boot_failure("ERROR: panicked at 'x', src/main.rs:1:2\n").as_deref(), Some("panicked at 'x', src/main.rs:1:2"));
        // The kernel's lines and guest text inside them never count, nor
        // anything after the kernel's first line, nor other prefixes.
        assert_eq!(boot_failure("\r\n[PANIC] panicked at x:\r\ny\r\n"), None);
        assert_eq!(boot_failure(&log("panicked at x:", None)), None);
        assert_eq!(boot_failure("\0[INFO ] hv starting\nERROR: panicked at x:\ny\n"), None);
        assert_eq!(boot_failure("INFO : panicked at x:\ny\n"), None);
        assert_eq!(boot_failure("say panicked at x:\ny\n"), None);
        assert_eq!(decide(Emulator::Bochs, &log("panicked at x:\ny", None), None), None);
    }

    #[test]
    fn a_qemu_status_that_is_none_of_ours_is_no_result() {
        for (status, line) in [(0, None), (1, Some(ExitCode::Success)), (33 << 1, None), (255, Some(ExitCode::Failure))] {
            let why = no_result(decide(Emulator::QemuKvm, &log(FORGED, line), exit(status)));
            assert!(why.contains(&format!("exit status: {status}")), "{why}");
            assert!(why.contains("is no kernel result") && why.contains("33, 35, 37"), "{why}");
            assert_eq!(why.contains("does not count under QEMU"), line.is_some(), "{why}");
        }
        // Killed by a signal: no exit code at all.
        let why = no_result(decide(Emulator::QemuTcg, "", Some(ExitStatus::from_raw(9))));
        assert!(why.contains("signal: 9") && why.contains("no kernel result"), "{why}");
    }
}

//! One headless boot: start the emulator in its own run directory, echo
//! the serial log as it grows, stop at the kernel's result line, the
//! emulator's exit or the timeout, and say how the run ended.

use crate::emulator::{self, Emulator, Firmware};
use hvcore::exit::{ExitCode, EXIT_MARKER};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Printed by the kernel at the top of its boot summary (kernel/src/summary.rs).
const SUMMARY_MARKER: &str = "== boot summary ==";

pub enum Outcome {
    /// The kernel printed its result line.
    Exited(ExitCode),
    /// The emulator stopped without a result line (crash, triple fault).
    NoResult(String),
    TimedOut,
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
                std::fs::write(&rc, emulator::bochsrc(&image, &serial, &log)).map_err(|e| io(e, &rc))?;
                // The Debian build has the debugger in: `c` makes it run.
                std::fs::write(&cmds, "c\n").map_err(|e| io(e, &cmds))?;
                let mut c = Command::new("script");
                c.args(["-qfec", &format!("bochs -q -f {} -rc {}", rc.display(), cmds.display()), "/dev/null"]);
                c.env("TERM", "xterm");
                c
            }
            Emulator::QemuKvm | Emulator::QemuTcg => {
                let mut c = Command::new(emulator::QEMU);
                c.args(emulator::qemu_args(self.emulator == Emulator::QemuKvm, self.firmware, &image, &serial));
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
            // Only whole lines count: the code may still be arriving.
            let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            let result = whole.lines().find_map(ExitCode::from_serial_line);
            let outcome = match (result, exited) {
                (Some(code), _) => Some(Outcome::Exited(code)),
                (None, Some(status)) => Some(Outcome::NoResult(format!(
                    "{} stopped ({status}) without a `{EXIT_MARKER}` line",
                    self.emulator
                ))),
                (None, None) if started.elapsed() > self.timeout => Some(Outcome::TimedOut),
                _ => None,
            };
            if let Some(outcome) = outcome {
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

//! `cargo run`: build the hypervisor's disk images and boot them headless
//! in the best emulator on this machine. See `--help`.

mod emulator;
mod images;
mod run;

use emulator::{Emulator, Firmware};
use hvcore::exit::ExitCode;
use std::process::ExitCode as Status;
use std::time::Duration;

const USAGE: &str = "\
usage: cargo run [--] [build|run] [options]

  run (default)   build the images, then boot one headless and wait for
                  the kernel's result
  build           only build target/images/<name>/{bios,uefi}.img

options:
  --emulator E    auto (default), bochs, qemu (TCG) or qemu-kvm (nested)
  --firmware F    bios (default) or uefi (QEMU only)
  --options S     boot options for the kernel, e.g. \"log=debug warn-test=1\"
  --name N        name of the image set and run directory (default: default)
  --timeout S     seconds before a run is killed and failed (default: 300)
  --quiet         do not echo the serial log

exit status: 0 success, 1 the kernel reported failure, 2 bad usage or a
missing tool, 3 the kernel reported no usable VMX, 4 timeout or no result";

struct Args {
    build_only: bool,
    emulator: Option<Emulator>,
    firmware: Firmware,
    options: String,
    name: String,
    timeout: Duration,
    echo: bool,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        build_only: false,
        emulator: None,
        firmware: Firmware::Bios,
        options: String::new(),
        name: "default".into(),
        timeout: Duration::from_secs(300),
        echo: true,
    };
    while let Some(arg) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "run" => {}
            "build" => a.build_only = true,
            "--emulator" => {
                a.emulator = match value()?.as_str() {
                    "auto" => None,
                    "bochs" => Some(Emulator::Bochs),
                    "qemu" => Some(Emulator::QemuTcg),
                    "qemu-kvm" => Some(Emulator::QemuKvm),
                    e => return Err(format!("unknown emulator '{e}'")),
                }
            }
            "--firmware" => {
                a.firmware = match value()?.as_str() {
                    "bios" => Firmware::Bios,
                    "uefi" => Firmware::Uefi,
                    f => return Err(format!("unknown firmware '{f}'")),
                }
            }
            "--options" => a.options = value()?,
            "--name" => a.name = value()?,
            "--timeout" => {
                let v = value()?;
                a.timeout = Duration::from_secs(v.parse().map_err(|_| format!("bad timeout '{v}'"))?)
            }
            "--quiet" => a.echo = false,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument '{other}'\n\n{USAGE}")),
        }
    }
    Ok(a)
}

fn main() -> Status {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return Status::from(2);
        }
    };
    match run(&args) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("boot: {e}");
            Status::from(2)
        }
    }
}

fn run(args: &Args) -> Result<Status, String> {
    // Choose (and check for missing tools) before the slow build.
    let (emulator, why) = match args.emulator {
        None if !args.build_only => emulator::choose(args.firmware)?,
        Some(e) => emulator::check(e, args.firmware).map(|()| (e, "asked for with --emulator".into()))?,
        None => (Emulator::QemuTcg, String::new()),
    };
    let images = images::build(&args.name, &args.options)?;
    if args.build_only {
        println!("{}\n{}", images.bios.display(), images.uefi.display());
        return Ok(Status::SUCCESS);
    }
    eprintln!("boot: {} image in {emulator}: {why}", args.firmware);
    let run = run::Run {
        emulator,
        firmware: args.firmware,
        image: &emulator::image_for(&images, args.firmware),
        dir: images::workspace_root().join("target/runs").join(format!("{}-{emulator}-{}", args.name, args.firmware)),
        timeout: args.timeout,
        echo: args.echo,
    };
    let report = run.start()?;
    let summary = report.to_summary.map_or("never".into(), |d| format!("after {:.2} s", d.as_secs_f64()));
    let took = format!("boot summary {summary}, run {:.2} s", report.total.as_secs_f64());
    let status = match report.outcome {
        run::Outcome::Exited(code) => {
            eprintln!("boot: {emulator}/{}: kernel says {} ({took})", args.firmware, code.name());
            match code {
                ExitCode::Success => 0,
                ExitCode::Failure => 1,
                ExitCode::NoVmx => 3,
            }
        }
        run::Outcome::NoResult(why) => {
            eprintln!("boot: {why} ({took}); serial log ends:\n{}", run::tail(&report.serial, 20));
            4
        }
        run::Outcome::TimedOut => {
            eprintln!(
                "boot: killed after the {} s timeout ({took}); serial log ends:\n{}",
                args.timeout.as_secs(),
                run::tail(&report.serial, 20)
            );
            4
        }
    };
    eprintln!("boot: serial log: {}", report.serial.display());
    Ok(Status::from(status))
}

//! `cargo run`: build the hypervisor's disk images and boot them headless
//! in the best emulator on this machine. See `--help`.

mod args;
mod emulator;
mod images;
mod run;

use args::Args;
use emulator::Emulator;
use hvcore::exit::ExitCode;
use std::process::ExitCode as Status;

fn main() -> Status {
    let args = match args::parse(std::env::args().skip(1)) {
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
    let images = images::build(&args.name, &args.options, &args.vms, args.boot_log)?;
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
        mem_mib: emulator::machine_mib(&args.vms),
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

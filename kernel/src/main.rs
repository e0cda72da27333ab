//! The hypervisor kernel: booted by the `bootloader` crate, owns the machine.
//!
//! This file is the boot sequence only; each step lives in its own module.
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

extern crate alloc;

// First: its `guest_log!` is used by the modules after it.
#[macro_use]
mod vm;
mod exits;
mod gdt;
mod hypervisor;
mod interrupts;
mod logger;
mod memory;
mod power;
mod serial;
mod summary;
mod tsc;
mod vcpu;
mod vmx;

use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::{entry_point, BootInfo};
use core::panic::PanicInfo;
use hvcore::bundle::Bundle;
use hvcore::exit::ExitCode;
use hvcore::hypercall::scenario;
use hvcore::mmu_notifier::NotifierMode;
use hvcore::options::{Options, VmSpec};
use alloc::string::String;
use alloc::vec::Vec;
use hypervisor::{Guest, NewVm};

pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    // All physical memory mapped at an offset: how `hvcore::phys` reaches
    // frames (guest memory, EPT tables, VMCS regions).
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    serial::init();
    logger::init(logger::build_time_level());
    log::info!("hv {} starting", env!("CARGO_PKG_VERSION"));
    // For debuggers: where the bootloader put us (docs/debugging.md).
    log::info!("kernel image at {:#x} ({} bytes)", boot_info.kernel_image_offset, boot_info.kernel_len);
    gdt::init();
    interrupts::init();
    x86_64::instructions::interrupts::int3(); // the IDT answers, or we stop here
    log::debug!("gdt, tss and idt loaded");

    let Some(phys_offset) = boot_info.physical_memory_offset.into_option() else {
        fail("the bootloader did not map physical memory")
    };
    let (mem, frames) = memory::init(&boot_info.memory_regions, phys_offset).unwrap_or_else(|e| fail(e));

    let ramdisk = ramdisk(boot_info);
    let bundle = Bundle::parse(ramdisk).unwrap_or_else(|e| fail(format_args!("boot bundle: {e}")));
    let options = match bundle.file("options").map(core::str::from_utf8) {
        None => Options::default(),
        Some(Ok(text)) => Options::parse(text).unwrap_or_else(|e| fail(e)),
        Some(Err(_)) => fail("boot options are not UTF-8"),
    };
    if let Some(level) = options.log {
        log::set_max_level(level);
    }

    let cpu = summary::cpu();
    summary::print(&cpu, &mem, ramdisk.len() as u64, bundle.entries().count());

    if options.fault_test {
        log::info!("fault-test: reading an unmapped address on purpose");
        // SAFETY: not safe at all: this is the test of the page-fault path.
        unsafe { core::ptr::read_volatile(0x7fff_dead_0000 as *const u64) };
    }

    if options.panic_test {
        panic!("panic-test: panicking on purpose");
    }
    if options.hang_test {
        log::info!("hang-test: spinning forever");
        loop {
            core::hint::spin_loop();
        }
    }

    power::exit(run_guests(&bundle, &options, frames))
}

/// Turns VMX on, creates the VMs the options ask for and runs them.
fn run_guests(bundle: &Bundle, options: &Options, frames: hvcore::frame::FrameAllocator) -> ExitCode {
    mask_legacy_pic();
    let vmx = match vmx::enable() {
        Ok(vmx) => vmx,
        Err(e) => {
            log::error!("cannot run guests: {e}");
            return ExitCode::NoVmx;
        }
    };
    let Some(elf) = bundle.file("guest/guest.elf") else {
        log::error!("the boot bundle has no guest/guest.elf");
        return ExitCode::Failure;
    };
    let mode = if options.linux_zap { NotifierMode::LinuxZap } else { NotifierMode::ChangePte };
    let tsc_hz = match tsc::measure() {
        Some((hz, source)) => {
            log::info!("tsc: {}.{:03} MHz ({source:?})", hz / 1_000_000, hz / 1000 % 1000);
            hz
        }
        None => {
            log::warn!("tsc: rate unknown (no PIT, no CPUID 0x15/0x16): Linux guests are refused");
            0
        }
    };
    let mut hv = hypervisor::Hypervisor::new(&vmx, frames, mode, options.share, options.oom_test, tsc_hz);
    let manifest = match bundle.file("vms").map(core::str::from_utf8) {
        None => Vec::new(),
        Some(Ok(text)) => match hvcore::manifest::parse(text) {
            Ok(entries) => entries,
            Err(e) => {
                log::error!("the boot bundle's VM list: {e}");
                return ExitCode::Failure;
            }
        },
        Some(Err(_)) => {
            log::error!("the boot bundle's VM list is not UTF-8");
            return ExitCode::Failure;
        }
    };
    let default = [scenario::HELLO, scenario::HELLO, scenario::DEDUPE, scenario::DEDUPE].map(VmSpec::new);
    let scenarios = match (&options.vms, manifest.is_empty()) {
        (Some(v), _) => v.as_slice(),
        (None, true) => &default[..],
        (None, false) => &[],
    };
    let mut refused = 0;
    let create = |hv: &mut hypervisor::Hypervisor, new: NewVm, refused: &mut u32| {
        if let Err(e) = hv.create_vm(new) {
            log::error!("{e}");
            *refused += 1;
        }
    };
    for spec in scenarios {
        let label = scenario::name(spec.scenario).unwrap_or("?").into();
        let guest = Guest::Program { elf, scenario: spec.scenario };
        create(&mut hv, NewVm { label, guest, mem: hypervisor::GUEST_MEMORY, frame_quota: spec.frame_quota.or(options.frame_quota) }, &mut refused);
    }
    for entry in &manifest {
        match vm_from_manifest(bundle, elf, entry) {
            Ok(mut new) => {
                new.frame_quota = new.frame_quota.or(options.frame_quota);
                create(&mut hv, new, &mut refused)
            }
            Err(why) => {
                log::error!("{}: refused: {why}", entry.label);
                refused += 1;
            }
        }
    }
    if options.bad_image_test {
        // The first 100 bytes of the ELF: a header whose program headers
        // lie beyond the image.
        let guest = Guest::Program { elf: &elf[..elf.len().min(100)], scenario: scenario::HELLO };
        match hv.create_vm(NewVm { label: "hello".into(), guest, mem: hypervisor::GUEST_MEMORY, frame_quota: None }) {
            Err(e) => log::info!("bad-image-test: {e}"),
            Ok(()) => {
                log::error!("bad-image-test: a truncated guest image was accepted");
                refused += 1;
            }
        }
    }
    if options.warn_test {
        hv.change_pte_outside_bracket();
    }
    hv.run();
    if hv.report() && refused == 0 { ExitCode::Success } else { ExitCode::Failure }
}

/// A VM of the bundle's list, its files looked up in the bundle.
fn vm_from_manifest<'a>(bundle: &Bundle<'a>, elf: &'a [u8], e: &'a hvcore::manifest::VmEntry) -> Result<NewVm<'a>, String> {
    use hvcore::manifest::Kind as M;
    let file = |path: &str| bundle.file(path).ok_or_else(|| alloc::format!("{path} is missing from the boot bundle"));
    let guest = match &e.kind {
        M::Program { scenario: name } => {
            let scn = scenario::from_name(name).ok_or_else(|| alloc::format!("no guest scenario named '{name}'"))?;
            Guest::Program { elf, scenario: scn }
        }
        M::File if hvcore::loader::linux::is_bzimage(file(&e.kernel)?) => {
            // The first module is its initramfs (the runner's --initrd).
            let initrd = match e.modules.first() {
                Some(m) => Some(file(&m.path)?),
                None => None,
            };
            if e.modules.len() > 1 {
                return Err(alloc::format!("a Linux kernel takes one initramfs, not {} modules", e.modules.len()));
            }
            Guest::Linux { kernel: file(&e.kernel)?, initrd, cmdline: &e.cmdline }
        }
        M::File => {
            let kernel = file(&e.kernel)?;
            let mut modules = alloc::vec::Vec::new();
            for m in &e.modules {
                modules.push(hvcore::loader::multiboot::Module { data: file(&m.path)?, cmdline: &m.cmdline });
            }
            Guest::Multiboot { kernel, name: &e.label, args: &e.cmdline, modules }
        }
    };
    let mem = if matches!(guest, Guest::Program { .. }) { hypervisor::GUEST_MEMORY } else { e.mem };
    Ok(NewVm { label: e.label.clone(), guest, mem, frame_quota: e.frame_quota })
}

/// The kernel takes no interrupts (guests are switched on the VMX
/// preemption timer); masking the 8259s keeps the firmware's timer from
/// exiting every guest over and over.
fn mask_legacy_pic() {
    use x86_64::instructions::port::Port;
    // SAFETY: the 8259 data ports; masking all lines has no other effect.
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
}

fn ramdisk(boot_info: &BootInfo) -> &'static [u8] {
    match boot_info.ramdisk_addr.into_option() {
        // SAFETY: the bootloader mapped the ramdisk there, read-only for us.
        Some(addr) => unsafe { core::slice::from_raw_parts(addr as *const u8, boot_info.ramdisk_len as usize) },
        None => &[],
    }
}

/// Stops the boot with a reason.
fn fail(why: impl core::fmt::Display) -> ! {
    log::error!("boot failed: {why}");
    power::exit(ExitCode::Failure)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // SAFETY: we never return to the code that may hold the port lock.
    unsafe { serial::force_unlock() };
    match info.location() {
        Some(l) => println!("[PANIC] {} at {}:{}:{}", info.message(), l.file(), l.line(), l.column()),
        None => println!("[PANIC] {}", info.message()),
    }
    power::exit(ExitCode::Failure)
}

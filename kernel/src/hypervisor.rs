//! The hypervisor proper: creates the VMs, runs them round-robin on this
//! CPU (switching on the VMX-preemption timer and on yields), runs the
//! dedupe scanner between time slices, and reports how every VM ended.

use crate::exits::{self, Next};
use crate::memory::Page;
use crate::vcpu::{HostCpu, Vcpu};
use crate::vm::{Cause, End, Kind, Vm};
use crate::vmx::instructions::{self, GuestRegs as Regs, InvType};
use crate::vmx::vmcs::{self, Vmcs};
use crate::vmx::Vmx;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use hvcore::dedupe::{DedupeConfig, SharingPolicy};
use hvcore::frame::FrameAllocator;
use hvcore::hypercall::{guest_arg, scenario};
use hvcore::mmu_notifier::{NotifierMode, TlbFlush};
use hvcore::page_manager::{PageManager, VmConfig, VmId};
use hvcore::loader::{linux, multiboot};
use hvcore::phys::OffsetPhysMem;
use hvcore::platform::{Platform, PlatformConfig};
use hvcore::vmx::exit::{exit_reason_name, reason};
use hvcore::vmx::VmxCaps;
use x86::vmx::vmcs::{guest, ro};

/// Guest memory per VM. Below `MERGEABLE_START` (the guest's code, page
/// tables and stack) it is private; above, it is mergeable, as memory a
/// Linux process marks with madvise(MADV_MERGEABLE).
pub const GUEST_MEMORY: u64 = 8 << 20;
const MERGEABLE_START: u64 = hvcore::hypercall::dedupe_layout::REGION_START;
/// Dedupe pages looked at in one go. The scanner (our ksmd) runs between
/// time slices on a budget: a share of the guest time just spent
/// ([`SCAN_SHARE`]), at least one batch per slice so it always moves on.
/// Unbounded, it took 98% of the CPU from a guest with 128 MiB of memory
/// in Bochs (kvm-unit-tests' xsave: 1052 slices of 20000 ticks).
const SCAN_BATCH: usize = 16;
/// The scanner may use 1/SCAN_SHARE of the time the guests run.
const SCAN_SHARE: u64 = 4;
/// A program VM that has had this many slices without ending is stopped
/// (4e9 TSC ticks: every scenario ends long before).
const MAX_SLICES: u64 = 200_000;
/// The same for a VM from a file: unmodified guests may compute for long
/// (kvm-unit-tests' sieve needs more than 4e9 ticks in Bochs); a runner's
/// timeout bounds them in practice, this only ends a run that nothing
/// watches. It takes the CPU from nobody: slices are round-robin.
const MAX_SLICES_FILE_VM: u64 = 20_000_000;
/// A time slice in host TSC ticks, exit handling included (in Bochs about
/// 20000 guest instructions).
const SLICE_TICKS: u64 = 20_000;
/// The slice of an unmodified guest (a kvm-unit-tests kernel, Linux): ten
/// times longer. Such a guest exits far more often on its own (port I/O,
/// its timer, EPT faults), so it needs no preemption to give the others
/// their turn soon, and every preemption costs a VM exit and a vCPU
/// switch: measured for one Linux boot in Bochs, 113k of its 266k exits
/// were the preemption timer at 20k ticks. In Bochs 200k ticks are 4 ms,
/// one of Linux's timer ticks at HZ=250.
const FILE_VM_SLICE_TICKS: u64 = 200_000;
/// The frame quota of the `memhog` scenario (it has 8 MiB of memory).
const MEMHOG_QUOTA: usize = 1024;

/// What the exit handlers may use besides their VM.
pub struct Host {
    pub caps: VmxCaps,
    /// What every vCPU switches against.
    pub cpu: HostCpu,
    /// CR4 bits a guest may set: what its CPUID shows and VMX allows.
    pub cr4_allowed: u64,
    /// The optional secondary controls every VMCS gets.
    secondary: x86::vmx::vmcs::control::SecondaryControls,
    pub pm: PageManager<OffsetPhysMem>,
    sharing: SharingPolicy,
    converged_logged: bool,
    oom_test: bool,
    starving_someone: bool,
    /// The TSC rate in Hz ([`crate::tsc::measure`]; 0 if unknown): guests'
    /// TSCs run at it too.
    pub tsc_hz: u64,
    /// Frames held away from the pool while a starved VM runs (oom-test).
    held: Vec<hvcore::phys::PhysAddr>,
}

impl Host {
    /// What the guest's CPUID depends on besides the host's.
    /// `lapic`: the VM's virtual local APIC, if it has one.
    pub fn guest_view(&self, guest_cr4: u64, lapic: Option<&hvcore::devices::lapic::Lapic>) -> hvcore::cpuid::GuestView {
        use hvcore::devices::lapic::Mode;
        use hvcore::control_regs::{CR4_OSXSAVE, CR4_PKE};
        use x86::vmx::vmcs::control::SecondaryControls as S;
        hvcore::cpuid::GuestView {
            cr4_osxsave: guest_cr4 & CR4_OSXSAVE != 0,
            cr4_pke: guest_cr4 & CR4_PKE != 0,
            xcr0_allowed: self.cpu.xcr0,
            rdtscp: self.secondary.contains(S::ENABLE_RDTSCP),
            invpcid: self.secondary.contains(S::ENABLE_INVPCID),
            lapic: lapic.is_some(),
            apic_enabled: lapic.is_some_and(|l| l.mode() != Mode::Disabled),
            // The VMs with the virtual PC learn the rate their PIT and APIC
            // timer count at; the guest program needs none.
            tsc_hz: if lapic.is_some() { self.tsc_hz } else { 0 },
            xcr0: 0,
        }
    }

    /// DEDUPE_STATUS: converged only once a whole scan pass has run after
    /// the guest first asked (it filled its memory before asking), and
    /// that pass or a later one merged nothing and saw nothing change.
    pub fn dedupe_converged_for(&mut self, vm: &mut Vm) -> bool {
        let ksm = self.pm.ksm_stats();
        let asked_at = *vm.dedupe.asked_at.get_or_insert(ksm.full_scans);
        // With sharing off nothing will ever merge: that is converged.
        let settled = self.sharing == SharingPolicy::Off || (ksm.full_scans >= asked_at + 2 && self.pm.scan_converged());
        if !settled {
            return false;
        }
        if !self.converged_logged {
            self.converged_logged = true;
            log::info!(
                "dedupe converged: pages_shared={} pages_sharing={} pages_unshared={} pages_volatile={} zero_pages={} full_scans={}",
                ksm.pages_shared, ksm.pages_sharing, ksm.pages_unshared, ksm.pages_volatile, ksm.zero_pages, ksm.full_scans
            );
        }
        if vm.dedupe.violations_at_converged.is_none() {
            vm.dedupe.violations_at_converged = Some(vm.dedupe.region_violations);
        }
        true
    }

    /// Measures the DEDUPE guest's phases as it reports its checks.
    pub fn on_report(&mut self, vm: &mut Vm, check: u64) {
        use hvcore::hypercall::{check as id, dedupe_layout::WRITTEN_PAGES};
        let s = self.vm_stats(vm);
        match (check, vm.dedupe.violations_at_converged) {
            (id::DEDUPE_INTACT, Some(before)) => {
                log::info!("{}: re-read after merge: {} EPT violations", vm.name, vm.dedupe.region_violations - before);
                vm.dedupe.cow_at_reread = Some(s.cow_breaks);
                if self.oom_test && !self.starving_someone {
                    self.starving_someone = true;
                    vm.dedupe.starved = true;
                    log::info!("oom-test: {} will find the host out of frames when it writes", vm.name);
                    self.starve(vm);
                }
            }
            (id::DEDUPE_AFTER_WRITE, _) => {
                let cow = s.cow_breaks - vm.dedupe.cow_at_reread.unwrap_or(0);
                log::info!("{}: writes to {} pages merged before: {} COW breaks", vm.name, WRITTEN_PAGES.len(), cow);
            }
            _ => {}
        }
    }

    /// oom-test: while a starved VM runs, the pool has no free frame (as if
    /// other VMs had taken them); other VMs never see that.
    fn starve(&mut self, vm: &Vm) {
        if vm.dedupe.starved && self.held.is_empty() {
            self.held = self.pm.take_all_free();
        }
    }

    fn feed(&mut self) {
        let held = core::mem::take(&mut self.held);
        self.pm.give_back(held);
    }

    fn vm_stats(&self, vm: &Vm) -> hvcore::stats::VmStats {
        self.pm.vm_stats(vm.id).map(|(s, _)| s).unwrap_or_default()
    }
}

/// INVEPT for one VM's EPTP (known once its tables exist): single-context
/// where the CPU has it, else all-context (`VmxCaps::invept_type`).
struct InveptFlush {
    eptp: Arc<AtomicU64>,
    kind: InvType,
}

impl TlbFlush for InveptFlush {
    fn flush_guest_tlb(&mut self) {
        match (self.kind, self.eptp.load(Ordering::Relaxed)) {
            (InvType::SingleContext, eptp) if eptp != 0 => instructions::invept(InvType::SingleContext, eptp),
            _ => instructions::invept(InvType::AllContext, 0),
        }
    }
}

/// A VM to create.
pub struct NewVm<'a> {
    /// The name it is reported under.
    pub label: String,
    pub guest: Guest<'a>,
    /// Its memory in bytes (a program VM always has [`GUEST_MEMORY`]).
    pub mem: u64,
    /// The host frames it may hold; else the memhog scenario's small one,
    /// a file VM's memory size, or the page manager's default.
    pub frame_quota: Option<usize>,
}

/// What runs in a new VM.
pub enum Guest<'a> {
    /// The project's guest program in a scenario.
    Program { elf: &'a [u8], scenario: u8 },
    /// A multiboot kernel, its file name, arguments and modules.
    Multiboot { kernel: &'a [u8], name: &'a str, args: &'a str, modules: Vec<multiboot::Module<'a>> },
    /// A Linux bzImage, its initramfs and command line.
    Linux { kernel: &'a [u8], initrd: Option<&'a [u8]>, cmdline: &'a str },
}

pub struct Hypervisor {
    host: Host,
    vms: Vec<Vm>,
    msr_bitmap: Box<Page>,
    mode: NotifierMode,
    /// TSC ticks `run` took (in Bochs, about one per instruction).
    tsc_ticks: u64,
    /// Ticks the dedupe scanner may still use ([`Hypervisor::scan_for`]).
    scan_budget: i64,
    /// Ticks the scanner took in all (for the cost per scanned page).
    scan_ticks: u64,
}

impl Hypervisor {
    pub fn new(vmx: &Vmx, frames: FrameAllocator, mode: NotifierMode, sharing: SharingPolicy, oom_test: bool, tsc_hz: u64) -> Hypervisor {
        // With EPT accessed/dirty flags (SDM Vol. 3C 29.3.5) the scanner sees
        // which pages the guest wrote instead of hashing every page again.
        let track_dirty = vmx.caps.has_ept_accessed_dirty();
        let config = DedupeConfig { policy: sharing, track_dirty, ..DedupeConfig::default() };
        let pm = PageManager::new(*crate::memory::phys(), frames, config);
        let msr_bitmap = msr_bitmap();
        let cpu = HostCpu::init();
        let secondary = vmcs::optional_secondary(&vmx.caps);
        let mut host = Host {
            caps: vmx.caps, cpu, cr4_allowed: 0, secondary, pm, sharing, converged_logged: false, oom_test,
            starving_someone: false, held: Vec::new(), tsc_hz,
        };
        // The CR4 bits of the CPU the guest is shown (with CR4.OSXSAVE and
        // PKE on, so that nothing they gate is hidden), within VMX's limits.
        let view = host.guest_view(hvcore::control_regs::CR4_OSXSAVE | hvcore::control_regs::CR4_PKE, Some(&hvcore::devices::lapic::Lapic::new(0)));
        let shown = |l, s| hvcore::cpuid::guest_cpuid(l, s, &crate::vcpu::host_cpuid, &view);
        host.cr4_allowed = hvcore::control_regs::cr4_allowed(&shown) & vmx.caps.cr4_fixed.1;
        log::info!("vcpu: guest CR4 may set {:#x}; secondary controls {:#x}", host.cr4_allowed, secondary.bits());
        Hypervisor { host, vms: Vec::new(), msr_bitmap, mode, tsc_ticks: 0, scan_budget: 0, scan_ticks: 0 }
    }

    /// Creates a VM. A guest that cannot be set up is refused with the
    /// reason, and its memory goes back: nothing else changes.
    pub fn create_vm(&mut self, new: NewVm<'_>) -> Result<(), String> {
        let index = self.vms.len();
        let name = format!("vm{index}");
        let eptp_cell = Arc::new(AtomicU64::new(0));
        let mut config = VmConfig { mode: self.mode, ..VmConfig::default() };
        let memhog = matches!(new.guest, Guest::Program { scenario: scenario::MEMHOG, .. });
        let file_quota = match new.guest {
            // All of its memory, and the EPT tables that map it.
            Guest::Multiboot { .. } | Guest::Linux { .. } => Some((new.mem >> 12) as usize + (new.mem >> 21) as usize + 64),
            Guest::Program { .. } => None,
        };
        if let Some(q) = new.frame_quota.or(memhog.then_some(MEMHOG_QUOTA)).or(file_quota) {
            config.frame_quota = q;
        }
        let flush = InveptFlush { eptp: eptp_cell.clone(), kind: self.host.caps.invept_type() };
        let id = self
            .host
            .pm
            .create_vm(config, Box::new(flush))
            .map_err(|e| format!("{name} ({}): cannot create: {e:?}", new.label))?;
        match self.set_up(&name, id, &new, &eptp_cell) {
            Ok(vm) => {
                self.vms.push(vm);
                Ok(())
            }
            Err(why) => {
                let _ = self.host.pm.destroy_vm(id);
                Err(format!("{name} ({}): refused: {why}", new.label))
            }
        }
    }

    /// Memory, guest image and VMCS of a new VM.
    fn set_up(&mut self, name: &str, id: VmId, new: &NewVm<'_>, eptp_cell: &AtomicU64) -> Result<Vm, String> {
        let index = self.vms.len();
        let pm = &mut self.host.pm;
        let boot;
        let (start, kind, regs) = match &new.guest {
            Guest::Program { elf, scenario: scn } => {
                pm.add_slot(id, 0, MERGEABLE_START, false)
                    .and_then(|()| pm.add_slot(id, MERGEABLE_START, GUEST_MEMORY - MERGEABLE_START, true))
                    .map_err(|e| format!("memory slot: {e:?}"))?;
                let arg = guest_arg(*scn, index as u8);
                boot = hvcore::loader::program::load(elf, GUEST_MEMORY, arg, &mut |gpa, bytes| {
                    pm.write_gpa(id, gpa, bytes).map_err(|_| ())
                })
                .map_err(|e| format!("{e}"))?;
                (vmcs::Start::Long64(&boot), Kind::Program { scenario: *scn }, Regs { rdi: boot.rdi, ..Regs::default() })
            }
            Guest::Multiboot { kernel, name: file, args, modules } => {
                file_vm_memory(&self.host.caps, pm, id, new.mem, "a multiboot kernel starts")?;
                let spec = multiboot::Spec { kernel, name: file, args, modules, mem_size: new.mem };
                let entry = multiboot::load(&spec, &mut |gpa, bytes| pm.write_gpa(id, gpa, bytes).map_err(|_| ()))
                    .map_err(|e| match e {
                        // The file was tried as a bzImage first (main.rs).
                        multiboot::LoadError::NoHeader => format!("{e}, and it is no Linux bzImage either (no \"HdrS\" at 0x202)"),
                        _ => format!("{e}"),
                    })?;
                (vmcs::Start::Protected32 { eip: entry.eip, gdt: (0, 0) }, Kind::Multiboot, Regs { rax: entry.eax.into(), rbx: entry.ebx.into(), ..Regs::default() })
            }
            Guest::Linux { kernel, initrd, cmdline } => {
                if self.host.tsc_hz == 0 {
                    return Err("the host TSC rate is unknown (no PIT answered and CPUID has no 0x15/0x16): Linux could not keep time".into());
                }
                file_vm_memory(&self.host.caps, pm, id, new.mem, "Linux is entered at its 32-bit entry")?;
                let spec = linux::Spec { kernel, initrd: *initrd, cmdline, mem_size: new.mem };
                let entry = linux::load(&spec, &mut |gpa, bytes| pm.write_gpa(id, gpa, bytes).map_err(|_| ()))
                    .map_err(|e| format!("{e}"))?;
                let start = vmcs::Start::Protected32 { eip: entry.eip, gdt: (entry.gdt_base, entry.gdt_limit) };
                (start, Kind::Linux, Regs { rsi: entry.esi.into(), ..Regs::default() })
            }
        };
        let mmu = pm.mmu(id).map_err(|e| format!("{e:?}"))?;
        let eptp = mmu.eptp(mmu.accessed_dirty());
        eptp_cell.store(eptp, Ordering::Relaxed);

        let vcpu = Vcpu::new(Vmcs::new(self.host.caps.revision_id()), &self.host.cpu);
        vcpu.vmcs.load();
        // VPID 0 is the host's; each VM gets its own and starts with no
        // stale translations under it.
        let vpid = match self.host.caps.invvpid_type() {
            Some(kind) if self.host.caps.has_vpid() => {
                let v = index as u16 + 1;
                instructions::invvpid(kind, v);
                Some(v)
            }
            _ => None,
        };
        let setup = vmcs::Setup {
            caps: &self.host.caps,
            start,
            eptp,
            vpid,
            msr_bitmap: self.msr_bitmap.phys(),
            vapic: vcpu.vapic.phys(),
            cr4_allowed: self.host.cr4_allowed,
        };
        vmcs::setup(&setup).map_err(|e| format!("VMCS: {e}"))?;
        let rip = setup.initial().rip;
        if kind == (Kind::Program { scenario: scenario::BAD_VMCS }) {
            vmcs::set(x86::vmx::vmcs::control::CR3_TARGET_COUNT, 99);
        }
        let platform = Platform::new(&PlatformConfig {
            ram_size: new.mem,
            cpus: 1,
            lapic: kind.unmodified(),
            tsc_hz: self.host.tsc_hz,
        });
        let mut vm = Vm::new(name.into(), new.label.clone(), kind, id, vcpu, platform);
        vm.vcpu.regs = regs;
        log::info!(
            "{} ({}): created: {}, {} MiB, entry {:#x}, EPTP {:#x} (A/D {}), VPID {}",
            vm.name, vm.label, kind.name(), new.mem >> 20, rip, eptp,
            if eptp & (1 << 6) != 0 { "on" } else { "off" },
            vpid.map_or("off".into(), |v| format!("{v}"))
        );
        Ok(vm)
    }

    /// The negative test of the notifier contract: one `change_pte` with no
    /// invalidation in flight. It must WARN once, count, and harm nothing.
    pub fn change_pte_outside_bracket(&mut self) {
        let Some(vm) = self.vms.first() else { return };
        let pm = &self.host.pm;
        let gpa = 0x20_0000; // the guest's entry page, already backed
        if let (Ok(mmu), Some(frame)) = (pm.mmu(vm.id), pm.backing_frame(vm.id, gpa)) {
            log::info!("warn-test: change_pte on {} gpa {gpa:#x} with no invalidation in flight", vm.name);
            mmu.change_pte(pm.mem(), gpa >> 12, frame, hvcore::stage2::Perms::READ | hvcore::stage2::Perms::EXEC);
        }
    }

    /// Runs every VM until all have ended.
    pub fn run(&mut self) {
        let t0 = unsafe { core::arch::x86_64::_rdtsc() };
        self.schedule();
        self.tsc_ticks = unsafe { core::arch::x86_64::_rdtsc() } - t0;
    }

    fn schedule(&mut self) {
        let mut next = 0;
        loop {
            let n = self.vms.len();
            let live = |vm: &Vm| vm.end.is_none();
            if !self.vms.iter().any(live) {
                return;
            }
            let runnable = (0..n).map(|k| (next + k) % n).find(|&i| {
                let vm = &mut self.vms[i];
                live(vm) && (!vm.halted || crate::exits::interrupts::wakes(vm, crate::vcpu::guest_tsc(vm)))
            });
            match runnable {
                Some(i) => {
                    self.vms[i].halted = false;
                    let t0 = crate::vcpu::rdtsc();
                    self.slice(i);
                    self.scan_for(crate::vcpu::rdtsc() - t0);
                    next = i + 1;
                }
                None => self.idle(),
            }
        }
    }

    /// Runs the dedupe scanner after a slice that took `ran` ticks: one
    /// batch, then more while its budget lasts (a share of guest time; the
    /// unspent part carries over, up to one slice's worth).
    fn scan_for(&mut self, ran: u64) {
        let share = ran / SCAN_SHARE;
        self.scan_budget = (self.scan_budget + share as i64).min(share.max(SLICE_TICKS) as i64);
        loop {
            self.scan_budget -= self.scan_batch() as i64;
            if self.scan_budget <= 0 || self.host.pm.scan_converged() {
                return;
            }
        }
    }

    /// One batch of the dedupe scanner; the ticks it took.
    fn scan_batch(&mut self) -> u64 {
        let t0 = crate::vcpu::rdtsc();
        self.host.pm.scan(SCAN_BATCH);
        let took = crate::vcpu::rdtsc() - t0;
        self.scan_ticks += took;
        took
    }

    /// Every live VM is halted: wait for the first timer that can wake one.
    /// One that nothing can ever wake (no timer armed, no interrupt it
    /// accepts) is stopped, as it would sleep forever.
    fn idle(&mut self) {
        let deadline = |vm: &Vm| {
            let host_deadline = |t: u64| t.wrapping_sub(vm.vcpu.tsc_offset);
            exits::interrupts::next_deadline(vm).map(host_deadline)
        };
        let soonest = self.vms.iter().filter(|vm| vm.end.is_none()).filter_map(deadline).min();
        match soonest {
            Some(t) => {
                // The scan uses the wait; then spin out the rest (the host
                // takes no interrupts, so there is nothing to HLT for).
                while crate::vcpu::rdtsc() < t {
                    if self.host.pm.scan_converged() {
                        core::hint::spin_loop();
                    } else {
                        self.scan_batch();
                    }
                }
            }
            None => {
                for vm in self.vms.iter_mut().filter(|vm| vm.end.is_none()) {
                    let what = if vm.halted_with_if { "no interrupt source armed" } else { "interrupts disabled" };
                    vm.stop(Cause::Unhandled(format!("halted with {what}: nothing can ever wake it")));
                    announce_end(vm);
                }
            }
        }
    }

    /// One time slice of VM `i`: its state in, enter, handle exits, until
    /// it yields, its slice is used up or it ends; its state out.
    fn slice(&mut self, i: usize) {
        self.vms[i].slices += 1;
        self.host.starve(&self.vms[i]);
        let vm = &mut self.vms[i];
        vm.vcpu.vmcs.load();
        vm.vcpu.switch_in(&self.host.cpu);
        let t0 = crate::vcpu::rdtsc();
        let ticks = if vm.kind.unmodified() { FILE_VM_SLICE_TICKS } else { SLICE_TICKS };
        run_slice(vm, &mut self.host, t0, ticks);
        vm.cpu_ticks += crate::vcpu::rdtsc() - t0;
        vm.vcpu.switch_out(&self.host.cpu);
        let max = if vm.kind.unmodified() { MAX_SLICES_FILE_VM } else { MAX_SLICES };
        if vm.end.is_none() && vm.slices > max {
            vm.stop(Cause::Unhandled(format!("still running after {max} time slices")));
        }
        if vm.end.is_some() {
            // Write the VMCS back to memory; it is never used again.
            vm.vcpu.vmcs.clear();
            announce_end(vm);
        }
        self.host.feed();
    }

    /// Logs how each VM ended (a table), the exit counters and the memory
    /// statistics; true when every VM ended the way its kind expects.
    pub fn report(&mut self) -> bool {
        log::info!("== run report ==");
        log::info!("{:<5} {:<14} {:<9} {:<4} {:>8} {:>20}  ENDED", "VM", "NAME", "KIND", "OK", "EXITS", "FRAMES HELD/PEAK/MAX");
        let mut all_ok = true;
        for vm in &self.vms {
            let verdict = verdict(vm);
            all_ok &= verdict.is_ok();
            let (held, peak) = self.host.pm.vm_stats(vm.id).map_or((0, 0), |(s, _)| (s.frames_held, s.frames_peak));
            let frames = format!("{held}/{peak}/{}", self.host.pm.frame_quota(vm.id).unwrap_or(0));
            let mut ended = match &vm.end {
                Some(End::Exited(code)) => format!("exited with code {code}"),
                Some(End::DebugExit(status)) => format!("debug-exit status {status}"),
                Some(End::Reset) => "reset (reboot)".into(),
                Some(End::Stopped(cause)) => format!("stopped: {cause}"),
                None => "still running".into(),
            };
            if let Kind::Program { .. } = vm.kind {
                let passed = vm.checks.iter().filter(|c| !c.failed).count();
                ended += &format!("; {passed} checks passed, {} failed", vm.checks.len() - passed);
            }
            if let Err(why) = &verdict {
                ended += &format!("; NOT as expected: {why}");
            }
            let ok = if verdict.is_ok() { "yes" } else { "NO" };
            log::info!(
                "{:<5} {:<14} {:<9} {:<4} {:>8} {:>20}  {ended}",
                vm.name, vm.label, vm.kind.name(), ok, vm.total_exits(), frames
            );
        }
        log::info!("-- per VM: exits by reason; devices; CPU time --");
        for vm in &self.vms {
            let counts: Vec<String> = (0..reason::COUNT)
                .filter(|&r| vm.exits[r] > 0)
                .map(|r| format!("{}={}", exit_reason_name(r as u16), vm.exits[r]))
                .collect();
            log::info!("{} exits: {}", vm.name, if counts.is_empty() { "none".into() } else { counts.join(", ") });
            log::info!(
                "{} resources: {} TSC ticks of CPU in {} slices; unknown ports {}, refused hypercalls {}, guest log lines dropped {}; {} checks kept (cap {})",
                vm.name, vm.cpu_ticks, vm.slices, vm.platform.unknown_ports(), vm.refused_hypercalls, vm.logs_dropped(),
                vm.checks.len(), crate::vm::MAX_CHECKS
            );
        }
        let s = self.host.pm.ksm_stats();
        let t = self.host.pm.stats();
        log::info!("-- memory (Linux's names: /sys/kernel/mm/ksm, KVM's mmu notifier) --");
        for vm in &self.vms {
            let Ok((st, _)) = self.host.pm.vm_stats(vm.id) else { continue };
            let share = self.host.pm.vm_sharing(vm.id).unwrap_or_default();
            log::info!(
                "{} memory: frames_held={} frames_peak={} merged_pages={} zero_pages={} cow_breaks={} refaults={}",
                vm.name, st.frames_held, st.frames_peak, share.merged, share.zero, st.cow_breaks, st.refaults
            );
        }
        // Linux's measure of what KSM saves: one frame per page beyond the
        // first of each merged frame, and one per page on the zero frame.
        let saved = s.pages_sharing + s.zero_pages;
        log::info!(
            "sharing: host frames in use {} (held by VMs {} + merged {}), saved {} frames = {} MiB",
            t.vm.frames_held + s.pages_shared, t.vm.frames_held, s.pages_shared, saved, saved >> 8
        );
        if s.pages_scanned == 0 {
            log::info!("dedupe scan: no pages scanned ({} TSC ticks in scan calls)", self.scan_ticks);
        } else {
            log::info!(
                "dedupe scan: {} TSC ticks for {} pages scanned ({} per page; in Bochs a tick is about an instruction), {} of them hashed",
                self.scan_ticks, s.pages_scanned, self.scan_ticks / s.pages_scanned, s.pages_hashed
            );
        }
        log::info!(
            "dedupe: pages_shared={} pages_sharing={} pages_unshared={} pages_volatile={} full_scans={} zero_pages={} checksums_reused={}",
            s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile, s.full_scans, s.zero_pages, s.checksums_reused
        );
        log::info!(
            "memory: ept_violations={} (not_present={} refaults={} write_shared={} outside={} retries={}) cow_breaks={} pages_allocated={}",
            t.vm.ept_violations, t.vm.not_present, t.vm.refaults, t.vm.write_shared, t.vm.outside, t.vm.retries, t.vm.cow_breaks,
            t.vm.pages_allocated
        );
        let m = &t.mmu;
        log::info!(
            "notifier: invalidate_range_start={} change_pte={} (installed {}) invalidate_range_end={} tlb_flushes={} installs={} retries={} dirty_cleared={} warnings={}",
            m.invalidate_range_start, m.change_pte, m.change_pte_installed, m.invalidate_range_end, m.tlb_flushes,
            m.installs, m.retries, m.dirty_cleared, m.warnings
        );
        log::info!("warnings: {} WARN hits", hvcore::warn::total_hits());
        let (in_use, peak) = crate::memory::heap_usage();
        log::info!("heap: {} KiB in use, high-water mark {} KiB of {} KiB", in_use >> 10, peak >> 10, crate::memory::HEAP_SIZE >> 10);
        let exits: u64 = self.vms.iter().map(|vm| vm.total_exits()).sum();
        log::info!(
            "run: {} VM exits in {} TSC ticks ({} ticks per exit, handling and guest time included)",
            exits, self.tsc_ticks, self.tsc_ticks / exits.max(1)
        );
        let slices: u64 = self.vms.iter().map(|vm| vm.slices).sum();
        log::info!("{} VMs in {} time slices; {}", self.vms.len(), slices,
            if all_ok { "all ended as expected" } else { "some did NOT end as expected" });
        all_ok
    }
}

/// The `HV-VM:` line of a VM that just ended (`hvcore::exit::VM_END_MARKER`),
/// after what its UART still held of an unfinished line.
fn announce_end(vm: &mut Vm) {
    if let Some(line) = vm.platform.uart.take_partial() {
        log::info!("[{}] {}", vm.name, line);
    }
    let how = match &vm.end {
        Some(End::Exited(code)) => format!("exited={code}"),
        Some(End::DebugExit(status)) => format!("debug-exit={status}"),
        Some(End::Reset) => "reset".into(),
        Some(End::Stopped(cause)) => format!("stopped: {cause}"),
        None => return,
    };
    crate::println!("{} {} {} {how}", hvcore::exit::VM_END_MARKER, vm.name, vm.label);
}

/// Enters `vm` until its slice of `ticks` host ticks from `t0` is
/// used up. The slice is bounded in host time, exit handling included: a
/// guest that exits often cannot stretch it, with or without the
/// "save VMX-preemption timer" control (each entry gets only what is left,
/// SDM Vol. 3C 26.5.1).
fn run_slice(vm: &mut Vm, host: &mut Host, t0: u64, ticks: u64) {
    let rate = host.caps.preemption_timer_rate();
    loop {
        let used = crate::vcpu::rdtsc().wrapping_sub(t0);
        if used >= ticks {
            return;
        }
        exits::interrupts::deliver(vm);
        // The preemption timer also stands in for the VM's own timers (as
        // KVM's "hv timer" does for the APIC timer): it fires at the next
        // APIC or PIT deadline, so an interrupt the guest waits for while it
        // spins without exiting comes in time, not at the slice's end.
        let now = crate::vcpu::guest_tsc(vm);
        let timer = exits::interrupts::next_deadline(vm).and_then(|d| d.checked_sub(now)).filter(|&t| t > 0);
        let wait = timer.map_or(ticks - used, |t| t.min(ticks - used));
        vmcs::set(guest::VMX_PREEMPTION_TIMER_VALUE, (wait >> rate).max(1));
        // SAFETY: the VM's VMCS is current and fully set up.
        if unsafe { instructions::run(&mut vm.vcpu.regs, vm.vcpu.launched) }.is_err() {
            let err = vmcs::read(ro::VM_INSTRUCTION_ERROR) as u32;
            let what = hvcore::vmx::instruction_error_meaning(err);
            vm.stop(Cause::EntryFailed(format!("VM-instruction error {err}: {what}")));
            return;
        }
        vm.vcpu.launched = true;
        match exits::handle(vm, host) {
            Next::Resume => continue,
            Next::Yield | Next::Ended => return,
        }
    }
}

/// The MSR bitmap shared by every VM (SDM Vol. 3C 25.6.9): every RDMSR and
/// WRMSR exits except those of the MSRs the vCPU switches, which the
/// guest reaches directly.
fn msr_bitmap() -> Box<Page> {
    let mut bitmap = Page::zeroed();
    bitmap.0.fill(0xff);
    for msr in crate::vcpu::SWITCHED_MSRS {
        // Read bitmap for 0xC000_0000.. at byte 1024, write bitmap at 3072.
        let bit = (msr - 0xc000_0000) as usize;
        for base in [1024, 3072] {
            bitmap.0[base + bit / 8] &= !(1 << (bit % 8));
        }
    }
    bitmap
}

/// What an unmodified guest from a file needs before it is loaded: it
/// starts with paging off, which needs "unrestricted guest" (`starts`
/// names how, for the refusal), and all of its memory is one mergeable
/// slot, as QEMU marks guest RAM with madvise(MADV_MERGEABLE).
fn file_vm_memory(caps: &VmxCaps, pm: &mut PageManager<OffsetPhysMem>, id: VmId, mem: u64, starts: &str) -> Result<(), String> {
    if !caps.has_unrestricted_guest() {
        return Err(format!("{starts} with paging off: the CPU lacks the VMX feature \"unrestricted guest\""));
    }
    pm.add_slot(id, 0, mem, true).map_err(|e| format!("memory slot: {e:?}"))
}

/// Whether `vm` ended the way its scenario should.
fn verdict(vm: &Vm) -> Result<(), String> {
    let Kind::Program { scenario } = vm.kind else {
        // kvm-unit-tests' convention (and QEMU's isa-debug-exit users'):
        // status 0 is success.
        return match &vm.end {
            Some(End::DebugExit(0)) => Ok(()),
            Some(End::DebugExit(s)) => Err(format!("debug-exit status {s}, not 0")),
            Some(End::Reset) => Err("expected a debug-exit, got a reset".into()),
            end => Err(format!("expected a debug-exit, got {end:?}")),
        };
    };
    let failed = vm.checks.iter().filter(|c| c.failed).count();
    match (scenario, &vm.end) {
        (_, Some(End::Stopped(Cause::OutOfMemory))) if vm.dedupe.starved => Ok(()),
        _ if vm.dedupe.starved => Err("expected to be stopped out of memory".into()),
        (scenario::WILD_ACCESS, Some(End::Stopped(Cause::WildAccess(_)))) => Ok(()),
        (scenario::TRIPLE_FAULT, Some(End::Stopped(Cause::TripleFault))) => Ok(()),
        (scenario::BAD_VMCS, Some(End::Stopped(Cause::EntryFailed(_)))) => Ok(()),
        (scenario::DB_LOOP, Some(End::Stopped(Cause::ExceptionLoop { vector: 1, .. }))) => Ok(()),
        (scenario::MEMHOG, Some(End::Stopped(Cause::FrameQuota(_)))) => Ok(()),
        (scenario::WILD_ACCESS | scenario::TRIPLE_FAULT | scenario::BAD_VMCS | scenario::DB_LOOP | scenario::MEMHOG, _) => {
            Err("expected the hypervisor to stop it".into())
        }
        (_, Some(End::Exited(0))) if failed == 0 && !vm.checks.is_empty() => Ok(()),
        (_, Some(End::Exited(0))) if failed > 0 => {
            let ids: Vec<String> =
                vm.checks.iter().filter(|c| c.failed).map(|c| format!("{} (detail {:#x})", c.id, c.detail)).collect();
            Err(format!("checks failed: {}", ids.join(", ")))
        }
        (_, Some(End::Exited(0))) => Err("it reported no checks".into()),
        (_, end) => Err(format!("expected exit code 0, got {end:?}")),
    }
}

//! `scripts/bench.sh` (= `cargo run --release -p hvcore --example dedupe-bench --`):
//! the project's dedupe engine against Linux KSM, side by side in one run.
//!
//! Ours: hvcore's real page manager, dedupe scanner, notifier and EPT
//! tables over an arena-backed image of guest memory, split over several
//! VMs (page i of the image belongs to VM i % K, so duplicate groups span
//! VMs). Every page is written through the page manager and then touched
//! by a simulated guest with a write access, so each page has a live EPT
//! translation that a merge must write-protect and replace, and (with
//! dirty tracking, the default) a set EPT dirty flag, as in a running
//! guest that wrote its memory. Only the scan loop is timed: CPU time
//! (getrusage) and wall time, one thread.
//!
//! Linux: `../shared/peers/linux_ksm_bench.py` (next to the repository) on
//! the same shape, when /sys/kernel/mm/ksm is writable (root, CONFIG_KSM).
//!
//! Floor: one read of every byte of a buffer of the same size.
//!
//! See docs/dedupe-performance.md.

use hvcore::dedupe::{DedupeConfig, SharingPolicy};
use hvcore::frame::FrameAllocator;
use hvcore::mmu_notifier::{CountingFlush, NotifierMode};
use hvcore::page_manager::{Access, PageManager, VmConfig, VmId};
use hvcore::phys::{Arena, PhysAddr, PhysMem, PAGE_SIZE};
use hvcore::sim::SimGuest;
use hvcore::stats::KsmStats;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Heap accounting: the dedupe metadata is measured, not estimated.

struct Counting;
static HEAP: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = HEAP.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        HEAP.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            HEAP.fetch_sub(l.size(), Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn reset_peak() -> usize {
    let now = HEAP.load(Relaxed);
    PEAK.store(now, Relaxed);
    now
}

// ---------------------------------------------------------------------------
// Time.

/// CPU time of this process: (user + system, system).
fn cpu_time() -> (Duration, Duration) {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime) + tv(ru.ru_stime), tv(ru.ru_stime))
}

#[derive(Clone, Copy, Default)]
struct Times {
    /// User + system CPU seconds.
    cpu: f64,
    /// Of which system (page faults of growing indexes, mostly).
    sys: f64,
    wall: f64,
}

struct Clock {
    cpu0: (Duration, Duration),
    wall0: Instant,
}

impl Clock {
    fn start() -> Clock {
        Clock { cpu0: cpu_time(), wall0: Instant::now() }
    }
    fn read(&self) -> Times {
        let (cpu, sys) = cpu_time();
        Times {
            cpu: (cpu - self.cpu0.0).as_secs_f64(),
            sys: (sys - self.cpu0.1).as_secs_f64(),
            wall: self.wall0.elapsed().as_secs_f64(),
        }
    }
}

// ---------------------------------------------------------------------------
// The workload, as the peer script builds it.

#[derive(Clone, Copy)]
struct Shape {
    pages: usize,
    zero: f64,
    dup: f64,
    group: usize,
    seed: u64,
}

/// Page counts, computed exactly as linux_ksm_bench.py does
/// (`int(n * zero)`, `int(n * dup) // group * group`).
struct Counts {
    zero: usize,
    dup: usize,
    unique: usize,
    groups: usize,
}

impl Shape {
    fn counts(&self) -> Counts {
        let zero = (self.pages as f64 * self.zero) as usize;
        let dup = (self.pages as f64 * self.dup) as usize / self.group * self.group;
        let unique = self.pages - zero - dup;
        Counts { zero, dup, unique, groups: dup / self.group }
    }
    fn mib(&self) -> f64 {
        (self.pages * PAGE_SIZE) as f64 / (1 << 20) as f64
    }
}

/// What a correct engine ends with for `g` equal pages when one merged
/// frame holds at most `cap`: full frames, plus one for a remainder of at
/// least two (a lone page has nobody to merge with). (shared, sharing)
fn merged_pages(g: usize, cap: usize) -> (usize, usize) {
    let full = g / cap;
    let rest = g % cap;
    let shared = full + usize::from(rest >= 2);
    let mapped = full * cap + if rest >= 2 { rest } else { 0 };
    (shared, mapped - shared)
}

/// What our engine must end with: (pages_shared, pages_sharing, zero_pages).
fn expected(shape: &Shape, cfg: &DedupeConfig) -> (u64, u64, u64) {
    let c = shape.counts();
    let cap = cfg.max_page_sharing as usize;
    let (gs, gg) = merged_pages(shape.group, cap);
    let (mut shared, mut sharing) = (c.groups * gs, c.groups * gg);
    let mut zero_pages = 0;
    if cfg.use_zero_pages {
        zero_pages = if c.zero >= 2 { c.zero } else { 0 };
    } else {
        let (zs, zg) = merged_pages(c.zero, cap);
        shared += zs;
        sharing += zg;
    }
    (shared as u64, sharing as u64, zero_pages as u64)
}

/// splitmix64: seeds and the shuffle.
fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Random page content from a seed (wyrand).
fn fill_random(buf: &mut [u8; PAGE_SIZE], seed: u64) {
    let mut s = seed;
    for c in buf.as_chunks_mut::<8>().0 {
        s = s.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (s as u128).wrapping_mul((s ^ 0xe703_7ed1_a0b4_28db) as u128);
        c.copy_from_slice(&(((t >> 64) ^ t) as u64).to_le_bytes());
    }
}

/// A distinct seed per (tag, index) for one run seed (splitmix is a
/// bijection, so distinct keys never share content).
fn content_seed(seed: u64, tag: u64, index: u64) -> u64 {
    let mut s = seed;
    let base = splitmix(&mut s);
    let mut k = base ^ (tag << 56 | index);
    splitmix(&mut k)
}

#[derive(Clone, Copy)]
enum Kind {
    Zero,
    Unique,
    Group(u32),
}

/// The page kinds of the whole image, shuffled (with our own generator:
/// same counts and group sizes as the peer, not the same order).
fn kinds(shape: &Shape) -> Vec<Kind> {
    let c = shape.counts();
    let mut k = Vec::with_capacity(shape.pages);
    k.extend(std::iter::repeat_n(Kind::Zero, c.zero));
    k.extend(std::iter::repeat_n(Kind::Unique, c.unique));
    k.extend((0..c.dup).map(|i| Kind::Group((i / shape.group) as u32)));
    let mut rng = shape.seed ^ 0x5eed;
    for i in (1..k.len()).rev() {
        let j = (splitmix(&mut rng) % (i as u64 + 1)) as usize;
        k.swap(i, j);
    }
    k
}

// ---------------------------------------------------------------------------
// Ours.

const RAM: u64 = 0x10_0000; // guest RAM starts here in every VM
const ARENA_BASE: u64 = 0x1_0000_0000;

struct Ours {
    stats: KsmStats,
    expected: (u64, u64, u64),
    /// CPU / wall time until every expected merge was done.
    merged: Times,
    /// ... until a whole pass found nothing new (`scan_converged`).
    converged: Times,
    passes: usize,
    /// CPU seconds of each pass.
    pass_cpu: Vec<f64>,
    build_s: f64,
    /// Heap bytes of the per-page entries (page manager + dedupe).
    entry_bytes: usize,
    /// Heap bytes the dedupe indexes and stable records took at their peak
    /// during the scan, and at the end.
    index_peak: usize,
    index_end: usize,
    consistent: Result<(), &'static str>,
    tlb_flushes: u64,
    /// Looks that kept the stored checksum (dirty flag clear) and dirty
    /// flags cleared, during the scan.
    checksums_reused: u64,
    dirty_cleared: u64,
}

impl Ours {
    /// The merge counts are the ones a correct engine must reach.
    fn as_expected(&self) -> bool {
        (self.stats.pages_shared, self.stats.pages_sharing, self.stats.zero_pages) == self.expected
    }
}

/// Asks Linux for transparent huge pages behind `len` bytes at `p`.
fn hugepages(p: *mut u8, len: usize) {
    let start = (p as usize).next_multiple_of(2 << 20);
    let end = (p as usize + len) & !((2 << 20) - 1);
    if end > start {
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// Heap the scan may grow into without a page fault (`warm_up_heap`): more
/// than the indexes take at their peak (about 20 B per page, 46 B with
/// 90% pairs), with room for a table and its doubled successor.
const WARM_BYTES_PER_PAGE: usize = 96;

/// While on, the heap's freed memory stays mapped (no trimming, no mmap'd
/// chunks that go back to the kernel on free); off restores glibc's
/// defaults (mallopt(3)), so the arena and the floors' buffers, allocated
/// outside the timed scan, are fresh mmap'd memory at every size.
fn keep_heap_mapped(on: bool) {
    let (mmap_max, trim) = if on { (0, i32::MAX) } else { (65536, 128 * 1024) };
    // SAFETY: mallopt only sets glibc's tunables.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, mmap_max);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
    }
}

/// Faults in `bytes` of heap and frees them again, so the dedupe indexes
/// grow into memory that is already mapped, as the kernel's heap is (it
/// sits in the bootloader's map of physical memory and never faults).
/// Without it, each growing table page-faults fresh memory during the
/// timed scan, and on this VM a first touch of memory is slow and grows
/// with the footprint (host-side faults); Linux's ksmd allocates its
/// rmap_items from the kernel's slabs without page faults either.
fn warm_up_heap(bytes: usize, huge: bool) {
    let mut v: Vec<u8> = Vec::with_capacity(bytes);
    if huge {
        hugepages(v.as_mut_ptr(), bytes);
    }
    v.resize(bytes, 1);
    std::hint::black_box(&v);
}

#[allow(clippy::too_many_arguments)]
fn run_ours(shape: &Shape, vms: usize, cfg: DedupeConfig, batch: usize, huge: bool, interleave: bool, warm_heap: bool, quiet: bool) -> Ours {
    let n = shape.pages;
    let t_build = Instant::now();
    let per_vm: Vec<usize> = (0..vms).map(|k| (n + vms - 1 - k) / vms).collect();
    // Guest frames, EPT tables (about one per 512 pages per VM), slack.
    let frames = n + n / 256 + 64 * vms + 4096;
    let mem = Arena::new(ARENA_BASE, frames);
    if huge {
        // Like the kernel's map of physical memory (1 GiB / 2 MiB pages),
        // not 4 KiB pages: before anything is touched.
        hugepages(mem.ptr(PhysAddr(ARENA_BASE)), frames * PAGE_SIZE);
    }
    let fa = FrameAllocator::new([mem.range()]);
    let mut pm: PageManager<Arena> = PageManager::new(mem, fa, cfg);

    let h0 = HEAP.load(Relaxed);
    let ids: Vec<VmId> = per_vm
        .iter()
        .map(|&p| {
            // The whole arena: the benchmark measures the dedupe, not quotas.
            let cfg = VmConfig { mode: NotifierMode::ChangePte, share_group: None, frame_quota: frames };
            let id = pm.create_vm(cfg, Box::new(CountingFlush::default())).expect("create_vm");
            pm.add_slot(id, RAM, (p * PAGE_SIZE) as u64, true).expect("add_slot");
            id
        })
        .collect();
    let entry_bytes = HEAP.load(Relaxed) - h0;

    // The image: page i of it is page i / K of VM i % K. Written through
    // the page manager, then touched once by each VM's guest with a write
    // access, so the EPT maps every page (RWX) and, with dirty tracking,
    // its dirty flag is set, as for a guest that has been running.
    let kinds = kinds(shape);
    let mut buf = Box::new([0u8; PAGE_SIZE]);
    let mut guests: Vec<SimGuest> = ids.iter().map(|&id| SimGuest::new(id)).collect();
    // Order of first touch (which decides the host frames): VM by VM, each
    // VM's RAM in address order, as VMs started one after another; or,
    // with --interleave-frames, in image order, so consecutive host frames
    // belong to different VMs.
    let order: Box<dyn Iterator<Item = usize>> = if interleave {
        Box::new(0..n)
    } else {
        Box::new((0..vms).flat_map(move |k| (k..n).step_by(vms)))
    };
    for i in order {
        let (vm, gpa) = (i % vms, RAM + (i / vms * PAGE_SIZE) as u64);
        match kinds[i] {
            Kind::Zero => buf.fill(0),
            Kind::Unique => fill_random(&mut buf, content_seed(shape.seed, 1, i as u64)),
            Kind::Group(g) => fill_random(&mut buf, content_seed(shape.seed, 2, g as u64)),
        }
        pm.write_gpa(ids[vm], gpa, &buf[..]).expect("write_gpa");
        guests[vm].translate(&mut pm, gpa, Access::Write).expect("guest touch");
    }
    drop(kinds);
    let build_s = t_build.elapsed().as_secs_f64();

    let exp = expected(shape, &cfg);
    let want_merged = exp.0 + exp.1 + exp.2;
    let mut merged_total = 0u64;
    let mut merged_at = None;
    let mut passes = 0;
    let mut pass_cpu = Vec::new();
    if warm_heap {
        keep_heap_mapped(true);
        warm_up_heap(n * WARM_BYTES_PER_PAGE, huge);
    }
    let heap0 = reset_peak();

    // --- timed: the scan loop only ---
    let clock = Clock::start();
    let converged = loop {
        let r = pm.scan(batch);
        merged_total += r.merged as u64;
        if merged_at.is_none() && merged_total >= want_merged {
            merged_at = Some(clock.read());
        }
        passes += r.full_scans_completed;
        if r.full_scans_completed > 0 {
            let t = clock.read().cpu;
            pass_cpu.push(t - pass_cpu.iter().sum::<f64>());
        }
        if r.full_scans_completed > 0 && pm.scan_converged() {
            break clock.read();
        }
        if passes > 20 {
            eprintln!("dedupe-bench: no convergence after {passes} passes");
            break clock.read();
        }
    };
    // --- end of timed part ---
    if warm_heap {
        keep_heap_mapped(false);
    }

    let index_peak = PEAK.load(Relaxed) - heap0;
    let index_end = HEAP.load(Relaxed).saturating_sub(heap0);
    let stats = pm.ksm_stats();
    let consistent = pm.check_consistency();
    let all = pm.stats();
    let tlb_flushes = all.mmu.tlb_flushes;
    if !quiet {
        eprintln!("  ours: image built in {build_s:.1} s, {passes} passes");
    }
    Ours {
        stats,
        expected: exp,
        merged: merged_at.unwrap_or(Times { cpu: f64::NAN, sys: f64::NAN, wall: f64::NAN }),
        converged,
        passes,
        pass_cpu,
        build_s,
        entry_bytes,
        index_peak,
        index_end,
        consistent,
        tlb_flushes,
        checksums_reused: stats.checksums_reused,
        dirty_cleared: all.mmu.dirty_cleared,
    }
}

// ---------------------------------------------------------------------------
// The floors: what reading memory of the same size costs, engine aside.

/// What the memory of this machine costs at a given size.
#[derive(Clone, Copy)]
struct Floor {
    /// Best of three single reads of every byte (CPU s).
    read_s: f64,
    /// Best of three passes that each read every page together with a
    /// random other page of the buffer (CPU s): the least a merge pass
    /// reads (each page and a partner somewhere in memory). Its growth
    /// with the size is the machine's: caches, TLB reach and page walks,
    /// not the engine's.
    pair_s: f64,
    /// Best of three passes hashing every page in order (xxh3-64, the
    /// engine's page hash), nothing else: what a first pass that only
    /// hashed would cost.
    hash_s: f64,
}

fn read_floor(pages: usize, huge: bool) -> Floor {
    let words = pages * PAGE_SIZE / 8;
    let mut v: Vec<u64> = Vec::with_capacity(words);
    if huge {
        hugepages(v.as_mut_ptr() as *mut u8, words * 8);
    }
    v.extend((0..words as u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let c = Clock::start();
        // A plain fold: LLVM vectorizes it well for every target. (Eight
        // explicit accumulators, `[u64; 8]` added per 64-byte chunk, took
        // 6x as long with `-C target-cpu=native` on an AMD EPYC (Zen 4):
        // 0.27 s for 1 GiB against 0.045 s, slower than the hash.)
        let s = v.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        std::hint::black_box(s);
        best = best.min(c.read().cpu.max(1e-9));
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut acc = 0u64;
    let mut pair = f64::INFINITY;
    for _ in 0..3 {
        let c = Clock::start();
        for page in v.as_chunks::<{ PAGE_SIZE / 8 }>().0 {
            let j = (splitmix(&mut x) % pages as u64) as usize * (PAGE_SIZE / 8);
            acc = page.iter().zip(&v[j..j + PAGE_SIZE / 8]).fold(acc, |a, (p, q)| a.wrapping_add(p ^ q));
        }
        std::hint::black_box(acc);
        pair = pair.min(c.read().cpu.max(1e-9));
    }
    // The hash floor is the faster of a plain loop and one that prefetches
    // as the scanner's look does (each of the next 4 pages a quarter, the
    // farthest its first): on the AMD EPYC the plain loop took 0.054 s for
    // 1 GiB, one prefetching halves of the next two pages 0.034 s; the
    // hash and the memory stream overlap only with the prefetches.
    let mut hash = f64::INFINITY;
    let pages_of = v.as_chunks::<{ PAGE_SIZE / 8 }>().0;
    for round in 0..6 {
        let c = Clock::start();
        let mut h = 0u64;
        for (i, page) in pages_of.iter().enumerate() {
            if round % 2 == 1 {
                for d in 1..=4 {
                    if let Some(next) = pages_of.get(i + d) {
                        for l in (4 - d) * 16..(5 - d) * 16 {
                            prefetch(next[l * 8..].as_ptr());
                        }
                    }
                }
            }
            // SAFETY: a page of u64s is PAGE_SIZE bytes.
            let bytes = unsafe { std::slice::from_raw_parts(page.as_ptr() as *const u8, PAGE_SIZE) };
            h ^= xxhash_rust::xxh3::xxh3_64(bytes);
        }
        std::hint::black_box(h);
        hash = hash.min(c.read().cpu.max(1e-9));
    }
    Floor { read_s: best, pair_s: pair, hash_s: hash }
}

/// `prefetcht0` of the line holding `p` (a hint: never faults).
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing architecturally and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
}

// ---------------------------------------------------------------------------
// Linux KSM through the peer script.

struct Linux {
    shared: u64,
    sharing: u64,
    expected_shared: u64,
    expected_sharing: u64,
    full_scans: u64,
    wall: f64,
    cpu: f64,
    timeout: bool,
    /// KiB of other processes' mergeable memory (a QEMU guest, say) that
    /// ksmd scanned too, and whether there was none: only a clean run's
    /// CPU time is this image's alone (the peer script's last line).
    other_mergeable_kib: u64,
    clean: bool,
    raw: String,
}

fn peer_script() -> PathBuf {
    if let Ok(p) = std::env::var("KSM_PEER") {
        return PathBuf::from(p);
    }
    // This crate is kernel/core in the repository; the script is next to
    // the repository.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/peers/linux_ksm_bench.py")
}

/// Why Linux KSM cannot run here, if it cannot.
fn ksm_unavailable() -> Option<String> {
    let run = "/sys/kernel/mm/ksm/run";
    if !std::path::Path::new(run).exists() {
        return Some("no /sys/kernel/mm/ksm (kernel without CONFIG_KSM)".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().write(true).open(run) {
        return Some(format!("{run} is not writable ({e}); run as root"));
    }
    let s = peer_script();
    if !s.exists() {
        return Some(format!("peer script {} not found (set KSM_PEER)", s.display()));
    }
    None
}

fn run_linux(shape: &Shape, timeout: f64) -> Result<Linux, String> {
    let script = peer_script();
    let out = Command::new("python3")
        .arg(&script)
        .args(["--pages", &shape.pages.to_string()])
        .args(["--zero", &shape.zero.to_string()])
        .args(["--dup", &shape.dup.to_string()])
        .args(["--group", &shape.group.to_string()])
        .args(["--seed", &shape.seed.to_string()])
        .args(["--timeout", &timeout.to_string()])
        .output()
        .map_err(|e| format!("python3 {}: {e}", script.display()))?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("peer script failed ({}): {}{}", out.status, raw, String::from_utf8_lossy(&out.stderr)));
    }
    let kv = |key: &str| -> Option<f64> {
        raw.lines()
            .filter(|l| l.starts_with("linux-ksm "))
            .flat_map(|l| l.split_whitespace())
            .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    let need = |key: &str| kv(key).ok_or_else(|| format!("no {key}= in the peer's output:\n{raw}"));
    Ok(Linux {
        shared: need("shared")? as u64,
        sharing: need("sharing")? as u64,
        expected_shared: need("expected_shared")? as u64,
        expected_sharing: need("expected_sharing")? as u64,
        full_scans: need("full_scans")? as u64,
        wall: need("wall_s")?,
        cpu: need("ksmd_cpu_s")?,
        timeout: raw.contains("TIMEOUT"),
        other_mergeable_kib: need("other_mergeable_kib")? as u64,
        clean: raw.split_whitespace().any(|t| t == "clean=yes"),
        raw,
    })
}

// ---------------------------------------------------------------------------
// Printing.

/// The CPU the numbers come from and how busy the machine was (the load
/// average: other work on a shared machine slows memory-bound runs).
fn machine_line() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "?".into());
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let flag = |f: &str| cpuinfo.lines().find(|l| l.starts_with("flags")).is_some_and(|l| l.split_whitespace().any(|t| t == f));
    let simd = if flag("avx512f") { "AVX-512" } else if flag("avx2") { "AVX2" } else { "no AVX2" };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("machine: {model}, {cpus} CPUs, {simd}{}; load average {}", if flag("hypervisor") { ", virtual" } else { "" }, load.join(" "))
}

fn per_page(bytes: usize, pages: usize) -> f64 {
    bytes as f64 / pages as f64
}

fn print_side_by_side(shape: &Shape, vms: usize, cfg: &DedupeConfig, o: &Ours, fl: Floor, linux: &Result<Linux, String>) {
    let floor = fl.read_s;
    let c = shape.counts();
    let mib = shape.mib();
    println!();
    println!(
        "shape: {} pages ({:.0} MiB): {} zero, {} in {} groups of {}, {} unique; seed {}; ours over {} VMs (page i -> VM i % {})",
        shape.pages, mib, c.zero, c.dup, c.groups, shape.group, c.unique, shape.seed, vms, vms
    );
    println!(
        "ours: policy={:?} max_page_sharing={} use_zero_pages={}; linux: max_page_sharing={} use_zero_pages=0 (set by the peer script)",
        cfg.policy,
        cfg.max_page_sharing,
        cfg.use_zero_pages,
        std::fs::read_to_string("/sys/kernel/mm/ksm/max_page_sharing").map(|s| s.trim().to_string()).unwrap_or("?".into())
    );
    // xxhash-rust picks its SIMD at compile time: scripts/bench.sh builds
    // with -C target-cpu=native, so on an AVX2 host this is its AVX2 path.
    let simd = if cfg!(target_feature = "avx512f") {
        "avx512"
    } else if cfg!(target_feature = "avx2") {
        "avx2"
    } else {
        "sse2"
    };
    println!("ours: page hash xxh3-64 (xxhash-rust, {simd} build)");
    println!(
        "ours: change tracking: {}",
        if cfg.track_dirty {
            "EPT dirty flags (unchanged pages keep their checksum; --no-track-dirty: re-hash every look)"
        } else {
            "checksum re-hashed at every look (KSM's rule; --no-track-dirty)"
        }
    );
    println!();
    let l = linux.as_ref().ok();
    let col = |f: &dyn Fn(&Linux) -> String| l.map(f).unwrap_or_else(|| "-".into());
    println!("{:<34} {:>14} {:>14}", "", "ours", "linux-ksm");
    println!("{:<34} {:>14} {:>14}", "pages_shared", o.stats.pages_shared, col(&|l| l.shared.to_string()));
    println!("{:<34} {:>14} {:>14}", "pages_sharing", o.stats.pages_sharing, col(&|l| l.sharing.to_string()));
    println!("{:<34} {:>14} {:>14}", "zero_pages (use_zero_pages)", o.stats.zero_pages, col(&|_| "0".into()));
    println!(
        "{:<34} {:>14} {:>14}",
        "expected shared/sharing",
        format!("{}/{}", o.expected.0, o.expected.1),
        col(&|l| format!("{}/{}", l.expected_shared, l.expected_sharing))
    );
    println!("{:<34} {:>14} {:>14}", "full scans", o.passes, col(&|l| l.full_scans.to_string()));
    let per_pass: Vec<String> = o.pass_cpu.iter().map(|t| format!("{t:.3}")).collect();
    println!("{:<34} {:>14} {:>14}", "CPU s per pass", per_pass.join("/"), "-");
    println!(
        "{:<34} {:>14.3} {:>14}",
        "CPU s, all merged",
        o.merged.cpu,
        col(&|l| format!("{:.2}", l.cpu))
    );
    println!("{:<34} {:>14.3} {:>14}", "CPU s, converged (pass w/o change)", o.converged.cpu, "-");
    println!("{:<34} {:>14.3} {:>14}", "  of which system (page faults)", o.converged.sys, "-");
    println!("{:<34} {:>14.3} {:>14}", "wall s, all merged", o.merged.wall, col(&|l| format!("{:.3}", l.wall)));
    println!("{:<34} {:>14.3} {:>14}", "wall s, converged", o.converged.wall, "-");
    println!(
        "{:<34} {:>14.0} {:>14}",
        "MiB per CPU-s (converged)",
        mib / o.converged.cpu,
        col(&|l| format!("{:.0}", mib / l.cpu.max(0.01)))
    );
    println!(
        "{:<34} {:>14.1} {:>14}",
        "metadata B/page (entries+peak idx)",
        per_page(o.entry_bytes + o.index_peak, shape.pages),
        "64 + nodes"
    );
    println!();
    let floor_line = format!(
        "read floor: one read of {:.0} MiB = {:.3} s ({:.1} GB/s); ours converged = {:.1}x floor, all merged = {:.1}x floor",
        mib,
        floor,
        (shape.pages * PAGE_SIZE) as f64 / floor / 1e9,
        o.converged.cpu / floor,
        o.merged.cpu / floor
    );
    println!("{floor_line}");
    println!(
        "targets: converged <= 3x read floor: {}; metadata <= 24 B per scanned page: {}",
        if o.converged.cpu <= 3.0 * floor { "met" } else { "NOT met" },
        if per_page(o.entry_bytes + o.index_peak, shape.pages) <= 24.0 { "met" } else { "NOT met" }
    );
    println!(
        "pair floor: every page read with a random other page of {:.0} MiB = {:.3} s (the least a merge pass reads); ours converged = {:.1}x",
        mib,
        fl.pair_s,
        o.converged.cpu / fl.pair_s
    );
    println!(
        "hash floor: xxh3-64 of every page of {:.0} MiB in order (faster of plain and prefetched) = {:.3} s ({:.1}x the read floor); ours converged = {:.1}x",
        mib,
        fl.hash_s,
        fl.hash_s / floor,
        o.converged.cpu / fl.hash_s
    );
    let same_outcome = |l: &Linux| o.stats.pages_shared == l.shared && o.stats.pages_sharing == l.sharing && o.stats.zero_pages == 0;
    match linux {
        Ok(l) => {
            println!("linux-ksm: other_mergeable_kib={} clean={}", l.other_mergeable_kib, if l.clean { "yes" } else { "no" });
            if l.clean {
                println!(
                    "ratio ours/linux CPU: converged {:.3} (1/{:.1}), all merged {:.3} (1/{:.1}); target <= 0.1 (1/10): {}",
                    o.converged.cpu / l.cpu,
                    l.cpu / o.converged.cpu,
                    o.merged.cpu / l.cpu,
                    l.cpu / o.merged.cpu,
                    if o.converged.cpu <= l.cpu / 10.0 { "met" } else { "NOT met" }
                );
            } else {
                println!(
                    "ratio ours/linux CPU: none: an unclean run (ksmd also scanned {} KiB of other processes' mergeable memory, \
                     a running QEMU's guest RAM, say); run again when clean",
                    l.other_mergeable_kib
                );
            }
            println!(
                "merge outcome: {}{}",
                if same_outcome(l) {
                    "identical (pages_shared and pages_sharing equal, no zero-page merges on either side)".to_string()
                } else if cfg.use_zero_pages {
                    "differs by design: ours ran with use_zero_pages=true (zero pages counted in zero_pages, uncapped); Linux with use_zero_pages=0".to_string()
                } else if (l.shared, l.sharing) != (l.expected_shared, l.expected_sharing)
                    && (o.stats.pages_shared, o.stats.pages_sharing) == (l.expected_shared, l.expected_sharing)
                {
                    format!(
                        "ours equals the expected counts; Linux's are off by {:+}/{:+}: /sys/kernel/mm/ksm counters are \
                         system-wide, so other processes' MADV_MERGEABLE memory (e.g. QEMU guests) merged during the run counts too",
                        l.shared as i64 - l.expected_shared as i64,
                        l.sharing as i64 - l.expected_sharing as i64
                    )
                } else {
                    "DIFFERENT".to_string()
                },
                if l.timeout { " (linux TIMEOUT)" } else { "" }
            );
        }
        Err(why) => println!("linux-ksm: not run: {why}"),
    }
    let ok = o.as_expected();
    println!(
        "ours: outcome {} expected; consistency check {}; TLB flushes {}; image build {:.1} s (not timed)",
        if ok { "as" } else { "NOT as" },
        match o.consistent {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("FAILED: {e}"),
        },
        o.tlb_flushes,
        o.build_s
    );
    println!(
        "ours: dirty tracking {}: {} looks kept their checksum, {} dirty flags cleared",
        if cfg.track_dirty { "on" } else { "off" },
        o.checksums_reused,
        o.dirty_cleared
    );
    println!(
        "ours: metadata per scanned page: {:.1} B page entries + {:.1} B indexes/stable records at peak ({:.1} B at the end) = {:.1} B (Linux rmap_item alone: 64 B)",
        per_page(o.entry_bytes, shape.pages),
        per_page(o.index_peak, shape.pages),
        per_page(o.index_end, shape.pages),
        per_page(o.entry_bytes + o.index_peak, shape.pages)
    );
}

// ---------------------------------------------------------------------------

const USAGE: &str = "\
usage: scripts/bench.sh [options]
       cargo run --release -p hvcore --example dedupe-bench -- [options]

Workload (the flags of ../shared/peers/linux_ksm_bench.py):
  --pages N         total 4 KiB pages (default 262144 = 1 GiB)
  --zero F          fraction of all-zero pages (default 0.25)
  --dup F           fraction of pages in duplicate groups (default 0.5)
  --group G         pages per duplicate group (default 4)
  --seed S          (default 1)
Ours:
  --vms K           split the image over K VMs, page i -> VM i % K (default 4)
  --batch B         pages per scan() call (default 4096)
  --repeat R        run ours R times, each on a fresh image, and show the run
                    with the median converged CPU time (default 3; the first
                    run after other work was seen up to 20% slower)
  --max-page-sharing M   (default 256, Linux's default)
  --small-pages     back the arena (and the floor's buffer) with 4 KiB pages
                    instead of transparent huge pages (the kernel maps
                    physical memory with large pages)
  --cold-heap       let the dedupe indexes grow into fresh memory during the
                    timed scan (page faults); default: the heap is faulted in
                    before the scan, as the kernel's heap is mapped at boot
  --interleave-frames  touch the image in page order, so consecutive host
                    frames belong to different VMs (default: VM by VM, each
                    VM's RAM contiguous, as VMs started one after another)
  --use-zero-pages  merge zero pages into a per-domain zero frame (default
                    off, as the peer script sets Linux, so counts match)
  --no-track-dirty  re-hash every page at every look (KSM's checksum rule)
                    instead of trusting EPT dirty flags (default: tracking
                    on, as on a CPU with EPT A/D)
Linux:
  --no-linux        do not run the peer script
  --timeout S       the peer's timeout (default 300)
Sweep:
  --sweep           ours at 256 MiB, 1 GiB and 4 GiB (same fractions)
  --sweep-linux     also Linux at each size (slow; once per size)
  --rounds R        sweep rounds, each running every size once; the table
                    shows medians (default 3)
";

fn main() -> ExitCode {
    let mut shape = Shape { pages: 262_144, zero: 0.25, dup: 0.5, group: 4, seed: 1 };
    let mut vms = 4;
    let mut batch = 4096;
    let mut cfg = DedupeConfig { policy: SharingPolicy::AllVms, max_page_sharing: 256, use_zero_pages: false, track_dirty: true, merge_at_first_look: true };
    let mut linux = true;
    let mut timeout = 300.0;
    let (mut sweep, mut sweep_linux) = (false, false);
    let mut rounds = 3;
    let mut repeat = 3;
    let mut huge = true;
    let mut interleave = false;
    let mut warm_heap = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().unwrap_or_else(|| panic!("{name} needs a value"));
        macro_rules! parse {
            ($t:ty) => {{
                let v = val(&a);
                match v.parse::<$t>() {
                    Ok(x) => x,
                    Err(_) => {
                        eprintln!("dedupe-bench: bad value {v:?} for {a}\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }};
        }
        match a.as_str() {
            "--pages" => shape.pages = parse!(usize),
            "--zero" => shape.zero = parse!(f64),
            "--dup" => shape.dup = parse!(f64),
            "--group" => shape.group = parse!(usize),
            "--seed" => shape.seed = parse!(u64),
            "--vms" => vms = parse!(usize),
            "--batch" => batch = parse!(usize),
            "--max-page-sharing" => cfg.max_page_sharing = parse!(u32),
            "--use-zero-pages" => cfg.use_zero_pages = true,
            "--no-track-dirty" => cfg.track_dirty = false,
            "--no-linux" => linux = false,
            "--small-pages" => huge = false,
            "--interleave-frames" => interleave = true,
            "--cold-heap" => warm_heap = false,
            "--timeout" => timeout = parse!(f64),
            "--sweep" => sweep = true,
            "--sweep-linux" => (sweep, sweep_linux) = (true, true),
            "--rounds" => rounds = parse!(usize),
            "--repeat" => repeat = parse!(usize),
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("dedupe-bench: unknown argument {a:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let c = shape.counts();
    if shape.pages == 0 || shape.group < 2 || vms == 0 || batch == 0 || rounds == 0 || repeat == 0 || c.zero + c.dup > shape.pages || cfg.max_page_sharing < 2 {
        eprintln!("dedupe-bench: bad workload\n{USAGE}");
        return ExitCode::from(2);
    }
    if cfg!(debug_assertions) {
        eprintln!("dedupe-bench: WARNING: debug build; run with --release (scripts/bench.sh does)");
    }
    let why_not = ksm_unavailable();

    if sweep {
        return run_sweep(&shape, vms, cfg, batch, huge, interleave, warm_heap, rounds, sweep_linux.then_some(()).and(why_not.is_none().then_some(timeout)), &why_not);
    }

    println!("dedupe benchmark: ours (hvcore page manager + dedupe + EPT, release build, one thread) vs Linux KSM");
    println!("{} (at the start)", machine_line());
    eprintln!("  read floor ...");
    let floor = read_floor(shape.pages, huge);
    eprintln!("  ours ({repeat} runs) ...");
    let mut runs: Vec<Ours> = (0..repeat).map(|_| run_ours(&shape, vms, cfg, batch, huge, interleave, warm_heap, false)).collect();
    let times: Vec<String> = runs.iter().map(|o| format!("{:.3}", o.converged.cpu)).collect();
    let all_ok = runs.iter().all(|o| o.as_expected() && o.consistent.is_ok());
    runs.sort_by(|a, b| a.converged.cpu.total_cmp(&b.converged.cpu));
    let ours = runs.swap_remove(runs.len() / 2);
    let lx = if !linux {
        Err("--no-linux".to_string())
    } else if let Some(w) = &why_not {
        Err(format!("Linux KSM not available here: {w}"))
    } else {
        eprintln!("  linux-ksm (peer script, builds its image in Python first) ...");
        run_linux(&shape, timeout)
    };
    if let Ok(l) = &lx {
        for line in l.raw.lines() {
            println!("  peer> {line}");
        }
    }
    print_side_by_side(&shape, vms, &cfg, &ours, floor, &lx);
    println!(
        "ours: {repeat} runs, converged CPU s {} (in run order); shown: the median run; every run as expected and consistent: {}",
        times.join(" "),
        if all_ok { "yes" } else { "NO" }
    );
    println!("{} (at the end)", machine_line());
    ExitCode::SUCCESS
}

/// Median of a non-empty list.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 { s[m] } else { (s[m - 1] + s[m]) / 2.0 }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)))
}

const SWEEP_PAGES: [usize; 3] = [65_536, 262_144, 1_048_576];

/// The sweep: `rounds` rounds, each running every size once (256 MiB,
/// 1 GiB, 4 GiB), so a slow spell of this shared machine hits all sizes
/// alike; the table shows the median per size and the growth is computed
/// from medians (and, as a check, from the fastest runs). Linux runs once
/// per size, in the first round.
#[allow(clippy::too_many_arguments)]
fn run_sweep(base: &Shape, vms: usize, cfg: DedupeConfig, batch: usize, huge: bool, interleave: bool, warm_heap: bool, rounds: usize, linux: Option<f64>, why_not: &Option<String>) -> ExitCode {
    println!("dedupe benchmark sweep: ours (hvcore, release, one thread); same fractions at each size; {rounds} rounds, medians");
    println!("{} (at the start)", machine_line());
    println!(
        "shape: zero {} dup {} in groups of {}, seed {}, {} VMs; max_page_sharing={} use_zero_pages={} track_dirty={}",
        base.zero, base.dup, base.group, base.seed, vms, cfg.max_page_sharing, cfg.use_zero_pages, cfg.track_dirty
    );
    match (linux, why_not) {
        (None, None) => println!("linux-ksm: not run in the sweep (add --sweep-linux)"),
        (None, Some(w)) => println!("linux-ksm: not available here: {w}"),
        _ => {}
    }
    let n = SWEEP_PAGES.len();
    let (mut conv, mut merg, mut floors, mut pair) = (vec![Vec::new(); n], vec![Vec::new(); n], vec![Vec::new(); n], vec![Vec::new(); n]);
    let mut last: Vec<Option<Ours>> = (0..n).map(|_| None).collect();
    let mut lx: Vec<Option<Result<Linux, String>>> = (0..n).map(|_| None).collect();
    let mut ok = vec![true; n];
    for round in 1..=rounds {
        for (i, &pages) in SWEEP_PAGES.iter().enumerate() {
            let shape = Shape { pages, ..*base };
            eprintln!("  round {round}/{rounds}, {} MiB: floor, ours ...", shape.mib());
            let fl = read_floor(pages, huge);
            floors[i].push(fl.read_s);
            pair[i].push(fl.pair_s);
            let o = run_ours(&shape, vms, cfg, batch, huge, interleave, warm_heap, true);
            ok[i] &= o.as_expected() && o.consistent.is_ok();
            conv[i].push(o.converged.cpu);
            merg[i].push(o.merged.cpu);
            if round == 1 {
                lx[i] = linux.map(|t| {
                    eprintln!("  {} MiB: linux-ksm ...", shape.mib());
                    run_linux(&shape, t)
                });
            }
            last[i] = Some(o);
        }
    }
    println!();
    println!(
        "{:>9} {:>6} {:>11} {:>15} {:>11} {:>8} {:>8} {:>8} {:>8} {:>7} {:>10} {:>7} {:>7}",
        "pages", "MiB", "cpu_s conv", "(min-max)", "cpu_s merg", "ns/page", "floor_s", "x floor", "pair_s", "B/page", "linux_cpu", "ratio", "same"
    );
    for (i, &pages) in SWEEP_PAGES.iter().enumerate() {
        let o = last[i].as_ref().expect("every size ran");
        let (c, f) = (median(&conv[i]), median(&floors[i]));
        let (lo, hi) = min_max(&conv[i]);
        let (lcpu, ratio, same) = match &lx[i] {
            Some(Ok(l)) => (
                format!("{:.2}", l.cpu),
                if l.clean { format!("{:.3}", c / l.cpu) } else { format!("unclean({}KiB)", l.other_mergeable_kib) },
                if l.shared == o.stats.pages_shared && l.sharing == o.stats.pages_sharing { "yes" } else { "NO" }.to_string(),
            ),
            Some(Err(e)) => {
                eprintln!("linux-ksm failed: {e}");
                ("err".into(), "-".into(), "-".into())
            }
            None => ("-".into(), "-".into(), if ok[i] { "exp" } else { "NOT exp" }.into()),
        };
        println!(
            "{:>9} {:>6.0} {:>11.3} {:>15} {:>11.3} {:>8.0} {:>8.3} {:>8.1} {:>8.3} {:>7.1} {:>10} {:>7} {:>7}",
            pages,
            Shape { pages, ..*base }.mib(),
            c,
            format!("{lo:.3}-{hi:.3}"),
            median(&merg[i]),
            c * 1e9 / pages as f64,
            f,
            c / f,
            median(&pair[i]),
            per_page(o.entry_bytes + o.index_peak, pages),
            lcpu,
            ratio,
            same
        );
    }
    println!();
    for i in 1..n {
        let x = SWEEP_PAGES[i] as f64 / SWEEP_PAGES[0] as f64;
        println!(
            "growth {} -> {} pages ({x:.0}x): CPU {:.2}x by medians, {:.2}x by fastest runs (linear = {x:.0}x); read floor {:.2}x, pair floor {:.2}x",
            SWEEP_PAGES[0],
            SWEEP_PAGES[i],
            median(&conv[i]) / median(&conv[0]),
            min_max(&conv[i]).0 / min_max(&conv[0]).0,
            median(&floors[i]) / median(&floors[0]),
            median(&pair[i]) / median(&pair[0]),
        );
    }
    println!("('same': outcome equal to Linux's; 'exp': every run equal to the expected counts and consistent, Linux not run;");
    println!(" floor_s: one read of that much memory; pair_s: every page read with a random other page, the least a merge pass reads)");
    println!("{} (at the end)", machine_line());
    if ok.iter().all(|&k| k) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

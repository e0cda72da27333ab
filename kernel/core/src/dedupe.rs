//! KSM-style dedupe (DESIGN.md "Dedupe"), the hypervisor's ksmd.
//!
//! [`PageManager::scan`] looks at a batch of mergeable guest pages, in
//! KSM's order for each page:
//! 1. the stable index (merged frames, by content hash): a match with room
//!    for one more sharer is write-protected, byte-compared and merged;
//! 2. a page whose checksum changed since the last look is volatile and
//!    waits for the next pass;
//! 3. an all-zero page goes to its domain's zero frame;
//! 4. the unstable index (unchanged pages of this pass, by content hash):
//!    a match is write-protected and compared, and both pages become one
//!    new merged frame (the older page's frame is kept).
//!
//! Every merge is two notifier brackets per page: write-protect (start /
//! end), then replace (start with a `Change` event / change_pte / end);
//! the old frame is freed after the end. The unstable index is emptied
//! at the start of each pass, as KSM rebuilds its unstable tree.
//!
//! Who may share with whom is [`SharingPolicy`]; pages of different
//! sharing domains never meet, because the domain is mixed into the
//! index key and checked on every match.
//!
//! Memory: 12 bytes per guest page in the page manager (frame, checksum or
//! stable index, flags); while a page is in the unstable index, one more
//! 16-byte map entry; per merged frame one 24-byte record and one map
//! entry.

use crate::frame::FrameAllocator;
use crate::mmu_notifier::{GfnRange, InvalidateEvent, Mmu};
use crate::page_manager::{frame_number, PageEntry, PageManager, Vm, F_CSUM, F_SHARED, F_UNSTABLE, NO_FRAME};
use crate::phys::{PhysAddr, PhysMem, PAGE_SHIFT, PAGE_SIZE};
use crate::stage2::{Perms, Stage2};
use crate::stats::KsmStats;
use alloc::vec::Vec;
use core::hash::{BuildHasherDefault, Hasher};
use hashbrown::HashMap;

/// Who may share frames with whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharingPolicy {
    /// No merging at all.
    Off,
    /// Any VM with any VM.
    AllVms,
    /// Only pages of the same VM.
    SameVm,
    /// VMs of the same named group (ESXi's "salting"); a VM without a
    /// group shares only with itself.
    Groups,
}

impl SharingPolicy {
    /// The sharing domain of a VM: pages merge only within one domain.
    pub(crate) fn domain(self, vm_index: u32, group: Option<u32>) -> Option<u32> {
        match self {
            SharingPolicy::Off => None,
            SharingPolicy::AllVms => Some(0),
            SharingPolicy::SameVm => Some(1 + vm_index),
            SharingPolicy::Groups => Some(match group {
                Some(g) => 0x8000_0000 | g,
                None => 1 + vm_index,
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeConfig {
    pub policy: SharingPolicy,
    /// Most guest pages per merged frame (Linux's `max_page_sharing`);
    /// when a frame is full the next equal pages start a new one.
    pub max_page_sharing: u32,
    /// All-zero pages share one zero frame per domain, without the cap
    /// (Linux's `use_zero_pages`, counted in `zero_pages`). Off: they merge
    /// like any other content.
    pub use_zero_pages: bool,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig { policy: SharingPolicy::AllVms, max_page_sharing: 256, use_zero_pages: true }
    }
}

/// What one call of [`PageManager::scan`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// Page slots of mergeable memory visited (touched or not).
    pub visited: usize,
    /// Pages that became merged.
    pub merged: usize,
    /// Passes over all mergeable memory that ended in this call.
    pub full_scans_completed: usize,
}

/// What one full pass saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    pub merged: u64,
    /// Pages seen for the first time or changed since the last look.
    pub changed: u64,
}

/// The index keys are already xxh3 hashes: use them as they are.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeyBuild = BuildHasherDefault<KeyHasher>;

/// The content hash of a page: exactly `xxhash_rust::xxh3::xxh3_64` of its
/// 4096 bytes (index key and checksum). On a host x86-64 CPU with AVX2 it
/// runs an AVX2 version of the same function, picked at run time (the
/// `xxhash-rust` crate picks its SIMD width at compile time, and the
/// baseline x86-64 target only has SSE2); elsewhere, and always in the
/// bare-metal kernel (`target_os = "none"`, which must not touch vector
/// state it does not save), it calls the crate.
pub mod page_hash {
    use crate::phys::PAGE_SIZE;

    /// Which version [`hash`] runs on this CPU ("avx2" or "xxhash-rust").
    pub fn implementation() -> &'static str {
        #[cfg(all(target_arch = "x86_64", not(target_os = "none")))]
        if avx2::available() {
            return "avx2";
        }
        "xxhash-rust"
    }

    pub fn hash(page: &[u8; PAGE_SIZE]) -> u64 {
        #[cfg(all(target_arch = "x86_64", not(target_os = "none")))]
        if avx2::available() {
            // SAFETY: the CPU and the OS support AVX2 (checked above).
            return unsafe { avx2::hash(page) };
        }
        xxhash_rust::xxh3::xxh3_64(page)
    }

    #[cfg(all(target_arch = "x86_64", not(target_os = "none")))]
    mod avx2 {
        use crate::phys::PAGE_SIZE;
        use core::arch::x86_64::*;
        use core::sync::atomic::{AtomicU8, Ordering};

        /// xxh3's default secret.
        const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];
        const P32_1: u64 = 0x9E37_79B1;
        const P32_2: u64 = 0x85EB_CA77;
        const P32_3: u64 = 0xC2B2_AE3D;
        const P64_1: u64 = 0x9E37_79B1_85EB_CA87;
        const P64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
        const P64_3: u64 = 0x1656_67B1_9E37_79F9;
        const P64_4: u64 = 0x85EB_CA77_C2B2_AE63;
        const P64_5: u64 = 0x27D4_EB2F_1656_67C5;

        static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 no, 2 yes

        pub fn available() -> bool {
            match STATE.load(Ordering::Relaxed) {
                2 => true,
                1 => false,
                _ => {
                    let yes = detect();
                    STATE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                    yes
                }
            }
        }

        fn detect() -> bool {
            // SAFETY: CPUID exists on every x86-64 CPU; XGETBV only runs
            // when CPUID says the OS enabled it (OSXSAVE).
            unsafe {
                let l1 = __cpuid(1);
                let (osxsave, avx) = (l1.ecx & (1 << 27) != 0, l1.ecx & (1 << 28) != 0);
                if !osxsave || !avx || __cpuid(0).eax < 7 {
                    return false;
                }
                // XCR0: SSE and AVX state saved by the OS.
                if xcr0() & 6 != 6 {
                    return false;
                }
                __cpuid_count(7, 0).ebx & (1 << 5) != 0
            }
        }

        #[target_feature(enable = "xsave")]
        unsafe fn xcr0() -> u64 {
            _xgetbv(0)
        }

        /// xxh3_64 of a 4096-byte input (the long-input path: three
        /// 1024-byte blocks of 16 stripes, each followed by a scramble, 15
        /// stripes of the last block, the last 64 bytes, the merge).
        #[target_feature(enable = "avx2")]
        pub unsafe fn hash(page: &[u8; PAGE_SIZE]) -> u64 {
            let p = page.as_ptr();
            let s = SECRET.as_ptr();
            let mut a0 = _mm256_setr_epi64x(P32_3 as i64, P64_1 as i64, P64_2 as i64, P64_3 as i64);
            let mut a1 = _mm256_setr_epi64x(P64_4 as i64, P32_2 as i64, P64_5 as i64, P32_1 as i64);
            macro_rules! stripe {
                ($input:expr, $secret:expr) => {{
                    let (i, k) = ($input, $secret);
                    let d0 = _mm256_loadu_si256(i as *const __m256i);
                    let d1 = _mm256_loadu_si256(i.add(32) as *const __m256i);
                    let k0 = _mm256_xor_si256(d0, _mm256_loadu_si256(k as *const __m256i));
                    let k1 = _mm256_xor_si256(d1, _mm256_loadu_si256(k.add(32) as *const __m256i));
                    let p0 = _mm256_mul_epu32(k0, _mm256_srli_epi64(k0, 32));
                    let p1 = _mm256_mul_epu32(k1, _mm256_srli_epi64(k1, 32));
                    a0 = _mm256_add_epi64(_mm256_add_epi64(a0, _mm256_shuffle_epi32(d0, 0x4e)), p0);
                    a1 = _mm256_add_epi64(_mm256_add_epi64(a1, _mm256_shuffle_epi32(d1, 0x4e)), p1);
                }};
            }
            macro_rules! scramble {
                ($a:ident, $k:expr) => {{
                    let prime = _mm256_set1_epi32(P32_1 as i32);
                    let x = _mm256_xor_si256(_mm256_xor_si256($a, _mm256_srli_epi64($a, 47)), _mm256_loadu_si256($k as *const __m256i));
                    let lo = _mm256_mul_epu32(x, prime);
                    let hi = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), prime);
                    $a = _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
                }};
            }
            unsafe {
                for b in 0..3 {
                    for st in 0..16 {
                        stripe!(p.add(b * 1024 + st * 64), s.add(st * 8));
                    }
                    scramble!(a0, s.add(128));
                    scramble!(a1, s.add(160));
                }
                for st in 0..15 {
                    stripe!(p.add(3072 + st * 64), s.add(st * 8));
                }
                stripe!(p.add(PAGE_SIZE - 64), s.add(192 - 64 - 7));
                let mut acc = [0u64; 8];
                _mm256_storeu_si256(acc.as_mut_ptr() as *mut __m256i, a0);
                _mm256_storeu_si256(acc.as_mut_ptr().add(4) as *mut __m256i, a1);
                let key = |off: usize| u64::from_le_bytes(SECRET[off..off + 8].try_into().unwrap());
                let mut h = (PAGE_SIZE as u64).wrapping_mul(P64_1);
                for i in 0..4 {
                    let x = (acc[2 * i] ^ key(11 + 16 * i)) as u128 * (acc[2 * i + 1] ^ key(11 + 16 * i + 8)) as u128;
                    h = h.wrapping_add(x as u64 ^ (x >> 64) as u64);
                }
                h ^= h >> 37;
                h = h.wrapping_mul(0x1656_6791_9E37_79F9);
                h ^ (h >> 32)
            }
        }
    }
}


const NIL: u32 = u32::MAX;

/// A merged frame (KSM's stable node). 24 bytes.
#[derive(Clone, Copy, Debug)]
struct StableFrame {
    key: u64,
    frame: u32,
    /// Guest pages mapped to it; freed at zero.
    sharers: u32,
    /// Next merged frame with the same key (KSM's stable_node chain of
    /// dups, when `max_page_sharing` filled one).
    next: u32,
    zero: bool,
    live: bool,
}

/// The dedupe engine's state, kept by the page manager.
pub(crate) struct Ksm {
    pub config: DedupeConfig,
    stable: Vec<StableFrame>,
    free_ids: Vec<u32>,
    /// Key -> first merged frame of the chain with that key.
    stable_index: HashMap<u64, u32, KeyBuild>,
    /// Key -> page ref ([`page_ref`]) of an unchanged page of this pass.
    unstable: HashMap<u64, u64, KeyBuild>,
    /// (domain, stable id) of each zero frame.
    zero_frames: Vec<(u32, u32)>,
    zero_hash: u64,
    /// (vm, slot, page) to look at next.
    cursor: (usize, usize, usize),
    visited_this_pass: u64,
    pass: PassStats,
    last_pass: Option<PassStats>,
    full_scans: u64,
    merges: u64,
    mismatches: u64,
    scanned: u64,
}

fn key_of(hash: u64, domain: u32) -> u64 {
    hash ^ (domain as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn page_ref(vm: usize, gfn: u64) -> u64 {
    ((vm as u64) << 40) | gfn
}

fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    page.chunks_exact(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl Ksm {
    pub fn new(config: DedupeConfig) -> Ksm {
        assert!(config.max_page_sharing >= 2, "max_page_sharing below 2 would never share");
        Ksm {
            config,
            stable: Vec::new(),
            free_ids: Vec::new(),
            stable_index: HashMap::default(),
            unstable: HashMap::default(),
            zero_frames: Vec::new(),
            zero_hash: page_hash::hash(&[0u8; PAGE_SIZE]),
            cursor: (0, 0, 0),
            visited_this_pass: 0,
            pass: PassStats::default(),
            last_pass: None,
            full_scans: 0,
            merges: 0,
            mismatches: 0,
            scanned: 0,
        }
    }

    fn frame_of(&self, id: u32) -> PhysAddr {
        PhysAddr((self.stable[id as usize].frame as u64) << PAGE_SHIFT)
    }

    fn alloc_id(&mut self, rec: StableFrame) -> u32 {
        match self.free_ids.pop() {
            Some(id) => {
                self.stable[id as usize] = rec;
                id
            }
            None => {
                self.stable.push(rec);
                (self.stable.len() - 1) as u32
            }
        }
    }

    /// A new merged frame for content `key`, first in its chain.
    fn new_stable(&mut self, frame: u32, key: u64) -> u32 {
        let next = self.stable_index.get(&key).copied().unwrap_or(NIL);
        let id = self.alloc_id(StableFrame { key, frame, sharers: 0, next, zero: false, live: true });
        self.stable_index.insert(key, id);
        id
    }

    /// The first merged frame with content `key` that has room.
    fn stable_with_room(&self, key: u64) -> Option<u32> {
        let mut id = *self.stable_index.get(&key)?;
        while id != NIL {
            let s = &self.stable[id as usize];
            if s.sharers < self.config.max_page_sharing {
                return Some(id);
            }
            id = s.next;
        }
        None
    }

    fn zero_frame<P: PhysMem>(&mut self, mem: &P, frames: &mut FrameAllocator, domain: u32) -> Option<u32> {
        if let Some(&(_, id)) = self.zero_frames.iter().find(|(d, _)| *d == domain) {
            return Some(id);
        }
        let f = frames.alloc()?;
        mem.zero_page(f);
        let id = self.alloc_id(StableFrame { key: 0, frame: frame_number(f), sharers: 0, next: NIL, zero: true, live: true });
        self.zero_frames.push((domain, id));
        Some(id)
    }

    /// Drops one guest page's reference to merged frame `id`; the frame
    /// is freed and leaves the index when none is left.
    pub fn put(&mut self, frames: &mut FrameAllocator, id: u32) {
        let s = &mut self.stable[id as usize];
        assert!(s.live && s.sharers > 0, "reference to a dead merged frame {id}");
        s.sharers -= 1;
        if s.sharers == 0 {
            self.remove(frames, id);
        }
    }

    fn remove(&mut self, frames: &mut FrameAllocator, id: u32) {
        let s = self.stable[id as usize];
        if s.zero {
            self.zero_frames.retain(|&(_, z)| z != id);
        } else {
            let head = self.stable_index[&s.key];
            if head == id {
                if s.next == NIL {
                    self.stable_index.remove(&s.key);
                } else {
                    self.stable_index.insert(s.key, s.next);
                }
            } else {
                let mut p = head;
                while self.stable[p as usize].next != id {
                    p = self.stable[p as usize].next;
                    assert_ne!(p, NIL, "merged frame {id} missing from its chain");
                }
                self.stable[p as usize].next = s.next;
            }
        }
        frames.free(self.frame_of(id)).expect("a merged frame is ours");
        self.stable[id as usize].live = false;
        self.free_ids.push(id);
    }

    fn finish_pass(&mut self) {
        self.full_scans += 1;
        self.last_pass = Some(self.pass);
        self.pass = PassStats::default();
        // KSM rebuilds the unstable tree every pass; clear keeps capacity.
        // Room is made up front for what this pass left in it, plus an
        // eighth (not for every page visited: most pages of a pass never
        // enter it, they merge or change, and a table sized for all of
        // them cost 34 bytes per page); a pass that needs more grows it.
        let want = self.unstable.len();
        self.unstable.clear();
        self.unstable.reserve(want + want / 8);
        self.visited_this_pass = 0;
    }
}

/// Takes write access away from one guest page (start / end).
fn write_protect<P: PhysMem, S: Stage2>(mem: &P, frames: &mut FrameAllocator, mmu: &Mmu<S>, gfn: u64) {
    let r = GfnRange::one(gfn);
    mmu.invalidate_range_start(mem, frames, r, InvalidateEvent::WriteProtect);
    mmu.invalidate_range_end(r);
}

/// Maps the page to merged frame `id` (start(change) / change_pte / end),
/// then frees its old frame.
fn replace<P: PhysMem, S: Stage2>(
    mem: &P,
    frames: &mut FrameAllocator,
    ksm: &mut Ksm,
    v: &mut Vm<S>,
    si: usize,
    pi: usize,
    id: u32,
) {
    let old = v.slots[si].pages[pi];
    let gfn = v.slots[si].base_gfn + pi as u64;
    let target = ksm.frame_of(id);
    let r = GfnRange::one(gfn);
    v.mmu.invalidate_range_start(mem, frames, r, InvalidateEvent::Change);
    v.mmu.change_pte(mem, gfn, target, Perms::RX);
    v.slots[si].pages[pi] = PageEntry { frame: frame_number(target), aux: id, flags: F_SHARED };
    v.mmu.invalidate_range_end(r);
    frames.free(old.pa()).expect("a private guest frame is ours");
    ksm.stable[id as usize].sharers += 1;
    ksm.merges += 1;
}

/// Write-protects the page, compares it with merged frame `id` and merges
/// it if equal.
fn merge_into<P: PhysMem, S: Stage2>(
    mem: &P,
    frames: &mut FrameAllocator,
    ksm: &mut Ksm,
    v: &mut Vm<S>,
    si: usize,
    pi: usize,
    id: u32,
) -> bool {
    let gfn = v.slots[si].base_gfn + pi as u64;
    write_protect(mem, frames, &v.mmu, gfn);
    let page = mem.page(v.slots[si].pages[pi].pa());
    let equal = if ksm.stable[id as usize].zero { is_zero(page) } else { page == mem.page(ksm.frame_of(id)) };
    if !equal {
        ksm.mismatches += 1;
        return false;
    }
    replace(mem, frames, ksm, v, si, pi, id);
    true
}

impl<P: PhysMem, S: Stage2> PageManager<P, S> {
    /// Looks at up to `batch` page slots of mergeable memory, going on where
    /// the last call stopped (call it between guest time slices).
    pub fn scan(&mut self, batch: usize) -> ScanResult {
        let mut res = ScanResult::default();
        if self.ksm.config.policy == SharingPolicy::Off {
            return res;
        }
        let PageManager { mem, frames, vms, ksm, .. } = self;
        while res.visited < batch && next_page(ksm, vms, &mut res) {
            let (vi, si, pi) = ksm.cursor;
            ksm.cursor.2 += 1;
            ksm.visited_this_pass += 1;
            res.visited += 1;
            res.merged += scan_one(mem, frames, vms, ksm, vi, si, pi);
            // Move on now, so a pass ends with its last page.
            next_page(ksm, vms, &mut res);
        }
        res
    }

    /// True once a full pass merged nothing and saw no page change: more
    /// scanning finds nothing new until the guests change memory.
    pub fn scan_converged(&self) -> bool {
        self.ksm.last_pass.is_some_and(|p| p.merged == 0 && p.changed == 0)
    }

    /// What the last complete pass saw.
    pub fn last_pass(&self) -> Option<PassStats> {
        self.ksm.last_pass
    }

    pub fn ksm_stats(&self) -> KsmStats {
        let k = &self.ksm;
        let mut s = KsmStats {
            full_scans: k.full_scans,
            merges: k.merges,
            compare_mismatches: k.mismatches,
            pages_scanned: k.scanned,
            ..KsmStats::default()
        };
        for f in k.stable.iter().filter(|f| f.live) {
            if f.zero {
                s.zero_pages += f.sharers as u64;
            } else {
                s.pages_shared += 1;
                s.pages_sharing += f.sharers as u64 - 1;
            }
        }
        for v in self.vms.iter().flatten() {
            for slot in &v.slots {
                for e in &slot.pages {
                    if e.flags & F_UNSTABLE != 0 {
                        s.pages_unshared += 1;
                    } else if e.flags & (F_CSUM | F_SHARED) == F_CSUM {
                        s.pages_volatile += 1;
                    }
                }
            }
        }
        s
    }

    /// Checks the dedupe bookkeeping against the page map (for tests):
    /// every merged frame's count equals the pages mapped to it.
    pub fn check_consistency(&self) -> Result<(), &'static str> {
        let mut counts = alloc::vec![0u32; self.ksm.stable.len()];
        for v in self.vms.iter().flatten() {
            for slot in &v.slots {
                for e in &slot.pages {
                    if e.shared() {
                        let f = self.ksm.stable.get(e.aux as usize).ok_or("bad stable index")?;
                        if !f.live || f.frame != e.frame {
                            return Err("page mapped to a dead or different merged frame");
                        }
                        counts[e.aux as usize] += 1;
                    } else if e.frame != NO_FRAME && !self.frames.is_allocated(e.pa()) {
                        return Err("private page on a free frame");
                    }
                }
            }
        }
        for (i, f) in self.ksm.stable.iter().enumerate() {
            if f.live && (f.sharers != counts[i] || f.sharers == 0) {
                return Err("merged frame count differs from its mappings");
            }
            if f.live && f.sharers > self.ksm.config.max_page_sharing && !f.zero {
                return Err("merged frame over max_page_sharing");
            }
        }
        Ok(())
    }
}

/// Moves the cursor to the next mergeable page slot, ending the pass when
/// it runs past the last VM. False if there is nothing to scan.
fn next_page<S: Stage2>(ksm: &mut Ksm, vms: &[Option<Vm<S>>], res: &mut ScanResult) -> bool {
    let mut wrapped = false;
    loop {
        let (vi, si, pi) = ksm.cursor;
        if vi >= vms.len() {
            if ksm.visited_this_pass == 0 && (wrapped || vms.is_empty()) {
                ksm.cursor = (0, 0, 0);
                return false; // nothing mergeable anywhere
            }
            if ksm.visited_this_pass > 0 {
                ksm.finish_pass();
                res.full_scans_completed += 1;
            }
            ksm.cursor = (0, 0, 0);
            wrapped = true;
            continue;
        }
        match &vms[vi] {
            Some(v) if v.domain.is_some() && si < v.slots.len() => {
                if v.slots[si].mergeable && pi < v.slots[si].pages.len() {
                    return true;
                }
                ksm.cursor = (vi, si + 1, 0);
            }
            _ => ksm.cursor = (vi + 1, 0, 0),
        }
    }
}

/// One page, in KSM's order (see the module comment). Returns how many
/// pages became merged.
fn scan_one<P: PhysMem, S: Stage2>(
    mem: &P,
    frames: &mut FrameAllocator,
    vms: &mut [Option<crate::page_manager::Vm<S>>],
    ksm: &mut Ksm,
    vi: usize,
    si: usize,
    pi: usize,
) -> usize {
    ksm.scanned += 1;
    let v = vms[vi].as_mut().expect("scanned VM exists");
    let domain = v.domain.expect("scanned VM merges");
    let gfn = v.slots[si].base_gfn + pi as u64;
    let e = &mut v.slots[si].pages[pi];
    if e.frame == NO_FRAME || e.shared() {
        return 0;
    }
    e.flags &= !F_UNSTABLE; // it left last pass's unstable index
    let hash = page_hash::hash(mem.page(e.pa()));
    let key = key_of(hash, domain);

    // 1. A merged frame with this content and room for one more.
    if let Some(id) = ksm.stable_with_room(key) {
        if merge_into(mem, frames, ksm, v, si, pi, id) {
            ksm.pass.merged += 1;
            return 1;
        }
    }
    // 2. Changed since the last look: not a candidate yet.
    let e = &mut v.slots[si].pages[pi];
    let sum = hash as u32;
    if e.flags & F_CSUM == 0 || e.aux != sum {
        e.aux = sum;
        e.flags |= F_CSUM;
        ksm.pass.changed += 1;
        return 0;
    }
    // 3. All zero: the domain's zero frame.
    if ksm.config.use_zero_pages && hash == ksm.zero_hash {
        if let Some(id) = ksm.zero_frame(mem, frames, domain) {
            if merge_into(mem, frames, ksm, v, si, pi, id) {
                ksm.pass.merged += 1;
                return 1;
            }
            if ksm.stable[id as usize].sharers == 0 {
                ksm.remove(frames, id);
            }
        }
        return 0;
    }
    // 4. An unchanged twin seen earlier in this pass.
    let me = page_ref(vi, gfn);
    let twin = match ksm.unstable.get(&key) {
        Some(&q) if q != me => valid_twin(vms, q, domain, sum),
        _ => None,
    };
    let Some((qvi, qsi, qpi)) = twin else {
        ksm.unstable.insert(key, me);
        vms[vi].as_mut().unwrap().slots[si].pages[pi].flags |= F_UNSTABLE;
        return 0;
    };
    let qgfn = vms[qvi].as_ref().unwrap().slots[qsi].base_gfn + qpi as u64;
    write_protect(mem, frames, &vms[qvi].as_ref().unwrap().mmu, qgfn);
    write_protect(mem, frames, &vms[vi].as_ref().unwrap().mmu, gfn);
    let qe = vms[qvi].as_ref().unwrap().slots[qsi].pages[qpi];
    let pe = vms[vi].as_ref().unwrap().slots[si].pages[pi];
    if mem.page(qe.pa()) != mem.page(pe.pa()) {
        ksm.mismatches += 1;
        return 0;
    }
    // The twin's frame becomes the merged frame; its translation is
    // already read-only and stays.
    ksm.unstable.remove(&key);
    let id = ksm.new_stable(qe.frame, key);
    ksm.stable[id as usize].sharers = 1;
    ksm.merges += 1;
    vms[qvi].as_mut().unwrap().slots[qsi].pages[qpi] = PageEntry { frame: qe.frame, aux: id, flags: F_SHARED };
    replace(mem, frames, ksm, vms[vi].as_mut().unwrap(), si, pi, id);
    ksm.pass.merged += 2;
    2
}

/// The page behind an unstable-index entry, if it is still an unmerged,
/// unchanged page of the same domain.
fn valid_twin<S: Stage2>(
    vms: &[Option<crate::page_manager::Vm<S>>],
    q: u64,
    domain: u32,
    sum: u32,
) -> Option<(usize, usize, usize)> {
    let qvi = (q >> 40) as usize;
    let v = vms.get(qvi)?.as_ref()?;
    if v.domain != Some(domain) {
        return None;
    }
    let (si, pi) = v.find(q & ((1 << 40) - 1))?;
    let e = v.slots[si].pages[pi];
    let ok = v.slots[si].mergeable && e.frame != NO_FRAME && e.flags & (F_SHARED | F_CSUM) == F_CSUM && e.aux == sum;
    ok.then_some((qvi, si, pi))
}

#[cfg(test)]
mod page_hash_tests {
    use super::page_hash;
    use crate::phys::PAGE_SIZE;

    /// The page hash is xxh3_64, bit for bit, whichever path runs.
    #[test]
    fn page_hash_is_xxh3_64() {
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(page_hash::hash(&page), xxhash_rust::xxh3::xxh3_64(&page));
        let mut x = 0x1234_5678_9abc_def0u64;
        for round in 0..2000 {
            for (i, b) in page.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = match round % 4 {
                    0 => x as u8,
                    1 => (i % 251) as u8 ^ round as u8,
                    2 => if x % 97 == 0 { x as u8 } else { 0 },
                    _ => 0xff ^ (x >> 60) as u8,
                };
            }
            assert_eq!(page_hash::hash(&page), xxhash_rust::xxh3::xxh3_64(&page), "round {round}");
            // One bit anywhere changes it the same way.
            let bit = (x as usize) % (PAGE_SIZE * 8);
            page[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(page_hash::hash(&page), xxhash_rust::xxh3::xxh3_64(&page), "round {round} flipped");
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            assert_eq!(page_hash::implementation(), "avx2", "the AVX2 path is the one tested here");
        }
    }
}

//! Counters, with Linux's KSM names where there is one
//! (`/sys/kernel/mm/ksm/*`, Documentation/admin-guide/mm/ksm.rst).

use crate::mmu_notifier::MmuStats;

/// Per-VM counters of the page manager (the notifier's are in [`MmuStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Every call of `handle_ept_violation`.
    pub ept_violations: u64,
    /// ... for a page with no translation that the guest never faulted
    /// in before (first touch, also of a page the hypervisor backed or the
    /// dedupe merged before the guest came), or after a retry.
    pub not_present: u64,
    /// ... for a merged page whose translation the guest had faulted in
    /// and lost: the merge zapped it (Linux's way, `NotifierMode::LinuxZap`)
    /// and the guest came back. With change_pte installing the merged
    /// frame this stays 0: a re-read of a merged page never exits.
    pub refaults: u64,
    /// ... a write to a merged page (copy-on-write).
    pub write_shared: u64,
    /// ... a write to a private page that was write-protected (for a
    /// compare that found the pages different).
    pub write_protected: u64,
    /// ... outside every memory slot.
    pub outside: u64,
    /// Violations that ended in "let the guest fault again".
    pub retries: u64,
    /// Violations that could not get a host frame.
    pub out_of_memory: u64,
    /// Merged pages made private again (by the guest or the hypervisor).
    pub cow_breaks: u64,
    /// Frames allocated on first touch.
    pub pages_allocated: u64,
    /// Frames charged to the VM now: private frames behind its pages and
    /// its second-stage table frames (merged frames are the dedupe's).
    /// Summed over VMs: the frames all of them hold.
    pub frames_held: u64,
    /// The most `frames_held` ever was. Summed over VMs: an upper bound
    /// of the total's peak (the VMs need not have peaked together).
    pub frames_peak: u64,
    /// Allocations refused because they would take the VM past its frame
    /// quota (EPT violations and hypervisor writes).
    pub quota_refusals: u64,
}

impl VmStats {
    pub fn add(&mut self, o: &VmStats) {
        self.ept_violations += o.ept_violations;
        self.not_present += o.not_present;
        self.refaults += o.refaults;
        self.write_shared += o.write_shared;
        self.write_protected += o.write_protected;
        self.outside += o.outside;
        self.retries += o.retries;
        self.out_of_memory += o.out_of_memory;
        self.cow_breaks += o.cow_breaks;
        self.pages_allocated += o.pages_allocated;
        self.frames_held += o.frames_held;
        self.frames_peak += o.frames_peak;
        self.quota_refusals += o.quota_refusals;
    }
}

pub(crate) fn add_mmu(t: &mut MmuStats, o: &MmuStats) {
    t.invalidate_range_start += o.invalidate_range_start;
    t.change_pte += o.change_pte;
    t.change_pte_installed += o.change_pte_installed;
    t.invalidate_range_end += o.invalidate_range_end;
    t.tlb_flushes += o.tlb_flushes;
    t.installs += o.installs;
    t.retries += o.retries;
    t.warnings += o.warnings;
    t.dirty_cleared += o.dirty_cleared;
    t.tlb_flushes_deferred += o.tlb_flushes_deferred;
}

/// The dedupe engine's state, as Linux's KSM reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KsmStats {
    /// Merged frames in use (not counting zero frames).
    pub pages_shared: u64,
    /// Guest pages mapped to a merged frame, beyond the first of each.
    pub pages_sharing: u64,
    /// Pages in the unstable index: unchanged, but no twin found yet.
    pub pages_unshared: u64,
    /// Pages looked at that changed since the last look (or that are in
    /// no index for another reason).
    pub pages_volatile: u64,
    /// Completed passes over all mergeable memory.
    pub full_scans: u64,
    /// Pages mapped to a zero frame (Linux: `ksm_zero_pages`).
    pub zero_pages: u64,
    /// Pages merged (into a merged frame or a zero frame), ever.
    pub merges: u64,
    /// Byte compares that found different content behind equal hashes or
    /// a candidate that changed.
    pub compare_mismatches: u64,
    /// Pages looked at by `scan`.
    pub pages_scanned: u64,
    /// Looks that kept the stored checksum instead of hashing the page
    /// (dirty tracking: its EPT dirty flag stayed clear).
    pub checksums_reused: u64,
    /// Looks that hashed the page (every look but those that kept the
    /// checksum): the part of a look that costs most.
    pub pages_hashed: u64,
    /// Looks at a changed page that made it a merge candidate at once
    /// (`DedupeConfig::merge_at_first_look`), without KSM's second look.
    pub first_looks: u64,
}

/// Everything, summed over all VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub ksm: KsmStats,
    pub vm: VmStats,
    pub mmu: MmuStats,
}

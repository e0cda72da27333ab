//! The second-stage (guest-physical -> host-physical) translation, as the
//! rest of the core sees it: "map this guest page to that host frame with
//! these permissions". Intel's EPT ([`crate::ept`]) is the one
//! implementation today; AMD's nested page tables would be a second one.
//! The notifier, the page manager and the dedupe engine only use this trait.

use crate::frame::FrameAllocator;
use crate::phys::{PhysAddr, PhysMem};
use core::ops::Range;

bitflags::bitflags! {
    /// Access rights of a guest page, independent of the table format.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Perms: u8 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
        /// Ordinary private guest RAM.
        const RWX = Self::READ.bits() | Self::WRITE.bits() | Self::EXEC.bits();
        /// A write-protected page (merged, or watched for changes).
        const RX = Self::READ.bits() | Self::EXEC.bits();
    }
}

/// One guest page's translation, as found by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The host frame backing the 4 KiB guest page that was looked up (for
    /// a large mapping: the right 4 KiB piece of it).
    pub hpa: PhysAddr,
    pub perms: Perms,
    /// Bytes mapped by the entry that holds this translation (4 KiB, 2 MiB
    /// or 1 GiB).
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No host frame for a paging-structure table.
    OutOfFrames,
    /// The guest-physical address is beyond what the tables can translate.
    OutOfRange,
    /// An address is not aligned to the mapping size.
    Unaligned,
}

/// A guest-physical translation structure.
///
/// Entries for guest pages are changed one 4 KiB page at a time or over
/// ranges; large mappings are split when only part of them changes.
/// Tables are freed only by [`Stage2::destroy`]; the host frames that
/// leaves point to belong to the caller and are never freed here.
pub trait Stage2: Sized {
    /// Empty tables (one root frame).
    fn new<M: PhysMem>(mem: &M, frames: &mut FrameAllocator) -> Result<Self, MapError>;

    /// Maps the 4 KiB guest page at `gpa`, replacing any translation it had
    /// (splitting a large mapping that covers it). Returns the old leaf.
    fn map_4k<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        gpa: u64,
        hpa: PhysAddr,
        perms: Perms,
    ) -> Result<Option<Leaf>, MapError>;

    /// Maps 2 MiB at `gpa` (both addresses 2 MiB-aligned), replacing what
    /// was there (a table of 4 KiB entries under it is freed).
    fn map_2m<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        gpa: u64,
        hpa: PhysAddr,
        perms: Perms,
    ) -> Result<(), MapError>;

    /// Replaces the translation of the 4 KiB page at `gpa` only if one is
    /// present as a 4 KiB entry; never allocates. Returns the old leaf.
    fn replace_if_present<M: PhysMem>(&mut self, mem: &M, gpa: u64, hpa: PhysAddr, perms: Perms) -> Option<Leaf>;

    /// Removes every translation in `range` (guest-physical bytes, page
    /// aligned). Returns how many present entries were changed (so the
    /// caller knows whether the TLB may hold stale ones).
    fn unmap_range<M: PhysMem>(&mut self, mem: &M, frames: &mut FrameAllocator, range: Range<u64>) -> usize;

    /// Reduces the rights of every translation in `range` to at most
    /// `keep`. Returns how many present entries were changed.
    fn protect_range<M: PhysMem>(
        &mut self,
        mem: &M,
        frames: &mut FrameAllocator,
        range: Range<u64>,
        keep: Perms,
    ) -> usize;

    /// The translation of `gpa`, as the hardware would find it.
    fn lookup<M: PhysMem>(&self, mem: &M, gpa: u64) -> Option<Leaf>;

    /// Has the hardware keep accessed and dirty flags in these tables
    /// (for EPT the EPTP must enable them too). False if the format or
    /// this implementation has none; the tables then never report a page
    /// as clean.
    fn enable_accessed_dirty(&mut self) -> bool {
        false
    }

    /// Whether the hardware keeps accessed and dirty flags in these tables.
    fn accessed_dirty(&self) -> bool {
        false
    }

    /// For a present 4 KiB translation of `gpa`: whether the guest wrote
    /// the page since the flag was last cleared, and clears the flag (the
    /// caller flushes the guest TLB before the guest runs again, or the
    /// hardware may not set it on the next write). None when there is no
    /// such translation or no dirty flag: the caller cannot tell.
    fn test_and_clear_dirty<M: PhysMem>(&mut self, _mem: &M, _gpa: u64) -> Option<bool> {
        None
    }

    /// Starts loading the cache line of the 4 KiB entry of `gpa`, for a
    /// change to it a little later (a hint: the upper levels are read,
    /// nothing is changed).
    fn prefetch_entry<M: PhysMem>(&self, _mem: &M, _gpa: u64) {}

    /// What the processor does to the tables when a guest access to `gpa`
    /// that they allow completes (the simulated guest calls it): set the
    /// accessed flags on the walk and, for a write, the leaf's dirty flag,
    /// if the tables keep them. Returns whether the leaf is dirty after
    /// the access (what a TLB entry filled by this walk would remember).
    fn hw_access<M: PhysMem>(&mut self, _mem: &M, _gpa: u64, _write: bool) -> bool {
        false
    }

    /// Frees all table frames (not the frames leaves point to).
    fn destroy<M: PhysMem>(self, mem: &M, frames: &mut FrameAllocator);

    /// The root table's frame.
    fn root(&self) -> PhysAddr;

    /// How many table frames the structure holds now.
    fn table_frames(&self) -> usize;
}

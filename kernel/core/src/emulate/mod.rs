//! Instruction emulation for exits that need it: the guest's page walk
//! (linear to guest-physical) and the decode of an MMIO access.

pub mod mmio;
pub mod paging;

//! The hardware-free core of the hypervisor.
//!
//! Everything here builds both for the host (and is unit-tested there with
//! plain `cargo test`) and for `x86_64-unknown-none`, where the kernel uses
//! it. Physical memory is reached only through [`phys::PhysMem`]: an offset
//! mapping in the kernel, an arena in tests.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod bundle;
mod content_index;
pub mod control_regs;
pub mod cpuid;
pub mod dedupe;
pub mod devices;
pub mod emulate;
pub mod ept;
pub mod exit;
pub mod frame;
pub mod heap_stats;
pub mod hypercall;
pub mod loader;
pub mod manifest;
pub mod mmu_notifier;
pub mod msrs;
pub mod options;
pub mod page_manager;
pub mod phys;
pub mod platform;
mod prefetch;
pub mod rate_limit;
pub mod serial_device;
pub mod sim;
pub mod stage2;
pub mod stats;
pub mod vmx;
pub mod warn;

#[cfg(test)]
mod tests;

//! The one-screen boot summary: what machine this is and what we found.

use crate::memory::MemoryInfo;
use x86::cpuid::CpuId;

pub struct CpuInfo {
    pub vendor: heapless_str::Str,
    pub brand: heapless_str::Str,
    pub family: u8,
    pub model: u8,
    pub stepping: u8,
    pub vmx: bool,
    pub svm: bool,
    pub hypervisor: bool,
}

/// Tiny fixed-size string so the summary does not depend on the heap.
pub mod heapless_str {
    #[derive(Clone, Copy)]
    pub struct Str {
        buf: [u8; 48],
        len: usize,
    }
    impl Str {
        pub fn new(s: &str) -> Str {
            let mut buf = [0; 48];
            let len = s.len().min(48);
            buf[..len].copy_from_slice(&s.as_bytes()[..len]);
            Str { buf, len }
        }
        pub fn as_str(&self) -> &str {
            core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?").trim()
        }
    }
}

pub fn cpu() -> CpuInfo {
    let id = CpuId::new();
    let vendor = id.get_vendor_info();
    let features = id.get_feature_info();
    let brand = id.get_processor_brand_string();
    let ext = id.get_extended_processor_and_feature_identifiers();
    CpuInfo {
        vendor: heapless_str::Str::new(vendor.as_ref().map_or("unknown", |v| v.as_str())),
        brand: heapless_str::Str::new(brand.as_ref().map_or("(no brand string)", |b| b.as_str())),
        family: features.as_ref().map_or(0, |f| f.family_id()),
        model: features.as_ref().map_or(0, |f| f.model_id()),
        stepping: features.as_ref().map_or(0, |f| f.stepping_id()),
        vmx: features.as_ref().is_some_and(|f| f.has_vmx()),
        svm: ext.as_ref().is_some_and(|e| e.has_svm()),
        hypervisor: features.as_ref().is_some_and(|f| f.has_hypervisor()),
    }
}

pub fn print(cpu: &CpuInfo, mem: &MemoryInfo, ramdisk_len: u64, bundle_files: usize) {
    let yes = |b: bool| if b { "yes" } else { "no" };
    log::info!("== boot summary ==");
    log::info!(
        "cpu: {} family {:#x} model {:#x} stepping {} \"{}\"",
        cpu.vendor.as_str(), cpu.family, cpu.model, cpu.stepping, cpu.brand.as_str()
    );
    log::info!(
        "cpu features: vmx={} svm={} running-under-hypervisor={}",
        yes(cpu.vmx), yes(cpu.svm), yes(cpu.hypervisor)
    );
    log::info!(
        "memory: {} MiB usable in {} regions; heap {} MiB; {} frames ({} MiB) for guests and tables",
        mem.usable_bytes >> 20, mem.usable_regions, mem.heap_bytes >> 20, mem.frames, (mem.frames as u64 * 4096) >> 20
    );
    log::info!("ramdisk: {} bytes, {} files", ramdisk_len, bundle_files);
    log::info!("== end of boot summary ==");
}

//! The hypercalls, on top of `hvcore::hypercall::vmcall`.

use hvcore::hypercall::{self as hc, vmcall};

pub fn print(s: &str) -> u64 {
    print_bytes(s.as_bytes())
}

/// PRINT of any bytes (the FORGE scenario sends some that are not UTF-8).
pub fn print_bytes(bytes: &[u8]) -> u64 {
    // Identity-mapped memory: the pointer is the guest-physical address.
    let bytes = &bytes[..bytes.len().min(hc::PRINT_MAX as usize)];
    // SAFETY: we run under the hypervisor at CPL 0; `bytes` is readable.
    unsafe { vmcall(hc::PRINT, bytes.as_ptr() as u64, bytes.len() as u64, 0) }
}

pub fn yield_now() {
    // SAFETY: as above; YIELD touches no memory.
    unsafe { vmcall(hc::YIELD, 0, 0, 0) };
}

/// Reports a check; returns whether it passed.
pub fn report(check: u64, pass: bool, detail: u64) -> bool {
    crate::println!("check {check}: {} (detail {detail:#x})", if pass { "pass" } else { "FAIL" });
    // SAFETY: as above.
    unsafe { vmcall(hc::REPORT, check, !pass as u64, detail) };
    pass
}

/// REPORT without the serial line; returns RAX (0, or ERROR once the
/// hypervisor records no more).
pub fn report_quiet(check: u64, pass: bool, detail: u64) -> u64 {
    // SAFETY: as above.
    unsafe { vmcall(hc::REPORT, check, !pass as u64, detail) }
}

pub fn dedupe_converged() -> bool {
    // SAFETY: as above.
    unsafe { vmcall(hc::DEDUPE_STATUS, 0, 0, 0) == 1 }
}

/// Ends the VM. Should the hypervisor ever resume it, it halts forever.
pub fn exit(code: u64) -> ! {
    // SAFETY: as above.
    unsafe { vmcall(hc::EXIT, code, 0, 0) };
    loop {
        // SAFETY: halting at CPL 0.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// A raw call with any number (for the BAD_HYPERCALL scenario).
pub fn raw(nr: u64, a: u64, b: u64, c: u64) -> u64 {
    // SAFETY: as above; an unknown number must only return ERROR.
    unsafe { vmcall(nr, a, b, c) }
}
